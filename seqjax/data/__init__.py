"""Input pipelines: every source yields dicts of NumPy arrays, batch by batch.

A source has ``batch(index)`` (training batch ``index``, a pure function of the
index), ``eval_batches()`` (the whole evaluation split, once) and ``stateful``
(True when consecutive batches continue the same streams, so the training step
carries the recurrent state across them; see :mod:`seqjax.train.tbptt`).
:func:`create` builds the source a data config names.
"""

from __future__ import annotations

from seqjax.data import synthetic

# name -> factory(config, shard=(index, count), seed=int); a new dataset adds a line here.
SOURCES = {
    "parity": synthetic.create,
    "adding": synthetic.create,
    "copy": synthetic.create,
}


def create(config, *, shard: tuple[int, int] = (0, 1), seed: int = 0):
  """The source named by ``config.name``, feeding part ``shard = (index, count)``
  of every batch (one part per process).

  Raises:
    ValueError: an unknown dataset name.
  """
  if config.name not in SOURCES:
    raise ValueError(f"unknown data.name {config.name!r}; expected one of "
                     f"{', '.join(sorted(SOURCES))}")
  return SOURCES[config.name](config, shard=shard, seed=seed)
