"""Native CPU kernels for the LSTM and GRU recurrences (XLA FFI), built on first use.

XLA:CPU runs each per-step matmul of a ``lax.scan`` recurrence on one core, so
on a multi-core CPU the recurrence leaves the other cores idle. ``rnn.cc``
splits the hidden units across the cores, each thread owning the gate columns
of its units, and the threads meet once a step to exchange h; or, where each
thread gets 5 rows or more and the weights are small (:func:`row_groups`),
it splits the batch's rows, each thread running its rows' steps alone
(benchmarks/README.md has the measurements). :mod:`seqjax.fused` calls them
in float32 on CPU: each cell's forward loop, saving what its backward pass
reads when a gradient is taken, and its backward pass's reverse loop. A cell
with ``matmul_dtype="bfloat16"`` runs them too where the CPU has AVX512_BF16:
the matmul operands rounded to bfloat16 as the XLA path rounds them, the
products summed in float32. :func:`lstm_sample` and :func:`gru_sample` draw
a stacked LSTM or GRU language model's tokens, every step in one call (the
char-LM's sampler), also with
``matmul_dtype="int8"`` where the CPU has AVX512_VNNI (as
:func:`seqjax.fused.int8_matmul`, exact integer sums). The forward and
reverse loops do not run int8: an int8 cell runs on the XLA path. A hidden
size that is not a whole number of registers (16 units) runs on
:func:`padded_units` units, the rest zero (:mod:`seqjax.fused` pads them).

The kernels are compiled with the system's C++ compiler (``$CXX``, else ``g++``
or ``c++``) for this machine's CPU the first time they are needed, and cached
in ``$SEQJAX_CACHE_DIR`` (default ``~/.cache/seqjax``). They need Linux on an
x86-64 CPU with AVX-512; elsewhere, or with ``SEQJAX_NATIVE=0``, or if the
build fails (a warning says why), seqjax runs the XLA path: same results to
float32 rounding, slower on CPU. :func:`status` says which applies.
``SEQJAX_NATIVE_THREADS`` sets how many threads share a step (default: the
CPUs this process may use, capped by a container's CPU quota). A call does
not wait for a thread that is late (asleep, or off its core): the others
take its share of a step until it joins (``SEQJAX_NATIVE_LATE_WORKERS_US``,
for tests, makes every worker thread that late).
:func:`disabled` traces a block's functions on the XLA path, to compare the two;
:func:`build_variant` and :func:`variant` do the same for an edited copy of
``rnn.cc`` built beside the kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("rnn.cc")
_TARGETS = {"seqjax_lstm_forward": "SeqjaxLstmForward",
            "seqjax_lstm_forward_saving": "SeqjaxLstmForwardSaving",
            "seqjax_lstm_reverse": "SeqjaxLstmReverse",
            "seqjax_gru_forward": "SeqjaxGruForward",
            "seqjax_gru_forward_saving": "SeqjaxGruForwardSaving",
            "seqjax_gru_reverse": "SeqjaxGruReverse",
            "seqjax_outer_sum": "SeqjaxOuterSum",
            "seqjax_lstm_sample": "SeqjaxLstmSample",
            "seqjax_gru_sample": "SeqjaxGruSample"}
_LANES = 16  # float32 lanes of an AVX-512 register: partitions are multiples of it
_MIN_UNITS = 32  # hidden units per partition below which more threads stop paying
_GROUP_ROWS = 5  # a row group's fewest rows (4 a thread ran slower than the units' split)
# floats (8 MiB): the most a row group's thread reads every step. At D = H =
# 512 (2^21 floats for the LSTM) rows ran 0.98-1.13x the units' split (the
# medians of benchmarks/row_groups.py's runs, most at 1.00 or more: its
# README section); at H = 1024 (2^23) 0.79-1.00x.
_GROUP_WEIGHTS = 2 ** 21
# A kernel call first packs the weights for its threads (~0.5 ms for the 2M
# floats of D = H = 512), which a short call does not repay. Measured with the
# calls in a loop (benchmarks/short_calls.py, 2 cores): one step per call, as
# a sampler feeds tokens, ran 0.18-0.77x the XLA path's speed at B = 1 for
# every size; from 4 steps, small weights (D = H <= 256) mostly won
# (1.15-2.3x), and the kernels paid once a call had about one row-step (a row
# of a step: T B of them) for every 2^15 floats of weights (D = H = 512: 65
# LSTM steps at B = 1, 5 at B = 16).
_MIN_STEPS = 4
_WEIGHTS_PER_ROW_STEP = 1 << 15


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


def _build(compiler: str, source: Path = _SOURCE) -> Path:
  """Compiles ``source`` (``rnn.cc``) into the cache (once per source's text,
  compiler, jaxlib and CPU)."""
  include = jax.ffi.include_dir()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
           f"-I{include}"]
  key = hashlib.sha256()
  for part in (source.read_bytes(), compiler.encode(), " ".join(flags).encode(),
               jax.__version__.encode(), " ".join(sorted(_cpu_flags())).encode()):
    key.update(part)
  out = _cache_dir() / f"rnn-{key.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    built = Path(tmp) / out.name
    run = subprocess.run([compiler, *flags, str(source), "-o", str(built)],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
      tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
      raise RuntimeError(f"{compiler} failed on {source.name}: " + " | ".join(tail))
    os.replace(built, out)  # atomic: a concurrent build leaves one whole file
  return out


def _register(library: Path, prefix: str) -> None:
  """Registers the kernels of a built ``library`` under their targets' names
  (:data:`_TARGETS`), each prefixed ``prefix``."""
  loaded = ctypes.cdll.LoadLibrary(str(library))
  missing = [symbol for symbol in _TARGETS.values() if not hasattr(loaded, symbol)]
  if missing:
    raise RuntimeError(f"the build exports no {', '.join(missing)}")
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(prefix + target, jax.ffi.pycapsule(getattr(loaded, symbol)),
                                platform="cpu")


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
    _register(_build(compiler), "")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    warnings.warn(f"seqjax: the native LSTM/GRU kernels were not built, using the XLA path ({e})",
                  RuntimeWarning, stacklevel=3)
    return f"build failed: {e}"
  return None


def status() -> str:
  """``"ready"``, or why the native kernels are not used here."""
  return _load() or "ready"


class _ThreadSetting(threading.local):
  """A setting of each thread's own, ``value`` (``default`` until set), which
  a ``with setting.set(value):`` block changes and then restores."""

  def __init__(self, default):
    self.value = default

  @contextlib.contextmanager
  def set(self, value):
    before, self.value = self.value, value
    try:
      yield
    finally:
      self.value = before


_variants: set[str] = set()  # build_variant's names
_variant = _ThreadSetting(None)  # the variant whose kernels calls traced in a thread use


def build_variant(source: str | os.PathLike, name: str) -> None:
  """Builds ``source``, an edited copy of ``rnn.cc``, as the package's own
  kernels are built, and registers its kernels beside theirs under target
  names prefixed ``name``, for :func:`variant` to run: a change to the
  kernels timed against them in one process (``benchmarks/kernel_variants.py``).
  ``source`` must export the same kernels (:data:`_TARGETS`)."""
  why_not = _load()
  if why_not is not None:
    raise RuntimeError(f"seqjax.native.build_variant: the kernels cannot run here: {why_not}")
  if not name.isidentifier() or name in _variants:
    raise ValueError(f"seqjax.native.build_variant: expected a new name made of letters, digits "
                     f"and _ (built so far: {sorted(_variants)}); got {name!r}")
  source = Path(source)
  if not source.is_file():
    raise FileNotFoundError(f"seqjax.native.build_variant: no source file {str(source)!r}")
  try:
    _register(_build(_compiler(), source), f"{name}_")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    raise RuntimeError(f"seqjax.native.build_variant: {source}: {e}") from None
  _variants.add(name)


@contextlib.contextmanager
def variant(name: str):
  """Functions traced inside this block call the kernels that
  :func:`build_variant` built as ``name`` (in this thread). As with
  :func:`disabled`, the choice is made when a function is traced."""
  if name not in _variants:
    raise ValueError(f"seqjax.native.variant: expected one of build_variant's names "
                     f"{sorted(_variants)}; got {name!r}")
  with _variant.set(name):
    yield


def _quota(cpu_max: str) -> int | None:
  """Whole CPUs allowed by a cgroup v2 ``cpu.max`` line (``"200000 100000"`` -> 2)."""
  quota, _, period = cpu_max.strip().partition(" ")
  if quota == "max" or not period:
    return None
  return max(1, int(quota) // int(period))


@functools.cache
def threads() -> int:
  """How many threads may share a step: ``SEQJAX_NATIVE_THREADS`` if set, else the
  CPUs this process may run on, capped by a container's CPU quota (the threads
  wait for each other every step, so each needs a core of its own)."""
  setting = os.environ.get("SEQJAX_NATIVE_THREADS")
  if setting is not None:
    if not setting.isdigit() or int(setting) < 1:
      raise ValueError(f"SEQJAX_NATIVE_THREADS must be a positive whole number, got {setting!r}")
    return int(setting)
  n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  try:
    n = min(n, _quota(Path("/sys/fs/cgroup/cpu.max").read_text()) or n)
  except (OSError, ValueError):
    pass
  return n


def partitions(hidden: int, cores: int | None = None) -> int | None:
  """How many threads split ``hidden`` units, or ``None`` if the kernel cannot.

  Each partition is a whole number of AVX-512 registers (16 units) and at least
  ``_MIN_UNITS`` units when there is more than one.
  """
  if hidden % _LANES:
    return None
  cores = cores or threads()
  for p in range(min(cores, hidden // _LANES), 0, -1):
    if hidden % (_LANES * p) == 0 and (p == 1 or hidden // p >= _MIN_UNITS):
      return p
  return 1


def padded_units(hidden: int) -> int:
  """The hidden size the kernels run a cell of ``hidden`` units at: the next
  whole number of AVX-512 registers (16 units). :mod:`seqjax.fused` runs a
  cell of any other size on the kernels with the rest as units that stay zero
  (``benchmarks/README.md``: 1.4-2.2x the XLA path at H = 20-300)."""
  return -(-hidden // _LANES) * _LANES


def row_groups(batch: int, weights: int, cores: int | None = None) -> int:
  """How many threads split a loop's or sampler's ``batch`` rows, not its hidden units, or 1.

  Split by units (:func:`partitions`), the threads meet every step to
  exchange h. Split by rows, each thread runs every step of its rows alone
  (a row's step reads only its own carry) and reads all the loop's
  ``weights`` (floats) each step. Rows when each thread gets 5 rows or more
  and the weights stay in the caches (at most 2^21 floats). Both give the
  same values bit for bit. ``benchmarks/row_groups.py`` measures the two (2
  cores, rows against units; benchmarks/README.md has the table).
  """
  groups = min(cores or threads(), batch // _GROUP_ROWS)
  return groups if groups > 1 and weights <= _GROUP_WEIGHTS else 1


def _bf16(matmul_dtype) -> bool | None:
  """Whether the kernels' matmuls round to bfloat16 for this ``matmul_dtype``
  (``None`` or float32: no; bfloat16: yes), or ``None`` if they cannot run it."""
  name = None if matmul_dtype is None else jnp.dtype(matmul_dtype).name
  if name in (None, "float32"):
    return False
  if name == "bfloat16" and "avx512_bf16" in _cpu_flags():
    return True
  return None


def _int8(matmul_dtype) -> bool | None:
  """Whether the samplers' (:func:`lstm_sample`, :func:`gru_sample`) matmuls
  are int8 for this ``matmul_dtype`` (int8: yes; others: no), or ``None`` if
  the CPU cannot run them (no AVX512_VNNI): as :func:`_bf16` for bfloat16."""
  if matmul_dtype is None or jnp.dtype(matmul_dtype) != jnp.int8:
    return False
  return True if "avx512_vnni" in _cpu_flags() else None


def _time_and_batch(xs, batch_major: bool) -> tuple[int, int]:
  """``(T, B)`` of ``xs``, time-major ``[T, B, ...]`` or ``batch_major`` ``[B, T, ...]``."""
  return tuple(xs.shape[:2][::-1]) if batch_major else tuple(xs.shape[:2])


def usable(params, xs, carry, matmul_dtype, batch_major=False) -> bool:
  """Whether the kernels can run this call (forward or reverse loop).

  That is: float32 parameters, inputs and ``carry`` (a tuple of arrays, [B, H] first),
  ``matmul_dtype`` ``None``, float32, or bfloat16 on a CPU with AVX512_BF16, a
  CPU backend, a hidden size it splits, a call long enough to repay packing the
  weights (at least ``_MIN_STEPS``, 4, steps, and
  T B >= weights / 2^15), the kernels built, and not inside :func:`disabled`.
  ``xs`` is time-major ``[T, B, D]``, or ``[B, T, D]`` if ``batch_major``.
  """
  h0 = carry[0]
  if xs.ndim != 3 or h0.ndim != 2:
    return False
  return _runs((*params.values(), xs, *carry), matmul_dtype, *_time_and_batch(xs, batch_major),
               sum(a.size for a in params.values()), h0.shape[-1])


def sample_usable(table, layers, head, carry, noise, matmul_dtype) -> bool:
  """Whether :func:`lstm_sample` or :func:`gru_sample` can run this call, and
  repays packing its weights (``carry``: either's, a list of each layer's
  carry).

  As :func:`usable`, for sampling ``T`` tokens of ``B`` rows (``noise [T, B,
  V]``): float32 arrays, a CPU backend, a hidden size the kernels split, the
  kernels built, and ``T`` at least 4 with ``T B`` >= (the weights) / 2^15;
  ``matmul_dtype`` int8 needs a CPU with AVX512_VNNI.
  """
  if noise.ndim != 3:
    return False
  int8 = _int8(matmul_dtype)
  if int8 is None:
    return False
  if int8:
    matmul_dtype = None  # the rest of the rule as for float32
  arrays = (table, *head, noise, *(a for p in layers for a in p.values()),
            *jax.tree.leaves(carry))
  weights = table.size + head[0].size + sum(p["w_h"].size + p["w_x"].size for p in layers[1:])
  weights += layers[0]["w_h"].size
  return _runs(arrays, matmul_dtype, *noise.shape[:2], weights, layers[0]["w_h"].shape[0])


def _runs(arrays, matmul_dtype, steps, rows, weights, hidden) -> bool:
  """:func:`usable`'s and :func:`sample_usable`'s shared rule: ``arrays`` all
  float32, ``matmul_dtype`` one the kernels run, a CPU backend, ``steps`` x
  ``rows`` enough to repay packing ``weights`` floats, ``hidden`` units the
  kernels split, the kernels built, and not inside :func:`disabled`."""
  if _disabled.value:
    return False
  if _bf16(matmul_dtype) is None or any(jnp.result_type(a) != jnp.float32 for a in arrays):
    return False
  if jax.default_backend() != "cpu":
    return False
  if steps < _MIN_STEPS or steps * rows * _WEIGHTS_PER_ROW_STEP < weights:
    return False
  return partitions(hidden) is not None and _load() is None


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt() parameters


def reuse_freed_memory() -> bool:
  """Keeps the memory this process frees for its own reuse (glibc's malloc).

  By default glibc gives large freed blocks back to the operating system:
  blocks above a threshold (128 KB, rising with use to at most 32 MB) are
  mapped and unmapped one by one, and free space at the heap's top is
  trimmed. XLA:CPU allocates a call's buffers afresh on every call, so each
  call then faults its pages in again, and zeroes them: one LSTM training
  step at B = 32, T = 128, D = H = 256 took 16-22k page faults (68-90 MB),
  35-48 % of the step (benchmarks/README.md). After this call freed memory
  stays in the heap and the next call reuses it: the process keeps its peak
  memory instead of returning it.

  It also sends every thread's allocations to the one heap. glibc otherwise
  gives each new thread that allocates a heap of its own, at most 64 MB, and
  maps a larger block there afresh on every call whatever the settings
  above: XLA's threads allocate a call's temporaries as one block, 104 MB
  for an LSTM training step at B = 16, T = 1024, D = H = 128, which then
  took 41k page faults a step (130 against 69-82 ms without them). A thread
  keeps the heap it first took, so call this before the process's first
  JAX computation (which starts XLA's threads), and before other libraries
  start threads of their own. ``seqjax train`` and the benchmark scripts do;
  call it first in a long CPU training job.

  Returns:
    True if applied; False where the C library is not glibc (nothing changes).
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  heaps = _heaps(libc)
  if heaps > 1:
    warnings.warn(f"seqjax.native.reuse_freed_memory() was called after threads took {heaps - 1} "
                  "heaps of their own (glibc's arenas), which they keep: call it before the "
                  "first JAX computation, or blocks above 64 MB stay faulted in on every call",
                  RuntimeWarning, stacklevel=2)
  return (libc.mallopt(_M_ARENA_MAX, 1) == 1  # every new thread on the one heap
          and libc.mallopt(_M_MMAP_MAX, 0) == 1  # every block from it, none mapped alone
          and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)  # and it is never trimmed


def _heaps(libc) -> int:
  """How many heaps (arenas) glibc's malloc has in this process: 1, the main
  one, until threads that allocate take their own (``malloc_info``'s count)."""
  libc.fopen.restype = ctypes.c_void_p
  libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
  libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
  libc.fclose.argtypes = [ctypes.c_void_p]
  with tempfile.NamedTemporaryFile("r", suffix=".xml") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    if not stream:
      return 1
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    return max(1, report.read().count("<heap nr="))


_disabled = _ThreadSetting(False)


@contextlib.contextmanager
def disabled():
  """Functions traced inside this block take the XLA path (in this thread).

  The choice is made when a function is traced: a jitted function first
  called (or lowered) inside the block keeps the XLA path afterwards, and one
  traced before it keeps the kernels. For comparing the two paths in one
  process::

      with native.disabled():
        xla = jax.jit(lambda p, x: seqjax.scan(cell, p, x)).lower(params, xs).compile()
  """
  with _disabled.set(True):
    yield


def _flags(valid, resets):
  """The [T, B] masks as uint8, an empty array standing for ``None``."""
  return [jnp.zeros((0,), jnp.uint8) if m is None else jnp.asarray(m).astype(jnp.uint8)
          for m in (valid, resets)]


def _call(target, shapes, parts, matmul_dtype, *args, **attributes):
  """Kernel ``target`` on ``args``: outputs of these ``shapes`` (float32, or a
  ``jax.ShapeDtypeStruct``), the work split in ``parts`` partitions (the
  recurrences' hidden units: see :func:`partitions`), the matmuls' operands
  rounded to ``matmul_dtype``; ``attributes``: the kernel's own."""
  why_not = _load()
  if why_not is not None:
    raise RuntimeError(f"seqjax.native: the kernels cannot run here: {why_not}")
  bf16 = _bf16(matmul_dtype)
  if bf16 is None:
    raise ValueError(f"seqjax.native: matmul_dtype must be None, float32, or bfloat16 on a CPU "
                     f"with AVX512_BF16; got {matmul_dtype!r}")
  out = [s if isinstance(s, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(s, jnp.float32)
         for s in shapes]
  target = f"{_variant.value}_{target}" if _variant.value else target
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      *args, partitions=np.int64(parts), bf16=bf16, **attributes)


def _loop(batch, weights, batch_major):
  """A recurrence loop's own attributes: ``batch_major``, and its
  :func:`row_groups` for ``batch`` rows and ``weights`` floats of weights."""
  return dict(batch_major=batch_major, row_groups=np.int64(row_groups(batch, weights)))


def _steps(time, batch, width, batch_major):
  """The shape of a sequence of ``width`` features: ``[T, B, width]``, or
  ``[B, T, width]`` if ``batch_major``."""
  return (batch, time, width) if batch_major else (time, batch, width)


def lstm_forward(params, xs, h0, c0, valid=None, resets=None, save=False, matmul_dtype=None,
                 batch_major=False):
  """``(h_T, c_T, ys)``: :func:`seqjax.fused.lstm_scan` without gradients, on the kernel.

  Same arguments and semantics (time-major ``xs [T, B, D]``, ``h0, c0 [B, H]``,
  ``valid``/``resets`` ``[T, B]`` bool or ``None``, ``matmul_dtype`` ``None`` or
  ``"bfloat16"``). CPU only; check
  :func:`usable` first. With ``save``, returns ``((h_T, c_T, ys), saved)``:
  ``saved`` is what the backward pass reads, ``(hs, ps, ks, fs)`` as
  ``seqjax.fused``'s own forward saves them (zero factors on held steps).
  ``batch_major`` reads ``xs [B, T, D]`` and writes ``ys [B, T, H]`` and
  ``hs [B, T, H]`` (``valid``/``resets`` stay ``[T, B]``; ``ps``, ``ks`` and
  ``fs``, which only :func:`lstm_reverse` reads, stay time-major).
  """
  hidden = h0.shape[-1]
  time, batch = _time_and_batch(xs, batch_major)
  ys_shape = _steps(time, batch, hidden, batch_major)
  carry = h0.shape
  args = (xs, params["w_x"], params["w_h"], params["b"], h0, c0, *_flags(valid, resets))
  shapes = [ys_shape, carry, carry]
  loop = _loop(batch, (xs.shape[-1] + hidden) * 4 * hidden, batch_major)
  if not save:
    ys, h, c = _call("seqjax_lstm_forward", shapes, partitions(hidden), matmul_dtype, *args,
                     **loop)
    return h, c, ys
  saved = [(hidden, batch_major), (4 * hidden, False), (hidden, False), (hidden, False)]
  ys, h, c, *saved = _call("seqjax_lstm_forward_saving",
                           shapes + [_steps(time, batch, w, bm) for w, bm in saved],
                           partitions(hidden), matmul_dtype, *args, **loop)
  return (h, c, ys), tuple(saved)


def lstm_reverse(w_h, dh_t, dc_t, dys, ps, ks, fs, valid=None, resets=None, matmul_dtype=None,
                 batch_major=False):
  """``((dh_0, dc_0), dz)``: the reverse loop of :func:`seqjax.fused.lstm_scan`'s
  backward pass, on the kernel (``ps``, ``ks``, ``fs``: what its forward saved;
  ``dz [T, B, 4H]``: the gate gradients the weight gradients are built from).
  ``batch_major``: ``dys`` and ``dz`` are ``[B, T, ...]`` (the saves stay
  time-major)."""
  (time, batch), hidden = _time_and_batch(dys, batch_major), dys.shape[-1]
  dz, dh, dc = _call("seqjax_lstm_reverse",
                     [_steps(time, batch, 4 * hidden, batch_major), dh_t.shape, dh_t.shape],
                     partitions(hidden), matmul_dtype, dh_t, dc_t, dys, ps, ks, fs, w_h,
                     *_flags(valid, resets), **_loop(batch, hidden * 4 * hidden, batch_major))
  return (dh, dc), dz


def gru_forward(params, xs, h0, valid=None, resets=None, save=False, matmul_dtype=None,
                batch_major=False):
  """``(h_T, ys)``: :func:`seqjax.fused.gru_scan` without gradients, on the kernel.

  With ``save``, returns ``((h_T, ys), saved)``: ``saved`` is what the backward
  pass reads, ``(hs, px, ph, zs)`` as ``seqjax.fused``'s own forward saves them
  (zero factors on held steps). ``batch_major``: as for :func:`lstm_forward`,
  ``hs``, ``px`` and ``ph`` ``[B, T, ...]`` and ``zs`` time-major.
  """
  hidden = h0.shape[-1]
  time, batch = _time_and_batch(xs, batch_major)
  ys_shape = _steps(time, batch, hidden, batch_major)
  carry = h0.shape
  args = (xs, params["w_x"], params["w_h"], params["b"], _recurrent_bias(params), h0,
          *_flags(valid, resets))
  shapes = [ys_shape, carry]
  loop = _loop(batch, (xs.shape[-1] + hidden) * 3 * hidden, batch_major)
  if not save:
    ys, h = _call("seqjax_gru_forward", shapes, partitions(hidden), matmul_dtype, *args, **loop)
    return h, ys
  saved = [(hidden, batch_major), (3 * hidden, batch_major), (3 * hidden, batch_major),
           (hidden, False)]
  ys, h, *saved = _call("seqjax_gru_forward_saving",
                        shapes + [_steps(time, batch, w, bm) for w, bm in saved],
                        partitions(hidden), matmul_dtype, *args, **loop)
  return (h, ys), tuple(saved)


def gru_reverse(w_h, dh_t, dys, ph, zs, valid=None, resets=None, matmul_dtype=None,
                batch_major=False):
  """``(dh_0, dh_steps)``: the reverse loop of :func:`seqjax.fused.gru_scan`'s
  backward pass, on the kernel (``ph``, ``zs``: what its forward saved;
  ``dh_steps [T, B, H]``: the gradient reaching each step's output).
  ``batch_major``: ``dys``, ``ph`` and ``dh_steps`` are ``[B, T, ...]`` (``zs``
  stays time-major)."""
  (time, batch), hidden = _time_and_batch(dys, batch_major), dys.shape[-1]
  steps, dh = _call("seqjax_gru_reverse", [_steps(time, batch, hidden, batch_major), dh_t.shape],
                    partitions(hidden), matmul_dtype, dh_t, dys, ph, zs, w_h,
                    *_flags(valid, resets), **_loop(batch, hidden * 3 * hidden, batch_major))
  return dh, steps


def outer_sum(a, b, matmul_dtype=None, tiled=None, column_sums=False):
  """``sum_t a_t^T b_t`` over every leading index, ``[..., M] x [..., N] -> [M, N]``
  float32, on the kernel: :func:`seqjax.fused`'s weight gradients (``N`` a
  multiple of 16), the operands rounded to ``matmul_dtype`` (``None`` or
  ``"bfloat16"``), the products summed in float32. ``a`` may be a tuple of
  arrays, each with ``b``'s leading shape: then a tuple of their products,
  in one call, one pass over ``b`` (an LSTM's ``xs`` and ``hs`` share its
  ``dz``). With ``tiled`` (``[..., H]``, ``H`` a multiple of 16
  dividing ``N``), ``b`` stands for ``b * tile(tiled, N // H)``, formed as
  the kernel reads it (a GRU's gate gradients from its carry gradients).
  With ``column_sums``, returns ``(products, sums)``: ``sums [N]`` is that
  ``b`` summed over every leading index in float32 (the bias gradient),
  taken as the kernel reads ``b``."""
  many = isinstance(a, (tuple, list))
  b = b.reshape(-1, b.shape[-1])
  a = [x.reshape(-1, x.shape[-1]) for x in (a if many else [a])]
  tiled = (jnp.zeros((0,), jnp.float32) if tiled is None
           else tiled.reshape(-1, tiled.shape[-1]))
  sums, *z = _call("seqjax_outer_sum", [(b.shape[1],)] + [(x.shape[1], b.shape[1]) for x in a],
                   threads(), matmul_dtype, b, tiled, *a)
  products = tuple(z) if many else z[0]
  return (products, sums) if column_sums else products


def _recurrent_bias(params):
  """A reset-after GRU's recurrent bias as the kernels take it, ``[3H]``:
  zeros for r and z (folded into ``b``), then ``b_hn``."""
  b_hn = params["b_hn"]
  return jnp.concatenate([jnp.zeros((2 * b_hn.shape[0],), b_hn.dtype), b_hn])


def lstm_sample(table, layers, head, carry, logits, noise, temperature=1.0, matmul_dtype=None):
  """``(carry, logits, tokens)``: ``T`` tokens drawn from a stacked LSTM language
  model, each fed back, in one kernel call (check :func:`sample_usable` first).

  The model: a token's layer-0 input projection is its row of ``table [V,
  4H]`` (the embedding times layer 0's ``w_x``, plus its ``b``: ``cell.project``
  of the embedding); ``layers`` are the L LSTM cells' params (layer 0's
  ``w_x`` and ``b`` are not read); ``head = (w [H, V], b [V])`` reads the last
  layer's h out to the logits, in float32. ``carry`` is the L layers'
  ``(h, c)``, each [B, H]; ``logits [B, V]`` are those the first token is drawn
  from. Token t of row r is the first index of the largest ``logits / temperature
  + noise[t, r]`` (``temperature`` 0: ``logits + noise``): with
  :func:`seqjax.decoding.gumbel_noise` as ``noise``, the draws
  :func:`seqjax.decoding.generate` makes. Returns the carry and logits after
  the last token, and ``tokens [B, T]`` int32.

  ``matmul_dtype``: the cells' (``None``, float32 or bfloat16), or ``"int8"``:
  the LSTM layers' matmuls in int8 (AVX512_VNNI), each row of h and each
  weight column scaled to int8, the sums exact (:func:`seqjax.fused.int8_matmul`
  states it in XLA); the table, the gate math and the read-out stay float32.
  """
  args = [a for p, (h, c) in zip(layers, carry) for a in (p["w_x"], p["w_h"], p["b"], h, c)]
  tokens, logits, states = _sample("seqjax_lstm_sample", 4, 2, table, args, head, logits, noise,
                                   temperature, matmul_dtype)
  return [tuple(states[i:i + 2]) for i in range(0, len(states), 2)], logits, tokens


def gru_sample(table, layers, head, carry, logits, noise, temperature=1.0, matmul_dtype=None):
  """``(carry, logits, tokens)``: :func:`lstm_sample` for a stacked reset-after
  GRU language model (``seqjax.cells.GRU``).

  As :func:`lstm_sample`, with ``table [V, 3H]`` (``cell.project`` of the
  embedding), ``layers`` the GRU cells' params (each with ``b_hn``; layer 0's
  ``w_x`` and ``b`` are not read), and ``carry`` the L layers' h, each [B, H].
  Returns the carry as a list of h.
  """
  args = [a for p, h in zip(layers, carry)
          for a in (p["w_x"], p["w_h"], p["b"], _recurrent_bias(p), h)]
  tokens, logits, states = _sample("seqjax_gru_sample", 3, 1, table, args, head, logits, noise,
                                   temperature, matmul_dtype)
  return list(states), logits, tokens


def _sample(target, gates, carries, table, args, head, logits, noise, temperature,
            matmul_dtype):
  """The sampling kernel ``target`` on each layer's ``args`` (five apiece),
  ``carries`` [B, H] results a layer: ``(tokens, logits, states)``."""
  (time, batch, _), hidden = noise.shape, table.shape[-1] // gates
  int8 = _int8(matmul_dtype)
  if int8 is None:
    name = target.removeprefix("seqjax_")
    raise ValueError(f"seqjax.native.{name}: int8 matmuls need a CPU with AVX512_VNNI, "
                     "and this one has none")
  shapes = [jax.ShapeDtypeStruct((batch, time), jnp.int32), logits.shape]
  shapes += [(batch, hidden)] * (carries * (len(args) // 5))
  # What a row group's thread reads every step: each layer's w_h, w_x past
  # layer 0 (the table's row stands for layer 0's), and the read-out.
  weights = sum(a.size for a in args[1::5]) + sum(a.size for a in args[5::5]) + head[0].size
  tokens, logits, *states = _call(
      target, shapes, partitions(hidden), None if int8 else matmul_dtype, table, head[0], head[1],
      logits, noise, *args, temperature=np.float32(temperature), int8=int8,
      row_groups=np.int64(row_groups(batch, weights)))
  return tokens, logits, states


__all__ = ["status", "usable", "disabled", "build_variant", "variant", "threads", "partitions",
           "padded_units", "row_groups", "reuse_freed_memory", "lstm_forward", "lstm_reverse",
           "gru_forward", "gru_reverse", "outer_sum", "sample_usable", "lstm_sample",
           "gru_sample"]
