"""bfloat16 matmuls against float32: LSTM and GRU speed, and what it costs in accuracy.

    python benchmarks/precision.py                # sizes (a)(b)(c), ~5 minutes on 2 CPU cores
    python benchmarks/precision.py --quick --out /tmp/precision.json
    python benchmarks/precision.py --table-from benchmarks/results/precision.json   # README only

The seqjax contenders are ``seqjax.scan`` on float32 parameters and inputs;
one has ``matmul_dtype="bfloat16"`` (operands rounded to bfloat16, products
accumulated in float32; see ``seqjax.cells``). torch's ``nn.LSTM``/``nn.GRU``
runs in the same rounds, in float32 and under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` (torch's CPU mixed precision), so bfloat16 is also
compared with bfloat16. Speed: the training step (forward, backward, SGD on mean(ys²)) and
inference of ``benchmarks/peers.py``, in interleaved rounds, as tokens/s and
the paired ratios seqjax bf16 / f32, seqjax bf16 / torch bf16 and torch bf16 /
f32. Accuracy: at each size, the relative error (‖bf16 − f32‖ / ‖f32‖) of the
outputs and of every parameter's gradient, for each library against its own
float32.
"""

from __future__ import annotations

import common
import jax
import numpy as np
import peers

from seqjax import native

CONTENDERS = {"float32": None, "bfloat16": "bfloat16"}  # seqjax's matmul_dtype
TORCH = {"torch_float32": None, "torch_bfloat16": "bfloat16"}  # torch's autocast dtype


def accuracy(cell_name, size) -> dict:
  """Relative errors of bf16 against f32: outputs, and each gradient of mean(ys²)."""
  results = {}
  for name, dtype in CONTENDERS.items():  # the same parameters and inputs for both
    forward, params, xs = peers.seqjax_problem(cell_name, size, dtype)
    results[name] = (jax.jit(forward)(params, xs), jax.jit(peers.gradient(forward))(params, xs))
  return _relative_errors(results["bfloat16"], results["float32"])


def _relative_errors(low, full) -> dict:
  """‖low − full‖ / ‖full‖ of the outputs and of each gradient; ``low`` and
  ``full`` are (outputs, {name: gradient}) as NumPy-convertible arrays."""
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           / np.linalg.norm(np.asarray(b, np.float64)))
  (ys_low, g_low), (ys_full, g_full) = low, full
  return {"outputs": rel(ys_low, ys_full),
          "gradients": {k: rel(g_low[k], g_full[k]) for k in sorted(g_full)}}


def torch_accuracy(cell_name, size) -> dict:
  """Relative errors of torch's bfloat16 autocast against its float32, as above."""
  results = {}
  for name, autocast in TORCH.items():
    module, xs = peers.torch_module(cell_name, size)
    ys = peers.torch_forward(module, xs, autocast)
    common.loss(ys).backward()
    results[name] = (ys.detach().cpu().numpy(),
                     {k: p.grad.cpu().numpy() for k, p in module.named_parameters()})
  return _relative_errors(results["torch_bfloat16"], results["torch_float32"])


def measure(cell_name, size_name, size, mode, rounds, calls):
  runs = {name: peers.seqjax_contender(cell_name, size, mode, matmul_dtype=dtype)
          for name, dtype in CONTENDERS.items()}
  runs.update({name: peers.torch_contender(cell_name, size, mode, autocast=dtype)
               for name, dtype in TORCH.items()})
  per_round = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  ratio = lambda a, b: common.paired(per_round[a], per_round[b])
  return dict(cell=cell_name, size=size_name, mode=mode, **size,
              tokens_per_s={name: common.spread(v) for name, v in per_round.items()},
              speedup=ratio("bfloat16", "float32"),
              vs_torch_bfloat16=ratio("bfloat16", "torch_bfloat16"),
              torch_speedup=ratio("torch_bfloat16", "torch_float32"))


def markdown(results) -> str:
  """The README table: tokens/s of both precisions and their paired ratio,
  seqjax's and torch's; seqjax bf16 against torch bf16; each one's bf16 error
  (outputs, worst gradient)."""
  lines = ["| cell | size | mode | seqjax f32 tok/s | seqjax bf16 tok/s | bf16 / f32 (range) "
           "| torch f32 tok/s | torch bf16 tok/s (seqjax bf16 ×) | torch bf16 / f32 "
           "| bf16 error, seqjax: outputs, worst gradient | torch: outputs, worst gradient |",
           "|" + "---|" * 11]
  inline = lambda x: f"{x['median']:.2f}, {x['min']:.2f}–{x['max']:.2f}"
  spread = lambda x: f"{x['median']:.2f} ({x['min']:.2f}–{x['max']:.2f})"
  errors = lambda e: f"{e['outputs']:.1e}, {max(e['gradients'].values()):.1e}"
  for r in sorted(results, key=lambda r: (r["cell"], r["size"], r["mode"])):
    tps = {k: f"{v['median'] / 1e3:.1f}k" for k, v in r["tokens_per_s"].items()}
    lines.append(
        f"| {r['cell'].upper()} | ({r['size']}) B{r['B']} T{r['T']} D=H={r['H']} | {r['mode']} "
        f"| {tps['float32']} | {tps['bfloat16']} | {spread(r['speedup'])} "
        f"| {tps['torch_float32']} | {tps['torch_bfloat16']} ({inline(r['vs_torch_bfloat16'])}) "
        f"| {spread(r['torch_speedup'])} "
        f"| {errors(r['relative_error'])} | {errors(r['torch_relative_error'])} |")
  return "\n".join(lines)


def _marker(config) -> str:
  """The README table's marker: ``precision``, or ``precision_gpu`` for results
  measured on a GPU (a results file from before the config named its backend: CPU)."""
  return common.on_backend("precision", config.get("backend", "cpu"))


def main(argv=None):
  reuse = native.reuse_freed_memory()  # as in peers.py: first, for every contender
  parser = common.arguments(__doc__.splitlines()[0], "precision")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3)
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, lambda saved: _marker(saved["config"]), markdown)
    return
  sizes = peers.QUICK_SIZES if args.quick else peers.SIZES
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  results = []
  for cell_name in peers.CELLS:
    for size_name, size in sizes.items():
      errors, torch_errors = accuracy(cell_name, size), torch_accuracy(cell_name, size)
      for mode in peers.MODES:
        row = measure(cell_name, size_name, size, mode, rounds, calls)
        row["relative_error"], row["torch_relative_error"] = errors, torch_errors
        results.append(row)
        tps = {k: v["median"] / 1e3 for k, v in row["tokens_per_s"].items()}
        print(f"{cell_name} ({size_name}) {mode}: f32 {tps['float32']:.1f}k, "
              f"bf16 {tps['bfloat16']:.1f}k tokens/s, bf16/f32 "
              f"{row['speedup']['median']:.2f} ({row['speedup']['min']:.2f}–"
              f"{row['speedup']['max']:.2f}); torch f32 {tps['torch_float32']:.1f}k, bf16 "
              f"{tps['torch_bfloat16']:.1f}k; seqjax bf16 / torch bf16 "
              f"{row['vs_torch_bfloat16']['median']:.2f}; error: outputs "
              f"{errors['outputs']:.1e}, gradients <= {max(errors['gradients'].values()):.1e} "
              f"(torch: {torch_errors['outputs']:.1e}, "
              f"{max(torch_errors['gradients'].values()):.1e})", flush=True)
  config = dict(sizes=sizes, rounds=rounds, calls=calls, backend=jax.default_backend(),
                reuse_freed_memory=reuse)
  common.write(args.out, "precision", config, results)
  print(common.readme_table(_marker(config), markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
