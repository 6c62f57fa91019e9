"""Input pipelines: every source yields dicts of NumPy arrays, batch by batch.

A source has:

- ``batch(index)``: training batch ``index``, a pure function of the index;
- ``eval_splits``: the names of its evaluation splits, the first being the one
  the training loop evaluates periodically (and ranks checkpoints by);
- ``eval_batches(split)``: the whole of one evaluation split, once;
- ``stateful``: True when consecutive batches continue the same streams, so the
  training step carries the recurrent state across them (truncated BPTT; see
  :mod:`seqjax.data.streams`);
- ``info``: a JSON-serialisable dict the model is built from and that is saved
  with every checkpoint (a text source's vocabulary; ``{}`` for most).

:func:`create` builds the source a data config names.
"""

from __future__ import annotations

import importlib

# name -> "module:factory", factory(config, shard=(index, count), seed=int).
# A new dataset adds a line here; modules load on first use. A factory itself
# (not its "module:factory" name) also works, for sources registered at run time.
SOURCES = {
    "parity": "seqjax.data.synthetic:create",
    "adding": "seqjax.data.synthetic:create",
    "copy": "seqjax.data.synthetic:create",
    "text": "seqjax.data.text:create",
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
  factory = SOURCES[config.name]
  if isinstance(factory, str):
    module, name = factory.split(":")
    factory = getattr(importlib.import_module(module), name)
  return factory(config, shard=shard, seed=seed)
