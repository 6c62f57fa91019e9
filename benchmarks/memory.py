"""Peak memory and time of full backpropagation through long sequences, with and without remat.

    python benchmarks/memory.py --update-readme   # ~4-10 minutes on 2 CPU cores
    python benchmarks/memory.py --quick --out /tmp/memory.json

The model is a char-LM trained on one unbroken sequence (no truncation): a
65-symbol embedding (64 wide), an LSTM with H=512, a read-out to 65 logits and
the cross-entropy of every next token, batch 16. One training step (loss,
gradients of every parameter, SGD update) runs through
:func:`seqjax.chunked` in chunks of ``--chunk`` steps, the embedding, the
read-out and the loss inside each chunk, so nothing [T, B, H]-sized is kept
outside the recurrence:

- ``stored``: ``remat=False``, reverse mode keeps every step's activations;
- ``remat``: ``remat=True``, it keeps the carry at each chunk start and
  recomputes one chunk's forward at a time in the backward pass.

The two run the same arithmetic; only what is kept differs. Each (variant,
T) runs in a fresh process, which reports:

- XLA's buffer plan of the compiled step (``memory_analysis()``: arguments,
  outputs and temporaries), which needs no run; and, where that plan fits in
  ``--max-gib``,
- the process's peak resident memory (``VmHWM``: everything, the JAX runtime
  and the compiler included) and the median wall time of a training step.

On a GPU the peak that matters is the device's: each row then also holds the
allocator's ``peak_bytes_in_use`` (``memory_stats()``), which the table, the
plot and the printout show instead of the host's, and the README table is
``memory_gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import common

VOCAB, EMBED, HIDDEN, BATCH = 65, 64, 512, 16
VARIANTS = ("stored", "remat")
GIB = 2.0 ** 30


def _rss_bytes(field: str) -> int:
  """A ``Vm*`` line of /proc/self/status, in bytes."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def measure(variant: str, steps: int, hidden: int, batch: int, chunk: int, max_gib: float,
            repeats: int) -> dict:
  """One configuration, in this process: the memory plan, then (if it fits) a timed run."""
  import jax  # noqa: PLC0415 - a worker imports JAX in its own process
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  import sampling  # noqa: PLC0415 - the same char-LM-shaped model
  import seqjax  # noqa: PLC0415

  cell, params = sampling.make_model(hidden, VOCAB, EMBED)
  tokens = jax.random.randint(jax.random.key(1), (steps + 1, batch), 0, VOCAB)  # time-major
  optimizer = optax.sgd(0.1)

  def chunk_loss(params, carry, chunk_tokens):
    inputs, targets = chunk_tokens
    xs = params["embed"][inputs]  # [K, B, E]
    carry, hs = seqjax.scan(cell, params["cell"], xs, carry, time_major=True)
    logits = hs @ params["out_w"] + params["out_b"]  # [K, B, V]
    return carry, optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  def loss(params, tokens):
    _, losses = seqjax.chunked(
        lambda carry, c: chunk_loss(params, carry, c), cell.initial_carry((batch,)),
        (tokens[:-1], tokens[1:]), chunk=chunk, remat=variant == "remat")
    return jnp.mean(losses)

  @jax.jit
  def train_step(params, opt_state, tokens):
    value, grads = jax.value_and_grad(loss)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = optimizer.init(params)
  start = time.perf_counter()
  compiled = train_step.lower(params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - start
  plan = compiled.memory_analysis()
  planned = plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
  row = dict(variant=variant, T=steps, B=batch, H=hidden, chunk=chunk, compile_s=compile_s,
             backend=jax.default_backend(),
             xla_plan_bytes=dict(arguments=plan.argument_size_in_bytes,
                                 outputs=plan.output_size_in_bytes,
                                 temporaries=plan.temp_size_in_bytes, total=planned))
  if planned > max_gib * GIB:
    row["skipped"] = f"XLA plans {planned / GIB:.1f} GiB, over --max-gib {max_gib}"
    return row

  # The step's own peak: resident memory sampled every millisecond while it runs.
  before = _rss_bytes("VmRSS")
  peak = [before]
  running = threading.Event()
  running.set()

  def sample():
    while running.is_set():
      peak[0] = max(peak[0], _rss_bytes("VmRSS"))
      time.sleep(0.001)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  times, losses = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    _, _, value = jax.block_until_ready(compiled(params, opt_state, tokens))
    times.append(time.perf_counter() - start)
    losses.append(float(value))
  running.clear()
  sampler.join()
  row.update(step_s=common.spread(times), tokens_per_s=batch * steps / common.median(times),
             loss=losses[0], peak_rss_bytes=_rss_bytes("VmHWM"),
             rss_before_step_bytes=before, step_rss_increase_bytes=peak[0] - before)
  if row["backend"] != "cpu":
    row["peak_device_bytes"] = jax.local_devices()[0].memory_stats()["peak_bytes_in_use"]
  return row


def _peak(row) -> int:
  """The row's peak memory: the device's where it ran on one, else the process's RSS."""
  return row.get("peak_device_bytes", row["peak_rss_bytes"])


def _peak_name(results) -> str:
  return "peak device memory" if any("peak_device_bytes" in r for r in results) else "peak RSS"


def _marker(results) -> str:
  """The README table's marker: ``memory``, or ``memory_gpu`` for a GPU run."""
  backends = {r.get("backend", "cpu") for r in results} - {"cpu"}
  return common.on_backend("memory", backends.pop() if backends else "cpu")


def _worker(argv) -> None:
  """``--worker JSON``: measures one configuration and prints its row.

  The process keeps the memory it frees for reuse, as ``seqjax train`` does
  (:func:`seqjax.native.reuse_freed_memory`, before JAX starts its threads);
  the row records whether that applied."""
  from seqjax import native  # noqa: PLC0415 - the worker's own process

  reuse = native.reuse_freed_memory()
  row = measure(**json.loads(argv[argv.index("--worker") + 1]))
  print(json.dumps(dict(row, reuse_freed_memory=reuse)))


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}" if n >= 0.01 * GIB else f"{n / 2 ** 20:.1f} MiB"


def markdown(results) -> str:
  """The README table: one row per T, the two variants side by side."""
  by = {(r["variant"], r["T"]): r for r in results}
  peak = _peak_name(results)
  lines = [f"| T | stored: {peak} (XLA plan), GiB | stored: s/step | remat: {peak} "
           "(XLA plan), GiB | remat: s/step | remat / stored time |", "|---|---|---|---|---|---|"]
  for t in sorted({r["T"] for r in results}):
    cells, times = [], {}
    for variant in VARIANTS:
      r = by.get((variant, t))
      if r is None:
        cells += ["—", "—"]
        continue
      plan = _gib(r["xla_plan_bytes"]["total"])
      if "skipped" in r:
        cells += [f"not run ({plan} planned)", "—"]
      else:
        times[variant] = r["step_s"]["median"]
        cells += [f"{_gib(_peak(r))} ({plan})", f"{times[variant]:.2f}"]
    ratio = (f"{times['remat'] / times['stored']:.2f}" if len(times) == 2 else "—")
    lines.append(f"| {t:,} | " + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines)


def plot(results, path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
  for variant, color in zip(VARIANTS, ("tab:red", "tab:blue")):
    rows = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["T"])
    ax_mem.plot([r["T"] for r in rows], [r["xla_plan_bytes"]["total"] / GIB for r in rows],
                "--", color=color, label=f"{variant}: XLA plan")
    ran = [r for r in rows if "skipped" not in r]
    ax_mem.plot([r["T"] for r in ran], [_peak(r) / GIB for r in ran], "o-",
                color=color, label=f"{variant}: {_peak_name(results)}")
    ax_time.plot([r["T"] for r in ran], [r["step_s"]["median"] for r in ran], "o-",
                 color=color, label=variant)
  ax_mem.axhline(2.0, color="gray", lw=0.8)
  ax_mem.set(xscale="log", yscale="log", xlabel="T (steps, full backpropagation)",
             ylabel="GiB", title="Peak memory of a training step")
  ax_time.set(xscale="log", yscale="log", xlabel="T", ylabel="seconds",
              title="Training step time")
  for ax in (ax_mem, ax_time):
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  common.save_figure(fig, path, dpi=110)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--worker" in argv:
    return _worker(argv)
  # The results' name waits for the first row's backend: JAX starts in the
  # workers only (on a GPU it would take the device's memory here).
  parser = common.arguments(__doc__.splitlines()[0], "memory", per_backend=False)
  parser.set_defaults(out=None)
  common.table_arguments(parser)
  parser.add_argument("--steps", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                      help="sequence lengths T")
  parser.add_argument("--chunk", type=int, default=256, help="steps per chunk")
  parser.add_argument("--max-gib", type=float, default=8.0,
                      help="run only configurations XLA plans within this many GiB")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed steps per configuration (1 for T > 4096)")
  args = parser.parse_args(argv)
  if args.table_from:
    return common.table_from(args.table_from, lambda saved: _marker(saved["results"]), markdown)
  if args.quick:
    steps, hidden, batch, chunk, repeats = [256], 32, 4, 16, 2
  else:
    steps, hidden, batch, chunk, repeats = args.steps, HIDDEN, BATCH, args.chunk, args.repeats
  config = dict(vocab=VOCAB, embed=EMBED, H=hidden, B=batch, chunk=chunk, steps=steps,
                max_gib=args.max_gib, repeats=repeats)
  results = []
  for t in steps:
    for variant in VARIANTS:
      job = dict(variant=variant, steps=t, hidden=hidden, batch=batch, chunk=chunk,
                 max_gib=args.max_gib, repeats=repeats if t <= 4096 else 1)
      done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                            capture_output=True, text=True, check=False,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
      if done.returncode != 0:
        raise SystemExit(f"memory benchmark: {variant} at T={t} failed:\n"
                         f"{done.stderr[-3000:]}")
      row = json.loads(done.stdout.strip().splitlines()[-1])
      results.append(row)
      if "skipped" in row:
        print(f"T={t:>6} {variant:>6}: {row['skipped']}", flush=True)
      else:
        print(f"T={t:>6} {variant:>6}: {_peak_name([row])} {_peak(row) / GIB:.2f} GiB, "
              f"XLA plan {row['xla_plan_bytes']['total'] / GIB:.2f} GiB, "
              f"{row['step_s']['median']:.2f} s/step, loss {row['loss']:.4f}", flush=True)
      out = args.out or common.results_path("memory", row["backend"])
      common.write(out, "memory", config, results)  # a run cut short keeps these
  plot(results, (args.plots or out.parent) / f"{out.stem}.png")
  print(common.readme_table(_marker(results), markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
