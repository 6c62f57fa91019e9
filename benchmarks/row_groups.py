"""The native loops' two thread splits, by hidden units and by batch rows, side by side.

    python benchmarks/row_groups.py --update-readme   # ~5 minutes on 2 CPU cores
    python benchmarks/row_groups.py --quick --out /tmp/row_groups.json

The native LSTM and GRU loops (``seqjax.native``) share a call's work among
threads in one of two ways. By units (:func:`seqjax.native.partitions`):
each thread owns some hidden units' gate columns, and the threads meet every
step to exchange h. By rows: each thread runs every step of its own rows of
the batch and meets no other, but reads all the weights every step.
:func:`seqjax.native.row_groups` picks rows when each thread gets at least 5
rows and the weights stay in its caches. This script
times ``seqjax.scan``'s training step and inference (as ``peers.py`` does)
with each split forced, in interleaved rounds, over batch sizes and widths
on both sides of that rule. Each row has both splits' tokens/s, the paired
ratio rows / units, and ``rule_picks_rows``: the rule's choice for the
forward loop and for the reverse loop (whose weights are w_h alone). A row
where the ratio is below 1 and the rule picks rows (or the reverse) is one
the rule gets wrong.
"""

from __future__ import annotations

import argparse

import common
import jax
import peers

from seqjax import native

# (B, D = H, T): (c), (a) and (b) of the speed issue; H = 32 and 48 (one
# partition: split by units, one thread); B = 8, 10, 12 (4-6 rows a thread); H = 512
# and 1024 at B = 16 (weights beyond the rule's bound).
SIZES = [(16, 128, 1024), (32, 256, 128), (64, 512, 256), (16, 32, 1024), (64, 48, 512),
         (16, 64, 1024), (8, 128, 1024), (10, 128, 1024), (12, 256, 512), (16, 256, 512),
         (16, 512, 256), (16, 1024, 64)]
QUICK_SIZES = [(16, 32, 16), (4, 32, 16)]
SPLITS = ("units", "rows")
GATES = {"lstm": 4, "gru": 3}


def contender(cell_name, size, mode, split):
  """peers.py's seqjax contender, traced with the loops' split forced: ``units``
  (one row group) or ``rows`` (a group per thread, whatever the rule says)."""
  groups = 1 if split == "units" else min(native.threads(), size["B"])
  rule = native.row_groups
  native.row_groups = lambda batch, weights, cores=None: groups
  try:
    run = peers.seqjax_contender(cell_name, size, mode)
    run()  # traced and compiled here, with this split
  finally:
    native.row_groups = rule
  return run


def measure(cell_name, size, mode, rounds, calls) -> dict:
  runs = {split: contender(cell_name, size, mode, split) for split in SPLITS}
  per_round = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  columns = GATES[cell_name] * size["H"]
  weights = {"forward": (size["D"] + size["H"]) * columns, "reverse": size["H"] * columns}
  return dict(cell=cell_name, mode=mode, **size, weights=weights,
              rule_picks_rows={loop: native.row_groups(size["B"], w) > 1
                               for loop, w in weights.items()},
              tokens_per_s={split: common.spread(v) for split, v in per_round.items()},
              rows_vs_units=common.spread([r / u for r, u in zip(per_round["rows"],
                                                                 per_round["units"])]))


def _picks(row) -> str:
  """The rule's split for the row's loops: the forward loop's, and in training
  the reverse loop's (its weights are w_h alone)."""
  loops = ("forward", "reverse") if row["mode"] == "train" else ("forward",)
  return ", ".join("rows" if row["rule_picks_rows"][loop] else "units" for loop in loops)


def markdown(results) -> str:
  """The README table: both splits' tokens/s, the paired ratio and the rule's pick."""
  lines = ["| cell | B | D = H | T | mode | units tok/s | rows tok/s | rows / units (range) "
           "| the rule picks (forward, reverse loop) |", "|" + "---|" * 9]
  for r in results:
    tps = {k: f"{v['median'] / 1e3:.1f}k" for k, v in r["tokens_per_s"].items()}
    ratio = r["rows_vs_units"]
    lines.append(f"| {r['cell'].upper()} | {r['B']} | {r['H']} | {r['T']} | {r['mode']} "
                 f"| {tps['units']} | {tps['rows']} | {ratio['median']:.2f} "
                 f"({ratio['min']:.2f}–{ratio['max']:.2f}) "
                 f"| {_picks(r)} |")
  return "\n".join(lines)


def _size(text: str) -> tuple[int, int, int]:
  """``"B,H,T"`` as ``(B, H, T)``: a size of ``--sizes``."""
  try:
    b, h, t = (int(part) for part in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a size is three integers B,H,T (batch, D = H, steps), "
                                     f"got {text!r}") from None
  return b, h, t


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "row_groups")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--cells", nargs="+", choices=sorted(GATES), default=["lstm", "gru"])
  parser.add_argument("--sizes", nargs="+", type=_size, default=None, metavar="B,H,T",
                      help="batch, D = H and T of each size to time (default: the full list)")
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, "row_groups", markdown)
    return
  if native.status() != "ready" or jax.default_backend() != "cpu":
    raise SystemExit(f"row_groups.py times the native CPU kernels, and they cannot run here "
                     f"(seqjax.native.status(): {native.status()!r}, backend "
                     f"{jax.default_backend()!r})")
  sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  results = []
  for cell_name in args.cells:
    for b, h, t in sizes:
      for mode in peers.MODES:
        row = measure(cell_name, dict(B=b, T=t, D=h, H=h), mode, rounds, calls)
        results.append(row)
        ratio = row["rows_vs_units"]
        print(f"{cell_name} B={b} H={h} T={t} {mode}: units "
              f"{row['tokens_per_s']['units']['median'] / 1e3:.1f}k, rows "
              f"{row['tokens_per_s']['rows']['median'] / 1e3:.1f}k tokens/s, rows/units "
              f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f}); the rule picks "
              f"{_picks(row)}", flush=True)
        common.write(args.out, "row_groups", dict(sizes=sizes, rounds=rounds, calls=calls,
                                                  threads=native.threads(),
                                                  reuse_freed_memory=reuse), results)
  print(common.readme_table("row_groups", markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
