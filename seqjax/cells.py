"""Pure-function recurrent cells.

A cell is a frozen dataclass of static configuration. Its methods are pure
functions of explicit arguments, so a cell can be a ``jax.jit`` static argument
and equal cells share compiled code:

- ``init(key, input_size, dtype)`` -> params, a dict of arrays;
- ``initial_carry(batch_shape, dtype)`` -> the zero carry;
- ``project(params, xs)`` -> the input-to-hidden projection of every step at
  once (one large matmul, hoisted out of the recurrence);
- ``step(params, carry, xp_t)`` -> ``(carry, y_t)``, the recurrent part only;
- ``fused_scan`` (LSTM and reset-after GRU; ``None`` for the others) -> a whole
  sequence in one function with a hand-written backward pass
  (:mod:`seqjax.fused`), which the scan driver prefers: measured faster on CPU.

The drivers in :mod:`seqjax.recurrence` run a cell over a sequence. This module
imports only JAX: no Flax, no optax, no I/O.

Parameter layouts are stable (Orbax checkpoints and :mod:`seqjax.interop` rely
on them) and are listed by each cell's ``param_shapes``. Gate blocks are
concatenated along the last axis in the order each cell documents.

Every cell takes ``matmul_dtype``: ``None`` (default) multiplies in the
parameters' dtype; ``"bfloat16"`` rounds the operands of every matmul (input
projection, recurrent product, and in the fused backward pass the gradient
products) to bfloat16 and accumulates in the parameters' dtype, the mixed
precision of bfloat16 matmul units. ``"int8"`` quantizes each matmul's rows
of activations and columns of weights to int8 and sums the products exactly
(:func:`seqjax.fused.int8_matmul`): for inference, such as sampling a model
trained in float32 (a gradient through it raises). Parameters, carries and
gate arithmetic keep their dtype.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from seqjax import fused

Array = jax.Array
Params = dict[str, Array]
Carry = Any  # an array [*batch, H] or a NamedTuple of them


class LSTMCarry(NamedTuple):
  """The LSTM carry: hidden state ``h`` and cell state ``c``, each [*batch, H]."""

  h: Array
  c: Array


_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def _orthogonal_blocks(key, hidden: int, num_blocks: int) -> Array:
  """[H, num_blocks*H]: one orthogonal [H, H] block per gate (float32)."""
  keys = jax.random.split(key, num_blocks)
  init = jax.nn.initializers.orthogonal()
  return jnp.concatenate([init(k, (hidden, hidden)) for k in keys], axis=1)


_MATMUL_DTYPES = ("bfloat16", "float16", "float32", "float64", "int8")


def _is_positive_int(value) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= 1)


class _Cell:
  """Behaviour shared by the cells; each subclass is a frozen dataclass."""

  hidden_size: int
  matmul_dtype: str | None
  num_gates: ClassVar[int] = 1
  # True for cells whose recurrence is h_t = a_t * h_{t-1} + b_t elementwise;
  # only those can run under the associative (parallel) scan.
  is_linear: ClassVar[bool] = False

  def __post_init__(self):
    if not _is_positive_int(self.hidden_size):
      raise ValueError(
          f"{type(self).__name__}: hidden_size must be a positive int, got "
          f"{self.hidden_size!r}")
    # A NumPy integer becomes a Python int, so equal cells hash equal.
    object.__setattr__(self, "hidden_size", int(self.hidden_size))
    if self.matmul_dtype is not None:  # jnp.bfloat16 and "bfloat16" name one cell
      try:
        name = jnp.dtype(self.matmul_dtype).name
      except TypeError:
        name = None
      if name not in _MATMUL_DTYPES:
        raise ValueError(f"{type(self).__name__}: matmul_dtype must be None or one of "
                         f"{', '.join(_MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
      object.__setattr__(self, "matmul_dtype", name)

  def _matmul(self, a: Array, w: Array) -> Array:
    return fused.matmul(a, w, self.matmul_dtype)

  def param_shapes(self, input_size: int) -> dict[str, tuple[int, ...]]:
    """The parameter layout: name -> shape, for inputs of size ``input_size``."""
    g = self.num_gates * self.hidden_size
    return {"w_x": (input_size, g), "w_h": (self.hidden_size, g), "b": (g,)}

  def _check_input_size(self, input_size) -> int:
    """``input_size`` as a Python int; a clear error if it is not a size."""
    if not _is_positive_int(input_size):
      raise ValueError(
          f"{type(self).__name__}.init: input_size must be a positive int, got "
          f"{input_size!r}")
    return int(input_size)

  def init(self, key: Array, input_size: int, dtype: Any = jnp.float32) -> Params:
    """Glorot-uniform ``w_x``, orthogonal ``w_h`` blocks, zero ``b``.

    Initialisation runs in float32 and is then cast to ``dtype``, so a
    bfloat16 model starts from the rounded float32 draw.
    """
    input_size = self._check_input_size(input_size)
    k_x, k_h = jax.random.split(key)
    shapes = self.param_shapes(input_size)
    params = {
        "w_x": jax.nn.initializers.glorot_uniform()(k_x, shapes["w_x"]),
        "w_h": _orthogonal_blocks(k_h, self.hidden_size, self.num_gates),
        "b": jnp.zeros(shapes["b"]),
    }
    return {k: v.astype(dtype) for k, v in params.items()}

  def initial_carry(self, batch_shape: tuple[int, ...] = (),
                    dtype: Any = jnp.float32) -> Carry:
    """The zero carry, [*batch_shape, H]."""
    return jnp.zeros((*batch_shape, self.hidden_size), dtype)

  def project(self, params: Params, xs: Array) -> Array:
    """Input-to-hidden projection of all steps: [..., D] -> [..., G*H]."""
    return self._matmul(xs, params["w_x"]) + params["b"]

  # A cell may run a whole sequence in one fused function (with its own
  # backward pass); the scan driver then calls it instead of ``step``:
  # ``fused_scan(params, xs [T, B, D], carry, valid, resets, batch_major=False)
  # -> (carry, ys)``, time-major (``batch_major``: xs and ys [B, T, ...]), with
  # the driver's masking and reset semantics.
  fused_scan: ClassVar[Any] = None


@dataclasses.dataclass(frozen=True)
class Elman(_Cell):
  r"""The Elman (vanilla) RNN cell.

  .. math:: h_t = \phi(x_t W_x + h_{t-1} W_h + b), \quad y_t = h_t

  Layout: ``w_x [D, H]``, ``w_h [H, H]``, ``b [H]``; carry ``h [*batch, H]``.

  Args:
    hidden_size: H.
    activation: ``"tanh"`` (default) or ``"relu"``.
    matmul_dtype: see the module docstring.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cell = Elman(hidden_size=3)
    >>> params = cell.init(jax.random.key(0), input_size=2)
    >>> h, y = cell.step(params, cell.initial_carry((4,)),
    ...                  cell.project(params, jnp.ones((4, 2))))
    >>> h.shape
    (4, 3)
  """

  hidden_size: int
  activation: str = "tanh"
  matmul_dtype: str | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
          f"Elman: activation must be one of {sorted(_ACTIVATIONS)}, got "
          f"{self.activation!r}")

  def step(self, params: Params, carry: Array, xp_t: Array) -> tuple[Array, Array]:
    """One step on a projected input ``xp_t [*batch, H]``."""
    h = _ACTIVATIONS[self.activation](xp_t + self._matmul(carry, params["w_h"]))
    return h, h


@dataclasses.dataclass(frozen=True)
class LSTM(_Cell):
  r"""Long short-term memory (Hochreiter & Schmidhuber 1997, with forget gate).

  .. math::
     [i, f, g, o] &= x_t W_x + h_{t-1} W_h + b \\
     c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
     h_t &= \sigma(o) \odot \tanh(c_t), \quad y_t = h_t

  Layout: ``w_x [D, 4H]``, ``w_h [H, 4H]``, ``b [4H]``, gate blocks in the
  order (i, f, g, o) as in PyTorch and Keras. Carry ``LSTMCarry(h, c)``.

  Args:
    hidden_size: H.
    forget_bias: initial value of the forget-gate block of ``b``.
    matmul_dtype: see the module docstring.

  Notes:
    The forget bias is an initial value of ``b``, not a constant added at each
    step (as in Haiku and TF1's ``LSTMCell``): the step is then exactly the
    PyTorch/Keras one, and imported weights need no adjustment. The default
    1.0 follows Jozefowicz et al. (2015) and Keras' ``unit_forget_bias``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cell = LSTM(hidden_size=3)
    >>> params = cell.init(jax.random.key(0), input_size=2)
    >>> {k: v.shape for k, v in params.items()}
    {'w_x': (2, 12), 'w_h': (3, 12), 'b': (12,)}
    >>> carry, y = cell.step(params, cell.initial_carry((4,)),
    ...                      cell.project(params, jnp.ones((4, 2))))
    >>> carry.c.shape, y.shape
    ((4, 3), (4, 3))
  """

  hidden_size: int
  forget_bias: float = 1.0
  matmul_dtype: str | None = None
  num_gates: ClassVar[int] = 4

  def init(self, key, input_size, dtype=jnp.float32):
    params = super().init(key, input_size, jnp.float32)
    h = self.hidden_size
    params["b"] = params["b"].at[h:2 * h].set(self.forget_bias)
    return {k: v.astype(dtype) for k, v in params.items()}

  def initial_carry(self, batch_shape=(), dtype=jnp.float32) -> LSTMCarry:
    zeros = jnp.zeros((*batch_shape, self.hidden_size), dtype)
    return LSTMCarry(h=zeros, c=zeros)

  def step(self, params: Params, carry: LSTMCarry,
           xp_t: Array) -> tuple[LSTMCarry, Array]:
    """One step on a projected input ``xp_t [*batch, 4H]``."""
    z = xp_t + self._matmul(carry.h, params["w_h"])  # [*batch, 4H]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return LSTMCarry(h=h, c=c), h

  def fused_scan(self, params: Params, xs: Array, carry: LSTMCarry, valid, resets,
                 batch_major: bool = False):
    """The whole sequence with a hand-written backward pass (:mod:`seqjax.fused`)."""
    h, c, ys = fused.lstm_scan(params, xs, carry.h, carry.c, valid, resets,
                               self.matmul_dtype, batch_major)
    return LSTMCarry(h=h, c=c), ys


@dataclasses.dataclass(frozen=True)
class GRU(_Cell):
  r"""Gated recurrent unit (Cho et al. 2014), in both published forms.

  ``reset_after=True`` (default; PyTorch, cuDNN, Keras' default):

  .. math::
     r &= \sigma(x W_{xr} + h W_{hr} + b_r), \quad
     z = \sigma(x W_{xz} + h W_{hz} + b_z) \\
     n &= \tanh(x W_{xn} + b_n + r \odot (h W_{hn} + b_{hn})) \\
     h_t &= (1 - z) \odot n + z \odot h_{t-1}

  ``reset_after=False`` (the original Cho et al. 2014 form) applies the reset
  gate before the matmul: :math:`n = \tanh(x W_{xn} + b_n + (r \odot h) W_{hn})`.

  Layout: ``w_x [D, 3H]``, ``w_h [H, 3H]``, ``b [3H]``, gate blocks in the
  order (r, z, n); with ``reset_after=True`` also ``b_hn [H]``, the recurrent
  bias of the candidate, which sits inside the reset gate. (The recurrent
  biases of r and z are folded into ``b``: they only ever appear summed.)
  Carry ``h [*batch, H]``.

  Example:
    >>> import jax
    >>> params = GRU(hidden_size=3).init(jax.random.key(0), input_size=2)
    >>> sorted((k, v.shape) for k, v in params.items())
    [('b', (9,)), ('b_hn', (3,)), ('w_h', (3, 9)), ('w_x', (2, 9))]
    >>> sorted(GRU(3, reset_after=False).init(jax.random.key(0), 2))
    ['b', 'w_h', 'w_x']
  """

  hidden_size: int
  reset_after: bool = True
  matmul_dtype: str | None = None
  num_gates: ClassVar[int] = 3

  def param_shapes(self, input_size):
    shapes = super().param_shapes(input_size)
    if self.reset_after:
      shapes["b_hn"] = (self.hidden_size,)
    return shapes

  def init(self, key, input_size, dtype=jnp.float32):
    params = super().init(key, input_size, dtype)
    if self.reset_after:
      params["b_hn"] = jnp.zeros((self.hidden_size,), dtype)
    return params

  def step(self, params: Params, carry: Array, xp_t: Array) -> tuple[Array, Array]:
    """One step on a projected input ``xp_t [*batch, 3H]``."""
    hsz = self.hidden_size
    x_r, x_z, x_n = jnp.split(xp_t, 3, axis=-1)
    w_h = params["w_h"]
    if self.reset_after:
      h_r, h_z, h_n = jnp.split(self._matmul(carry, w_h), 3, axis=-1)
      r = jax.nn.sigmoid(x_r + h_r)
      z = jax.nn.sigmoid(x_z + h_z)
      n = jnp.tanh(x_n + r * (h_n + params["b_hn"]))
    else:
      h_r, h_z = jnp.split(self._matmul(carry, w_h[:, :2 * hsz]), 2, axis=-1)
      r = jax.nn.sigmoid(x_r + h_r)
      z = jax.nn.sigmoid(x_z + h_z)
      n = jnp.tanh(x_n + self._matmul(r * carry, w_h[:, 2 * hsz:]))
    h = (1.0 - z) * n + z * carry
    return h, h

  @property
  def fused_scan(self):
    """The reset-after GRU's whole-sequence function (:mod:`seqjax.fused`)."""
    if not self.reset_after:
      return None
    def scan(params, xs, carry, valid, resets, batch_major=False):
      return fused.gru_scan(params, xs, carry, valid, resets, self.matmul_dtype, batch_major)
    return scan


@dataclasses.dataclass(frozen=True)
class MinGRU(_Cell):
  r"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): a linear recurrence.

  .. math::
     z_t = \sigma(x_t W_{xz} + b_z), \quad \tilde h_t = x_t W_{xh} + b_h, \quad
     h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t

  The gates depend on the input only, so the recurrence is
  :math:`h_t = a_t h_{t-1} + b_t` and can run under the associative scan
  (``method="associative"``) in O(log T) depth.

  Layout: ``w_x [D, 2H]``, ``b [2H]``, blocks in the order (z, h~); no
  recurrent matrix. Carry ``h [*batch, H]``.

  Example:
    >>> import jax
    >>> params = MinGRU(hidden_size=3).init(jax.random.key(0), input_size=2)
    >>> {k: v.shape for k, v in params.items()}
    {'w_x': (2, 6), 'b': (6,)}
  """

  hidden_size: int
  matmul_dtype: str | None = None
  num_gates: ClassVar[int] = 2
  is_linear: ClassVar[bool] = True

  def param_shapes(self, input_size):
    g = self.num_gates * self.hidden_size
    return {"w_x": (input_size, g), "b": (g,)}

  def init(self, key, input_size, dtype=jnp.float32):
    input_size = self._check_input_size(input_size)
    w_x = jax.nn.initializers.glorot_uniform()(key, (input_size, 2 * self.hidden_size))
    return {"w_x": w_x.astype(dtype), "b": jnp.zeros((2 * self.hidden_size,), dtype)}

  def coefficients(self, params: Params, xp: Array) -> tuple[Array, Array]:
    """``(a, b)`` of h_t = a * h_{t-1} + b for projected inputs [..., 2H]."""
    del params  # the gates are all in the projection
    x_z, x_h = jnp.split(xp, 2, axis=-1)
    z = jax.nn.sigmoid(x_z)
    return 1.0 - z, z * x_h

  def step(self, params: Params, carry: Array, xp_t: Array) -> tuple[Array, Array]:
    """One step on a projected input ``xp_t [*batch, 2H]``."""
    a, b = self.coefficients(params, xp_t)
    h = a * carry + b
    return h, h


Cell = Elman | LSTM | GRU | MinGRU
