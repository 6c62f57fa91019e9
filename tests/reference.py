"""Plain NumPy references for the cells and the driver semantics.

Written from the equations, one sequence and one step at a time, sharing no
code with seqjax. Parameters use seqjax's documented layout (that layout is the
contract under test). The carry is a dict of [H] vectors.
"""

import numpy as np


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def elman_step(p, carry, x, activation="tanh"):
  pre = x @ p["w_x"] + carry["h"] @ p["w_h"] + p["b"]
  h = np.tanh(pre) if activation == "tanh" else np.maximum(pre, 0.0)
  return {"h": h}


def lstm_step(p, carry, x):
  hsz = carry["h"].shape[-1]
  z = x @ p["w_x"] + carry["h"] @ p["w_h"] + p["b"]
  i = _sigmoid(z[:hsz])
  f = _sigmoid(z[hsz:2 * hsz])
  g = np.tanh(z[2 * hsz:3 * hsz])
  o = _sigmoid(z[3 * hsz:])
  c = f * carry["c"] + i * g
  return {"h": o * np.tanh(c), "c": c}


def gru_step(p, carry, x, reset_after=True):
  h = carry["h"]
  hsz = h.shape[-1]
  w_xr, w_xz, w_xn = (p["w_x"][:, k * hsz:(k + 1) * hsz] for k in range(3))
  w_hr, w_hz, w_hn = (p["w_h"][:, k * hsz:(k + 1) * hsz] for k in range(3))
  b_r, b_z, b_n = (p["b"][k * hsz:(k + 1) * hsz] for k in range(3))
  r = _sigmoid(x @ w_xr + h @ w_hr + b_r)
  z = _sigmoid(x @ w_xz + h @ w_hz + b_z)
  if reset_after:
    n = np.tanh(x @ w_xn + b_n + r * (h @ w_hn + p["b_hn"]))
  else:
    n = np.tanh(x @ w_xn + b_n + (r * h) @ w_hn)
  return {"h": (1 - z) * n + z * h}


def mingru_step(p, carry, x):
  hsz = carry["h"].shape[-1]
  pre = x @ p["w_x"] + p["b"]
  z = _sigmoid(pre[:hsz])
  h_tilde = pre[hsz:]
  return {"h": (1 - z) * carry["h"] + z * h_tilde}


def step_fn(cell):
  """The reference step for a seqjax cell's configuration."""
  name = type(cell).__name__
  if name == "Elman":
    return lambda p, c, x: elman_step(p, c, x, cell.activation)
  if name == "LSTM":
    return lstm_step
  if name == "GRU":
    return lambda p, c, x: gru_step(p, c, x, cell.reset_after)
  if name == "MinGRU":
    return mingru_step
  raise ValueError(name)


def zero_carry(cell, hsz):
  if type(cell).__name__ == "LSTM":
    return {"h": np.zeros(hsz), "c": np.zeros(hsz)}
  return {"h": np.zeros(hsz)}


def run(cell, params, xs, carry=None, lengths=None, mask=None, resets=None,
        reverse=False):
  """Reference driver on batch-major xs [B, T, D].

  Returns (final carry dict of [B, H], ys [B, T, H]).

  Semantics, per sequence b of length L:
  - only steps t < L are visited, in order 0..L-1 (or L-1..0 when reverse);
  - forward, a reset at t zeroes the carry before visiting t; reversed, the
    carry is zeroed before visiting t when step t + 1 < L starts an episode;
  - a masked step leaves the carry as it is and emits zeros.
  """
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  xs = np.asarray(xs, np.float64)
  b_size, t_size, _ = xs.shape
  hsz = cell.hidden_size
  step = step_fn(cell)
  ys = np.zeros((b_size, t_size, hsz))
  finals = []
  for b in range(b_size):
    length = t_size if lengths is None else int(lengths[b])
    if carry is None:
      state = zero_carry(cell, hsz)
    else:
      state = {k: np.asarray(v[b], np.float64) for k, v in carry.items()}
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
      if resets is not None:
        if reverse:
          reset_here = t + 1 < length and resets[b, t + 1]
        else:
          reset_here = resets[b, t]
        if reset_here:
          state = zero_carry(cell, hsz)
      if mask is not None and not mask[b, t]:
        continue
      state = step(params, state, xs[b, t])
      ys[b, t] = state["h"]
    finals.append(state)
  final = {k: np.stack([f[k] for f in finals]) for k in finals[0]}
  return final, ys
