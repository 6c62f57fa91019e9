"""Training: train state, optimisers, data-parallel steps, truncated BPTT,
checkpoints and the training loop.

Truncated BPTT is two halves: :mod:`seqjax.data.streams` cuts long streams into
windows that continue row by row, and the step carries the recurrent state
from one window into the next (``TrainState.carry``).

Layering: ``state``, ``optim`` and ``parallel`` stand alone; ``step``
builds on ``state`` and ``parallel``; ``checkpoint`` is the only Orbax user;
``loop`` ties them to a model, a data source and a workdir.
"""
