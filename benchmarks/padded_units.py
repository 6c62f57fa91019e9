"""The native kernels on padded hidden units vs the XLA path, at hidden sizes off whole registers.

    python benchmarks/padded_units.py --update-readme     # ~3 minutes on 2 CPU cores
    python benchmarks/padded_units.py --quick --out /tmp/padded_units.json

The kernels split the hidden units in AVX-512 registers of 16 floats, so
``seqjax.fused`` runs a cell whose H is not a multiple of 16 on
``seqjax.native.padded_units(H)`` units, the added ones zero throughout,
and slices H off the results. This script times ``peers.py``'s seqjax
training step and inference (``seqjax.scan``, B = 32, T = 128, D = H) at
such sizes that way (``padded``) and on the XLA path (``xla``:
``peers.seqjax_xla_contender``, traced inside ``native.disabled()``), in
interleaved rounds. Each row has both paths' tokens/s and the paired ratio
padded / xla, median and range. It stops unless the padded runs call the
kernels (their lowered HLO), so a fallback cannot pass as a measurement.
"""

from __future__ import annotations

import common
import peers

from seqjax import native

B, T = 32, 128
HIDDEN = (20, 50, 100, 200, 300)
QUICK_B, QUICK_T, QUICK_HIDDEN = 4, 8, (20,)


def measure(cell_name, size, mode, rounds, calls) -> dict:
  runs = {"padded": peers.seqjax_contender(cell_name, size, mode),
          "xla": peers.seqjax_xla_contender(cell_name, size, mode)}
  if f"seqjax_{cell_name}_forward" not in runs["padded"].lower().as_text():
    raise SystemExit(f"padded_units.py: the {cell_name} at H = {size['H']} ({mode}) does not run "
                     f"the kernels here (see native.usable)")
  runs["padded"]()  # compiled before the rounds, as the XLA run was
  tps = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  return dict(cell=cell_name, mode=mode, **size, units=native.padded_units(size["H"]),
              tokens_per_s={name: common.spread(v) for name, v in tps.items()},
              padded_vs_xla=common.spread([p / x for p, x in zip(tps["padded"], tps["xla"])]))


def markdown(results) -> str:
  """The README table: both paths' tokens/s and the paired ratio."""
  lines = ["| cell | H (run at) | mode | padded kernels tok/s | XLA path tok/s "
           "| padded / XLA (range) |", "|" + "---|" * 6]
  for r in results:
    tps = {k: f"{v['median'] / 1e3:.1f}k" for k, v in r["tokens_per_s"].items()}
    ratio = r["padded_vs_xla"]
    lines.append(f"| {r['cell'].upper()} | {r['H']} ({r['units']}) | {r['mode']} "
                 f"| {tps['padded']} | {tps['xla']} "
                 f"| {ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f}) |")
  return "\n".join(lines)


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "padded_units")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, "padded_units", markdown)
    return
  if native.status() != "ready":
    raise SystemExit(f"padded_units.py times the native kernels, which cannot run here: "
                     f"{native.status()}")
  batch, steps, hidden = (QUICK_B, QUICK_T, QUICK_HIDDEN) if args.quick else (B, T, HIDDEN)
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  config = dict(B=batch, T=steps, hidden=hidden, rounds=rounds, calls=calls,
                threads=native.threads(), reuse_freed_memory=reuse)
  results = []
  for cell_name in peers.CELLS:
    for h in hidden:
      for mode in peers.MODES:
        row = measure(cell_name, dict(B=batch, T=steps, D=h, H=h), mode, rounds, calls)
        results.append(row)
        ratio = row["padded_vs_xla"]
        print(f"{cell_name} H={h} ({row['units']}) {mode}: padded/XLA {ratio['median']:.2f}x "
              f"({ratio['min']:.2f}-{ratio['max']:.2f})", flush=True)
        common.write(args.out, "padded_units", config, results)
  print(common.readme_table("padded_units", markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
