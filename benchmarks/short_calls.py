"""Native kernels vs the XLA path on short sequences: where the kernels start to pay.

    python benchmarks/short_calls.py              # ~2 minutes on 2 CPU cores
    python benchmarks/short_calls.py --quick --out /tmp/short_calls.json

A kernel call packs the weights for its threads before the first step, so a
call of a few steps pays that in full; ``seqjax.native.usable`` therefore
sends short sequences to the XLA path. This script times forward calls
(``seqjax.fused.lstm_scan`` / ``gru_scan``) of T steps both ways, in
interleaved rounds (the kernel forced on, whatever the rule says; the XLA
path traced inside ``seqjax.native.disabled()``). The calls run in a loop,
16 in one ``lax.scan``, each from the last one's carry, as a sampler or a
chunked model makes them: one call on its own would add the executable's
launch to both paths, which hides the kernel's fixed costs. Each row has
both paths' tokens/s, the paired ratio kernel / XLA, and
``rule_picks_kernel``: what ``usable`` chooses for such a call. A row where
the ratio is below 1 and the rule picks the kernel (or the reverse) is a
call the rule gets wrong. The process keeps the memory it frees for reuse
(``native.reuse_freed_memory``, as ``seqjax train`` and the other benchmarks do).
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp

from seqjax import cells, fused, native

# (B, D, H): weights of 2^17 (H = 128) to 2^21 floats (D = H = 512).
CALLS = 16  # calls in one loop
SIZES = [(1, 128, 128), (16, 128, 128), (1, 256, 256), (16, 256, 256), (1, 64, 512),
         (16, 64, 512), (1, 512, 512), (16, 512, 512)]
STEPS = (1, 4, 16, 64)
QUICK_SIZES, QUICK_STEPS = [(2, 8, 32)], (1, 4)


def _forward(kind):
  """Forward calls in a ``lax.scan``, one per ``xs [calls, T, B, D]``, each from
  the last one's carry (as a sampler or a chunked model calls the recurrence)."""
  def call(p, h, xs):
    if kind == "lstm":
      h, _, ys = fused.lstm_scan(p, xs, h, h, None, None, None)
    else:
      h, ys = fused.gru_scan(p, xs, h, None, None, None)
    return h, ys[-1]

  return lambda p, xs, h0: jax.lax.scan(lambda h, x: call(p, h, x), h0, xs)[1]


def runs(kind, batch, depth, hidden, steps, calls):
  """``(kernel, xla, rule)``: blocking calls of both paths, and ``usable``'s choice."""
  k_p, k_x = jax.random.split(jax.random.key(0))
  cell = cells.LSTM(hidden) if kind == "lstm" else cells.GRU(hidden)
  params = cell.init(k_p, depth, jnp.float32)
  xs = jax.random.normal(k_x, (calls, steps, batch, depth), jnp.float32)
  h0 = jnp.zeros((batch, hidden), jnp.float32)
  rule = native.usable(params, xs[0], (h0, h0), None)
  weights = sum(a.size for a in params.values())
  forward = _forward(kind)
  saved = native._MIN_STEPS, native._WEIGHTS_PER_ROW_STEP
  native._MIN_STEPS, native._WEIGHTS_PER_ROW_STEP = 0, weights  # the kernel whatever the call
  try:
    kernel = jax.jit(forward).lower(params, xs, h0).compile()
  finally:
    native._MIN_STEPS, native._WEIGHTS_PER_ROW_STEP = saved
  with native.disabled():
    xla = jax.jit(_forward(kind)).lower(params, xs, h0).compile()
  if f"seqjax_{kind}_forward" not in kernel.as_text():
    raise RuntimeError(f"the {kind} kernel did not lower for B={batch} H={hidden}")
  return (lambda: kernel(params, xs, h0).block_until_ready(),
          lambda: xla(params, xs, h0).block_until_ready(), rule)


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "short_calls")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  if native.status() != "ready":
    raise SystemExit(f"short_calls.py times the native kernels, which cannot run here: "
                     f"{native.status()}")
  sizes, steps_list = (QUICK_SIZES, QUICK_STEPS) if args.quick else (SIZES, STEPS)
  rounds, per_round, calls = (2, 2, 2) if args.quick else (args.rounds, 3, CALLS)
  results = []
  for kind in ("lstm", "gru"):
    for batch, depth, hidden in sizes:
      for steps in steps_list:
        kernel, xla, rule = runs(kind, batch, depth, hidden, steps, calls)
        tps = common.interleaved_rounds({"kernel": kernel, "xla": xla},
                                        batch * steps * calls, rounds, per_round)
        gates = 4 if kind == "lstm" else 3  # weights: w_x, w_h and the biases
        row = dict(cell=kind, B=batch, D=depth, H=hidden, T=steps,
                   weights=(depth + hidden + 1) * gates * hidden + (hidden if kind == "gru" else 0),
                   kernel_tokens_per_s=common.spread(tps["kernel"]),
                   xla_tokens_per_s=common.spread(tps["xla"]),
                   kernel_vs_xla=common.paired(tps["kernel"], tps["xla"]), rule_picks_kernel=rule)
        results.append(row)
        ratio = row["kernel_vs_xla"]
        print(f"{kind} B={batch} D={depth} H={hidden} T={steps}: kernel/XLA "
              f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}); "
              f"the rule picks {'the kernel' if rule else 'XLA'}", flush=True)
  config = dict(sizes=sizes, steps=steps_list, calls_in_loop=calls, rounds=rounds,
                timed_per_round=per_round,
                threads=native.threads(), min_steps=native._MIN_STEPS,
                weights_per_row_step=native._WEIGHTS_PER_ROW_STEP, reuse_freed_memory=reuse)
  common.write(args.out, "short_calls", config, results)


if __name__ == "__main__":
  main()
