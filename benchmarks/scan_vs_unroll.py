"""Scan against unrolled recurrence: compile time and run time against sequence length.

    python benchmarks/scan_vs_unroll.py            # ~30 minutes on 2 CPU cores
    python benchmarks/scan_vs_unroll.py --quick --out /tmp/svu.json

For Elman, LSTM and GRU (B=16, D=H=128) and T in {16, 64, 256, 1024, 4096} it
measures ``seqjax.scan`` with ``unroll`` in {1, 2, 4, 8, 16} and, for T <= 256,
the fully unrolled Python loop (``seqjax.unroll``):

- compile time: ``jax.jit(f).lower(...).compile()``, timed on its own (a fresh
  function each time, so nothing is cached);
- forward time and training time (value and gradient of mean(ys ** 2) with
  respect to the parameters): the median of repeated calls after compiling.

The process keeps the memory it frees for reuse (``native.reuse_freed_memory``,
as ``seqjax train`` and the other benchmarks do).

Writes JSON (after each cell, so a run cut short keeps the cells it finished)
and two PNGs named after it (``<stem>_time.png``, ``<stem>_compile.png``): run
time vs T and compile time vs T, one panel per cell.
"""

from __future__ import annotations

import time

import common
import jax

import seqjax
from seqjax import cells, fused, native

CELLS = {"elman": cells.Elman, "lstm": cells.LSTM, "gru": cells.GRU}
LENGTHS = (16, 64, 256, 1024, 4096)
UNROLLS = (1, 2, 4, 8, 16)
FULL_UNROLL_MAX_T = 256


def _functions(cell, method, unroll):
  def forward(params, xs):
    return seqjax.run(cell, params, xs, method=method, unroll=unroll)[1]

  def train(params, xs):
    return jax.value_and_grad(lambda p: common.loss(forward(p, xs)))(params)
  return {"forward": forward, "train": train}


def measure(cell_name, t, method, unroll, batch, hidden, repeats):
  cell = CELLS[cell_name](hidden)
  params = cell.init(jax.random.key(0), hidden)
  xs = jax.random.normal(jax.random.key(1), (batch, t, hidden))
  row = dict(cell=cell_name, T=t, method=method, unroll=unroll if method == "scan" else t,
             B=batch, H=hidden)
  for kind, fn in _functions(cell, method, unroll).items():
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(params, xs)
    compiled = lowered.compile()
    row[f"{kind}_compile_s"] = time.perf_counter() - start
    jax.block_until_ready(compiled(params, xs))  # warm-up
    times = common.time_calls(lambda: jax.block_until_ready(compiled(params, xs)), repeats)
    row[f"{kind}_s"] = common.median(times)
    row[f"{kind}_tokens_per_s"] = batch * t / row[f"{kind}_s"]
  return row


def plot(results, folder, stem="scan_vs_unroll"):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  cell_names = sorted({r["cell"] for r in results})
  for quantity, label, name in (("train_s", "training step (s)", f"{stem}_time.png"),
                                ("train_compile_s", "compile time, training (s)",
                                 f"{stem}_compile.png")):
    fig, axes = plt.subplots(1, len(cell_names), figsize=(5 * len(cell_names), 4),
                             squeeze=False)
    for ax, cell_name in zip(axes[0], cell_names):
      rows = [r for r in results if r["cell"] == cell_name]
      variants = sorted({(r["method"], r["unroll"] if r["method"] == "scan" else 0)
                         for r in rows})
      for method, unroll in variants:
        pts = sorted((r["T"], r[quantity]) for r in rows if r["method"] == method and
                     (method != "scan" or r["unroll"] == unroll))
        ax.plot(*zip(*pts), marker="o",
                label=f"scan unroll={unroll}" if method == "scan" else "fully unrolled")
      ax.set(xscale="log", yscale="log", xlabel="T", ylabel=label, title=cell_name.upper())
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, folder / name)
    print(f"wrote {folder / name}")


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "scan_vs_unroll")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS),
                      help="sequence lengths T")
  parser.add_argument("--unrolls", type=int, nargs="+", default=list(UNROLLS),
                      help="scan's unroll factors")
  parser.add_argument("--full-unroll-max-t", type=int, default=FULL_UNROLL_MAX_T,
                      help="time the fully unrolled loop up to this T")
  parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
  args = parser.parse_args(argv)
  if args.quick:
    lengths, unrolls, batch, hidden, repeats, full_max = (8, 16), (1, 2), 2, 4, 1, 16
  else:
    lengths, unrolls, batch, hidden, repeats, full_max = (
        tuple(args.lengths), tuple(args.unrolls), 16, 128, args.repeats, args.full_unroll_max_t)
  config = dict(cells=args.cells, lengths=lengths, unrolls=unrolls, B=batch, D=hidden, H=hidden,
                repeats=repeats, full_unroll_max_t=full_max, reuse_freed_memory=reuse,
                fused_loop_unroll=fused._unroll())  # the unroll=1 rows' fused loops
  results = []
  for cell_name in args.cells:
    for t in lengths:
      variants = [("scan", u) for u in unrolls]
      if t <= full_max:
        variants.append(("unroll", 1))
      for method, unroll in variants:
        row = measure(cell_name, t, method, unroll, batch, hidden, repeats)
        results.append(row)
        print(f"{cell_name} T={t} {method} unroll={row['unroll']}: train "
              f"{row['train_s'] * 1e3:.2f} ms (compile {row['train_compile_s']:.2f} s), "
              f"forward {row['forward_s'] * 1e3:.2f} ms", flush=True)
    common.write(args.out, "scan_vs_unroll", config, results)  # each cell's, as it ends
  plot(results, args.plots or args.out.parent, args.out.stem)


if __name__ == "__main__":
  main()
