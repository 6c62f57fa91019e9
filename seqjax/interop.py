"""Weights from PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and Keras 3 layers.

Each importer returns ``(module, variables)``: a :mod:`seqjax.nn` module and
its variables, such that ``module.apply(variables, xs)`` on batch-major
``xs [B, T, D]`` gives the source layer's outputs (batch-first view) as
``ys``, to float round-off. torch and keras are imported only when used.

The conversion is layout bookkeeping, since the cells use the PyTorch/Keras
equations:

- torch stores ``weight_ih [G*H, D]``, ``weight_hh [G*H, H]`` and two biases;
  seqjax stores the transposes and one summed bias. For GRU the recurrent
  bias of the candidate (``b_hn``) stays apart, since the reset gate
  multiplies it.
- Keras stores ``kernel [D, G*H]`` and ``recurrent_kernel [H, G*H]`` like
  seqjax, but orders the GRU gates (z, r, h) where seqjax uses (r, z, n).
"""

from __future__ import annotations

import numpy as np

from seqjax import cells
from seqjax import nn


def _to_numpy(tensor) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return tensor.float().numpy().astype(ml_dtypes.bfloat16)
  return tensor.numpy()


def _torch_cell(module):
  mode = module.mode
  if mode == "LSTM":
    if module.proj_size:
      raise ValueError(
          f"from_torch: nn.LSTM with proj_size={module.proj_size} is not supported "
          f"(seqjax.cells.LSTM has no output projection); use proj_size=0")
    return cells.LSTM(module.hidden_size)
  if mode == "GRU":
    return cells.GRU(module.hidden_size, reset_after=True)
  if mode in ("RNN_TANH", "RNN_RELU"):
    return cells.Elman(module.hidden_size,
                       activation="tanh" if mode == "RNN_TANH" else "relu")
  raise ValueError(f"from_torch: unsupported recurrent mode {mode!r}")


def _torch_direction(module, cell, layer: int, suffix: str) -> dict:
  """One direction of one layer, in the cell's layout."""
  get = lambda name: _to_numpy(getattr(module, f"{name}_l{layer}{suffix}"))
  w_ih, w_hh = get("weight_ih"), get("weight_hh")  # [G*H, D], [G*H, H]
  g = w_ih.shape[0]
  if module.bias:
    b_ih, b_hh = get("bias_ih"), get("bias_hh")  # [G*H] each
  else:
    b_ih = b_hh = np.zeros((g,), w_ih.dtype)
  params = {"w_x": w_ih.T, "w_h": w_hh.T}
  if isinstance(cell, cells.GRU):
    h = cell.hidden_size
    # r and z biases only ever appear summed; b_hn sits inside r * (.).
    params["b"] = b_ih + np.concatenate([b_hh[:2 * h], np.zeros_like(b_hh[2 * h:])])
    params["b_hn"] = b_hh[2 * h:]
  else:
    params["b"] = b_ih + b_hh
  return params


def from_torch(module):
  """Converts a ``torch.nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` to seqjax.

  Any ``num_layers``, ``bidirectional``, ``batch_first`` and ``bias``; the
  inter-layer ``dropout`` becomes ``StackedRNN.dropout_rate`` (active only
  with ``deterministic=False``, as torch's only in training mode).

  Args:
    module: the torch module.

  Returns:
    ``(StackedRNN, variables)``. The module always takes batch-major inputs
    [B, T, D], whatever ``batch_first`` was. Its final carries are a tuple
    over layers: ``h`` (and ``c``, via ``LSTMCarry``) of layer l correspond to
    torch's ``h_n[l]`` (``h_n[2l]``, ``h_n[2l+1]`` forward and backward when
    bidirectional, as ``BidirectionalCarry``).

  Raises:
    ValueError: for a module of another type, or an unsupported option
      (``proj_size > 0``).

  Example:
    >>> import torch, numpy as np, jax.numpy as jnp
    >>> from seqjax import interop
    >>> torch_lstm = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)
    >>> module, variables = interop.from_torch(torch_lstm)
    >>> xs = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    >>> carries, ys = module.apply(variables, jnp.asarray(xs))
    >>> expected, _ = torch_lstm(torch.from_numpy(xs))
    >>> bool(np.allclose(ys, expected.detach().numpy(), atol=1e-5))
    True
  """
  import torch  # pylint: disable=g-import-not-at-top

  if not isinstance(module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)):
    raise ValueError(f"from_torch expects torch.nn.RNN, nn.LSTM or nn.GRU, got "
                     f"{type(module).__name__}")
  cell = _torch_cell(module)
  params = {}
  for layer in range(module.num_layers):
    if module.bidirectional:
      params[f"layer_{layer}"] = {
          "forward": _torch_direction(module, cell, layer, ""),
          "backward": _torch_direction(module, cell, layer, "_reverse")}
    else:
      params[f"layer_{layer}"] = _torch_direction(module, cell, layer, "")
  model = nn.StackedRNN(cells=(cell,) * module.num_layers,
                        bidirectional=module.bidirectional,
                        dropout_rate=float(module.dropout),
                        param_dtype=_to_numpy(module.weight_ih_l0).dtype)
  return model, {"params": params}


# --------------------------------------------------------------------------
# Keras 3.


def _keras_name(fn) -> str:
  return getattr(fn, "__name__", repr(fn))


def _keras_layer(layer):
  """(cell, params) for one Keras LSTM, GRU or SimpleRNN layer."""
  kind = type(layer).__name__
  if kind not in ("LSTM", "GRU", "SimpleRNN"):
    raise ValueError(f"from_keras expects a keras LSTM, GRU, SimpleRNN or a "
                     f"Bidirectional of one, got {kind}")
  if getattr(layer, "stateful", False):
    raise ValueError(f"from_keras: stateful {kind} is not supported; pass the "
                     f"carry explicitly instead")
  keras_cell = layer.cell
  activation = _keras_name(keras_cell.activation)
  recurrent = _keras_name(getattr(keras_cell, "recurrent_activation", None))
  units = keras_cell.units
  weights = [np.asarray(w) for w in layer.get_weights()]
  kernel, recurrent_kernel = weights[0], weights[1]
  g = kernel.shape[1]
  bias = weights[2] if keras_cell.use_bias else np.zeros((g,), kernel.dtype)

  if kind == "SimpleRNN":
    if activation not in ("tanh", "relu"):
      raise ValueError(f"from_keras: SimpleRNN activation must be tanh or relu, "
                       f"got {activation}")
    cell = cells.Elman(units, activation=activation)
    return cell, {"w_x": kernel, "w_h": recurrent_kernel, "b": bias}

  if activation != "tanh" or recurrent != "sigmoid":
    raise ValueError(
        f"from_keras: {kind} needs activation='tanh' and recurrent_activation="
        f"'sigmoid', got {activation!r} and {recurrent!r}")
  if kind == "LSTM":
    return cells.LSTM(units), {"w_x": kernel, "w_h": recurrent_kernel, "b": bias}

  # GRU: Keras blocks are (z, r, h); seqjax's are (r, z, n).
  order = lambda w: np.concatenate(
      [w[..., units:2 * units], w[..., :units], w[..., 2 * units:]], axis=-1)
  cell = cells.GRU(units, reset_after=keras_cell.reset_after)
  params = {"w_x": order(kernel), "w_h": order(recurrent_kernel)}
  if keras_cell.reset_after:
    if not keras_cell.use_bias:
      bias = np.zeros((2, g), kernel.dtype)
    b_in, b_rec = order(bias[0]), order(bias[1])  # [3H] each
    params["b"] = b_in + np.concatenate([b_rec[:2 * units], np.zeros_like(b_rec[2 * units:])])
    params["b_hn"] = b_rec[2 * units:]
  else:
    params["b"] = order(bias)
  return cell, params


def from_keras(layer):
  """Converts a Keras 3 ``LSTM``, ``GRU``, ``SimpleRNN`` or ``Bidirectional``.

  The layer must be built (called once, or ``build`` with an input shape).
  Keras' input ``dropout`` and ``recurrent_dropout`` act only in training and
  are not carried over.

  Args:
    layer: the Keras layer.

  Returns:
    ``(RNN, variables)``, or ``(Bidirectional, variables)`` for a Keras
    ``Bidirectional`` wrapper (merge modes ``"concat"`` and ``"sum"``). The
    module's ``ys`` equal the Keras layer's ``return_sequences=True`` output.

  Raises:
    ValueError: for another layer type or an unsupported option:
      ``go_backwards`` (Keras then returns the outputs in reversed time
      order; use ``RNN(reverse=True)``, whose outputs stay aligned with the
      inputs), ``stateful``, other activations, other merge modes.

  Example:
    >>> import os; os.environ.setdefault("KERAS_BACKEND", "jax")
    'jax'
    >>> import keras, numpy as np, jax.numpy as jnp
    >>> from seqjax import interop
    >>> keras_gru = keras.layers.GRU(8, return_sequences=True)
    >>> xs = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    >>> expected = np.asarray(keras_gru(xs))
    >>> module, variables = interop.from_keras(keras_gru)
    >>> _, ys = module.apply(variables, jnp.asarray(xs))
    >>> bool(np.allclose(ys, expected, atol=1e-5))
    True
  """
  kind = type(layer).__name__
  if kind == "Bidirectional":
    if layer.merge_mode not in ("concat", "sum"):
      raise ValueError(f"from_keras: Bidirectional merge_mode must be 'concat' "
                       f"or 'sum', got {layer.merge_mode!r}")
    cell, forward = _keras_layer(layer.forward_layer)
    backward_cell, backward = _keras_layer(layer.backward_layer)
    if backward_cell != cell:
      raise ValueError(f"from_keras: Bidirectional needs the same cell in both "
                       f"directions, got {cell} and {backward_cell}")
    dtype = forward["w_x"].dtype
    module = nn.Bidirectional(cell, merge=layer.merge_mode, param_dtype=dtype)
    return module, {"params": {"forward": forward, "backward": backward}}
  if getattr(layer, "go_backwards", False):
    raise ValueError(
        "from_keras: go_backwards=True is not supported (Keras returns the "
        "outputs in reversed time order); use seqjax.nn.RNN(cell, reverse=True)")
  cell, params = _keras_layer(layer)
  module = nn.RNN(cell, param_dtype=params["w_x"].dtype)
  return module, {"params": {"cell": params}}
