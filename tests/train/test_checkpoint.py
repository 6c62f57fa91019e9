"""Orbax checkpoints: exact round trip, retention, fallback past a corrupt one."""

import numpy as np
import pytest

from seqjax.train import checkpoint


def _state(value=1.0):
  return {"params": {"w": np.full((3, 2), value, np.float32), "b": np.zeros(2, np.float32)},
          "step": np.asarray(7, np.int32), "rng": np.array([1, 2**32 - 1], np.uint32),
          "carry": None, "opt_state": {"0": {}, "1": {"count": np.asarray(3, np.int32)}}}


def _ckpt(tmp_path, **kwargs):
  kwargs.setdefault("async_save", True)
  return checkpoint.Checkpointer(tmp_path / "ckpt", log=lambda m: None, **kwargs)


def test_round_trip_is_exact_and_keeps_the_config(tmp_path):
  ckpt = _ckpt(tmp_path)
  ckpt.save(5, _state(0.1), {"model": {"cell": "lstm"}})
  ckpt.wait()
  step, restored = ckpt.restore(_state(0.0))
  assert step == 5
  expected = _state(0.1)
  for key in ("step", "rng"):
    assert restored[key].dtype == expected[key].dtype
    np.testing.assert_array_equal(restored[key], expected[key])
  np.testing.assert_array_equal(restored["params"]["w"], expected["params"]["w"])
  assert restored["carry"] is None
  assert ckpt.load_config() == (5, {"model": {"cell": "lstm"}})


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = _ckpt(tmp_path)
  assert ckpt.restore(_state()) is None
  assert ckpt.load_config() is None


def test_keeps_the_newest_and_the_best(tmp_path):
  ckpt = _ckpt(tmp_path, keep=2, keep_best=1, best_metric="loss", best_mode="min")
  losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.7, 5: 0.6}
  for step, loss in losses.items():
    ckpt.save(step, _state(step), {}, metrics={"loss": loss})
  ckpt.save(6, _state(6), {})            # no eval metric: kept as one of the newest
  ckpt.wait()
  assert ckpt.steps() == [2, 5, 6]
  assert ckpt.best_step() == 2


def test_corrupt_latest_falls_back_with_one_line(tmp_path):
  notices = []
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", log=notices.append, async_save=False)
  ckpt.save(1, _state(1.0), {"n": 1})
  ckpt.save(2, _state(2.0), {"n": 2})
  for path in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\x00garbage")
  step, restored = ckpt.restore(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(restored["params"]["w"], _state(1.0)["params"]["w"])
  assert len(notices) == 1 and "2" in notices[0] and "unreadable" in notices[0]
  assert "\n" not in notices[0]
  assert (tmp_path / "ckpt" / "2.corrupt").is_dir()
  # A new manager sees only the good checkpoint; saving goes on from there.
  again = checkpoint.Checkpointer(tmp_path / "ckpt", log=notices.append, async_save=False)
  assert again.steps() == [1]


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="best_mode"):
    _ckpt(tmp_path, best_mode="lowest")
  ckpt = _ckpt(tmp_path)
  ckpt.save(1, _state(), {})
  ckpt.wait()
  with pytest.raises(checkpoint.LayoutMismatch, match="holds another state layout"):
    ckpt.restore({"other": np.zeros(3)}, step=1)


def test_a_state_of_another_layout_is_refused_not_set_aside(tmp_path):
  ckpt = _ckpt(tmp_path, async_save=False)
  ckpt.save(1, _state(), {})
  other = _state()
  other["params"]["w"] = np.zeros((4, 2), np.float32)   # another model size
  with pytest.raises(checkpoint.LayoutMismatch, match=r"\['params'\]\['w'\] it has \(3, 2\) "
                     r"float32, the run expects \(4, 2\) float32"):
    ckpt.restore(other)
  assert ckpt.steps() == [1]
