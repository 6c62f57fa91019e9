"""A native CPU kernel for the LSTM forward recurrence (XLA FFI), built on first use.

XLA:CPU runs each per-step matmul of a ``lax.scan`` LSTM on one core, so on a
multi-core CPU the recurrence leaves the other cores idle. ``lstm.cc`` splits
the hidden units across the cores, each thread owning the four gate columns
of its units, and the threads meet once a step to exchange h
(benchmarks/README.md has the measurements). :func:`seqjax.fused.lstm_scan`
calls it for float32 inference on CPU; gradients keep the XLA path.

The kernel is compiled with the system's C++ compiler (``$CXX``, else ``g++``
or ``c++``) for this machine's CPU the first time it is needed, and cached in
``$SEQJAX_CACHE_DIR`` (default ``~/.cache/seqjax``). It needs Linux on an
x86-64 CPU with AVX-512; elsewhere, or with ``SEQJAX_NATIVE=0``, or if the
build fails (a warning says why), seqjax runs the XLA path: same results to
float32 rounding, slower on CPU. :func:`status` says which applies.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("lstm.cc")
_TARGET = "seqjax_lstm_forward"
_LANES = 16  # float32 lanes of an AVX-512 register: partitions are multiples of it
_MIN_UNITS = 32  # hidden units per partition below which more threads stop paying


def _cpu_flags() -> set[str]:
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return set()
  for line in text.splitlines():
    if line.startswith("flags"):
      return set(line.split(":", 1)[1].split())
  return set()


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cache_dir() -> Path:
  root = os.environ.get("SEQJAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqjax")
  return Path(root)


def _build(compiler: str) -> Path:
  """Compiles ``lstm.cc`` into the cache (once per source, compiler, jaxlib and CPU)."""
  include = jax.ffi.include_dir()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
           f"-I{include}"]
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode(),
               jax.__version__.encode(), " ".join(sorted(_cpu_flags())).encode()):
    key.update(part)
  out = _cache_dir() / f"lstm-{key.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    built = Path(tmp) / out.name
    run = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(built)],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
      tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
      raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: " + " | ".join(tail))
    os.replace(built, out)  # atomic: a concurrent build leaves one whole file
  return out


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernel; ``None`` on success, else why not."""
  if os.environ.get("SEQJAX_NATIVE", "1") == "0":
    return "disabled by SEQJAX_NATIVE=0"
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
  if "avx512f" not in _cpu_flags():
    return "needs a CPU with AVX-512 (avx512f), this one has none"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler found ($CXX, g++ or c++)"
  try:
    import ctypes
    library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.SeqjaxLstmForward),
                                platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    warnings.warn(f"seqjax: the native LSTM kernel was not built, using the XLA path ({e})",
                  RuntimeWarning, stacklevel=3)
    return f"build failed: {e}"
  return None


def status() -> str:
  """``"ready"``, or why the native kernel is not used here."""
  return _load() or "ready"


def partitions(hidden: int, cores: int | None = None) -> int | None:
  """How many threads split ``hidden`` units, or ``None`` if the kernel cannot.

  Each partition is a whole number of AVX-512 registers (16 units) and at least
  ``_MIN_UNITS`` units when there is more than one.
  """
  if hidden % _LANES:
    return None
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  for p in range(min(cores, hidden // _LANES), 0, -1):
    if hidden % (_LANES * p) == 0 and (p == 1 or hidden // p >= _MIN_UNITS):
      return p
  return 1


def usable(params, xs, h0, c0, matmul_dtype) -> bool:
  """Whether :func:`lstm_forward` can run this call: float32, CPU, a size it splits."""
  arrays = (params["w_x"], params["w_h"], params["b"], xs, h0, c0)
  if matmul_dtype is not None or any(jnp.result_type(a) != jnp.float32 for a in arrays):
    return False
  if xs.ndim != 3 or h0.ndim != 2 or jax.default_backend() != "cpu":
    return False
  return partitions(h0.shape[-1]) is not None and _load() is None


def pack(params, parts: int):
  """``w [P, D + H, 4 Hp]`` and ``b [P, 4 Hp]``: each partition's i, f, g, o columns."""
  w = jnp.concatenate([params["w_x"], params["w_h"]], axis=0)  # [D + H, 4H]
  rows, hidden = w.shape[0], params["w_h"].shape[0]
  units = hidden // parts
  w = w.reshape(rows, 4, parts, units).transpose(2, 0, 1, 3).reshape(parts, rows, 4 * units)
  b = params["b"].reshape(4, parts, units).transpose(1, 0, 2).reshape(parts, 4 * units)
  return w, b


def lstm_forward(params, xs, h0, c0, valid=None, resets=None):
  """``(h_T, c_T, ys)``: :func:`seqjax.fused.lstm_scan` without gradients, on the kernel.

  Same arguments and semantics (time-major ``xs [T, B, D]``, ``h0, c0 [B, H]``,
  ``valid``/``resets`` ``[T, B]`` bool or ``None``). CPU only; check
  :func:`usable` first.
  """
  time, batch, _ = xs.shape
  hidden = h0.shape[-1]
  w, b = pack(params, partitions(hidden))
  absent = jnp.zeros((0,), jnp.uint8)
  flags = [absent if m is None else jnp.asarray(m).astype(jnp.uint8) for m in (valid, resets)]
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  call = jax.ffi.ffi_call(_TARGET, (f32(time, batch, hidden), f32(batch, hidden), f32(batch, hidden)),
                          vmap_method="sequential")
  ys, h, c = call(xs, w, b, h0, c0, *flags)
  return h, c, ys


__all__ = ["status", "usable", "partitions", "pack", "lstm_forward"]
