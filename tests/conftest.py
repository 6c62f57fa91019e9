"""Test setup: float64 available for tight reference tolerances.

With x64 enabled, an accidental float64 in library code shows up as a dtype
change in the float32/bfloat16 tests instead of hiding.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
