"""Character-level text corpora, batched as streams for truncated BPTT.

One config field, ``data.corpus``, names the text:

- ``"embedded"``: the English reference text that ships inside every CPython
  (``pydoc_data.topics``, the language reference's topic pages, ~465 KB). It
  needs no download, so the README's main command runs offline.
- ``"tiny_shakespeare"``: the TFDS dataset, with TFDS's own train /
  validation / test split (90 / 5 / 5 %). Offline, TFDS reads the file from a
  local copy: ``<data dir>/tiny_shakespeare/input.txt``, where the data dir is
  ``data.dir`` or ``$SEQJAX_DATA_DIR``.
- a path to any UTF-8 text file, split 90 / 5 / 5 % like TFDS's
  tiny_shakespeare (contiguous: the validation text follows the training text).

The vocabulary is the sorted set of characters of the training split, plus one
id for every other character (``Vocabulary.unknown_id``), so an unseen
character in the validation or test text costs what the model says it costs
instead of being skipped. The vocabulary is the source's ``info`` and is saved
with every checkpoint, so sampling needs only the checkpoint.

TFDS and TensorFlow: the prepared dataset is read with ``tfds.data_source``
(array_record files, no TensorFlow). Preparing it the first time runs TFDS's
builder, which needs TensorFlow (``pip install "seqjax[tfds]"``). When the data
is neither prepared, nor local, nor reachable, :class:`DataUnavailable` says
within seconds how to supply the file (TFDS itself would retry for minutes).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Iterator

import ml_collections
import numpy as np

from seqjax.data import streams

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = SPLITS[1:]

# TFDS text corpora: dataset name -> where TFDS downloads its one file from.
TFDS_CORPORA = {
    "tiny_shakespeare":
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}
DATA_DIR_ENV = "SEQJAX_DATA_DIR"


class DataUnavailable(ValueError):
  """A corpus that is neither local nor reachable, with how to supply it."""


class Vocabulary:
  """Characters <-> integer ids.

  Id ``i`` is ``chars[i]``; id ``len(chars)`` (:attr:`unknown_id`) stands for
  any other character, so :attr:`size` is ``len(chars) + 1``.

  Example:
    >>> vocab = Vocabulary.from_text("hello world")
    >>> vocab.chars, vocab.size
    (' dehlorw', 9)
    >>> ids = vocab.encode("hold!")
    >>> ids.tolist(), vocab.decode(ids) == "hold\\ufffd"
    ([3, 5, 4, 1, 8], True)
    >>> vocab.missing("hold!")
    ['!']
  """

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars):
      raise ValueError(f"vocabulary characters must be distinct, got {chars!r}")
    self.chars = chars
    codes = np.array([ord(c) for c in chars], np.int64)
    self._order = np.argsort(codes)
    self._sorted = codes[self._order]

  @classmethod
  def from_text(cls, text: str) -> "Vocabulary":
    return cls("".join(sorted(set(text))))

  @property
  def size(self) -> int:
    return len(self.chars) + 1

  @property
  def unknown_id(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """[len(text)] int32 ids; characters outside the vocabulary get :attr:`unknown_id`."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    if not len(self.chars):
      return np.full(codes.shape, self.unknown_id, np.int32)
    at = np.minimum(np.searchsorted(self._sorted, codes), len(self.chars) - 1)
    known = self._sorted[at] == codes
    return np.where(known, self._order[at], self.unknown_id).astype(np.int32)

  def decode(self, ids) -> str:
    """The text of ``ids``; :attr:`unknown_id` becomes U+FFFD."""
    table = np.array(list(self.chars) + ["\ufffd"])
    return "".join(table[np.asarray(ids, np.int64)].tolist())

  def missing(self, text: str) -> list[str]:
    """The distinct characters of ``text`` outside the vocabulary, sorted."""
    return sorted(set(text) - set(self.chars))


# ---------------------------------------------------------------------------
# Corpora: each gives {"train": str, "validation": str, "test": str}.


def embedded_text() -> str:
  """The language reference's topic pages from ``pydoc_data`` (any CPython)."""
  from pydoc_data import topics  # noqa: PLC0415 - only this corpus needs it
  return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def split_text(text: str) -> dict[str, str]:
  """90 / 5 / 5 % contiguous splits, computed as TFDS's tiny_shakespeare does."""
  i = int(len(text) * 0.9)
  train, rest = text[:i], text[i:]
  j = int(len(rest) * 0.5)
  return {"train": train, "validation": rest[:j], "test": rest[j:]}


def read_text_file(path) -> str:
  path = Path(path)
  if not path.is_file():
    raise DataUnavailable(f"data.corpus: {path} is not a file (expected 'embedded', "
                          f"{', '.join(repr(n) for n in TFDS_CORPORA)} or a text file)")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataUnavailable(f"data.corpus: {path} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None


def data_dir(configured: str = "") -> Path | None:
  """The root of local dataset copies: ``configured``, else ``$SEQJAX_DATA_DIR``."""
  root = configured or os.environ.get(DATA_DIR_ENV, "")
  return Path(root).expanduser() if root else None


def _reachable(url: str, timeout: float = 3.0) -> bool:
  host = url.split("/")[2]
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_tfds(name: str, *, root: Path | None = None, tfds_dir: str = "") -> dict[str, str]:
  """A TFDS text corpus's splits, preparing it first if needed.

  Args:
    name: a key of :data:`TFDS_CORPORA`.
    root: the local data dir; ``root / name`` is TFDS's ``manual_dir``.
    tfds_dir: where TFDS keeps prepared datasets ("" for TFDS's default).

  Raises:
    DataUnavailable: the data is not prepared, the local copy is missing and
      the download site is unreachable; or preparing needs TensorFlow.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415 - a second of import time

  url = TFDS_CORPORA[name]
  builder = tfds.builder(name, data_dir=tfds_dir or None, file_format="array_record")
  if not builder.is_prepared():
    manual = root / name if root is not None else None
    filename = url.rsplit("/", 1)[1]
    if manual is None or not (manual / filename).is_file():
      where = (f"{manual / filename} does not exist" if manual is not None
               else f"no local copy (set {DATA_DIR_ENV} or data.dir)")
      if not _reachable(url):
        raise DataUnavailable(
            f"{name} is not prepared in {builder.data_dir}, {where}, and {url} is "
            f"unreachable: download that file to DIR/{name}/{filename} on a machine "
            f"with internet, then set {DATA_DIR_ENV}=DIR (or --config.data.dir=DIR)")
      manual = None
    try:
      import tensorflow  # noqa: F401, PLC0415 - TFDS's builder needs it to prepare
    except ImportError:
      raise DataUnavailable(
          f"preparing TFDS {name} needs TensorFlow, which is not installed: "
          f"pip install 'seqjax[tfds]' (reading prepared data does not need it)") from None
    _log(f"preparing TFDS {name} in {builder.data_dir}"
         + (f" from {manual}" if manual is not None else f" from {url}"))
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
  source = builder.as_data_source()
  return {split: _as_str(source[split][0]["text"]) for split in SPLITS}


def _as_str(text) -> str:
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def load_corpus(corpus: str, *, root: Path | None = None, tfds_dir: str = "") -> dict[str, str]:
  """The splits of ``corpus`` ("embedded", a TFDS name, or a file path)."""
  if corpus == "embedded":
    return split_text(embedded_text())
  if corpus in TFDS_CORPORA:
    return load_tfds(corpus, root=root, tfds_dir=tfds_dir)
  return split_text(read_text_file(corpus))


# ---------------------------------------------------------------------------
# The data source.


class TextSource:
  """Training windows over the training split; whole-split evaluation streams.

  Args:
    texts: ``{"train", "validation", "test"}`` -> text.
    batch_size: rows of a global training batch.
    window: k, characters per training (and evaluation) window.
    eval_batch_size: rows the evaluation streams are cut into. Each row starts
      from a zero carry and keeps it across its windows, so fewer rows score
      the text closer to one continuous read.
    shard, seed: as for :class:`seqjax.data.streams.StreamBatcher`.
    vocab: the vocabulary to encode with (default: from the training split).
  """

  stateful = True
  eval_splits = EVAL_SPLITS

  def __init__(self, texts: dict[str, str], *, batch_size: int, window: int,
               eval_batch_size: int, shard: tuple[int, int] = (0, 1), seed: int = 0,
               vocab: Vocabulary | None = None):
    self.vocab = vocab or Vocabulary.from_text(texts["train"])
    self.info = {"vocab": self.vocab.chars}
    self.sizes = {split: len(texts[split]) for split in SPLITS}
    self._train = streams.StreamBatcher(self.vocab.encode(texts["train"]),
                                        batch_size=batch_size, window=window,
                                        shard=shard, seed=seed)
    self._eval = {split: streams.StreamBatcher(self.vocab.encode(texts[split]),
                                               batch_size=eval_batch_size, window=window,
                                               shard=shard, eval_only=True)
                  for split in EVAL_SPLITS}

  def batch(self, index: int) -> dict:
    return self._train.batch(index)

  def eval_batches(self, split: str = EVAL_SPLITS[0]) -> Iterator[dict]:
    if split not in self._eval:
      raise ValueError(f"unknown split {split!r}; expected one of {', '.join(self._eval)}")
    return self._eval[split].eval_batches()


def default_config() -> ml_collections.ConfigDict:
  """A ``data`` config for :func:`create`; experiments change what they need."""
  return ml_collections.ConfigDict(dict(
      name="text",
      corpus="embedded",      # "embedded", "tiny_shakespeare" or a path to a UTF-8 file
      dir="",                 # "" -> $SEQJAX_DATA_DIR
      tfds_dir="",            # "" -> TFDS's default (~/tensorflow_datasets)
      max_chars=0,            # 0: whole splits; else each split's first max_chars
      batch_size=32,
      window=128,             # truncated BPTT length; the carry crosses windows
      eval_batch_size=8,      # rows of an evaluation split, each read continuously
  ))


def create(config, *, shard: tuple[int, int] = (0, 1), seed: int = 0) -> TextSource:
  """The text source a data config describes (fields: see :func:`default_config`).

  Raises:
    DataUnavailable: the corpus cannot be read or obtained (see the module doc).
  """
  texts = load_corpus(config.corpus, root=data_dir(config.dir), tfds_dir=config.tfds_dir)
  if config.max_chars:
    texts = {split: text[:config.max_chars] for split, text in texts.items()}
  return TextSource(texts, batch_size=config.batch_size, window=config.window,
                    eval_batch_size=config.eval_batch_size, shard=shard, seed=seed)
