"""A character language model on the embedded corpus: the README's main job.

    seqjax train charlm --workdir /tmp/seqjax/charlm
    seqjax sample --workdir /tmp/seqjax/charlm --prompt "The " --length 400 --temperature 0.8

Expected on 2 CPU cores: about 4 minutes (3.6 of them training), validation
1.30 nats/char (1.87 bits), test 1.14; the sample reads like the reference's
prose and grammar snippets, with invented words.

The corpus is the Python language reference that ships inside every CPython
(``pydoc_data.topics``, ~465 KB of English), so this runs with no download;
``--config.data.corpus=PATH`` trains on any UTF-8 text file instead. A 2-layer
LSTM reads windows of characters, carrying its state from one window to the
next (truncated BPTT).
"""

import ml_collections

from seqjax.data import text
from seqjax.models import charlm
from seqjax.train import loop


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
  config = loop.default_config()
  config.model = charlm.default_config()
  config.model.update(dict(cell="lstm", hidden_size=256, num_layers=2, embed_size=64))
  config.data = text.default_config()  # the embedded corpus, 32 rows of 128 characters
  config.optimizer.update(dict(name="adam", learning_rate=3e-3, schedule="warmup_cosine",
                               warmup_steps=50, clip_norm=1.0))
  config.train.update(dict(steps=800, log_every=50, eval_every=200, checkpoint_every=400))
  if quick:
    charlm.shrink_for_tests(config)
    loop.quick_train(config)
  return config
