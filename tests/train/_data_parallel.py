"""Run by test_step.py in a subprocess whose device count XLA_FLAGS fixes.

Takes three training steps of the copy-task model on fixed global batches and
writes the parameters and metrics to the .npz given as argv[1]. Positions get
random 0/1 weights, so the devices see different token counts and the exact
global averaging is exercised.
"""

import sys

import jax
import numpy as np

from seqjax.train import loop, parallel
from seqjax.train import step as step_lib
from experiments import copy_memory


def main(out):
  config = copy_memory.get_config(quick=True)
  config.data.update(dict(batch_size=16, eval_batch_size=16))
  config.model.update(dict(num_layers=2, hidden_size=12))
  config.optimizer.update(dict(name="sgd", learning_rate=0.5, momentum=0.9))
  run = loop._Run(config, None, print)  # noqa: SLF001 - the loop's own assembly
  train_step = step_lib.make_train_step(run.model, run.loss_fn)
  on_devices = loop._to_devices(run.initial_state())  # noqa: SLF001
  metrics = []
  for i in range(3):
    batch = run.source.batch(i)
    batch["weights"] = (np.random.default_rng(i).random(batch["targets"].shape) < 0.5
                        ).astype(np.float32)
    on_devices, m = train_step(on_devices, parallel.shard(batch))
    metrics.append(step_lib.means(jax.device_get(jax.tree.map(lambda x: x[0], m))))
  params = parallel.unreplicate(on_devices.params)
  flat = {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  loss = np.array([m["loss"] for m in metrics])
  accuracy = np.array([m["accuracy"] for m in metrics])
  np.savez(out, devices=jax.device_count(), loss=loss, accuracy=accuracy, **flat)

  try:  # a batch that does not split over the devices
    config.data.batch_size = 12
    loop._Run(config, None, print)  # noqa: SLF001
  except ValueError as e:
    print(f"ERROR: {e}")


if __name__ == "__main__":
  main(sys.argv[1])
