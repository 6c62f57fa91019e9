"""Text corpora: vocabulary, splits, local files, TFDS offline, fast failure."""

import os
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from seqjax.data import text

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("SEQJAX_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR, reason="SEQJAX_DATA_DIR is not set (.ci/run sets it to ../shared/data)")


def test_vocabulary_round_trip_and_unknown_characters():
  vocab = text.Vocabulary.from_text("to be, or not to be")
  assert vocab.chars == " ,benort" and vocab.size == len(vocab.chars) + 1
  ids = vocab.encode("not to be, or")
  assert ids.dtype == np.int32 and vocab.decode(ids) == "not to be, or"
  np.testing.assert_array_equal(vocab.encode(vocab.decode(ids)), ids)
  assert [vocab.chars[i] for i in ids[:3]] == ["n", "o", "t"]
  # Characters outside the vocabulary share one id and decode to U+FFFD.
  odd = vocab.encode("be?é")
  assert odd.tolist()[2:] == [vocab.unknown_id] * 2
  assert vocab.decode(odd) == "be\ufffd\ufffd" and vocab.missing("be?é") == ["?", "é"]
  # Non-ASCII characters and an order other than sorted round-trip too.
  other = text.Vocabulary("ωa☃ b")
  assert other.decode(other.encode("a☃ ω b")) == "a☃ ω b"
  with pytest.raises(ValueError, match="distinct"):
    text.Vocabulary("aba")


def test_embedded_corpus_needs_no_download_and_splits_90_5_5():
  whole = text.embedded_text()
  assert len(whole) > 400_000 and "assert" in whole
  splits = text.load_corpus("embedded")
  assert "".join(splits[s] for s in text.SPLITS) == whole
  assert len(splits["train"]) == int(len(whole) * 0.9)
  assert abs(len(splits["validation"]) - len(splits["test"])) <= 1


def test_local_file_and_clear_errors(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("abcdefghij" * 100, encoding="utf-8")
  splits = text.load_corpus(str(path))
  assert [len(splits[s]) for s in text.SPLITS] == [900, 50, 50]
  with pytest.raises(text.DataUnavailable, match=r"missing\.txt is not a file \(expected "
                                                 r"'embedded', 'tiny_shakespeare' or a text"):
    text.load_corpus(str(tmp_path / "missing.txt"))
  (tmp_path / "binary.txt").write_bytes(b"ok \xff\xfe")
  with pytest.raises(text.DataUnavailable, match="is not UTF-8 text"):
    text.load_corpus(str(tmp_path / "binary.txt"))


def _config(**overrides):
  config = dict(name="text", corpus="embedded", dir="", tfds_dir="", max_chars=0,
                batch_size=4, window=32, eval_batch_size=2)
  return ml_collections.ConfigDict(dict(config, **overrides))


def test_source_batches_windows_and_whole_splits():
  source = text.create(_config(max_chars=50_000))
  assert source.info == {"vocab": source.vocab.chars}
  assert source.eval_splits == ("validation", "test")
  batch = source.batch(0)
  assert batch["inputs"].shape == batch["targets"].shape == (4, 32)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["resets"][:, 0].all()
  # Evaluation scores every character of the split after the first, once.
  splits = text.load_corpus("embedded")
  for split in source.eval_splits:
    weight = sum(b["weights"].sum() for b in source.eval_batches(split))
    assert weight == min(len(splits[split]), 50_000) - 1
  with pytest.raises(ValueError, match="unknown split 'train'"):
    next(source.eval_batches("train"))


@needs_data
def test_tiny_shakespeare_from_the_local_copy_has_tfds_split_sizes(tmp_path):
  """TFDS prepares it offline from ``<data dir>/tiny_shakespeare`` (needs TensorFlow)."""
  pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs TensorFlow")
  splits = text.load_tfds("tiny_shakespeare", root=Path(DATA_DIR), tfds_dir=str(tmp_path))
  assert {s: len(t) for s, t in splits.items()} == {
      "train": 1_003_854, "validation": 55_770, "test": 55_770}
  assert splits["train"].startswith("First Citizen:")
  source = text.create(_config(corpus="tiny_shakespeare", dir=DATA_DIR,
                               tfds_dir=str(tmp_path)))
  assert len(source.vocab.chars) == 65 and source.vocab.size == 66
  # Reading the prepared data does not import TensorFlow.
  check = ("import sys\n"
           "from seqjax.data import text\n"
           f"s = text.load_tfds('tiny_shakespeare', tfds_dir={str(tmp_path)!r})\n"
           "print(len(s['validation']), 'tensorflow' in sys.modules)")
  done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "55770 False"


def test_unreachable_data_fails_within_seconds_saying_how_to_supply_it(tmp_path, monkeypatch):
  # A host that never resolves (RFC 2606), so the outcome does not depend on the network.
  monkeypatch.setitem(text.TFDS_CORPORA, "tiny_shakespeare",
                      "https://data.invalid/char-rnn/input.txt")
  started = time.perf_counter()
  with pytest.raises(text.DataUnavailable) as error:
    text.load_tfds("tiny_shakespeare", root=tmp_path, tfds_dir=str(tmp_path / "tfds"))
  assert time.perf_counter() - started < 10
  message = str(error.value)
  assert "\n" not in message
  assert "https://data.invalid/char-rnn/input.txt is unreachable" in message
  assert f"{tmp_path / 'tiny_shakespeare' / 'input.txt'} does not exist" in message
  assert "DIR/tiny_shakespeare/input.txt" in message and "SEQJAX_DATA_DIR=DIR" in message


def test_the_cli_reports_missing_data_in_one_line(tmp_path):
  if text._reachable(text.TFDS_CORPORA["tiny_shakespeare"]):  # noqa: SLF001
    pytest.skip("the download site is reachable from here: TFDS would download")
  env = dict(os.environ, PYTHONPATH=str(ROOT), SEQJAX_DATA_DIR=str(tmp_path))
  started = time.perf_counter()
  done = subprocess.run(
      [sys.executable, "-m", "seqjax.cli", "train", "charlm", "--quick", "--workdir",
       str(tmp_path / "run"), "--config.data.corpus=tiny_shakespeare",
       f"--config.data.tfds_dir={tmp_path / 'tfds'}"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert done.returncode == 2 and "Traceback" not in done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("seqjax: error: tiny_shakespeare is not prepared in ")
  assert time.perf_counter() - started < 60  # start-up included; TFDS alone retries for minutes
