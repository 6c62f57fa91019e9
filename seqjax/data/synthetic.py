"""Synthetic sequence tasks from the RNN literature, generated on the fly.

Each task draws batch ``i`` from a NumPy generator seeded by ``(seed, split,
i)``, so batches are reproducible, independent of how many processes read
them, and a resumed run sees the same data. The evaluation set is a fixed
list of batches drawn from seeds the training stream never uses.

- **parity**: a string of T random bits; the answer is 1 when the number of
  ones is odd. Every bit matters, so the carry must keep a running XOR over the
  whole string. Inputs [B, T] int (vocab 2), targets [B] int.
- **adding** (Hochreiter & Schmidhuber 1997): each step holds a value in
  [0, 1) and a marker; two steps are marked (one in each half of the sequence)
  and the target is the sum of their values. Lengths vary between T/2 and T,
  so padding must not leak in. Inputs [B, T, 2] float, lengths [B], targets
  [B] float. Predicting the mean scores an MSE of about 0.167.
- **copy** (the copy-memory task of Arjovsky et al. 2016): S symbols from an
  alphabet of 8 (tokens 1..8), T - 1 blanks (0), a delimiter (9), then S
  blanks during which the model must replay the S symbols. Inputs and targets
  [B, T + 2S] int; the loss covers every step, accuracy (``score``) only the
  S replayed symbols. Guessing blanks, then uniform symbols, scores
  S log(8) / (T + 2S) nats per step.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

_TRAIN, _EVAL = 0, 1


def shard_rows(size: int, shard: tuple[int, int]) -> slice:
  """Rows of a batch of ``size`` that part ``shard = (index, count)`` feeds."""
  index, count = shard
  if size % count:
    raise ValueError(f"a batch of {size} rows does not split into {count} processes")
  per = size // count
  return slice(index * per, (index + 1) * per)


class SyntheticSource:
  """Batches of a synthetic task; see the module docstring.

  Args:
    make: ``make(rng, rows) -> dict`` of [rows, ...] arrays (a whole global batch).
    batch_size: rows in a global training batch.
    eval_batch_size, eval_batches: size and number of the evaluation batches.
    shard: ``(index, count)``: this process feeds rows ``index`` of ``count``
      equal parts of every batch (default ``(0, 1)``, all rows).
    seed: base seed.
  """

  stateful = False
  eval_splits = ("validation",)
  info: dict = {}

  def __init__(self, make, *, batch_size: int, eval_batch_size: int, eval_batches: int,
               shard: tuple[int, int] = (0, 1), seed: int = 0):
    self.make, self.batch_size, self.seed = make, batch_size, seed
    self.eval_batch_size, self.num_eval_batches = eval_batch_size, eval_batches
    self.shard = shard

  def _draw(self, split: int, index: int, size: int) -> dict:
    # The whole global batch is drawn, so the data do not depend on the shard.
    batch = self.make(np.random.default_rng([self.seed, split, int(index)]), size)
    rows = shard_rows(size, self.shard)
    return {k: v[rows] for k, v in batch.items()}

  def batch(self, index: int) -> dict:
    return self._draw(_TRAIN, index, self.batch_size)

  def eval_batches(self, split: str = "validation") -> Iterator[dict]:
    if split not in self.eval_splits:
      raise ValueError(f"unknown split {split!r}; expected one of {', '.join(self.eval_splits)}")
    for i in range(self.num_eval_batches):
      yield self._draw(_EVAL, i, self.eval_batch_size)


def parity_batch(rng: np.random.Generator, rows: int, seq_len: int) -> dict:
  bits = rng.integers(0, 2, size=(rows, seq_len), dtype=np.int32)
  return {"inputs": bits, "targets": bits.sum(axis=1, dtype=np.int32) % 2}


def adding_batch(rng: np.random.Generator, rows: int, seq_len: int) -> dict:
  lengths = rng.integers(max(2, seq_len // 2), seq_len + 1, size=rows).astype(np.int32)
  values = rng.random((rows, seq_len), dtype=np.float32)
  half = lengths // 2
  first = (rng.random(rows) * half).astype(np.int32)
  second = half + (rng.random(rows) * (lengths - half)).astype(np.int32)
  steps = np.arange(seq_len)[None, :]
  markers = (steps == first[:, None]) | (steps == second[:, None])
  values = np.where(steps < lengths[:, None], values, 0.0).astype(np.float32)
  return {"inputs": np.stack([values, markers.astype(np.float32)], axis=-1),
          "lengths": lengths,
          "targets": np.where(markers, values, 0.0).sum(axis=1).astype(np.float32)}


COPY_SYMBOLS, COPY_DELIMITER = 8, 9


def copy_batch(rng: np.random.Generator, rows: int, seq_len: int, copy_length: int) -> dict:
  s, total = copy_length, seq_len + 2 * copy_length
  symbols = rng.integers(1, COPY_SYMBOLS + 1, size=(rows, s), dtype=np.int32)
  inputs = np.zeros((rows, total), np.int32)
  inputs[:, :s] = symbols
  inputs[:, seq_len + s - 1] = COPY_DELIMITER
  targets = np.zeros((rows, total), np.int32)
  targets[:, -s:] = symbols
  score = np.zeros((rows, total), np.float32)
  score[:, -s:] = 1.0
  return {"inputs": inputs, "targets": targets, "score": score}


def create(config, *, shard: tuple[int, int] = (0, 1), seed: int = 0) -> SyntheticSource:
  """The task ``config.name`` (parity, adding or copy) from a data config.

  Fields: ``seq_len``, ``batch_size``, ``eval_batch_size``, ``eval_batches`` and,
  for copy, ``copy_length``.
  """
  if config.name == "parity":
    make = lambda rng, n: parity_batch(rng, n, config.seq_len)
  elif config.name == "adding":
    make = lambda rng, n: adding_batch(rng, n, config.seq_len)
  elif config.name == "copy":
    make = lambda rng, n: copy_batch(rng, n, config.seq_len, config.copy_length)
  else:
    raise ValueError(f"not a synthetic task: {config.name!r}")
  return SyntheticSource(make, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size,
                         eval_batches=config.eval_batches, shard=shard, seed=seed)
