"""Every experiment config: documented, loads, and trains a few steps end to end."""

import math
from pathlib import Path

import pytest

from seqjax.cli import list_experiments, load_config
from seqjax.train import loop
from tests.conftest import skip_without_data

EXPERIMENTS = sorted(list_experiments())


def test_the_three_first_experiments_exist():
  assert {"parity", "adding", "copy_memory"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_opens_with_its_command_time_and_result(name):
  doc = list_experiments()[name].read_text().split('"""')[1]
  assert f"seqjax train {name} --workdir" in doc
  assert "Expected on 2 CPU cores:" in doc and "TODO" not in doc


# The char-LM configs (the default run trains a char-LM on real text in
# tests/train/test_sample.py): the slow run trains them (the default suite's
# time budget).
SLOW_QUICK = {"charlm", "charlm_shakespeare", "charlm_shakespeare_large"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_QUICK
                                  else n for n in EXPERIMENTS])
def test_quick_config_trains_and_evaluates(name, tmp_path: Path):
  config = load_config(name, quick=True)
  skip_without_data(config)
  result = loop.train_and_evaluate(config, tmp_path, log=print)
  assert result["step"] == config.train.steps
  assert result["eval"] and all(math.isfinite(v) for metrics in result["eval"].values()
                                for v in metrics.values())
  assert (tmp_path / "checkpoints" / str(config.train.steps)).is_dir()
