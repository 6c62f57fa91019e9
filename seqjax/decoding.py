"""Jitted sampling from an autoregressive model: temperature, top-k, top-p, greedy.

The model is one function, ``step(params, carry, tokens [B, P]) -> (carry,
logits [B, V])``: it reads P tokens (a prompt, or the last sample) and returns
the logits of the next one. :func:`generate` runs it in one ``lax.scan`` that
samples a token, feeds it back, and repeats.

The key of the token at position ``i`` is ``fold_in(key, i)``, so a sequence
drawn in one call or in several chunks (to stream text as it comes) is the
same sequence: same key, same tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Step = Callable[[Any, Any, Array], tuple[Any, Array]]


def check_settings(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
  """Raises ``ValueError`` for settings :func:`sample_logits` cannot use."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
  if top_k and top_p < 1.0:
    raise ValueError("give top_k or top_p, not both")


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """``logits [..., V]`` with -inf outside the top k, or outside the nucleus.

  Args:
    top_k: keep exactly the k largest logits (ties broken by lower index); 0: all.
    top_p: keep the smallest set of most likely tokens whose probability
      reaches ``top_p`` (Holtzman et al. 2020); 1.0: all.

  Example:
    >>> import jax.numpy as jnp
    >>> filter_logits(jnp.array([1.0, 3.0, 2.0, 0.0]), top_k=2).tolist()
    [-inf, 3.0, 2.0, -inf]
    >>> filter_logits(jnp.log(jnp.array([0.1, 0.6, 0.3])), top_p=0.8).tolist()[0]
    -inf
  """
  check_settings(1.0, top_k, top_p)
  vocab = logits.shape[-1]
  if top_k and top_k < vocab:
    _, index = jax.lax.top_k(logits, top_k)  # [..., k]
    keep = jnp.any(jax.nn.one_hot(index, vocab, dtype=jnp.bool_), axis=-2)  # [..., V]
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    # A token stays if the tokens ranked above it hold less than top_p.
    keep_ranked = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = jnp.take_along_axis(keep_ranked, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_logits(key: Array, logits: Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """One token per row of ``logits [B, V]``: int32 [B].

  ``temperature=0`` is greedy (argmax); otherwise the logits are divided by the
  temperature, filtered (:func:`filter_logits`) and sampled.
  """
  check_settings(temperature, top_k, top_p)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def gumbel_noise(key: Array, shape: tuple[int, int], length: int, *, start: int = 0,
                 temperature: float = 1.0) -> Array:
  """The noise :func:`generate` adds to the logits of positions ``start ...
  start + length - 1``: ``[length, B, V]`` float32, for logits ``shape = (B, V)``.

  :func:`sample_logits` draws ``argmax(logits / temperature + noise)``: Gumbel
  noise from ``fold_in(key, position)``, as ``jax.random.categorical`` draws
  it, or zeros when greedy (``temperature`` 0). A sampler that adds this noise
  itself (the native char-LM sampler) draws the tokens :func:`generate` draws.
  """
  if temperature == 0:
    return jnp.zeros((length, *shape), jnp.float32)
  positions = start + jnp.arange(length)
  return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i), shape,
                                              jnp.float32))(positions)


def generate(step: Step, params, carry, logits: Array, key: Array, length: int, *,
             start: int = 0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> tuple[Any, Array, Array]:
  """Samples ``length`` tokens, feeding each back into ``step``.

  Args:
    step: the model, ``step(params, carry, tokens [B, 1]) -> (carry, logits [B, V])``.
    params: passed to ``step`` (an argument, so jit does not bake it in).
    carry, logits: the state after the tokens so far, and the next token's
      logits [B, V] (from priming ``step`` on a prompt).
    key: the sequence's key; position ``i`` draws with ``fold_in(key, i)``.
    length: tokens to draw (static).
    start: position of the first token drawn here (for chunked generation).
    temperature, top_k, top_p: as in :func:`sample_logits`.

  Returns:
    ``(carry, logits, tokens [B, length])``: pass the first two back, with
    ``start + length``, to continue the same sequence.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> def step(params, carry, tokens):   # a toy model: next token = last + 1
    ...   return carry, jax.nn.one_hot((tokens[:, -1] + 1) % 5, 5) * 50.0
    >>> _, logits = step(None, None, jnp.array([[0]]))
    >>> _, _, tokens = generate(step, None, None, logits, jax.random.key(0), 6)
    >>> tokens.tolist()
    [[1, 2, 3, 4, 0, 1]]
  """
  check_settings(temperature, top_k, top_p)

  def body(state, position):
    carry, logits = state
    token = sample_logits(jax.random.fold_in(key, position), logits,
                          temperature=temperature, top_k=top_k, top_p=top_p)
    carry, logits = step(params, carry, token[:, None])
    return (carry, logits), token

  (carry, logits), tokens = jax.lax.scan(body, (carry, logits),
                                         start + jnp.arange(length))
  return carry, logits, tokens.T
