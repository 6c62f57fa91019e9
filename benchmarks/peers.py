"""seqjax against PyTorch, Flax and Keras: LSTM and GRU throughput on one machine.

    python benchmarks/peers.py                   # all sizes, ~7-10 minutes on 2 CPU cores
    python benchmarks/peers.py --update-readme   # and rewrite the table in benchmarks/README.md
    python benchmarks/peers.py --quick --out /tmp/peers.json   # seconds, for tests

For each cell (LSTM, GRU), size and mode it times one call of every contender:

- ``train``: forward, backward and an SGD update, loss = mean(ys ** 2);
- ``infer``: forward only.

Contenders: ``seqjax`` (``seqjax.scan``, default options: on CPU, inference
and training run the native kernels of :mod:`seqjax.native` where they are
built; the config records ``native.status()`` and the fused loops' unroll
factor), ``seqjax_xla`` (the same with the kernels off, so seqjax's ratio to
it is what the kernels gain; CPU only), ``torch``
(``nn.LSTM``/``nn.GRU``, oneDNN on CPU, cuDNN on a GPU), ``flax`` (``nn.RNN``
over ``OptimizedLSTMCell``/``GRUCell``), ``keras`` (Keras 3 ``LSTM``/``GRU`` on
the JAX backend, ``train_on_batch``/``predict_on_batch``; left out where Keras
is not installed) and, where JAX runs on a GPU, ``cudnn`` (JAX's own cuDNN
LSTM, ``jax.experimental.rnn.lstm``, with seqjax's weights; it has no GRU).
Rounds interleave the contenders; each round records the median of a few calls
per contender. The JSON holds tokens/s per round, their median, and paired
ratios (seqjax's throughput over each peer's, round by round) with their
spread.

On a GPU (JAX's default backend ``gpu``; torch then runs on ``cuda``) the
results go to ``results/peers_gpu.json`` and the README's ``peers_gpu`` table
instead of the CPU ones. Every contender runs at its library's default
float32 matmul precision, recorded in the JSON's config: JAX's and
``jax.experimental.rnn``'s may use TF32 on such a GPU where torch's matmuls
do not.

Each group's rounds also time a float32 2048x2048x2048 matmul in XLA (the
machine's measured matmul peak, as the speed issue defines it), so every
contender's matmul rate is also given as a paired fraction of that peak. The
FLOPs counted per token are the layer's matmuls only: 2 (D + H) G H forward
(G = 4 gates for the LSTM, 3 for the GRU); for training, those the step needs:
the forward, the carry gradient (2 H G H) and the weight gradients
(2 (D + H) G H), not the input gradient (:func:`flops_per_token`); the gate
arithmetic is not counted.

On CPU the rounds also time the cores' ceiling, nothing but independent
float32 fused multiply-adds on every core (``common.fma_ceiling_run``): every
contender's rate is given as a fraction of it too, and each ratio row says
what fraction of it seqjax's step would run at if it were :data:`TARGET`
times that peer (the speed issue's target against torch): above 1, no
float32 matmul on these cores reaches the target.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "jax")


import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import seqjax  # noqa: E402
from seqjax import cells, fused, native  # noqa: E402

SIZES = {"a": dict(B=32, T=128, D=256, H=256),
         "b": dict(B=64, T=256, D=512, H=512),
         "c": dict(B=16, T=1024, D=128, H=128)}
QUICK_SIZES = {"q": dict(B=4, T=16, D=8, H=8)}
CELLS = ("lstm", "gru")
MODES = ("train", "infer")
LR = 0.01
PEAK_N, QUICK_PEAK_N = 2048, 64  # the peak matmul's size: N x N times N x N
TARGET = 1.25  # the speed issue's target: seqjax's tokens/s over torch's
GATES = {"lstm": 4, "gru": 3}


def backend() -> str:
  """JAX's default backend, ``"cpu"``, ``"gpu"`` or ``"tpu"``. Asked when needed,
  not at import: asking starts XLA's threads, and :func:`main` first calls
  :func:`seqjax.native.reuse_freed_memory`, which must come before them."""
  return jax.default_backend()


def results_name(on: str | None = None) -> str:
  """The results' name, its JSON's and README table's: ``peers``, or
  ``peers_gpu``, for results measured ``on`` a backend (default: this one's)."""
  return common.on_backend("peers", on or backend())


def flops_per_token(cell_name, size, mode):
  """Matmul FLOPs per token of the layer's step: 2 (D + H) G H forward; in
  training also the carry gradient (2 H G H) and the weight gradients
  (2 (D + H) G H). The step does not need the input gradient (2 D G H): the
  inputs are not trained, and JAX's autodiff leaves that product out of the
  seqjax, Flax and Keras steps (torch's step computes it, see
  benchmarks/README.md; so may the cuDNN contender's backward)."""
  gates, d, h = GATES[cell_name], size["D"], size["H"]
  forward = 2 * (d + h) * gates * h
  return forward if mode == "infer" else 2 * forward + 2 * h * gates * h


def gradient(forward):
  """The training steps' gradient: of mean(ys²), ys = ``forward(params, xs)``,
  with respect to the parameters."""
  return jax.grad(lambda p, x: common.loss(forward(p, x)))


def _jax_run(forward, params, xs, mode):
  """One blocking call of a JAX contender: jitted ``forward(params, xs)``
  (``infer``), or an SGD step on mean(ys²) that keeps its parameters (``train``).
  Its ``lower()`` lowers the jitted function for the call's arguments (to
  check what it runs)."""
  if mode == "infer":
    fn = jax.jit(forward)
    run = lambda: fn(params, xs).block_until_ready()
    run.lower = lambda: fn.lower(params, xs)
    return run

  @jax.jit
  def step(params, xs):
    grads = gradient(forward)(params, xs)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)
  state = {"params": params}

  def run():
    state["params"] = jax.block_until_ready(step(state["params"], xs))
  run.lower = lambda: step.lower(state["params"], xs)
  return run


def seqjax_problem(cell_name, size, matmul_dtype=None):
  """``(forward, params, xs)``: seqjax's ``forward(params, xs) -> ys`` for a
  group, its parameters (seed 0) and its inputs [B, T, D] (seed 1), as
  :func:`seqjax_contender` runs them."""
  cell = {"lstm": cells.LSTM, "gru": cells.GRU}[cell_name](size["H"],
                                                          matmul_dtype=matmul_dtype)
  params = cell.init(jax.random.key(0), size["D"])
  xs = jax.random.normal(jax.random.key(1), (size["B"], size["T"], size["D"]))

  def forward(params, xs):
    return seqjax.scan(cell, params, xs)[1]
  return forward, params, xs


def seqjax_contender(cell_name, size, mode, matmul_dtype=None):
  return _jax_run(*seqjax_problem(cell_name, size, matmul_dtype), mode)


def seqjax_xla_contender(cell_name, size, mode):
  """``seqjax`` with the native kernels off (:func:`seqjax.native.disabled`):
  the XLA path, so seqjax's ratio to it is the kernels' gain."""
  with native.disabled():
    run = seqjax_contender(cell_name, size, mode)
    run()  # traced and compiled here: it keeps the XLA path
  return run


def flax_contender(cell_name, size, mode):
  import flax.linen as nn  # noqa: PLC0415
  cell = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell_name](size["H"])
  rnn = nn.RNN(cell)
  xs = jax.random.normal(jax.random.key(1), (size["B"], size["T"], size["D"]))
  return _jax_run(rnn.apply, rnn.init(jax.random.key(0), xs), xs, mode)


def torch_device() -> str:
  """``"cuda"`` where JAX runs on a GPU (torch beside it on the same card), else ``"cpu"``."""
  return "cuda" if backend() == "gpu" else "cpu"


def torch_module(cell_name, size):
  """torch's ``nn.LSTM``/``nn.GRU`` (seed 0) and a batch of inputs (seed 0), on
  :func:`torch_device`."""
  import torch  # noqa: PLC0415
  torch.set_num_threads(common.environment()["cpu_count"])
  torch.manual_seed(0)
  module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell_name](
      size["D"], size["H"], batch_first=True)
  xs = torch.randn(size["B"], size["T"], size["D"])
  return module.to(torch_device()), xs.to(torch_device())


def torch_forward(module, xs, autocast=None):
  """``module(xs)``'s outputs in float32; with ``autocast`` (``"bfloat16"``),
  run under ``torch.autocast(device, dtype=...)``, torch's mixed precision."""
  import torch  # noqa: PLC0415
  context = (contextlib.nullcontext() if autocast is None
             else torch.autocast(xs.device.type, dtype=getattr(torch, autocast)))
  with context:
    ys, _ = module(xs)
  return ys.float()


def torch_contender(cell_name, size, mode, autocast=None):
  import torch  # noqa: PLC0415
  module, xs = torch_module(cell_name, size)
  # A GPU runs torch's kernels asynchronously: a call ends when they have.
  done = torch.cuda.synchronize if xs.is_cuda else lambda: None
  if mode == "infer":
    def infer():
      with torch.inference_mode():
        torch_forward(module, xs, autocast)
      done()
    return infer
  optimizer = torch.optim.SGD(module.parameters(), lr=LR)

  def run():
    optimizer.zero_grad(set_to_none=True)
    common.loss(torch_forward(module, xs, autocast)).backward()
    optimizer.step()
    done()
  return run


def cudnn_weights(params):
  """seqjax LSTM parameters as ``jax.experimental.rnn``'s packed cuDNN weights
  (one layer, one direction): W_ih = w_xᵀ, W_hh = w_hᵀ, b_ih = b, b_hh = 0;
  both order the gates i, f, g, o."""
  return jnp.concatenate([params["w_x"].T.ravel(), params["w_h"].T.ravel(), params["b"],
                          jnp.zeros_like(params["b"])])


def cudnn_forward(weights, xs, hidden, lstm=None):
  """ys [B, T, H] of ``jax.experimental.rnn.lstm`` (or ``lstm``, same signature)
  from zero carries, batch-major ``xs``."""
  from jax.experimental import rnn  # noqa: PLC0415
  batch, steps, features = xs.shape
  zeros = jnp.zeros((1, batch, hidden), xs.dtype)
  ys, _, _ = (lstm or rnn.lstm)(xs, zeros, zeros, weights, jnp.full((batch,), steps, jnp.int32),
                                input_size=features, hidden_size=hidden, num_layers=1,
                                dropout=0.0, bidirectional=False)
  return ys


def cudnn_contender(cell_name, size, mode):
  """JAX's cuDNN LSTM on seqjax's initial weights; ``None`` for the GRU (it has none)."""
  if cell_name != "lstm":
    return None
  weights = cudnn_weights(cells.LSTM(size["H"]).init(jax.random.key(0), size["D"]))
  xs = jax.random.normal(jax.random.key(1), (size["B"], size["T"], size["D"]))

  def forward(weights, xs):
    return cudnn_forward(weights, xs, size["H"])
  return _jax_run(forward, weights, xs, mode)


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


CONTENDERS = {"seqjax": seqjax_contender, "seqjax_xla": seqjax_xla_contender,
              "torch": torch_contender,
              "flax": flax_contender, "keras": keras_contender, "cudnn": cudnn_contender}


def unavailable(name) -> str | None:
  """Why contender ``name`` cannot run here, or ``None`` if it can."""
  if name == "cudnn" and backend() != "gpu":
    return (f"cudnn needs a GPU: jax.experimental.rnn.lstm lowers only for CUDA and ROCm, "
            f"and JAX's backend here is {backend()}")
  if name == "seqjax_xla" and backend() != "cpu":
    return (f"seqjax_xla is seqjax with the native CPU kernels off; on {backend()} seqjax "
            f"runs the XLA path already, so it would time the same call twice")
  if name == "cudnn" and importlib.util.find_spec("jax.experimental.rnn") is None:
    return f"cudnn needs jax.experimental.rnn, which JAX {jax.__version__} does not have"
  if name in ("torch", "flax", "keras") and importlib.util.find_spec(name) is None:
    return f"{name} is not installed"
  if name == "torch" and torch_device() == "cuda":
    import torch  # noqa: PLC0415
    if not torch.cuda.is_available():
      return "torch has no CUDA here, and JAX runs on the GPU: the two would not be comparable"
  return None


def measure(cell_name, size_name, size, mode, contenders, rounds, calls, peak_n, ceiling=None):
  """Interleaved rounds; returns result rows (one per contender), ratio rows
  and the peak row (the matmul timed in the same rounds; with ``ceiling``, a
  ``common.fma_ceiling_run`` pair, the cores' ceiling too). A contender
  without this cell (``cudnn`` for the GRU) is left out of the group."""
  runs = {name: CONTENDERS[name](cell_name, size, mode) for name in contenders}
  runs = {name: run for name, run in runs.items() if run is not None}
  runs["peak"] = common.matmul_peak_run(peak_n)
  if ceiling is not None:
    runs["ceiling"] = ceiling[0]
  tokens = size["B"] * size["T"]
  per_round = common.interleaved_rounds(runs, tokens, rounds, calls)
  peak = common.pop_peak(per_round, tokens, peak_n)  # FLOP/s per round
  top = None if ceiling is None else common.pop_flops(per_round, tokens, ceiling[1], "ceiling")
  flops = flops_per_token(cell_name, size, mode)
  key = dict(cell=cell_name, size=size_name, mode=mode, **size)

  def fractions(tps, of):  # each round's matmul rate over that round's `of`
    return common.paired(tps, of, flops)
  rows = [dict(key, contender=name, tokens_per_s=common.spread(tps), rounds=tps,
               gflops=common.spread([x * flops / 1e9 for x in tps]),
               fraction_of_peak=fractions(tps, peak),
               **({} if top is None else {"fraction_of_ceiling": fractions(tps, top)}))
          for name, tps in per_round.items()]
  rows.append(dict(key, peak_matmul=peak_n, gflops=common.spread([p / 1e9 for p in peak]),
                   **({} if top is None else {
                       "ceiling_gflops": common.spread([c / 1e9 for c in top]),
                       "ceiling_rounds": [c / 1e9 for c in top]})))
  ratios = [dict(key, vs=name, ratio=common.paired(per_round["seqjax"], per_round[name]),
                 # seqjax's rate, were it TARGET times this peer's, over the ceiling
                 **({} if top is None else {"ceiling_at_target": fractions(
                     [TARGET * x for x in per_round[name]], top)}))
            for name in per_round if name != "seqjax" and "seqjax" in per_round]
  return rows, ratios


def markdown(results) -> str:
  """The README table: tokens/s medians, seqjax's paired ratio to each peer,
  seqjax's and torch's matmul rate as a fraction of the measured peak, and
  (where the run timed it) of the cores' FMA ceiling, with the fraction of
  it seqjax would run at :data:`TARGET` times torch."""
  rows = [r for r in results if "contender" in r]
  ratios = {(r["cell"], r["size"], r["mode"], r["vs"]): r for r in results if "vs" in r}
  present = {r["contender"] for r in rows}
  peers = [c for c in CONTENDERS if c != "seqjax" and c in present]
  ceiling = any("fraction_of_ceiling" in r for r in rows)
  head = ("| cell | size | mode | seqjax tok/s | "
          + " | ".join(f"{p} tok/s (seqjax ×)" for p in peers)
          + " | % of matmul peak: seqjax, torch |"
          + (f" % of FMA ceiling: seqjax, torch ({TARGET}× torch) |" if ceiling else ""))
  lines = [head, "|" + "---|" * (5 + len(peers) + ceiling)]
  keys = sorted({(r["cell"], r["size"], r["mode"]) for r in rows})
  for cell_name, size_name, mode in keys:
    by = {r["contender"]: r for r in rows
          if (r["cell"], r["size"], r["mode"]) == (cell_name, size_name, mode)}
    size = by["seqjax"]
    label = f"({size_name}) B{size['B']} T{size['T']} D=H={size['H']}"
    cellsx = [f"{by['seqjax']['tokens_per_s']['median'] / 1e3:.1f}k"]
    for p in peers:
      if p in by:
        ratio = ratios[(cell_name, size_name, mode, p)]["ratio"]
        cellsx.append(f"{by[p]['tokens_per_s']['median'] / 1e3:.1f}k "
                      f"({ratio['median']:.2f}, {ratio['min']:.2f}–{ratio['max']:.2f})")
      else:
        cellsx.append("—")

    def percents(key):
      return ", ".join(f"{by[c][key]['median']:.0%}" if c in by and key in by[c] else "—"
                       for c in ("seqjax", "torch"))
    cellsx.append(percents("fraction_of_peak"))
    if ceiling:
      at = ratios.get((cell_name, size_name, mode, "torch"), {}).get("ceiling_at_target")
      cellsx.append(percents("fraction_of_ceiling") + (f" ({at['median']:.0%})" if at else ""))
    lines.append(f"| {cell_name.upper()} | {label} | {mode} | " + " | ".join(cellsx) + " |")
  return "\n".join(lines)


def group_arguments(parser, default_sizes=None, modes=MODES, default_modes=None) -> None:
  """``--cells``, ``--modes`` (some of ``modes``; default ``default_modes``, else
  all) and ``--sizes``: which groups a run times."""
  parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated of lstm,gru")
  parser.add_argument("--modes", default=default_modes or ",".join(modes),
                      help=f"comma-separated of {','.join(modes)} (default: "
                           f"{default_modes or 'all'})")
  parser.add_argument("--sizes", default=default_sizes,
                      help=f"comma-separated of {','.join(SIZES)} (default: "
                           f"{default_sizes or 'all'})")


def groups(parser, args, known_modes=MODES):
  """The cells, modes (of ``known_modes``) and ``{name: size}`` of :func:`group_arguments`' flags
  (``--quick``: :data:`QUICK_SIZES`, whatever ``--sizes`` says); an unknown
  name stops the run with one line that lists the known ones."""
  def pick(flag, text, known):
    names = text.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
      parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; expected some of "
                   f"{','.join(known)}")
    return names
  cell_names = pick("--cells", args.cells, CELLS)
  modes = pick("--modes", args.modes, known_modes)
  if args.quick:
    return cell_names, modes, QUICK_SIZES
  if args.sizes is None:
    return cell_names, modes, SIZES
  return cell_names, modes, {k: SIZES[k] for k in pick("--sizes", args.sizes, SIZES)}


def main(argv=None):
  # Before XLA's threads start (reuse_freed_memory's docstring); every
  # contender runs in this process, so all of them get the reuse.
  reuse = native.reuse_freed_memory()
  parser = common.arguments(__doc__.splitlines()[0], "peers")  # results/peers_gpu.json on a GPU
  parser.add_argument("--contenders", default=None,
                      help=f"comma-separated of {','.join(CONTENDERS)} (default: all that can "
                           "run here)")
  group_arguments(parser)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
  common.table_arguments(parser)
  args = parser.parse_args(argv)
  if args.table_from:
    common.table_from(args.table_from, lambda saved: results_name(saved["config"]["backend"]),
                      markdown)
    return
  if args.contenders is None:
    contenders = [name for name in CONTENDERS if unavailable(name) is None]
  else:
    contenders = args.contenders.split(",")
    for name in contenders:
      if name not in CONTENDERS:
        parser.error(f"unknown contender {name!r}: expected some of {', '.join(CONTENDERS)}")
      reason = unavailable(name)
      if reason:
        parser.error(reason)
  cell_names, modes, sizes = groups(parser, args)
  rounds, calls = (2, 1) if args.quick else (args.rounds, args.calls)
  peak_n = QUICK_PEAK_N if args.quick else PEAK_N
  ceiling = _ceiling(0.01 if args.quick else 0.1)
  timed = None if isinstance(ceiling, str) else ceiling  # measure's pair, or no ceiling
  config = dict(sizes=sizes, rounds=rounds, calls=calls, contenders=contenders, lr=LR,
                peak_matmul=peak_n, backend=backend(), precision=_precision(contenders),
                seqjax_native=native.status(), fused_loop_unroll=fused._unroll(),
                reuse_freed_memory=reuse, target=TARGET,
                fma_ceiling="timed in every round" if timed else ceiling)
  results = []
  for cell_name in cell_names:
    for size_name, size in sizes.items():
      for mode in modes:
        rows, ratios = measure(cell_name, size_name, size, mode, contenders, rounds, calls,
                               peak_n, timed)
        results += rows + ratios
        summary = ", ".join(
            f"{r['contender']} {r['tokens_per_s']['median'] / 1e3:.1f}k "
            f"({r['fraction_of_peak']['median']:.0%})" for r in rows if "contender" in r)
        top = rows[-1].get("ceiling_gflops")
        print(f"{cell_name} ({size_name}) {mode}: {summary} tokens/s (% of the matmul "
              f"peak, {rows[-1]['gflops']['median']:.0f} GFLOP/s"
              + (f"; FMA ceiling {top['median']:.0f} GFLOP/s)" if top else ")"), flush=True)
        common.write(args.out, results_name(), config, results)  # a run cut short keeps these
  print(common.readme_table(results_name(), markdown, results, update=args.update_readme))


def _ceiling(seconds: float):
  """``common.fma_ceiling_run``'s pair on all the cores (calls of about
  ``seconds``), or why there is none: on a GPU the CPU's ceiling bounds
  nothing timed."""
  if backend() != "cpu":
    return f"not timed: the contenders run on {backend()}, not on these cores"
  ceiling = common.fma_ceiling_run(common.environment()["cpu_count"], seconds)
  if isinstance(ceiling, str):
    print(f"peers.py: no FMA ceiling in this run: {ceiling}", flush=True)
  return ceiling


def _precision(contenders) -> dict:
  """Each library's float32 matmul precision setting, as the run had it."""
  settings = {"jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
  if "torch" in contenders:
    import torch  # noqa: PLC0415
    settings.update(torch_float32_matmul_precision=torch.get_float32_matmul_precision(),
                    torch_cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32))
  return settings


if __name__ == "__main__":
  main()
