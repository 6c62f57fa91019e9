"""The data-parallel training and evaluation steps, generic over the zoo.

A step takes a model (a Flax module called as ``apply(variables, batch, carry,
train=...) -> (carry, outputs)``) and its ``loss(outputs, batch) -> (total,
weight, metrics)``; see :mod:`seqjax.models`. Both steps are pmapped over the
devices by :mod:`seqjax.train.parallel`: every argument and result carries a
leading device axis.

Averaging is exact. Each device divides its summed loss by the mean weight over
devices, so the mean of the devices' gradients is the gradient of the global
mean loss, however the weight (tokens, unpadded steps) falls across devices.
Metrics come back as ``(sum, weight)`` pairs summed over devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from seqjax.train import parallel
from seqjax.train.state import TrainState


def _positive(weight):
  return jnp.where(weight > 0, weight, 1.0)


def train_step_fn(model, loss_fn: Callable) -> Callable:
  """The unmapped step: ``(state, batch) -> (state, metrics)`` on one device.

  The carry in ``state`` (truncated BPTT) enters under ``stop_gradient``: the
  forward pass continues the streams, the backward pass stops at the window.
  Step ``s`` on device ``d`` draws dropout from ``fold_in(fold_in(rng, s), d)``.
  """

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                             parallel.device_index())
    carry_in = jax.lax.stop_gradient(state.carry)

    def objective(params):
      carry, outputs = model.apply({"params": params}, batch, carry_in, train=True,
                                   rngs={"dropout": rng})
      total, weight, metrics = loss_fn(outputs, batch)
      # Summed loss over the mean weight: pmean of the gradients below is then
      # the gradient of (sum over devices) / (weight over devices).
      return total / _positive(parallel.pmean(weight)), (carry, metrics)

    grads, (carry, metrics) = jax.grad(objective, has_aux=True)(state.params)
    grads = parallel.pmean(grads)
    new_state = state.apply_gradients(grads).replace(
        data_position=state.data_position + 1,
        carry=carry if state.carry is not None else None)
    metrics = dict(metrics, grad_norm=(optax.tree.norm(grads), jnp.float32(1.0)))
    return new_state, parallel.psum(metrics)

  return step


def make_train_step(model, loss_fn: Callable) -> Callable:
  """:func:`train_step_fn` pmapped over the devices; the input state is donated."""
  return parallel.pmap(train_step_fn(model, loss_fn), donate_argnums=(0,))


def make_eval_step(model, loss_fn: Callable) -> Callable:
  """``(params, batch, carry) -> (carry, metrics)``, pmapped; no dropout."""

  def step(params, batch, carry):
    carry, outputs = model.apply({"params": params}, batch, carry, train=False)
    _, _, metrics = loss_fn(outputs, batch)
    return carry, parallel.psum(metrics)

  return parallel.pmap(step)


def means(metric_sums: dict) -> dict:
  """``{name: sum / weight}`` from ``{name: (sum, weight)}`` (host values)."""
  return {name: float(total) / float(weight) if float(weight) else float("nan")
          for name, (total, weight) in metric_sums.items()}
