"""Checkpoints with Orbax: the only module that imports it.

A checkpoint directory holds one folder per saved step, written by an Orbax
``CheckpointManager``. Each step keeps three items: ``state`` (the train state
as a tree of arrays), ``config`` (the experiment config as JSON, so ``seqjax
eval`` can rebuild the model) and ``info`` (the data source's ``info`` as JSON,
such as a vocabulary, so ``seqjax sample`` needs no data). Nothing is pickled.

- Saves run in the background (async); Orbax writes to a temporary folder and
  renames it when complete, so a kill mid-write leaves the previous checkpoint
  intact.
- The newest ``keep`` checkpoints are kept, plus the ``keep_best`` best by an
  evaluation metric.
- :meth:`Checkpointer.restore` falls back: a checkpoint that cannot be read is
  reported in one line, set aside as ``<step>.corrupt``, and the next older one
  is tried.
- With several processes, every process calls :meth:`save` and Orbax writes
  once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

Log = Callable[[str], None]


class _QuietUnrankedSaves(logging.Filter):
  """Drops Orbax's warning for a save without evaluation metrics: most saves
  have none (only the steps that also evaluate do), and that is intended."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUnrankedSaves())


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _host_tree(tree):
  """NumPy arrays for every leaf (0-d arrays for scalars), as Orbax expects."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
  """Saves and restores train states in ``directory``.

  Args:
    directory: where step folders go (created if missing).
    keep: how many of the newest checkpoints to keep.
    keep_best: how many of the best (by ``best_metric``) to keep besides.
    best_metric: name of the evaluation metric passed to :meth:`save`.
    best_mode: ``"min"`` or ``"max"``: which way is better.
    async_save: write in the background.
    log: where one-line notices go (default stderr).
  """

  def __init__(self, directory, *, keep: int = 3, keep_best: int = 1,
               best_metric: str = "loss", best_mode: str = "min",
               async_save: bool = True, log: Log = _stderr):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = Path(directory).absolute()
    self.best_metric, self.best_mode, self.log = best_metric, best_mode, log
    policies = [checkpoint_managers.LatestN(keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == "min", n=keep_best, keep_checkpoints_without_metrics=False))
    self._options = ocp.CheckpointManagerOptions(
        # best_fn makes Orbax write each checkpoint's metrics, so the ranking
        # survives a restart; the preservation policy does the keeping.
        best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=self._options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "info": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> Path:
    return self.directory / str(step)

  def best_step(self) -> int | None:
    """The kept step with the best ``best_metric``, or ``None`` if none has it."""
    return self._manager.best_step()

  def save(self, step: int, state, config: dict, metrics: dict | None = None,
           info: dict | None = None) -> None:
    """Starts saving ``state`` (a pytree of arrays), ``config`` and ``info`` at ``step``.

    ``metrics`` (evaluation results) rank the checkpoint for ``keep_best``.
    Returns once the arrays are copied to the host; the write continues in the
    background (see :meth:`wait`).
    """
    if metrics is not None and self.best_metric not in metrics:
      metrics = None  # without the ranking metric it competes only for "newest"
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_host_tree(state)),
        config=ocp.args.JsonSave(config),
        info=ocp.args.JsonSave(info or {})), metrics=metrics, force=True)

  def wait(self) -> None:
    """Blocks until every background write has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def _set_aside(self, step: int, error: BaseException) -> None:
    path = self.path(step)
    self.log(f"checkpoint {path} is unreadable ({_first_line(error)}); set aside as "
             f"{path.name}.corrupt, trying an older one")
    if jax.process_index() == 0 and path.exists():
      os.replace(path, path.with_name(f"{step}.corrupt"))
    self._manager.reload()

  def _newest_readable(self, step: int | None, read: Callable[[int], Any], what: str):
    """``(s, read(s))`` for ``step``, or else for the newest step that reads.

    An unreadable checkpoint is set aside and the next older one tried; a
    :class:`LayoutMismatch` is the caller's mistake, not corruption, and stops.
    """
    for s in ([step] if step is not None else sorted(self.steps(), reverse=True)):
      try:
        return s, read(s)
      except LayoutMismatch:
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read means unusable
        if step is not None:
          raise ValueError(f"cannot read {what} of checkpoint {self.path(s)}: "
                           f"{_first_line(e)}") from None
        self._set_aside(s, e)
    return None

  def load_config(self, step: int | None = None) -> tuple[int, dict] | None:
    """``(step, config dict)`` of ``step`` (default: the newest readable)."""
    def read(s):
      return dict(self._manager.restore(
          s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
    return self._newest_readable(step, read, "the config")

  def load_info(self, step: int) -> dict:
    """The data ``info`` saved at ``step`` (``{}`` for checkpoints without one)."""
    if not (self.path(step) / "info").is_dir():
      return {}
    try:
      return dict(self._manager.restore(
          step, args=ocp.args.Composite(info=ocp.args.JsonRestore())).info)
    except Exception as e:  # noqa: BLE001 - any failure to read means unusable
      raise ValueError(f"cannot read the data info of checkpoint {self.path(step)}: "
                       f"{_first_line(e)}") from None

  def restore_saved(self, step: int) -> Any:
    """The state of ``step`` as saved (NumPy arrays), without a target to shape it.

    For reading parts of a state (the parameters, to sample) without building
    the whole run.

    Raises:
      ValueError: the checkpoint cannot be read.
    """
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    except Exception as e:  # noqa: BLE001 - any failure to read means unusable
      raise ValueError(f"cannot read the state of checkpoint {self.path(step)}: "
                       f"{_first_line(e)}") from None

  def restore(self, target, step: int | None = None) -> tuple[int, Any] | None:
    """``(step, state)`` from the newest readable checkpoint, or ``None`` if none.

    Args:
      target: a pytree with the structure, shapes and dtypes to restore into.
      step: restore exactly this step (no fallback).

    Raises:
      LayoutMismatch: the checkpoint holds a state of another structure, shape
        or dtype than ``target`` (another model or optimiser).
      ValueError: ``step`` is given and cannot be read.
    """
    target = _host_tree(target)

    def read(s):
      saved = self._manager.item_metadata(s)["state"].tree
      _check_layout(saved, target, self.path(s))
      return self._manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    return self._newest_readable(step, read, "the state")


class LayoutMismatch(ValueError):
  """A readable checkpoint whose arrays do not fit the state to restore."""


def _layout(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in leaves}


def _check_layout(saved, target, path: Path) -> None:
  saved, expected = _layout(saved), _layout(target)
  for key in sorted(set(saved) | set(expected)):
    if saved.get(key) != expected.get(key):
      describe = lambda v: "absent" if v is None else f"{v[0]} {v[1]}"
      raise LayoutMismatch(
          f"checkpoint {path} holds another state layout (another model or "
          f"optimiser?): at {key} it has {describe(saved.get(key))}, the run expects "
          f"{describe(expected.get(key))}; use a new workdir")
