"""A char-LM trained briefly on real text: it learns, evaluates deterministically,
and samples reproducibly, within top-k, refusing unknown prompt characters."""

import collections
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqjax.cli import load_config
from seqjax.data import text
from seqjax.models import charlm
from seqjax.train import loop

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["data.max_chars=150000", "data.batch_size=16", "data.window=64",
             "model.hidden_size=128", "model.num_layers=1", "model.embed_size=32",
             "train.steps=400", "train.eval_every=0", "train.checkpoint_every=0",
             "train.log_every=100", "train.progress=false", "optimizer.learning_rate=0.005"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The embedded corpus's first 150k characters, 400 steps of a small LSTM."""
  workdir = tmp_path_factory.mktemp("charlm")
  config = load_config("charlm", OVERRIDES)
  result = loop.train_and_evaluate(config, workdir, log=print)
  return workdir, config, result


def _unigram_entropy(chars: str) -> float:
  counts = collections.Counter(chars)
  return -sum(n / len(chars) * math.log(n / len(chars)) for n in counts.values())


def test_training_on_real_text_beats_the_unigram_entropy(trained):
  _, config, result = trained
  train_text = text.load_corpus("embedded")["train"][:config.data.max_chars]
  entropy = _unigram_entropy(train_text)  # ~3.2 nats: what character counts alone give
  loss = result["eval"]["validation"]["loss"]
  assert loss < 0.7 * entropy, (loss, entropy)
  assert result["eval"]["test"]["loss"] < 0.75 * entropy


def test_evaluation_is_deterministic(trained):
  workdir, _, result = trained
  first, second = loop.evaluate(workdir), loop.evaluate(workdir)
  assert first == second
  assert first["eval"] == result["eval"]      # the end-of-training numbers, exactly


def test_sampling_is_reproducible_by_seed(trained):
  workdir, _, _ = trained
  draw = lambda seed, **kw: loop.sample(workdir, prompt="The ", length=120, seed=seed,
                                        temperature=0.8, **kw)
  a = draw(1)
  assert a == draw(1)
  assert a != draw(2)
  assert len(a) == 1 and len(a[0]) == 120 and "\ufffd" not in a[0]
  # Another chunk size streams the same text.
  pieces = []
  assert draw(1, chunk=7, write=pieces.append) == a and "".join(pieces) == a[0]
  # Greedy decoding ignores the seed.
  greedy = lambda seed: loop.sample(workdir, prompt="The ", length=60, seed=seed,
                                    temperature=0.0)
  assert greedy(1) == greedy(2)
  batch = loop.sample(workdir, prompt="if ", length=50, seed=3, num_samples=3)
  assert len(batch) == 3 and len(set(batch)) == 3


def test_sampling_never_draws_outside_the_top_k(trained):
  """Teacher-force the sample back through the model: each character was in its top k."""
  workdir, _, _ = trained
  k, prompt = 3, "def "
  (sampled,) = loop.sample(workdir, prompt=prompt, length=200, seed=5, temperature=1.5,
                           top_k=k)
  saved = loop.load_trained(workdir)
  vocab = charlm.vocabulary(saved.info)
  model = charlm.create(saved.config.model, saved.info)
  ids = vocab.encode(prompt + sampled)[None]
  _, outputs = model.apply({"params": saved.params}, {"inputs": ids}, None)
  logits = np.asarray(outputs["logits"][0, len(prompt) - 1:-1])  # predicting each sample
  ranks = (logits > logits[np.arange(len(sampled)), ids[0, len(prompt):], None]).sum(axis=1)
  assert ranks.max() < k
  assert (ranks > 0).any()  # not simply greedy


def test_unknown_prompt_characters_are_named(trained, capsys):
  workdir, _, _ = trained
  with pytest.raises(ValueError, match="outside the model's vocabulary: '☃'"):
    loop.sample(workdir, prompt="snow ☃", length=5)
  from seqjax import cli  # noqa: PLC0415
  assert cli.main(["sample", "--workdir", str(workdir), "--prompt", "a☃b"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["seqjax: error: the prompt has characters outside the model's vocabulary: '☃'"]


def test_int8_matmuls_evaluate_and_sample_the_float32_model_closely(trained):
  workdir, _, result = trained
  int8 = loop.evaluate(workdir, matmul_dtype="int8")["eval"]
  for split, metrics in result["eval"].items():
    assert int8[split]["loss"] != metrics["loss"]  # another precision really ran
    assert int8[split]["loss"] == pytest.approx(metrics["loss"], abs=0.01)
  draw = lambda **kw: loop.sample(workdir, prompt="The ", length=120, seed=1, temperature=0.8,
                                  **kw)[0]
  text = draw(matmul_dtype="int8")
  assert len(text) == 120 and text == draw(matmul_dtype="int8", chunk=7)
  # The same noise: the texts agree until two likeliest characters trade places.
  assert text[:10] == draw()[:10]


def test_the_sample_command_streams_prompt_and_text(trained):
  workdir, _, _ = trained
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "seqjax.cli", "sample", "--workdir", str(workdir), *args],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  done = run("--prompt", "The ", "--length", "80", "--seed", "4", "--temperature", "0.8")
  assert done.returncode == 0, done.stderr[-2000:]
  expected = loop.sample(workdir, prompt="The ", length=80, seed=4, temperature=0.8)[0]
  assert done.stdout == "The " + expected + "\n"
  done = run("--num-samples", "2", "--length", "20", "--top-p", "0.9")
  assert done.returncode == 0 and done.stdout.count("--- sample ") == 2
  done = run("--top-k", "2", "--top-p", "0.5")
  assert done.returncode == 2 and "not allowed with argument" in done.stderr
  done = run("--length", "30", "--seed", "4", "--matmul-dtype", "int8")
  assert done.returncode == 0, done.stderr[-2000:]
  expected = loop.sample(workdir, length=30, seed=4, matmul_dtype="int8")[0]
  assert done.stdout == "\n" + expected + "\n"
  done = run("--matmul-dtype", "int4")
  assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr
