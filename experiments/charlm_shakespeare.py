"""Character language model on Tiny Shakespeare (TFDS), the char-rnn benchmark.

    seqjax train charlm_shakespeare --workdir /tmp/seqjax/shakespeare

Expected on 2 CPU cores: 9 minutes of training (9.3 with evaluations), then
validation 1.447 nats/char (2.088 bits) and test 1.580 on the whole splits,
the carry kept across windows; validation passes 1.50 after about 5 minutes.

Reads TFDS ``tiny_shakespeare`` (train / validation / test: 1,003,854 /
55,770 / 55,770 characters). Offline, TFDS prepares it from a local copy:
set ``SEQJAX_DATA_DIR`` (or ``--config.data.dir``) to a folder holding
``tiny_shakespeare/input.txt``; preparing once needs TensorFlow
(``pip install "seqjax[tfds]"``), reading does not.
"""

import ml_collections

from seqjax.data import text
from seqjax.models import charlm
from seqjax.train import loop


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
  config = loop.default_config()
  config.model = charlm.default_config()
  # No dropout: in 10 minutes the 0.9M-parameter model is only starting to
  # overfit.
  config.model.update(dict(cell="lstm", hidden_size=256, num_layers=2, embed_size=64))
  # Batches of 32 rows of 128 characters (the defaults; small batches, more
  # updates in the 10 minutes); evaluation reads 8 rows of ~7,000 characters.
  config.data = text.default_config()
  config.data.corpus = "tiny_shakespeare"
  # The cosine reaches 0 exactly when the step budget ends, so the run finishes
  # annealed whatever its length.
  config.optimizer.update(dict(name="adam", learning_rate=3e-3, schedule="warmup_cosine",
                               warmup_steps=100, clip_norm=1.0))
  # 2200 steps of 4096 characters (~9 passes over the text) fit in 10 minutes
  # on the project's 2-core machine, whose speed varies by up to a third.
  config.train.update(dict(steps=2200, log_every=50, eval_every=200, checkpoint_every=1100))
  if quick:
    charlm.shrink_for_tests(config)
    loop.quick_train(config)
  return config
