"""The native LSTM and GRU forward kernels (seqjax.native): float32 inference on CPU.

They must give the XLA path's values (float32 rounding apart) for every option
the scan driver passes (lengths, masks, resets, reverse), at sizes that split
across threads and sizes that do not, and leave gradients to the XLA path.
"""

import concurrent.futures
import contextlib
import functools
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import cells, decoding, fused, native
from tests import reference

CPU_FLAGS = native._cpu_flags()
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or "avx512f" not in CPU_FLAGS,
    reason="the native kernel needs Linux on an x86-64 CPU with AVX-512")


KINDS = ["lstm", "gru"]
CELLS = {"lstm": cells.LSTM, "gru": cells.GRU}
KERNELS = {"lstm": native.lstm_forward, "gru": native.gru_forward}
TARGETS = ("seqjax_lstm_forward", "seqjax_gru_forward")
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in CPU_FLAGS,
                                reason="bfloat16 kernels need a CPU with AVX512_BF16")
needs_vnni = pytest.mark.skipif("avx512_vnni" not in CPU_FLAGS,
                                reason="the int8 sampler needs a CPU with AVX512_VNNI")


def _problem(b, t, d, h, seed=0, kind="lstm"):
  """``(params, xs, *carry)``: float32, biases not zero, a random carry."""
  k = jax.random.split(jax.random.key(seed), 5)
  params = CELLS[kind](h).init(k[0], d, jnp.float32)
  for name, key in zip(("b", "b_hn"), jax.random.split(k[1])):
    if name in params:
      params[name] = jax.random.normal(key, params[name].shape, jnp.float32)
  xs = 2 * jax.random.normal(k[2], (t, b, d), jnp.float32)
  carry = [jax.random.normal(kk, (b, h), jnp.float32) for kk in k[3:3 + (kind == "lstm") + 1]]
  return (params, xs, *carry)


def _xla(*args, kind="lstm"):
  """The XLA forward of the same call: fused.lstm_scan's or gru_scan's."""
  forward, arity = (fused._forward, 6) if kind == "lstm" else (fused._gru_forward, 5)
  args = args + (None,) * (arity - len(args))  # valid, resets absent
  return forward(*args, False, None)[0]


def _scan(kind):
  return fused.lstm_scan if kind == "lstm" else fused.gru_scan


def _lowered(f, *args):
  return jax.jit(f).lower(*args).as_text()


def _xla_path(f, *args):
  """``f`` compiled on the XLA path for ``args``: traced inside
  ``native.disabled()`` from a function of its own (jit keeps a function's
  first trace, which may be the kernels'), and checked to call no kernel."""
  with native.disabled():
    lowered = jax.jit(lambda *a: f(*a)).lower(*args)
  assert "@seqjax_" not in lowered.as_text()
  return lowered.compile()


def _training_problem(kind, matmul_dtype=None):
  """``(params, xs, options, loss)``: a sum of squared outputs through
  ``seqjax.scan`` with resets and lengths, for the training tests."""
  cell = CELLS[kind](64, matmul_dtype=matmul_dtype)
  params = cell.init(jax.random.key(0), 6, jnp.float32)
  xs = jax.random.normal(jax.random.key(1), (4, 18, 6), jnp.float32)
  options = {"resets": np.eye(4, 18, 3, dtype=bool), "lengths": np.array([18, 7, 16, 3])}
  loss = lambda p, x: jnp.sum(seqjax.scan(cell, p, x, **options)[1] ** 2)
  return params, xs, options, loss


def test_the_kernel_builds_here():
  assert native.status() == "ready"


def test_partitions_are_whole_registers_and_not_too_small():
  assert native.partitions(128, cores=2) == 2
  assert native.partitions(48, cores=2) == 1  # 24 units a thread: too few
  assert native.partitions(96, cores=4) == 3  # 32 units, two registers each
  assert native.partitions(1024, cores=16) == 16
  assert native.partitions(16, cores=8) == 1
  assert native.partitions(40, cores=2) is None  # not a whole number of registers


def test_threads_follow_the_setting_and_a_container_quota(monkeypatch):
  assert native._quota("max 100000\n") is None
  assert native._quota("200000 100000\n") == 2
  assert native._quota("150000 100000") == 1 and native._quota("50000 100000") == 1
  for setting, want in (("3", 3), ("1", 1)):
    monkeypatch.setenv("SEQJAX_NATIVE_THREADS", setting)
    native.threads.cache_clear()
    assert native.threads() == want
    assert native.partitions(192) == want
  monkeypatch.setenv("SEQJAX_NATIVE_THREADS", "two")
  native.threads.cache_clear()
  with pytest.raises(ValueError, match="SEQJAX_NATIVE_THREADS must be a positive whole number, "
                                       "got 'two'"):
    native.threads()
  monkeypatch.delenv("SEQJAX_NATIVE_THREADS")
  native.threads.cache_clear()
  assert 1 <= native.threads() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16)])
def test_one_thread_gives_the_same_values_bit_for_bit(monkeypatch, matmul_dtype):
  args = _problem(8, 20, 5, 64)
  run = functools.partial(native.lstm_forward, matmul_dtype=matmul_dtype)
  want = jax.jit(run)(*args)
  monkeypatch.setattr(native, "threads", lambda: 1)
  got = jax.jit(lambda *a: run(*a))(*args)  # traced anew: one partition
  for g, w in zip(got, want):  # each output is summed in the same order either way
    np.testing.assert_array_equal(g, w)


def test_the_workers_go_by_a_name_of_their_own(monkeypatch):
  """The pool's workers are named ``seqjax_pool``, so that a profiler or
  ``top -H`` tells them from XLA's and other libraries' threads."""
  monkeypatch.setattr(native, "threads", lambda: 2)
  jax.block_until_ready(jax.jit(native.lstm_forward)(*_problem(8, 20, 5, 64)))
  names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
  assert "seqjax_pool" in names


def test_row_groups_need_5_rows_a_thread_and_weights_that_stay_in_cache():
  assert native.row_groups(16, 256 * 512, cores=2) == 2  # (c): 8 rows a thread
  assert native.row_groups(64, 2 ** 21, cores=2) == 2  # (b): D = H = 512, the LSTM's 2^21
  assert native.row_groups(64, 2 ** 21 + 1, cores=2) == 1  # too many weights
  assert native.row_groups(10, 1024, cores=2) == 2
  assert native.row_groups(9, 1024, cores=2) == 1  # 4 rows for one of the threads
  assert native.row_groups(40, 1024, cores=4) == 4 and native.row_groups(40, 1024, cores=16) == 8
  assert native.row_groups(64, 1024, cores=1) == 1


@pytest.mark.parametrize("b,h,groups", [
    (17, 64, 2),  # two partitions; groups of 8 and 9 rows (a partial tile)
    (16, 32, 2),  # one partition, which the split by units runs on one thread
    (24, 64, 3),  # more groups than partitions, and than cores here
])
@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("kind", KINDS)
def test_row_groups_give_the_units_split_values_bit_for_bit(monkeypatch, kind, matmul_dtype, b,
                                                             h, groups):
  """Every loop (plain, saving, reverse), time- and batch-major, with held
  and reset steps: split by rows, each output is the same as split by units,
  bit for bit (a row's sums run in the same order either way)."""
  params, xs, *carry = _problem(b, 30, 5, h, kind=kind)
  rng = np.random.default_rng(b)
  valid, resets = rng.random((30, b)) < 0.8, rng.random((30, b)) < 0.1
  dys = jax.random.normal(jax.random.key(5), xs.shape[:2] + (h,), jnp.float32)
  reverse = native.lstm_reverse if kind == "lstm" else native.gru_reverse

  def every_loop(split):
    monkeypatch.setattr(native, "row_groups", lambda batch, weights, cores=None: split)
    out = {}
    for bm in (False, True):
      x, dy = (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(dys, 0, 1)) if bm else (xs, dys)
      run = lambda save: jax.jit(functools.partial(  # traced anew for each split
          KERNELS[kind], save=save, matmul_dtype=matmul_dtype, batch_major=bm))
      lowered = jax.jit(functools.partial(KERNELS[kind], batch_major=bm)).lower(
          params, x, *carry, valid, resets).as_text()
      assert f"row_groups = {split} : i64" in lowered
      out[bm, "forward"] = run(False)(params, x, *carry, valid, resets)
      forward, saved = run(True)(params, x, *carry, valid, resets)
      out[bm, "saving"] = (forward, saved)
      reads = saved[1:] if kind == "lstm" else saved[2:]  # ps, ks, fs or ph, zs
      out[bm, "reverse"] = jax.jit(functools.partial(
          reverse, matmul_dtype=matmul_dtype, batch_major=bm))(
              params["w_h"], *carry, dy, *reads, valid, resets)
    return out

  want, got = every_loop(1), every_loop(groups)
  for key in want:
    for g, w in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]), strict=True):
      np.testing.assert_array_equal(g, w, err_msg=str(key))


def _with_masks(shapes):
  """(shape, masks) cases: each mask alone on the first two shapes, none and both on all."""
  return [(*shape, masks) for i, shape in enumerate(shapes)
          for masks in (("none", "valid", "resets", "both") if i < 2 else ("none", "both"))]


@pytest.mark.parametrize("b,t,d,h,masks", _with_masks([
    (16, 40, 24, 64),  # two threads, two full row tiles
    (13, 9, 5, 96),    # a partial row tile: 7 + 6 rows
    (12, 9, 5, 96),    # 6 + 6 rows, four panels at a time, two at a block's end (GRU)
    (20, 7, 5, 48),    # two row groups (threads) of 10 rows, in tiles of 5
    (1, 7, 1, 32),     # one row, one input feature
    (1, 4, 5, 80),     # one row (eight panels at a time), narrower tiles at a row's end
    (2, 6, 3, 80),     # two rows (four panels at a time)
    (3, 5, 7, 48),     # one partition
    (9, 1, 3, 16),     # one step
    (4, 0, 3, 32),     # no steps
]))
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_equals_the_xla_path(kind, b, t, d, h, masks):
  args = _problem(b, t, d, h, kind=kind)
  rng = np.random.default_rng(b * t + h)
  valid = rng.random((t, b)) < 0.7 if masks in ("valid", "both") else None
  resets = rng.random((t, b)) < 0.2 if masks in ("resets", "both") else None
  got = jax.jit(KERNELS[kind])(*args, valid, resets)
  want = jax.jit(functools.partial(_xla, kind=kind))(*args, valid, resets)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  if valid is not None and t:  # invalid steps emit exact zeros
    assert not np.any(np.asarray(got[-1])[~valid])


# Which of a saving loop's saves follow a batch-major call's layout (what XLA
# reads after the reverse loop); the rest, read only by the reverse kernels,
# stay time-major.
SAVES_BATCH_MAJOR = {"lstm": (True, False, False, False),  # hs; ps, ks, fs
                     "gru": (True, True, True, False)}  # hs, px, ph; zs


@pytest.mark.parametrize("b,t,masks", [(13, 9, "both"), (1, 7, "none"), (4, 0, "none")])
@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_major_kernels_equal_the_time_major_ones(kind, matmul_dtype, b, t, masks):
  """Every loop (plain, saving, reverse) gives the same numbers batch-major,
  bit for bit, each of its batch-major sequences [B, T, ...] in place of
  [T, B, ...]."""
  params, xs, *carry = _problem(b, t, 5, 64, kind=kind)
  rng = np.random.default_rng(b * t)
  valid, resets = ((rng.random((t, b)) < p) if masks == "both" else None for p in (0.7, 0.2))
  swap = lambda a: jnp.swapaxes(a, 0, 1)
  layouts = SAVES_BATCH_MAJOR[kind]

  def same(got, want, batch_major):  # got batch-major where batch_major says
    assert len(got) == len(want) == len(batch_major)
    for g, w, bm in zip(got, want, batch_major):
      np.testing.assert_array_equal(g, swap(w) if bm else w)

  run = lambda bm, save=False: jax.jit(functools.partial(
      KERNELS[kind], save=save, matmul_dtype=matmul_dtype, batch_major=bm))
  outputs = (False,) * len(carry) + (True,)  # the carry, ys
  same(run(True)(params, swap(xs), *carry, valid, resets),
       run(False)(params, xs, *carry, valid, resets), outputs)
  got, got_saved = run(True, True)(params, swap(xs), *carry, valid, resets)
  want, saved = run(False, True)(params, xs, *carry, valid, resets)
  same(got, want, outputs)
  same(got_saved, saved, layouts)

  dys = jax.random.normal(jax.random.key(5), xs.shape[:2] + (64,), jnp.float32)
  reads = saved[1:] if kind == "lstm" else saved[2:]  # ps, ks, fs or ph, zs
  read_layouts = layouts[len(saved) - len(reads):]
  reverse = native.lstm_reverse if kind == "lstm" else native.gru_reverse
  run = lambda bm: jax.jit(functools.partial(reverse, matmul_dtype=matmul_dtype, batch_major=bm))
  got = run(True)(params["w_h"], *carry, swap(dys),
                  *(swap(a) if bm else a for a, bm in zip(reads, read_layouts)), valid, resets)
  want = run(False)(params["w_h"], *carry, dys, *reads, valid, resets)
  # ((dh_0, dc_0), dz) or (dh_0, dh_steps): the gradients' sequence batch-major
  same(jax.tree.leaves(got), jax.tree.leaves(want), (False,) * len(carry) + (True,))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_major_scans_skip_the_transposes_and_keep_values_and_gradients(kind):
  params, xs, *carry = _problem(6, 20, 5, 64, kind=kind)
  scan = _scan(kind)
  run = lambda bm: lambda p, x, *c: scan(p, jnp.swapaxes(x, 0, 1) if bm else x, *c, None, None,
                                         None, bm)
  direct = lambda p, x, *c: scan(p, x, *c, None, None, None, True)
  compiled = jax.jit(direct).lower(params, jnp.swapaxes(xs, 0, 1), *carry).compile().as_text()
  assert f'custom_call_target="seqjax_{kind}_forward"' in compiled
  assert "batch_major = true" in compiled and " transpose(" not in compiled
  # seqjax.scan's default layout, batch-major, goes straight through, and so
  # does its gradient: the saving and the reverse loops read and write
  # batch-major, and the weight gradients' products take the rows as they are.
  cell = CELLS[kind](64)
  default = lambda p, x: seqjax.scan(cell, p, x)[1]
  compiled = jax.jit(default).lower(params, jnp.swapaxes(xs, 0, 1)).compile().as_text()
  assert "batch_major = true" in compiled and " transpose(" not in compiled
  step = jax.grad(lambda p, x: jnp.sum(jnp.sin(default(p, x))), argnums=(0, 1))
  compiled = jax.jit(step).lower(params, jnp.swapaxes(xs, 0, 1)).compile().as_text()
  for target in (f"seqjax_{kind}_forward_saving", f"seqjax_{kind}_reverse"):
    calls = [line for line in compiled.splitlines() if f'custom_call_target="{target}"' in line]
    assert calls and all("batch_major = true" in line for line in calls), target
  assert " transpose(" not in compiled
  as_time_major = lambda out: (*out[:-1], jnp.swapaxes(out[-1], 0, 1))
  loss = lambda bm: lambda p, x, *c: jnp.sum(jnp.sin(run(bm)(p, x, *c)[-1]))
  for path in (contextlib.nullcontext, native.disabled):
    with path():
      want = jax.jit(run(False))(params, xs, *carry)
      got = as_time_major(jax.jit(run(True))(params, xs, *carry))
      want_grads = jax.jit(jax.grad(loss(False), argnums=(0, 1, 2)))(params, xs, *carry)
      grads = jax.jit(jax.grad(loss(True), argnums=(0, 1, 2)))(params, xs, *carry)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # The weight gradients sum the same products with the rows in another
    # order (batch, then time): float32 rounding apart.
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {}, {"lengths": np.array([18, 4, 0, 13])},
    {"reverse": True, "lengths": np.array([2, 18, 5, 17])},
    {"mask": np.arange(72).reshape(4, 18) % 3 != 1},
    {"resets": np.eye(4, 18, 3, dtype=bool) | np.eye(4, 18, 11, dtype=bool),
     "lengths": np.array([18, 7, 16, 3]), "reverse": True},
])
@pytest.mark.parametrize("h", [64, 20])  # 20: on units padded to 32
@pytest.mark.parametrize("kind", KINDS)
def test_scan_uses_the_kernel_in_float32_and_matches_the_reference(kind, options, h):
  cell = CELLS[kind](h)
  params = cell.init(jax.random.key(0), 6, jnp.float32)
  xs = jax.random.normal(jax.random.key(1), (4, 18, 6), jnp.float32)
  carry = jax.tree.map(lambda z: jax.random.normal(jax.random.key(2), z.shape, z.dtype),
                       cell.initial_carry((4,), jnp.float32))
  run = lambda p, x, c: seqjax.scan(cell, p, x, c, **options)
  assert f"seqjax_{kind}_forward" in _lowered(run, params, xs, carry)
  final, ys = jax.jit(run)(params, xs, carry)
  ref_carry = {"h": carry.h, "c": carry.c} if kind == "lstm" else {"h": carry}
  ref_final, ref_ys = reference.run(cell, params, xs, ref_carry, **options)
  np.testing.assert_allclose(ys, ref_ys, atol=2e-5)
  finals = {"h": final.h, "c": final.c} if kind == "lstm" else {"h": final}
  for k in ref_final:
    np.testing.assert_allclose(finals[k], ref_final[k], atol=2e-5, err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_agree_with_the_inference_value_and_float64(kind):
  params, *rest = _problem(8, 20, 5, 64, kind=kind)
  scan = _scan(kind)
  loss = lambda p, *rest: jnp.sum(scan(p, *rest, None, None, None)[-1] ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params, *rest)
  lowered = _lowered(jax.grad(loss), params, *rest)
  # Both loops of the gradient run on kernels.
  assert f"seqjax_{kind}_forward_saving" in lowered and f"seqjax_{kind}_reverse" in lowered
  assert "while" not in lowered
  assert f"seqjax_{kind}_forward" in _lowered(loss, params, *rest)
  np.testing.assert_allclose(jax.jit(loss)(params, *rest), value, rtol=1e-5)
  as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
  grads64 = jax.grad(loss)(as64(params), *as64(rest))
  for k in grads:
    np.testing.assert_allclose(grads[k], grads64[k], rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_other_dtypes_keep_the_xla_path(kind, monkeypatch):
  params, xs, *carry = _problem(4, 16, 5, 32, kind=kind)
  assert native.usable(params, xs, carry, None)
  assert native.usable(params, xs, carry, "float32")
  assert native.usable(params, xs, carry, jnp.bfloat16) == ("avx512_bf16" in CPU_FLAGS)
  assert not native.usable(params, xs, carry, "float16")
  as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
  assert not native.usable(as64(params), as64(xs), as64(carry), None)
  params, xs, *carry = _problem(4, 16, 5, 20, kind=kind)  # H = 20: no whole registers
  assert not native.usable(params, xs, carry, None)  # (the scans pad it: below)
  # Without AVX512_BF16, bfloat16 matmuls take the XLA path; asked of the
  # kernels directly, they say so.
  params, xs, *carry = _problem(4, 16, 5, 32, kind=kind)
  monkeypatch.setattr(native, "_cpu_flags", lambda: CPU_FLAGS - {"avx512_bf16"})
  assert not native.usable(params, xs, carry, "bfloat16")
  with pytest.raises(ValueError, match="matmul_dtype must be None, float32, or bfloat16 on a CPU "
                                       "with AVX512_BF16; got 'bfloat16'"):
    KERNELS[kind](params, xs, *carry, matmul_dtype="bfloat16")


def test_padded_units_are_whole_registers():
  assert [native.padded_units(h) for h in (1, 16, 20, 32, 33, 100, 512)] == [
      16, 16, 32, 32, 48, 112, 512]


@pytest.mark.parametrize("h,matmul_dtype,batch_major", [
    (20, None, True), (40, None, False), (100, None, True),
    pytest.param(20, "bfloat16", True, marks=needs_bf16)])
@pytest.mark.parametrize("kind", KINDS)
def test_hidden_sizes_off_whole_registers_run_padded_on_the_kernels(kind, h, matmul_dtype,
                                                                    batch_major):
  """H not a multiple of 16: the scans run the kernels on zero units added
  to each gate block (native.padded_units), and give the XLA path's outputs,
  final carry and gradients (parameters, inputs and initial carry), with
  held and reset steps; in bfloat16, the XLA bfloat16 loops'."""
  params, xs, *carry = _problem(6, 11, 7, h, kind=kind)
  assert not native.usable(params, xs, carry, matmul_dtype)
  xs = jnp.swapaxes(xs, 0, 1) if batch_major else xs
  rng = np.random.default_rng(h)
  valid, resets = rng.random((11, 6)) < 0.7, rng.random((11, 6)) < 0.2

  def outputs_and_gradients(dtype):
    run = lambda p, x, *c: _scan(kind)(p, x, *c, valid, resets, dtype, batch_major)
    loss = lambda p, x, *c: sum(jnp.sum(jnp.sin(a)) for a in run(p, x, *c))
    return run, jax.grad(loss, argnums=(0, 1, 2))

  run, gradient = outputs_and_gradients(matmul_dtype)
  lowered = _lowered(gradient, params, xs, *carry)
  assert f"seqjax_{kind}_forward_saving" in lowered and f"seqjax_{kind}_reverse" in lowered
  assert f"seqjax_{kind}_forward" in _lowered(run, params, xs, *carry)
  both = lambda run, gradient: jax.jit(lambda *a: (run(*a), gradient(*a)))(params, xs, *carry)
  got = both(run, gradient)
  with native.disabled():
    want = both(run, gradient)
    f32 = both(*outputs_and_gradients(None))
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(want)]
  for name, g, w, f in zip(names, *map(jax.tree.leaves, (got, want, f32))):
    if matmul_dtype is None:
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)
    else:  # the XLA bfloat16 loops', float32 the yardstick
      _close_to_xla_bf16(g, w, f, name)
  # The held steps emit exact zeros, in the units the caller sees.
  ys = np.asarray(got[0][-1])
  held = ~valid.T if batch_major else ~valid
  assert ys.shape[-1] == h and not np.any(ys[held])


def _close_to_xla_bf16(got, want, f32, name):
  """The bfloat16 kernels round the same operands as the XLA path and sum in
  float32 in another order, so a value rounds to the other bfloat16 neighbour
  now and then: far closer to the XLA bfloat16 values than either is to float32."""
  got, want, f32 = (np.asarray(a, np.float64) for a in (got, want, f32))
  assert got.shape == want.shape, name
  np.testing.assert_allclose(got, want, atol=3e-3, err_msg=name)
  if want.size and np.abs(want - f32).max() > 1e-5:
    assert np.abs(got - want).mean() < 0.1 * np.abs(want - f32).mean(), name


@needs_bf16
# Beyond the first shape, the slow run (the default suite's time budget).
@pytest.mark.parametrize("b,t,d,h", [(16, 40, 24, 64)] + [
    pytest.param(*shape, marks=pytest.mark.slow)
    for shape in [(13, 9, 5, 96), (1, 4, 5, 80), (4, 0, 3, 32)]])
@pytest.mark.parametrize("masks", ["none", "both"])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_kernels_match_the_xla_bfloat16_loops(kind, b, t, d, h, masks):
  """Forward (plain and saving) and reverse loops, odd D included (a zero pads its last pair)."""
  args = _problem(b, t, d, h, kind=kind)
  rng = np.random.default_rng(b + t + h)
  valid = rng.random((t, b)) < 0.7 if masks == "both" else None
  resets = rng.random((t, b)) < 0.2 if masks == "both" else None
  forward = fused._forward if kind == "lstm" else fused._gru_forward
  xla = {dtype: jax.jit(lambda *a, dtype=dtype: forward(*a, True, dtype))(*args, valid, resets)
         for dtype in ("bfloat16", None)}
  plain = jax.jit(functools.partial(KERNELS[kind], matmul_dtype="bfloat16"))(*args, valid, resets)
  got, got_saved = jax.jit(functools.partial(KERNELS[kind], save=True, matmul_dtype="bfloat16"))(
      *args, valid, resets)
  (want, want_saved), (f32, f32_saved) = xla["bfloat16"], xla[None]
  live = np.ones((t, b), bool) if valid is None else valid
  for i, (g, p, w, f) in enumerate(zip(got, plain, want, f32)):
    np.testing.assert_array_equal(g, p)  # saving changes nothing else
    _close_to_xla_bf16(g, w, f, f"output {i}")
  for i, (g, w, f) in enumerate(zip(got_saved, want_saved, f32_saved)):
    hold = lambda a: np.where(live[..., None] | (i == 0), a, 0)  # held steps save zeros
    _close_to_xla_bf16(g, hold(w), hold(f), f"saved {i}")

  # The reverse loop, from the XLA forward's saves (both get the same inputs).
  k = jax.random.split(jax.random.key(7), 3)
  d_carry = [jax.random.normal(kk, (b, h), jnp.float32) for kk in k[:len(args) - 2]]
  dys = jax.random.normal(k[2], (t, b, h), jnp.float32)
  if kind == "lstm":
    rev_args = (args[0]["w_h"], *d_carry, dys, *want_saved[1:], valid, resets)
    kernel, reverse = native.lstm_reverse, fused._lstm_reverse
  else:
    rev_args = (args[0]["w_h"], *d_carry, dys, *want_saved[2:], valid, resets)
    kernel, reverse = native.gru_reverse, fused._gru_reverse
  got = jax.tree.leaves(jax.jit(functools.partial(kernel, matmul_dtype="bfloat16"))(*rev_args))
  want = jax.tree.leaves(jax.jit(lambda *a: reverse(*a, "bfloat16"))(*rev_args))
  f32 = jax.tree.leaves(jax.jit(lambda *a: reverse(*a, None))(*rev_args))
  for i, (g, w, f) in enumerate(zip(got, want, f32)):
    _close_to_xla_bf16(g, w, f, f"reverse {i}")


@needs_bf16
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_matmul_cells_train_on_the_kernels_like_the_xla_path(kind):
  params, xs, _, loss = _training_problem(kind, "bfloat16")
  lowered = _lowered(jax.grad(loss), params, xs)
  assert f"seqjax_{kind}_forward_saving" in lowered and f"seqjax_{kind}_reverse" in lowered
  # The gradients of w_x and w_h: the LSTM's in one call (both take dz)
  assert lowered.count("seqjax_outer_sum") == (1 if kind == "lstm" else 2)
  assert "bf16 = true" in lowered
  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1))
  got = jax.jit(value_and_grads)(params, xs)
  want = _xla_path(value_and_grads, params, xs)(params, xs)
  f32_loss = _training_problem(kind)[-1]  # the same problem, float32 matmuls
  f32 = jax.value_and_grad(f32_loss, argnums=(0, 1))(params, xs)
  for g, w, f in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(f32)):
    scale = np.abs(np.asarray(f)).max()
    _close_to_xla_bf16(np.asarray(g) / scale, np.asarray(w) / scale, np.asarray(f) / scale,
                       "value and gradients")


@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("r,m,n", [(512, 24, 64), (37, 5, 48), (1, 3, 16), (0, 4, 32),
                                   (300, 1, 2048), (1100, 13, 176), (1025, 7, 32)])
def test_the_outer_sum_kernel_equals_xla(r, m, n, matmul_dtype):
  """a^T b over the rows, as the weight gradients take it: odd row counts (a
  zero pads the last bfloat16 pair), fewer column panels than threads, no
  rows; rows in three blocks (the kernel sums 512 at a time; the last of
  1025 one row, one padded pair), a's rows and a partition's panels ending
  in narrower tiles."""
  k1, k2 = jax.random.split(jax.random.key(r + m + n))
  a = jax.random.normal(k1, (r, m), jnp.float32)
  b = jax.random.normal(k2, (r, n), jnp.float32)
  got = jax.jit(functools.partial(native.outer_sum, matmul_dtype=matmul_dtype))(a, b)
  want, want_sums = jax.jit(lambda a, b: fused._outer_sum(a, b, matmul_dtype, jnp.float32))(a, b)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  # The same rounded operands, summed in another order.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(max(r, 1)))
  # b's column sums (the bias gradient) in float32, whatever matmul_dtype
  _, sums = jax.jit(lambda a, b: native.outer_sum(a, b, matmul_dtype, column_sums=True))(a, b)
  assert sums.shape == (n,) and sums.dtype == jnp.float32
  np.testing.assert_allclose(sums, np.asarray(b, np.float64).sum(0), rtol=1e-5,
                             atol=1e-5 * np.sqrt(max(r, 1)))
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5 * np.sqrt(max(r, 1)))
  if matmul_dtype and r:  # and not float32's products
    f32 = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
    assert np.abs(np.asarray(got) - f32).max() > 1e-4
    # the bias gradient does not depend on the matmuls' precision
    _, f32_sums = jax.jit(lambda a, b: native.outer_sum(a, b, None, column_sums=True))(a, b)
    np.testing.assert_array_equal(sums, f32_sums)


@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("r", [700, 0])
def test_the_outer_sum_kernel_takes_several_a_against_one_b(r, matmul_dtype):
  """One call for every a sharing b (an LSTM's xs and hs share dz): each
  product as its own call gives it, bit for bit, whatever the a's widths."""
  ks = jax.random.split(jax.random.key(r), 4)
  b = jax.random.normal(ks[0], (r, 96), jnp.float32)
  a = tuple(jax.random.normal(k, (r, m), jnp.float32) for k, m in zip(ks[1:], (20, 7, 64)))
  got = jax.jit(functools.partial(native.outer_sum, matmul_dtype=matmul_dtype))(a, b)
  assert isinstance(got, tuple) and [g.shape for g in got] == [(20, 96), (7, 96), (64, 96)]
  one = jax.jit(functools.partial(native.outer_sum, matmul_dtype=matmul_dtype))
  for g, x in zip(got, a):
    np.testing.assert_array_equal(g, one(x, b))
    want = np.asarray(x, np.float64).T @ np.asarray(b, np.float64)
    np.testing.assert_allclose(g, want, rtol=1e-2 if matmul_dtype else 1e-5,
                               atol=(0.5 if matmul_dtype else 1e-4) * np.sqrt(max(r, 1)) / 10)


@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("r,h,gates", [(700, 32, 3), (37, 16, 4), (0, 16, 3)])
def test_the_outer_sum_kernel_forms_b_times_tiled_as_it_reads_it(r, h, gates, matmul_dtype):
  """With ``tiled`` (a GRU's carry gradients), the product of ``b * tile(tiled)``
  (its gate gradients), formed by the kernel: bit for bit the product of the
  array written out, over several a's."""
  ks = jax.random.split(jax.random.key(r + h), 4)
  b = jax.random.normal(ks[0], (r, gates * h), jnp.float32)
  tiled = jax.random.normal(ks[1], (r, h), jnp.float32)
  a = (jax.random.normal(ks[2], (r, 9), jnp.float32), jax.random.normal(ks[3], (r, 24), jnp.float32))
  run = jax.jit(lambda a, b, t: native.outer_sum(a, b, matmul_dtype, t, column_sums=True))
  got, got_sums = run(a, b, tiled)
  formed = b * jnp.tile(tiled, (1, gates))
  written, written_sums = run(a, formed, None)
  xla, xla_sums = jax.jit(
      lambda a, b, t: fused._outer_sum(a, b, matmul_dtype, jnp.float32, tiled=t))(a, b, tiled)
  tolerance = dict(rtol=1e-5, atol=1e-5 * np.sqrt(max(r, 1)))
  for g, w, x in zip(got, written, xla):
    np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(g, x, **tolerance)
  np.testing.assert_array_equal(got_sums, written_sums)
  np.testing.assert_allclose(got_sums, np.asarray(formed, np.float64).sum(0), **tolerance)
  np.testing.assert_allclose(got_sums, xla_sums, **tolerance)


def test_the_outer_sum_kernel_refuses_shapes_that_do_not_agree():
  a, b = jnp.ones((8, 5), jnp.float32), jnp.ones((8, 48), jnp.float32)
  expected = r"expected b \[R,N\] with N a multiple of 16, tiled empty or \[R,H\]"
  for a_, b_, tiled in [(a[:7], b, None),  # a and b with different row counts
                        (a, b[:, :40], None),  # N not a multiple of 16
                        (a, b, jnp.ones((8, 32), jnp.float32)),  # H does not divide N
                        (a, b, jnp.ones((7, 16), jnp.float32))]:  # tiled's rows not b's
    with pytest.raises(Exception, match=expected):
      jax.block_until_ready(native.outer_sum(a_, b_, tiled=tiled))


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_weights_runs_each_member(kind):
  members = [_problem(5, 6, 4, 32, seed=s, kind=kind) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
  got = jax.jit(jax.vmap(lambda *a: _scan(kind)(*a, None, None, None)))(*stacked)
  for m, member in enumerate(members):
    want = _xla(*member, kind=kind)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g[m], w, rtol=2e-5, atol=2e-6)


def test_the_kernels_refuse_weights_and_partitions_that_do_not_fit(monkeypatch):
  """The kernels check what they are handed: a hidden size the partition count
  does not split into whole registers, or weights of the wrong shape, give
  one line naming what was expected, not a crash."""
  params, xs, h0, c0 = _problem(2, 4, 3, 64)
  monkeypatch.setattr(native, "partitions", lambda hidden: 3)  # 64 units: not in 3
  with pytest.raises(Exception, match="H does not split in partitions"):
    jax.block_until_ready(native.lstm_forward(params, xs, h0, c0))
  monkeypatch.undo()
  bad = dict(params, w_h=params["w_h"][:, :-16])  # [H, 4H - 16]
  with pytest.raises(Exception, match="weights do not match D and H"):
    jax.block_until_ready(native.lstm_forward(bad, xs, h0, c0))
  expected = r"expected dys \[T,B,H\] \(\[B,T,H\] batch-major\), w_h \[H,4H\]"
  with pytest.raises(Exception, match=expected):
    native.lstm_reverse(params["w_h"][None], h0, c0, xs[..., :1].repeat(64, -1),
                        *(jnp.zeros((4, 2, n), jnp.float32) for n in (256, 64, 64)))


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_calls_from_two_threads(kind):
  """A second call while the thread pool is busy runs on its own thread, unsplit."""
  problems = [_problem(16, 300, 32, 128, seed=s, kind=kind) for s in range(4)]
  f = jax.jit(KERNELS[kind])
  want = [f(*p) for p in problems]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    got = list(pool.map(lambda p: jax.block_until_ready(f(*p)), problems))
  for g, w in zip(got, want):
    for a, b in zip(g, w):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _fresh_process(env_extra, tmp_path):
  code = textwrap.dedent("""
      import warnings
      import jax, jax.numpy as jnp, numpy as np
      from seqjax import fused, native
      from tests.test_native import _problem, _xla
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = native.status()
      args = _problem(4, 5, 3, 32, kind="gru")
      text = jax.jit(lambda *a: fused.gru_scan(*a, None, None, None)).lower(*args).as_text()
      got = jax.jit(lambda *a: fused.gru_scan(*a, None, None, None))(*args)
      np.testing.assert_allclose(got[1], _xla(*args, kind="gru")[1], rtol=1e-6)
      print("STATUS", status)
      print("CUSTOM", "seqjax_gru_forward" in text)
      print("WARNINGS", [str(w.message) for w in caught])
      try:  # called directly, the kernel says why it cannot run
        native.gru_forward(*args)
      except RuntimeError as e:
        print("DIRECT", e)
  """)
  env = dict(os.environ, SEQJAX_CACHE_DIR=str(tmp_path), **env_extra)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  return run.stdout


@pytest.mark.slow  # ~4 s each, a fresh process: the slow run (the default suite's budget)
def test_disabled_by_environment_falls_back(tmp_path):
  out = _fresh_process({"SEQJAX_NATIVE": "0"}, tmp_path)
  assert "STATUS disabled by SEQJAX_NATIVE=0" in out and "CUSTOM False" in out
  assert "DIRECT seqjax.native: the kernels cannot run here: disabled by SEQJAX_NATIVE=0" in out
  assert not list(tmp_path.iterdir())  # nothing built


@pytest.mark.slow
def test_a_failed_build_warns_once_and_falls_back(tmp_path):
  out = _fresh_process({"CXX": "/bin/false"}, tmp_path)
  assert "STATUS build failed: /bin/false failed on rnn.cc" in out, out
  assert "CUSTOM False" in out
  assert "the native LSTM/GRU kernels were not built, using the XLA path" in out


@pytest.mark.parametrize("masks", ["none", "both"])
@pytest.mark.parametrize("b,t,d,h", [(16, 40, 24, 64), (13, 9, 5, 96), (4, 0, 3, 32)])
@pytest.mark.parametrize("kind", KINDS)
def test_the_saving_kernel_saves_what_the_xla_forward_saves(kind, b, t, d, h, masks):
  args = _problem(b, t, d, h, kind=kind)
  rng = np.random.default_rng(t + h)
  valid = rng.random((t, b)) < 0.7 if masks == "both" else None
  resets = rng.random((t, b)) < 0.2 if masks == "both" else None
  got, got_saved = jax.jit(functools.partial(KERNELS[kind], save=True))(*args, valid, resets)
  forward = fused._forward if kind == "lstm" else fused._gru_forward
  want, want_saved = jax.jit(lambda *a: forward(*a, True, None))(*args, valid, resets)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  live = np.ones((t, b), bool) if valid is None else valid
  assert len(got_saved) == len(want_saved) == 4
  for i, (g, w) in enumerate(zip(got_saved, want_saved)):
    assert g.shape == w.shape, i
    # Steps that hold the carry save zero factors (their gradients are zero);
    # the first saved array is the step's input h, saved on every step.
    w = np.where(live[..., None] | (i == 0), w, 0)
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=str(i))


@pytest.mark.parametrize("kind", KINDS)
def test_training_takes_the_kernels_and_matches_the_reference(kind):
  params, xs, options, loss = _training_problem(kind)
  cell = CELLS[kind](64)
  lowered = _lowered(jax.grad(loss), params, xs)
  assert f"seqjax_{kind}_forward_saving" in lowered and f"seqjax_{kind}_reverse" in lowered
  # The weight gradients on the kernel: the LSTM's in one call (both take dz)
  assert lowered.count("seqjax_outer_sum") == (1 if kind == "lstm" else 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)
  as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
  loss64 = lambda p, x: jnp.sum(seqjax.scan(cell, p, x, unroll=2, **options)[1] ** 2)
  want = jax.grad(loss64, argnums=(0, 1))(as64(params), as64(xs))
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_spreads_as_on_the_xla_path(kind):
  """A NaN in one row's input makes that row's outputs NaN from its step to
  its length, and the gradients NaN, as on the XLA path (the kernels' gate
  math once clamped a NaN pre-activation to a finite one, so a diverged run
  went on with finite outputs)."""
  params, xs, options, loss = _training_problem(kind)
  xs = xs.at[1, 4, 2].set(jnp.nan)
  cell = CELLS[kind](64)
  outputs = lambda p, x: seqjax.scan(cell, p, x, **options)[1]
  assert f"seqjax_{kind}_forward" in _lowered(outputs, params, xs)
  got = np.isnan(np.asarray(jax.jit(outputs)(params, xs)))
  want = np.isnan(np.asarray(_xla_path(outputs, params, xs)(params, xs)))
  assert want[1, 4:7].all() and not want[1, 7:].any()  # row 1's length is 7: zeros after
  assert not np.delete(want, 1, axis=0).any()
  np.testing.assert_array_equal(got, want)
  grads = jax.jit(jax.grad(loss))(params, xs)
  assert all(np.isnan(np.asarray(g)).any() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("b,t,d,h,masks", _with_masks([(16, 40, 24, 64), (13, 9, 5, 96),
                                                   (3, 5, 7, 48), (1, 4, 5, 80), (4, 0, 3, 32)]))
@pytest.mark.parametrize("kind", KINDS)
def test_the_reverse_kernel_equals_the_xla_reverse_loop(kind, b, t, d, h, masks):
  params, xs, *carry = _problem(b, t, d, h, kind=kind)
  rng = np.random.default_rng(b + t + h)
  valid = rng.random((t, b)) < 0.7 if masks in ("valid", "both") else None
  resets = rng.random((t, b)) < 0.2 if masks in ("resets", "both") else None
  k = jax.random.split(jax.random.key(7), 3)
  d_carry = [jax.random.normal(kk, (b, h), jnp.float32) for kk in k[:len(carry)]]
  dys = jax.random.normal(k[2], (t, b, h), jnp.float32)
  if kind == "lstm":
    _, (_, ps, ks, fs) = fused._forward(params, xs, *carry, valid, resets, True, None)
    args = (params["w_h"], *d_carry, dys, ps, ks, fs, valid, resets)
    kernel, xla = native.lstm_reverse, fused._lstm_reverse
  else:
    _, (_, _, ph, zs) = fused._gru_forward(params, xs, *carry, valid, resets, True, None)
    args = (params["w_h"], *d_carry, dys, ph, zs, valid, resets)
    kernel, xla = native.gru_reverse, fused._gru_reverse
  got = jax.tree.leaves(jax.jit(kernel)(*args))
  want = jax.tree.leaves(jax.jit(lambda *a: xla(*a, None))(*args))
  assert len(got) == len(want) == len(carry) + 1
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.shape == w.shape, i
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=str(i))


def _every_kernel():
  """Each kernel's outputs on a few calls, numpy arrays by name: both cells'
  forward loops and gradients (the saving and reverse loops and the outer
  sums) on a short call and on one of tens of milliseconds, and both
  samplers."""
  out = {}
  def keep(name, tree):
    out.update({f"{name}{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))})
  for kind in KINDS:
    scan = _scan(kind)
    loss = lambda p, x, c: sum(jnp.sum(jnp.sin(a)) for a in scan(p, x, *c, None, None, None))
    # split by units, short and long; split by rows (row_groups)
    for b, t, d, h in [(4, 6, 3, 64), (8, 200, 16, 64), (16, 300, 32, 128)]:
      params, xs, *carry = _problem(b, t, d, h, kind=kind)
      keep(f"{kind}{t}_forward", jax.jit(KERNELS[kind])(params, xs, *carry))
      keep(f"{kind}{t}_gradient",
           jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, carry))
    cell, params, embed, head = _sampling_model(128, 65, 2, kind=kind)
    carry = [cell.initial_carry((8,))] * 2
    noise = decoding.gumbel_noise(jax.random.key(0), (8, 65), 200)
    keep(f"{kind}_sample", jax.jit(SAMPLERS[kind][1])(
        cell.project(params[0], embed), params, head, carry, jnp.zeros((8, 65), jnp.float32),
        noise))
  return out


@pytest.mark.slow  # ~25 s: two runs of every kernel, one in a fresh process
def test_late_workers_change_nothing(tmp_path, monkeypatch):
  """A call does not wait for its worker threads: one that is late
  (SEQJAX_NATIVE_LATE_WORKERS_US: each worker waits 2 ms once woken, as one
  off its core would) joins a call part-way or not at all, the others taking
  its partitions, and every value comes out the same, bit for bit."""
  code = textwrap.dedent("""
      import sys
      import jax, numpy as np
      jax.config.update("jax_enable_x64", True)  # as the tests run
      from tests.test_native import _every_kernel
      np.savez(sys.argv[1], **_every_kernel())
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, SEQJAX_NATIVE_THREADS="2", SEQJAX_NATIVE_LATE_WORKERS_US="2000")
  late = tmp_path / "late.npz"
  run = subprocess.run([sys.executable, "-c", code, str(late)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  monkeypatch.setenv("SEQJAX_NATIVE_THREADS", "2")
  want = _every_kernel()
  got = np.load(late)
  assert sorted(got.files) == sorted(want) and len(want) > 30
  for name, w in want.items():
    np.testing.assert_array_equal(got[name], w, err_msg=name)


def _clang() -> str | None:
  """A clang++ on the PATH (plain, or the newest versioned one), or None."""
  names = ["clang++"] + [f"clang++-{v}" for v in range(25, 13, -1)]
  return next(filter(None, map(shutil.which, names)), None)


@pytest.mark.slow  # ~2.5 minutes: the kernels built with a sanitizer, this file's default tests
def test_the_kernels_run_this_files_tests_clean_under_clangs_undefined_behaviour_sanitizer(
    tmp_path):
  """Every default test of this file, in a fresh process whose kernels clang
  built with -fsanitize=undefined,pointer-overflow, stopping at the first
  report: no arithmetic on a null pointer (an empty scratch vector's data()
  plus an offset, once), no overflow, no misaligned or out-of-range shift.
  gcc's sanitizer does not report null plus an offset; clang's does."""
  clang = _clang()
  if clang is None:
    pytest.skip("no clang++ on the PATH: apt-get install clang (.ci/run does)")
  runtime = subprocess.run([clang, "-print-file-name=libclang_rt.ubsan_standalone-x86_64.so"],
                           capture_output=True, text=True, check=True).stdout.strip()
  if not os.path.isabs(runtime):
    pytest.skip(f"{clang} has no UBSan runtime (libclang-rt-*-dev): {runtime}")
  compiler = tmp_path / "clang-ubsan"
  compiler.write_text(
      "#!/bin/sh\n"
      f'exec {clang} -fsanitize=undefined,pointer-overflow -fno-sanitize=vptr,function '
      f'-fno-sanitize-recover=all -shared-libsan -g -Wl,-rpath,{os.path.dirname(runtime)} "$@"\n')
  compiler.chmod(0o755)
  reports = tmp_path / "ubsan"
  env = dict(os.environ, CXX=str(compiler), SEQJAX_CACHE_DIR=str(tmp_path / "cache"),
             UBSAN_OPTIONS=f"print_stacktrace=1:log_path={reports}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-x",
                        "-p", "no:cacheprovider", os.path.abspath(__file__)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=1500, check=False)
  found = sorted(tmp_path.glob("ubsan*"))
  assert not found, found[0].read_text()[:3000]
  assert run.returncode == 0, run.stdout[-3000:]
  assert list((tmp_path / "cache").glob("rnn-*.so")), "the kernels were not built with clang"


@pytest.mark.slow  # ~16 s: a fresh process importing jax and running the kernels
def test_a_fresh_process_starts_its_workers_and_finishes():
  """The first split calls start the pool's worker, in a fresh process, and
  finish with the right values (a call that waited for a worker that missed
  its start would hang: the subprocess timeout)."""
  code = textwrap.dedent("""
      import jax, numpy as np
      from seqjax import native
      from tests.test_native import _problem, _xla
      for seed in range(3):
        args = _problem(8, 50, 4, 64, seed=seed)
        np.testing.assert_allclose(jax.jit(native.lstm_forward)(*args)[2], _xla(*args)[2],
                                   rtol=2e-5, atol=2e-6)
      print("DONE", native.partitions(64))
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, SEQJAX_NATIVE_THREADS="2")
  run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "DONE 2" in run.stdout


@pytest.mark.slow  # ~5 s each (the default suite's time budget)
@pytest.mark.parametrize("h", [32, 20])
@pytest.mark.parametrize("batch_major", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_second_derivatives_through_the_kernels_match_float64(kind, batch_major, h):
  """Grad of grad in float32 where the kernels run: it differentiates the XLA
  loops (a kernel has no derivative of its own) instead of failing; on a
  batch-major call's own layout too, and on units padded to whole registers
  (H = 20)."""
  params, xs, *carry = _problem(4, 16, 5, h, kind=kind)
  assert native.usable(params, xs, carry, None) == (h % 16 == 0)
  assert f"seqjax_{kind}_reverse" in _lowered(
      jax.grad(lambda p: jnp.sum(_scan(kind)(p, xs, *carry, None, None, None)[-1] ** 2)), params)
  xs = jnp.swapaxes(xs, 0, 1) if batch_major else xs
  valid = np.arange(64).reshape(16, 4) % 5 != 2
  resets = np.eye(16, 4, 1, dtype=bool)
  scan = _scan(kind)

  def gradient_norm(p, x, *carry):
    ys = lambda p: scan(p, x, *carry, valid, resets, None, batch_major)[-1]
    loss = lambda p: jnp.sum(jnp.tanh(ys(p)) ** 2)
    return sum(jnp.sum(g ** 2) for g in jax.tree.leaves(jax.grad(loss)(p)))

  got = jax.jit(jax.grad(gradient_norm, argnums=(0, 1)))(params, xs, *carry)
  as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
  want = jax.grad(gradient_norm, argnums=(0, 1))(as64(params), as64(xs), *as64(carry))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)
    assert np.abs(w).max() > 1e-3  # a second derivative that is there to compare


@pytest.mark.parametrize("kind", KINDS)
def test_a_backward_pass_reads_its_forward_pass_layout(kind):
  """A batch-major gradient's residuals are batch-major on the kernels and
  time-major on the XLA path; the backward pass follows what its forward pass
  chose, also when the two decide under different settings (a vjp taken
  inside native.disabled() and applied outside it, or the other way round)."""
  params, xs, *carry = _problem(6, 20, 5, 64, kind=kind)
  xs = jnp.swapaxes(xs, 0, 1)
  run = lambda p, x: _scan(kind)(p, x, *carry, None, None, None, True)[-1]
  dys = jax.random.normal(jax.random.key(3), xs.shape[:2] + (64,), jnp.float32)
  want = jax.vjp(run, params, xs)[1](dys)
  for forward, backward in ((native.disabled, contextlib.nullcontext),
                            (contextlib.nullcontext, native.disabled)):
    with forward():
      _, vjp = jax.vjp(run, params, xs)
    with backward():
      got = vjp(dys)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_traces_the_xla_path_and_only_inside_the_block(kind):
  params, xs, *carry = _problem(4, 16, 5, 32, kind=kind)
  run = lambda *a: _scan(kind)(*a, None, None, None)
  with native.disabled():
    assert not native.usable(params, xs, carry, None)
    xla = jax.jit(lambda *a: run(*a)).lower(params, xs, *carry)
  assert native.usable(params, xs, carry, None)
  assert not any(t in xla.as_text() for t in TARGETS) and "while" in xla.as_text()
  assert f"seqjax_{kind}_forward" in _lowered(run, params, xs, *carry)
  for got, want in zip(xla.compile()(params, xs, *carry), jax.jit(run)(params, xs, *carry)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_a_variant_of_the_source_runs_beside_the_kernels_inside_its_block(tmp_path):
  """build_variant registers an edited rnn.cc's kernels under their own
  names; functions traced inside variant() call them, others the package's
  (an unedited copy here: the same build, so no compile, and the same values)."""
  source = tmp_path / "copy.cc"
  shutil.copy(native._SOURCE, source)
  native.build_variant(source, "test_copy")
  params, xs, *carry = _problem(4, 16, 5, 32)
  loss = lambda p, x: jnp.sum(_scan("lstm")(p, x, *carry, None, None, None)[-1] ** 2)
  grad = lambda: jax.jit(jax.value_and_grad(lambda *a: loss(*a)))  # a new function each time
  with native.variant("test_copy"):
    on_copy = grad().lower(params, xs)
  on_kernels = grad().lower(params, xs)
  for name in ("lstm_forward_saving", "lstm_reverse", "outer_sum"):
    assert f"@test_copy_seqjax_{name}" in on_copy.as_text()
    assert f"@seqjax_{name}" in on_kernels.as_text() and "test_copy" not in on_kernels.as_text()
  for got, want in zip(jax.tree.leaves(on_copy.compile()(params, xs)),
                       jax.tree.leaves(on_kernels.compile()(params, xs))):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"expected a new name .* got 'test_copy'"):
    native.build_variant(source, "test_copy")
  with pytest.raises(ValueError, match="expected a new name"):
    native.build_variant(source, "no-dashes")
  with pytest.raises(FileNotFoundError, match="no source file"):
    native.build_variant(tmp_path / "missing.cc", "test_missing")
  with pytest.raises(ValueError, match=r"expected one of build_variant's names .* got 'unbuilt'"):
    with native.variant("unbuilt"):
      pass


def test_a_variant_that_does_not_build_says_why(tmp_path):
  broken, empty = tmp_path / "broken.cc", tmp_path / "empty.cc"
  broken.write_text("int broken = ;\n")
  empty.write_text("int empty = 1;\n")
  with pytest.raises(RuntimeError, match=r"build_variant: .*broken.cc: .* failed on broken.cc: "):
    native.build_variant(broken, "test_broken")
  with pytest.raises(RuntimeError, match=r"build_variant: .*empty.cc: the build exports no "
                                         r"SeqjaxLstmForward, SeqjaxLstmForwardSaving, "):
    native.build_variant(empty, "test_empty")
  for name in ("test_broken", "test_empty"):  # neither registered
    with pytest.raises(ValueError, match="expected one of build_variant's names"):
      with native.variant(name):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_calls_too_short_to_repay_the_pack_keep_the_xla_path(kind):
  """Packing the weights costs more than a short call gains: one step at a time
  (a sampler's loop) stays on XLA, and a call needs T B >= weights / 2^15."""
  def lowers_a_kernel(params, xs, *carry, batch_major=False):
    text = _lowered(lambda *a: _scan(kind)(*a, None, None, None, batch_major), params, xs,
                    *carry)
    return any(t in text for t in TARGETS)

  weights = sum(a.size for a in _problem(1, 1, 512, 512, kind=kind)[0].values())
  needed = -(-weights // native._WEIGHTS_PER_ROW_STEP)  # row-steps at D = H = 512
  assert needed >= 48  # 2^21 floats for the LSTM, 1.5 * 2^20 for the GRU
  for b, t, d, h, want in ((4, 3, 5, 32, False),     # small weights, 3 steps
                           (4, 4, 5, 32, True),      # small weights, 4 steps
                           (64, 1, 5, 32, False),    # one step, however many rows
                           (1, needed - 1, 512, 512, False),
                           (1, needed, 512, 512, True),
                           (16, 5, 512, 512, True)):
    params, xs, *carry = _problem(b, t, d, h, kind=kind)
    assert native.usable(params, xs, carry, None) == want, (b, t, d, h)
    assert lowers_a_kernel(params, xs, *carry) == want, (b, t, d, h)
    # Batch-major xs [B, T, D] (seqjax.scan's default): the same steps, the same choice.
    xs = jnp.swapaxes(xs, 0, 1)
    assert native.usable(params, xs, carry, None, batch_major=True) == want, (b, t, d, h)
    assert lowers_a_kernel(params, xs, *carry, batch_major=True) == want, (b, t, d, h)


# Page faults per call of a jitted f(x), in the scripts below (fresh processes).
_FAULTS_PER_CALL = """
def faults_per_call():
  jax.block_until_ready(f(x))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    jax.block_until_ready(f(x))
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_stops_xla_faulting_its_buffers_in_on_every_call():
  """A jitted function with 4 MB intermediates: by default each call faults
  their pages in afresh (glibc gave the last call's back); after
  reuse_freed_memory() the calls reuse them. In a fresh process: the setting
  is for the whole process."""
  code = textwrap.dedent("""
      import resource
      import jax, jax.numpy as jnp
      from seqjax import native

      f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ x, axis=0) @ x)
      x = jnp.ones((1024, 1024), jnp.float32)
  """) + _FAULTS_PER_CALL + textwrap.dedent("""
      default = max(faults_per_call() for _ in range(3))
      assert native.reuse_freed_memory()
      # XLA's threads allocate from several of glibc's arenas, each of
      # which first has to hold what it reuses: the lowest of a few calls.
      print(default, min(faults_per_call() for _ in range(4)))
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).parents[1])
  default, kept = map(int, out.stdout.split())
  assert default > 1_000 and kept < default / 10, (default, kept)


# ~7 s (six fresh processes): the slow run, for the default suite's budget.
@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_first_keeps_blocks_above_64_mb():
  """A jitted function whose temporaries are one 65 MB block: glibc maps a
  block that size afresh on every call in an XLA thread's own heap (at most
  64 MB), so it faults 16k pages in a call; with reuse_freed_memory() called
  before the first JAX computation every thread allocates from the one heap,
  and after a few calls none are faulted in. Called after it, it warns that
  it is late. Fresh processes, one each way."""
  code = textwrap.dedent("""
      import resource, sys, warnings
      from seqjax import native
      if sys.argv[1] == "reuse":
        with warnings.catch_warnings():
          warnings.simplefilter("error")  # first: nothing to warn of
          assert native.reuse_freed_memory()
      import jax, jax.numpy as jnp
      if sys.argv[1] == "late":
        jnp.ones(3).block_until_ready()  # XLA's threads have started, and allocated
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always")
          assert native.reuse_freed_memory()
        assert any("before the first JAX computation" in str(w.message) for w in caught), caught
        sys.exit(0)

      f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)[:, :64]).sum())
      x = jnp.ones((4096, 4096), jnp.float32)
      assert f.lower(x).compile().memory_analysis().temp_size_in_bytes > 64 << 20
  """) + _FAULTS_PER_CALL + textwrap.dedent("""
      # The heap grows over the first few calls (it settled by the 3rd or 4th
      # of these in trials), then holds: the lowest of 6.
      print(min(faults_per_call() for _ in range(6)))
  """)
  faults = {}
  for mode in ("default", "reuse", "late"):
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, (mode, out.stderr[-2000:])
    if mode != "late":
      faults[mode] = int(out.stdout)
  assert faults["default"] > 10_000 and faults["reuse"] < faults["default"] / 100, faults


SAMPLERS = {"lstm": (cells.LSTM, native.lstm_sample), "gru": (cells.GRU, native.gru_sample)}


def _sampling_model(h, v, layers, matmul_dtype=None, seed=0, kind="lstm"):
  """``(cell, layers, embed, head)``: a stacked LSTM (or GRU) language model, a
  peaked read-out (so the draws vary and are not near ties); the GRU's b_hn
  random, not zero, so the kernels must place it."""
  cell = SAMPLERS[kind][0](h, matmul_dtype=matmul_dtype)
  k = jax.random.split(jax.random.key(seed), layers + 3)
  params = [cell.init(k[l], 8 if l == 0 else h, jnp.float32) for l in range(layers)]
  if kind == "gru":
    params = [dict(p, b_hn=0.3 * jax.random.normal(jax.random.fold_in(k[l], 1), (h,), jnp.float32))
              for l, p in enumerate(params)]
  embed = jax.random.normal(k[layers], (v, 8), jnp.float32)
  head = (3 * jax.random.normal(k[layers + 1], (h, v), jnp.float32) / h ** 0.5,
          jax.random.normal(k[layers + 2], (v,), jnp.float32))
  return cell, params, embed, head


def _reference_sample(cell, layers, embed, head, carry, logits, key, length, temperature):
  """decoding.generate on the same model, in XLA: what lstm_sample (gru_sample)
  must draw."""
  lstm = isinstance(cell, cells.LSTM)
  def step(_, carry, tokens):
    x, new = embed[tokens[:, -1]], []
    for p, c in zip(layers, carry):
      c, x = cell.step(p, cells.LSTMCarry(*c) if lstm else c, cell.project(p, x))
      new.append(tuple(c) if lstm else c)
    return new, x @ head[0] + head[1]
  return decoding.generate(step, None, carry, logits, key, length, temperature=temperature)


def _sample_both(h, v, layers, b, t, temperature, matmul_dtype=None, kind="lstm", nan_at=None):
  """The kernel's ``(carry, logits, tokens)`` and the reference's, from a
  random carry (``nan_at``: ``(row, unit)`` of the first layer's h set to NaN)."""
  cell, params, embed, head = _sampling_model(h, v, layers, matmul_dtype, kind=kind)
  carry = [tuple(0.5 * jax.random.normal(jax.random.key(10 + i), (b, h), jnp.float32)
                 for i in (2 * l, 2 * l + 1)) for l in range(layers)]
  if nan_at is not None:
    carry[0] = (carry[0][0].at[nan_at].set(jnp.nan), carry[0][1])
  if kind == "gru":
    carry = [h for h, _ in carry]
  logits = jax.random.normal(jax.random.key(5), (b, v), jnp.float32)
  key = jax.random.key(3)
  want = jax.jit(_reference_sample, static_argnums=(0, 7, 8))(
      cell, params, embed, head, carry, logits, key, t, temperature)
  noise = decoding.gumbel_noise(key, (b, v), t, temperature=temperature)
  got = jax.jit(SAMPLERS[kind][1], static_argnums=(6, 7))(
      cell.project(params[0], embed), params, head, carry, logits, noise, temperature,
      matmul_dtype)
  return got, want



@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("bfloat16", marks=needs_bf16),
                                          pytest.param("int8", marks=needs_vnni)])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_sampling_kernel_spreads_a_nan_as_generate_does(kind, matmul_dtype):
  """A NaN in one row's carry makes that row's carry and logits NaN, and no
  other row's, as in XLA's sampler (int8: the row's scale is NaN there)."""
  got, want = _sample_both(64, 17, 2, 4, 8, 1.0, matmul_dtype, kind, nan_at=(1, 5))
  for g, w in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2]), strict=True):
    rows = np.isnan(np.asarray(w)).any(axis=-1)
    assert rows.tolist() == [False, True, False, False]
    np.testing.assert_array_equal(np.isnan(np.asarray(g)), np.isnan(np.asarray(w)))
  np.testing.assert_array_equal(np.asarray(got[2])[[0, 2, 3]], np.asarray(want[2])[[0, 2, 3]])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("h,v,layers,b,t,temperature,matmul_dtype", [
    (32, 11, 1, 3, 20, 1.0, None),           # one partition
    (64, 65, 2, 5, 30, 0.7, None),           # two partitions, two layers
    (64, 65, 2, 1, 30, 0.0, None),           # greedy, one row
    pytest.param(96, 20, 3, 9, 12, 1.0, None,  # three layers, a row tile and one row more
                 marks=pytest.mark.slow),  # (bfloat16 covers them in the default run)
    pytest.param(96, 20, 3, 9, 12, 1.0, "bfloat16", marks=needs_bf16),
    pytest.param(64, 65, 2, 5, 30, 0.7, "int8", marks=needs_vnni),
    pytest.param(96, 20, 3, 9, 12, 1.0, "int8", marks=needs_vnni),
    (64, 17, 1, 2, 0, 1.0, None),            # no tokens: the carry and logits pass through
])
def test_the_sampling_kernel_draws_what_generate_draws(h, v, layers, b, t, temperature,
                                                       matmul_dtype, kind):
  (carry, logits, tokens), (want_carry, want_logits, want_tokens) = _sample_both(
      h, v, layers, b, t, temperature, matmul_dtype, kind)
  assert tokens.shape == (b, t) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, want_tokens)
  if t and temperature:
    assert len(np.unique(np.asarray(tokens))) > 2  # the draws vary
  # bfloat16: now and then an operand rounds to the other neighbour (2-5e-4);
  # int8 too, its neighbours 1/127 of the row's largest apart (up to 1.1e-3
  # seen), while most values agree to float32's rounding
  atol = {None: 2e-5, "bfloat16": 1e-3, "int8": 1e-2}[matmul_dtype]
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=atol)
  for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(want_carry), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  if matmul_dtype == "int8":
    flat = lambda *trees: np.concatenate([np.ravel(a) for a in jax.tree.leaves(trees)])
    close = np.isclose(flat(logits, carry), flat(want_logits, want_carry), rtol=1e-5, atol=2e-5)
    assert np.mean(close) > 0.8, np.mean(close)  # 0.93 and 1.0 measured


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("matmul_dtype", [None, pytest.param("int8", marks=needs_vnni)])
def test_the_sampling_kernel_gives_the_same_values_on_one_thread(monkeypatch, matmul_dtype,
                                                                 kind):
  cell, params, embed, head = _sampling_model(64, 30, 2, matmul_dtype, kind=kind)
  carry = [cell.initial_carry((4,))] * 2
  logits = jnp.zeros((4, 30), jnp.float32)
  noise = decoding.gumbel_noise(jax.random.key(0), (4, 30), 25)
  noise = noise.at[..., 7].set(-jnp.inf)  # a token that is never drawn
  run = lambda: jax.jit(lambda *a: SAMPLERS[kind][1](*a, matmul_dtype=matmul_dtype))(
      cell.project(params[0], embed), params, head, carry, logits, noise)
  want = run()
  monkeypatch.setattr(native, "threads", lambda: 1)
  got = run()  # traced anew: one partition
  assert not np.any(np.asarray(want[2]) == 7)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("matmul_dtype,layers,b,groups", [
    (None, 2, 17, 2),  # groups of 8 and 9 rows (a partial tile)
    pytest.param("bfloat16", 3, 17, 3, marks=needs_bf16),  # more groups than cores
    pytest.param("int8", 2, 12, 2, marks=needs_vnni),
])
def test_the_sampling_kernel_split_by_rows_gives_the_units_split_values_bit_for_bit(
    monkeypatch, matmul_dtype, layers, b, groups, kind):
  """Split by rows, each thread draws, sums and reads out its own rows through
  every layer: the same tokens, logits and carries as split by units, bit for
  bit (a row's sums run in the same order either way)."""
  cell, params, embed, head = _sampling_model(64, 30, layers, matmul_dtype, kind=kind)
  carry = [cell.initial_carry((b,))] * layers
  logits = jax.random.normal(jax.random.key(1), (b, 30), jnp.float32)
  noise = decoding.gumbel_noise(jax.random.key(0), (b, 30), 25, temperature=0.8)
  sample = lambda *a: SAMPLERS[kind][1](*a, temperature=0.8, matmul_dtype=matmul_dtype)
  table = cell.project(params[0], embed)

  def split(groups):
    monkeypatch.setattr(native, "row_groups", lambda batch, weights, cores=None: groups)
    run = jax.jit(lambda *a: sample(*a))  # a new function: traced anew for each split
    assert f"row_groups = {groups} : i64" in run.lower(table, params, head, carry, logits,
                                                        noise).as_text()
    return run(table, params, head, carry, logits, noise)

  want, got = split(1), split(groups)
  assert len(np.unique(np.asarray(want[2]))) > 2  # the draws vary
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w)


def test_the_samplers_split_by_rows_at_batch_64():
  """The rule as the samplers apply it: a char-LM-shaped sampler (H = 512, V = 65)
  splits by rows at batch 64 and by units at batch 1."""
  cell, params, embed, head = _sampling_model(512, 65, 1)
  table = cell.project(params[0], embed)
  rows = min(native.threads(), 64 // native._GROUP_ROWS)
  for b, groups in ((64, rows if rows > 1 else 1), (1, 1)):
    carry = [cell.initial_carry((b,))]
    noise = jnp.zeros((8, b, 65), jnp.float32)
    text = jax.jit(native.lstm_sample).lower(table, params, head, carry,
                                             jnp.zeros((b, 65), jnp.float32), noise).as_text()
    assert f"row_groups = {groups} : i64" in text, b


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_sampling_kernel_refuses_arrays_that_do_not_agree(kind):
  cell, params, embed, head = _sampling_model(32, 11, 1, kind=kind)
  sample = SAMPLERS[kind][1]
  carry = [cell.initial_carry((2,))]
  noise = jnp.zeros((5, 2, 11), jnp.float32)
  table = cell.project(params[0], embed)
  with pytest.raises(Exception, match=f"{kind}_sample: table, read-out, logits and noise do "
                                      "not agree on V, H and B"):
    jax.block_until_ready(sample(table, params, (head[0][:, :-1], head[1]), carry,
                                 jnp.zeros((2, 11), jnp.float32), noise))
  bad = [dict(params[0], w_h=params[0]["w_h"][:16])]
  with pytest.raises(Exception, match="layer 0's arrays do not match H"):
    jax.block_until_ready(sample(table, bad, head, carry, jnp.zeros((2, 11), jnp.float32), noise))
  if kind == "gru":  # the recurrent bias b_hn, of the wrong length
    bad = [dict(params[0], b_hn=params[0]["b_hn"][:16])]
    with pytest.raises(Exception, match=r"expected w_x, w_h \[H,3H\], b, bh \[3H\]"):
      jax.block_until_ready(sample(table, bad, head, carry, jnp.zeros((2, 11), jnp.float32),
                                   noise))


def test_sampling_too_short_to_repay_the_pack_is_not_usable():
  cell, params, embed, head = _sampling_model(64, 11, 1)
  table, carry = cell.project(params[0], embed), [cell.initial_carry((1,))]
  usable = lambda t, dtype=jnp.float32: native.sample_usable(
      table, params, head, carry, jnp.zeros((t, 1, 11), dtype), None)
  assert usable(64) and not usable(3)  # 4 steps at least
  assert not usable(64, jnp.float64)
  with native.disabled():
    assert not usable(64)
  noise = jnp.zeros((64, 1, 11), jnp.float32)
  int8 = native.sample_usable(table, params, head, carry, noise, "int8")
  assert int8 == ("avx512_vnni" in CPU_FLAGS)
