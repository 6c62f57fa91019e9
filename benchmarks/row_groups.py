"""The native loops' and samplers' two thread splits, by hidden units and by batch rows.

    python benchmarks/row_groups.py --update-readme   # ~8 minutes on 2 CPU cores
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
forward loop and, in training, for the reverse loop (whose weights are w_h
alone), from the weights those kernel calls asked it about. A row
where the ratio is below 1 and the rule picks rows (or the reverse) is one
the rule gets wrong.

The native samplers (:func:`seqjax.native.lstm_sample`,
:func:`seqjax.native.gru_sample`) split the same two ways and follow the
same rule; ``sampling.py``'s char-LM-shaped sampler (H = 512, V = 65, 1000
tokens) is timed with each split forced too, at batch 10 and 64, in float32
and, where the CPU runs them, bfloat16 and int8 matmuls (mode ``sample``,
``sample bf16``, ``sample int8``).
"""

from __future__ import annotations

import argparse

import common
import jax
import peers
import sampling

from seqjax import native

# (B, D = H, T): (c), (a) and (b) of the speed issue; H = 32 and 48 (one
# partition: split by units, one thread); B = 8, 10, 12 (4-6 rows a thread); H = 512
# and 1024 at B = 16 (weights beyond the rule's bound).
SIZES = [(16, 128, 1024), (32, 256, 128), (64, 512, 256), (16, 32, 1024), (64, 48, 512),
         (16, 64, 1024), (8, 128, 1024), (10, 128, 1024), (12, 256, 512), (16, 256, 512),
         (16, 512, 256), (16, 1024, 64)]
QUICK_SIZES = [(16, 32, 16), (4, 32, 16)]
SPLITS = ("units", "rows")
# The samplers: (batch, H, tokens), sampling.py's model (V = 65, embedding 64).
SAMPLE_SIZES = [(10, 512, 1000), (64, 512, 1000)]
QUICK_SAMPLE_SIZES = [(10, 32, 20)]
SAMPLE_DTYPES = {"sample": None, "sample bf16": "bfloat16", "sample int8": "int8"}


def contender(build, split, batch):
  """``build()``'s jitted run, traced with the split forced: ``units`` (one row
  group) or ``rows`` (a group per thread, whatever the rule says). Its
  ``lower()`` must show the native kernels with that split: a run that fell
  back to the XLA path would time no split at all. ``run.weights``: the
  weights (floats) each kernel call asked the rule about, in the order traced
  (the forward loop, then in training the reverse loop; or the sampler)."""
  groups = 1 if split == "units" else min(native.threads(), batch)
  rule, asked = native.row_groups, []

  def forced(batch, weights, cores=None):
    asked.append(weights)
    return groups
  native.row_groups = forced
  try:
    run = build()
    run()  # traced and compiled here, with this split
    if f"row_groups = {groups} : i64" not in run.lower().as_text():
      raise SystemExit(f"row_groups.py: a contender (batch {batch}) did not run the native "
                       f"kernels split {split} (row_groups = {groups}); see native.usable")
  finally:
    native.row_groups = rule
  run.weights = asked
  return run


def _timed(cell_name, mode, size, runs, loops, rounds, calls) -> dict:
  """Both splits' tokens/s in interleaved rounds, their paired ratio, and the
  rule's picks for the kernel calls the runs made, named ``loops``."""
  weights = dict(zip(loops, runs["units"].weights, strict=True))
  per_round = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  return dict(cell=cell_name, mode=mode, **size, weights=weights,
              rule_picks_rows={loop: native.row_groups(size["B"], w) > 1
                               for loop, w in weights.items()},
              tokens_per_s={split: common.spread(v) for split, v in per_round.items()},
              rows_vs_units=common.paired(per_round["rows"], per_round["units"]))


def measure(cell_name, size, mode, rounds, calls) -> dict:
  build = lambda: peers.seqjax_contender(cell_name, size, mode)
  runs = {split: contender(build, split, size["B"]) for split in SPLITS}
  loops = ("forward", "reverse") if mode == "train" else ("forward",)
  return _timed(cell_name, mode, size, runs, loops, rounds, calls)


def measure_sampler(cell_name, batch, hidden, length, mode, rounds) -> dict:
  """sampling.py's native sampler of ``mode``'s matmul dtype, each split forced.
  Both splits draw the same tokens (checked), as the tests hold them to."""
  cell = sampling.CELLS[cell_name][0](hidden, matmul_dtype=SAMPLE_DTYPES[mode])
  _, params = sampling.make_model(hidden, sampling.VOCAB, sampling.EMBED, cell_name)
  key = jax.random.key(1)
  tokens = {}

  def build(split):
    fn = sampling.sampler(cell, "native", length, batch)
    def run():
      tokens[split] = jax.block_until_ready(fn(params, key))
    run.lower = lambda: fn.lower(params, key)
    return run
  runs = {split: contender(lambda split=split: build(split), split, batch) for split in SPLITS}
  if not (tokens["units"] == tokens["rows"]).all():
    raise SystemExit(f"row_groups.py: the {cell_name} {mode} sampler drew other tokens split "
                     "by rows than by units")
  size = dict(B=batch, T=length, D=hidden, H=hidden)
  return _timed(cell_name, mode, size, runs, ("sampler",), rounds, 1)


def _picks(row) -> str:
  """The rule's split for each kernel call of the row, in the order traced:
  the forward loop's, and in training the reverse loop's (its weights are
  w_h alone); or the sampler's."""
  return ", ".join("rows" if rows else "units" for rows in row["rule_picks_rows"].values())


def markdown(results) -> str:
  """The README table: both splits' tokens/s, the paired ratio and the rule's pick."""
  lines = ["| cell | B | D = H | T | mode | units tok/s | rows tok/s | rows / units (range) "
           "| the rule picks (forward, reverse loop; sampler) |", "|" + "---|" * 9]
  for r in results:
    tps = {k: f"{v['median'] / 1e3:.1f}k" for k, v in r["tokens_per_s"].items()}
    ratio = r["rows_vs_units"]
    lines.append(f"| {r['cell'].upper()} | {r['B']} | {r['H']} | {r['T']} | {r['mode']} "
                 f"| {tps['units']} | {tps['rows']} | {ratio['median']:.2f} "
                 f"({ratio['min']:.2f}–{ratio['max']:.2f}) "
                 f"| {_picks(r)} |")
  return "\n".join(lines)


def _print(row) -> None:
  ratio = row["rows_vs_units"]
  print(f"{row['cell']} B={row['B']} H={row['H']} T={row['T']} {row['mode']}: units "
        f"{row['tokens_per_s']['units']['median'] / 1e3:.1f}k, rows "
        f"{row['tokens_per_s']['rows']['median'] / 1e3:.1f}k tokens/s, rows/units "
        f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f}); the rule picks "
        f"{_picks(row)}", flush=True)


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
  parser.add_argument("--cells", nargs="+", choices=peers.CELLS, default=list(peers.CELLS))
  parser.add_argument("--sizes", nargs="+", type=_size, default=None, metavar="B,H,T",
                      help="batch, D = H and T of each size to time (default: the full list)")
  parser.add_argument("--no-samplers", dest="samplers", action="store_false",
                      help="time the loops only, not the samplers")
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
  sample_sizes = QUICK_SAMPLE_SIZES if args.quick else SAMPLE_SIZES
  sample_modes = [m for m, dtype in SAMPLE_DTYPES.items()
                  if dtype is None or (native._bf16(dtype) if dtype == "bfloat16"
                                       else native._int8(dtype))]
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  write = lambda results: common.write(args.out, "row_groups", dict(
      sizes=sizes, sample_sizes=sample_sizes if args.samplers else [], sample_modes=sample_modes,
      rounds=rounds, calls=calls, threads=native.threads(), reuse_freed_memory=reuse), results)
  results = []
  for cell_name in args.cells:
    for b, h, t in sizes:
      for mode in peers.MODES:
        row = measure(cell_name, dict(B=b, T=t, D=h, H=h), mode, rounds, calls)
        results.append(row)
        _print(row)
        write(results)
  for cell_name in args.cells if args.samplers else ():
    for b, h, t in sample_sizes:
      for mode in sample_modes:
        row = measure_sampler(cell_name, b, h, t, mode, rounds)
        results.append(row)
        _print(row)
        write(results)
  print(common.readme_table("row_groups", markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
