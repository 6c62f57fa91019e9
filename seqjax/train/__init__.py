"""Training: train state, optimisers, data-parallel steps, truncated BPTT,
checkpoints and the training loop.

Layering: ``state``, ``optim``, ``parallel`` and ``tbptt`` stand alone; ``step``
builds on ``state`` and ``parallel``; ``checkpoint`` is the only Orbax user;
``loop`` ties them to a model, a data source and a workdir.
"""
