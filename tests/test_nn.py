"""Flax layers: same results as the drivers, stable parameter trees, dropout
RNG plumbing, and use inside a larger linen model."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import cells
from seqjax import nn as snn

B, T, D, H = 3, 6, 4, 5
LENGTHS = np.array([6, 2, 4])


def _xs(dtype=jnp.float32):
  return jax.random.normal(jax.random.key(0), (B, T, D), dtype)


@pytest.mark.parametrize("cell", [cells.LSTM(H), cells.GRU(H), cells.MinGRU(H)],
                         ids=["lstm", "gru", "mingru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_rnn_equals_driver(cell, reverse):
  layer = snn.RNN(cell, reverse=reverse, unroll=2)
  xs = _xs()
  variables = layer.init(jax.random.key(1), xs)
  carry, ys = layer.apply(variables, xs, lengths=LENGTHS)
  expected = seqjax.scan(cell, variables["params"]["cell"], xs, lengths=LENGTHS,
                         reverse=reverse, unroll=2)
  np.testing.assert_array_equal(ys, expected[1])
  jax.tree.map(np.testing.assert_array_equal, carry, expected[0])


# The wrappers pass remat through one shared path: the slow run checks them
# (the default suite's time budget).
@pytest.mark.parametrize("layer", [
    snn.RNN(cells.LSTM(H), remat=4),
    pytest.param(snn.Bidirectional(cells.GRU(H), remat=4), marks=pytest.mark.slow),
    pytest.param(snn.StackedRNN((cells.LSTM(H), cells.LSTM(H)), remat=4), marks=pytest.mark.slow)],
    ids=["rnn", "bidirectional", "stacked"])
def test_remat_reaches_the_driver(layer):
  """A layer with ``remat`` gives the values and gradients of the one without."""
  xs = _xs(jnp.float64)
  variables = layer.init(jax.random.key(1), xs)
  plain = layer.clone(remat=None)

  def loss(layer, variables):
    _, ys = layer.apply(variables, xs, lengths=LENGTHS)
    return jnp.sum(ys ** 2)

  remat_value, remat_grads = jax.value_and_grad(loss, argnums=1)(layer, variables)
  value, grads = jax.value_and_grad(loss, argnums=1)(plain, variables)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)  # float32 parameters
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat_grads, grads)
  # jax.checkpoint's primitive (its printed name differs between JAX versions)
  count = lambda layer: len(re.findall(r"\b(?:remat2?|checkpoint)\[", str(
      jax.make_jaxpr(functools.partial(loss, layer))(variables))))
  assert count(plain) == 0 and count(layer) > 0


@pytest.mark.parametrize("method", ["associative", "unroll"])
def test_rnn_method_and_time_major(method):
  layer = snn.RNN(cells.MinGRU(H), method=method, time_major=True)
  xs_tm = jnp.swapaxes(_xs(jnp.float64), 0, 1)  # [T, B, D]
  variables = layer.init(jax.random.key(1), xs_tm)
  carry, ys = layer.apply(variables, xs_tm, lengths=LENGTHS)
  expected = seqjax.scan(cells.MinGRU(H), variables["params"]["cell"],
                         _xs(jnp.float64), lengths=LENGTHS)
  np.testing.assert_allclose(jnp.swapaxes(ys, 0, 1), expected[1], rtol=1e-12)
  np.testing.assert_allclose(carry, expected[0], rtol=1e-12)


def test_rnn_param_tree_and_dtype():
  layer = snn.RNN(cells.GRU(H), param_dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(1), _xs(jnp.bfloat16))
  assert jax.tree.map(np.shape, variables) == {"params": {"cell": {
      "w_x": (D, 3 * H), "w_h": (H, 3 * H), "b": (3 * H,), "b_hn": (H,)}}}
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(variables))
  _, ys = layer.apply(variables, _xs(jnp.bfloat16))
  assert ys.dtype == jnp.bfloat16


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional_equals_driver(merge):
  layer = snn.Bidirectional(cells.LSTM(H), merge=merge)
  xs = _xs()
  variables = layer.init(jax.random.key(2), xs)
  params = variables["params"]
  assert sorted(params) == ["backward", "forward"]
  assert not np.allclose(params["forward"]["w_x"], params["backward"]["w_x"])
  carry, ys = layer.apply(variables, xs, lengths=LENGTHS)
  expected = seqjax.bidirectional(cells.LSTM(H), params, xs, lengths=LENGTHS,
                                  merge=merge)
  np.testing.assert_array_equal(ys, expected[1])
  assert ys.shape == (B, T, 2 * H if merge == "concat" else H)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_stacked_param_tree(bidirectional):
  model = snn.StackedRNN((cells.LSTM(H), cells.GRU(H)), bidirectional=bidirectional)
  variables = model.init(jax.random.key(3), _xs())
  shapes = jax.tree.map(np.shape, variables["params"])
  width = 2 * H if bidirectional else H
  layer_0 = {"w_x": (D, 4 * H), "w_h": (H, 4 * H), "b": (4 * H,)}
  layer_1 = {"w_x": (width, 3 * H), "w_h": (H, 3 * H), "b": (3 * H,), "b_hn": (H,)}
  if bidirectional:
    layer_0 = {"forward": layer_0, "backward": layer_0}
    layer_1 = {"forward": layer_1, "backward": layer_1}
  assert shapes == {"layer_0": layer_0, "layer_1": layer_1}
  carries, ys = model.apply(variables, _xs(), lengths=LENGTHS)
  assert ys.shape == (B, T, width) and len(carries) == 2
  expected = seqjax.stacked(model.cells, [variables["params"]["layer_0"],
                                          variables["params"]["layer_1"]],
                            _xs(), bidirectional=bidirectional, lengths=LENGTHS)
  np.testing.assert_array_equal(ys, expected[1])


def test_stacked_dropout_uses_the_dropout_rng():
  model = snn.StackedRNN((cells.LSTM(H), cells.LSTM(H)), dropout_rate=0.5,
                         residual=True)
  xs = _xs()
  variables = model.init(jax.random.key(4), xs)
  evaluate = model.apply(variables, xs)[1]
  train = lambda seed: model.apply(variables, xs, deterministic=False,
                                   rngs={"dropout": jax.random.key(seed)})[1]
  assert not np.allclose(train(0), evaluate)
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  with pytest.raises(Exception, match="dropout"):  # flax: no "dropout" RNG given
    model.apply(variables, xs, deterministic=False)


def test_stacked_weight_drop_and_variational_dropout_reach_the_driver(monkeypatch):
  """The layer hands both options and a key from the "dropout" stream to ``stacked``."""
  model = snn.StackedRNN((cells.LSTM(H), cells.GRU(H)), dropout_rate=0.5, variational=True,
                         weight_drop=0.3)
  xs = _xs()
  variables = model.init(jax.random.key(4), xs)
  layers = [variables["params"]["layer_0"], variables["params"]["layer_1"]]
  calls = []
  real = seqjax.recurrence.stacked

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(seqjax.recurrence, "stacked", spy)
  evaluate = model.apply(variables, xs)[1]
  assert calls[-1]["dropout_key"] is None
  train = model.apply(variables, xs, deterministic=False,
                      rngs={"dropout": jax.random.key(9)})[1]
  seen = calls[-1]
  assert (seen["dropout_rate"], seen["variational"], seen["weight_drop"]) == (0.5, True, 0.3)
  expected = real(model.cells, layers, xs, dropout_rate=0.5, variational=True,
                  weight_drop=0.3, dropout_key=seen["dropout_key"])[1]
  np.testing.assert_array_equal(train, expected)
  assert not np.allclose(train, evaluate)
  # Weight drop alone still asks for the key.
  snn.StackedRNN(model.cells, weight_drop=0.3).apply(
      variables, xs, deterministic=False, rngs={"dropout": jax.random.key(9)})
  assert calls[-1]["dropout_key"] is not None and calls[-1]["dropout_rate"] == 0.0


class _Classifier(nn.Module):
  """Embedding -> bidirectional stacked GRU -> mean over valid steps -> logits."""

  @nn.compact
  def __call__(self, tokens, lengths, deterministic=True):
    x = nn.Embed(num_embeddings=11, features=D)(tokens)  # [B, T, D]
    _, ys = snn.StackedRNN((cells.GRU(H), cells.GRU(H)), bidirectional=True,
                           dropout_rate=0.1)(x, lengths=lengths,
                                             deterministic=deterministic)
    pooled = ys.sum(axis=1) / lengths[:, None]  # padded outputs are zero
    return nn.Dense(2)(pooled)


def test_inside_a_larger_model_every_param_gets_a_gradient():
  model = _Classifier()
  tokens = jax.random.randint(jax.random.key(5), (B, T), 0, 11)
  labels = jnp.array([0, 1, 1])
  variables = model.init(jax.random.key(6), tokens, LENGTHS)

  @jax.jit
  def loss(params, rng):
    logits = model.apply({"params": params}, tokens, LENGTHS, deterministic=False,
                         rngs={"dropout": rng})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), labels])

  grads = jax.grad(loss)(variables["params"], jax.random.key(7))
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.any(np.asarray(g) != 0), f"no gradient reaches {path}"
