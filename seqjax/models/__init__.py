"""The model zoo. Every model module has the same surface, so the training
loop never special-cases a model:

- ``create(config, info) -> flax.linen.Module``, where ``info`` is the data
  source's ``info`` dict (a text source's vocabulary, say); the module is
  called as ``module.apply(variables, batch, carry, train=bool) -> (carry,
  outputs)``, where ``batch`` is a dict of arrays from a data source and
  ``carry`` the recurrent state to start from (``None``: zeros).
- ``loss(config, outputs, batch) -> (total, weight, metrics)``: the training
  objective summed over what counts, how much counts, and a dict of ``(sum,
  weight)`` pairs to report (see :mod:`seqjax.losses`); ``metrics["loss"]`` is
  the quantity a run watches for divergence.

A model that generates tokens also has ``decode_step(module) -> step(params,
carry, tokens [B, P]) -> (carry, logits [B, V])`` (read P tokens, give the
next one's logits) and ``vocabulary(info)``; ``seqjax sample`` needs both (see
:mod:`seqjax.decoding`). It may add ``generate(module, params, carry, logits,
key, length, **settings)``: :func:`seqjax.decoding.generate` on its
``decode_step``, the same tokens drawn faster (the char-LM's native sampler),
which ``seqjax sample`` then calls instead.

Adding a model is adding a module and a line in :data:`MODELS`.
"""

from __future__ import annotations

import importlib

MODELS = {
    "charlm": "seqjax.models.charlm",
    "classifier": "seqjax.models.classifier",
}


def get(name: str):
  """The model module registered as ``name``.

  Raises:
    ValueError: an unknown model name.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; expected one of {', '.join(sorted(MODELS))}")
  return importlib.import_module(MODELS[name])
