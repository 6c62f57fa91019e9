"""The command line: listing, overrides, and one clear line for every mistake."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqjax import cli

ROOT = Path(__file__).resolve().parents[1]


def _main(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_list_names_every_experiment(capsys):
  code, out, _ = _main(capsys, "list")
  assert code == 0
  names = [line.split()[0] for line in out.splitlines()]
  assert names == sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
  assert {"parity", "adding", "copy_memory"} <= set(names)


def test_overrides_are_typed_and_applied():
  config = cli.load_config("adding", ["model.cell=gru", "train.steps=7",
                                      "optimizer.learning_rate=0.5", "train.progress=false"])
  assert (config.model.cell, config.train.steps, config.optimizer.learning_rate,
          config.train.progress) == ("gru", 7, 0.5, False)
  args, overrides = cli._split_overrides(["train", "x", "--config.a.b", "3", "--config.c=d"])  # noqa: SLF001
  assert args == ["train", "x"] and overrides == ["a.b=3", "c=d"]


@pytest.mark.parametrize("argv, message", [
    (["train", "parityy", "--workdir", "{tmp}"], "unknown experiment 'parityy'; known: "),
    (["train", "parity", "--workdir", "{tmp}", "--config.model.celll=gru"],
     "unknown config key 'model.celll': model has no field 'celll'"),
    (["train", "parity", "--workdir", "{tmp}", "--config.train.steps=many"],
     "config key 'train.steps' holds a int; cannot use 'many'"),
    (["train", "parity", "--workdir", "{tmp}", "--config.train.steps=1.5"],
     "config key 'train.steps' holds a int; cannot use '1.5'"),
    (["train", "parity", "--workdir", "{tmp}/file/sub"], "cannot use workdir"),
    (["train", "parity", "--quick", "--workdir", "{tmp}", "--config.optimizer.name=adamx"],
     "unknown optimizer.name 'adamx'; expected one of adam, adamw, sgd, rmsprop"),
    (["train", "parity", "--quick", "--workdir", "{tmp}", "--config.model.cell=lstmm"],
     "unknown model.cell 'lstmm'"),
    (["train", "parity", "--quick", "--workdir", "{tmp}", "--config.data.batch_size=0"],
     "does not divide"),
    (["train", "missing.py", "--workdir", "{tmp}"], "experiment file missing.py does not exist"),
    (["eval", "--workdir", "{tmp}"], "no checkpoints in"),
])
def test_mistakes_give_one_line_and_exit_2(capsys, tmp_path, argv, message):
  (tmp_path / "file").write_text("not a folder")
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  code, _, err = _main(capsys, *argv)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("seqjax: error: "), err
  assert message in lines[0]


@pytest.mark.parametrize("argv", [["train", "parity"], ["eval"], ["fit"]])
def test_flag_mistakes_give_one_line_and_exit_2(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("seqjax: error: ")
  assert ("--workdir" in lines[0]) == (argv[0] != "fit")


def test_bench_lists_every_benchmark_script(capsys):
  code, out, _ = _main(capsys, "bench")
  assert code == 0
  rows = [line.split(maxsplit=1) for line in out.splitlines()]
  scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "common")
  assert [name for name, _ in rows] == scripts
  assert {"peers", "scan_vs_unroll", "sampling", "memory", "vanishing_gradients"} <= set(scripts)
  for name, description in rows:  # each one's docstring's first line
    path = ROOT / "benchmarks" / f"{name}.py"
    assert path.read_text().split('"""')[1].splitlines()[0] == description


@pytest.mark.parametrize("argv, message", [
    (["bench", "peer"], "unknown benchmark 'peer'; known: call_times, "),
    (["bench"], "no benchmarks in {tmp}: they are the source tree's benchmarks/ folder"),
])
def test_bench_mistakes_give_one_line_and_exit_2(capsys, monkeypatch, tmp_path, argv, message):
  if "{tmp}" in message:
    monkeypatch.setenv("SEQJAX_BENCHMARKS_DIR", str(tmp_path))
  code, _, err = _main(capsys, *argv)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("seqjax: error: ")
  assert message.replace("{tmp}", str(tmp_path)) in lines[0]


def test_bench_passes_the_scripts_flags_on_and_their_mistakes_name_it(capsys, monkeypatch,
                                                                      tmp_path):
  """`seqjax bench NAME ARGS` calls the script's main(ARGS); a flag the script
  does not know stops it with argparse's one line, under the command's name."""
  (tmp_path / "echo.py").write_text(
      '"""Prints its flags."""\nimport argparse\n\n\ndef main(argv=None):\n'
      '  parser = argparse.ArgumentParser()\n  parser.add_argument("--rounds", type=int)\n'
      '  print(parser.parse_args(argv).rounds)\n  return 3\n\n\n'
      'if __name__ == "__main__":\n  main()\n')
  (tmp_path / "common.py").write_text('"""Not a benchmark: no __main__ block."""\n')
  monkeypatch.setenv("SEQJAX_BENCHMARKS_DIR", str(tmp_path))
  monkeypatch.syspath_prepend(str(tmp_path))  # restored afterwards, as _bench adds it too
  assert _main(capsys, "bench") == (0, f"{'echo':20s} Prints its flags.\n", "")
  assert _main(capsys, "bench", "echo", "--rounds", "7") == (3, "7\n", "")
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["bench", "echo", "--runs", "7"])
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1] == "seqjax bench echo: error: unrecognized arguments: --runs 7"


def test_the_console_script_prints_no_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "seqjax.cli", "train", "parity", "--workdir",
                         str(tmp_path), "--config.optimizer.name=nadam", "--quick"],
                        capture_output=True, text=True, env=env, timeout=120, check=False)
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith("seqjax: error: unknown optimizer")
