"""Shared pieces of the benchmark scripts: timing, environment, JSON output.

Every script writes one JSON file: ``{"benchmark": name, "environment": {...},
"config": {...}, "results": [...]}``. Times are wall-clock seconds of calls
that block until their result is ready; a script reports medians over repeats
and, where it compares contenders, interleaves them round by round so a slow
spell of the machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def environment() -> dict:
  """What the numbers were measured on."""
  import jax  # noqa: PLC0415 - after the caller has set up its environment

  device = jax.devices()[0]
  env = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "device_count": jax.device_count(),
  }
  if os.environ.get("XLA_FLAGS"):
    env["xla_flags"] = os.environ["XLA_FLAGS"]
  for name in ("torch", "flax", "keras"):
    module = sys.modules.get(name)
    if module is not None:
      env[name] = getattr(module, "__version__", "?")
  return env


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
  """Seconds of each of ``repeats`` calls of ``fn`` (which must block)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def interleaved_rounds(runs: dict, tokens: int, rounds: int, calls: int) -> dict:
  """Tokens/s of each of ``runs`` (name -> blocking call), round by round.

  Every run is called twice first (compile, warm up). In each round every run
  is timed ``calls`` times (its median counts), in an order that flips from
  round to round, so a slow spell of the machine hits all of them alike.
  Returns name -> one tokens/s per round.
  """
  for run in runs.values():
    run()
    run()
  per_round = {name: [] for name in runs}
  for r in range(rounds):
    for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
      per_round[name].append(tokens / median(time_calls(runs[name], calls)))
  return per_round


def matmul_peak_run(n: int) -> Callable[[], object]:
  """A blocking call of a jitted float32 n x n x n XLA matmul (2 n^3 FLOPs).

  Timed in the same rounds as a benchmark's contenders, it gives the
  machine's measured matmul peak beside them (the speed issue's yardstick:
  n = 2048).
  """
  import jax  # noqa: PLC0415 - after the caller has set up its environment
  import jax.numpy as jnp  # noqa: PLC0415

  a = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(3), (n, n), jnp.float32)
  fn = jax.jit(jnp.matmul)
  return lambda: fn(a, b).block_until_ready()


def pop_peak(per_round: dict, tokens: int, n: int, name: str = "peak") -> list[float]:
  """Removes the :func:`matmul_peak_run` entry ``name`` from the result of
  :func:`interleaved_rounds` and returns its FLOP/s, one per round."""
  return pop_flops(per_round, tokens, 2 * n ** 3, name)


def pop_flops(per_round: dict, tokens: int, flops: float, name: str) -> list[float]:
  """Removes entry ``name``, a call doing ``flops`` FLOPs, from the result of
  :func:`interleaved_rounds` and returns its FLOP/s, one per round (its
  "tokens/s" there is calls/s times ``tokens``)."""
  return [x / tokens * flops for x in per_round.pop(name)]


def fma_ceiling_run(threads: int, seconds: float = 0.1):
  """``(call, flops)``: a blocking call that runs ``fma_ceiling.cc`` on
  ``threads`` threads for about ``seconds``, and the FLOPs it does; or a
  string saying why it cannot run here.

  ``fma_ceiling.cc`` is nothing but independent float32 fused multiply-adds
  as wide as the CPU's vectors, so its rate is the cores' ceiling: no
  matmul multiplies faster on them. Timed in the same rounds as a
  benchmark's contenders (as :func:`matmul_peak_run` is), it says how close
  each one runs to the hardware, and whether a speed target is within it. It
  is built as :mod:`seqjax.native`'s kernels are (the same compiler, flags
  and cache), but on any CPU: without AVX-512 it runs AVX2, or scalar FMAs.
  """
  import ctypes  # noqa: PLC0415

  from seqjax import native  # noqa: PLC0415 - the kernels' own compiler and cache

  compiler = native._compiler()  # noqa: SLF001
  if compiler is None:
    return "no C++ compiler found ($CXX, g++ or c++) to build benchmarks/fma_ceiling.cc"
  try:
    library = ctypes.CDLL(str(native._build(compiler, HERE / "fma_ceiling.cc")))  # noqa: SLF001
  except (OSError, RuntimeError) as e:
    return f"benchmarks/fma_ceiling.cc did not build: {e}"
  library.seqjax_fma_flops.restype = ctypes.c_double
  library.seqjax_fma_flops.argtypes = [ctypes.c_int, ctypes.c_long]
  iterations = 1 << 16
  while True:  # long enough to time: about `seconds`
    start = time.perf_counter()
    flops = library.seqjax_fma_flops(threads, iterations)
    took = time.perf_counter() - start
    if took >= seconds / 4:
      break
    iterations *= 4
  per_iteration = flops / iterations
  iterations = max(1, round(iterations * seconds / took))
  return lambda: library.seqjax_fma_flops(threads, iterations), per_iteration * iterations


def loss(ys):
  """The benchmarks' training loss, mean(ys²) of a layer's outputs: a JAX
  array's or a torch tensor's (Keras's "mse" against zeros is the same)."""
  return (ys ** 2).mean()


def median(values) -> float:
  return float(statistics.median(values))


def spread(values) -> dict:
  """Median, min and max of a list of numbers."""
  return {"median": median(values), "min": float(min(values)), "max": float(max(values))}


def paired(numerators, denominators, scale: float = 1.0) -> dict:
  """:func:`spread` of each round's ``scale * numerator / denominator``: a
  paired ratio of two runs timed in the same rounds (or of a rate to that
  round's peak), not the ratio of their medians."""
  return spread([scale * n / d for n, d in zip(numerators, denominators, strict=True)])


def write(path: Path, benchmark: str, config: dict, results: list) -> dict:
  payload = {"benchmark": benchmark, "environment": environment(), "config": config,
             "results": results}
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1) + "\n")
  print(f"wrote {path}", file=sys.stderr)
  return payload


class _Parser(argparse.ArgumentParser):
  """An argument parser that fills in ``--out`` once the rest is parsed."""

  def __init__(self, description: str, results: str | Callable[[argparse.Namespace], str]):
    super().__init__(description=description)
    self.results = results

  def parse_args(self, args=None, namespace=None):
    parsed = super().parse_args(args, namespace)
    if parsed.out is None:
      parsed.out = results_path(self.results(parsed) if callable(self.results) else self.results)
    return parsed


def results_path(name: str, backend: str | None = None) -> Path:
  """``results/<name>.json`` for results measured on CPU, ``results/<name>_<backend>.json``
  on another backend (default: JAX's default backend, which this starts)."""
  if backend is None:
    import jax  # noqa: PLC0415 - after the caller has set up its environment
    backend = jax.default_backend()
  return RESULTS / f"{on_backend(name, backend)}.json"


def arguments(description: str, name: str | Callable[[argparse.Namespace], str],
              per_backend: bool = True) -> argparse.ArgumentParser:
  """The flags every script shares: ``--quick``, ``--out``, ``--plots``.

  ``--out`` defaults to :func:`results_path` of ``name`` (or of what ``name``
  gives for the parsed flags), so results measured on a GPU do not replace
  the CPU's; with ``per_backend=False`` to ``results/<name>.json`` (a script
  whose results do not depend on where it runs), or to ``None`` for the
  script to name after parsing (``parser.set_defaults(out=None)``)."""
  parser = _Parser(description, name) if per_backend else argparse.ArgumentParser(
      description=description)
  parser.add_argument("--quick", action="store_true",
                      help="a tiny configuration (seconds), for tests")
  default = None if per_backend else RESULTS / f"{name}.json"
  parser.add_argument("--out", type=Path, default=default,
                      help="where the JSON results go (default: results/NAME.json, or "
                           "results/NAME_<backend>.json measured off CPU)")
  parser.add_argument("--plots", type=Path, default=None,
                      help="folder for PNG plots (default: next to --out)")
  return parser


def save_figure(fig, path: Path, dpi: int = 120) -> None:
  """Writes a matplotlib figure to ``path`` (its folder made first: ``--plots``
  may name one that does not exist yet) and closes it."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 - after the caller picked a backend

  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def table_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of a script that keeps a table in ``benchmarks/README.md``."""
  parser.add_argument("--update-readme", action="store_true",
                      help="rewrite the README table from this run's results")
  parser.add_argument("--table-from", type=Path, default=None,
                      help="only rewrite the README table from this JSON")


def on_backend(name: str, backend: str) -> str:
  """A results file's or README table's name for results measured on
  ``backend``: ``name`` on CPU, ``name_<backend>`` elsewhere (``peers_gpu``)."""
  return name if backend == "cpu" else f"{name}_{backend}"


def readme_table(marker: str, markdown, results, *, update: bool) -> str:
  """Renders ``markdown(results)`` and, if ``update``, puts it in the README."""
  table = markdown(results)
  if update:
    replace_between_markers(HERE / "README.md", marker, table)
  return table


def table_from(path: Path, marker, markdown) -> None:
  """Rewrites the README table ``marker`` from a saved results JSON; ``marker``
  may instead be a function of the saved payload that names the table (a
  results file measured on a GPU has a table of its own)."""
  payload = json.loads(Path(path).read_text())
  if callable(marker):
    marker = marker(payload)
  readme_table(marker, markdown, payload["results"], update=True)


def replace_between_markers(path: Path, marker: str, text: str) -> None:
  """Replaces what lies between ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
  start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
  content = path.read_text()
  if start not in content or end not in content:
    raise ValueError(f"{path} has no {start} ... {end} block")
  head, rest = content.split(start, 1)
  _, tail = rest.split(end, 1)
  path.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{tail}")
