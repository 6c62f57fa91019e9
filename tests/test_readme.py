"""The README's promises: its Python examples run, CI runs its test command
verbatim, its main command trains a char-LM and samples, and the example script
trains."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.slow  # ~20 s: the two examples at full size
def test_readme_python_examples_run():
  examples = _blocks("python")
  assert len(examples) >= 2  # the quick start and the long-sequence example
  for example in examples:
    exec(compile(example, "README.md", "exec"), {})  # their asserts must hold


def test_ci_runs_the_readme_test_command_verbatim():
  opening = README.split("\n## ", 1)[0]  # before the first section
  commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", opening, flags=re.S)]
  assert len(commands) == 2, "README opens with the main command and the test command"
  test_command = commands[1]
  assert "pytest" in test_command
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  assert test_command in ci_lines


@pytest.mark.slow  # trains for ~20 s in a subprocess; CI runs it after the default suite
def test_readme_main_command_trains_a_char_lm_and_samples(tmp_path):
  """README's first command, verbatim but for the install, the workdir and a shrunk
  training budget: it trains the char-LM on the embedded corpus and prints a sample."""
  main = _blocks("bash")[0].strip()
  install, *commands = [part.strip() for part in main.split(" && ")]
  assert install == "python -m pip install -e ."
  assert [c.split()[:3] for c in commands] == [["seqjax", "train", "charlm"],
                                               ["seqjax", "sample", "--workdir"]]
  workdir = re.search(r"--workdir (\S+)", commands[0]).group(1)
  shrink = ["--config.train.steps=20", "--config.optimizer.warmup_steps=5",
            "--config.train.eval_every=0",
            "--config.train.progress=false"]
  outputs = []
  for command, extra in zip(commands, (shrink, [])):
    args = shlex.split(command.replace(workdir, str(tmp_path)))[1:] + extra
    done = subprocess.run([sys.executable, "-m", "seqjax.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    outputs.append(done.stdout)
  prompt = shlex.split(commands[1]).index("--prompt")
  prompt = shlex.split(commands[1])[prompt + 1]
  length = int(re.search(r"--length (\d+)", commands[1]).group(1))
  assert outputs[1].startswith(prompt) and len(outputs[1]) == len(prompt) + length + 1


@pytest.mark.slow  # ~11 s: 400 training steps in a fresh process
def test_quickstart_learns_the_adding_problem():
  """A shrunk run of examples/quickstart.py (in README's layout) beats the mean predictor."""
  out = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "400",
       "--seq-len", "10", "--batch", "64"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  baseline = float(re.search(r"baseline MSE .* = ([\d.]+)", out).group(1))
  final = float(re.search(r"final test MSE ([\d.]+)", out).group(1))
  assert final < 0.25 * baseline, out
