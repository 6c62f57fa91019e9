"""The GPU-only contender of benchmarks/peers.py, checked where it can be: on CPU.

``jax.experimental.rnn.lstm`` (JAX's cuDNN LSTM) lowers only for CUDA and ROCm,
so the benchmark's ``cudnn`` contender cannot run here. What can be checked is
that it would time the same model as seqjax: seqjax's LSTM parameters, packed
by ``peers.cudnn_weights``, give seqjax's outputs and gradients through JAX's
own unpacking (``unpack_lstm_weights``) and reference LSTM (``lstm_ref``), the
layout the cuDNN call reads. And asking for it on CPU is one clear error.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import cells

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
try:
  import peers
finally:
  sys.path.remove(str(BENCH))


def _reference_lstm(x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size, num_layers,
                    dropout, bidirectional):
  """``rnn.lstm``'s signature, computed by JAX's reference from the unpacked weights."""
  from jax.experimental import rnn  # noqa: PLC0415
  unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
  return rnn.lstm_ref(x, h_0, c_0, *unpacked, seq_lengths, input_size, hidden_size, num_layers,
                      dropout, bidirectional)


def test_cudnn_weights_give_seqjax_outputs_and_gradients():
  rnn = pytest.importorskip("jax.experimental.rnn", reason="this JAX has no jax.experimental.rnn")
  batch, steps, features, hidden = 3, 7, 5, 4
  cell = cells.LSTM(hidden)
  params = cell.init(jax.random.key(0), features)
  params["b"] = jax.random.normal(jax.random.key(2), params["b"].shape)  # not all zeros
  xs = jax.random.normal(jax.random.key(1), (batch, steps, features))

  def seqjax_loss(params):
    return jnp.mean(seqjax.scan(cell, params, xs)[1] ** 2)

  def cudnn_loss(weights):
    return jnp.mean(peers.cudnn_forward(weights, xs, hidden, lstm=_reference_lstm) ** 2)

  weights = peers.cudnn_weights(params)
  assert weights.shape == (rnn.get_num_params_in_lstm(features, hidden, 1, False),)
  np.testing.assert_allclose(peers.cudnn_forward(weights, xs, hidden, lstm=_reference_lstm),
                             seqjax.scan(cell, params, xs)[1], rtol=1e-5, atol=1e-6)
  # Packing is linear, so the packed seqjax gradient is the cuDNN weights'
  # gradient, except that b_hh (zero here, absent in seqjax) gets b's too.
  grads = jax.grad(seqjax_loss)(params)
  expected = peers.cudnn_weights(grads).at[-4 * hidden:].set(grads["b"])
  np.testing.assert_allclose(jax.grad(cudnn_loss)(weights), expected, rtol=1e-4, atol=1e-7)


def test_the_cudnn_contender_has_no_gru():
  assert peers.cudnn_contender("gru", peers.QUICK_SIZES["q"], "train") is None


def _peers_cli(contenders):
  """peers.py --quick --contenders ``contenders`` on CPU, as a finished process."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(BENCH / "peers.py"), "--quick", "--contenders",
                         contenders], env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def test_asking_for_cudnn_without_a_gpu_is_one_clear_error():
  done = _peers_cli("seqjax,cudnn")
  assert done.returncode == 2
  assert "cudnn needs a GPU: jax.experimental.rnn.lstm lowers only for CUDA and ROCm, and " \
         "JAX's backend here is cpu" in done.stderr
  assert "Traceback" not in done.stderr
  done = _peers_cli("seqjax,pytorch")
  assert done.returncode == 2
  assert "unknown contender 'pytorch': expected some of seqjax, seqjax_xla, torch, flax, keras, cudnn" \
         in done.stderr
