"""The native kernels against edited copies of their source, side by side in one process.

    python benchmarks/kernel_variants.py prefetch=/tmp/rnn_prefetch.cc --cells lstm --sizes b
    python benchmarks/kernel_variants.py mine=/tmp/rnn_mine.cc --shape 8,256,512,512 --modes train,infer
    python benchmarks/kernel_variants.py --quick --out /tmp/kernel_variants.json

A change to ``seqjax/native/rnn.cc`` (a prefetch, a tile's shape, a block's
depth) is timed against the kernels as they are. Each ``NAME=PATH`` builds
PATH, an edited copy of ``rnn.cc``, beside the package's own kernels
(:func:`seqjax.native.build_variant`); the same function is then traced once
per variant inside :func:`seqjax.native.variant` and once on the package's
kernels (``base``), and the runs are timed in interleaved rounds in one
process. (On this project's noisy 2-core machine, separate processes differ
by more than most such changes gain.)

Modes: ``train`` and ``infer`` are ``peers.py``'s seqjax training step and
inference (``seqjax.scan`` at the peers sizes); ``outer_sum`` is the weight
gradients' products alone, :func:`seqjax.native.outer_sum` of x [B T, D] and
h [B T, H] against the gate gradients [B T, G H] with the bias gradient (the
GRU's formed from [B T, H] carry gradients as the kernel reads them,
``tiled``). ``--matmul-dtype bfloat16`` runs the kernels' bfloat16 matmuls.

A control runs beside them (``--no-control`` leaves it out): the kernels as
they are, traced and timed a second time as if a variant. Its paired ratio
to base is what the same code measures against itself in that run, the
floor under which a variant's ratio says nothing: on this project's machine,
0.98-1.02x in median over 7-11 rounds, single rounds 0.89-1.16x (the LSTM
at the peers sizes, README.md).

Each row has every run's tokens/s (rows of the products a second, for
``outer_sum``), its GFLOP/s (the matmul FLOPs of ``peers.flops_per_token``;
for ``outer_sum``, 2 (D + H) G H a row), each variant's paired ratio to base
(median and range over the rounds), and whether its results equal base's
bit for bit (outputs; in training the parameters' gradients; the products
and sums), with the largest absolute difference. The JSON's config keeps
each variant's diff against ``rnn.cc``, so a result says what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
from pathlib import Path

import common
import jax
import numpy as np
import peers

from seqjax import native

MODES = ("train", "infer", "outer_sum")
QUICK_SIZES = {"q": dict(B=4, T=16, D=32, H=32)}  # peers.py's is too narrow for the kernels
BASE = "base"
CONTROL = "control"  # the kernels as they are, timed again as if a variant
PACKAGE_KERNELS = (BASE, CONTROL)  # the runs on the package's own kernels


def _variant(text: str) -> tuple[str, Path]:
  """``"NAME=PATH"`` as ``(NAME, PATH)``: a variant of the positional arguments."""
  name, _, path = text.partition("=")
  if not path or not name.isidentifier() or name in PACKAGE_KERNELS:
    raise argparse.ArgumentTypeError(
        f"a variant is NAME=PATH, NAME made of letters, digits and _ (not {BASE!r} or "
        f"{CONTROL!r}) and PATH an edited copy of seqjax/native/rnn.cc; got {text!r}")
  if not Path(path).is_file():
    raise argparse.ArgumentTypeError(f"variant {name!r}: no source file {path!r}")
  return name, Path(path)


def _shape(text: str) -> tuple[str, dict]:
  """``"B,T,D,H"`` as ``(name, size)``: a size of ``--shape``."""
  try:
    b, t, d, h = (int(part) for part in text.split(","))
    if min(b, t, d, h) < 1:
      raise ValueError
  except ValueError:
    raise argparse.ArgumentTypeError(f"a shape is four positive integers B,T,D,H (batch, steps, "
                                     f"inputs, hidden units), got {text!r}") from None
  return f"B{b}_T{t}_D{d}_H{h}", dict(B=b, T=t, D=d, H=h)


def _diff(path: Path) -> str:
  """``path``'s unified diff against the package's ``rnn.cc``."""
  return "".join(difflib.unified_diff(
      native._SOURCE.read_text().splitlines(keepends=True),
      path.read_text().splitlines(keepends=True), "seqjax/native/rnn.cc", str(path)))


def _jitted(fn, *args):
  """A blocking call of ``fn(*args)``, jitted afresh: a new function, so no
  trace cached for another variant serves it (a traced function keeps the
  kernels it was traced with). ``.lower()`` lowers it; ``.result``: its
  last result."""
  jitted = jax.jit(lambda *a: fn(*a))

  def run():
    run.result = jax.block_until_ready(jitted(*args))
  run.lower = lambda: jitted.lower(*args)
  return run


def _functions(cell_name, size, mode, matmul_dtype):
  """``(timed, value)`` for one group, each building a blocking run as
  peers.py's runs (its ``lower()`` shows the kernels it calls): ``timed()``
  the one timed, ``value()`` one whose ``result`` the variants must
  reproduce (``None``: the timed run's own ``result``)."""
  if mode in ("train", "infer"):  # peers.py's step, and its output or gradients
    forward, params, xs = peers.seqjax_problem(cell_name, size, matmul_dtype)
    value = forward if mode == "infer" else peers.gradient(forward)
    return (lambda: peers.seqjax_contender(cell_name, size, mode, matmul_dtype),
            lambda: _jitted(value, params, xs))
  rows, gates = size["B"] * size["T"], peers.GATES[cell_name]
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (rows, size["D"]))
  h = jax.random.normal(keys[1], (rows, size["H"]))
  b = jax.random.normal(keys[2], (rows, gates * size["H"]))
  tiled = jax.random.normal(keys[0], (rows, size["H"])) if cell_name == "gru" else None
  products = lambda x, h, b, t: native.outer_sum((x, h), b, matmul_dtype, t, column_sums=True)
  return (lambda: _jitted(products, x, h, b, tiled)), None


def _on(name, fn):
  """``fn()``, what it traces calling variant ``name``'s kernels (``base``
  and ``control``: the package's)."""
  with contextlib.nullcontext() if name in PACKAGE_KERNELS else native.variant(name):
    return fn()


def _checked(name, run):
  """``run``, traced and compiled; stops the script unless it calls variant
  ``name``'s kernels: a call that took the XLA path (see ``native.usable``)
  would time no kernel at all."""
  run()
  target = "@seqjax_" if name in PACKAGE_KERNELS else f"@{name}_seqjax_"
  if target not in run.lower().as_text():
    raise SystemExit(f"kernel_variants.py: the {name!r} run does not call the kernels it should "
                     f"({target}...): the call takes the XLA path here (see native.usable)")
  return run


def _difference(a, b) -> tuple[bool, float]:
  """Whether two pytrees of arrays are equal bit for bit, and the largest |a - b|."""
  pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  equal = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
  return equal, max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def measure(cell_name, size, mode, names, matmul_dtype, rounds, calls) -> dict:
  timed, value = _functions(cell_name, size, mode, matmul_dtype)
  runs = {name: _on(name, lambda name=name: _checked(name, timed())) for name in names}
  values = {name: (runs[name] if value is None
                   else _on(name, lambda name=name: _checked(name, value()))).result
            for name in names}
  tokens = size["B"] * size["T"]
  per_round = common.interleaved_rounds(runs, tokens, rounds, calls)
  gates, d, h = peers.GATES[cell_name], size["D"], size["H"]
  flops = (2 * (d + h) * gates * h if mode == "outer_sum"
           else peers.flops_per_token(cell_name, size, mode))
  row = dict(cell=cell_name, mode=mode, **size,
             tokens_per_s={n: common.spread(v) for n, v in per_round.items()},
             gflops={n: common.spread([t * flops / 1e9 for t in v])
                     for n, v in per_round.items()},
             vs_base={}, equal_to_base={}, max_abs_difference={})
  for name in names[1:]:
    row["vs_base"][name] = common.paired(per_round[name], per_round[BASE])
    equal, most = _difference(values[name], values[BASE])
    row["equal_to_base"][name], row["max_abs_difference"][name] = equal, most
  return row


def _print(row, size_name) -> None:
  parts = [f"{BASE} {row['tokens_per_s'][BASE]['median'] / 1e3:.1f}k "
           f"({row['gflops'][BASE]['median']:.0f} GFLOP/s)"]
  for name, ratio in row["vs_base"].items():
    same = "equal" if row["equal_to_base"][name] else (
        f"differs by up to {row['max_abs_difference'][name]:.3g}")
    parts.append(f"{name} {row['tokens_per_s'][name]['median'] / 1e3:.1f}k, "
                 f"{ratio['median']:.3f}x ({ratio['min']:.3f}-{ratio['max']:.3f}), {same}")
  print(f"{row['cell']} ({size_name}) {row['mode']}: " + "; ".join(parts), flush=True)


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "kernel_variants")
  parser.add_argument("variants", nargs="*", type=_variant, metavar="NAME=PATH",
                      help="an edited copy of seqjax/native/rnn.cc to time against it "
                           "(--quick without one: an unedited copy)")
  peers.group_arguments(parser, modes=MODES, default_modes="train")
  parser.add_argument("--shape", action="append", type=_shape, default=[], metavar="B,T,D,H",
                      help="a size of one's own (repeatable): with --sizes, timed beside them; "
                           "without, alone (with --quick, in place of its tiny size)")
  parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  parser.add_argument("--no-control", dest="control", action="store_false",
                      help="leave out the control run (the kernels as they are, timed again as "
                           "if a variant: the run's noise floor)")
  args = parser.parse_args(argv)
  cell_names, modes, sizes = peers.groups(parser, args, MODES)
  shapes = dict(args.shape)
  if args.quick:
    sizes = shapes or QUICK_SIZES
  elif shapes:
    sizes = {**(sizes if args.sizes is not None else {}), **shapes}
  variants = dict(args.variants)
  if len(variants) != len(args.variants):
    parser.error("two variants share a name")
  if not variants and not args.quick:
    parser.error("expected at least one variant, NAME=PATH")
  if native.status() != "ready" or jax.default_backend() != "cpu":
    raise SystemExit(f"kernel_variants.py times the native CPU kernels, and they cannot run "
                     f"here (seqjax.native.status(): {native.status()!r}, backend "
                     f"{jax.default_backend()!r})")
  if not variants:
    variants = {"copy": native._SOURCE}
  for name, path in variants.items():
    try:
      native.build_variant(path, name)
    except RuntimeError as e:  # the compiler's last lines, or the kernels it lacks
      parser.error(str(e))
  names = [BASE, *([CONTROL] if args.control else []), *variants]
  matmul_dtype = None if args.matmul_dtype == "float32" else args.matmul_dtype
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  config = dict(variants={n: dict(source=str(p), diff=_diff(p)) for n, p in variants.items()},
                sizes=sizes, matmul_dtype=args.matmul_dtype, rounds=rounds, calls=calls,
                control=args.control, threads=native.threads(), reuse_freed_memory=reuse)
  results = []
  for cell_name in cell_names:
    for size_name, size in sizes.items():
      for mode in modes:
        row = measure(cell_name, size, mode, names, matmul_dtype, rounds, calls)
        results.append(dict(size=size_name, **row))
        _print(row, size_name)
        common.write(args.out, "kernel_variants", config, results)


if __name__ == "__main__":
  main()
