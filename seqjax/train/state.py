"""The train state: everything a run needs to continue exactly where it stopped.

A :class:`TrainState` is a pytree: Orbax saves and restores it, and ``pmap``
maps over it. Besides parameters and optimiser state it holds the RNG key, the
recurrent carry that truncated BPTT keeps across windows, and the position of
the data iterator, so a resumed run draws the same batches and the same dropout
masks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Parameters, optimiser state, RNG, carry and data position.

  Attributes:
    step: number of optimiser updates applied so far (int32 scalar).
    params: the model's parameters.
    opt_state: the optimiser's state.
    rng: a raw ``uint32[2]`` key; step ``s`` uses ``fold_in(rng, s)``.
    carry: the recurrent carry kept across truncated-BPTT windows, [B, ...]
      leaves (batch rows of this process); ``None`` when the data has no
      streams.
    data_position: index of the next training batch (int32 scalar).
    tx: the optax transformation (static; not saved).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  carry: Any
  data_position: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params, tx, rng, carry=None) -> "TrainState":
    """A fresh state at step 0."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, carry=carry, data_position=jnp.zeros((), jnp.int32), tx=tx)

  def apply_gradients(self, grads) -> "TrainState":
    """One optimiser update; advances ``step``."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)

  def saveable(self) -> dict:
    """The state as a plain dict of arrays (what checkpoints hold)."""
    return flax.serialization.to_state_dict(self)

  def restored(self, tree: dict) -> "TrainState":
    """This state with the values of a dict from :meth:`saveable`."""
    return flax.serialization.from_state_dict(self, tree)
