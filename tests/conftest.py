"""Test setup: float64 available for tight reference tolerances; TFDS data
prepared in a temporary folder; a skip for tests whose data is not here.

With x64 enabled, an accidental float64 in library code shows up as a dtype
change in the float32/bfloat16 tests instead of hiding.
"""

import os
import tempfile

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
# TFDS prepares datasets here instead of ~/tensorflow_datasets (read when TFDS is
# imported; subprocesses inherit it), once for every test session.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(tempfile.gettempdir(), "seqjax-tests-tfds"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def skip_without_data(config) -> None:
  """Skips a test of an experiment whose corpus needs ``SEQJAX_DATA_DIR`` when it is unset."""
  from seqjax.data import text  # noqa: PLC0415
  if (config.data.get("corpus") in text.TFDS_CORPORA and not config.data.get("dir")
      and not os.environ.get(text.DATA_DIR_ENV)):
    pytest.skip(f"{config.data.corpus} needs SEQJAX_DATA_DIR (.ci/run sets it to "
                f"../shared/data)")
