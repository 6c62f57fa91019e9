"""Sampling: top-k and top-p filters, greedy, chunked generation, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import decoding


def test_top_k_keeps_exactly_k_even_with_ties():
  logits = jnp.array([[0.5, 2.0, 2.0, 2.0, -1.0],
                      [3.0, 1.0, 4.0, 1.0, 5.0]])
  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_k=2)))
  assert kept.sum(axis=1).tolist() == [2, 2]
  assert kept[0].tolist() == [False, True, True, False, False]  # ties: lower index first
  assert kept[1].tolist() == [False, False, True, False, True]
  np.testing.assert_array_equal(decoding.filter_logits(logits, top_k=5), logits)


def test_top_p_keeps_the_smallest_nucleus():
  probs = jnp.array([[0.05, 0.5, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
  kept = lambda p: np.isfinite(np.asarray(
      decoding.filter_logits(jnp.log(probs), top_p=p))).tolist()
  assert kept(0.5) == [[False, True, False, False], [True, False, False, False]]
  assert kept(0.8) == [[False, True, True, False], [True, False, False, False]]
  assert kept(0.81) == [[False, True, True, True], [True, False, False, False]]
  assert kept(0.99)[1] == [True, True, True, False]


def test_sampling_never_leaves_the_top_k_and_is_greedy_at_temperature_0():
  logits = jax.random.normal(jax.random.key(0), (64, 30)) * 0.3  # flat: all tokens likely
  allowed = np.argsort(-np.asarray(logits), axis=1)[:, :4]
  draws = jax.vmap(lambda k: decoding.sample_logits(k, logits, temperature=2.0, top_k=4))(
      jax.random.split(jax.random.key(1), 200))  # [200, 64]
  draws = np.asarray(draws)
  for row in range(64):
    assert set(draws[:, row]) <= set(allowed[row])
  assert len(set(draws[:, 0])) == 4  # and all four are drawn
  greedy = decoding.sample_logits(jax.random.key(2), logits, temperature=0.0)
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=1))


def _counter_model(vocab=7):
  """A toy model whose next token is likely (last + 1) mod vocab; carry counts steps."""
  def step(params, carry, tokens):
    carry = (0 if carry is None else carry) + tokens.shape[1]
    logits = params * jax.nn.one_hot((tokens[:, -1] + 1) % vocab, vocab)
    return jnp.asarray(carry), logits
  return step


def test_chunked_generation_draws_the_same_sequence():
  step = _counter_model()
  params = jnp.float32(1.5)  # not too peaked: the draws vary
  carry, logits = step(params, None, jnp.zeros((3, 2), jnp.int32))
  key = jax.random.key(7)
  gen = jax.jit(lambda c, l, s, n: decoding.generate(step, params, c, l, key, n, start=s),
                static_argnums=3)
  _, _, whole = gen(carry, logits, 0, 40)
  pieces, c, l = [], carry, logits
  for start in range(0, 40, 8):
    c, l, part = gen(c, l, start, 8)
    pieces.append(part)
  np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
  assert int(c) == 2 + 40                      # the carry went through every step
  assert len(np.unique(np.asarray(whole))) > 1
  _, _, other = gen(carry, logits, 1, 40)      # other positions, other draws
  assert not np.array_equal(other, whole)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=3, top_p=0.5), "give top_k or top_p, not both"),
])
def test_bad_settings_raise(settings, message):
  with pytest.raises(ValueError, match=message):
    decoding.sample_logits(jax.random.key(0), jnp.zeros((1, 4)), **settings)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_gumbel_noise_is_the_noise_generate_adds(temperature):
  """argmax(logits / temperature + noise[i]) is sample_logits's draw at
  position start + i: a sampler adding this noise draws generate's tokens."""
  key, start = jax.random.key(4), 5
  logits = jax.random.normal(jax.random.key(1), (6, 30), jnp.float32)
  noise = decoding.gumbel_noise(key, (6, 30), 12, start=start, temperature=temperature)
  assert noise.shape == (12, 6, 30) and noise.dtype == jnp.float32
  scaled = logits / temperature if temperature else logits
  for i in range(12):
    want = decoding.sample_logits(jax.random.fold_in(key, start + i), logits,
                                  temperature=temperature)
    np.testing.assert_array_equal(jnp.argmax(scaled + noise[i], axis=-1), want)
  if temperature:
    assert len(np.unique(np.asarray(jnp.argmax(scaled + noise, axis=-1)))) > 5
