"""seqjax: recurrent sequence models in JAX.

Pure-function cells (:mod:`seqjax.cells`) run by drivers
(:mod:`seqjax.recurrence`); Flax linen layers on top (:mod:`seqjax.nn`);
weights from PyTorch and Keras (:mod:`seqjax.interop`).
"""

from seqjax import cells
from seqjax import nn
from seqjax import recurrence
from seqjax.recurrence import associative
from seqjax.recurrence import bidirectional
from seqjax.recurrence import BidirectionalCarry
from seqjax.recurrence import run
from seqjax.recurrence import scan
from seqjax.recurrence import stacked
from seqjax.recurrence import unroll

__version__ = "0.1.0"

__all__ = [
    "associative", "bidirectional", "BidirectionalCarry", "cells", "nn",
    "recurrence", "run", "scan", "stacked", "unroll",
]
