"""A recurrent network that reads a sequence and predicts per sequence or per step.

    inputs --(embedding, for token inputs)--> stacked RNN --> dense head

``head="last"`` reads the top layer's hidden state at each sequence's own last
step (many-to-one: parity, the adding problem); ``head="every"`` predicts at
every step (many-to-many: the copy task). ``loss`` is ``cross_entropy`` over
``output_size`` classes or ``mse`` on one output. The parity, adding and copy
experiments all use this model with different configs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from seqjax import cells as cells_lib
from seqjax.nn import StackedRNN
from seqjax import losses

CELLS = {"elman": cells_lib.Elman, "lstm": cells_lib.LSTM, "gru": cells_lib.GRU,
         "mingru": cells_lib.MinGRU}
HEADS = ("last", "every")
LOSSES = ("cross_entropy", "mse")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="classifier",
      cell="lstm",            # one of CELLS
      hidden_size=64,
      num_layers=1,
      vocab_size=0,           # > 0: inputs are token ids, embedded; 0: float features
      embed_size=16,
      output_size=2,          # classes (cross_entropy) or 1 (mse)
      head="last",            # one of HEADS
      loss="cross_entropy",   # one of LOSSES
      dropout=0.0,            # between stacked layers
      method="scan",          # driver: scan | unroll | associative (linear cells)
  ))


class Classifier(nn.Module):
  """See the module docstring; build it with :func:`create`."""

  cells: tuple
  vocab_size: int
  embed_size: int
  output_size: int
  head: str
  dropout: float
  method: str
  squeeze: bool

  @nn.compact
  def __call__(self, batch: dict, carry: Any = None, *, train: bool = False):
    xs = batch["inputs"]
    if self.vocab_size:
      xs = nn.Embed(self.vocab_size, self.embed_size)(xs)  # [B, T, E]
    carry, ys = StackedRNN(self.cells, dropout_rate=self.dropout, method=self.method)(
        xs, carry, lengths=batch.get("lengths"), resets=batch.get("resets"),
        deterministic=not train)
    if self.head == "last":
      top = carry[-1]
      ys = getattr(top, "h", top)  # [B, H]: the carry stops at each sequence's end
    outputs = nn.Dense(self.output_size)(ys)
    return carry, (outputs[..., 0] if self.squeeze else outputs)


def create(config, info=None) -> Classifier:
  """The model a ``model`` config describes (``info`` is not needed: the config
  gives the vocabulary and output sizes).

  Raises:
    ValueError: an unknown cell, head or loss.
  """
  for field, known in (("cell", CELLS), ("head", HEADS), ("loss", LOSSES)):
    if config[field] not in known:
      raise ValueError(f"unknown model.{field} {config[field]!r}; expected one of "
                       f"{', '.join(known)}")
  if config.loss == "mse" and config.output_size != 1:
    raise ValueError(f"model.loss 'mse' needs model.output_size 1, got {config.output_size}")
  cell = CELLS[config.cell](config.hidden_size)
  return Classifier(cells=(cell,) * config.num_layers, vocab_size=config.vocab_size,
                    embed_size=config.embed_size, output_size=config.output_size,
                    head=config.head, dropout=config.dropout, method=config.method,
                    squeeze=config.loss == "mse")


def loss(config, outputs, batch):
  """``(total, weight, metrics)``: cross-entropy (nats, bits, accuracy) or MSE."""
  targets, weights = batch["targets"], batch.get("weights")
  if config.loss == "mse":
    total, weight = losses.squared_error(outputs, targets, weights)
    return total, weight, {"loss": (total, weight)}
  total, weight = losses.cross_entropy(outputs, targets, weights)
  score = batch.get("score", weights)
  correct, scored = losses.accuracy(outputs, targets, score)
  return total, weight, {"loss": (total, weight),
                         "bits": (total * losses.NATS_TO_BITS, weight),
                         "accuracy": (correct, scored)}
