"""Validation loss against training time of char-LM runs: the quality benchmark.

    python benchmarks/charlm_curves.py --run "10 min=/tmp/seqjax/shakespeare" \\
        --run "1 hour=/tmp/seqjax/shakespeare_large" --out benchmarks/results/charlm_shakespeare.json
    python benchmarks/charlm_curves.py --quick --out /tmp/curves.json   # trains a tiny run first

Each ``--run LABEL=WORKDIR`` names a finished ``seqjax train`` workdir (the
README gives the commands). The script reads its ``metrics.jsonl`` (validation
loss at every evaluation, with the seconds spent in training steps so far:
compilation included, evaluation and checkpoints not) and its last checkpoint
(the config, and the parameter count), and writes:

- JSON: per run, the curve, the final validation and test numbers, and the
  training time at which validation first reached 1.50 and 1.40 nats/char;
- a PNG beside it: validation nats/char against training minutes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import common

TARGETS = (1.50, 1.40)  # nats/char, the char-LM issue's marks


def read_run(label: str, workdir: Path) -> dict:
  import jax  # noqa: PLC0415 - JAX loads after argument parsing
  from seqjax.train import loop  # noqa: PLC0415

  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  # A resumed run logs again the steps after its checkpoint: the later records count.
  lines = list({(x["step"], x["split"]): x for x in records}.values())
  lines.sort(key=lambda x: x["step"])
  curve = [{k: x[k] for k in ("step", "train_time", "wall_time", "loss", "bits")}
           for x in lines if x["split"] == "validation"]
  if not curve:
    raise ValueError(f"{workdir} has no validation results in metrics.jsonl")
  last_step = max(x["step"] for x in lines)
  final = {x["split"]: {k: x[k] for k in ("loss", "bits", "accuracy")}
           for x in lines if x["split"] != "train" and x["step"] == last_step}
  trained = loop.load_trained(workdir)
  params = sum(int(p.size) for p in jax.tree.leaves(trained.params))
  reached = {}
  for target in TARGETS:
    below = [x["train_time"] for x in curve if x["loss"] <= target]
    reached[f"{target:.2f}"] = below[0] if below else None
  return {"label": label, "workdir": str(workdir), "step": last_step, "params": params,
          "model": trained.config.model.to_dict(), "data": trained.config.data.to_dict(),
          "optimizer": trained.config.optimizer.to_dict(),
          "train_time": curve[-1]["train_time"], "curve": curve, "final": final,
          "first_train_time_at_or_below": reached}


def plot(results: list, path: Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in results:
    minutes = [x["train_time"] / 60 for x in run["curve"]]
    ax.plot(minutes, [x["loss"] for x in run["curve"]], marker="o", markersize=3,
            label=f"{run['label']} ({run['params'] / 1e6:.2f}M params)")
  for target in TARGETS:
    ax.axhline(target, color="grey", linestyle=":", linewidth=1)
  for minutes in (10, 60):
    ax.axvline(minutes, color="grey", linestyle="--", linewidth=0.8)
  ax.set_xlabel("training time (minutes; compilation included, evaluation not)")
  ax.set_ylabel("validation loss (nats/char)")
  ax.set_ylim(top=min(2.2, ax.get_ylim()[1]))
  ax.set_title("char-LM on Tiny Shakespeare, 2 CPU cores")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  common.save_figure(fig, path)
  print(f"wrote {path}", file=sys.stderr)


def _quick_run(folder: Path) -> Path:
  """A few steps of the embedded-corpus char-LM, so the script has a run to read."""
  from seqjax.cli import load_config  # noqa: PLC0415
  from seqjax.train import loop  # noqa: PLC0415

  workdir = folder / "quick"
  config = load_config("charlm", quick=True)
  loop.train_and_evaluate(config, workdir, log=lambda m: None)
  return workdir


def main(argv=None):
  parser = common.arguments(__doc__.splitlines()[0], "charlm_curves", per_backend=False)
  parser.add_argument("--run", action="append", default=[], metavar="LABEL=WORKDIR",
                      help="a finished training run (repeatable)")
  args = parser.parse_args(argv)
  runs = [item.split("=", 1) for item in args.run]
  if any(len(r) != 2 for r in runs):
    parser.error("--run takes LABEL=WORKDIR")
  with tempfile.TemporaryDirectory() as folder:
    if args.quick:
      runs.append(("quick", str(_quick_run(Path(folder)))))
    if not runs:
      parser.error("give at least one --run LABEL=WORKDIR (or --quick)")
    results = [read_run(label, Path(workdir)) for label, workdir in runs]
  for run in results:
    times = ", ".join(f"<= {t}: {'-' if s is None else f'{s / 60:.1f} min'}"
                      for t, s in run["first_train_time_at_or_below"].items())
    finals = ", ".join(f"{split} {m['loss']:.4f}" for split, m in run["final"].items())
    print(f"{run['label']}: {finals} nats/char after {run['train_time'] / 60:.1f} min "
          f"({times})")
  common.write(args.out, "charlm_curves", {"targets": TARGETS}, results)
  plot(results, (args.plots or Path(args.out).parent) / f"{Path(args.out).stem}.png")


if __name__ == "__main__":
  main()
