"""Loss helpers: sums and weights against plain NumPy."""

import math

import numpy as np
import pytest

from seqjax import losses


def test_cross_entropy_matches_numpy_and_respects_weights():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7))
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  total, weight = losses.cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(total, (nats * weights).sum(), rtol=1e-5)
  assert float(weight) == weights.sum()
  assert losses.NATS_TO_BITS == pytest.approx(1 / math.log(2))


def test_accuracy_and_squared_error():
  logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
  correct, weight = losses.accuracy(logits, np.array([1, 1, 1]), np.array([1.0, 1.0, 0.0]))
  assert (float(correct), float(weight)) == (1.0, 2.0)
  total, weight = losses.squared_error(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
  assert (float(total), float(weight)) == (5.0, 2.0)


def test_shape_mismatches_raise():
  with pytest.raises(ValueError, match=r"logits \[..., V\] and targets"):
    losses.cross_entropy(np.zeros((2, 3, 4)), np.zeros((2, 4), int))
  with pytest.raises(ValueError, match="weights must have shape"):
    losses.cross_entropy(np.zeros((2, 3, 4)), np.zeros((2, 3), int), np.ones((3,)))
  with pytest.raises(ValueError, match="one shape"):
    losses.squared_error(np.zeros(3), np.zeros(4))
