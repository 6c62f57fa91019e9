"""seqjax against PyTorch, Flax and Keras: LSTM and GRU throughput on one machine.

    python benchmarks/peers.py                   # all sizes, ~10 minutes on 2 CPU cores
    python benchmarks/peers.py --update-readme   # and rewrite the table in benchmarks/README.md
    python benchmarks/peers.py --quick --out /tmp/peers.json   # seconds, for tests

For each cell (LSTM, GRU), size and mode it times one call of every contender:

- ``train``: forward, backward and an SGD update, loss = mean(ys ** 2);
- ``infer``: forward only.

Contenders: ``seqjax`` (``seqjax.scan``, default options), ``torch``
(``nn.LSTM``/``nn.GRU``, oneDNN on CPU), ``flax`` (``nn.RNN`` over
``OptimizedLSTMCell``/``GRUCell``) and ``keras`` (Keras 3 ``LSTM``/``GRU`` on
the JAX backend, ``train_on_batch``/``predict_on_batch``). Rounds interleave the
contenders; each round records the median of a few calls per contender. The
JSON holds tokens/s per round, their median, and paired ratios (seqjax's
throughput over each peer's, round by round) with their spread.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")


import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import seqjax  # noqa: E402
from seqjax import cells  # noqa: E402

SIZES = {"a": dict(B=32, T=128, D=256, H=256),
         "b": dict(B=64, T=256, D=512, H=512),
         "c": dict(B=16, T=1024, D=128, H=128)}
QUICK_SIZES = {"q": dict(B=4, T=16, D=8, H=8)}
CELLS = ("lstm", "gru")
MODES = ("train", "infer")
LR = 0.01


def _sgd_jax(loss):
  @jax.jit
  def step(params, xs):
    grads = jax.grad(loss)(params, xs)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)
  return step


def seqjax_contender(cell_name, size, mode, matmul_dtype=None):
  cell = {"lstm": cells.LSTM, "gru": cells.GRU}[cell_name](size["H"],
                                                          matmul_dtype=matmul_dtype)
  params = cell.init(jax.random.key(0), size["D"])
  xs = jax.random.normal(jax.random.key(1), (size["B"], size["T"], size["D"]))

  def forward(params, xs):
    return seqjax.scan(cell, params, xs)[1]

  if mode == "infer":
    fn = jax.jit(forward)
    return lambda: fn(params, xs).block_until_ready()
  step = _sgd_jax(lambda p, x: jnp.mean(forward(p, x) ** 2))
  state = {"params": params}

  def run():
    state["params"] = jax.block_until_ready(step(state["params"], xs))
  return run


def flax_contender(cell_name, size, mode):
  import flax.linen as nn  # noqa: PLC0415
  cell = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell_name](size["H"])
  rnn = nn.RNN(cell)
  xs = jax.random.normal(jax.random.key(1), (size["B"], size["T"], size["D"]))
  params = rnn.init(jax.random.key(0), xs)

  if mode == "infer":
    fn = jax.jit(rnn.apply)
    return lambda: fn(params, xs).block_until_ready()
  step = _sgd_jax(lambda p, x: jnp.mean(rnn.apply(p, x) ** 2))
  state = {"params": params}

  def run():
    state["params"] = jax.block_until_ready(step(state["params"], xs))
  return run


def torch_contender(cell_name, size, mode):
  import torch  # noqa: PLC0415
  torch.set_num_threads(common.environment()["cpu_count"])
  torch.manual_seed(0)
  module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell_name](
      size["D"], size["H"], batch_first=True)
  xs = torch.randn(size["B"], size["T"], size["D"])
  if mode == "infer":
    def infer():
      with torch.inference_mode():
        module(xs)
    return infer
  optimizer = torch.optim.SGD(module.parameters(), lr=LR)

  def run():
    optimizer.zero_grad(set_to_none=True)
    ys, _ = module(xs)
    (ys ** 2).mean().backward()
    optimizer.step()
  return run


def keras_contender(cell_name, size, mode):
  import keras  # noqa: PLC0415
  layer = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[cell_name](
      size["H"], return_sequences=True)
  model = keras.Sequential([keras.Input((size["T"], size["D"])), layer])
  model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
  xs = np.random.default_rng(1).normal(size=(size["B"], size["T"], size["D"])).astype("float32")
  zeros = np.zeros((size["B"], size["T"], size["H"]), "float32")
  if mode == "infer":
    return lambda: model.predict_on_batch(xs)
  return lambda: model.train_on_batch(xs, zeros)


CONTENDERS = {"seqjax": seqjax_contender, "torch": torch_contender,
              "flax": flax_contender, "keras": keras_contender}


def measure(cell_name, size_name, size, mode, contenders, rounds, calls):
  """Interleaved rounds; returns result rows (one per contender) and ratio rows."""
  runs = {name: CONTENDERS[name](cell_name, size, mode) for name in contenders}
  per_round = common.interleaved_rounds(runs, size["B"] * size["T"], rounds, calls)
  key = dict(cell=cell_name, size=size_name, mode=mode, **size)
  rows = [dict(key, contender=name, tokens_per_s=common.spread(tps), rounds=tps)
          for name, tps in per_round.items()]
  ratios = [dict(key, vs=name, ratio=common.spread(
                 [a / b for a, b in zip(per_round["seqjax"], per_round[name])]))
            for name in per_round if name != "seqjax" and "seqjax" in per_round]
  return rows, ratios


def markdown(results) -> str:
  """The README table: tokens/s medians and seqjax's paired ratio to each peer."""
  rows = [r for r in results if "contender" in r]
  ratios = {(r["cell"], r["size"], r["mode"], r["vs"]): r["ratio"] for r in results
            if "vs" in r}
  peers = [c for c in CONTENDERS if c != "seqjax"]
  head = ("| cell | size | mode | seqjax tok/s | "
          + " | ".join(f"{p} tok/s (seqjax ×)" for p in peers) + " |")
  lines = [head, "|" + "---|" * (4 + len(peers))]
  keys = sorted({(r["cell"], r["size"], r["mode"]) for r in rows})
  for cell_name, size_name, mode in keys:
    by = {r["contender"]: r for r in rows
          if (r["cell"], r["size"], r["mode"]) == (cell_name, size_name, mode)}
    size = by["seqjax"]
    label = f"({size_name}) B{size['B']} T{size['T']} D=H={size['H']}"
    cellsx = [f"{by['seqjax']['tokens_per_s']['median'] / 1e3:.1f}k"]
    for p in peers:
      if p in by:
        ratio = ratios[(cell_name, size_name, mode, p)]
        cellsx.append(f"{by[p]['tokens_per_s']['median'] / 1e3:.1f}k "
                      f"({ratio['median']:.2f}, {ratio['min']:.2f}–{ratio['max']:.2f})")
      else:
        cellsx.append("—")
    lines.append(f"| {cell_name.upper()} | {label} | {mode} | " + " | ".join(cellsx) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = common.arguments(__doc__.splitlines()[0], "peers")
  parser.add_argument("--contenders", default=",".join(CONTENDERS))
  parser.add_argument("--cells", default=",".join(CELLS))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--sizes", default=None, help="comma-separated of a,b,c")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, "peers", markdown)
    return
  sizes = QUICK_SIZES if args.quick else SIZES
  if args.sizes:
    sizes = {k: SIZES[k] for k in args.sizes.split(",")}
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  contenders = args.contenders.split(",")
  results = []
  for cell_name in args.cells.split(","):
    for size_name, size in sizes.items():
      for mode in args.modes.split(","):
        rows, ratios = measure(cell_name, size_name, size, mode, contenders, rounds, calls)
        results += rows + ratios
        summary = ", ".join(f"{r['contender']} {r['tokens_per_s']['median'] / 1e3:.1f}k"
                            for r in rows)
        print(f"{cell_name} ({size_name}) {mode}: {summary} tokens/s", flush=True)
  config = dict(sizes=sizes, rounds=rounds, calls=calls, contenders=contenders, lr=LR)
  common.write(args.out, "peers", config, results)
  print(common.readme_table("peers", markdown, results, update=args.update_readme))


if __name__ == "__main__":
  main()
