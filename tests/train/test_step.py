"""The training step: data-parallel == serial, and every parameter trains."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from seqjax.cli import list_experiments, load_config
from seqjax.train import loop, parallel
from seqjax.train import step as step_lib
from tests.conftest import skip_without_data

ROOT = Path(__file__).resolve().parents[2]


def _run_devices(n, out):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, str(Path(__file__).with_name("_data_parallel.py")),
                         str(out)], env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return np.load(out), done.stdout


# ~12 s (a process with 8 host devices): the slow run, for the default suite's budget.
@pytest.mark.slow
def test_eight_devices_equal_one_device_on_the_same_global_batch(tmp_path):
  one, one_out = _run_devices(1, tmp_path / "one.npz")
  eight, eight_out = _run_devices(8, tmp_path / "eight.npz")
  assert (int(one["devices"]), int(eight["devices"])) == (1, 8)
  names = [k for k in one.files if k.startswith("[")]
  assert names and set(names) == {k for k in eight.files if k.startswith("[")}
  for name in names + ["loss", "accuracy"]:
    np.testing.assert_allclose(eight[name], one[name], rtol=2e-5, atol=2e-6, err_msg=name)
  # Training moved the parameters (so equality is not trivial).
  assert one["loss"][0] != one["loss"][-1]
  assert "ERROR: data.batch_size 12 does not divide evenly over 8 devices" in eight_out
  assert "ERROR" not in one_out


# The Tiny Shakespeare configs' char-LM is charlm's model at other sizes: the
# slow run checks them (the default suite's time budget).
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n.startswith("charlm_shakespeare") else n
    for n in sorted(list_experiments())])
def test_one_step_changes_every_parameter(name):
  config = load_config(name, quick=True)
  skip_without_data(config)
  run = loop._Run(config, None, print)  # noqa: SLF001
  state = run.initial_state()
  before = jax.device_get(state.params)
  train_step = step_lib.make_train_step(run.model, run.loss_fn)
  on_devices, _ = train_step(loop._to_devices(state), parallel.shard(run.source.batch(0)))  # noqa: SLF001
  after = parallel.unreplicate(on_devices.params)
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                          jax.tree.leaves(after)):
    assert not np.array_equal(a, b), f"{jax.tree_util.keystr(path)} did not change"
  assert int(parallel.unreplicate(on_devices.step)) == 1
  assert int(parallel.unreplicate(on_devices.data_position)) == 1
