"""Drivers: every driver and option against the NumPy reference, values and
gradients; driver agreement; masking, reset and causality semantics;
bidirectional and stacked; jit and recompilation; boundary errors."""

import functools
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import seqjax
from seqjax import cells
from tests import reference

B, T, D, H = 3, 6, 3, 4
CELLS = {
    "elman_tanh": cells.Elman(H),
    "elman_relu": cells.Elman(H, activation="relu"),
    "lstm": cells.LSTM(H),
    "gru": cells.GRU(H),
    "gru_cho": cells.GRU(H, reset_after=False),
    "mingru": cells.MinGRU(H),
}
DRIVERS = {
    "scan": dict(method="scan"),
    "scan_unroll3": dict(method="scan", unroll=3),
    "unroll": dict(method="unroll"),
    "associative": dict(method="associative"),
    # chunks of 4 over T=6: one whole chunk and a shorter last one
    "scan_remat4": dict(method="scan", remat=4),
    "associative_remat4": dict(method="associative", remat=4),
}
LENGTHS = np.array([6, 3, 1])
MASK = np.array([[1, 1, 0, 1, 0, 1],
                 [0, 1, 1, 1, 1, 1],
                 [1, 0, 1, 1, 0, 0]], bool)
RESETS = np.array([[0, 0, 1, 0, 0, 1],
                   [1, 0, 1, 0, 1, 0],
                   [0, 0, 0, 1, 0, 0]], bool)
OPTIONS = {
    "plain": {},
    "carry": dict(carry=True),
    "lengths": dict(lengths=LENGTHS),
    "mask": dict(mask=MASK),
    "resets": dict(resets=RESETS),
    "reverse": dict(reverse=True),
    "reverse_lengths": dict(reverse=True, lengths=LENGTHS),
    "reverse_resets": dict(reverse=True, resets=RESETS, lengths=LENGTHS),
    "reverse_mask_resets": dict(reverse=True, mask=MASK, resets=RESETS),
    "all_forward": dict(carry=True, lengths=LENGTHS, mask=MASK, resets=RESETS),
    "all_reverse": dict(carry=True, lengths=LENGTHS, mask=MASK, resets=RESETS,
                        reverse=True),
}


def make_problem(cell, seed=0, batch=B, steps=T, dtype=jnp.float64):
  """Random params (with non-zero biases), inputs and carry."""
  k_p, k_b, k_x, k_c = jax.random.split(jax.random.key(seed), 4)
  params = cell.init(k_p, D, dtype)
  params = {k: v + 0.3 * jax.random.normal(k_b, v.shape, dtype)
            if k.startswith("b") else v for k, v in params.items()}
  xs = jax.random.normal(k_x, (batch, steps, D), dtype)
  zero = cell.initial_carry((batch,), dtype)
  leaves, tree = jax.tree.flatten(zero)
  carry = jax.tree.unflatten(tree, [
      jax.random.normal(k, x.shape, dtype)
      for k, x in zip(jax.random.split(k_c, len(leaves)), leaves)])
  return params, xs, carry


def carry_dict(carry):
  return carry._asdict() if isinstance(carry, cells.LSTMCarry) else {"h": carry}


def split_options(option):
  """Driver keyword arguments, and whether to pass an initial carry."""
  kwargs = dict(OPTIONS[option])
  use_carry = kwargs.pop("carry", False)
  return kwargs, use_carry


def loss_weights(cell, seed=7):
  k_y, k_c = jax.random.split(jax.random.key(seed))
  w_y = np.asarray(jax.random.normal(k_y, (B, T, H), jnp.float64))
  w_c = {name: np.asarray(jax.random.normal(k_c, (B, H), jnp.float64)) * (i + 1)
         for i, name in enumerate(carry_dict(cell.initial_carry((B,))))}
  return w_y, w_c


# associative runs linear cells only (its error on others is tested below).
CELL_DRIVERS = [(c, d) for c in CELLS for d in DRIVERS
                if not d.startswith("associative") or CELLS[c].is_linear]
# Chunking sees the options only as arrays split along time: the options that
# combine all of them (carry, lengths, mask, resets, reverse) cover it.
REMAT_OPTIONS = ("all_forward", "all_reverse")
CASES = [(c, d, o) for c, d in CELL_DRIVERS for o in OPTIONS
         if "remat" not in d or o in REMAT_OPTIONS]


def assert_grads_match_reference(jax_loss, ref_loss, point, directions=2):
  """<grad jax_loss, v> equals the reference's central difference along v.

  v are random directions over every leaf of ``point`` (params, inputs,
  carries), so any wrong gradient entry shows up; float64 keeps the central
  difference accurate to ~1e-9.
  """
  grads = jax.grad(lambda args: jax_loss(*args))(point)
  leaves, tree = jax.tree.flatten(point)
  for seed in range(directions):
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    direction = [np.asarray(jax.random.normal(k, np.shape(x), jnp.float64))
                 for k, x in zip(keys, leaves)]
    eps = 1e-6
    shifted = lambda s: jax.tree.unflatten(
        tree, [np.asarray(x) + s * eps * v for x, v in zip(leaves, direction)])
    numeric = (ref_loss(*shifted(1)) - ref_loss(*shifted(-1))) / (2 * eps)
    analytic = sum(np.sum(np.asarray(g) * v)
                   for g, v in zip(jax.tree.leaves(grads), direction))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("cell_name, driver, option", CASES)
def test_driver_matches_reference(cell_name, driver, option):
  """Values and gradients of every driver and option equal the reference."""
  cell = CELLS[cell_name]
  params, xs, carry = make_problem(cell)
  kwargs, use_carry = split_options(option)
  carry = carry if use_carry else None
  np_carry = None if carry is None else jax.tree.map(np.asarray, carry_dict(carry))

  final, ys = seqjax.run(cell, params, xs, carry, **DRIVERS[driver], **kwargs)
  ref_final, ref_ys = reference.run(cell, jax.tree.map(np.asarray, params), xs,
                                    np_carry, **kwargs)
  np.testing.assert_allclose(ys, ref_ys, rtol=1e-12, atol=1e-13)
  for name, value in carry_dict(final).items():
    np.testing.assert_allclose(value, ref_final[name], rtol=1e-12, atol=1e-13)

  # Gradients: <grad L, v> from JAX equals the reference's central difference
  # of L along random directions v, over params, inputs and initial carry.
  w_y, w_c = loss_weights(cell)

  def jax_loss(params, xs, carry):
    final, ys = seqjax.run(cell, params, xs, carry, **DRIVERS[driver], **kwargs)
    return jnp.sum(ys * w_y) + sum(jnp.sum(v * w_c[k])
                                   for k, v in carry_dict(final).items())

  def ref_loss(params, xs, carry):
    final, ys = reference.run(cell, params, xs,
                              None if carry is None else carry_dict(carry), **kwargs)
    return np.sum(ys * w_y) + sum(np.sum(v * w_c[k]) for k, v in final.items())

  assert_grads_match_reference(jax_loss, ref_loss, (params, xs, carry))


@pytest.mark.slow  # numerical differentiation; the reference-gradient tests cover the default run
@pytest.mark.parametrize("cell_name", ["lstm", "gru", "mingru"])
def test_check_grads_through_drivers(cell_name):
  cell = CELLS[cell_name]
  params, xs, carry = make_problem(cell, batch=2, steps=4)
  kwargs = dict(lengths=np.array([4, 2]), resets=RESETS[:2, :4], reverse=True)
  for method in ("scan", "associative") if cell.is_linear else ("scan",):
    f = lambda p, x, c: seqjax.run(cell, p, x, c, method=method, **kwargs)
    check_grads(f, (params, xs, carry), order=2, modes=["rev"])


@pytest.mark.parametrize("cell_name", CELLS)
def test_drivers_agree(cell_name):
  """scan == scan(unroll=k) == unroll (== associative), with every option."""
  cell = CELLS[cell_name]
  params, xs, carry = make_problem(cell)
  methods = [dict(method="scan"), dict(method="scan", unroll=2),
             dict(method="scan", unroll=T), dict(method="unroll")]
  if cell.is_linear:
    methods.append(dict(method="associative"))
  kwargs, _ = split_options("all_reverse")
  results = [seqjax.run(cell, params, xs, carry, **m, **kwargs) for m in methods]
  for other in results[1:]:
    chex.assert_trees_all_close(other, results[0], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("option", ["plain", "all_forward", "all_reverse"])
def test_time_major_equals_batch_major(option):
  cell = CELLS["lstm"]
  params, xs, carry = make_problem(cell)
  kwargs, _ = split_options(option)
  carry_bm, ys_bm = seqjax.scan(cell, params, xs, carry, **kwargs)
  tm = {k: (v.T if k in ("mask", "resets") else v) for k, v in kwargs.items()}
  carry_tm, ys_tm = seqjax.scan(cell, params, jnp.swapaxes(xs, 0, 1), carry,
                                time_major=True, **tm)
  np.testing.assert_array_equal(jnp.swapaxes(ys_tm, 0, 1), ys_bm)
  chex.assert_trees_all_equal(carry_tm, carry_bm)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell_name", ["elman_tanh", "lstm", "gru", "mingru"])
def test_lengths_final_carry_is_own_last_step(cell_name, reverse):
  """Carry of sequence b == a run over its first lengths[b] steps alone."""
  cell = CELLS[cell_name]
  params, xs, carry = make_problem(cell)
  final, ys = seqjax.scan(cell, params, xs, carry, lengths=LENGTHS, reverse=reverse)
  for b, length in enumerate(LENGTHS):
    own_carry = jax.tree.map(lambda c: c[b:b + 1], carry)
    alone_final, alone_ys = seqjax.scan(cell, params, xs[b:b + 1, :length],
                                        own_carry, reverse=reverse)
    chex.assert_trees_all_close(jax.tree.map(lambda c: c[b:b + 1], final),
                                alone_final, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(ys[b, :length], alone_ys[0], rtol=1e-13, atol=1e-14)
    assert np.all(np.asarray(ys[b, length:]) == 0.0)  # exactly zero


def test_mask_holds_carry_and_emits_zeros():
  cell = CELLS["gru"]
  params, xs, carry = make_problem(cell)
  mask = np.ones((B, T), bool)
  mask[:, 2] = False  # an interior gap
  final, ys = seqjax.scan(cell, params, xs, carry, mask=mask)
  assert np.all(np.asarray(ys[:, 2]) == 0.0)
  # Skipping step 2 is the same as deleting it from the sequence.
  kept = np.delete(np.asarray(xs), 2, axis=1)
  final_kept, ys_kept = seqjax.scan(cell, params, kept, carry)
  np.testing.assert_allclose(final, final_kept, rtol=1e-13)
  np.testing.assert_allclose(np.delete(np.asarray(ys), 2, axis=1), ys_kept, rtol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_resets_equal_separate_episodes(reverse):
  """A row of packed episodes == each episode run alone from a zero carry."""
  cell = CELLS["lstm"]
  params, xs, carry = make_problem(cell, batch=1, steps=7)
  resets = np.zeros((1, 7), bool)
  resets[0, [3, 5]] = True  # episodes [0, 3), [3, 5), [5, 7)
  final, ys = seqjax.scan(cell, params, xs, carry, resets=resets, reverse=reverse)
  episodes = [(0, 3), (3, 5), (5, 7)]
  if reverse:  # processed last-to-first
    episodes = episodes[::-1]
  for i, (start, stop) in enumerate(episodes):
    own = carry if i == 0 else None  # only the first processed gets the carry
    ep_final, ep_ys = seqjax.scan(cell, params, xs[:, start:stop], own, reverse=reverse)
    np.testing.assert_allclose(ys[:, start:stop], ep_ys, rtol=1e-13, atol=1e-14)
  chex.assert_trees_all_close(final, ep_final, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cell_name", ["elman_tanh", "lstm", "gru", "mingru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_causality_by_gradient(cell_name, reverse):
  """d y_t / d x_s == 0 exactly for s > t (s < t when reversed), within lengths."""
  cell = CELLS[cell_name]
  params, xs, _ = make_problem(cell)
  method = "associative" if cell.is_linear else "scan"
  f = lambda x: seqjax.run(cell, params, x, method=method, lengths=LENGTHS,
                           reverse=reverse)[1]
  jac = np.asarray(jax.jacrev(f)(xs))  # [B, T, H, B, T, D]
  for b, length in enumerate(LENGTHS):
    dep = np.abs(jac[b, :, :, b, :, :]).sum(axis=(1, 3))  # [T(out), T(in)]
    t_out, t_in = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    future = t_in < t_out if reverse else t_in > t_out
    assert np.all(dep[future] == 0.0)
    assert np.all(dep[:, length:] == 0.0)  # padding influences nothing
    within = (t_out < length) & (t_in < length) & ~future
    assert np.all(dep[within] > 0.0)  # and everything else does
    others = np.delete(np.abs(jac[b]), b, axis=2)  # no cross-batch leaks
    assert np.all(others == 0.0)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional_is_forward_and_reversed(merge):
  cell = CELLS["gru"]
  params_f, xs, carry_f = make_problem(cell, seed=1)
  params_b, _, carry_b = make_problem(cell, seed=2)
  params = {"forward": params_f, "backward": params_b}
  carry = seqjax.BidirectionalCarry(carry_f, carry_b)
  kwargs = dict(lengths=LENGTHS, mask=MASK, resets=RESETS)
  final, ys = seqjax.bidirectional(cell, params, xs, carry, merge=merge, **kwargs)
  ref_f_final, ref_f = reference.run(cell, params_f, xs, {"h": carry_f}, **kwargs)
  ref_b_final, ref_b = reference.run(cell, params_b, xs, {"h": carry_b},
                                     reverse=True, **kwargs)
  expected = np.concatenate([ref_f, ref_b], -1) if merge == "concat" else ref_f + ref_b
  np.testing.assert_allclose(ys, expected, rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(final.forward, ref_f_final["h"], rtol=1e-12)
  np.testing.assert_allclose(final.backward, ref_b_final["h"], rtol=1e-12)

  w_y = np.asarray(jax.random.normal(jax.random.key(9), ys.shape, jnp.float64))
  w_c = np.asarray(jax.random.normal(jax.random.key(10), (2, B, H), jnp.float64))

  def jax_loss(params, xs, carry):
    final, ys = seqjax.bidirectional(cell, params, xs, carry, merge=merge, **kwargs)
    return jnp.sum(ys * w_y) + jnp.sum(final.forward * w_c[0]) + jnp.sum(
        final.backward * w_c[1])

  def ref_loss(params, xs, carry):
    f_final, y_f = reference.run(cell, params["forward"], xs, {"h": carry.forward},
                                 **kwargs)
    b_final, y_b = reference.run(cell, params["backward"], xs,
                                 {"h": carry.backward}, reverse=True, **kwargs)
    ys = np.concatenate([y_f, y_b], -1) if merge == "concat" else y_f + y_b
    return (np.sum(ys * w_y) + np.sum(f_final["h"] * w_c[0])
            + np.sum(b_final["h"] * w_c[1]))

  assert_grads_match_reference(jax_loss, ref_loss, (params, xs, carry))


def _stack_problem(bidirectional=False, layers=3):
  layer_cells = [cells.LSTM(H), cells.GRU(H), cells.Elman(H)][:layers]
  keys = jax.random.split(jax.random.key(5), layers * 2)
  params, size = [], D
  for i, cell in enumerate(layer_cells):
    if bidirectional:
      params.append({"forward": cell.init(keys[2 * i], size, jnp.float64),
                     "backward": cell.init(keys[2 * i + 1], size, jnp.float64)})
      size = 2 * H
    else:
      params.append(cell.init(keys[2 * i], size, jnp.float64))
      size = H
  xs = jax.random.normal(jax.random.key(6), (B, T, D), jnp.float64)
  return layer_cells, params, xs


# Two of the six combinations in the default run (numerical gradients take
# 6-10 s each), all six in the slow run.
@pytest.mark.parametrize("bidirectional, reverse, residual", [
    (False, False, False), (True, False, True),
    *(pytest.param(*c, marks=pytest.mark.slow)
      for c in [(False, True, False), (True, False, False), (False, False, True),
                (False, True, True)])])
def test_stacked_is_layer_composition(bidirectional, reverse, residual):
  layer_cells, params, xs = _stack_problem(bidirectional)
  kwargs = dict(lengths=LENGTHS, mask=MASK)
  carries, ys = seqjax.stacked(layer_cells, params, xs, bidirectional=bidirectional,
                               residual=residual, reverse=reverse, **kwargs)

  def ref_stack(params, xs):
    x = np.asarray(xs)
    for layer, (cell, p) in enumerate(zip(layer_cells, params)):
      if bidirectional:
        _, y_f = reference.run(cell, p["forward"], x, **kwargs)
        _, y_b = reference.run(cell, p["backward"], x, reverse=True, **kwargs)
        y = np.concatenate([y_f, y_b], -1)
      else:
        y = reference.run(cell, p, x, reverse=reverse, **kwargs)[1]
      x = y + x if residual and layer > 0 else y
    return x

  np.testing.assert_allclose(ys, ref_stack(params, xs), rtol=1e-12, atol=1e-13)
  w_y = np.asarray(jax.random.normal(jax.random.key(11), ys.shape, jnp.float64))
  jax_loss = lambda p, x: jnp.sum(w_y * seqjax.stacked(
      layer_cells, p, x, bidirectional=bidirectional, residual=residual,
      reverse=reverse, **kwargs)[1])
  ref_loss = lambda p, x: np.sum(w_y * ref_stack(p, x))
  assert_grads_match_reference(jax_loss, ref_loss, (params, xs))
  assert len(carries) == 3
  assert isinstance(carries[0], seqjax.BidirectionalCarry if bidirectional
                    else cells.LSTMCarry)
  assert np.all(np.asarray(ys[2, 1:]) == 0.0)  # padding stays zero through layers


def test_stacked_dropout():
  layer_cells, params, xs = _stack_problem()
  run = lambda **kw: seqjax.stacked(layer_cells, params, xs, **kw)[1]
  plain = run()
  np.testing.assert_array_equal(run(dropout_rate=0.5), plain)  # no key: eval
  key = jax.random.key(0)
  dropped = run(dropout_rate=0.5, dropout_key=key)
  np.testing.assert_array_equal(dropped, run(dropout_rate=0.5, dropout_key=key))
  assert not np.allclose(dropped, plain)
  assert not np.allclose(dropped, run(dropout_rate=0.5, dropout_key=jax.random.key(1)))
  # Only between layers: a one-layer stack has nothing to drop.
  one = lambda **kw: seqjax.stacked(layer_cells[:1], params[:1], xs, **kw)[1]
  np.testing.assert_array_equal(one(dropout_rate=0.5, dropout_key=key), one())


def test_stacked_dropout_masks_between_layers():
  """Layer 2 sees layer 1's outputs zeroed where the dropout mask is off."""
  layer_cells, params, xs = _stack_problem(layers=2)
  key = jax.random.key(3)
  _, ys = seqjax.stacked(layer_cells, params, xs, dropout_rate=0.5, dropout_key=key)
  _, y0 = seqjax.scan(layer_cells[0], params[0], xs)
  keep = jax.random.bernoulli(jax.random.split(key, 2)[0], 0.5, y0.shape)
  expected = seqjax.scan(layer_cells[1], params[1], jnp.where(keep, y0 / 0.5, 0.0))[1]
  np.testing.assert_allclose(ys, expected, rtol=1e-13)


@pytest.mark.parametrize("time_major", [False, True])
def test_stacked_variational_dropout_shares_one_mask_over_time(time_major):
  """Layer 2 sees layer 1's outputs times one [B, 1, H] mask (Gal & Ghahramani)."""
  layer_cells, params, xs = _stack_problem(layers=2)
  if time_major:
    xs = jnp.swapaxes(xs, 0, 1)
  key = jax.random.key(3)
  _, ys = seqjax.stacked(layer_cells, params, xs, dropout_rate=0.5, variational=True,
                         dropout_key=key, time_major=time_major)
  _, y0 = seqjax.scan(layer_cells[0], params[0], xs, time_major=time_major)
  shape = (1, B, H) if time_major else (B, 1, H)
  keep = jax.random.bernoulli(jax.random.split(key, 2)[0], 0.5, shape)
  assert 0 < int(keep.sum()) < keep.size          # the mask drops some units, not all
  expected = seqjax.scan(layer_cells[1], params[1], jnp.where(keep, y0 / 0.5, 0.0),
                         time_major=time_major)[1]
  np.testing.assert_allclose(ys, expected, rtol=1e-13)
  # Per element instead, the same key gives another network.
  per_element = seqjax.stacked(layer_cells, params, xs, dropout_rate=0.5, dropout_key=key,
                               time_major=time_major)[1]
  assert not np.allclose(per_element, ys)


def test_stacked_weight_drop_masks_the_recurrent_matrices():
  layer_cells, params, xs = _stack_problem(layers=2)
  key, rate = jax.random.key(8), 0.4
  run = lambda p, **kw: seqjax.stacked(layer_cells, p, xs, weight_drop=rate, **kw)[1]
  np.testing.assert_array_equal(run(params), seqjax.stacked(layer_cells, params, xs)[1])
  dropped = run(params, dropout_key=key)
  # Each layer runs with w_h * mask / (1 - rate), one mask for every row and step.
  keys = jax.random.split(jax.random.fold_in(key, 1), 2)
  masked = []
  for k, cell, p in zip(keys, layer_cells, params):
    keep = jax.random.bernoulli(k, 1 - rate, p["w_h"].shape)
    masked.append(dict(p, w_h=jnp.where(keep, p["w_h"] / (1 - rate), 0.0)))
  y = xs
  for cell, p in zip(layer_cells, masked):
    y = seqjax.scan(cell, p, y)[1]
  np.testing.assert_allclose(dropped, y, rtol=1e-13)
  # The dropped weights get no gradient; the others do; w_x is never dropped.
  grads = jax.grad(lambda p: jnp.sum(run(p, dropout_key=key) ** 2))(params)
  keep0 = jax.random.bernoulli(keys[0], 1 - rate, params[0]["w_h"].shape)
  assert np.all(np.asarray(grads[0]["w_h"])[~np.asarray(keep0)] == 0)
  assert np.all(np.asarray(grads[0]["w_h"])[np.asarray(keep0)] != 0)
  assert np.all(np.asarray(grads[0]["w_x"]) != 0)
  # Output dropout keeps its masks when weight drop is added.
  both = run(params, dropout_key=key, dropout_rate=0.5)
  only_output = seqjax.stacked(layer_cells, masked, xs, dropout_rate=0.5, dropout_key=key)[1]
  np.testing.assert_allclose(both, only_output, rtol=1e-13)


def test_weight_drop_needs_a_recurrent_matrix():
  cell = cells.MinGRU(H)
  params = [cell.init(jax.random.key(0), D)]
  with pytest.raises(ValueError, match="weight_drop needs cells with a recurrent matrix "
                                       "w_h; MinGRU has none"):
    seqjax.stacked([cell], params, jnp.ones((B, T, D)), weight_drop=0.5,
                   dropout_key=jax.random.key(1))


# --------------------------------------------------------------------------
# Rematerialisation: chunked runs of a whole model, loss included.


def _chunk_model(cell):
  """A small model run over time-major chunks: cell, read-out, per-step loss."""
  def fn(params, carry, chunk):
    xs, targets = chunk  # [K, B, D], [K, B]
    carry, ys = seqjax.scan(cell, params["cell"], xs, carry, time_major=True)
    logits = ys @ params["out"]  # [K, B, 5]
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return carry, jax.nn.logsumexp(logits, axis=-1) - chosen  # [K, B]
  return fn


@pytest.mark.parametrize("chunk, remat", [(1, True), (4, True), (7, True), (4, False)])
@pytest.mark.parametrize("cell_name", ["lstm", "gru", "elman_tanh"])
def test_chunked_equals_whole_sequence(cell_name, chunk, remat):
  """Chunks (whole or with a shorter last one) give the unchunked values and gradients."""
  cell = CELLS[cell_name]
  cell_params, xs, carry = make_problem(cell)
  params = {"cell": cell_params,
            "out": jax.random.normal(jax.random.key(3), (H, 5), jnp.float64)}
  xs = jnp.swapaxes(xs, 0, 1)  # [T, B, D]
  targets = jax.random.randint(jax.random.key(4), (T, B), 0, 5)
  fn = _chunk_model(cell)

  def loss(params, xs, carry, chunked):
    if chunked:
      final, losses = seqjax.chunked(functools.partial(fn, params), carry, (xs, targets),
                                     chunk=chunk, remat=remat)
    else:
      final, losses = fn(params, carry, (xs, targets))
    return jnp.sum(losses * jnp.arange(1, T + 1)[:, None]) + sum(
        jnp.sum(c) for c in jax.tree.leaves(final))

  whole, chunked = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                            static_argnums=3).__call__(params, xs, carry, c)
                    for c in (False, True))
  chex.assert_trees_all_close(chunked, whole, rtol=1e-12, atol=1e-13)


def test_chunked_carry_takes_the_models_dtype():
  """A float32 initial carry in a float64 model is promoted, as the drivers promote it."""
  cell = CELLS["lstm"]
  params, xs, _ = make_problem(cell)  # float64
  fn = lambda carry, x: seqjax.scan(cell, params, x, carry, time_major=True)
  carry, ys = seqjax.chunked(fn, cell.initial_carry((B,), jnp.float32),
                             jnp.swapaxes(xs, 0, 1), chunk=4)
  assert carry.h.dtype == carry.c.dtype == ys.dtype == jnp.float64


def test_remat_shrinks_the_memory_plan():
  """XLA's buffer plan for the gradient keeps one chunk's activations, not every step's."""
  cell = cells.LSTM(64)
  params = cell.init(jax.random.key(0), 16)
  xs = jnp.ones((2048, 4, 16), jnp.float32)

  def temp_bytes(remat):
    def loss(params, xs):
      _, ys = seqjax.scan(cell, params, xs, time_major=True, remat=remat)
      return jnp.sum(ys ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  # Every step's saved activations: 7 [4, 64] float32 arrays a step, ~14.7 MB.
  # With chunks of 64 steps: 32 saved carries and one chunk, plus ys and its
  # cotangent (2 MB each), which are kept at every step either way.
  full, remat = temp_bytes(None), temp_bytes(64)
  assert full > 2048 * 7 * 4 * 64 * 4
  assert remat < full / 4, (full, remat)


@pytest.mark.parametrize("driver", ["scan", "unroll", "associative"])
def test_jit_equals_eager(driver):
  cell = CELLS["mingru"] if driver == "associative" else CELLS["lstm"]
  params, xs, carry = make_problem(cell)
  run = lambda p, x, c, lengths, mask, resets: seqjax.run(
      cell, p, x, c, method=driver, lengths=lengths, mask=mask, resets=resets,
      reverse=True)
  eager = run(params, xs, carry, LENGTHS, MASK, RESETS)
  jitted = jax.jit(run)(params, xs, carry, LENGTHS, MASK, RESETS)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-13, atol=1e-14)


def test_composites_under_jit_and_time_major():
  layer_cells, params, xs = _stack_problem(bidirectional=True)
  kwargs = dict(lengths=LENGTHS, mask=MASK, resets=RESETS)
  stack = lambda p, x, time_major=False, **kw: seqjax.stacked(
      layer_cells, p, x, bidirectional=True, time_major=time_major, **kw)
  eager = stack(params, xs, **kwargs)
  jitted = jax.jit(stack)(params, xs, **kwargs)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-13, atol=1e-14)
  tm_kwargs = {k: (v if k == "lengths" else v.T) for k, v in kwargs.items()}
  tm_carries, tm_ys = jax.jit(stack, static_argnames="time_major")(
      params, jnp.swapaxes(xs, 0, 1), time_major=True, **tm_kwargs)
  np.testing.assert_allclose(jnp.swapaxes(tm_ys, 0, 1), eager[1], rtol=1e-13,
                             atol=1e-14)
  chex.assert_trees_all_close(tm_carries, eager[0], rtol=1e-13, atol=1e-14)


def test_carry_dtype_is_promoted_with_the_model():
  cell = CELLS["lstm"]
  params, xs, carry = make_problem(cell)  # float64 model
  carry32 = jax.tree.map(lambda c: c.astype(jnp.float32), carry)
  final, ys = seqjax.scan(cell, params, xs, carry32)
  assert ys.dtype == jnp.float64 and final.h.dtype == jnp.float64
  expected = seqjax.scan(cell, params, xs, jax.tree.map(
      lambda c: c.astype(jnp.float64), carry32))
  chex.assert_trees_all_equal((final, ys), expected)


def test_lengths_out_of_range():
  cell = CELLS["gru"]
  params, xs, _ = make_problem(cell)
  with pytest.raises(ValueError, match=r"lengths must be in \[0, T\] = \[0, 6\], got \[7, 2, -1\]"):
    seqjax.scan(cell, params, xs, lengths=np.array([7, 2, -1]))
  # Under jit the values are unknown at trace time: they are clipped to [0, T].
  f = jax.jit(lambda lengths: seqjax.scan(cell, params, xs, lengths=lengths,
                                          reverse=True))
  chex.assert_trees_all_equal(f(np.array([9, 2, -3])), f(np.array([6, 2, 0])))
  final, ys = f(np.array([9, 2, -3]))
  assert np.all(np.asarray(ys[2]) == 0.0) and np.all(np.asarray(final[2]) == 0.0)


def test_core_imports_without_flax():
  code = ("import sys, seqjax, seqjax.cells, seqjax.recurrence; "
          "assert not {'flax', 'torch', 'keras'} & set(sys.modules), sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_jit_static_cell_and_no_recompilation():
  """Cells are static arguments; a second call with equal shapes reuses code."""
  traces = []

  @jax.jit
  def apply(params, xs, lengths):
    traces.append(1)
    return seqjax.scan(cells.LSTM(H), params, xs, lengths=lengths)

  @chex.assert_max_traces(n=1)
  def scan_fn(cell, params, xs):
    return seqjax.scan(cell, params, xs)

  jitted = jax.jit(scan_fn, static_argnums=0)
  params, xs, _ = make_problem(CELLS["lstm"])
  for seed in range(3):
    xs_new = xs + seed
    apply(params, xs_new, LENGTHS - (seed % 2))
    jitted(cells.LSTM(H), params, xs_new)  # an equal, new cell object
  assert len(traces) == 1


def test_dtype_flows_through_drivers():
  for dtype in (jnp.float32, jnp.bfloat16):
    cell = CELLS["gru"]
    params, xs, _ = make_problem(cell, dtype=dtype)
    carry, ys = seqjax.scan(cell, params, xs, lengths=LENGTHS)
    assert ys.dtype == dtype and carry.dtype == dtype
    ref = seqjax.scan(cell, jax.tree.map(lambda a: a.astype(jnp.float64), params),
                      xs.astype(jnp.float64), lengths=LENGTHS)[1]
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(ys.astype(jnp.float64), ref, atol=tol)


@pytest.mark.parametrize("remat", [None, 4])
@pytest.mark.parametrize("cell_name", ["lstm", "gru", "elman_tanh"])
def test_gradients_keep_the_parameters_dtype(cell_name, remat):
  """float32 weights with float64 inputs: float32 weight gradients, float64 input ones."""
  cell = CELLS[cell_name]
  params, xs, _ = make_problem(cell, dtype=jnp.float32)
  xs = xs.astype(jnp.float64)
  loss = lambda p, x: jnp.sum(seqjax.scan(cell, p, x, remat=remat)[1] ** 2)
  grads, dxs = jax.grad(loss, argnums=(0, 1))(params, xs)
  assert {k: g.dtype for k, g in grads.items()} == {k: jnp.float32 for k in params}
  assert dxs.dtype == jnp.float64


# --------------------------------------------------------------------------
# Errors at the boundary: one clear ValueError at trace time, also under jit.


def _error_cases():
  lstm = CELLS["lstm"]
  params, xs, carry = make_problem(lstm)
  gru_params = make_problem(CELLS["gru"])[0]
  return {
      "rank": (lambda: seqjax.scan(lstm, params, xs[0]),
               r"xs must be \[B, T, D\], got shape \(6, 3\)"),
      "time_major_rank": (lambda: seqjax.scan(lstm, params, xs[0], time_major=True),
                          r"xs must be \[T, B, D\]"),
      "features": (lambda: seqjax.scan(lstm, params, xs[..., :2]),
                   r"params\['w_x'\] .* input size 2 must have shape \(2, 16\), got \(3, 16\)"),
      "params_keys": (lambda: seqjax.scan(lstm, gru_params, xs),
                      r"must be a dict with keys \['b', 'w_h', 'w_x'\], got \['b', 'b_hn'"),
      "hidden": (lambda: seqjax.scan(cells.LSTM(5), params, xs),
                 r"params\['w_x'\] for LSTM\(hidden_size=5\) .* must have shape \(3, 20\)"),
      "carry_batch": (lambda: seqjax.scan(lstm, params, xs, jax.tree.map(lambda c: c[:2], carry)),
                      r"carry for LSTM with batch 3 must look like LSTMCarry\(h=\(3, 4\), c=\(3, 4\)\), got LSTMCarry\(h=\(2, 4\)"),
      "carry_structure": (lambda: seqjax.scan(lstm, params, xs, carry.h),
                          r"carry for LSTM .* got \(3, 4\)"),
      "lengths_shape": (lambda: seqjax.scan(lstm, params, xs, lengths=np.array([1, 2])),
                        r"lengths must have shape \(B,\) = \(3,\), got \(2,\)"),
      "lengths_dtype": (lambda: seqjax.scan(lstm, params, xs, lengths=np.array([1.0, 2, 3])),
                        r"lengths must be an integer array, got dtype float64"),
      "mask_shape": (lambda: seqjax.scan(lstm, params, xs, mask=MASK.T),
                     r"mask must have shape \(3, 6\) .* got \(6, 3\)"),
      "mask_dtype": (lambda: seqjax.scan(lstm, params, xs, mask=MASK.astype(np.float32)),
                     r"mask must be bool, got dtype float32"),
      "resets_shape": (lambda: seqjax.scan(lstm, params, xs, resets=RESETS[:, :2]),
                       r"resets must have shape \(3, 6\)"),
      "associative_nonlinear": (lambda: seqjax.run(lstm, params, xs, method="associative"),
                                r"method='associative' needs a linear cell .* LSTM is not linear"),
      "method": (lambda: seqjax.run(lstm, params, xs, method="fast"),
                 r"method must be one of \('scan', 'unroll', 'associative'\), got 'fast'"),
      "int_inputs": (lambda: seqjax.scan(lstm, params, np.ones((3, 6, 3), np.int32)),
                     r"xs must be a float array, got dtype int32"),
      "empty": (lambda: seqjax.scan(lstm, params, xs[:, :0]),
                r"at least one time step"),
      "bidirectional_params": (lambda: seqjax.bidirectional(lstm, params, xs),
                               r"bidirectional params must be a dict with keys \['backward', 'forward'\]"),
      "merge": (lambda: seqjax.bidirectional(lstm, {"forward": params, "backward": params}, xs, merge="mul"),
                r"merge must be 'concat' or 'sum', got 'mul'"),
      "stacked_count": (lambda: seqjax.stacked([lstm, lstm], [params], xs),
                        r"stacked got 2 cells but 1 params"),
      "stacked_residual": (lambda: seqjax.stacked(
          [lstm, cells.LSTM(2)], [params, cells.LSTM(2).init(jax.random.key(0), H)], xs,
          residual=True), r"residual layer 1 needs equal input and output sizes, got input 4 and output 2"),
      "dropout_rate": (lambda: seqjax.stacked([lstm], [params], xs, dropout_rate=1.0),
                       r"dropout_rate must be in \[0, 1\), got 1.0"),
      "weight_drop": (lambda: seqjax.stacked([lstm], [params], xs, weight_drop=-0.1),
                      r"weight_drop must be in \[0, 1\), got -0.1"),
      "not_a_cell": (lambda: seqjax.scan(lambda c, x: (c, x), params, xs),
                     r"cell must be a seqjax cell"),
      "unroll_zero": (lambda: seqjax.scan(lstm, params, xs, unroll=0),
                      r"unroll must be a positive int \(steps per loop iteration\), got 0"),
      "unroll_bool": (lambda: seqjax.scan(lstm, params, xs, unroll=True),
                      r"unroll must be a positive int .* got True; for a fully unrolled loop "
                      r"use method='unroll'"),
      "unroll_float": (lambda: seqjax.run(lstm, params, xs, method="unroll", unroll=2.5),
                       r"unroll must be a positive int .* got 2.5"),
      "remat_zero": (lambda: seqjax.scan(lstm, params, xs, remat=0),
                     r"remat must be None or a positive int .* got 0"),
      "remat_bool": (lambda: seqjax.run(lstm, params, xs, remat=True),
                     r"remat must be None or a positive int .* got True"),
      "remat_str": (lambda: seqjax.run(lstm, params, xs, remat="64"),
                    r"remat must be None or a positive int .* got '64'"),
      "chunk_zero": (lambda: seqjax.chunked(lambda c, x: (c, x), None, xs, chunk=0),
                     r"chunk must be a positive int \(steps per chunk\), got 0"),
      "chunked_axes": (lambda: seqjax.chunked(lambda c, x: (c, x), None, (xs, xs[:2]),
                                              chunk=2),
                       r"every array in xs must have the same leading \(time\) axis, got "
                       r"shapes \(\(3, 6, 3\), \(2, 6, 3\)\)"),
  }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_bad_input_is_a_clear_error(case):
  call, message = _error_cases()[case]
  with pytest.raises(ValueError, match=message):
    call()


def test_errors_are_raised_at_trace_time_under_jit():
  params, xs, _ = make_problem(CELLS["gru"])
  f = jax.jit(lambda p, x, lengths: seqjax.scan(CELLS["gru"], p, x, lengths=lengths))
  with pytest.raises(ValueError, match=r"lengths must have shape \(B,\) = \(3,\)"):
    f(params, xs, np.array([1, 2]))
  with pytest.raises(ValueError, match=r"xs must be \[B, T, D\]"):
    f(params, xs[0], np.array([1, 2]))
