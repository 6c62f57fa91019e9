"""Whole-sequence LSTM and GRU with hand-written backward passes (the fast path).

``jax.grad`` of a ``lax.scan`` LSTM accumulates the weight gradients inside the
reverse loop: every step adds an [H, 4H] outer product into an accumulator
that streams through memory, and every step keeps a per-step matmul of its
own. Here the reverse loop computes only what must be sequential, the carry
gradients and the gate gradients dz_t; the weight and input gradients then
come from single large matmuls over all T*B rows at once, as cuDNN and oneDNN
do:

    dW_h = sum_t h_{t-1}^T dz_t,   dW_x = sum_t x_t^T dz_t,
    db = sum_t dz_t,               dx_t = dz_t W_x^T.

The forward pass multiplies x_t W_x inside the loop rather than projecting
all steps first: measured on CPU, hoisting the projection out of the loop
made the LSTM about 2x slower in inference (benchmarks/README.md).

Semantics are those of :func:`seqjax.recurrence.scan` on
:class:`seqjax.cells.LSTM` and the reset-after :class:`seqjax.cells.GRU`,
including ``valid`` (hold the carry, emit zeros) and ``resets`` (the carry
returns to zeros before the step). Everything here is time-major: [T, B, ...],
except that ``lstm_scan`` and ``gru_scan`` also take batch-major ``xs`` (and
return ``ys`` so), which the native kernels read and write in place: on
them, what a batch-major call's gradient passes between the kernels and XLA
(the saved h, the GRU's gate factors, the gate gradients, the input
gradients) is batch-major too, since the weight gradients' sums over all
rows take the rows in any order, so neither inference nor a gradient
transposes a sequence. The XLA loops are time-major. The scan driver uses these functions by
default (``unroll=1``); other ``unroll`` values and the other drivers run the
cells' ``step``.

In float32 on CPU the loops run :mod:`seqjax.native`'s kernels where they are
available, which split each step across the CPU's cores: each cell's forward
loop (saving the same residuals as ``_forward``/``_gru_forward`` when a
gradient is taken) and its backward pass's reverse loop
(``_lstm_reverse``/``_gru_reverse``), also with ``matmul_dtype="bfloat16"``
on CPUs with AVX512_BF16, and at any hidden size: one that is not a whole
number of the kernels' registers runs with zero units added (``_padded``).
So do the weight and bias gradients after the loops (``_outer_sum``). The
input gradients and every other case (other dtypes, other ``matmul_dtype``,
other backends) run the XLA code here; on a GPU those loops run 16 steps an
iteration (``_UNROLL``).

``matmul_dtype`` (a cell option) rounds the operands of every matmul, forward
and backward, to that dtype (``"bfloat16"``), accumulating in the parameters'
dtype; the gate arithmetic and the carry stay in the parameters' dtype.
``"int8"`` quantizes them instead (:func:`int8_matmul`), for inference only:
a gradient through it raises.

Notes:
  Being ``jax.custom_vjp`` functions, they support reverse mode (``grad``,
  ``vjp``, ``jacrev``, and reverse over reverse) but not forward mode:
  ``jax.jvp`` and ``jax.jacfwd`` raise JAX's "can't apply forward-mode
  autodiff" error. For forward mode, run the scan with ``unroll=2`` or
  ``method="unroll"``. A second derivative differentiates the XLA loops, also
  where the first runs on the native kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from seqjax import native


def matmul(a, w, dtype=None, out_dtype=None):
  """``a @ w``; with ``dtype`` the operands are rounded to it first.

  The products accumulate in ``out_dtype`` (default: the dtype ``a @ w``
  would have), as bfloat16 matmul units do with float32 accumulators;
  ``dtype`` int8: :func:`int8_matmul`.
  """
  if dtype is None:
    return a @ w
  out_dtype = out_dtype or jnp.result_type(a, w)
  if jnp.dtype(dtype) == jnp.int8:
    return int8_matmul(a, w).astype(out_dtype)
  return jnp.matmul(a.astype(dtype), w.astype(dtype), preferred_element_type=out_dtype)


INT8_NO_GRADIENT = ("matmul_dtype='int8' is for inference: its rounding has no gradient; "
                    "train with float32 or bfloat16 matmuls and sample with int8")


def _int8_scales(x, axis):
  """Scales putting ``x``'s largest magnitude along ``axis`` at 127 (1 where it
  is 0; NaN where ``x`` holds a NaN, so the product is NaN, not a NaN rounded
  to an integer)."""
  top = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  return jnp.where(top == 0, jnp.ones_like(top), top / 127)


@jax.custom_vjp
def int8_matmul(a, w):
  """``a [..., K] @ w [K, N]`` in int8: each row of ``a`` and each column of
  ``w`` scaled so its largest magnitude is 127 and rounded (half to even) to
  integers, the integer products summed exactly (int32), then scaled back:

      s_a = max_k |a_k| / 127,  s_w = max_k |w_kn| / 127   (1 for all-zero)
      a @ w ~ (round(a / s_a) @ round(w / s_w)) * (s_a * s_w)

  :func:`seqjax.native.lstm_sample` and :func:`seqjax.native.gru_sample` compute
  exactly this on AVX512_VNNI.
  Inference only: a gradient through it raises ``ValueError``.
  """
  s_a, s_w = _int8_scales(a, -1), _int8_scales(w, 0)
  a_q = jnp.round(a / s_a).astype(jnp.int8)
  w_q = jnp.round(w / s_w).astype(jnp.int8)
  sums = jnp.matmul(a_q, w_q, preferred_element_type=jnp.int32)
  return sums.astype(jnp.result_type(a, w)) * (s_a * s_w)


def _int8_fwd(a, w):
  return int8_matmul(a, w), None


def _int8_bwd(_, g):
  raise ValueError(INT8_NO_GRADIENT)


int8_matmul.defvjp(_int8_fwd, _int8_bwd)


def _outer_sum(a, b, dtype, out_dtype, use_kernel=False, tiled=None):
  """``(products, sums)``: ``sum_t a_t^T b_t`` over every leading index,
  ``[..., m] x [..., n] -> [m, n]`` (for a tuple ``a``, the tuple of each
  one's product with ``b``), and ``b`` summed over every leading index
  ``[n]`` (the bias gradient); with ``tiled [..., h]``, of
  ``b * tile(tiled, n // h)``.

  One 2-D matmul over the flattened rows. (The same product written as the
  einsum ``tbm,tbn->mn``, two contracting dimensions, ran 1.1-2x slower on
  XLA:CPU: 50 against 98 GFLOP/s at T=1024, B=16, 128 x 512.) With
  ``use_kernel``, it runs on :func:`seqjax.native.outer_sum`, all of ``a`` and
  the sums in one call: one pass over ``b`` (an LSTM's xs and hs share
  dz), and a GRU's ``b * tile(tiled)`` (its gate gradients) formed as
  the kernel reads it, never written out. Against XLA's products and sum,
  training steps ran 1.05x (LSTM) and 1.15x (GRU) at peers.py's (a) (B=32,
  T=128, H=256), 1.00x and 1.02x at (b), 1.04x and 1.10x at (c); the GRU's
  took a third less temporary memory (384 against 576 MiB at (b)). (XLA
  ran its bias sum beside a kernel computing only the products, and the
  two thread pools shared the two cores: the GRU's step then gained
  nothing.) XLA:CPU's bfloat16 product of this shape ran no faster than its
  float32 one.
  """
  many = isinstance(a, tuple)
  a = tuple(x.reshape(-1, x.shape[-1]) for x in (a if many else (a,)))
  b = b.reshape(-1, b.shape[-1])
  if tiled is not None:
    tiled = tiled.reshape(-1, tiled.shape[-1])

  def product(a, b):
    out = out_dtype
    if dtype is not None:
      a, b = a.astype(dtype), b.astype(dtype)
    else:
      out = None  # the operands' own promotion, as for ``a.T @ b``
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=out)

  def xla(b, tiled, *a):
    if tiled is not None:
      b = b * jnp.tile(tiled, (1, b.shape[-1] // tiled.shape[-1]))
    return tuple(product(x, b) for x in a), jnp.sum(b, axis=0)
  z, sums = _kernel_or_xla(use_kernel and b.shape[-1] % 16 == 0,
                           lambda b, tiled, *a: native.outer_sum(a, b, dtype, tiled, True),
                           xla, b, tiled, *a)
  return (z if many else z[0]), sums


def _kernel_or_xla(use_kernel: bool, kernel, xla, *args):
  """``kernel(*args)`` where lowered for CPU if ``use_kernel`` (float32 on CPU,
  :func:`seqjax.native.usable`), else ``xla(*args)``: the same loop in XLA.

  A kernel call has no derivative of its own. It is differentiated only when a
  gradient is itself differentiated (the kernels run inside ``_lstm_fwd`` and
  ``_lstm_bwd``), and then it takes the derivative of ``xla``, the same
  function, so second derivatives work on either path.
  """
  if not use_kernel:
    return xla(*args)

  @jax.custom_vjp
  def run(*args):
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)

  run.defvjp(lambda *args: jax.vjp(xla, *args), lambda vjp, cotangents: vjp(cotangents))
  return run(*args)


# The XLA loops' unroll factor, by JAX backend (1 where not named). On a GPU
# each loop iteration launches its kernels and waits on the previous ones, so
# at the benchmark sizes the loop itself was the cost: on an H100, 16 steps an
# iteration ran these loops 1.7-3.9x faster than 1 (geometric mean 2.4x over
# LSTM/GRU training and inference at two sizes; 8 steps: 2.3x), measured by
# benchmarks/loop_unroll.py ("On a GPU" in benchmarks/README.md). One group
# gains from 8: LSTM inference at B = 64, T = 256, D = H = 512 ran 1.26-1.31x
# faster at 8 than at 16, but GRU inference there and LSTM inference at the
# other two sizes ran up to 15 % slower, so 16 stays until more shapes are
# measured. On CPU the loop costs little beside a step, and the native
# kernels run most calls.
_UNROLL = {"gpu": 16}


def _unroll() -> int:
  """How many steps each XLA loop's iteration runs on the current default backend."""
  return _UNROLL.get(jax.default_backend(), 1)


def _like(grads, params):
  """Gradients in their parameters' dtypes (float32 weights, float64 inputs)."""
  return {k: g.astype(params[k].dtype) for k, g in grads.items()}


def _gates(z, hidden):
  i = jax.nn.sigmoid(z[..., :hidden])
  f = jax.nn.sigmoid(z[..., hidden:2 * hidden])
  g = jnp.tanh(z[..., 2 * hidden:3 * hidden])
  o = jax.nn.sigmoid(z[..., 3 * hidden:])
  return i, f, g, o


def _forward(params, xs, h0, c0, valid, resets, save: bool, matmul_dtype):
  w_x, w_h, b = params["w_x"], params["w_h"], params["b"]
  hidden = w_h.shape[0]
  out = jnp.result_type(xs, w_x, w_h, b, h0)
  if matmul_dtype not in (None, "int8"):  # rounded once, outside the loop
    w_x, w_h = w_x.astype(matmul_dtype), w_h.astype(matmul_dtype)
  mm = lambda a, w: matmul(a, w, matmul_dtype, out)

  def step(carry, inputs):
    h, c = carry
    x_t, v_t, r_t = inputs
    if r_t is not None:
      r = r_t[:, None]
      h, c = jnp.where(r, jnp.zeros_like(h), h), jnp.where(r, jnp.zeros_like(c), c)
    z = mm(x_t, w_x) + b + mm(h, w_h)  # [B, 4H]
    i, f, g, o = _gates(z, hidden)
    c_new = f * c + i * g
    tc = jnp.tanh(c_new)
    h_new = o * tc
    y = h_new
    if v_t is not None:
      v = v_t[:, None]
      y = jnp.where(v, h_new, jnp.zeros_like(h_new))
      h_new, c_new = jnp.where(v, h_new, h), jnp.where(v, c_new, c)
    saved = None
    if save:
      # What the backward step needs, pre-multiplied so that it is one
      # elementwise pass: dz = p * [dct, dct, dct, dh] and dct = dc + dh * k.
      p = jnp.concatenate([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g),
                           tc * o * (1 - o)], axis=-1)  # [B, 4H]
      saved = (h, p, o * (1 - tc * tc), f)
    return (h_new, c_new), (y, saved)

  (h, c), (ys, saved) = jax.lax.scan(step, (h0, c0), (xs, valid, resets), unroll=_unroll())
  return (h, c, ys), saved


def pad_units(a, gates: int, pad: int):
  """``a [..., gates H]`` with ``pad`` zero columns after each gate block's H."""
  *lead, n = a.shape
  blocks = a.reshape(*lead, gates, n // gates)
  blocks = jnp.pad(blocks, [(0, 0)] * (len(lead) + 1) + [(0, pad)])
  return blocks.reshape(*lead, gates * (n // gates + pad))


def widen(params, gates: int, pad: int, input_pad: int = 0):
  """An LSTM's or reset-after GRU's ``params`` with ``pad`` more hidden units,
  all zero: zero columns after each of the ``gates`` blocks of w_x, w_h and
  b, zero rows of w_h (and ``input_pad`` of w_x, for inputs widened so too:
  a stacked layer's), and b_hn's. Units added so, from a zero carry, stay
  zero: their pre-activations are 0, so an LSTM's c and h stay 0 (c = 0.5 c
  + 0.5 tanh(0), h = 0.5 tanh(c)) and a GRU's h (n = tanh(0), h = 0.5 n +
  0.5 h); and they add nothing to the others' (zero rows of w_h)."""
  wide = {name: pad_units(params[name], gates, pad) for name in ("w_x", "w_h", "b")}
  wide["w_x"] = jnp.pad(wide["w_x"], ((0, input_pad), (0, 0)))
  wide["w_h"] = jnp.pad(wide["w_h"], ((0, pad), (0, 0)))
  if "b_hn" in params:
    wide["b_hn"] = jnp.pad(params["b_hn"], (0, pad))
  return wide


def pad_carry(carry, pad: int):
  """Each [B, H] array of ``carry`` (a pytree) with ``pad`` zero units after its H."""
  return jax.tree.map(lambda c: jnp.pad(c, ((0, 0), (0, pad))), carry)


def _padded(params, xs, carry, gates: int, matmul_dtype, batch_major: bool):
  """``(params, carry, H)`` widened (:func:`widen`) to
  :func:`seqjax.native.padded_units`, where the native kernels run the wider
  call and not this one (H not a whole number of registers), else ``None``.
  The caller slices H units off the results; their gradients, the transposes
  of the pad and the slice, reach only the parameters' own entries.
  (1.4-2.2x the XLA path at H = 20-300: benchmarks/README.md.)"""
  hidden = params["w_h"].shape[0]
  pad = native.padded_units(hidden) - hidden
  if not pad or xs.ndim != 3 or any(c.ndim != 2 for c in carry):
    return None
  wide, carry = widen(params, gates, pad), pad_carry(carry, pad)
  if not native.usable(wide, xs, carry, matmul_dtype, batch_major):
    return None
  return wide, carry, hidden


def _time_major(a, batch_major: bool):
  """``a [B, T, ...]`` as ``[T, B, ...]`` if ``batch_major`` (and back again)."""
  return jnp.swapaxes(a, 0, 1) if batch_major else a


def _each_time_major(arrays, batch_major: bool) -> tuple:
  """:func:`_time_major` of each of ``arrays``."""
  return tuple(_time_major(a, batch_major) for a in arrays)


@dataclasses.dataclass(frozen=True)
class _Saved:
  """A forward pass's residuals for its backward pass: ``xs`` and what the
  forward saved, ``[B, T, ...]`` if ``batch_major`` (a batch-major call on
  the kernels: ``xs`` and what XLA reads after the reverse loop, as
  :func:`seqjax.native.lstm_forward` saves them), else ``[T, B, ...]``. The
  layout is static (pytree metadata), so the backward pass reads the
  forward's choice instead of deciding again (inside
  :func:`seqjax.native.disabled`, say, where it would decide otherwise)."""
  xs: jax.Array
  saved: tuple
  batch_major: bool


jax.tree_util.register_dataclass(_Saved, data_fields=["xs", "saved"], meta_fields=["batch_major"])


def _keeps_batch_major(use_kernel: bool, batch_major: bool) -> bool:
  """Whether a gradient's loops run on a batch-major call's own layout: on the
  kernels, which read and write it in place; the XLA loops are time-major."""
  return use_kernel and batch_major


def lstm_scan(params, xs, h0, c0, valid, resets, matmul_dtype, batch_major=False):
  """``(h_T, c_T, ys)`` of an LSTM over time-major ``xs [T, B, D]``.

  Args:
    params: ``{"w_x": [D, 4H], "w_h": [H, 4H], "b": [4H]}`` (gates i, f, g, o).
    xs: [T, B, D] inputs.
    h0, c0: [B, H] initial carry.
    valid: [T, B] bool or ``None``: where False the carry holds and y is 0.
    resets: [T, B] bool or ``None``: the carry returns to zeros before the step.
    matmul_dtype: ``None``, or the dtype matmul operands are rounded to.
    batch_major: ``xs`` is ``[B, T, D]`` and ``ys`` ``[B, T, H]`` (``valid``
      and ``resets`` stay ``[T, B]``). The native kernels read and write them
      so, sparing two transposes in inference (1.05-1.17x at B <= 32) and
      four in a gradient; the XLA loops transpose them around time-major
      loops.
  """
  padded = _padded(params, xs, (h0, c0), 4, matmul_dtype, batch_major)
  if padded is None:
    return _lstm_scan(params, xs, h0, c0, valid, resets, matmul_dtype, batch_major)
  wide, (h0, c0), hidden = padded
  h, c, ys = _lstm_scan(wide, xs, h0, c0, valid, resets, matmul_dtype, batch_major)
  return h[:, :hidden], c[:, :hidden], ys[..., :hidden]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _lstm_scan(params, xs, h0, c0, valid, resets, matmul_dtype, batch_major=False):
  """:func:`lstm_scan` at the parameters' own hidden size."""
  def xla(params, xs, *rest):
    h, c, ys = _forward(params, _time_major(xs, batch_major), *rest, False, matmul_dtype)[0]
    return h, c, _time_major(ys, batch_major)
  return _kernel_or_xla(native.usable(params, xs, (h0, c0), matmul_dtype, batch_major),
                        functools.partial(native.lstm_forward, matmul_dtype=matmul_dtype,
                                          batch_major=batch_major),
                        xla, params, xs, h0, c0, valid, resets)


def _lstm_fwd(params, xs, h0, c0, valid, resets, matmul_dtype, batch_major):
  use_kernel = native.usable(params, xs, (h0, c0), matmul_dtype, batch_major)
  keep = _keeps_batch_major(use_kernel, batch_major)
  if not keep:
    xs = _time_major(xs, batch_major)

  def xla(params, xs, *rest):
    (h, c, ys), (hs, *factors) = _forward(params, _time_major(xs, keep), *rest, True,
                                          matmul_dtype)
    return (h, c, _time_major(ys, keep)), (_time_major(hs, keep), *factors)
  (h, c, ys), saved = _kernel_or_xla(use_kernel,
                                     functools.partial(native.lstm_forward, save=True,
                                                       matmul_dtype=matmul_dtype,
                                                       batch_major=keep),
                                     xla, params, xs, h0, c0, valid, resets)
  ys = ys if keep else _time_major(ys, batch_major)
  return (h, c, ys), (params, valid, resets, _Saved(xs, saved, keep))


def _lstm_reverse(w_h, dh_t, dc_t, dys, ps, ks, fs, valid, resets, matmul_dtype,
                  batch_major=False):
  """The backward pass's sequential part: ``((dh_0, dc_0), dz [T, B, 4H])``
  (``dys`` and ``dz`` ``[B, T, ...]`` if ``batch_major``)."""
  dys = _time_major(dys, batch_major)
  out = ps.dtype
  hidden = w_h.shape[0]
  w_h_t = w_h.T if matmul_dtype is None else w_h.T.astype(matmul_dtype)
  # Gate blocks i, f, g take dct as their multiplier, block o takes dh.
  o_block = (jnp.arange(4 * hidden) >= 3 * hidden)[None, :]  # [1, 4H]

  def step(carry, inputs):
    dh, dc = carry
    dy, p, k, f, v_t, r_t = inputs
    dh_step, dc_step = dh + dy, dc
    if v_t is not None:  # held steps pass the carry gradient straight through
      v = v_t[:, None]
      dh_step = jnp.where(v, dh_step, jnp.zeros_like(dh))
      dc_step = jnp.where(v, dc, jnp.zeros_like(dc))
    dct = dc_step + dh_step * k
    dz = p * jnp.where(o_block, jnp.tile(dh_step, 4), jnp.tile(dct, 4))  # [B, 4H]
    dh_in = matmul(dz, w_h_t, matmul_dtype, out)
    dc_in = dct * f
    if v_t is not None:
      dh_in = jnp.where(v, dh_in, dh)
      dc_in = jnp.where(v, dc_in, dc)
    if r_t is not None:  # a reset cuts the carry's gradient
      r = r_t[:, None]
      dh_in = jnp.where(r, jnp.zeros_like(dh_in), dh_in)
      dc_in = jnp.where(r, jnp.zeros_like(dc_in), dc_in)
    return (dh_in, dc_in), dz

  carry, dz = jax.lax.scan(step, (dh_t, dc_t), (dys, ps, ks, fs, valid, resets), reverse=True,
                           unroll=_unroll())
  return carry, _time_major(dz, batch_major)


def _lstm_bwd(matmul_dtype, batch_major, residuals, cotangents):
  if matmul_dtype == "int8":
    raise ValueError(INT8_NO_GRADIENT)
  params, valid, resets, residual = residuals
  xs, (hs, ps, ks, fs), keep = residual.xs, residual.saved, residual.batch_major
  dh_t, dc_t, dys = cotangents
  if not keep:
    dys = _time_major(dys, batch_major)
  w_x, w_h = params["w_x"], params["w_h"]
  use_kernel = native.usable(params, xs, (dh_t, dc_t, dys), matmul_dtype, keep)
  (dh0, dc0), dz = _kernel_or_xla(use_kernel,
                                  functools.partial(native.lstm_reverse,
                                                    matmul_dtype=matmul_dtype, batch_major=keep),
                                  lambda *args: _lstm_reverse(*args, matmul_dtype, keep),
                                  w_h, dh_t, dc_t, dys, ps, ks, fs, valid, resets)
  # The weight and input gradients: one large matmul each, over every step.
  (w_x_grad, w_h_grad), b_grad = _outer_sum((xs, hs), dz, matmul_dtype, w_x.dtype, use_kernel)
  grads = {"w_x": w_x_grad, "w_h": w_h_grad, "b": b_grad}
  dxs = matmul(dz, w_x.T, matmul_dtype, xs.dtype)
  dxs = dxs if keep else _time_major(dxs, batch_major)
  return _like(grads, params), dxs, dh0, dc0, None, None


_lstm_scan.defvjp(_lstm_fwd, _lstm_bwd)


# ---------------------------------------------------------------------------
# GRU, reset_after=True (gates r, z, n):
#   r = s(x_r + h W_hr), z = s(x_z + h W_hz), n = tanh(x_n + r (h W_hn + b_hn)),
#   h' = (1 - z) n + z h.
# The reverse loop emits only dh_t; the gate gradients are rebuilt after the
# loop from multipliers saved by the forward pass, all steps at once.


def _gru_forward(params, xs, h0, valid, resets, save: bool, matmul_dtype):
  w_x, w_h, b, b_hn = params["w_x"], params["w_h"], params["b"], params["b_hn"]
  hidden = w_h.shape[0]
  out = jnp.result_type(xs, w_x, w_h, b, h0)
  if matmul_dtype not in (None, "int8"):  # rounded once, outside the loop
    w_x, w_h = w_x.astype(matmul_dtype), w_h.astype(matmul_dtype)
  mm = lambda a, w: matmul(a, w, matmul_dtype, out)

  def step(h, inputs):
    x_t, v_t, r_t = inputs
    if r_t is not None:
      h = jnp.where(r_t[:, None], jnp.zeros_like(h), h)
    xp = mm(x_t, w_x) + b  # [B, 3H]
    hw = mm(h, w_h)  # [B, 3H]
    r = jax.nn.sigmoid(xp[:, :hidden] + hw[:, :hidden])
    z = jax.nn.sigmoid(xp[:, hidden:2 * hidden] + hw[:, hidden:2 * hidden])
    hn = hw[:, 2 * hidden:] + b_hn
    n = jnp.tanh(xp[:, 2 * hidden:] + r * hn)
    h_new = (1 - z) * n + z * h
    y = h_new
    if v_t is not None:
      v = v_t[:, None]
      y = jnp.where(v, h_new, jnp.zeros_like(h_new))
      h_new = jnp.where(v, h_new, h)
    saved = None
    if save:
      a = (1 - z) * (1 - n * n)  # dn_pre = dh * a
      dr = a * hn * r * (1 - r)  # dr_pre = dh * dr
      dz = (h - n) * z * (1 - z)  # dz_pre = dh * dz
      saved = (h, jnp.concatenate([dr, dz, a], axis=-1),   # d xp  = dh * this
               jnp.concatenate([dr, dz, a * r], axis=-1),  # d (h W_h) = dh * this
               z)
    return h_new, (y, saved)

  h, (ys, saved) = jax.lax.scan(step, h0, (xs, valid, resets), unroll=_unroll())
  return (h, ys), saved


def gru_scan(params, xs, h0, valid, resets, matmul_dtype, batch_major=False):
  """``(h_T, ys)`` of a reset-after GRU over time-major ``xs [T, B, D]``.

  Args:
    params: ``{"w_x": [D, 3H], "w_h": [H, 3H], "b": [3H], "b_hn": [H]}``.
    xs, h0, valid, resets, matmul_dtype, batch_major: as for :func:`lstm_scan`
      (``h0`` is the carry).
  """
  padded = _padded(params, xs, (h0,), 3, matmul_dtype, batch_major)
  if padded is None:
    return _gru_scan(params, xs, h0, valid, resets, matmul_dtype, batch_major)
  wide, (h0,), hidden = padded
  h, ys = _gru_scan(wide, xs, h0, valid, resets, matmul_dtype, batch_major)
  return h[:, :hidden], ys[..., :hidden]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gru_scan(params, xs, h0, valid, resets, matmul_dtype, batch_major=False):
  """:func:`gru_scan` at the parameters' own hidden size."""
  def xla(params, xs, *rest):
    h, ys = _gru_forward(params, _time_major(xs, batch_major), *rest, False, matmul_dtype)[0]
    return h, _time_major(ys, batch_major)
  return _kernel_or_xla(native.usable(params, xs, (h0,), matmul_dtype, batch_major),
                        functools.partial(native.gru_forward, matmul_dtype=matmul_dtype,
                                          batch_major=batch_major),
                        xla, params, xs, h0, valid, resets)


def _gru_fwd(params, xs, h0, valid, resets, matmul_dtype, batch_major):
  use_kernel = native.usable(params, xs, (h0,), matmul_dtype, batch_major)
  keep = _keeps_batch_major(use_kernel, batch_major)
  if not keep:
    xs = _time_major(xs, batch_major)

  def xla(params, xs, *rest):
    (h, ys), (*read_by_xla, zs) = _gru_forward(params, _time_major(xs, keep), *rest, True,
                                               matmul_dtype)
    return (h, _time_major(ys, keep)), (*_each_time_major(read_by_xla, keep), zs)
  (h, ys), saved = _kernel_or_xla(use_kernel,
                                  functools.partial(native.gru_forward, save=True,
                                                    matmul_dtype=matmul_dtype, batch_major=keep),
                                  xla, params, xs, h0, valid, resets)
  ys = ys if keep else _time_major(ys, batch_major)
  return (h, ys), (params, valid, resets, _Saved(xs, saved, keep))


def _gru_reverse(w_h, dh_t, dys, ph, zs, valid, resets, matmul_dtype, batch_major=False):
  """The backward pass's sequential part: ``(dh_0, dh_steps [T, B, H])``
  (``dys``, ``ph`` and ``dh_steps`` ``[B, T, ...]`` if ``batch_major``)."""
  dys, ph = _each_time_major((dys, ph), batch_major)
  out = ph.dtype
  w_h_t = w_h.T if matmul_dtype is None else w_h.T.astype(matmul_dtype)

  def step(dh, inputs):
    dy, p_h, z, v_t, r_t = inputs
    dh_step = dh + dy
    if v_t is not None:
      dh_step = jnp.where(v_t[:, None], dh_step, jnp.zeros_like(dh))
    dh_in = matmul(jnp.tile(dh_step, 3) * p_h, w_h_t, matmul_dtype, out) + dh_step * z
    if v_t is not None:
      dh_in = jnp.where(v_t[:, None], dh_in, dh)
    if r_t is not None:
      dh_in = jnp.where(r_t[:, None], jnp.zeros_like(dh_in), dh_in)
    return dh_in, dh_step

  dh, steps = jax.lax.scan(step, dh_t, (dys, ph, zs, valid, resets), reverse=True,
                           unroll=_unroll())
  return dh, _time_major(steps, batch_major)


def _gru_bwd(matmul_dtype, batch_major, residuals, cotangents):
  if matmul_dtype == "int8":
    raise ValueError(INT8_NO_GRADIENT)
  params, valid, resets, residual = residuals
  xs, (hs, px, ph, zs), keep = residual.xs, residual.saved, residual.batch_major
  dh_t, dys = cotangents
  if not keep:
    dys = _time_major(dys, batch_major)
  w_x, w_h = params["w_x"], params["w_h"]
  use_kernel = native.usable(params, xs, (dh_t, dys), matmul_dtype, keep)
  dh0, dh_steps = _kernel_or_xla(use_kernel,
                                 functools.partial(native.gru_reverse,
                                                   matmul_dtype=matmul_dtype, batch_major=keep),
                                 lambda *args: _gru_reverse(*args, matmul_dtype, keep),
                                 w_h, dh_t, dys, ph, zs, valid, resets)
  # The gate gradients dxp = tile(dh_steps) * px and dhw = tile(dh_steps) *
  # ph, formed where they are read (on the kernel: as it packs them, never
  # written out), with their column sums, the bias gradients.
  hidden = w_h.shape[0]
  w_x_grad, b_grad = _outer_sum(xs, px, matmul_dtype, w_x.dtype, use_kernel, dh_steps)
  w_h_grad, dhw_sums = _outer_sum(hs, ph, matmul_dtype, w_h.dtype, use_kernel, dh_steps)
  grads = {"w_x": w_x_grad, "w_h": w_h_grad, "b": b_grad, "b_hn": dhw_sums[2 * hidden:]}
  dxp = jnp.tile(dh_steps, (1, 1, 3)) * px  # [T, B, 3H] (or [B, T, 3H])
  dxs = matmul(dxp, w_x.T, matmul_dtype, xs.dtype)
  dxs = dxs if keep else _time_major(dxs, batch_major)
  return _like(grads, params), dxs, dh0, None, None


_gru_scan.defvjp(_gru_fwd, _gru_bwd)
