"""Long streams in windows, for truncated backpropagation through time.

A corpus or an audio file is too long to backpropagate through in one piece.
:class:`StreamBatcher` lays the streams end to end, gives each of the B batch
rows its own contiguous stretch, and cuts every row into windows of k steps.
Batch ``i`` holds window ``i`` of every row, so row ``b`` of consecutive
batches continues one stream. The training step carries the recurrent state
from one window into the next under ``stop_gradient`` (``TrainState.carry``):
the forward pass sees the whole past, the backward pass stops at the window's
start.

Each batch is a dict of NumPy arrays ([B, k] each):

- ``inputs``: tokens at positions p .. p+k-1; ``targets``: at p+1 .. p+k.
- ``resets``: True where a stream starts (the carry returns to zeros before that
  step) and at the first step of each epoch, where a row starts afresh.
- ``weights``: 0 where the target is the first token of a new stream (it cannot
  be predicted from the previous stream) and on evaluation padding, else 1.

Training batches repeat forever, epoch after epoch; each epoch shifts every row
by a random offset below k (drawn from the seed and the epoch), so window
boundaries move. Batch ``i`` depends only on ``i``: a resumed run reads the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def _as_streams(tokens, starts):
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} and "
                     f"dtype {tokens.dtype}")
  if starts is None:
    starts = np.zeros(tokens.shape, bool)
  starts = np.asarray(starts, bool).copy()
  if starts.shape != tokens.shape:
    raise ValueError(f"starts must have the shape of tokens {tokens.shape}, got "
                     f"{starts.shape}")
  if starts.size:
    starts[0] = True
  return tokens.astype(np.int32), starts


def concatenate(streams) -> tuple[np.ndarray, np.ndarray]:
  """Streams (1-D token arrays) laid end to end: ``(tokens, starts)``."""
  streams = [np.asarray(s) for s in streams if len(s)]
  if not streams:
    raise ValueError("no non-empty streams to concatenate")
  tokens = np.concatenate(streams)
  starts = np.zeros(tokens.shape, bool)
  starts[np.cumsum([0] + [len(s) for s in streams[:-1]])] = True
  return tokens, starts


class StreamBatcher:
  """Windows of k steps over streams; row b of every batch continues one stream.

  Args:
    tokens: [N] integer tokens, all streams laid end to end.
    starts: [N] bool, True at the first token of each stream (``None``: one
      stream). :func:`concatenate` builds both.
    batch_size: B, rows in a global batch.
    window: k, steps per window.
    shard: ``(index, count)``: this process feeds rows ``index`` of ``count``
      equal parts of every batch (default ``(0, 1)``, all rows).
    seed: draws each epoch's offset.
    eval_only: the streams are only evaluated (:meth:`eval_batches`), so
      they may be shorter than one training batch.

  Example:
    >>> import numpy as np
    >>> batcher = StreamBatcher(np.arange(100), batch_size=2, window=5, seed=0)
    >>> first, second = batcher.batch(0), batcher.batch(1)
    >>> first["inputs"].shape
    (2, 5)
    >>> bool((second["inputs"][:, 0] == first["targets"][:, -1]).all())
    True
  """

  def __init__(self, tokens, starts=None, *, batch_size: int, window: int,
               shard: tuple[int, int] = (0, 1), seed: int = 0, eval_only: bool = False):
    self.tokens, self.starts = _as_streams(tokens, starts)
    if window < 1 or batch_size < 1:
      raise ValueError(f"window and batch_size must be >= 1, got {window} and {batch_size}")
    self.batch_size, self.window, self.seed = batch_size, window, seed
    index, count = shard
    if batch_size % count:
      raise ValueError(f"batch_size {batch_size} does not split into {count} processes")
    per = batch_size // count
    self.rows = slice(index * per, (index + 1) * per)
    # Room for the largest offset (k - 1) and the one-token shift of the targets.
    self.windows_per_epoch = (len(self.tokens) - window) // (batch_size * window)
    if len(self.tokens) < 2:
      raise ValueError(f"streams of {len(self.tokens)} tokens have nothing to predict")
    if self.windows_per_epoch < 1 and not eval_only:
      raise ValueError(f"{len(self.tokens)} tokens are too few for {batch_size} rows of "
                       f"windows of {window} (need at least {(batch_size + 1) * window})")
    self.row_length = self.windows_per_epoch * window

  stateful = True

  def _offset(self, epoch: int) -> int:
    return int(np.random.default_rng([self.seed, epoch]).integers(self.window))

  def _windows(self, tokens, starts, weights, first_positions, first_window):
    positions = first_positions[:, None] + np.arange(self.window + 1)[None, :]  # [B, k+1]
    resets = starts[positions[:, :-1]]
    if first_window:
      resets[:, 0] = True
    return {"inputs": tokens[positions[:, :-1]],
            "targets": tokens[positions[:, 1:]],
            "weights": (weights[positions[:, 1:]] & ~starts[positions[:, 1:]]).astype(np.float32),
            "resets": resets}

  def batch(self, index: int) -> dict:
    """Training batch ``index`` (this process's rows)."""
    if self.windows_per_epoch < 1:
      raise ValueError("these streams are for evaluation only (eval_only=True)")
    epoch, w = divmod(int(index), self.windows_per_epoch)
    rows = np.arange(self.batch_size)[self.rows]
    firsts = self._offset(epoch) + rows * self.row_length + w * self.window
    return self._windows(self.tokens, self.starts, np.ones(len(self.tokens), bool),
                         firsts, first_window=(w == 0))

  def eval_batches(self) -> Iterator[dict]:
    """Every target exactly once, in windows; padding has weight 0."""
    n = len(self.tokens) - 1  # predictions to make
    per_row = -(-n // self.batch_size)
    per_row = -(-per_row // self.window) * self.window
    size = self.batch_size * per_row + 1
    pad = size - len(self.tokens)
    tokens = np.concatenate([self.tokens, np.zeros(pad, np.int32)])
    starts = np.concatenate([self.starts, np.zeros(pad, bool)])
    weights = np.arange(size) < len(self.tokens)
    rows = np.arange(self.batch_size)[self.rows]
    for w in range(per_row // self.window):
      yield self._windows(tokens, starts, weights, rows * per_row + w * self.window,
                          first_window=(w == 0))
