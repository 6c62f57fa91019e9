"""The char-LM: layout, causality, regularisers (on in training, off at eval),
variational masks shared over time, the loss, and the decoding step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from seqjax import decoding, native
from seqjax.models import charlm

INFO = {"vocab": "abcdefghijklmnopqrstuvwxyz"}   # V = 27 with the unknown id
B, T, V, E, H = 3, 10, 27, 6, 8


def _config(**overrides):
  config = charlm.default_config()
  config.update(dict(hidden_size=H, embed_size=E, num_layers=2))
  config.update(overrides)
  return config


def _setup(**overrides):
  config = _config(**overrides)
  model = charlm.create(config, INFO)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, V)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
  variables = model.init(jax.random.key(1), batch, None)
  return config, model, batch, variables


def _train(model, variables, batch, seed=2, **kwargs):
  return model.apply(variables, batch, None, train=True, rngs={"dropout": jax.random.key(seed)},
                     **kwargs)


def test_parameter_layout():
  _, _, _, variables = _setup()
  shapes = jax.tree.map(np.shape, variables["params"])
  assert shapes == {
      "embed": (V, E),
      "rnn": {"layer_0": {"w_x": (E, 4 * H), "w_h": (H, 4 * H), "b": (4 * H,)},
              "layer_1": {"w_x": (H, 4 * H), "w_h": (H, 4 * H), "b": (4 * H,)}},
      "head": {"kernel": (H, V), "bias": (V,)}}
  _, _, _, tied = _setup(tie_weights=True, embed_size=H)
  assert set(tied["params"]) == {"embed", "rnn", "head_bias"}
  assert tied["params"]["embed"].shape == (V, H)


def test_causality_by_gradient():
  """d logits_t / d input_s is exactly 0 for s > t (and not for s <= t)."""
  _, model, _, variables = _setup(cell="gru")
  tokens = jnp.arange(T)[None, :]  # each position its own character, so the
  # gradient on embedding row s is the gradient on the input at step s

  @jax.jit  # one compilation for every t
  def grad_at(table, t):
    def logits_at(table):
      params = dict(variables["params"], embed=table)
      _, out = model.apply({"params": params}, {"inputs": tokens}, None)
      return jnp.sum(out["logits"][0, t])
    return jax.grad(logits_at)(table)

  for t in range(T):
    grad = grad_at(variables["params"]["embed"], t)  # [V, E]
    per_step = np.abs(np.asarray(grad[:T])).sum(axis=1)  # [T]
    assert np.all(per_step[t + 1:] == 0), (t, per_step)
    assert np.all(per_step[:t + 1] > 0), (t, per_step)


@pytest.mark.parametrize("name", ["dropout_input", "dropout_hidden", "dropout_output",
                                  "dropout_embedding", "weight_drop"])
def test_each_dropout_changes_training_outputs_and_is_off_at_eval(name):
  _, model, batch, variables = _setup(**{name: 0.5})
  _, plain_model, _, _ = _setup()
  eval_logits = model.apply(variables, batch, None)[1]["logits"]
  np.testing.assert_array_equal(eval_logits, plain_model.apply(variables, batch, None)[1]["logits"])
  train_logits = _train(model, variables, batch)[1]["logits"]
  assert not np.allclose(train_logits, eval_logits)
  np.testing.assert_array_equal(train_logits, _train(model, variables, batch)[1]["logits"])
  assert not np.allclose(train_logits, _train(model, variables, batch, seed=3)[1]["logits"])
  # Without the regulariser, training mode is evaluation mode.
  np.testing.assert_array_equal(_train(plain_model, variables, batch)[1]["logits"], eval_logits)


@pytest.mark.parametrize("name", ["dropout_input", "dropout_output"])
def test_variational_dropout_uses_one_mask_across_time(name):
  _, model, _, variables = _setup(**{name: 0.5})
  batch = {"inputs": jnp.full((B, T), 4)}  # the same character at every step
  _, state = _train(model, variables, batch, capture_intermediates=True,
                    mutable=["intermediates"])
  layer = "Dropout_0" if name == "dropout_input" else "Dropout_1"
  (dropped,) = state["intermediates"][layer]["__call__"]  # [B, T, E or H]
  dropped = np.asarray(dropped)
  zeros = dropped == 0
  assert zeros.any() and not zeros.all()
  for t in range(T):
    np.testing.assert_array_equal(zeros[:, t], zeros[:, 0])
  assert not np.array_equal(zeros[0], zeros[1])  # but one mask per row


def test_embedding_dropout_drops_whole_characters():
  _, model, _, variables = _setup(dropout_embedding=0.5)
  tokens = jnp.tile(jnp.arange(12)[None, :], (B, 2))  # every character 2 * B times
  _, state = _train(model, variables, {"inputs": tokens}, capture_intermediates=True,
                    mutable=["intermediates"])
  (xs,) = state["intermediates"]["Dropout_0"]["__call__"]  # dropout_input = 0: xs as looked up
  row_zero = np.all(np.asarray(xs) == 0, axis=-1)  # [B, 2 * 12]
  table = np.asarray(variables["params"]["embed"])
  for char in range(12):
    status = row_zero[np.asarray(tokens) == char]
    assert status.all() or not status.any()       # a character is dropped everywhere or nowhere
  dropped = {c for c in range(12) if row_zero[np.asarray(tokens) == c].all()}
  assert 0 < len(dropped) < 12
  kept = [c for c in range(12) if c not in dropped][0]
  np.testing.assert_allclose(np.asarray(xs)[np.asarray(tokens) == kept][0], table[kept] / 0.5,
                             rtol=1e-6)


def test_ar_and_tar_add_to_the_training_objective_only():
  config, model, batch, variables = _setup(ar=2.0, tar=3.0, dropout_output=0.3)
  weights = jnp.ones((B, T)).at[0, :4].set(0.0)
  batch = dict(batch, weights=weights, resets=jnp.zeros((B, T), bool).at[1, 5].set(True))
  _, outputs = _train(model, variables, batch)
  objective, weight, metrics = charlm.loss(config, outputs, batch)
  ce, w = metrics["loss"]
  assert float(w) == float(weight) == B * T - 4
  expected = ce + 2.0 * jnp.sum(outputs["ar"] * weights) + 3.0 * jnp.sum(outputs["tar"] * weights)
  np.testing.assert_allclose(objective, expected, rtol=1e-6)
  assert float(objective) > float(ce)
  assert outputs["tar"].shape == (B, T) and float(outputs["tar"][1, 5]) == 0.0  # reset
  assert float(outputs["tar"][0, 0]) == 0.0 and float(outputs["tar"][1, 6]) > 0
  _, eval_outputs = model.apply(variables, batch, None)
  assert set(eval_outputs) == {"logits"}
  objective, _, metrics = charlm.loss(config, eval_outputs, batch)
  np.testing.assert_array_equal(objective, metrics["loss"][0])
  np.testing.assert_allclose(metrics["bits"][0], metrics["loss"][0] / np.log(2), rtol=1e-6)


def test_decode_step_continues_the_sequence_and_never_proposes_unknown():
  _, model, batch, variables = _setup()
  step = charlm.decode_step(model)
  params = variables["params"]
  _, full = model.apply(variables, batch, None)
  carry, logits = step(params, None, batch["inputs"][:, :6])
  np.testing.assert_allclose(logits[:, :-1], full["logits"][:, 5, :-1], rtol=1e-5, atol=1e-6)
  for t in range(6, T):
    carry, logits = step(params, carry, batch["inputs"][:, t:t + 1])
    np.testing.assert_allclose(logits[:, :-1], full["logits"][:, t, :-1], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(logits[:, -1]) == -np.inf)


@pytest.mark.parametrize("overrides, message", [
    (dict(cell="lstmm"), "unknown model.cell 'lstmm'"),
    (dict(dropout_hidden=1.0), r"model.dropout_hidden must be in \[0, 1\), got 1.0"),
    (dict(tie_weights=True), "model.tie_weights needs model.embed_size == model.hidden_size, "
                             "got 6 and 8"),
])
def test_bad_configs_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    charlm.create(_config(**overrides), INFO)


def test_needs_a_vocabulary():
  with pytest.raises(ValueError, match="needs a text data source"):
    charlm.create(_config(), {})
  assert isinstance(charlm.default_config(), ml_collections.ConfigDict)


@pytest.mark.parametrize("overrides, settings, native_call", [
    (dict(hidden_size=32), dict(temperature=0.8), True),
    (dict(hidden_size=32, embed_size=32, tie_weights=True), dict(temperature=0.0), True),
    (dict(hidden_size=32), dict(top_k=5), False),       # top-k: decoding.generate
    (dict(hidden_size=32, cell="gru"), dict(), True),
    (dict(hidden_size=64, cell="gru", num_layers=1), dict(temperature=0.0), True),
    # H off whole registers: the kernel on zero-padded units (two layers)
    (dict(hidden_size=20), dict(temperature=0.8), True),
    (dict(hidden_size=20, embed_size=20, tie_weights=True), dict(temperature=0.0), True),
    (dict(hidden_size=40, cell="gru"), dict(), True),
    (dict(hidden_size=32, cell="elman"), dict(), False),  # no sampling kernel
    (dict(hidden_size=32, cell="gru", reset_after=False), dict(), False),  # nor for this GRU
])
def test_generate_draws_what_decoding_generate_draws(overrides, settings, native_call):
  """The char-LM's own sampler, on the native kernel where it can, draws the
  tokens decoding.generate draws from decode_step, and returns the same state."""
  overrides = dict(overrides)
  reset_after = overrides.pop("reset_after", True)
  _, model, batch, variables = _setup(**overrides)
  if not reset_after:  # the original GRU form, which charlm's config does not offer
    model = model.clone(cells=tuple(dataclasses.replace(c, reset_after=False)
                                    for c in model.cells))
    variables = model.init(jax.random.key(1), batch, None)
    assert "b_hn" not in variables["params"]["rnn"]["layer_0"]
  # float32, as without x64 (the tests enable it; the embedding would be float64)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), variables["params"])
  step = charlm.decode_step(model)
  carry, logits = step(params, None, batch["inputs"][:, :4])
  key, length = jax.random.key(2), 40
  ours = jax.jit(lambda c, l: charlm.generate(model, params, c, l, key, length, start=3,
                                              **settings))
  reference = jax.jit(lambda c, l: decoding.generate(step, params, c, l, key, length, start=3,
                                                     **settings))
  lowered = ours.lower(carry, logits).as_text()
  kernel = f"seqjax_{model.cells[0].__class__.__name__.lower()}_sample"
  assert (kernel in lowered) == (native_call and native.status() == "ready")
  assert "_sample" not in lowered.replace(kernel, "")
  (got_carry, got_logits, got), (want_carry, want_logits, want) = ours(carry, logits), \
      reference(carry, logits)
  np.testing.assert_array_equal(got, want)
  assert not np.any(np.asarray(got) == V - 1)  # the unknown character is never drawn
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(got_carry) == jax.tree.structure(want_carry)
  for g, w in zip(jax.tree.leaves(got_carry), jax.tree.leaves(want_carry)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
