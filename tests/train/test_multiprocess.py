"""Two processes on loopback (CPU collectives) train like one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from seqjax.train import checkpoint, loop

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train", "copy_memory", "--quick", "--config.train.steps=6",
        "--config.train.checkpoint_every=3", "--config.model.num_layers=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, *extra, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env_extra or {}))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "seqjax.cli", *ARGS, "--workdir",
                           str(workdir), *extra], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _params(workdir):
  ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
  step, config = ckpt.load_config()
  run = loop._Run(ml_collections.ConfigDict(config), None, print)  # noqa: SLF001
  return step, ckpt.restore(run.restore_target(run.initial_state()))[1]["params"]


@pytest.mark.slow  # ~20 s, two JAX processes: CI runs it in the slow pass
def test_two_processes_equal_one(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  # Process 1 takes its settings from the environment, process 0 from flags.
  procs = [_launch(tmp_path / "two", "--coordinator-address", address, "--num-processes",
                   "2", "--process-id", "0"),
           _launch(tmp_path / "two", env_extra={"JAX_COORDINATOR_ADDRESS": address,
                                                "JAX_NUM_PROCESSES": "2",
                                                "JAX_PROCESS_ID": "1"})]
  single = _launch(tmp_path / "one")
  for proc in procs + [single]:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  # One set of checkpoints, written once, and metrics only from process 0.
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["3", "6"]
  lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
  step_two, two = _params(tmp_path / "two")
  step_one, one = _params(tmp_path / "one")
  assert step_two == step_one == 6
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
