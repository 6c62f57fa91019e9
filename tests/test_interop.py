"""Weights from PyTorch and Keras: random source layers of every supported
kind and configuration give the same outputs (and final states) in seqjax."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import cells
from seqjax import interop

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

B, T, D, H = 3, 7, 4, 5
ATOL = 2e-5  # float32 round-off over T steps


def _xs():
  return np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)


TORCH_KINDS = {
    "rnn_tanh": lambda **kw: torch.nn.RNN(D, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: torch.nn.RNN(D, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: torch.nn.LSTM(D, H, **kw),
    "gru": lambda **kw: torch.nn.GRU(D, H, **kw),
}


@pytest.mark.parametrize("kind, num_layers, bidirectional, batch_first, bias",
                         list(itertools.product(TORCH_KINDS, [1, 2], [False, True],
                                                [True, False], [True, False])))
def test_from_torch_matches(kind, num_layers, bidirectional, batch_first, bias):
  torch.manual_seed(0)
  source = TORCH_KINDS[kind](num_layers=num_layers, bidirectional=bidirectional,
                             batch_first=batch_first, bias=bias, dropout=0.0)
  with torch.no_grad():  # biases are zero-mean at init: make them count
    for name, p in source.named_parameters():
      if name.startswith("bias"):
        p.add_(torch.randn_like(p))
  xs = _xs()
  inputs = torch.from_numpy(xs if batch_first else xs.transpose(1, 0, 2))
  with torch.no_grad():
    out, state = source(inputs)
  expected = out.numpy() if batch_first else out.numpy().transpose(1, 0, 2)

  module, variables = interop.from_torch(source)
  carries, ys = module.apply(variables, jnp.asarray(xs))
  np.testing.assert_allclose(ys, expected, atol=ATOL)

  # Final states: torch's h_n [L * dirs, B, H] (and c_n) vs per-layer carries.
  h_n, c_n = state if kind == "lstm" else (state, None)
  for layer, carry in enumerate(carries):
    directions = carry if bidirectional else (carry,)
    for k, c in enumerate(directions):
      row = layer * (2 if bidirectional else 1) + k
      h = c.h if kind == "lstm" else c
      np.testing.assert_allclose(h, h_n[row].numpy(), atol=ATOL)
      if kind == "lstm":
        np.testing.assert_allclose(c.c, c_n[row].numpy(), atol=ATOL)


def test_from_torch_keeps_dropout_and_cells():
  source = torch.nn.GRU(D, H, num_layers=3, dropout=0.25)
  module, variables = interop.from_torch(source)
  assert module.dropout_rate == 0.25
  assert module.cells == (cells.GRU(H, reset_after=True),) * 3
  assert sorted(variables["params"]) == ["layer_0", "layer_1", "layer_2"]


def test_from_torch_float64():
  source = torch.nn.LSTM(D, H, batch_first=True).double()
  module, variables = interop.from_torch(source)
  xs = _xs().astype(np.float64)
  with torch.no_grad():
    expected = source(torch.from_numpy(xs))[0].numpy()
  _, ys = module.apply(variables, jnp.asarray(xs))
  np.testing.assert_allclose(ys, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("make, message", [
    (lambda: torch.nn.LSTM(D, H, proj_size=2), "proj_size=2 is not supported"),
    (lambda: torch.nn.Linear(D, H), "expects torch.nn.RNN, nn.LSTM or nn.GRU, got Linear"),
])
def test_from_torch_unsupported(make, message):
  with pytest.raises(ValueError, match=message):
    interop.from_torch(make())


# --------------------------------------------------------------------------
# Keras 3 (JAX backend).


def _keras_out(layer, xs):
  # Keras' own JAX scan promotes its GRU carry to float64 under x64 (which
  # conftest enables), so the Keras side runs with x64 off.
  with jax.enable_x64(False):
    return np.asarray(layer(xs))


def _randomize_bias(layer):
  weights = layer.get_weights()
  rng = np.random.default_rng(1)
  layer.set_weights([w + rng.normal(size=w.shape).astype(w.dtype) if i >= 2 else w
                     for i, w in enumerate(weights)])


KERAS_KINDS = {
    "simple_tanh": lambda **kw: keras.layers.SimpleRNN(H, **kw),
    "simple_relu": lambda **kw: keras.layers.SimpleRNN(H, activation="relu", **kw),
    "lstm": lambda **kw: keras.layers.LSTM(H, **kw),
    "gru": lambda **kw: keras.layers.GRU(H, reset_after=True, **kw),
    "gru_cho": lambda **kw: keras.layers.GRU(H, reset_after=False, **kw),
}


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kind", KERAS_KINDS)
def test_from_keras_matches(kind, use_bias):
  keras.utils.set_random_seed(0)
  layer = KERAS_KINDS[kind](use_bias=use_bias, return_sequences=True)
  xs = _xs()
  layer.build((None, T, D))
  if use_bias:
    _randomize_bias(layer)
  expected = _keras_out(layer, xs)
  module, variables = interop.from_keras(layer)
  assert isinstance(module, seqjax.nn.RNN)
  _, ys = module.apply(variables, jnp.asarray(xs))
  np.testing.assert_allclose(ys, expected, atol=ATOL)


@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_from_keras_bidirectional(kind, merge_mode):
  keras.utils.set_random_seed(0)
  layer = keras.layers.Bidirectional(KERAS_KINDS[kind](return_sequences=True),
                                     merge_mode=merge_mode)
  xs = _xs()
  layer.build((None, T, D))
  expected = _keras_out(layer, xs)
  module, variables = interop.from_keras(layer)
  _, ys = module.apply(variables, jnp.asarray(xs))
  np.testing.assert_allclose(ys, expected, atol=ATOL)


@pytest.mark.parametrize("make, message", [
    (lambda: keras.layers.LSTM(H, go_backwards=True), "go_backwards=True is not supported"),
    (lambda: keras.layers.GRU(H, activation="relu"), "needs activation='tanh'"),
    (lambda: keras.layers.LSTM(H, recurrent_activation="hard_sigmoid"),
     "recurrent_activation='sigmoid'"),
    (lambda: keras.layers.Dense(H), "expects a keras LSTM, GRU, SimpleRNN"),
    (lambda: keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True),
                                        merge_mode="mul"), "merge_mode must be"),
])
def test_from_keras_unsupported(make, message):
  layer = make()
  layer.build((None, T, D))
  with pytest.raises(ValueError, match=message):
    interop.from_keras(layer)
