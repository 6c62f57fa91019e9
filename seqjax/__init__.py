"""seqjax: recurrent sequence models in JAX.

Pure-function cells (:mod:`seqjax.cells`) run by drivers
(:mod:`seqjax.recurrence`); Flax linen layers on top (:mod:`seqjax.nn`);
weights from PyTorch and Keras (:mod:`seqjax.interop`).
"""

import importlib

from seqjax import cells
from seqjax import recurrence
from seqjax.recurrence import associative
from seqjax.recurrence import bidirectional
from seqjax.recurrence import BidirectionalCarry
from seqjax.recurrence import chunked
from seqjax.recurrence import run
from seqjax.recurrence import scan
from seqjax.recurrence import stacked
from seqjax.recurrence import unroll

__version__ = "0.1.0"

# The Flax layers and the importers load on first use, so that the pure-JAX
# core (cells, drivers) imports without Flax, torch or Keras.
_LAZY = ("interop", "nn")


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"seqjax.{name}")
  raise AttributeError(f"module 'seqjax' has no attribute {name!r}")

__all__ = [
    "associative", "bidirectional", "BidirectionalCarry", "cells", "chunked", "interop",
    "nn", "recurrence", "run", "scan", "stacked", "unroll",
]
