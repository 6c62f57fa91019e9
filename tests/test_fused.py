"""The fused LSTM and GRU (seqjax.fused): the scan driver uses them, and they
equal the step path.

The driver-vs-reference matrix in test_recurrence.py already runs every option
through it (values and gradients against NumPy); these tests pin down that the
fast path is really taken, and compare it with the per-step path directly.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import cells, fused, native


FUSED = [cells.LSTM(5), cells.GRU(5)]


def _inputs(cell=FUSED[0], b=3, t=9, d=4, dtype=jnp.float64):
  params = cell.init(jax.random.key(0), d, dtype)
  xs = jax.random.normal(jax.random.key(1), (b, t, d), dtype)
  carry = jax.tree.map(lambda z: jax.random.normal(jax.random.key(2), z.shape, dtype),
                       cell.initial_carry((b,), dtype))
  return cell, params, xs, carry


@pytest.mark.parametrize("cell", FUSED, ids=["lstm", "gru"])
def test_scan_takes_the_fused_path_and_other_drivers_do_not(cell):
  cell, params, xs, _ = _inputs(cell)
  fused = str(jax.make_jaxpr(lambda p: seqjax.scan(cell, p, xs))(params))
  stepped = str(jax.make_jaxpr(lambda p: seqjax.scan(cell, p, xs, unroll=2))(params))
  assert "custom_vjp" in fused and "custom_vjp" not in stepped


def test_the_original_gru_form_has_no_fused_path():
  assert cells.GRU(5, reset_after=False).fused_scan is None


@pytest.mark.parametrize("options", [
    {}, {"lengths": np.array([9, 4, 0])}, {"reverse": True, "lengths": np.array([2, 9, 5])},
    {"mask": np.array([[True, False, True] * 3] * 3)},
    {"resets": np.eye(3, 9, 3, dtype=bool), "lengths": np.array([9, 7, 8]), "reverse": True},
])
@pytest.mark.parametrize("cell", FUSED, ids=["lstm", "gru"])
@pytest.mark.parametrize("loop_unroll", [1, 4], ids=["loop1", "loop4"])
def test_fused_equals_the_step_path_in_values_and_gradients(cell, options, loop_unroll,
                                                            monkeypatch):
  # loop4: the fused loops unrolled as on a GPU (fused._UNROLL), 9 steps in
  # iterations of 4, a remainder included.
  monkeypatch.setitem(fused._UNROLL, jax.default_backend(), loop_unroll)
  cell, params, xs, carry = _inputs(cell)
  weights = jax.random.normal(jax.random.key(3), (3, 9, 5), jnp.float64)

  def loss(unroll, params, xs, carry):
    final, ys = seqjax.scan(cell, params, xs, carry, unroll=unroll, **options)
    return jnp.sum(ys * weights) + sum(jnp.sum(leaf * (0.3 + k))
                                       for k, leaf in enumerate(jax.tree.leaves(final)))

  on_fused = jax.value_and_grad(lambda *a: loss(1, *a), argnums=(0, 1, 2))(params, xs, carry)
  loops = re.findall(r"\bunroll=\d+", str(jax.make_jaxpr(jax.grad(lambda *a: loss(1, *a)))(
      params, xs, carry)))
  assert loops == [f"unroll={loop_unroll}"] * 2  # the forward and the reverse loop
  stepped = jax.value_and_grad(lambda *a: loss(2, *a), argnums=(0, 1, 2))(params, xs, carry)
  for a, b in zip(jax.tree.leaves(on_fused), jax.tree.leaves(stepped)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", FUSED, ids=["lstm", "gru"])
def test_bfloat16_and_float32_run_and_agree_with_float64(cell):
  cell, params64, xs64, _ = _inputs(cell)
  _, ys64 = seqjax.scan(cell, params64, xs64)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
    params = jax.tree.map(lambda p: p.astype(dtype), params64)
    carry, ys = jax.jit(seqjax.scan, static_argnums=0)(cell, params, xs64.astype(dtype))
    assert ys.dtype == dtype and all(c.dtype == dtype for c in jax.tree.leaves(carry))
    np.testing.assert_allclose(np.asarray(ys, np.float64), ys64, atol=tol)
    grads = jax.grad(lambda p: jnp.sum(seqjax.scan(cell, p, xs64.astype(dtype))[1]
                                       .astype(jnp.float32)))(params)
    assert all(g.dtype == dtype for g in jax.tree.leaves(grads))


def test_forward_mode_needs_the_step_path():
  cell, params, xs, _ = _inputs()
  f = lambda unroll: (lambda x: seqjax.scan(cell, params, x, unroll=unroll)[1])
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(f(1), (xs,), (xs,))
  _, tangent = jax.jvp(f(2), (xs,), (xs,))
  _, vjp = jax.vjp(f(1), xs)
  # <J v, J v> computed both ways: forward mode on the step path, reverse on the fused.
  (jt_jv,) = vjp(tangent)
  np.testing.assert_allclose(jnp.vdot(tangent, tangent), jnp.vdot(jt_jv, xs), rtol=1e-10)


@pytest.mark.parametrize("make", [cells.LSTM, cells.GRU, cells.Elman, cells.MinGRU,
                                  lambda h, **kw: cells.GRU(h, reset_after=False, **kw)],
                         ids=["lstm", "gru", "elman", "mingru", "gru_cho"])
def test_bfloat16_matmuls_stay_close_to_float32_on_every_path(make):
  """``matmul_dtype="bfloat16"``: float32 params, carry and outputs; bf16 dot operands."""
  exact, rounded = make(16), make(16, matmul_dtype="bfloat16")
  params = exact.init(jax.random.key(0), 8)
  xs = jax.random.normal(jax.random.key(1), (4, 40, 8), jnp.float32)
  lengths = np.array([40, 31, 7, 0])

  def loss(cell, unroll):
    return lambda p, x: jnp.sum(jnp.sin(seqjax.scan(cell, p, x, unroll=unroll,
                                                    lengths=lengths)[1]))

  reference = jax.value_and_grad(loss(exact, 2), argnums=(0, 1))(params, xs)
  fused = jax.value_and_grad(loss(rounded, 1), argnums=(0, 1))(params, xs)
  stepped = jax.value_and_grad(loss(rounded, 2), argnums=(0, 1))(params, xs)
  for result in (fused, stepped):
    np.testing.assert_allclose(result[0], reference[0], rtol=1e-2)
    for got, want in zip(jax.tree.leaves(result[1]), jax.tree.leaves(reference[1])):
      assert got.dtype == jnp.float32
      assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 2e-2
  # Both bf16 paths round the same forward products.
  np.testing.assert_allclose(fused[0], stepped[0], rtol=1e-6)
  # The products really are bf16, forward and (fused) backward.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(rounded, 1)))(params, xs))
  assert "bf16[" in jaxpr and "preferred_element_type=float32" in jaxpr  # bf16 arrays
  assert "bf16[" not in str(jax.make_jaxpr(jax.grad(loss(exact, 1)))(params, xs))


def test_int8_matmul_is_the_stated_quantization():
  a = jax.random.normal(jax.random.key(0), (5, 40), jnp.float32).at[3].set(0.0)
  w = jax.random.normal(jax.random.key(1), (40, 24), jnp.float32).at[:, 7].set(0.0)
  # Row 0's largest is 127, so its scale is 1 and 2.5 is halfway: it rounds to even.
  a = a.at[0, :3].set(jnp.array([2.5, -2.5, 127.0], jnp.float32))
  got = fused.int8_matmul(a, w)
  # The docstring's formula in NumPy, float32 throughout, the sums exact.
  a_, w_ = np.asarray(a), np.asarray(w)
  top_a, top_w = np.abs(a_).max(1, keepdims=True), np.abs(w_).max(0, keepdims=True)
  s_a = np.where(top_a > 0, top_a / np.float32(127), np.float32(1))
  s_w = np.where(top_w > 0, top_w / np.float32(127), np.float32(1))
  a_q, w_q = np.round(a_ / s_a), np.round(w_ / s_w)
  assert np.abs(a_q).max() == 127 and np.abs(w_q).max() == 127
  assert a_q[0, 0] == np.round(2.5) == 2  # half to even
  sums = a_q.astype(np.int64) @ w_q.astype(np.int64)
  want = sums.astype(np.float32) * (s_a * s_w)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.float32 and not np.any(got[3]) and not np.any(got[:, 7])
  exact = np.asarray(a @ w)
  assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()
  assert fused.matmul(a, w, "int8", jnp.float64).dtype == jnp.float64
  with pytest.raises(ValueError, match="'int8' is for inference"):
    jax.grad(lambda w: fused.int8_matmul(a, w).sum())(w)


def test_int8_matmul_keeps_a_nan():
  """A NaN in a row of a (a column of w) makes that row (column) of the
  product NaN and nothing else: the NaN gives its row's scale, not a scale
  of 1 with the NaN rounded to an integer."""
  a = jax.random.normal(jax.random.key(0), (5, 40), jnp.float32).at[2, 9].set(jnp.nan)
  w = jax.random.normal(jax.random.key(1), (40, 24), jnp.float32).at[4, 7].set(jnp.nan)
  want = np.zeros((5, 24), bool)
  want[2, :] = want[:, 7] = True
  np.testing.assert_array_equal(np.isnan(np.asarray(jax.jit(fused.int8_matmul)(a, w))), want)


@pytest.mark.parametrize("make", [cells.LSTM, cells.GRU, cells.Elman],
                         ids=["lstm", "gru", "elman"])
def test_int8_cells_run_forward_on_every_path_and_refuse_gradients(make):
  exact, int8 = make(16), make(16, matmul_dtype="int8")
  params = exact.init(jax.random.key(0), 8)
  xs = jax.random.normal(jax.random.key(1), (4, 40, 8), jnp.float32)
  lengths = np.array([40, 31, 7, 0])
  run = lambda cell, unroll: seqjax.scan(cell, params, xs, unroll=unroll, lengths=lengths)[1]
  reference, fused_ys, stepped = run(exact, 1), run(int8, 1), run(int8, 2)
  for ys in (fused_ys, stepped):
    assert ys.dtype == jnp.float32 and not np.array_equal(ys, reference)
    np.testing.assert_allclose(ys, reference, atol=0.05)
  np.testing.assert_allclose(fused_ys, stepped, atol=1e-5)  # the same quantized products
  carry = (jnp.zeros((4, 16), jnp.float32),)
  usable = lambda dtype: native.usable(params, jnp.swapaxes(xs, 0, 1), carry, dtype)
  assert not usable("int8") and usable(None) == (native.status() == "ready")
  for unroll in (1, 2):
    with pytest.raises(ValueError, match="'int8' is for inference"):
      jax.grad(lambda p: jnp.sum(seqjax.scan(int8, p, xs, unroll=unroll)[1]))(params)


def test_matmul_dtype_names_one_cell_and_is_checked():
  assert cells.LSTM(4, matmul_dtype=jnp.bfloat16) == cells.LSTM(4, matmul_dtype="bfloat16")
  assert hash(cells.GRU(4, matmul_dtype=jnp.bfloat16)) == hash(
      cells.GRU(4, matmul_dtype="bfloat16"))
  assert cells.LSTM(4, matmul_dtype="bfloat16").matmul_dtype == "bfloat16"
  for bad in ("int4", "bfloat17", 3):
    with pytest.raises(ValueError, match="matmul_dtype must be None or one of bfloat16"):
      cells.LSTM(4, matmul_dtype=bad)
