"""Sampling speed of a char-LM-shaped model: tokens/s at batch 1 and 64.

    python benchmarks/sampling.py                 # ~2 minutes on 2 CPU cores
    python benchmarks/sampling.py --cell gru      # results/sampling_gru.json
    python benchmarks/sampling.py --quick --out /tmp/sampling.json

The model is the char-LM's shape: a 65-symbol embedding, an LSTM (``--cell
gru``: a GRU) with H=512, and a linear read-out to 65 logits. Each sampler draws 1000 tokens in one
jitted call, feeding each sample back, position i drawing with
``fold_in(key, i)`` as :func:`seqjax.decoding.generate` does:

- ``plain``: a ``lax.scan`` that embeds the token, then ``cell.project`` (a
  [B, E] x [E, 4H] matmul) and ``cell.step`` at every step;
- ``table``: the embedding and the input projection folded into one
  [V, G H] table before the loop (``embedding @ w_x + b``; G = 4 gates for
  the LSTM, 3 for the GRU), so a step gathers a row instead of multiplying:
  one matmul fewer per token;
- ``native``: the table, and every step in one call of the native sampling
  kernel (:func:`seqjax.native.lstm_sample` or
  :func:`seqjax.native.gru_sample`, as the char-LM's ``charlm.generate``
  calls them), the Gumbel noise drawn beforehand
  (:func:`seqjax.decoding.gumbel_noise`, inside the timed call);
- ``table_bf16``, ``native_bf16``: the same with the cell's
  ``matmul_dtype="bfloat16"`` (recurrent matmul operands in bfloat16, float32
  accumulation);
- ``table_int8``, ``native_int8``: with ``matmul_dtype="int8"`` (the rows of
  h and the columns of the weights scaled and rounded to int8, the integer
  products summed exactly: :func:`seqjax.fused.int8_matmul`; the native one
  on AVX512_VNNI).

All of them add the same noise, so ``plain``, ``table`` and ``native`` draw
the same tokens unless two logits round the other way (the fraction of tokens
equal to ``plain``'s is reported); the bfloat16 samplers round, so their
tokens drift from plain's (``native_bf16`` is compared with ``table_bf16``,
``native_int8`` with ``table_int8``).
The process keeps the memory it frees (``native.reuse_freed_memory``) for
every sampler alike.

The bounds, measured in the same rounds: a float32 2048^3 XLA matmul gives
the matmul peak, and each row reports its matmul GFLOP/s (the step's matmuls:
2 H G H recurrent, 2 H V read-out, and 2 E G H input projection for ``plain``)
as a fraction of it; at batch 64 that is the limit. At batch 1 every token
reads all the weights once, so each row also reports the weight bytes read
per second (``weight_gb_per_s``): a rate of memory, not of arithmetic.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp

from seqjax import cells, decoding, native

VOCAB, EMBED, HIDDEN, LENGTH = 65, 64, 512, 1000
PEAK_N, QUICK_PEAK_N = 2048, 64


CELLS = {"lstm": (cells.LSTM, native.lstm_sample), "gru": (cells.GRU, native.gru_sample)}


def cost_per_token(variant, hidden, vocab, embed, gates=4):
  """(matmul FLOPs, weight bytes read) per sampled token, for a cell of ``gates`` gates."""
  recurrent, readout = hidden * gates * hidden, hidden * vocab
  projection = embed * gates * hidden
  flops = 2 * (recurrent + readout + (projection if variant == "plain" else 0))
  recurrent_bytes = {"bf16": 2, "int8": 1}.get(variant.rsplit("_", 1)[-1], 4)
  weight_bytes = (recurrent * recurrent_bytes + readout * 4
                  + (projection * 4 if variant == "plain" else 0))
  return flops, weight_bytes


def make_model(hidden, vocab, embed, kind="lstm"):
  cell = CELLS[kind][0](hidden)
  k_e, k_c, k_o = jax.random.split(jax.random.key(0), 3)
  return cell, {"embed": jax.random.normal(k_e, (vocab, embed)) * 0.1,
                "cell": cell.init(k_c, embed),
                "out_w": jax.random.normal(k_o, (hidden, vocab)) / jnp.sqrt(hidden),
                "out_b": jnp.zeros((vocab,))}


def sampler(cell, variant, length, batch):
  """A jitted function (params, key) -> tokens [batch, length]."""
  kernel = CELLS["gru" if isinstance(cell, cells.GRU) else "lstm"][1]

  def sample(params, key):
    table = cell.project(params["cell"], params["embed"])  # [V, G H]
    start = cell.initial_carry((batch,))
    logits = jnp.zeros((batch, params["out_b"].shape[0]), jnp.float32)
    if variant.startswith("native"):
      noise = decoding.gumbel_noise(key, logits.shape, length)
      head = (params["out_w"], params["out_b"])
      return kernel(table, [params["cell"]], head, [start], logits, noise,
                    matmul_dtype=cell.matmul_dtype)[2]
    if variant.startswith("table"):  # fold embedding and input projection together once
      project = lambda tok: table[tok]
    else:
      project = lambda tok: cell.project(params["cell"], params["embed"][tok])

    def step(state, position):
      carry, logits = state
      tok = jax.random.categorical(jax.random.fold_in(key, position), logits)
      carry, h = cell.step(params["cell"], carry, project(tok))
      return (carry, h @ params["out_w"] + params["out_b"]), tok  # logits [B, V]

    _, toks = jax.lax.scan(step, (start, logits), jnp.arange(length))
    return toks.T

  return jax.jit(sample)


def main(argv=None):
  reuse = native.reuse_freed_memory()  # first: before XLA's threads start
  # results/sampling.json, sampling_gru.json (on a GPU sampling_gpu.json, ...)
  name = lambda flags: "sampling" + ("" if flags.cell == "lstm" else f"_{flags.cell}")
  parser = common.arguments(__doc__.splitlines()[0], name)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--cell", choices=sorted(CELLS), default="lstm")
  args = parser.parse_args(argv)
  make_cell = CELLS[args.cell][0]
  kernels = jax.default_backend() == "cpu" and native.status() == "ready"  # CPU kernels
  if args.quick:
    hidden, length, batches, repeats = 16, 20, (1, 4), 2
  else:
    hidden, length, batches, repeats = HIDDEN, LENGTH, (1, 64), args.repeats
  peak_n = QUICK_PEAK_N if args.quick else PEAK_N
  cell, params = make_model(hidden, VOCAB, EMBED, args.cell)
  results = []
  for batch in batches:
    tokens = {}
    bf16_cell = make_cell(hidden, matmul_dtype="bfloat16")
    fns = {v: sampler(cell, v, length, batch) for v in ("plain", "table")}
    int8_cell = make_cell(hidden, matmul_dtype="int8")
    fns["table_bf16"] = sampler(bf16_cell, "table_bf16", length, batch)
    fns["table_int8"] = sampler(int8_cell, "table_int8", length, batch)
    if kernels:
      fns["native"] = sampler(cell, "native", length, batch)
      if native._bf16("bfloat16"):
        fns["native_bf16"] = sampler(bf16_cell, "native_bf16", length, batch)
      if native._int8("int8"):
        fns["native_int8"] = sampler(int8_cell, "native_int8", length, batch)
    for variant, fn in fns.items():
      tokens[variant] = jax.block_until_ready(fn(params, jax.random.key(1)))
    reference = {"native_bf16": "table_bf16", "native_int8": "table_int8"}
    agree = {v: float(jnp.mean(tokens[reference.get(v, "plain")] == t))
             for v, t in tokens.items()}
    runs = {v: lambda fn=fn: jax.block_until_ready(fn(params, jax.random.key(1)))
            for v, fn in fns.items()}
    runs["peak"] = common.matmul_peak_run(peak_n)
    per_round = common.interleaved_rounds(runs, batch * length, repeats, 1)
    peak = common.pop_peak(per_round, batch * length, peak_n)  # FLOP/s per round
    results.append(dict(batch=batch, peak_matmul=peak_n,
                        gflops=common.spread([p / 1e9 for p in peak])))
    for variant, tps in per_round.items():
      flops, weight_bytes = cost_per_token(variant, hidden, VOCAB, EMBED, cell.num_gates)
      row = dict(cell=args.cell, variant=variant, batch=batch, length=length, H=hidden,
                 vocab=VOCAB, embed=EMBED, tokens_per_s=common.spread(tps),
                 same_tokens=agree[variant],
                 gflops=common.spread([x * flops / 1e9 for x in tps]),
                 fraction_of_peak=common.paired(tps, peak, flops),
                 weight_gb_per_s=common.spread([x * weight_bytes / 1e9 for x in tps]))
      results.append(row)
      print(f"batch {batch} {variant}: {common.median(tps) / 1e3:.1f}k tokens/s, "
            f"{row['fraction_of_peak']['median']:.0%} of the matmul peak "
            f"({common.median(peak) / 1e9:.0f} GFLOP/s), weights read at "
            f"{row['weight_gb_per_s']['median']:.0f} GB/s "
            f"(same tokens: {agree[variant]:.3f})", flush=True)
  config = dict(cell=args.cell, H=hidden, vocab=VOCAB, embed=EMBED, length=length, batches=batches,
                repeats=repeats, peak_matmul=peak_n, seqjax_native=native.status(),
                reuse_freed_memory=reuse)
  common.write(args.out, "sampling", config, results)


if __name__ == "__main__":
  main()
