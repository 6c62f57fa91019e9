"""The training loop: exact resume, signals, divergence, metrics, evaluation."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from seqjax import data as data_lib
from seqjax.cli import load_config
from seqjax.data import streams
from seqjax.train import checkpoint, loop

ROOT = Path(__file__).resolve().parents[2]
# Quick copy-task model with two layers and inter-layer dropout: resume must
# reproduce the dropout masks as well as the data.
OVERRIDES = ["--config.model.num_layers=2", "--config.model.dropout=0.3",
             "--config.train.eval_every=0"]


def _seqjax(args, **kwargs):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "seqjax.cli", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _final_params(workdir):
  ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints", log=print)
  step, config = ckpt.load_config()
  run = loop._Run(ml_collections.ConfigDict(config), None, print)  # noqa: SLF001
  state = run.initial_state()
  _, tree = ckpt.restore(run.restore_target(state))
  return step, tree


def _wait_for_checkpoint(workdir, proc, timeout=120):
  folder = Path(workdir) / "checkpoints"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()):
      return
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


@pytest.mark.slow  # ~40 s, three training processes: CI runs it in the slow pass
def test_killed_run_resumes_to_the_same_params_bit_for_bit(tmp_path):
  args = ["train", "copy_memory", "--quick", *OVERRIDES, "--config.train.steps=1500",
          "--config.train.checkpoint_every=100"]
  reference = _seqjax(args + ["--workdir", str(tmp_path / "straight")])
  killed = _seqjax(args + ["--workdir", str(tmp_path / "killed")])
  _wait_for_checkpoint(tmp_path / "killed", killed)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  steps_at_kill = checkpoint.Checkpointer(tmp_path / "killed" / "checkpoints").steps()
  assert steps_at_kill and max(steps_at_kill) < 1500      # it really stopped mid-run
  resumed = _seqjax(args + ["--workdir", str(tmp_path / "killed")])
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-2000:]
  assert "resumed from" in err
  _, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-2000:]

  step_a, a = _final_params(tmp_path / "straight")
  step_b, b = _final_params(tmp_path / "killed")
  assert step_a == step_b == 1500
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# SIGINT takes the same path as SIGTERM (one handler): the slow run checks it too.
@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_sigterm_and_sigint_save_and_exit_zero(tmp_path, sig):
  proc = _seqjax(["train", "copy_memory", "--quick", *OVERRIDES, "--workdir", str(tmp_path),
                  "--config.train.steps=100000", "--config.train.checkpoint_every=50"])
  _wait_for_checkpoint(tmp_path, proc)
  time.sleep(0.5)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["stopped_by"] == sig.name
  steps = checkpoint.Checkpointer(tmp_path / "checkpoints").steps()
  assert result["step"] in steps and 0 < result["step"] < 100000
  assert f"{sig.name} received: saved {tmp_path / 'checkpoints' / str(result['step'])}" in err


def test_divergence_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
  proc = _seqjax(["train", "adding", "--quick", "--workdir", str(tmp_path),
                  "--config.optimizer.learning_rate=1e30", "--config.optimizer.clip_norm=0",
                  "--config.train.steps=40", "--config.train.checkpoint_every=1",
                  "--config.train.log_every=1", "--config.train.eval_every=0"])
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 1
  lines = [line for line in err.splitlines() if line.startswith("seqjax:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  assert "training loss is" in lines[0] and "at step" in lines[0]
  bad_step = int(lines[0].split("at step ")[1].split(";")[0])
  kept = checkpoint.Checkpointer(tmp_path / "checkpoints").steps()
  assert all(s < bad_step for s in kept)               # nothing after the blow-up
  if kept:
    assert f"checkpoints/{max(kept)}" in lines[0]


class _StreamSource(streams.StreamBatcher):
  """Streams as a data source: evaluated on the training streams themselves."""

  eval_splits = ("validation",)
  info = {}

  def eval_batches(self, split="validation"):
    del split
    return super().eval_batches()


def _stream_source(config, *, shard=(0, 1), seed=0):
  rng = np.random.default_rng(123)
  parts = [rng.integers(0, config.vocab, size=n) for n in (40, 200, 75, 130, 300)]
  tokens, starts = streams.concatenate(parts)
  return _StreamSource(tokens, starts, batch_size=config.batch_size, window=config.window,
                       shard=shard, seed=seed)


def _stream_config(steps):
  config = load_config("copy_memory", quick=True)
  config.unlock()
  config.data = dict(name="test_stream", vocab=10, batch_size=4, window=6)
  config.model.update(dict(num_layers=2, dropout=0.2))
  config.train.update(dict(steps=steps, eval_every=0, checkpoint_every=3, log_every=1))
  return config


@pytest.mark.slow  # ~30 s: CI runs it in the slow pass
def test_stream_training_carries_state_and_resumes_exactly(tmp_path, monkeypatch):
  monkeypatch.setitem(data_lib.SOURCES, "test_stream", _stream_source)
  straight = loop.train_and_evaluate(_stream_config(12), tmp_path / "a", log=print)
  loop.train_and_evaluate(_stream_config(7), tmp_path / "b", log=print)
  resumed = loop.train_and_evaluate(_stream_config(12), tmp_path / "b", log=print)
  assert straight["step"] == resumed["step"] == 12
  assert straight["eval"] == resumed["eval"]
  trees = []
  for name in ("a", "b"):
    ckpt = checkpoint.Checkpointer(tmp_path / name / "checkpoints")
    run = loop._Run(_stream_config(12), None, print)  # noqa: SLF001
    state = run.initial_state()
    trees.append(ckpt.restore(run.restore_target(state))[1])
  carry = trees[0]["carry"]
  assert carry is not None and any(np.abs(x).sum() > 0 for x in jax.tree.leaves(carry))
  for x, y in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])):
    np.testing.assert_array_equal(x, y)


def _events(folder):
  """(tag, step, value) of every scalar in the TensorBoard files under ``folder``."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415
  found = []
  for path in Path(folder).rglob("events.out.tfevents.*"):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        found.append((value.tag, event.step, value.simple_value))
  return found


def test_metrics_files_and_eval_command_agree(tmp_path):
  config = load_config("adding", quick=True)
  result = loop.train_and_evaluate(config, tmp_path, log=print)
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in lines if x["split"] == "train"]
  evals = [x for x in lines if x["split"] == "validation"]
  assert [x["step"] for x in train] == [2, 4] and [x["step"] for x in evals] == [2, 4]
  assert {"loss", "grad_norm", "steps_per_second", "tokens_per_second", "train_time",
          "wall_time"} <= set(train[0])
  assert 0 < train[0]["train_time"] <= train[0]["wall_time"] <= evals[0]["wall_time"]
  assert evals[0]["train_time"] == train[0]["train_time"]   # evaluation is not training time
  assert evals[-1]["loss"] == pytest.approx(result["eval"]["validation"]["loss"])
  events = _events(tmp_path / "tensorboard")
  assert ("train/loss", 4, pytest.approx(train[-1]["loss"])) in events
  assert ("validation/loss", 4, pytest.approx(evals[-1]["loss"])) in events
  # `seqjax eval` rebuilds the model from the checkpoint and gets the same numbers.
  again = loop.evaluate(tmp_path)
  assert again["step"] == 4
  assert again["eval"]["validation"]["loss"] == pytest.approx(
      result["eval"]["validation"]["loss"], rel=1e-6)
  best = loop.evaluate(tmp_path, checkpoint="best")
  assert best["step"] in (2, 4)
  with pytest.raises(ValueError, match="model 'classifier' has no matmul_dtype option"):
    loop.evaluate(tmp_path, matmul_dtype="int8")


def test_a_resumed_run_continues_its_clocks(tmp_path):
  config = load_config("adding", quick=True)
  config.train.steps, config.train.checkpoint_every = 4, 4
  loop.train_and_evaluate(config, tmp_path, log=print)
  config.train.steps = 6
  loop.train_and_evaluate(config, tmp_path, log=print)
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  by_step = {(x["step"], x["split"]): x for x in lines}
  before, after = by_step[(4, "train")], by_step[(6, "train")]
  assert after["train_time"] > before["train_time"]
  assert after["wall_time"] > before["wall_time"]


def test_changing_the_model_in_a_used_workdir_is_refused(tmp_path):
  loop.train_and_evaluate(load_config("adding", quick=True), tmp_path, log=print)
  config = load_config("adding", ["model.hidden_size=9"], quick=True)
  with pytest.raises(ValueError, match="written with model"):
    loop.train_and_evaluate(config, tmp_path, log=print)
  # Another optimiser has another state: refused, and the checkpoints stay.
  config = load_config("adding", ["optimizer.name=sgd", "train.steps=8"], quick=True)
  with pytest.raises(checkpoint.LayoutMismatch, match="opt_state"):
    loop.train_and_evaluate(config, tmp_path, log=print)
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").steps() == [2, 4]
