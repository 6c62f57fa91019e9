"""Drivers: run a cell of :mod:`seqjax.cells` over a sequence.

Every driver has the same signature and returns the same values, so switching
method is one argument::

    carry, ys = scan(cell, params, xs, carry=None, *, lengths=None, mask=None,
                     resets=None, reverse=False, unroll=1, time_major=False)
    carry, ys = unroll(cell, params, xs, ...)        # Python loop, fully static
    carry, ys = associative(cell, params, xs, ...)   # linear cells only
    carry, ys = run(cell, params, xs, ..., method="scan" | "unroll" | "associative")

Every driver takes ``remat=K``: the sequence runs in chunks of K steps and the
backward pass recomputes each chunk's forward from the carry saved at its
start, so training keeps T/K carries and one chunk's activations instead of
every step's (:func:`chunked`, which also runs a whole per-chunk model, loss
included, the same way).

Conventions shared by all of them (and by :func:`bidirectional` and
:func:`stacked`):

- ``xs`` is [B, T, D], or [T, B, D] with ``time_major=True``; ``ys`` follows
  the same layout. ``mask`` and ``resets`` are [B, T] (or [T, B]).
- ``lengths [B]`` (int, in [0, T]): steps at ``t >= lengths[b]`` hold the carry
  and emit exact zeros, so the final carry is the carry at each sequence's own
  last step. Out-of-range values raise when ``lengths`` is concrete and are
  clipped to [0, T] under ``jit``, where their values are not known.
- ``mask [B, T]`` (bool): masked steps hold the carry and emit zeros; interior
  gaps are allowed. It combines with ``lengths``.
- ``resets [B, T]`` (bool): the carry returns to ``cell.initial_carry`` (zeros)
  before that step, so several episodes can be packed in one row. A reset
  applies even on a masked step.
- ``reverse=True`` runs each sequence backwards within its own length: outputs
  stay aligned with their inputs, and the final carry is the one after step 0.
  Resets mark episode starts in forward time, so in reverse the carry is reset
  after each episode's first step, i.e. before the step preceding a reset.

All the work that does not depend on the carry (the input projection, masks,
the within-length reversal) happens outside the loop; the loop runs one
masked step body, shared by every driver, so the drivers agree exactly.
The exception is ``scan`` with ``unroll=1`` on a cell with a ``fused_scan``
(LSTM, reset-after GRU): it runs that fused sequence function instead, which
projects inside its loop and has its own backward pass (:mod:`seqjax.fused`),
and takes batch-major inputs as they come (without ``reverse`` or ``remat``);
it is tested to equal the step path in values and gradients.

Shapes are checked at trace time: a mistake raises a ``ValueError`` saying what
was expected and what arrived, before anything reaches XLA.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
METHODS = ("scan", "unroll", "associative")


class BidirectionalCarry(NamedTuple):
  """Final carries of the two directions of :func:`bidirectional`."""

  forward: Any
  backward: Any


# --------------------------------------------------------------------------
# Boundary checks (trace time, free at run time).


def _shape_str(tree) -> str:
  return str(jax.tree.map(lambda x: tuple(np.shape(x)), tree))


def _check_params(cell, params, input_size: int):
  name = type(cell).__name__
  expected = cell.param_shapes(input_size)
  if not isinstance(params, dict) or set(params) != set(expected):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(
        f"params for {cell} must be a dict with keys {sorted(expected)}, got {got}")
  for key, shape in expected.items():
    if tuple(np.shape(params[key])) != shape:
      raise ValueError(
          f"params[{key!r}] for {name}(hidden_size={cell.hidden_size}) with input "
          f"size {input_size} must have shape {shape}, got {tuple(np.shape(params[key]))}")


def _check_bool(name: str, value, shape) -> Array:
  value = jnp.asarray(value)
  if value.shape != shape:
    raise ValueError(f"{name} must have shape {shape} (like xs without its last "
                     f"axis), got {value.shape}")
  if value.dtype != jnp.bool_:
    raise ValueError(f"{name} must be bool, got dtype {value.dtype}")
  return value


def _check_inputs(cell, params, xs, carry, lengths, mask, resets, time_major):
  """Validates the driver arguments; returns (B, T, mask, resets, lengths)."""
  if not hasattr(cell, "step") or not hasattr(cell, "project"):
    raise ValueError(f"cell must be a seqjax cell (e.g. seqjax.cells.LSTM), got "
                     f"{type(cell).__name__}")
  layout = "[T, B, D]" if time_major else "[B, T, D]"
  if np.ndim(xs) != 3:
    raise ValueError(f"xs must be {layout}, got shape {tuple(np.shape(xs))}")
  if not jnp.issubdtype(jnp.result_type(xs), jnp.floating):
    raise ValueError(f"xs must be a float array, got dtype {jnp.result_type(xs)}")
  if time_major:
    t, b, d = np.shape(xs)
  else:
    b, t, d = np.shape(xs)
  if t < 1:
    raise ValueError(f"xs must have at least one time step, got shape {np.shape(xs)}")
  _check_params(cell, params, d)
  if carry is not None:
    expected = cell.initial_carry((b,))
    got_struct, want_struct = jax.tree.structure(carry), jax.tree.structure(expected)
    same = got_struct == want_struct and all(
        np.shape(g) == np.shape(w)
        for g, w in zip(jax.tree.leaves(carry), jax.tree.leaves(expected)))
    if not same:
      raise ValueError(
          f"carry for {type(cell).__name__} with batch {b} must look like "
          f"{_shape_str(expected)}, got {_shape_str(carry)}")
  steps = (t, b) if time_major else (b, t)
  if mask is not None:
    mask = _check_bool("mask", mask, steps)
  if resets is not None:
    resets = _check_bool("resets", resets, steps)
  if lengths is not None:
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,):
      raise ValueError(f"lengths must have shape (B,) = ({b},), got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"lengths must be an integer array, got dtype {lengths.dtype}")
    if not isinstance(lengths, jax.core.Tracer):
      values = np.asarray(lengths)
      if np.any(values < 0) or np.any(values > t):
        raise ValueError(f"lengths must be in [0, T] = [0, {t}], got "
                         f"{values.tolist()}")
    else:  # values unknown at trace time: keep the gathers in bounds
      lengths = jnp.clip(lengths, 0, t)
  return b, t, mask, resets, lengths


# --------------------------------------------------------------------------
# The shared step body and the three loop cores.


def _where(pred: Array, on_true, on_false):
  """Per-batch-row select over carry pytrees; ``pred`` is [B]."""
  def pick(x, y):
    return jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - pred.ndim)), x, y)
  return jax.tree.map(pick, on_true, on_false)


def _masked_step(cell, params, init_carry):
  """The step body of every driver: reset, step, then hold where invalid."""
  def body(carry, inputs):
    xp_t, valid_t, reset_t = inputs  # [B, G], [B] | None, [B] | None
    if reset_t is not None:
      carry = _where(reset_t, init_carry, carry)
    new_carry, y = cell.step(params, carry, xp_t)
    if valid_t is not None:
      new_carry = _where(valid_t, new_carry, carry)
      y = jnp.where(valid_t[:, None], y, jnp.zeros_like(y))
    return new_carry, y
  return body


def _scan_core(cell, params, xp, valid, resets, carry, init_carry, unroll):
  body = _masked_step(cell, params, init_carry)
  return jax.lax.scan(body, carry, (xp, valid, resets), unroll=unroll)


def _unroll_core(cell, params, xp, valid, resets, carry, init_carry, unroll):
  del unroll  # every step is already unrolled
  body = _masked_step(cell, params, init_carry)
  ys = []
  for t in range(xp.shape[0]):
    at_t = lambda a: None if a is None else a[t]
    carry, y = body(carry, (xp[t], at_t(valid), at_t(resets)))
    ys.append(y)
  return carry, jnp.stack(ys)


def _associative_core(cell, params, xp, valid, resets, carry, init_carry, unroll):
  """h_t = a_t h_{t-1} + b_t as a parallel prefix over (a, b) pairs."""
  del init_carry, unroll  # linear cells reset to zero; no loop to unroll
  a, b = cell.coefficients(params, xp)  # [T, B, H] each
  if valid is not None:  # a held step is the identity map h -> 1*h + 0
    a = jnp.where(valid[..., None], a, jnp.ones_like(a))
    b = jnp.where(valid[..., None], b, jnp.zeros_like(b))
  if resets is not None:  # a reset step forgets h_{t-1}: h -> 0*h + b
    a = jnp.where(resets[..., None], jnp.zeros_like(a), a)
  b = b.at[0].add(a[0] * carry)  # fold the initial carry into step 0

  def compose(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2

  _, hs = jax.lax.associative_scan(compose, (a, b), axis=0)  # [T, B, H]
  ys = hs if valid is None else jnp.where(valid[..., None], hs, jnp.zeros_like(hs))
  return hs[-1], ys


_CORES = {"scan": _scan_core, "unroll": _unroll_core, "associative": _associative_core}


def _reversal_index(t: int, lengths: Array) -> Array:
  """[T, B] gather index that reverses each column within its own length.

  Index t maps to L_b - 1 - t for t < L_b and to itself past the length. The
  map is its own inverse, so the same gather restores the outputs.
  """
  steps = jnp.arange(t)[:, None]  # [T, 1]
  return jnp.where(steps < lengths[None, :], lengths[None, :] - 1 - steps, steps)


def _is_positive_int(value) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= 1)


def chunked(fn, carry, xs, *, chunk: int, remat: bool = True):
  """Runs ``fn`` over consecutive chunks of the leading (time) axis of ``xs``.

  ``fn(carry, xs_chunk) -> (carry, ys_chunk)`` takes time-major chunks of
  ``chunk`` steps (the last may be shorter) and returns outputs with the same
  leading axis; the outputs are concatenated back to T steps. For an ``fn``
  that is causal in time (a scan, a per-step loss) the result is ``fn(carry,
  xs)``, to rounding.

  With ``remat`` (the point of it), each chunk runs under ``jax.checkpoint``:
  the backward pass keeps only the carry at every chunk start and recomputes
  one chunk's forward at a time, so the memory of reverse mode grows with
  T/chunk carries plus ``chunk`` steps of activations, for one extra forward
  pass. Put everything whose activations scale with T inside ``fn`` (the
  input layer, the read-out and the loss, returning per-step losses): what
  ``fn`` returns is kept at every step.

  Args:
    fn: ``(carry, xs_chunk) -> (carry, ys_chunk)``, pure and jit-able.
    carry: the initial carry (any pytree).
    xs: a pytree of arrays with a common leading axis T (``None`` leaves are
      passed through as ``None``).
    chunk: steps per chunk, >= 1. ``sqrt(T)`` balances the saved carries
      against one chunk's activations.
    remat: rematerialise each chunk in the backward pass.

  Returns:
    ``(carry, ys)``: the final carry and the outputs, [T, ...] per leaf.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import seqjax
    >>> cell = seqjax.cells.LSTM(hidden_size=8)
    >>> params = cell.init(jax.random.key(0), input_size=4)
    >>> xs = jnp.ones((100, 2, 4))                           # [T, B, D]
    >>> def loss_chunk(carry, x):                           # per-step losses
    ...   carry, ys = seqjax.scan(cell, params, x, carry, time_major=True)
    ...   return carry, jnp.mean(ys ** 2, axis=-1)
    >>> _, losses = chunked(loss_chunk, cell.initial_carry((2,)), xs, chunk=10)
    >>> losses.shape
    (100, 2)
  """
  if not _is_positive_int(chunk):
    raise ValueError(f"chunk must be a positive int (steps per chunk), got {chunk!r}")
  leaves = jax.tree.leaves(xs)
  if not leaves:
    raise ValueError("chunked needs at least one array in xs")
  t = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else None
  if t is None or any(np.ndim(a) == 0 or np.shape(a)[0] != t for a in leaves):
    raise ValueError(f"every array in xs must have the same leading (time) axis, got "
                     f"shapes {_shape_str(xs)}")
  body = jax.checkpoint(fn) if remat else fn
  whole, rest = divmod(t, chunk)
  # The carry takes the dtypes fn gives it (a float32 initial carry in a
  # float64 model becomes float64), as the drivers' carries do.
  first = jax.tree.map(lambda a: a[:min(chunk, t)], xs)
  carry_out = jax.eval_shape(fn, carry, first)[0]
  if jax.tree.structure(carry_out) == jax.tree.structure(carry):
    carry = jax.tree.map(lambda c, o: jnp.asarray(c).astype(o.dtype), carry, carry_out)
  outputs = []
  if whole:
    split = jax.tree.map(lambda a: a[:whole * chunk].reshape(
        (whole, chunk) + a.shape[1:]), xs)
    carry, ys = jax.lax.scan(body, carry, split)
    outputs.append(jax.tree.map(lambda a: a.reshape((whole * chunk,) + a.shape[2:]), ys))
  if rest:
    carry, ys = body(carry, jax.tree.map(lambda a: a[whole * chunk:], xs))
    outputs.append(ys)
  if len(outputs) == 1:
    return carry, outputs[0]
  return carry, jax.tree.map(lambda *a: jnp.concatenate(a), *outputs)


def _drive(core: str, cell, params, xs, carry, *, lengths, mask, resets, reverse,
           unroll, time_major, remat):
  b, t, mask, resets, lengths = _check_inputs(
      cell, params, xs, carry, lengths, mask, resets, time_major)
  if not _is_positive_int(unroll):  # True == 1 would take the one-step fused loop
    raise ValueError(f"unroll must be a positive int (steps per loop iteration), got "
                     f"{unroll!r}; for a fully unrolled loop use method='unroll'")
  if remat is not None and not _is_positive_int(remat):
    raise ValueError(f"remat must be None or a positive int (steps per rematerialised "
                     f"chunk), got {remat!r}")
  if core == "associative" and not cell.is_linear:
    raise ValueError(
        f"method='associative' needs a linear cell (e.g. seqjax.cells.MinGRU); "
        f"{type(cell).__name__} is not linear: use method='scan' or 'unroll'")

  # Time-major inside: the loop runs over the leading axis. A cell's fused
  # sequence function (LSTM, reset-after GRU) projects inside its loop, as
  # measured faster on CPU; every other path projects all steps at once.
  to_tm = (lambda a: a) if time_major else (lambda a: jnp.swapaxes(a, 0, 1))
  fused = core == "scan" and unroll == 1 and cell.fused_scan is not None
  # A fused loop reads batch-major xs itself (and writes ys so), unless the
  # steps are reordered (reverse) or cut in chunks (remat) first.
  batch_major = fused and not time_major and not reverse and remat is None
  dtype = jnp.result_type(xs, params["w_x"], params["b"])
  if batch_major:
    xp = xs  # [B, T, D]
  else:
    xp = to_tm(xs) if fused else cell.project(params, to_tm(xs))  # [T, B, D or G]
  mask = None if mask is None else to_tm(mask)  # [T, B]
  resets = None if resets is None else to_tm(resets)  # [T, B]

  valid = mask
  if lengths is not None:
    in_length = jnp.arange(t)[:, None] < lengths[None, :]  # [T, B]
    valid = in_length if valid is None else valid & in_length
    if resets is not None:  # past its length a sequence has no episodes
      resets = resets & in_length

  if reverse:
    if resets is not None:
      # Reverse time starts each episode at its last step: reset before step
      # t when step t + 1 began an episode (inside the sequence's length).
      resets = jnp.concatenate([resets[1:], jnp.zeros_like(resets[:1])])
    if lengths is None:
      flip = lambda a: None if a is None else jnp.flip(a, axis=0)
    else:
      index = _reversal_index(t, lengths)  # [T, B]
      flip = lambda a: None if a is None else jnp.take_along_axis(
          a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=0)
    xp, valid, resets = flip(xp), flip(valid), flip(resets)

  init_carry = cell.initial_carry((b,), dtype)
  if carry is None:
    carry = init_carry
  else:  # the loop carries the promoted dtype (e.g. a float32 carry, float64 model)
    carry = jax.tree.map(lambda c: jnp.asarray(c).astype(jnp.result_type(c, dtype)), carry)
  if fused:
    def loop(carry, chunk):
      return cell.fused_scan(params, chunk[0], carry, chunk[1], chunk[2], batch_major)
  else:
    def loop(carry, chunk):
      return _CORES[core](cell, params, *chunk, carry, init_carry, unroll)
  if remat is None:
    carry, ys = loop(carry, (xp, valid, resets))
  else:
    carry, ys = chunked(loop, carry, (xp, valid, resets), chunk=remat)
  if reverse:
    ys = flip(ys)
  return carry, ys if batch_major else to_tm(ys)


# --------------------------------------------------------------------------
# Public drivers.

_DRIVER_DOC = """

  Args:
    cell: a cell from :mod:`seqjax.cells` (static: hashable, jit-friendly).
    params: the cell's parameters, as made by ``cell.init``.
    xs: inputs [B, T, D] ([T, B, D] with ``time_major``).
    carry: initial carry for batch B (default ``cell.initial_carry((B,))``).
    lengths: [B] int in [0, T], valid steps of each sequence.
    mask: [B, T] bool, False steps hold the carry and emit zeros.
    resets: [B, T] bool, reset the carry to zeros before these steps.
    reverse: run each sequence backwards within its length.
    unroll: loop unrolling factor of ``lax.scan`` (``scan`` only).
    time_major: ``xs``, ``mask``, ``resets`` and ``ys`` are time-major.
    remat: None, or run in chunks of this many steps and recompute each
      chunk's forward in the backward pass (see :func:`chunked`): memory for
      T/remat carries and one chunk's activations, for one more forward pass.
      The outputs ``ys`` are still kept for every step.

  Returns:
    ``(carry, ys)``: the final carry, and the outputs [B, T, H] (or [T, B, H]).

  Raises:
    ValueError: at trace time, when a shape or dtype does not fit.
"""


def scan(cell, params, xs, carry=None, *, lengths=None, mask=None, resets=None,
         reverse=False, unroll=1, time_major=False, remat=None):
  return _drive("scan", cell, params, xs, carry, lengths=lengths, mask=mask,
                resets=resets, reverse=reverse, unroll=unroll,
                time_major=time_major, remat=remat)


scan.__doc__ = """Runs ``cell`` over ``xs`` with ``jax.lax.scan``.

  The compiled loop body is one step; ``unroll=k`` puts k steps in it, which
  trades compile time for fewer loop iterations. (The fused LSTM/GRU loops
  that ``unroll=1`` runs choose their own factor per backend: 16 on a GPU,
  where loop iterations are costly, 1 elsewhere; see :mod:`seqjax.fused`.)
""" + _DRIVER_DOC + """
  Example:
    >>> import jax, jax.numpy as jnp
    >>> import seqjax
    >>> cell = seqjax.cells.LSTM(hidden_size=8)
    >>> params = cell.init(jax.random.key(0), input_size=4)
    >>> xs = jnp.ones((2, 5, 4))                      # [B, T, D]
    >>> carry, ys = seqjax.scan(cell, params, xs, lengths=jnp.array([5, 3]))
    >>> ys.shape, carry.h.shape
    ((2, 5, 8), (2, 8))
    >>> bool(jnp.all(ys[1, 3:] == 0))                 # padded outputs are zero
    True
"""


def unroll(cell, params, xs, carry=None, *, lengths=None, mask=None, resets=None,
           reverse=False, unroll=1, time_major=False, remat=None):
  return _drive("unroll", cell, params, xs, carry, lengths=lengths, mask=mask,
                resets=resets, reverse=reverse, unroll=unroll,
                time_major=time_major, remat=remat)


unroll.__doc__ = """Runs ``cell`` over ``xs`` with a Python loop (fully unrolled).

  One traced step per time step: no loop overhead at run time, compile time
  grows with T. Same results as :func:`scan`.
""" + _DRIVER_DOC + """
  Example:
    >>> import jax, jax.numpy as jnp
    >>> import seqjax
    >>> cell = seqjax.cells.GRU(hidden_size=8)
    >>> params = cell.init(jax.random.key(0), input_size=4)
    >>> xs = jax.random.normal(jax.random.key(1), (2, 5, 4))
    >>> _, ys_unrolled = seqjax.unroll(cell, params, xs)
    >>> _, ys_scanned = seqjax.scan(cell, params, xs)
    >>> bool(jnp.allclose(ys_unrolled, ys_scanned, atol=1e-6))
    True
"""


def associative(cell, params, xs, carry=None, *, lengths=None, mask=None,
                resets=None, reverse=False, unroll=1, time_major=False, remat=None):
  return _drive("associative", cell, params, xs, carry, lengths=lengths,
                mask=mask, resets=resets, reverse=reverse, unroll=unroll,
                time_major=time_major, remat=remat)


associative.__doc__ = """Runs a linear ``cell`` with ``jax.lax.associative_scan``.

  For cells with ``is_linear`` (h_t = a_t * h_{t-1} + b_t): O(log T) depth
  instead of T sequential steps. Held, reset and initial-carry steps are folded
  into the (a, b) pairs, so every option of :func:`scan` is supported.
""" + _DRIVER_DOC + """
  Example:
    >>> import jax, jax.numpy as jnp
    >>> import seqjax
    >>> cell = seqjax.cells.MinGRU(hidden_size=8)
    >>> params = cell.init(jax.random.key(0), input_size=4)
    >>> xs = jax.random.normal(jax.random.key(1), (2, 16, 4))
    >>> _, ys = seqjax.associative(cell, params, xs)
    >>> bool(jnp.allclose(ys, seqjax.scan(cell, params, xs)[1], atol=1e-5))
    True
"""


def run(cell, params, xs, carry=None, *, method="scan", lengths=None, mask=None,
        resets=None, reverse=False, unroll=1, time_major=False, remat=None):
  """Runs ``cell`` over ``xs`` with the driver named by ``method``.

  Args:
    method: ``"scan"``, ``"unroll"`` or ``"associative"`` (linear cells).
    (the rest as in :func:`scan`)

  Returns:
    ``(carry, ys)`` as in :func:`scan`.

  Raises:
    ValueError: for an unknown method, or as :func:`scan` does.
  """
  if method not in _CORES:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return _drive(method, cell, params, xs, carry, lengths=lengths, mask=mask,
                resets=resets, reverse=reverse, unroll=unroll,
                time_major=time_major, remat=remat)


def bidirectional(cell, params, xs, carry=None, *, merge="concat", method="scan",
                  lengths=None, mask=None, resets=None, unroll=1,
                  time_major=False, remat=None):
  """Runs ``cell`` forwards and backwards (within lengths) and merges the outputs.

  Args:
    cell: the cell of both directions.
    params: ``{"forward": ..., "backward": ...}``, one cell's params each.
    carry: ``BidirectionalCarry(forward, backward)`` or None.
    merge: ``"concat"`` ([..., 2H], forward first) or ``"sum"`` ([..., H]).
    method: the driver of both directions (see :func:`run`).
    (the rest as in :func:`scan`)

  Returns:
    ``(BidirectionalCarry(forward, backward), ys)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import seqjax
    >>> cell = seqjax.cells.GRU(hidden_size=8)
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"forward": cell.init(k1, 4), "backward": cell.init(k2, 4)}
    >>> carry, ys = seqjax.bidirectional(cell, params, jnp.ones((2, 5, 4)),
    ...                                  lengths=jnp.array([5, 2]))
    >>> ys.shape, carry.backward.shape
    ((2, 5, 16), (2, 8))
  """
  if merge not in ("concat", "sum"):
    raise ValueError(f"merge must be 'concat' or 'sum', got {merge!r}")
  if not isinstance(params, dict) or set(params) != {"forward", "backward"}:
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(
        f"bidirectional params must be a dict with keys ['backward', 'forward'], "
        f"got {got}")
  if carry is None:
    carry = BidirectionalCarry(None, None)
  elif not isinstance(carry, BidirectionalCarry):
    raise ValueError(f"bidirectional carry must be a BidirectionalCarry, got "
                     f"{type(carry).__name__}")
  common = dict(method=method, lengths=lengths, mask=mask, resets=resets,
                unroll=unroll, time_major=time_major, remat=remat)
  carry_f, ys_f = run(cell, params["forward"], xs, carry.forward, **common)
  carry_b, ys_b = run(cell, params["backward"], xs, carry.backward, reverse=True,
                      **common)
  ys = jnp.concatenate([ys_f, ys_b], axis=-1) if merge == "concat" else ys_f + ys_b
  return BidirectionalCarry(carry_f, carry_b), ys


_bidirectional = bidirectional  # `stacked` has an argument of that name


def _dropout(key, rate: float, x: Array, mask_shape=None) -> Array:
  """Inverted dropout; ``mask_shape`` (broadcast to ``x``) shares one draw over axes of size 1."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape if mask_shape is None else mask_shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _drop_recurrent_weights(key, rate: float, cell, params):
  """DropConnect on the recurrent matrix ``w_h`` of one layer's params."""
  if "w_h" not in cell.param_shapes(1):
    raise ValueError(f"weight_drop needs cells with a recurrent matrix w_h; "
                     f"{type(cell).__name__} has none")
  if set(params) == {"forward", "backward"}:  # a bidirectional layer
    k_f, k_b = jax.random.split(key)
    return {"forward": _drop_recurrent_weights(k_f, rate, cell, params["forward"]),
            "backward": _drop_recurrent_weights(k_b, rate, cell, params["backward"])}
  return dict(params, w_h=_dropout(key, rate, params["w_h"]))


def stacked(cells: Sequence[Any], params: Sequence[Any], xs, carry=None, *,
            bidirectional: bool = False, merge="concat", residual=False,
            dropout_rate=0.0, variational=False, weight_drop=0.0, dropout_key=None,
            method="scan", lengths=None, mask=None, resets=None, reverse=False,
            unroll=1, time_major=False, remat=None):
  """Runs layers of cells, each layer's outputs the next layer's inputs.

  Args:
    cells: one cell per layer.
    params: one params per layer (``{"forward", "backward"}`` dicts when
      ``bidirectional``).
    carry: a tuple with one carry per layer, or None.
    bidirectional: every layer is :func:`bidirectional`.
    merge: how bidirectional layers merge their directions.
    residual: add each layer's input to its output, for every layer after the
      first (the first usually changes the feature size).
    dropout_rate: dropout on the outputs of every layer but the last, as in
      PyTorch's ``nn.LSTM(dropout=...)``.
    variational: draw that dropout mask once per sequence and share it over
      every time step (Gal & Ghahramani 2016), instead of per element.
    weight_drop: DropConnect on each layer's recurrent matrix ``w_h`` (Wan et
      al. 2013; AWD-LSTM, Merity et al. 2018): one mask per call, shared by
      every sequence and step; the input weights and biases are untouched.
    dropout_key: PRNG key for both kinds of dropout; None means no dropout
      (evaluation), whatever the rates.
    (the rest as in :func:`scan`; ``reverse`` applies to unidirectional layers)

  Returns:
    ``(carries, ys)``: a tuple of per-layer final carries, and the last layer's
    outputs.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import seqjax
    >>> layers = (seqjax.cells.LSTM(8), seqjax.cells.LSTM(8))
    >>> params = [layers[0].init(jax.random.key(0), 4),
    ...           layers[1].init(jax.random.key(1), 8)]
    >>> carries, ys = seqjax.stacked(layers, params, jnp.ones((2, 5, 4)),
    ...                              residual=True)
    >>> len(carries), ys.shape
    (2, (2, 5, 8))
  """
  cells = tuple(cells)
  params = tuple(params)
  if not cells:
    raise ValueError("stacked needs at least one cell")
  if len(params) != len(cells):
    raise ValueError(f"stacked got {len(cells)} cells but {len(params)} params")
  if carry is None:
    carry = (None,) * len(cells)
  elif not isinstance(carry, (tuple, list)) or len(carry) != len(cells):
    raise ValueError(f"stacked carry must be a tuple of {len(cells)} per-layer "
                     f"carries, got {type(carry).__name__}")
  for name, rate in (("dropout_rate", dropout_rate), ("weight_drop", weight_drop)):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {rate}")
  use_dropout = dropout_key is not None and dropout_rate > 0.0
  use_weight_drop = dropout_key is not None and weight_drop > 0.0
  keys = jax.random.split(dropout_key, len(cells)) if use_dropout else None
  # Weight drop draws from its own stream, so turning it on leaves the output
  # dropout masks as they were.
  weight_keys = (jax.random.split(jax.random.fold_in(dropout_key, 1), len(cells))
                 if use_weight_drop else None)

  common = dict(method=method, lengths=lengths, mask=mask, resets=resets,
                unroll=unroll, time_major=time_major, remat=remat)
  carries, x = [], xs
  for layer, (cell, p, c) in enumerate(zip(cells, params, carry)):
    if use_weight_drop:
      p = _drop_recurrent_weights(weight_keys[layer], weight_drop, cell, p)
    if bidirectional:
      c, y = _bidirectional(cell, p, x, c, merge=merge, **common)
    else:
      c, y = run(cell, p, x, c, reverse=reverse, **common)
    if residual and layer > 0:
      if y.shape != x.shape:
        raise ValueError(
            f"residual layer {layer} needs equal input and output sizes, got "
            f"input {x.shape[-1]} and output {y.shape[-1]}")
      y = y + x
    if use_dropout and layer < len(cells) - 1:
      shared = None
      if variational:  # one mask per sequence: size 1 on the time axis
        shared = (1,) + y.shape[1:] if time_major else (y.shape[0], 1) + y.shape[2:]
      y = _dropout(keys[layer], dropout_rate, y, shared)
    carries.append(c)
    x = y
  return tuple(carries), x
