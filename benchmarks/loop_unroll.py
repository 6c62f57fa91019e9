"""The fused loops' unroll factor: seqjax.scan LSTM and GRU throughput at each factor.

    python benchmarks/loop_unroll.py   # on a GPU (results/loop_unroll_gpu.json): ~1 min
    python benchmarks/loop_unroll.py --quick --out /tmp/loop_unroll.json

``seqjax.scan`` runs an LSTM or a reset-after GRU through :mod:`seqjax.fused`,
whose XLA loops (the forward and the backward pass's reverse loop) run
``seqjax.fused._UNROLL[backend]`` steps per loop iteration (1 where the
backend is not named). This script sets that factor to each of ``--unrolls``
in turn, traces ``peers.py``'s seqjax contender under it (training step and
inference, at the peers sizes (a) and (c), or those of ``--cells``,
``--modes`` and ``--sizes``), and times all of them in
interleaved rounds in one process. It reports each factor's median tokens/s
per group and the geometric mean of its gain over factor 1 across the groups;
the last line printed is ``BEST <factor>``.

On CPU the native kernels run these calls where they are built (the factor
changes nothing there); run with ``SEQJAX_NATIVE=0`` to time the XLA loops.
"""

from __future__ import annotations

import math

import common
import peers
from seqjax import fused, native

UNROLLS = (1, 8, 16)


def main(argv=None):
  native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "loop_unroll")
  parser.add_argument("--unrolls", type=int, nargs="+", default=list(UNROLLS),
                      help="the factors to time; gains are relative to the first")
  peers.group_arguments(parser, default_sizes="a,c")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  args = parser.parse_args(argv)
  cell_names, modes, sizes = peers.groups(parser, args)
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  backend, base = peers.backend(), args.unrolls[0]
  before = fused._UNROLL.get(backend)
  results, gains = [], {u: [] for u in args.unrolls}
  try:
    for cell in cell_names:
      for size_name, size in sizes.items():
        for mode in modes:
          runs = {}
          for u in args.unrolls:
            fused._UNROLL[backend] = u
            runs[u] = peers.seqjax_contender(cell, size, mode)
            runs[u]()  # traced and compiled with this factor
          per_round = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
          medians = {u: common.median(tps) for u, tps in per_round.items()}
          results.append(dict(cell=cell, size=size_name, mode=mode, **size,
                              tokens_per_s={str(u): m for u, m in medians.items()}))
          for u in args.unrolls:
            gains[u].append(math.log(medians[u] / medians[base]))
          print(f"{cell} ({size_name}) {mode}: " + ", ".join(
              f"unroll {u} {m / 1e3:.0f}k" for u, m in medians.items()) + " tokens/s",
              flush=True)
  finally:
    if before is None:
      fused._UNROLL.pop(backend, None)
    else:
      fused._UNROLL[backend] = before
  geomean = {str(u): math.exp(sum(g) / len(g)) for u, g in gains.items()}
  results.append(dict(geomean_gain=geomean, relative_to=base))
  config = dict(backend=backend, unrolls=args.unrolls, sizes=sizes, rounds=rounds, calls=calls,
                default_unroll=before or 1, seqjax_native=native.status())
  common.write(args.out, "loop_unroll", config, results)
  print(f"geometric mean gain over unroll {base}: "
        + ", ".join(f"{u}: {g:.2f}x" for u, g in geomean.items()))
  print("BEST", max(args.unrolls, key=lambda u: geomean[str(u)]))


if __name__ == "__main__":
  main()
