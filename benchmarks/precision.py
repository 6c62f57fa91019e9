"""bfloat16 matmuls against float32: LSTM and GRU speed, and what it costs in accuracy.

    python benchmarks/precision.py                # sizes (a)(b)(c), ~5 minutes on 2 CPU cores
    python benchmarks/precision.py --quick --out /tmp/precision.json
    python benchmarks/precision.py --table-from benchmarks/results/precision.json   # README only

Both contenders are ``seqjax.scan`` on float32 parameters and inputs; one has
``matmul_dtype="bfloat16"`` (operands rounded to bfloat16, products
accumulated in float32; see ``seqjax.cells``). Speed: the training step
(forward, backward, SGD on mean(ys²)) and inference of ``benchmarks/peers.py``,
in interleaved rounds, as tokens/s and the paired ratio bf16 / f32. Accuracy:
at each size, the relative error (‖bf16 − f32‖ / ‖f32‖) of the outputs and of
every parameter's gradient.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp
import peers

import seqjax
from seqjax import cells

CONTENDERS = {"float32": None, "bfloat16": "bfloat16"}


def accuracy(cell_name, size) -> dict:
  """Relative errors of bf16 against f32: outputs, and each gradient of mean(ys²)."""
  make = {"lstm": cells.LSTM, "gru": cells.GRU}[cell_name]
  params = make(size["H"]).init(jax.random.key(0), size["D"])
  xs = jax.random.normal(jax.random.key(1), (size["B"], size["T"], size["D"]))
  results = {}
  for name, dtype in CONTENDERS.items():
    cell = make(size["H"], matmul_dtype=dtype)
    loss = lambda p, cell=cell: jnp.mean(seqjax.scan(cell, p, xs)[1] ** 2)
    ys = jax.jit(lambda p, cell=cell: seqjax.scan(cell, p, xs)[1])(params)
    results[name] = (ys, jax.jit(jax.grad(loss))(params))
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  (ys_bf, g_bf), (ys_32, g_32) = results["bfloat16"], results["float32"]
  return {"outputs": rel(ys_bf, ys_32),
          "gradients": {k: rel(g_bf[k], g_32[k]) for k in sorted(g_32)}}


def measure(cell_name, size_name, size, mode, rounds, calls):
  runs = {name: peers.seqjax_contender(cell_name, size, mode, matmul_dtype=dtype)
          for name, dtype in CONTENDERS.items()}
  per_round = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  ratio = [b / f for b, f in zip(per_round["bfloat16"], per_round["float32"])]
  return dict(cell=cell_name, size=size_name, mode=mode, **size,
              tokens_per_s={name: common.spread(v) for name, v in per_round.items()},
              speedup=common.spread(ratio))


def markdown(results) -> str:
  """The README table: tokens/s of both precisions, their paired ratio, bf16's error."""
  lines = ["| cell | size | mode | float32 tok/s | bfloat16 tok/s | bf16 / f32 (range) "
           "| error: outputs | error: worst gradient |", "|" + "---|" * 8]
  for r in sorted(results, key=lambda r: (r["cell"], r["size"], r["mode"])):
    tps, ratio, errors = r["tokens_per_s"], r["speedup"], r["relative_error"]
    lines.append(
        f"| {r['cell'].upper()} | ({r['size']}) B{r['B']} T{r['T']} D=H={r['H']} | {r['mode']} "
        f"| {tps['float32']['median'] / 1e3:.1f}k | {tps['bfloat16']['median'] / 1e3:.1f}k "
        f"| {ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f}) "
        f"| {errors['outputs']:.1e} | {max(errors['gradients'].values()):.1e} |")
  return "\n".join(lines)


def main(argv=None):
  parser = common.arguments(__doc__.splitlines()[0], "precision")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3)
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, "precision", markdown)
    return
  sizes = peers.QUICK_SIZES if args.quick else peers.SIZES
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  results = []
  for cell_name in peers.CELLS:
    for size_name, size in sizes.items():
      errors = accuracy(cell_name, size)
      for mode in peers.MODES:
        row = measure(cell_name, size_name, size, mode, rounds, calls)
        row["relative_error"] = errors
        results.append(row)
        tps = row["tokens_per_s"]
        print(f"{cell_name} ({size_name}) {mode}: f32 {tps['float32']['median'] / 1e3:.1f}k, "
              f"bf16 {tps['bfloat16']['median'] / 1e3:.1f}k tokens/s, bf16/f32 "
              f"{row['speedup']['median']:.2f} ({row['speedup']['min']:.2f}–"
              f"{row['speedup']['max']:.2f}); error: outputs {errors['outputs']:.1e}, "
              f"gradients <= {max(errors['gradients'].values()):.1e}", flush=True)
  common.write(args.out, "precision", dict(sizes=sizes, rounds=rounds, calls=calls), results)
  print(common.readme_table("precision", markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
