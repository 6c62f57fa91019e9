"""How steady short kernel calls are: each call's wall time, not just the median.

    python benchmarks/call_times.py               # ~1 minute on 2 CPU cores
    python benchmarks/call_times.py --quick --out /tmp/call_times.json

The native kernels split every step between threads, so a call whose threads
do not all run when it needs them (a worker still asleep when the call
starts, or off its core between steps) can take far longer than its median.
Medians (the other benchmarks) do not show that; this script times every
call of a training step (value and gradient of mean(ys^2) through
``seqjax.scan``, LSTM and GRU, B=16, D=H=128, T=16 and 64) and reports the
distribution, in three settings:

- ``after_compile``: 8 calls back to back right after each of 4 fresh
  compiles (a new function each time);
- ``after_pause``: 8 calls after each compile, each after a pause of
  ``--pause-ms`` (5 ms; a training loop's other work between steps), so the
  threads may have gone to sleep;
- ``in_a_row``: ``--calls`` (200) calls back to back.

Each row: median, mean, 90th percentile and slowest call in ms, and
``slow_calls``: how many took over 3x the setting's median. The process keeps
the memory it frees for reuse (``native.reuse_freed_memory``, as ``seqjax
train`` and the other benchmarks do).
"""

from __future__ import annotations

import time

import common
import jax
import jax.numpy as jnp
import numpy as np

import seqjax
from seqjax import cells, native

CELLS = {"lstm": cells.LSTM, "gru": cells.GRU}
BATCH, HIDDEN, STEPS = 16, 128, (16, 64)
COMPILES, PER_COMPILE = 4, 8
QUICK_HIDDEN, QUICK_STEPS = 32, (4,)


def timed(fn, args, pause_s=0.0):
  """Wall time of one blocking call of ``fn(*args)``, after ``pause_s`` of sleep."""
  if pause_s:
    time.sleep(pause_s)
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def summary(seconds) -> dict:
  ms = np.asarray(seconds) * 1e3
  median = float(np.median(ms))
  return dict(calls=int(ms.size), median_ms=median, mean_ms=float(ms.mean()),
              p90_ms=float(np.percentile(ms, 90)), max_ms=float(ms.max()),
              slow_calls=int((ms > 3 * median).sum()))


def measure(kind, steps, hidden, calls, pause_s, compiles, per_compile):
  """``{setting: [seconds, ...]}`` for one cell and length."""
  cell = CELLS[kind](hidden)
  params = cell.init(jax.random.key(0), hidden, jnp.float32)
  xs = jax.random.normal(jax.random.key(1), (BATCH, steps, hidden), jnp.float32)
  times = {"after_compile": [], "after_pause": [], "in_a_row": []}
  for fresh in range(compiles):
    loss = lambda p, x, fresh=fresh: common.loss(seqjax.scan(cell, p, x)[1]) + fresh
    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params, xs))  # compiles
    times["after_compile"] += [timed(step, (params, xs)) for _ in range(per_compile)]
    times["after_pause"] += [timed(step, (params, xs), pause_s) for _ in range(per_compile)]
  times["in_a_row"] = [timed(step, (params, xs)) for _ in range(calls)]
  return times


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "call_times")
  parser.add_argument("--calls", type=int, default=200, help="calls in a row")
  parser.add_argument("--pause-ms", type=float, default=5.0)
  parser.add_argument("--cells", default=",".join(CELLS))
  parser.add_argument("--steps", default=",".join(map(str, STEPS)))
  args = parser.parse_args(argv)
  if args.quick:
    hidden, steps_list, calls, compiles, per_compile = QUICK_HIDDEN, QUICK_STEPS, 6, 2, 3
  else:
    steps_list = tuple(int(t) for t in args.steps.split(","))
    hidden, calls, compiles, per_compile = HIDDEN, args.calls, COMPILES, PER_COMPILE
  results = []
  for kind in args.cells.split(","):
    for steps in steps_list:
      times = measure(kind, steps, hidden, calls, args.pause_ms / 1e3, compiles, per_compile)
      for setting, seconds in times.items():
        row = dict(cell=kind, B=BATCH, D=hidden, H=hidden, T=steps, setting=setting,
                   **summary(seconds))
        results.append(row)
        print(f"{kind} T={steps} {setting}: median {row['median_ms']:.2f} ms, mean "
              f"{row['mean_ms']:.2f}, p90 {row['p90_ms']:.2f}, slowest {row['max_ms']:.2f}; "
              f"{row['slow_calls']} of {row['calls']} over 3x the median", flush=True)
  config = dict(B=BATCH, H=hidden, steps=steps_list, calls_in_a_row=calls, compiles=compiles,
                per_compile=per_compile, pause_ms=args.pause_ms, threads=native.threads(),
                seqjax_native=native.status(), reuse_freed_memory=reuse)
  common.write(args.out, "call_times", config, results)


if __name__ == "__main__":
  main()
