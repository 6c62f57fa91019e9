"""The ``seqjax`` command: the only place that parses flags.

    seqjax list
    seqjax train EXPERIMENT --workdir DIR [--config.KEY=VALUE ...] [--quick]
    seqjax eval --workdir DIR [--checkpoint latest|best | --step N] [--split NAME]
                [--matmul-dtype float32|bfloat16|int8]
    seqjax sample --workdir DIR [--prompt TEXT] [--length N] [--temperature T]
                  [--top-k K | --top-p P] [--num-samples N] [--seed S]
                  [--matmul-dtype float32|bfloat16|int8]
    seqjax bench [BENCHMARK [ARGS ...]]

EXPERIMENT is a file name in ``experiments/`` (``parity``) or a path to an
experiment file. An experiment file defines ``get_config(quick=False)``
returning an ``ml_collections.ConfigDict``; ``--config.a.b=v`` overrides a field,
and must name an existing field with a value of its type.

BENCHMARK is a script in ``benchmarks/`` (``peers``, ``scan_vs_unroll``, ...);
``seqjax bench`` alone lists them. ``seqjax bench peers --sizes a`` runs what
``python benchmarks/peers.py --sizes a`` runs, its flags passed on as they are
(``seqjax bench peers --help`` lists them).

Multi-process launches (one process per host) add ``--coordinator-address``,
``--num-processes`` and ``--process-id`` (or the variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or
``--distributed`` to let JAX detect the cluster (TPU pods, SLURM).

Mistakes a user can fix (unknown experiment, config key or value, optimiser
name, an unusable workdir, data that cannot be found, prompt characters outside
the vocabulary) end with one line on stderr and exit status 2; a diverged run
exits with 1. ``SEQJAX_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

USAGE_ERROR, DIVERGED = 2, 1


class UsageError(Exception):
  """A mistake in the command line, reported in one line."""


def experiments_dir() -> Path:
  """``$SEQJAX_EXPERIMENTS_DIR``, else the ``experiments/`` folder of the source tree."""
  if os.environ.get("SEQJAX_EXPERIMENTS_DIR"):
    return Path(os.environ["SEQJAX_EXPERIMENTS_DIR"])
  return Path(__file__).resolve().parents[1] / "experiments"


def list_experiments() -> dict[str, Path]:
  folder = experiments_dir()
  if not folder.is_dir():
    return {}
  return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")}


def benchmarks_dir() -> Path:
  """``$SEQJAX_BENCHMARKS_DIR``, else the ``benchmarks/`` folder of the source tree."""
  if os.environ.get("SEQJAX_BENCHMARKS_DIR"):
    return Path(os.environ["SEQJAX_BENCHMARKS_DIR"])
  return Path(__file__).resolve().parents[1] / "benchmarks"


def list_benchmarks() -> dict[str, Path]:
  """The runnable scripts of :func:`benchmarks_dir` (those with a ``__main__``
  block; not their shared ``common.py``), by name."""
  folder = benchmarks_dir()
  if not folder.is_dir():
    return {}
  return {p.stem: p for p in sorted(folder.glob("*.py"))
          if 'if __name__ == "__main__":' in p.read_text()}


def _first_doc_line(path: Path) -> str:
  """The first line of a script's docstring, read without importing it (a
  benchmark imports torch, Keras, ...)."""
  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def _bench(name: str | None, args) -> int:
  """Lists the benchmarks, or runs ``name``'s ``main(args)`` in this process
  (before anything here starts JAX: the scripts' first call keeps freed
  memory for reuse, which must come before XLA's threads start)."""
  known = list_benchmarks()
  if not known:
    raise UsageError(f"no benchmarks in {benchmarks_dir()}: they are the source tree's "
                     "benchmarks/ folder (or set SEQJAX_BENCHMARKS_DIR)")
  if name is None:
    for script, path in known.items():
      print(f"{script:20s} {_first_doc_line(path)}")
    return 0
  if name not in known:
    raise UsageError(f"unknown benchmark {name!r}; known: {', '.join(known)}")
  path = known[name]
  sys.path.insert(0, str(path.parent))  # the scripts import common.py and each other
  module = _module(path, name)
  program, sys.argv[0] = sys.argv[0], f"seqjax bench {name}"  # argparse's name in usage lines
  try:
    return module.main(list(args)) or 0
  finally:
    sys.argv[0] = program


def _module(path: Path, name: str | None = None):
  """The file at ``path`` run as a module named ``name`` (default
  ``seqjax_experiment_<stem>``), registered in ``sys.modules`` first, as an
  import would (a dataclass in it looks its module up there)."""
  name = name or f"seqjax_experiment_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def load_config(experiment: str, overrides=(), *, quick: bool = False):
  """The locked config of ``experiment`` with ``overrides`` (``"a.b=v"`` strings) applied."""
  path = Path(experiment)
  if path.suffix != ".py":
    known = list_experiments()
    if experiment not in known:
      raise UsageError(f"unknown experiment {experiment!r}; known: "
                       f"{', '.join(known) or f'none (no experiments in {experiments_dir()})'}")
    path = known[experiment]
  elif not path.is_file():
    raise UsageError(f"experiment file {path} does not exist")
  module = _module(path)
  if not hasattr(module, "get_config"):
    raise UsageError(f"{path} defines no get_config()")
  config = module.get_config(quick=quick)
  config.lock()
  for item in overrides:
    set_field(config, item)
  return config


def _parse(text: str, like):
  """``text`` as a value of the type of ``like``."""
  if isinstance(like, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true or false, got {text!r}")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, str):
    return text
  return ast.literal_eval(text)


def set_field(config, item: str) -> None:
  """Applies one ``a.b=value`` override to a locked config."""
  if "=" not in item:
    raise UsageError(f"config overrides look like --config.key=value, got --config.{item}")
  dotted, text = item.split("=", 1)
  *parents, leaf = dotted.split(".")
  node, walked = config, []
  for name in parents + [leaf]:
    if not hasattr(node, "keys") or name not in node.keys():
      place = ".".join(walked) or "the config"
      options = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
      raise UsageError(f"unknown config key {dotted!r}: {place} has no field {name!r} "
                       f"(fields: {options})")
    if name != leaf:
      node = node[name]
      walked.append(name)
  current = node[leaf]
  try:
    value = _parse(text, current)
  except (ValueError, SyntaxError) as e:
    raise UsageError(f"config key {dotted!r} holds a {type(current).__name__}; "
                     f"cannot use {text!r} ({e})") from None
  try:
    node[leaf] = value
  except TypeError as e:
    raise UsageError(f"config key {dotted!r}: {e}") from None


def _writable_workdir(path: str) -> Path:
  workdir = Path(path)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UsageError(f"cannot use workdir {path}: {e.strerror or e}") from None
  return workdir


class _Parser(argparse.ArgumentParser):
  """Flag mistakes in the same one-line form as every other mistake."""

  def error(self, message):
    self.exit(USAGE_ERROR, f"seqjax: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="seqjax", description="seqjax experiments")
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="list the experiments")

  train = commands.add_parser("train", help="train an experiment (resumes from its workdir)")
  train.add_argument("experiment", help="a name from `seqjax list`, or a path to a .py file")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard")
  train.add_argument("--quick", action="store_true", help="the experiment's shrunk test size")
  group = train.add_argument_group("multi-process")
  group.add_argument("--coordinator-address", help="host:port of process 0")
  group.add_argument("--num-processes", type=int)
  group.add_argument("--process-id", type=int)
  group.add_argument("--distributed", action="store_true",
                     help="let JAX detect the cluster (TPU pods, SLURM)")

  evaluate = commands.add_parser("eval", help="evaluate a trained run on its data's splits")
  _checkpoint_arguments(evaluate)
  evaluate.add_argument("--split", action="append",
                        help="only this split (repeatable; default: every split)")

  sample = commands.add_parser("sample", help="generate text from a trained char-LM")
  _checkpoint_arguments(sample)
  sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
  sample.add_argument("--length", type=int, default=500, help="characters to generate")
  sample.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  nucleus = sample.add_mutually_exclusive_group()
  nucleus.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest")
  nucleus.add_argument("--top-p", type=float, default=1.0,
                       help="sample within the smallest set holding this probability")
  sample.add_argument("--num-samples", type=int, default=1)
  sample.add_argument("--seed", type=int, default=0)

  bench = commands.add_parser("bench", help="run a benchmark script (alone: list them)")
  bench.add_argument("benchmark", nargs="?", help="a name from `seqjax bench`")
  bench.add_argument("args", nargs=argparse.REMAINDER,
                     help="the script's own flags (`seqjax bench NAME --help`)")
  return parser


def _checkpoint_arguments(parser) -> None:
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
  which.add_argument("--step", type=int)
  parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16", "int8"),
                      help="run the model's matmuls in this precision (default: as trained; "
                           "int8: inference only)")


def _split_overrides(argv):
  """``--config.a=1`` and ``--config.a 1`` pulled out of argv."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      item = arg[len("--config."):]
      if "=" not in item and i + 1 < len(argv):
        item, i = f"{item}={argv[i + 1]}", i + 1
      overrides.append(item)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def run(argv) -> int:
  argv, overrides = _split_overrides(list(argv))
  args = _parser().parse_args(argv)
  if args.command == "list":
    for name, path in list_experiments().items():
      print(f"{name:20s} {_first_doc_line(path)}")
    return 0
  if overrides and args.command != "train":
    raise UsageError("--config.* overrides apply to `seqjax train` only")
  if args.command == "bench":
    return _bench(args.benchmark, args.args)

  # Only now import JAX-heavy modules: `seqjax list` and flag errors stay fast.
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.INFO if os.environ.get("SEQJAX_DEBUG") else absl_logging.WARNING)
  from seqjax.train import loop, parallel  # noqa: PLC0415

  if args.command == "train":
    from seqjax import native  # noqa: PLC0415
    native.reuse_freed_memory()  # first, before XLA's threads start: no page faults every step
    config = load_config(args.experiment, overrides, quick=args.quick)
    workdir = _writable_workdir(args.workdir)
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id, auto=args.distributed)
    result = loop.train_and_evaluate(config, workdir)
    print(json.dumps(result))
    return 0
  if args.command == "eval":
    result = loop.evaluate(args.workdir, step=args.step, checkpoint=args.checkpoint,
                           splits=args.split, matmul_dtype=args.matmul_dtype)
    print(json.dumps(result))
    return 0
  return _sample(args, loop)


def _sample(args, loop) -> int:
  """Streams one sample as it is generated; several are printed one after another."""
  shown = []

  def write(piece: str) -> None:
    if not shown:  # the prompt, once the model has accepted it
      sys.stdout.write(args.prompt)
      shown.append(True)
    sys.stdout.write(piece)
    sys.stdout.flush()

  streaming = args.num_samples == 1
  texts = loop.sample(args.workdir, prompt=args.prompt, length=args.length,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      num_samples=args.num_samples, seed=args.seed, step=args.step,
                      checkpoint=args.checkpoint, matmul_dtype=args.matmul_dtype,
                      write=write if streaming else None,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
  if streaming:
    write("\n")
  else:
    for i, text in enumerate(texts):
      print(f"--- sample {i} ---\n{args.prompt}{text}", flush=True)
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from seqjax.train.loop import TrainingDiverged  # noqa: PLC0415
  try:
    return run(argv)
  except TrainingDiverged as e:
    if os.environ.get("SEQJAX_DEBUG"):
      raise
    print(f"seqjax: {e}", file=sys.stderr)
    return DIVERGED
  except (UsageError, ValueError, TypeError) as e:
    if os.environ.get("SEQJAX_DEBUG"):
      raise
    print(f"seqjax: error: {e}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
  sys.exit(main())
