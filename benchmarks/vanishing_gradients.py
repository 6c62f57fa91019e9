"""Vanishing gradients, pictured: how far back a loss at the last step reaches.

    python benchmarks/vanishing_gradients.py          # ~1 minute on 2 CPU cores
    python benchmarks/vanishing_gradients.py --quick --out /tmp/vg.json

1. ||dL_T / dh_t|| against t for Elman, LSTM and GRU (H=64, T=100, inputs of
   the adding problem), at initialisation and after a short training run on
   the adding problem (300 Adam steps). L_T reads only the last hidden state,
   so the curve shows how much of the loss's gradient reaches step t. The
   gradient with respect to h_t is taken by adding a zero perturbation to the
   carry after step t and differentiating with respect to it.
2. The scalar recurrence h_t = tanh(w h_{t-1}), h_0 = 0.5, after T=50 steps,
   against w: the state h_T and the gradient dh_T/dh_0 (log scale). Below
   |w| = 1 the state and the gradient vanish; above it the state saturates at
   a fixed point and the gradient vanishes again; only near |w| = 1 does
   anything survive 50 steps.

Writes JSON and two PNGs.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import cells
from seqjax.data import synthetic

CELLS = {"elman": cells.Elman, "lstm": cells.LSTM, "gru": cells.GRU}


def _with_h(carry, h):
  return carry._replace(h=h) if hasattr(carry, "h") else h


def _h(carry):
  return getattr(carry, "h", carry)


def hidden_grad_norms(cell, params, xs):
  """||dL_T/dh_t|| for every t, averaged over the batch ([T])."""
  xp = jnp.swapaxes(cell.project(params["cell"], xs), 0, 1)  # [T, B, G]
  batch = xs.shape[0]
  v = jax.random.normal(jax.random.key(7), (cell.hidden_size,)) / jnp.sqrt(cell.hidden_size)

  def loss(eps):  # eps [T, B, H]: zero perturbations added to h after each step
    def body(carry, inputs):
      xp_t, eps_t = inputs
      carry, _ = cell.step(params["cell"], carry, xp_t)
      return _with_h(carry, _h(carry) + eps_t), None
    carry, _ = jax.lax.scan(body, cell.initial_carry((batch,)), (xp, eps))
    return jnp.sum(_h(carry) @ v) / batch

  eps = jnp.zeros((xs.shape[1], batch, cell.hidden_size))
  grads = jax.grad(loss)(eps)  # [T, B, H]
  return jnp.mean(jnp.linalg.norm(grads, axis=-1), axis=1)


def train_adding(cell, params, steps, batch, seq_len, seed=0):
  """A short Adam run on the adding problem: a linear read-out of the hidden
  state after all T steps (the padding past each length is zeros)."""
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss(params, xs, targets):
    xp = jnp.swapaxes(cell.project(params["cell"], xs), 0, 1)
    carry, _ = jax.lax.scan(lambda c, x: cell.step(params["cell"], c, x),
                            cell.initial_carry((xs.shape[0],)), xp)
    pred = _h(carry) @ params["out"]
    return jnp.mean((pred - targets) ** 2)

  @jax.jit
  def step(params, opt_state, xs, targets):
    value, grads = jax.value_and_grad(loss)(params, xs, targets)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  for i in range(steps):
    b = synthetic.adding_batch(np.random.default_rng([seed, i]), batch, seq_len)
    params, opt_state, value = step(params, opt_state, b["inputs"], b["targets"])
  return params, float(value)


def scalar_recurrence(ws, steps, h0=0.5):
  def h_t(w, h):
    return jax.lax.fori_loop(0, steps, lambda _, h: jnp.tanh(w * h), h)
  state = jax.vmap(lambda w: h_t(w, h0))(ws)
  grad = jax.vmap(jax.grad(lambda h, w: h_t(w, h)), in_axes=(None, 0))(h0, ws)
  return state, grad


def plot(curves, scalar, losses, steps, folder):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  titles = {"init": "at initialisation", "trained": f"after {steps} Adam steps (adding)"}
  for ax, stage in zip(axes, ("init", "trained")):
    for name, norms in curves[stage].items():
      label = name.upper() + (f" (MSE {losses[name]:.3f})" if stage == "trained" else "")
      ax.plot(np.arange(1, len(norms) + 1), np.maximum(norms, 1e-30), label=label)
    ax.set(yscale="log", xlabel="step t", title=f"||dL_T / dh_t||, {titles[stage]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("gradient norm (batch mean)")
  fig.tight_layout()
  common.save_figure(fig, folder / "vanishing_gradients.png")

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot(scalar["w"], scalar["h_T"])
  ax1.set(xlabel="w", ylabel="h_T", title=f"h_t = tanh(w h_(t-1)), T={scalar['T']}")
  ax2.plot(scalar["w"], np.maximum(np.abs(scalar["dh_T_dh_0"]), 1e-30))
  ax2.set(xlabel="w", ylabel="|dh_T / dh_0|", yscale="log", title="its gradient")
  for ax in (ax1, ax2):
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  common.save_figure(fig, folder / "scalar_recurrence.png")
  print(f"wrote {folder / 'vanishing_gradients.png'} and {folder / 'scalar_recurrence.png'}")


def main(argv=None):
  parser = common.arguments(__doc__.splitlines()[0], "vanishing_gradients")
  args = parser.parse_args(argv)
  hidden, seq_len, batch, steps, scalar_t = (8, 12, 4, 3, 10) if args.quick else (64, 100, 32, 300, 50)
  probe = synthetic.adding_batch(np.random.default_rng(123), batch, seq_len)["inputs"]
  curves, losses = {"init": {}, "trained": {}}, {}
  for name, make in CELLS.items():
    cell = make(hidden)
    k_c, k_o = jax.random.split(jax.random.key(0))
    params = {"cell": cell.init(k_c, 2), "out": jax.random.normal(k_o, (hidden,)) * 0.1}
    curves["init"][name] = np.asarray(hidden_grad_norms(cell, params, probe))
    params, losses[name] = train_adding(cell, params, steps, batch, seq_len)
    curves["trained"][name] = np.asarray(hidden_grad_norms(cell, params, probe))
    ratio = curves["trained"][name][0] / curves["trained"][name][-1]
    print(f"{name}: ||dL/dh_1|| / ||dL/dh_T|| after training = {ratio:.3g} "
          f"(adding MSE {losses[name]:.4f})", flush=True)
  ws = np.linspace(-3, 3, 601)
  state, grad = scalar_recurrence(jnp.asarray(ws), scalar_t)
  scalar = {"w": ws.tolist(), "h_T": np.asarray(state).tolist(),
            "dh_T_dh_0": np.asarray(grad).tolist(), "T": scalar_t, "h_0": 0.5}
  results = [dict(cell=name, stage=stage, grad_norm_by_step=curves[stage][name].tolist())
             for stage in curves for name in curves[stage]]
  results.append(dict(scalar=scalar, train_loss=losses))
  config = dict(H=hidden, T=seq_len, B=batch, train_steps=steps)
  common.write(args.out, "vanishing_gradients", config, results)
  plot(curves, scalar, losses, steps, args.plots or args.out.parent)


if __name__ == "__main__":
  main()
