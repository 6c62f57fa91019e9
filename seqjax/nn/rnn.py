"""Recurrent layers as Flax linen modules.

Thin wrappers: each module owns the parameters of its cells and calls a driver
of :mod:`seqjax.recurrence`, so the options and results are the drivers'. Every
module returns ``(carry, ys)``, like the drivers, and takes the per-call
arguments ``carry``, ``lengths``, ``mask`` and ``resets``.

Parameter trees (stable; checkpoints rely on them):

- ``RNN``: ``{"cell": <cell params>}``;
- ``Bidirectional``: ``{"forward": <cell params>, "backward": <cell params>}``;
- ``StackedRNN``: ``{"layer_0": ..., "layer_1": ...}``, each a cell's params,
  or a ``{"forward", "backward"}`` pair when ``bidirectional``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax import recurrence


def _input_size(xs) -> int:
  if jnp.ndim(xs) != 3:
    raise ValueError(f"xs must be [B, T, D] (or [T, B, D] with time_major), got "
                     f"shape {jnp.shape(xs)}")
  return jnp.shape(xs)[-1]


def _pair_init(cell, input_size, dtype):
  def init(key):
    k_f, k_b = jax.random.split(key)
    return {"forward": cell.init(k_f, input_size, dtype),
            "backward": cell.init(k_b, input_size, dtype)}
  return init


class RNN(nn.Module):
  """One recurrent layer: a cell run by a driver.

  Attributes:
    cell: a cell of :mod:`seqjax.cells`.
    method: ``"scan"``, ``"unroll"`` or ``"associative"`` (linear cells).
    reverse: run each sequence backwards within its length.
    unroll: ``lax.scan`` unrolling factor.
    time_major: inputs and outputs are [T, B, ...].
    remat: None, or recompute the forward in chunks of this many steps in
      the backward pass (less memory for long sequences; see
      :func:`seqjax.recurrence.chunked`).
    param_dtype: dtype of the parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from seqjax import cells, nn
    >>> layer = nn.RNN(cells.LSTM(hidden_size=8))
    >>> xs = jnp.ones((2, 5, 4))
    >>> variables = layer.init(jax.random.key(0), xs)
    >>> jax.tree.map(jnp.shape, variables["params"]["cell"])
    {'b': (32,), 'w_h': (8, 32), 'w_x': (4, 32)}
    >>> carry, ys = layer.apply(variables, xs, lengths=jnp.array([5, 3]))
    >>> ys.shape
    (2, 5, 8)
  """

  cell: Any
  method: str = "scan"
  reverse: bool = False
  unroll: int = 1
  time_major: bool = False
  remat: int | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, carry=None, *, lengths=None, mask=None, resets=None):
    d = _input_size(xs)
    params = self.param("cell", lambda key: self.cell.init(key, d, self.param_dtype))
    return recurrence.run(self.cell, params, xs, carry, method=self.method,
                          lengths=lengths, mask=mask, resets=resets,
                          reverse=self.reverse, unroll=self.unroll,
                          time_major=self.time_major, remat=self.remat)


class Bidirectional(nn.Module):
  """A cell run forwards and backwards (within lengths), outputs merged.

  Attributes:
    cell: the cell of both directions (each has its own parameters).
    merge: ``"concat"`` (forward first) or ``"sum"``.
    (the rest as in :class:`RNN`)

  Returns ``(BidirectionalCarry(forward, backward), ys)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from seqjax import cells, nn
    >>> layer = nn.Bidirectional(cells.GRU(hidden_size=8))
    >>> xs = jnp.ones((2, 5, 4))
    >>> carry, ys = layer.apply(layer.init(jax.random.key(0), xs), xs)
    >>> ys.shape
    (2, 5, 16)
  """

  cell: Any
  merge: str = "concat"
  method: str = "scan"
  unroll: int = 1
  time_major: bool = False
  remat: int | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, carry=None, *, lengths=None, mask=None, resets=None):
    d = _input_size(xs)
    init = lambda key: self.cell.init(key, d, self.param_dtype)
    params = {"forward": self.param("forward", init),
              "backward": self.param("backward", init)}
    return recurrence.bidirectional(
        self.cell, params, xs, carry, merge=self.merge, method=self.method,
        lengths=lengths, mask=mask, resets=resets, unroll=self.unroll,
        time_major=self.time_major, remat=self.remat)


class StackedRNN(nn.Module):
  """Several recurrent layers, with optional residuals and inter-layer dropout.

  Attributes:
    cells: one cell per layer.
    bidirectional: every layer runs both directions.
    merge: how bidirectional layers merge (``"concat"`` or ``"sum"``).
    residual: add each layer's input to its output, after the first layer.
    dropout_rate: dropout on every layer's outputs but the last's, drawn from
      the ``"dropout"`` RNG stream when ``deterministic=False``.
    variational: one dropout mask per sequence, shared over time steps.
    weight_drop: DropConnect rate on every layer's recurrent matrix ``w_h``
      (also from the ``"dropout"`` stream, also only when not deterministic).
    reverse: unidirectional layers run backwards within lengths.
    (the rest as in :class:`RNN`)

  Returns ``(carries, ys)``, ``carries`` a tuple with one carry per layer.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from seqjax import cells, nn
    >>> model = nn.StackedRNN((cells.LSTM(8), cells.LSTM(8)), dropout_rate=0.25)
    >>> xs = jnp.ones((2, 5, 4))
    >>> variables = model.init(jax.random.key(0), xs)
    >>> sorted(variables["params"])
    ['layer_0', 'layer_1']
    >>> carries, ys = model.apply(variables, xs, deterministic=False,
    ...                           rngs={"dropout": jax.random.key(1)})
    >>> len(carries), ys.shape
    (2, (2, 5, 8))
  """

  cells: Sequence[Any]
  bidirectional: bool = False
  merge: str = "concat"
  residual: bool = False
  dropout_rate: float = 0.0
  variational: bool = False
  weight_drop: float = 0.0
  method: str = "scan"
  reverse: bool = False
  unroll: int = 1
  time_major: bool = False
  remat: int | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, carry=None, *, lengths=None, mask=None, resets=None,
               deterministic: bool = True):
    size = _input_size(xs)
    params = []
    for layer, cell in enumerate(self.cells):
      if self.bidirectional:
        init = _pair_init(cell, size, self.param_dtype)
        size = cell.hidden_size * (2 if self.merge == "concat" else 1)
      else:
        init = functools.partial(cell.init, input_size=size, dtype=self.param_dtype)
        size = cell.hidden_size
      params.append(self.param(f"layer_{layer}", init))
    use_dropout = not deterministic and (self.dropout_rate > 0.0 or self.weight_drop > 0.0)
    return recurrence.stacked(
        self.cells, params, xs, carry, bidirectional=self.bidirectional,
        merge=self.merge, residual=self.residual, dropout_rate=self.dropout_rate,
        variational=self.variational, weight_drop=self.weight_drop,
        dropout_key=self.make_rng("dropout") if use_dropout else None,
        method=self.method, lengths=lengths, mask=mask, resets=resets,
        reverse=self.reverse, unroll=self.unroll, time_major=self.time_major,
        remat=self.remat)
