"""The training loop: ``train_and_evaluate(config, workdir)``.

One loop for every model of the zoo. It builds the data source, the model and
the optimiser a config names, restores the newest checkpoint in ``workdir`` if
there is one, and trains to ``config.train.steps`` with periodic evaluation and
checkpoints. What a run leaves in ``workdir``:

- ``checkpoints/<step>/``: Orbax checkpoints (train state, config JSON and
  the data source's info, such as a vocabulary);
- ``metrics.jsonl``: one JSON object per logged step and split, with
  ``train_time`` (seconds spent in training steps, compilation included,
  evaluation and checkpoints not) and ``wall_time`` (seconds of the run); a
  resumed run continues both from the last record at or before its checkpoint,
  and its records after that step supersede the earlier process's;
- ``tensorboard/``: the same metrics as TensorBoard event files.

The first of the source's ``eval_splits`` (validation) is evaluated every
``train.eval_every`` steps and ranks the checkpoints; at the end of the run
every split is evaluated (validation and test).

A run stopped by SIGTERM or SIGINT saves a checkpoint and returns normally; a
run killed outright resumes from its last checkpoint and ends with the same
parameters as an uninterrupted run, because the data position and the RNG key
are part of the state. A non-finite loss stops the run with
:class:`TrainingDiverged`, before any checkpoint of the bad state is written.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import tqdm

from seqjax import data as data_lib
from seqjax import decoding
from seqjax import models as models_lib
from seqjax.train import checkpoint as checkpoint_lib
from seqjax.train import optim, parallel
from seqjax.train import step as step_lib
from seqjax.train.state import TrainState


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


def default_config() -> ml_collections.ConfigDict:
  """The fields every experiment has; experiments fill ``model`` and ``data``."""
  return ml_collections.ConfigDict(dict(
      seed=0,                    # parameters, dropout and data all derive from it
      model=ml_collections.ConfigDict(),
      data=ml_collections.ConfigDict(),
      optimizer=optim.default_config(),
      train=ml_collections.ConfigDict(dict(
          steps=1000,            # optimiser updates in the whole run
          log_every=50,          # train metrics averaged over this many steps
          eval_every=500,        # 0: only at the end
          checkpoint_every=500,  # 0: only at the end (and on SIGTERM)
          keep_checkpoints=3,    # newest kept ...
          keep_best=1,           # ... plus the best by best_metric
          best_metric="loss",    # an evaluation metric
          best_mode="min",
          async_checkpoints=True,
          progress=True,         # progress bar on stderr
      )),
  ))


def quick_train(config) -> None:
  """Shrinks ``config.train`` for tests: four steps that still log, evaluate and
  checkpoint twice (an experiment's ``get_config(quick=True)`` calls it)."""
  config.train.update(dict(steps=4, log_every=2, eval_every=2, checkpoint_every=2,
                           progress=False))


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


class _Writer:
  """Metrics to ``metrics.jsonl`` and TensorBoard; silent on processes other than 0."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 writes
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    self._tb.flush()

  def times_at(self, step: int) -> tuple[float, float]:
    """``(train_time, wall_time)`` of the last record at or before ``step``, or zeros."""
    found = (0.0, 0.0)
    if not self.enabled:
      return found
    with open(self._jsonl.name, encoding="utf-8") as lines:
      for line in lines:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
          continue
        if record.get("step", step + 1) <= step and "train_time" in record:
          found = (float(record["train_time"]), float(record.get("wall_time", 0.0)))
    return found

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class _Signals:
  """Turns SIGTERM and SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _zeros(shapes):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _add(total, metrics):
  return metrics if total is None else jax.tree.map(np.add, total, metrics)


class _Run:
  """The pieces of one run, built from a config."""

  def __init__(self, config, workdir: Path | None, log):
    self.config, self.log = config, log
    self.global_rows = config.data.batch_size
    parallel.check_divisible(self.global_rows, "data.batch_size")
    if "eval_batch_size" in config.data:
      parallel.check_divisible(config.data.eval_batch_size, "data.eval_batch_size")
    self.source = data_lib.create(config.data, shard=parallel.process_shard(),
                                  seed=config.seed)
    self.info = self.source.info
    model_lib = models_lib.get(config.model.name)
    self.model = model_lib.create(config.model, self.info)
    self.loss_fn = functools.partial(model_lib.loss, config.model)
    self.tx = optim.make_optimizer(config.optimizer, config.train.steps)
    self.eval_step = step_lib.make_eval_step(self.model, self.loss_fn)
    self.checkpointer = None
    if workdir is not None:
      train = config.train
      self.checkpointer = checkpoint_lib.Checkpointer(
          workdir / "checkpoints", keep=train.keep_checkpoints, keep_best=train.keep_best,
          best_metric=train.best_metric, best_mode=train.best_mode,
          async_save=train.async_checkpoints, log=log)

  def initial_state(self) -> TrainState:
    """Step 0: parameters from the seed; zero carry for streamed data."""
    first = self.source.batch(0)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(self.config.seed))
    variables = jax.jit(functools.partial(self.model.init, train=False))(
        {"params": init_key, "dropout": init_key}, first, None)
    carry = None
    if self.source.stateful:
      carry = _zeros(jax.eval_shape(
          lambda v, b: self.model.apply(v, b, None, train=False)[0], variables, first))
    return TrainState.create(params=variables["params"], tx=self.tx, rng=state_key,
                             carry=carry)

  # The saved form holds every process's rows of the carry.
  def saveable(self, state: TrainState) -> dict:
    return state.replace(carry=parallel.gather_rows(state.carry)).saveable()

  def from_saved(self, template: TrainState, tree: dict) -> TrainState:
    state = template.restored(tree)
    return state.replace(carry=parallel.local_rows(state.carry, self.global_rows))

  def restore_target(self, state: TrainState) -> dict:
    grow = lambda x: np.zeros((self.global_rows,) + np.shape(x)[1:], np.asarray(x).dtype)
    return state.replace(carry=jax.tree.map(grow, state.carry)).saveable()

  def evaluate(self, params_on_devices, split: str) -> dict:
    """Metrics over the whole of one evaluation split (carry kept across stream windows)."""
    total, carry = None, None
    for batch in self.source.eval_batches(split):
      carry, metrics = self.eval_step(params_on_devices, parallel.shard(batch), carry)
      if not self.source.stateful:
        carry = None
      total = _add(total, jax.device_get(jax.tree.map(lambda x: x[0], metrics)))
    return step_lib.means(total)


def _to_devices(state: TrainState) -> TrainState:
  return parallel.replicate(state.replace(carry=None)).replace(
      carry=parallel.shard(state.carry))


def _from_devices(state: TrainState) -> TrainState:
  return parallel.unreplicate(state.replace(carry=None)).replace(
      carry=parallel.unshard(state.carry) if state.carry is not None else None)


def _check_resumable(saved: dict, config) -> None:
  """A workdir continues one run: the model and the batch layout must match."""
  pairs = [("model", saved.get("model"), config.model.to_dict())]
  for key in ("name", "batch_size"):
    pairs.append((f"data.{key}", saved.get("data", {}).get(key), config.data.get(key)))
  for name, before, now in pairs:
    if before != now:
      raise ValueError(f"the checkpoints in this workdir were written with {name} = "
                       f"{before}, not {now}; use a new workdir to change it")


def _check_same_info(saved: dict, now: dict, where) -> None:
  """The data a checkpoint was trained on must describe itself as the data now does."""
  if saved != now:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    raise ValueError(f"the data differs from what the checkpoints in {where} were trained "
                     f"on ({', '.join(keys)}: {saved.get(keys[0])!r} then, "
                     f"{now.get(keys[0])!r} now)")


def _eval_line(step: int, results: dict) -> str:
  return f"step {step}: " + "; ".join(
      f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
      for split, metrics in results.items())


def train_and_evaluate(config, workdir, *, log=_stderr) -> dict:
  """Trains the model ``config`` describes, resuming from ``workdir``'s checkpoints.

  Args:
    config: an experiment config (see :func:`default_config`).
    workdir: folder for checkpoints and metrics (created if missing).
    log: where one-line notices go.

  Returns:
    A dict: ``step`` reached, ``stopped_by`` (the signal name, or ``None``),
    and ``eval``: ``{split: metrics}`` of the last evaluation (every split at
    the end of the run), or ``{}``.

  Raises:
    TrainingDiverged: the training loss became NaN or infinite.
    ValueError: a config that names unknown things or does not fit the devices.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = _Run(config, workdir, log)
  cfg = config.train
  lead = parallel.process_index() == 0

  state = run.initial_state()
  saved = run.checkpointer.load_config()
  if saved is not None:
    _check_resumable(saved[1], config)
    _check_same_info(run.checkpointer.load_info(saved[0]), run.info, workdir)
    restored = run.checkpointer.restore(run.restore_target(state))
    if restored is not None:
      state = run.from_saved(state, restored[1])
      log(f"resumed from {run.checkpointer.path(restored[0])}")
  start, position = int(state.step), int(state.data_position)
  config_json = json.loads(config.to_json())

  train_step = step_lib.make_train_step(run.model, run.loss_fn)
  on_devices = _to_devices(state)
  writer = _Writer(workdir, enabled=lead)
  result = {"step": start, "stopped_by": None, "eval": {}}
  tokens_per_step = int(np.prod(np.shape(run.source.batch(position)["inputs"])[:2])) \
      * parallel.process_count()

  pending = []          # (step, metrics on device) not yet fetched
  last_saved = run.checkpointer.latest_step()
  # Seconds in training steps (not evaluation or checkpoints) and of the whole
  # run, continued from before the checkpoint when resuming.
  train_time, wall_before = writer.times_at(start) if start else (0.0, 0.0)
  started = clock = time.perf_counter()

  def times() -> dict:
    return {"train_time": train_time,
            "wall_time": wall_before + time.perf_counter() - started}

  def flush(step: int) -> None:
    """Fetches pending train metrics, stops on a non-finite loss, logs their mean."""
    nonlocal pending, clock, train_time
    if not pending:
      return
    fetched = [(s, jax.device_get(jax.tree.map(lambda x: x[0], m))) for s, m in pending]
    for s, m in fetched:
      total, _ = m["loss"]
      if not math.isfinite(float(total)):
        last = (f"the last good checkpoint is {run.checkpointer.path(last_saved)}"
                if last_saved is not None else "no checkpoint was saved")
        raise TrainingDiverged(f"training loss is {float(total)} at step {s}; stopping. "
                               f"{last}")
    total = None
    for _, m in fetched:
      total = _add(total, m)
    metrics = step_lib.means(total)
    elapsed = time.perf_counter() - clock
    train_time += elapsed
    metrics["steps_per_second"] = len(fetched) / elapsed
    metrics["tokens_per_second"] = len(fetched) * tokens_per_step / elapsed
    writer.write(step, "train", dict(metrics, **times()))
    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                    tok_s=f"{metrics['tokens_per_second']:.3g}", refresh=False)
    pending, clock = [], time.perf_counter()

  def save(step: int, metrics: dict | None) -> None:
    nonlocal last_saved
    host = _from_devices(on_devices)
    run.checkpointer.save(step, run.saveable(host), config_json, metrics, run.info)
    last_saved = step

  def evaluate(step: int, splits) -> dict:
    results = {}
    for split in splits:
      results[split] = run.evaluate(on_devices.params, split)
      writer.write(step, split, dict(results[split], **times()))
    if lead:
      bar.write(_eval_line(step, results))
    return results

  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not (lead and cfg.progress),
                  desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
  try:
    with _Signals() as signals:
      for step in range(start, cfg.steps):
        batch = parallel.shard(run.source.batch(position))
        on_devices, metrics = train_step(on_devices, batch)
        pending.append((step + 1, metrics))
        position, done = position + 1, step + 1
        bar.update(1)
        stop = signals.received  # read once: a signal may land mid-iteration
        final = done == cfg.steps or stop is not None
        if done % cfg.log_every == 0 or final:
          flush(done)
        evaluated = None
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
          flush(done)
          splits = run.source.eval_splits
          result["eval"] = evaluate(done, splits if done == cfg.steps else splits[:1])
          evaluated = result["eval"][splits[0]]
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or final:
          flush(done)
          save(done, evaluated)
        if not pending:  # flushed: what followed (evaluation, saving) is not training
          clock = time.perf_counter()
        result["step"] = done
        if stop is not None:
          result["stopped_by"] = stop
          log(f"{stop} received: saved {run.checkpointer.path(done)}, stopping")
          break
  finally:
    bar.close()
    run.checkpointer.wait()
    run.checkpointer.close()
    writer.close()
  if start >= cfg.steps:
    log(f"nothing to do: the checkpoint is at step {start}, train.steps is {cfg.steps}")
  return result


class Trained(NamedTuple):
  """A saved run: the step, its config, its data ``info`` and its parameters."""

  step: int
  config: ml_collections.ConfigDict
  info: dict
  params: Any


def load_trained(workdir, *, step: int | None = None, checkpoint: str = "latest",
                 matmul_dtype: str | None = None, log=_stderr) -> Trained:
  """The parameters of a saved run, and what rebuilds its model (no data needed).

  Args:
    workdir: a training run's workdir.
    step: this step; otherwise ``checkpoint`` decides.
    checkpoint: ``"latest"`` (newest readable) or ``"best"`` (best evaluation).
    matmul_dtype: replaces the model's ``matmul_dtype`` in the returned config
      (``"float32"``, ``"bfloat16"``, ``"int8"``: see :mod:`seqjax.cells`), to
      run a model trained in one precision in another; ``None``: as trained.

  Raises:
    ValueError: no readable checkpoint in ``workdir``, or none ranked as best;
      a ``matmul_dtype`` for a model without that option.
  """
  directory = Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ValueError(f"no checkpoints in {workdir} (expected {directory})")
  if checkpoint not in ("latest", "best"):
    raise ValueError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")
  probe = checkpoint_lib.Checkpointer(directory, async_save=False, log=log)
  try:
    if step is None and checkpoint == "best":
      step = probe.best_step()
      if step is None:
        raise ValueError(f"no checkpoint in {directory} has an evaluation metric to rank by")
    loaded = probe.load_config(step)
    if loaded is None:
      raise ValueError(f"no readable checkpoint in {directory}")
    step, config = loaded
    config = ml_collections.ConfigDict(config)
    if matmul_dtype is not None:
      if "matmul_dtype" not in config.model:
        raise ValueError(f"model {config.model.name!r} has no matmul_dtype option")
      config.model.matmul_dtype = matmul_dtype
    return Trained(step=step, config=config,
                   info=probe.load_info(step),
                   params=probe.restore_saved(step)["params"])
  finally:
    probe.close()


def evaluate(workdir, *, step: int | None = None, checkpoint: str = "latest",
             splits=None, matmul_dtype: str | None = None, log=_stderr) -> dict:
  """Evaluates a saved run on every evaluation split of its data.

  The model is rebuilt from the checkpoint's config, and the data from the
  config's data section; the data must still describe itself as it did in
  training (a text corpus must give the same vocabulary).

  Args:
    workdir: a training run's workdir.
    step, checkpoint: which checkpoint (see :func:`load_trained`).
    splits: the splits to evaluate (default: all of the data's).
    matmul_dtype: the model's matmuls in this precision (see
      :func:`load_trained`), e.g. ``"int8"`` to measure what sampling in int8
      costs a float32 model.

  Returns:
    ``{"step": int, "eval": {split: metrics}}``.

  Raises:
    ValueError: no readable checkpoint, an unknown split, or changed data.
  """
  trained = load_trained(workdir, step=step, checkpoint=checkpoint, matmul_dtype=matmul_dtype,
                         log=log)
  run = _Run(trained.config, None, log)
  _check_same_info(trained.info, run.info, workdir)
  splits = run.source.eval_splits if splits is None else tuple(splits)
  unknown = [s for s in splits if s not in run.source.eval_splits]
  if unknown:
    raise ValueError(f"unknown split {unknown[0]!r}; the data has "
                     f"{', '.join(run.source.eval_splits)}")
  params = parallel.replicate(trained.params)
  return {"step": trained.step,
          "eval": {split: run.evaluate(params, split) for split in splits}}


def sample(workdir, *, prompt: str = "\n", length: int = 500, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
           step: int | None = None, checkpoint: str = "latest", chunk: int = 512,
           matmul_dtype: str | None = None, write=None, log=_stderr) -> list[str]:
  """Text from a trained model that generates (see :mod:`seqjax.models`).

  The model reads the prompt, then a jitted ``lax.scan`` (:mod:`seqjax.decoding`),
  or the model's own ``generate``, draws ``length`` characters, each fed back,
  ``chunk`` at a time so that text can be shown as it comes. The same seed
  gives the same text, whatever the chunk. Each chunk is a call, and a call
  pays a fixed cost (the native sampler packs its weights for it): on the
  2 x 512 LSTM char-LM (bfloat16 matmuls, 2 CPU cores), chunks of 64 drew
  4.4-5.0k characters a second, of 512 15-17k.

  Args:
    workdir, step, checkpoint: which trained model (see :func:`load_trained`).
    prompt: the text to continue (at least one character of the vocabulary).
    length: characters to draw after the prompt.
    temperature, top_k, top_p: see :func:`seqjax.decoding.sample_logits`;
      temperature 0 is greedy.
    num_samples: independent continuations, drawn as one batch.
    seed: the random seed.
    matmul_dtype: the model's matmuls in this precision (see
      :func:`load_trained`); ``"int8"`` samples the char-LM on the native
      sampler's int8 matmuls (AVX512_VNNI), 1.5x its bfloat16 speed at
      batch 64 (``benchmarks/sampling.py``).
    write: called with each new piece of text when ``num_samples == 1``.

  Returns:
    The ``num_samples`` continuations (without the prompt).

  Raises:
    ValueError: a model that does not generate, prompt characters outside its
      vocabulary, or bad sampling settings.
  """
  if length < 1 or num_samples < 1 or chunk < 1:
    raise ValueError(f"length, num_samples and chunk must be >= 1, got {length}, "
                     f"{num_samples} and {chunk}")
  if not prompt:
    raise ValueError("the prompt must have at least one character")
  decoding.check_settings(temperature, top_k, top_p)  # before any loading
  trained = load_trained(workdir, step=step, checkpoint=checkpoint, matmul_dtype=matmul_dtype,
                         log=log)
  model_lib = models_lib.get(trained.config.model.name)
  if not hasattr(model_lib, "decode_step"):
    raise ValueError(f"model {trained.config.model.name!r} does not generate text")
  vocab = model_lib.vocabulary(trained.info)
  missing = vocab.missing(prompt)
  if missing:
    raise ValueError(f"the prompt has characters outside the model's vocabulary: "
                     f"{' '.join(repr(c) for c in missing)}")
  module = model_lib.create(trained.config.model, trained.info)
  step_fn = model_lib.decode_step(module)
  params = jax.device_put(trained.params)

  prompt_ids = np.tile(vocab.encode(prompt)[None], (num_samples, 1))  # [N, P]
  carry, logits = jax.jit(step_fn)(params, None, prompt_ids)
  if hasattr(model_lib, "generate"):  # the model's own sampler: the same tokens, faster
    generate = functools.partial(model_lib.generate, module)
  else:
    generate = functools.partial(decoding.generate, step_fn)
  draw = jax.jit(functools.partial(generate, length=chunk, temperature=temperature, top_k=top_k,
                                   top_p=top_p))
  key = jax.random.PRNGKey(seed)
  pieces, drawn = [], 0
  while drawn < length:
    carry, logits, tokens = draw(params, carry, logits, key, start=drawn)
    tokens = np.asarray(tokens)[:, :length - drawn]  # [N, <= chunk]
    pieces.append(tokens)
    drawn += tokens.shape[1]
    if write is not None and num_samples == 1:
      write(vocab.decode(tokens[0]))
  tokens = np.concatenate(pieces, axis=1)
  return [vocab.decode(row) for row in tokens]
