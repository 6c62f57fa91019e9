"""The adding problem (Hochreiter & Schmidhuber 1997), variable lengths (many-to-one).

    seqjax train adding --workdir /tmp/seqjax/adding
    seqjax train adding --workdir /tmp/seqjax/adding_elman --config.model.cell=elman

Expected on 2 CPU cores: about 2 minutes, eval MSE 0.0003 (LSTM; GRU 0.0001
in 50 s; the Elman network fails at 0.164, the baseline).

Two of up to T steps are marked; the target is the sum of their values.
Predicting the mean scores MSE 1/6 (0.164 on the evaluation set), so anything
well below that means the carry held the first marked value across the
sequence; padding past each sequence's length must not leak into the answer.
"""

import ml_collections

from seqjax.models import classifier
from seqjax.train import loop


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
  config = loop.default_config()
  config.model = classifier.default_config()
  config.model.update(dict(
      cell="lstm",
      hidden_size=64,
      vocab_size=0,           # inputs are (value, marker) features
      output_size=1,
      head="last",            # the carry at each sequence's own last step
      loss="mse",
  ))
  config.data = ml_collections.ConfigDict(dict(
      name="adding",
      seq_len=100,            # lengths vary in [50, 100]
      batch_size=64,
      eval_batch_size=512,
      eval_batches=4,
  ))
  config.optimizer.update(dict(name="adam", learning_rate=3e-3, clip_norm=1.0))
  config.train.update(dict(steps=3000, log_every=100, eval_every=500,
                           checkpoint_every=500))
  if quick:
    config.data.update(dict(seq_len=8, batch_size=8, eval_batch_size=16, eval_batches=1))
    config.model.hidden_size = 8
    loop.quick_train(config)
  return config
