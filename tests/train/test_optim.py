"""Optimiser factory: every name and schedule, clipping and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.train import optim


def _params():
  return {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
          "norm": {"scale": jnp.ones((4,))}}


def _config(**fields):
  config = optim.default_config()
  config.update(fields)
  return config


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_every_optimizer_and_schedule_updates_every_leaf(name, schedule):
  tx = optim.make_optimizer(_config(name=name, schedule=schedule, warmup_steps=2), 10)
  params = _params()
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for _ in range(3):  # warm-up starts at rate 0, so take a few steps
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for before, after in zip(jax.tree.leaves(_params()), jax.tree.leaves(params)):
    assert not np.allclose(before, after)


def test_unknown_names_raise_with_the_choices():
  with pytest.raises(ValueError, match=r"unknown optimizer.name 'adamx'.*adam, adamw, sgd"):
    optim.make_optimizer(_config(name="adamx"), 10)
  with pytest.raises(ValueError, match=r"unknown optimizer.schedule 'cosine'"):
    optim.make_optimizer(_config(schedule="cosine"), 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_optimizer(_config(schedule="warmup_cosine", warmup_steps=10), 10)


def test_schedules_match_their_formulas():
  cosine = optim.make_schedule(
      _config(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=10,
              end_learning_rate=0.1), total_steps=110)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-6)
  exp = optim.make_schedule(_config(schedule="exponential_decay", learning_rate=2.0,
                                    decay_steps=10, decay_rate=0.5), total_steps=100)
  np.testing.assert_allclose([exp(0), exp(10), exp(25)], [2.0, 1.0, 2.0 * 0.5 ** 2.5],
                             rtol=1e-6)
  const = optim.make_schedule(_config(learning_rate=0.3), total_steps=100)
  assert float(const(0)) == float(const(99)) == pytest.approx(0.3)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_spares_biases_and_norm_scales(name):
  tx = optim.make_optimizer(_config(name=name, weight_decay=0.1, momentum=0.0,
                                    clip_norm=0.0), 10)
  params = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert np.all(np.asarray(updates["dense"]["kernel"]) < 0)   # decayed toward 0
  assert not np.any(updates["dense"]["bias"])                  # not decayed
  assert not np.any(updates["norm"]["scale"])


def test_global_norm_clipping_bounds_the_update():
  tx = optim.make_optimizer(_config(name="sgd", learning_rate=1.0, momentum=0.0,
                                    clip_norm=2.0), 10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 2.0, rtol=1e-6)
