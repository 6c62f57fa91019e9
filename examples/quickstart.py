"""Quickstart: train an LSTM on the adding problem, with variable lengths.

    python examples/quickstart.py            # ~1 minute on 2 CPU cores
    python examples/quickstart.py --steps 50 --seq-len 20   # a smoke run

The adding problem (Hochreiter & Schmidhuber 1997): each step carries a random
value in [0, 1] and a marker bit; exactly two steps are marked, and the target
is the sum of their values. Predicting the mean (1.0) scores MSE ~0.167; a model
must remember the first marked value across the sequence to do better. Here
every sequence also has its own length, so the padding must not leak into the
answer: the final carry of each sequence is read at its own last step.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import seqjax


def adding_batch(key, batch: int, seq_len: int):
  """Inputs [B, T, 2] (value, marker), lengths [B], targets [B]."""
  k_len, k_val, k_first, k_second = jax.random.split(key, 4)
  lengths = jax.random.randint(k_len, (batch,), seq_len // 2, seq_len + 1)
  values = jax.random.uniform(k_val, (batch, seq_len))
  # One marker in the first half of each sequence, one in the second half.
  half = lengths // 2
  first = (jax.random.uniform(k_first, (batch,)) * half).astype(jnp.int32)
  second = half + (jax.random.uniform(k_second, (batch,)) * (lengths - half)).astype(jnp.int32)
  steps = jnp.arange(seq_len)[None, :]
  markers = (steps == first[:, None]) | (steps == second[:, None])
  values = jnp.where(steps < lengths[:, None], values, 0.0)  # padding
  xs = jnp.stack([values, markers.astype(jnp.float32)], axis=-1)
  targets = jnp.sum(jnp.where(markers, values, 0.0), axis=1)
  return xs, lengths, targets


class Adder(nn.Module):
  """LSTM over the sequence; a linear read-out of its final hidden state."""

  hidden_size: int = 64

  @nn.compact
  def __call__(self, xs, lengths):
    carry, _ = seqjax.nn.RNN(seqjax.cells.LSTM(self.hidden_size))(xs, lengths=lengths)
    return nn.Dense(1)(carry.h)[:, 0]  # [B]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--seq-len", type=int, default=50)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  model = Adder()
  init_key, train_key, test_key = jax.random.split(jax.random.key(args.seed), 3)
  xs, lengths, _ = adding_batch(init_key, args.batch, args.seq_len)
  params = model.init(init_key, xs, lengths)["params"]
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
  opt_state = optimizer.init(params)

  def loss_fn(params, xs, lengths, targets):
    return jnp.mean((model.apply({"params": params}, xs, lengths) - targets) ** 2)

  @jax.jit
  def train_step(params, opt_state, key):
    xs, lengths, targets = adding_batch(key, args.batch, args.seq_len)
    loss, grads = jax.value_and_grad(loss_fn)(params, xs, lengths, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # A fixed held-out set, drawn from a key the training stream never uses.
  test = adding_batch(test_key, 1024, args.seq_len)
  evaluate = jax.jit(loss_fn)
  print(f"adding problem, T<={args.seq_len}: baseline MSE (predict 1.0) = "
        f"{float(jnp.mean((test[2] - 1.0) ** 2)):.4f}")

  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    params, opt_state, loss = train_step(params, opt_state,
                                         jax.random.fold_in(train_key, step))
    if step % max(1, args.steps // 10) == 0 or step == args.steps:
      print(f"step {step:5d}  train MSE {float(loss):.4f}  "
            f"test MSE {float(evaluate(params, *test)):.4f}  "
            f"({time.perf_counter() - start:.0f}s)")
  final = float(evaluate(params, *test))
  print(f"final test MSE {final:.4f}")
  return final


if __name__ == "__main__":
  main()
