"""Character LM on Tiny Shakespeare: the best configuration we train in under an hour.

    seqjax train charlm_shakespeare_large --workdir /tmp/seqjax/shakespeare_large

Expected on 2 CPU cores: 47 minutes of training (48 with evaluations), then
validation 1.340 nats/char (1.933 bits) and test 1.503 on the whole splits;
validation passes 1.50 after about 9 minutes and 1.40 after about 18.

The data as in ``charlm_shakespeare.py`` (set ``SEQJAX_DATA_DIR`` to a folder
holding ``tiny_shakespeare/input.txt``). Twice the width of the 10-minute model
(3.3M parameters against 0.9M), which overfits a 1M-character corpus within
the hour unless regularised: variational dropout on the inputs, between the
layers and on the outputs. The recurrent layers multiply in bfloat16 with
float32 accumulation (``model.matmul_dtype``), for more steps in the hour.
"""

import ml_collections

from seqjax.data import text
from seqjax.models import charlm
from seqjax.train import loop


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
  config = loop.default_config()
  config.model = charlm.default_config()
  config.model.update(dict(
      cell="lstm",
      hidden_size=512,
      num_layers=2,
      embed_size=64,
      dropout_input=0.1,      # one mask per window row, shared by its 128 steps
      dropout_hidden=0.25,
      dropout_output=0.25,
      matmul_dtype="bfloat16",  # 1.1-1.5x faster steps; f32 accumulation
  ))
  config.data = text.default_config()  # 32 rows of 128 characters, as the 10-minute model
  config.data.corpus = "tiny_shakespeare"
  config.optimizer.update(dict(name="adam", learning_rate=2e-3, schedule="warmup_cosine",
                               warmup_steps=100, clip_norm=1.0))
  # 5000 steps of 4096 characters: ~20 passes over the training text.
  config.train.update(dict(steps=5000, log_every=50, eval_every=500, checkpoint_every=1000))
  if quick:
    charlm.shrink_for_tests(config)
    loop.quick_train(config)
  return config
