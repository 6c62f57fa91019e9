"""Flax linen layers over :mod:`seqjax.cells` and :mod:`seqjax.recurrence`."""

from seqjax.nn.rnn import Bidirectional
from seqjax.nn.rnn import RNN
from seqjax.nn.rnn import StackedRNN

__all__ = ["Bidirectional", "RNN", "StackedRNN"]
