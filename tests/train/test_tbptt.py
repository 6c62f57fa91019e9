"""Truncated BPTT: stream windows, and the carry across them."""

import functools

import jax
import numpy as np
import pytest

from seqjax.models import classifier
from seqjax.data import streams


def _streams(seed=0, vocab=11):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, size=n) for n in (37, 5, 61, 23, 90, 14)]


def test_rows_continue_their_streams_across_batches():
  tokens, starts = streams.concatenate(_streams())
  batcher = streams.StreamBatcher(tokens, starts, batch_size=3, window=7, seed=1)
  previous = None
  for i in range(batcher.windows_per_epoch):
    batch = batcher.batch(i)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    if previous is None:
      assert batch["resets"][:, 0].all()   # rows start afresh each epoch
    else:
      np.testing.assert_array_equal(batch["inputs"][:, 0], previous["targets"][:, -1])
    previous = batch


def test_resets_and_weights_mark_stream_boundaries():
  parts = [np.full(n, k + 1) for k, n in enumerate((9, 12, 7, 30))]  # stream k holds k+1
  tokens, starts = streams.concatenate(parts)
  batcher = streams.StreamBatcher(tokens, starts, batch_size=2, window=4, seed=0)
  for i in range(batcher.windows_per_epoch):
    b = batcher.batch(i)
    changes = b["inputs"][:, 1:] != b["inputs"][:, :-1]          # a new stream begins
    np.testing.assert_array_equal(b["resets"][:, 1:], changes)
    np.testing.assert_array_equal(b["weights"] == 0, b["targets"] != b["inputs"])


def test_batches_are_a_pure_function_of_the_index_and_shards_partition_rows():
  tokens, starts = streams.concatenate(_streams())
  whole = streams.StreamBatcher(tokens, starts, batch_size=4, window=5, seed=3)
  halves = [streams.StreamBatcher(tokens, starts, batch_size=4, window=5, seed=3,
                                shard=(p, 2)) for p in range(2)]
  for i in (0, 3, whole.windows_per_epoch + 2):   # the second epoch too
    joined = {k: np.concatenate([h.batch(i)[k] for h in halves]) for k in whole.batch(i)}
    for key, value in whole.batch(i).items():
      np.testing.assert_array_equal(value, joined[key])
      np.testing.assert_array_equal(value, whole.batch(i)[key])
  with pytest.raises(ValueError, match="does not split into 3 processes"):
    streams.StreamBatcher(tokens, starts, batch_size=4, window=5, shard=(0, 3))


def test_epochs_shift_the_windows():
  tokens, starts = streams.concatenate(_streams())
  batcher = streams.StreamBatcher(tokens, starts, batch_size=2, window=8, seed=0)
  firsts = {int(batcher.batch(e * batcher.windows_per_epoch)["inputs"][0, 0])
            for e in range(12)}
  assert len(firsts) > 1


def test_eval_counts_every_target_once():
  tokens, starts = streams.concatenate(_streams())
  batcher = streams.StreamBatcher(tokens, starts, batch_size=3, window=7)
  pairs = []
  for b in batcher.eval_batches():
    keep = b["weights"] > 0
    pairs += list(zip(b["inputs"][keep], b["targets"][keep]))
  expected = [(tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1) if not starts[i + 1]]
  assert sorted(pairs) == sorted(expected)


def test_too_short_and_malformed_streams_raise():
  with pytest.raises(ValueError, match="too few"):
    streams.StreamBatcher(np.arange(20), batch_size=4, window=5)
  with pytest.raises(ValueError, match="1-D integer"):
    streams.StreamBatcher(np.zeros((4, 5), int), batch_size=1, window=1)
  with pytest.raises(ValueError, match="no non-empty streams"):
    streams.concatenate([[], []])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_window_carry_equals_one_long_unroll(cell):
  """Carrying the state window to window reproduces the forward pass over whole rows."""
  config = classifier.default_config()
  config.update(dict(cell=cell, hidden_size=16, num_layers=2, vocab_size=11,
                     output_size=11, head="every"))
  model = classifier.create(config)
  tokens, starts = streams.concatenate(_streams())
  batcher = streams.StreamBatcher(tokens, starts, batch_size=2, window=6)
  windows = [batcher.batch(i) for i in range(batcher.windows_per_epoch)]
  whole = {k: np.concatenate([w[k] for w in windows], axis=1) for k in windows[0]}
  variables = model.init(jax.random.PRNGKey(0), windows[0], None)
  apply = jax.jit(functools.partial(model.apply, variables))

  carry_long, outputs_long = apply(whole, None)
  carry, outputs = None, []
  for window in windows:
    carry, out = apply(window, carry)
    outputs.append(out)
  np.testing.assert_allclose(np.concatenate(outputs, axis=1), outputs_long, rtol=1e-5,
                             atol=1e-6)
  for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_long)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The streams' boundaries inside the rows did reset the carry.
  assert whole["resets"][:, 1:].any()
