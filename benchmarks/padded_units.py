"""The native kernels on padded hidden units vs the XLA path, at hidden sizes off whole registers.

    python benchmarks/padded_units.py --update-readme     # ~3 minutes on 2 CPU cores
    python benchmarks/padded_units.py --quick --out /tmp/padded_units.json

The kernels split the hidden units in AVX-512 registers of 16 floats, so
``seqjax.fused`` runs a cell whose H is not a multiple of 16 on
``seqjax.native.padded_units(H)`` units, the added ones zero throughout,
and slices H off the results. This script times ``peers.py``'s seqjax
training step and inference (``seqjax.scan``, B = 32, T = 128, D = H) at
such sizes that way (``padded``) and on the XLA path (``xla``:
``peers.seqjax_xla_contender``, traced inside ``native.disabled()``); and
the char-LM's sampler (``charlm.generate``: a 65-symbol embedding of 64, one
such layer, the read-out; 1000 tokens at batch 1 and 64, ``sampling.py``'s
shape), which now runs the native sampling kernel on padded units, against
``seqjax.decoding.generate`` on the same model, which it ran before (the
fraction of equal tokens reported). Interleaved rounds; each row has both
paths' tokens/s and the paired ratio padded / xla, median and range. It
stops unless the padded runs call the kernels (their lowered HLO), so a
fallback cannot pass as a measurement.
"""

from __future__ import annotations

import string

import common
import jax
import jax.numpy as jnp
import numpy as np
import peers

from seqjax import decoding, native
from seqjax.models import charlm

B, T = 32, 128
HIDDEN = (20, 50, 100, 200, 300)
SAMPLE_BATCHES, SAMPLE_LENGTH = (1, 64), 1000
QUICK_B, QUICK_T, QUICK_HIDDEN = 4, 8, (20,)
QUICK_SAMPLE_BATCHES, QUICK_SAMPLE_LENGTH = (2,), 8
VOCAB = string.printable[:64]  # 65 symbols with the unknown one, as sampling.py's


def measure(cell_name, size, mode, rounds, calls) -> dict:
  runs = {"padded": peers.seqjax_contender(cell_name, size, mode),
          "xla": peers.seqjax_xla_contender(cell_name, size, mode)}
  if f"seqjax_{cell_name}_forward" not in runs["padded"].lower().as_text():
    raise SystemExit(f"padded_units.py: the {cell_name} at H = {size['H']} ({mode}) does not run "
                     f"the kernels here (see native.usable)")
  runs["padded"]()  # compiled before the rounds, as the XLA run was
  tps = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  return dict(cell=cell_name, mode=mode, **size, units=native.padded_units(size["H"]),
              tokens_per_s={name: common.spread(v) for name, v in tps.items()},
              padded_vs_xla=common.paired(tps["padded"], tps["xla"]))


def measure_sampler(cell_name, hidden, batch, length, rounds, calls) -> dict:
  config = charlm.default_config()
  config.update(dict(hidden_size=hidden, embed_size=64, num_layers=1, cell=cell_name))
  model = charlm.create(config, {"vocab": VOCAB})
  prompt = jnp.zeros((batch, 4), jnp.int32)
  params = model.init(jax.random.key(1), {"inputs": prompt}, None)["params"]
  step = charlm.decode_step(model)
  carry, logits = step(params, None, prompt)
  key = jax.random.key(2)
  padded = jax.jit(lambda c, l: charlm.generate(model, params, c, l, key, length))
  xla = jax.jit(lambda c, l: decoding.generate(step, params, c, l, key, length))
  if f"seqjax_{cell_name}_sample" not in padded.lower(carry, logits).as_text():
    raise SystemExit(f"padded_units.py: the {cell_name} sampler at H = {hidden}, batch {batch} "
                     f"does not run the kernel here (see native.sample_usable)")
  same = np.mean(np.asarray(padded(carry, logits)[2]) == np.asarray(xla(carry, logits)[2]))
  runs = {"padded": lambda: jax.block_until_ready(padded(carry, logits)),
          "xla": lambda: jax.block_until_ready(xla(carry, logits))}
  tps = common.interleaved_rounds(runs, batch * length, rounds, calls)
  return dict(cell=cell_name, mode=f"sample, batch {batch}", B=batch, T=length, H=hidden,
              units=native.padded_units(hidden),
              tokens_per_s={name: common.spread(v) for name, v in tps.items()},
              padded_vs_xla=common.paired(tps["padded"], tps["xla"]),
              same_tokens=float(same))


def markdown(results) -> str:
  """The README table: both paths' tokens/s and the paired ratio."""
  lines = ["| cell | H (run at) | mode | padded kernels tok/s | XLA path tok/s "
           "| padded / XLA (range) |", "|" + "---|" * 6]
  for r in results:
    tps = {k: f"{v['median'] / 1e3:.1f}k" for k, v in r["tokens_per_s"].items()}
    ratio = r["padded_vs_xla"]
    lines.append(f"| {r['cell'].upper()} | {r['H']} ({r['units']}) | {r['mode']} "
                 f"| {tps['padded']} | {tps['xla']} "
                 f"| {ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f}) |")
  return "\n".join(lines)


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  parser = common.arguments(__doc__.splitlines()[0], "padded_units")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, "padded_units", markdown)
    return
  if native.status() != "ready":
    raise SystemExit(f"padded_units.py times the native kernels, which cannot run here: "
                     f"{native.status()}")
  batch, steps, hidden = (QUICK_B, QUICK_T, QUICK_HIDDEN) if args.quick else (B, T, HIDDEN)
  sample_batches, length = ((QUICK_SAMPLE_BATCHES, QUICK_SAMPLE_LENGTH) if args.quick
                            else (SAMPLE_BATCHES, SAMPLE_LENGTH))
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  config = dict(B=batch, T=steps, hidden=hidden, sample_batches=sample_batches,
                sample_length=length, rounds=rounds, calls=calls, threads=native.threads(),
                reuse_freed_memory=reuse)
  results = []
  for cell_name in peers.CELLS:
    for h in hidden:
      rows = [measure(cell_name, dict(B=batch, T=steps, D=h, H=h), mode, rounds, calls)
              for mode in peers.MODES]
      rows += [measure_sampler(cell_name, h, b, length, rounds, calls) for b in sample_batches]
      for row in rows:
        results.append(row)
        ratio = row["padded_vs_xla"]
        print(f"{cell_name} H={h} ({row['units']}) {row['mode']}: padded/XLA "
              f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})", flush=True)
      common.write(args.out, "padded_units", config, results)
  print(common.readme_table("padded_units", markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
