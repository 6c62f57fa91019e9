"""Cells: layout goldens, reference steps, gradients, initialisers, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from seqjax import cells
from tests import reference

ALL_CELLS = [
    cells.Elman(5), cells.Elman(5, activation="relu"), cells.LSTM(5),
    cells.GRU(5), cells.GRU(5, reset_after=False), cells.MinGRU(5),
]
IDS = ["elman_tanh", "elman_relu", "lstm", "gru", "gru_cho", "mingru"]


def _random_carry(cell, key, batch):
  zero = cell.initial_carry((batch,), jnp.float64)
  leaves, tree = jax.tree.flatten(zero)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _carry_dict(carry):
  return carry._asdict() if isinstance(carry, cells.LSTMCarry) else {"h": carry}


def test_layout_goldens():
  key = jax.random.key(0)
  shapes = lambda cell: jax.tree.map(np.shape, cell.init(key, 3))
  assert shapes(cells.Elman(4)) == {"w_x": (3, 4), "w_h": (4, 4), "b": (4,)}
  assert shapes(cells.LSTM(4)) == {"w_x": (3, 16), "w_h": (4, 16), "b": (16,)}
  assert shapes(cells.GRU(4)) == {
      "w_x": (3, 12), "w_h": (4, 12), "b": (12,), "b_hn": (4,)}
  assert shapes(cells.GRU(4, reset_after=False)) == {
      "w_x": (3, 12), "w_h": (4, 12), "b": (12,)}
  assert shapes(cells.MinGRU(4)) == {"w_x": (3, 8), "b": (8,)}


@pytest.mark.parametrize("cell", ALL_CELLS, ids=IDS)
def test_param_shapes_match_init(cell):
  params = cell.init(jax.random.key(1), 7)
  assert jax.tree.map(np.shape, params) == cell.param_shapes(7)


@pytest.mark.parametrize("cell", ALL_CELLS, ids=IDS)
def test_step_matches_reference(cell):
  k_p, k_x, k_c = jax.random.split(jax.random.key(2), 3)
  params = cell.init(k_p, 3, jnp.float64)
  params = {k: v + 0.1 * jax.random.normal(k_x, v.shape, v.dtype)
            for k, v in params.items()}  # non-zero biases
  xs = jax.random.normal(k_x, (4, 3), jnp.float64)
  carry = _random_carry(cell, k_c, 4)
  new_carry, y = cell.step(params, carry, cell.project(params, xs))
  ref_step = reference.step_fn(cell)
  np_params = jax.tree.map(np.asarray, params)
  for b in range(4):
    expected = ref_step(np_params, {k: np.asarray(v[b]) for k, v in
                                    _carry_dict(carry).items()}, np.asarray(xs[b]))
    for name, value in _carry_dict(new_carry).items():
      np.testing.assert_allclose(value[b], expected[name], rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(y[b], _carry_dict(new_carry)["h"][b])


@pytest.mark.parametrize("cell", ALL_CELLS, ids=IDS)
def test_step_gradients(cell):
  k_p, k_x, k_c = jax.random.split(jax.random.key(3), 3)
  params = cell.init(k_p, 3, jnp.float64)
  xs = jax.random.normal(k_x, (2, 3), jnp.float64)
  carry = _random_carry(cell, k_c, 2)

  def f(params, carry, xs):
    return cell.step(params, carry, cell.project(params, xs))

  check_grads(f, (params, carry, xs), order=2, modes=["rev"])


def test_lstm_forget_bias_is_an_initial_value():
  params = cells.LSTM(4, forget_bias=2.5).init(jax.random.key(0), 3)
  np.testing.assert_array_equal(params["b"][4:8], 2.5)
  np.testing.assert_array_equal(params["b"][:4], 0.0)
  np.testing.assert_array_equal(params["b"][8:], 0.0)


@pytest.mark.parametrize("cell", [cells.Elman(6), cells.LSTM(6), cells.GRU(6)],
                         ids=["elman", "lstm", "gru"])
def test_recurrent_blocks_are_orthogonal(cell):
  w_h = np.asarray(cell.init(jax.random.key(0), 3)["w_h"])
  for block in np.split(w_h, cell.num_gates, axis=1):
    np.testing.assert_allclose(block.T @ block, np.eye(6), atol=1e-5)
    assert not np.allclose(block, np.eye(6))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize("cell", ALL_CELLS, ids=IDS)
def test_dtypes_are_kept(cell, dtype):
  params = cell.init(jax.random.key(0), 3, dtype)
  assert all(v.dtype == dtype for v in params.values())
  xp = cell.project(params, jnp.ones((2, 3), dtype))
  carry, y = cell.step(params, cell.initial_carry((2,), dtype), xp)
  assert xp.dtype == dtype and y.dtype == dtype
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(carry))
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_initial_carry_structure():
  carry = cells.LSTM(4).initial_carry((2, 3))
  assert isinstance(carry, cells.LSTMCarry)
  assert carry.h.shape == carry.c.shape == (2, 3, 4)
  assert cells.GRU(4).initial_carry().shape == (4,)


def test_numpy_integer_sizes_are_accepted():
  cell = cells.LSTM(np.int64(4))
  assert cell == cells.LSTM(4) and hash(cell) == hash(cells.LSTM(4))
  assert type(cell.hidden_size) is int
  params = cell.init(jax.random.key(0), np.int32(3))
  assert params["w_x"].shape == (3, 16)
  with pytest.raises(ValueError, match="hidden_size must be a positive int, got True"):
    cells.GRU(True)


def test_cells_are_hashable_static_config():
  assert cells.LSTM(4) == cells.LSTM(4) and hash(cells.LSTM(4)) == hash(cells.LSTM(4))
  assert cells.GRU(4) != cells.GRU(4, reset_after=False)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cells.LSTM(4).hidden_size = 5


@pytest.mark.parametrize("make, message", [
    (lambda: cells.LSTM(0), "hidden_size must be a positive int, got 0"),
    (lambda: cells.GRU(2.5), "hidden_size must be a positive int, got 2.5"),
    (lambda: cells.Elman(4, activation="sigmoid"), "activation must be one of"),
    (lambda: cells.LSTM(4).init(jax.random.key(0), 0), "input_size must be a positive int"),
])
def test_bad_config_is_a_clear_error(make, message):
  with pytest.raises(ValueError, match=message):
    make()
