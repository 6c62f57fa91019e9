"""A character language model (char-rnn) with the RNN regularisers of AWD-LSTM.

    characters --embedding--> stacked LSTM / GRU / Elman --linear--> logits over characters

Trained on windows of a character stream (:mod:`seqjax.data.text`) with the
carry kept from one window to the next (truncated BPTT). Every regulariser is
a config switch, off by default and always off at evaluation:

- ``dropout_input``, ``dropout_hidden``, ``dropout_output``: variational
  dropout (Gal & Ghahramani 2016): one mask per sequence, shared by all time
  steps, on the embedded characters, between layers and on the last layer's
  outputs;
- ``dropout_embedding``: whole-character dropout: rows of the embedding matrix
  are zeroed, so every occurrence of a dropped character in the window reads as
  zeros (Gal & Ghahramani 2016, Merity et al. 2018);
- ``weight_drop``: DropConnect on the recurrent matrices ``w_h`` (Wan et al.
  2013), one mask per window, shared by every row and step;
- ``ar`` and ``tar``: activation regularisation, ``ar * mean(h_t²)`` on the
  dropped outputs of the last layer, and temporal activation regularisation,
  ``tar * mean((h_t - h_{t-1})²)`` on its undropped outputs (Merity et al. 2017).

``tie_weights`` uses the embedding matrix as the output layer (Press & Wolf
2017; Inan et al. 2017), which needs ``embed_size == hidden_size``.

The vocabulary (the data source's ``info``) sizes the embedding and the output:
one id per character of the training text plus one for any other character.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from seqjax import cells as cells_lib
from seqjax import decoding, fused, losses, native
from seqjax.data import text
from seqjax.nn import StackedRNN

CELLS = {"elman": cells_lib.Elman, "lstm": cells_lib.LSTM, "gru": cells_lib.GRU,
         "mingru": cells_lib.MinGRU}
_RATES = ("dropout_input", "dropout_hidden", "dropout_output", "dropout_embedding",
          "weight_drop")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="charlm",
      cell="lstm",              # one of CELLS
      hidden_size=256,
      num_layers=2,
      embed_size=64,
      tie_weights=False,        # output layer = embedding^T (embed_size == hidden_size)
      dropout_input=0.0,        # variational, on the embedded characters
      dropout_hidden=0.0,       # variational, between layers
      dropout_output=0.0,       # variational, on the last layer's outputs
      dropout_embedding=0.0,    # whole characters (rows of the embedding)
      weight_drop=0.0,          # DropConnect on the recurrent matrices
      ar=0.0,                   # ar * mean(h^2), dropped last-layer outputs
      tar=0.0,                  # tar * mean((h_t - h_{t-1})^2), undropped
      matmul_dtype="",          # "bfloat16": recurrent-layer matmuls in bf16 ("": f32);
                                # "int8": inference only (seqjax sample/eval --matmul-dtype)
      method="scan",            # driver: scan | unroll | associative (mingru)
  ))


def shrink_for_tests(config: ml_collections.ConfigDict) -> None:
  """Makes a char-LM experiment's config tiny (its ``get_config(quick=True)``).

  A 20,000-character slice read in rows of 4 x 16, a 16-wide model, and no
  learning-rate warm-up: the first step must move every parameter. The
  experiment then shrinks its training with ``loop.quick_train``.
  """
  config.data.update(dict(max_chars=20000, batch_size=4, window=16, eval_batch_size=2))
  config.model.update(dict(hidden_size=16, embed_size=8))
  config.optimizer.warmup_steps = 0


class CharLM(nn.Module):
  """See the module docstring; build it with :func:`create`.

  Called as ``apply(variables, batch, carry, train=...) -> (carry, outputs)``
  with ``batch["inputs"] [B, T]`` character ids (and optionally
  ``batch["resets"] [B, T]``); ``outputs["logits"]`` is [B, T, V], plus
  per-step penalties ``"ar"`` and ``"tar"`` [B, T] when training with them.
  """

  cells: tuple
  vocab_size: int
  embed_size: int
  tie_weights: bool = False
  dropout_input: float = 0.0
  dropout_hidden: float = 0.0
  dropout_output: float = 0.0
  dropout_embedding: float = 0.0
  weight_drop: float = 0.0
  ar: float = 0.0
  tar: float = 0.0
  method: str = "scan"

  @nn.compact
  def __call__(self, batch: dict, carry: Any = None, *, train: bool = False):
    tokens = batch["inputs"]  # [B, T]
    resets = batch.get("resets")
    table = self.param("embed", nn.initializers.normal(stddev=1.0),
                       (self.vocab_size, self.embed_size))  # [V, E]
    # broadcast_dims=(1,): one draw per row, shared along axis 1. For the
    # table that drops whole characters; for [B, T, ...] activations it is one
    # mask per sequence for all T steps (variational).
    inputs = nn.Dropout(self.dropout_embedding, broadcast_dims=(1,), name="embedding_dropout")(
        table, deterministic=not train)
    xs = jnp.take(inputs, tokens, axis=0)  # [B, T, E]
    xs = nn.Dropout(self.dropout_input, broadcast_dims=(1,))(xs, deterministic=not train)
    carry, ys = StackedRNN(self.cells, dropout_rate=self.dropout_hidden, variational=True,
                           weight_drop=self.weight_drop, method=self.method, name="rnn")(
                               xs, carry, resets=resets, deterministic=not train)  # [B, T, H]
    dropped = nn.Dropout(self.dropout_output, broadcast_dims=(1,))(ys, deterministic=not train)
    if self.tie_weights:
      bias = self.param("head_bias", nn.initializers.zeros, (self.vocab_size,))
      logits = dropped @ table.T + bias  # [B, T, V]
    else:
      logits = nn.Dense(self.vocab_size, name="head")(dropped)
    outputs = {"logits": logits}
    if train and self.ar:
      outputs["ar"] = jnp.mean(dropped ** 2, axis=-1)  # [B, T]
    if train and self.tar:
      step = jnp.mean((ys[:, 1:] - ys[:, :-1]) ** 2, axis=-1)  # [B, T-1]
      if resets is not None:  # no penalty across a stream boundary
        step = jnp.where(resets[:, 1:], 0.0, step)
      outputs["tar"] = jnp.pad(step, ((0, 0), (1, 0)))
    return carry, outputs


def create(config, info: dict) -> CharLM:
  """The model a ``model`` config describes, for the vocabulary in ``info``.

  Raises:
    ValueError: an unknown cell, a rate outside [0, 1), a tied output layer of
      the wrong size, or an ``info`` without a vocabulary.
  """
  if config.cell not in CELLS:
    raise ValueError(f"unknown model.cell {config.cell!r}; expected one of "
                     f"{', '.join(CELLS)}")
  for name in _RATES:
    if not 0.0 <= config[name] < 1.0:
      raise ValueError(f"model.{name} must be in [0, 1), got {config[name]}")
  if config.tie_weights and config.embed_size != config.hidden_size:
    raise ValueError(f"model.tie_weights needs model.embed_size == model.hidden_size, got "
                     f"{config.embed_size} and {config.hidden_size}")
  vocab = vocabulary(info)
  cell = CELLS[config.cell](config.hidden_size, matmul_dtype=config.matmul_dtype or None)
  cells = (cell,) * config.num_layers
  return CharLM(cells=cells, vocab_size=vocab.size, embed_size=config.embed_size,
                tie_weights=config.tie_weights, **{k: config[k] for k in _RATES},
                ar=config.ar, tar=config.tar, method=config.method)


def loss(config, outputs, batch):
  """``(objective, weight, metrics)``: cross-entropy plus the AR/TAR penalties.

  The metrics report the cross-entropy alone, in nats (``loss``) and bits per
  character, and next-character accuracy.
  """
  targets, weights = batch["targets"], batch.get("weights")
  total, weight = losses.cross_entropy(outputs["logits"], targets, weights)
  w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
  objective = total
  for name in ("ar", "tar"):  # present in training mode only
    if name in outputs:
      objective = objective + config[name] * jnp.sum(outputs[name] * w)
  correct, _ = losses.accuracy(outputs["logits"], targets, weights)
  return objective, weight, {"loss": (total, weight),
                             "bits": (total * losses.NATS_TO_BITS, weight),
                             "accuracy": (correct, weight)}


def vocabulary(info: dict) -> text.Vocabulary:
  """The vocabulary a text source recorded in its ``info``."""
  if "vocab" not in info:
    raise ValueError("the char-LM needs a text data source (its info has no 'vocab')")
  return text.Vocabulary(info["vocab"])


def decode_step(module: CharLM):
  """``step(params, carry, tokens [B, P]) -> (carry, logits [B, V])`` for decoding.

  Reads P >= 1 characters (a prompt, or the last sample) from ``carry``
  (``None``: zeros) and returns the logits of the next one. The
  unknown-character id is never proposed: its logit is -inf.
  """

  def step(params, carry, tokens):
    carry, outputs = module.apply({"params": params}, {"inputs": tokens}, carry, train=False)
    logits = outputs["logits"][:, -1]  # [B, V]
    return carry, logits.at[:, -1].set(-jnp.inf)

  return step


def generate(module: CharLM, params, carry, logits, key, length: int, *, start: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """:func:`seqjax.decoding.generate` on :func:`decode_step`, faster where it can be.

  A stack of LSTMs (or of reset-after GRUs) with the same hidden size,
  sampled with a temperature (or greedily, without top-k or top-p), draws
  all ``length`` tokens in one call of the native kernel
  (:func:`seqjax.native.lstm_sample` or :func:`seqjax.native.gru_sample`, in
  the cells' ``matmul_dtype``: float32, bfloat16 or int8), where
  :func:`seqjax.native.sample_usable` says it runs here and pays: no step
  leaves the kernel, and each core keeps its share of the weights in its
  cache. It adds the noise :func:`seqjax.decoding.generate` adds, so it draws
  the same tokens (unless two logits round the other way: float32 sums in
  another order). A hidden size that is not a whole number of the kernel's
  registers (16 units) runs on :func:`seqjax.native.padded_units` units, the
  added ones zero throughout (:func:`seqjax.fused.widen`). Anything else runs
  :func:`seqjax.decoding.generate`.

  Args and returns: as :func:`seqjax.decoding.generate` (``carry`` from
  ``decode_step``, not ``None``).
  """
  decoding.check_settings(temperature, top_k, top_p)
  stack = module.cells
  lstm = isinstance(stack[0], cells_lib.LSTM)
  gru = isinstance(stack[0], cells_lib.GRU) and stack[0].reset_after
  same = all(c == stack[0] for c in stack)
  if same and (lstm or gru) and not top_k and top_p == 1.0 and carry is not None:
    layers = [params["rnn"][f"layer_{l}"] for l in range(len(stack))]
    if module.tie_weights:
      head = (params["embed"].T, params["head_bias"])
    else:
      head = (params["head"]["kernel"], params["head"]["bias"])
    noise = decoding.gumbel_noise(key, logits.shape, length, start=start,
                                  temperature=temperature)
    noise = noise.at[..., -1].set(-jnp.inf)  # the unknown character, as decode_step bans it
    matmul_dtype = stack[0].matmul_dtype
    table = stack[0].project(layers[0], params["embed"])  # [V, G H]
    states = tuple((c.h, c.c) for c in carry) if lstm else tuple(carry)
    gates, hidden = (4 if lstm else 3), layers[0]["w_h"].shape[0]
    pad = native.padded_units(hidden) - hidden
    if pad:  # whole registers for the kernel, the added units zero (fused.widen)
      table = fused.pad_units(table, gates, pad)
      layers = [fused.widen(p, gates, pad, input_pad=pad * (l > 0)) for l, p in enumerate(layers)]
      head = (jnp.pad(head[0], ((0, pad), (0, 0))), head[1])
      states = fused.pad_carry(states, pad)
    if native.sample_usable(table, layers, head, states, noise, matmul_dtype):
      sample = native.lstm_sample if lstm else native.gru_sample
      states, logits, tokens = sample(table, layers, head, states, logits, noise, temperature,
                                      matmul_dtype)
      states = [tuple(a[:, :hidden] for a in s) if lstm else s[:, :hidden] for s in states]
      carry = tuple(cells_lib.LSTMCarry(h, c) for h, c in states) if lstm else tuple(states)
      return carry, logits.at[:, -1].set(-jnp.inf), tokens
  return decoding.generate(decode_step(module), params, carry, logits, key, length, start=start,
                           temperature=temperature, top_k=top_k, top_p=top_p)
