"""Native kernels vs the XLA path on short sequences: where the kernels start to pay.

    python benchmarks/short_calls.py              # ~3 minutes on 2 CPU cores
    python benchmarks/short_calls.py --quick --out /tmp/short_calls.json

A kernel call packs the weights for its threads before the first step, so a
call of a few steps pays that in full; ``seqjax.native.usable`` therefore
sends short sequences with large weights to the XLA path. This script times
one forward call (``seqjax.fused.lstm_scan`` / ``gru_scan``) of T steps both
ways, in interleaved rounds (the kernel forced on, whatever the rule says;
the XLA path traced inside ``seqjax.native.disabled()``), and reports each
one's tokens/s, the paired ratio kernel / XLA, and ``rule_picks_kernel``:
what ``usable`` chooses for that call. A row where the ratio is below 1 and
the rule picks the kernel (or the reverse) is a call the rule gets wrong.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp

from seqjax import cells, fused, native

# (B, D, H): weights of 2^17 (H = 128) to 2^21 floats (D = H = 512).
SIZES = [(1, 128, 128), (16, 128, 128), (1, 256, 256), (16, 256, 256), (1, 64, 512),
         (16, 64, 512), (1, 512, 512), (16, 512, 512)]
STEPS = (1, 4, 16, 64)
QUICK_SIZES, QUICK_STEPS = [(2, 8, 32)], (1, 3)


def _forward(kind):
  if kind == "lstm":
    return lambda p, xs, h0: fused.lstm_scan(p, xs, h0, h0, None, None, None)[2]
  return lambda p, xs, h0: fused.gru_scan(p, xs, h0, None, None, None)[1]


def calls(kind, batch, depth, hidden, steps):
  """``(kernel, xla, rule)``: blocking calls of both paths, and ``usable``'s choice."""
  k_p, k_x = jax.random.split(jax.random.key(0))
  cell = cells.LSTM(hidden) if kind == "lstm" else cells.GRU(hidden)
  params = cell.init(k_p, depth, jnp.float32)
  xs = jax.random.normal(k_x, (steps, batch, depth), jnp.float32)
  h0 = jnp.zeros((batch, hidden), jnp.float32)
  rule = native.usable(params, xs, (h0, h0), None)
  forward = _forward(kind)
  saved, native._MIN_STEPS = native._MIN_STEPS, 0  # the kernel at any length
  try:
    kernel = jax.jit(forward).lower(params, xs, h0).compile()
  finally:
    native._MIN_STEPS = saved
  with native.disabled():
    xla = jax.jit(_forward(kind)).lower(params, xs, h0).compile()
  if f"seqjax_{kind}_forward" not in kernel.as_text():
    raise RuntimeError(f"the {kind} kernel did not lower for B={batch} H={hidden}")
  return (lambda: kernel(params, xs, h0).block_until_ready(),
          lambda: xla(params, xs, h0).block_until_ready(), rule)


def main(argv=None):
  parser = common.arguments(__doc__.splitlines()[0], "short_calls")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  if native.status() != "ready":
    raise SystemExit(f"short_calls.py times the native kernels, which cannot run here: "
                     f"{native.status()}")
  sizes, steps_list = (QUICK_SIZES, QUICK_STEPS) if args.quick else (SIZES, STEPS)
  rounds, per_round_calls = (2, 2) if args.quick else (args.rounds, 10)
  results = []
  for kind in ("lstm", "gru"):
    for batch, depth, hidden in sizes:
      for steps in steps_list:
        kernel, xla, rule = calls(kind, batch, depth, hidden, steps)
        per_round = common.interleaved_rounds({"kernel": kernel, "xla": xla}, batch * steps,
                                              rounds, per_round_calls)
        ratio = [k / x for k, x in zip(per_round["kernel"], per_round["xla"])]
        gates = 4 if kind == "lstm" else 3
        row = dict(cell=kind, B=batch, D=depth, H=hidden, T=steps,
                   weights=(depth + hidden) * gates * hidden,
                   kernel_tokens_per_s=common.spread(per_round["kernel"]),
                   xla_tokens_per_s=common.spread(per_round["xla"]),
                   kernel_vs_xla=common.spread(ratio), rule_picks_kernel=rule)
        results.append(row)
        print(f"{kind} B={batch} D={depth} H={hidden} T={steps}: kernel/XLA "
              f"{row['kernel_vs_xla']['median']:.2f}x ({min(ratio):.2f}-{max(ratio):.2f}); "
              f"the rule picks {'the kernel' if rule else 'XLA'}", flush=True)
  config = dict(sizes=sizes, steps=steps_list, rounds=rounds, calls_per_round=per_round_calls,
                threads=native.threads(), min_steps=native._MIN_STEPS,
                small_weights=native._SMALL_WEIGHTS)
  common.write(args.out, "short_calls", config, results)


if __name__ == "__main__":
  main()
