"""The README's promises: its Python example runs, CI runs its test command
verbatim, and the example script trains."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_example_runs():
  (example,) = _blocks("python")
  exec(compile(example, "README.md", "exec"), {})  # its asserts must hold


def test_ci_runs_the_readme_test_command_verbatim():
  commands = [b.strip() for b in _blocks("bash")]
  assert len(commands) == 2, "README opens with the example and the test command"
  test_command = commands[1]
  assert "pytest" in test_command
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  assert test_command in ci_lines


def test_quickstart_learns_the_adding_problem():
  """A shrunk run of README's first command still beats the mean predictor."""
  out = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "400",
       "--seq-len", "10", "--batch", "64"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  baseline = float(re.search(r"baseline MSE .* = ([\d.]+)", out).group(1))
  final = float(re.search(r"final test MSE ([\d.]+)", out).group(1))
  assert final < 0.25 * baseline, out
