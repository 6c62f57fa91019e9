"""Optimisers and learning-rate schedules from a config, via optax.

The config is an ``ml_collections.ConfigDict`` (or any object with the same
attributes); :func:`default_config` lists every field with its default:

>>> from seqjax.train import optim
>>> config = optim.default_config()
>>> config.name, config.learning_rate, config.schedule
('adam', 0.001, 'constant')
>>> tx = optim.make_optimizer(config, total_steps=100)

Weight decay applies only to parameters with two or more dimensions (weight
matrices and embeddings); biases, gains and norm scales are never decayed.
``adamw`` decays decoupled from the gradient (Loshchilov & Hutter); for the other
optimisers ``weight_decay`` adds the classic L2 term ``weight_decay * w`` to the
gradient.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "warmup_cosine", "exponential_decay")


def default_config() -> ml_collections.ConfigDict:
  """Every optimiser field, with its default."""
  return ml_collections.ConfigDict(dict(
      name="adam",               # one of OPTIMIZERS
      learning_rate=1e-3,        # peak rate of the schedule
      schedule="constant",       # one of SCHEDULES
      warmup_steps=0,            # linear warm-up from 0 (warmup_cosine)
      decay_steps=0,             # cosine length / exponential period; 0 = the run's steps
      end_learning_rate=0.0,     # where the cosine ends
      decay_rate=0.1,            # exponential: rate *= decay_rate every decay_steps
      momentum=0.9,              # sgd and rmsprop; 0 turns it off
      nesterov=False,            # sgd
      b1=0.9,                    # adam, adamw
      b2=0.999,                  # adam, adamw
      eps=1e-8,
      weight_decay=0.0,          # matrices only (see the module docstring)
      clip_norm=1.0,             # clip_by_global_norm; 0 turns it off
  ))


def decay_mask(params):
  """True for the leaves weight decay applies to: those with ndim >= 2."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule named by ``config.schedule``.

  Raises:
    ValueError: unknown schedule name, or steps that do not fit.
  """
  peak = config.learning_rate
  decay_steps = config.decay_steps or total_steps
  if config.schedule == "constant":
    return optax.constant_schedule(peak)
  if config.schedule == "warmup_cosine":
    if config.warmup_steps >= decay_steps:
      raise ValueError(f"optimizer.warmup_steps ({config.warmup_steps}) must be "
                       f"less than the decay steps ({decay_steps})")
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, config.warmup_steps, decay_steps, config.end_learning_rate)
  if config.schedule == "exponential_decay":
    return optax.exponential_decay(peak, decay_steps, config.decay_rate)
  raise ValueError(f"unknown optimizer.schedule {config.schedule!r}; expected one "
                   f"of {', '.join(SCHEDULES)}")


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """Gradient clipping, then the optimiser named by ``config.name``.

  Args:
    config: optimiser fields as in :func:`default_config`.
    total_steps: length of the run (the default decay length).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Raises:
    ValueError: an unknown optimiser or schedule name.
  """
  if config.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer.name {config.name!r}; expected one of "
                     f"{', '.join(OPTIMIZERS)}")
  lr = make_schedule(config, total_steps)
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if config.weight_decay and config.name != "adamw":
    # Coupled L2: the decay term joins the gradient before the optimiser's scaling.
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
  momentum = config.momentum or None
  if config.name == "adam":
    parts.append(optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps))
  elif config.name == "adamw":
    parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
  elif config.name == "sgd":
    parts.append(optax.sgd(lr, momentum=momentum, nesterov=config.nesterov))
  else:
    parts.append(optax.rmsprop(lr, eps=config.eps, momentum=momentum))
  return optax.chain(*parts)
