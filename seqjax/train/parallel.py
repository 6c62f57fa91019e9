"""Data parallelism: the only module that says ``pmap`` or names the device axis.

One process maps a step over its local devices with ``jax.pmap``; gradients and
metrics are averaged with ``lax.pmean`` over the axis. Many processes (TPU pods,
GPU clusters, or CPU processes on loopback) join JAX's multi-controller runtime
through :func:`initialize_distributed`; the same pmapped step then spans every
device of every process, and each process feeds only its own rows of the batch.

Moving to ``shard_map`` later touches this file only.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

AXIS = "devices"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           auto: bool = False) -> bool:
  """Joins the multi-controller runtime when a launch asks for it.

  Arguments left ``None`` fall back to the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
  With none of the three given, nothing happens unless ``auto`` is set, in
  which case JAX detects the cluster itself (TPU pods, SLURM, Open MPI).

  Must run before anything touches a device. On CPU it selects the gloo
  collectives, so processes on one machine can run a data-parallel step.

  Returns:
    Whether the runtime was initialised.

  Raises:
    ValueError: some but not all of the three settings were given.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not any(given) and not auto:
    return False
  if any(given) and not all(given):
    raise ValueError("a multi-process launch needs all of coordinator address, number of "
                     f"processes and process id; got coordinator={coordinator_address!r}, "
                     f"num_processes={num_processes!r}, process_id={process_id!r}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def local_device_count() -> int:
  return jax.local_device_count()


def pmap(fn: Callable, *, donate_argnums=()) -> Callable:
  """``fn`` run on every local device, with :data:`AXIS` as its axis name."""
  return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)


def pmean(tree):
  """Mean over all devices (inside a :func:`pmap`)."""
  return jax.lax.pmean(tree, AXIS)


def psum(tree):
  """Sum over all devices (inside a :func:`pmap`)."""
  return jax.lax.psum(tree, AXIS)


def device_index():
  """This device's position on the axis, across processes (inside a :func:`pmap`)."""
  return jax.lax.axis_index(AXIS)


def check_divisible(rows: int, what: str = "batch size") -> None:
  """Raises ``ValueError`` unless ``rows`` splits evenly over all devices."""
  n = jax.device_count()
  if rows < 1 or rows % n:
    raise ValueError(f"{what} {rows} does not divide evenly over {n} devices "
                     f"({process_count()} processes x {local_device_count()} local "
                     f"devices); choose a positive multiple of {n}")


def process_shard() -> tuple[int, int]:
  """``(index, count)`` of this process: it feeds part ``index`` of ``count`` of a batch."""
  return process_index(), process_count()


def process_rows(rows: int) -> slice:
  """The rows of a global batch of ``rows`` that this process feeds."""
  check_divisible(rows)
  per_process = rows // process_count()
  start = process_index() * per_process
  return slice(start, start + per_process)


def shard(tree):
  """Splits leading [B, ...] (this process's rows) into [devices, B / devices, ...]."""
  n = local_device_count()

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"{x.shape[0]} rows do not divide over {n} local devices")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, tree)


def unshard(tree):
  """Inverse of :func:`shard`: [devices, B / devices, ...] -> [B, ...] on the host."""
  return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]),
                      jax.device_get(tree))


def replicate(tree):
  """``tree`` stacked once per local device (leading device axis); ``pmap`` places it."""
  n = local_device_count()
  return jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), tree)


def unreplicate(tree):
  """Device 0's copy of a replicated tree, on the host."""
  return jax.device_get(jax.tree.map(lambda x: x[0], tree))


def gather_rows(tree):
  """This process's rows of every leaf joined with the other processes' ([B_global, ...])."""
  if process_count() == 1:
    return tree
  return multihost_utils.process_allgather(tree, tiled=True)


def local_rows(tree, rows: int):
  """This process's rows of global [rows, ...] leaves (inverse of :func:`gather_rows`)."""
  part = process_rows(rows)
  return jax.tree.map(lambda x: np.asarray(x)[part], tree)

