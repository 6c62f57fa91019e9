"""The copy-memory task (Arjovsky et al. 2016): replay 10 symbols after a delay (many-to-many).

    seqjax train copy_memory --workdir /tmp/seqjax/copy
    seqjax train copy_memory --workdir /tmp/seqjax/copy_lstm --config.model.cell=lstm

Expected on 2 CPU cores: about 75 s, eval accuracy 0.95 on the replayed
symbols, 0.025 nats/step (GRU; LSTM 0.43, Elman 0.13 = chance).

Ten symbols from an alphabet of 8, a delay of T blank steps, a delimiter, then
the model must output the ten symbols. The memoryless baseline (blanks, then
uniform guesses) scores 10 log(8) / (T + 20) nats per step and 1/8 accuracy
on the replayed symbols (``accuracy`` counts only those).
"""

import ml_collections

from seqjax.models import classifier
from seqjax.train import loop


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
  config = loop.default_config()
  config.model = classifier.default_config()
  config.model.update(dict(
      cell="gru",             # the LSTM learns this task much more slowly (README)
      hidden_size=64,
      vocab_size=10,          # blank 0, symbols 1..8, delimiter 9
      embed_size=16,
      output_size=10,
      head="every",           # a prediction at every step
      loss="cross_entropy",
  ))
  config.data = ml_collections.ConfigDict(dict(
      name="copy",
      seq_len=30,             # the delay T; sequences are T + 20 long
      copy_length=10,
      batch_size=64,
      eval_batch_size=512,
      eval_batches=2,
  ))
  config.optimizer.update(dict(name="adam", learning_rate=1e-2, clip_norm=1.0))
  config.train.update(dict(steps=8000, log_every=100, eval_every=1000,
                           checkpoint_every=1000))
  if quick:
    config.data.update(dict(seq_len=4, copy_length=3, batch_size=8, eval_batch_size=16,
                            eval_batches=1))
    config.model.hidden_size = 8
    loop.quick_train(config)
  return config
