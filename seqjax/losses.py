"""Loss helpers that return sums and weights, so averages are exact.

Every helper returns ``(total, weight)``: the loss summed over the examples (or
tokens) that count, and how many count. The training step divides the sum over
all devices by the weight over all devices, so a batch split across devices
gives the same mean as the whole batch on one device, even when padding makes
the devices' token counts differ.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

NATS_TO_BITS = 1.0 / math.log(2.0)


def _weights(weights, shape):
  if weights is None:
    return jnp.ones(shape, jnp.float32)
  if jnp.shape(weights) != tuple(shape):
    raise ValueError(f"weights must have shape {tuple(shape)}, got {jnp.shape(weights)}")
  return jnp.asarray(weights, jnp.float32)


def cross_entropy(logits, targets, weights=None):
  """Softmax cross-entropy in nats, summed over the weighted positions.

  Args:
    logits: [..., V] unnormalised log-probabilities (for a sequence, [B, T, V]).
    targets: [...] integer class ids.
    weights: [...] optional; 0 excludes a position (padding, stream boundaries).

  Returns:
    ``(total_nats, weight)``; ``total_nats / weight`` is the mean in nats, and
    ``* NATS_TO_BITS`` converts it to bits.

  Example:
    >>> import jax.numpy as jnp
    >>> total, weight = cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int))
    >>> round(float(total / weight), 4), round(float(total / weight * NATS_TO_BITS), 4)
    (1.3863, 2.0)
  """
  if jnp.shape(logits)[:-1] != jnp.shape(targets):
    raise ValueError(f"logits [..., V] and targets [...] disagree: got shapes "
                     f"{jnp.shape(logits)} and {jnp.shape(targets)}")
  w = _weights(weights, jnp.shape(targets))
  nats = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(nats * w), jnp.sum(w)


def accuracy(logits, targets, weights=None):
  """Correct argmax predictions, summed over the weighted positions: ``(correct, weight)``."""
  w = _weights(weights, jnp.shape(targets))
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * w), jnp.sum(w)


def squared_error(predictions, targets, weights=None):
  """Squared error summed over the weighted positions: ``(total, weight)``."""
  if jnp.shape(predictions) != jnp.shape(targets):
    raise ValueError(f"predictions and targets must have one shape, got "
                     f"{jnp.shape(predictions)} and {jnp.shape(targets)}")
  w = _weights(weights, jnp.shape(targets))
  err = (predictions.astype(jnp.float32) - targets) ** 2
  return jnp.sum(err * w), jnp.sum(w)
