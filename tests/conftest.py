"""Shared test set-up: a persistent JAX compilation cache, so compiling does not dominate the suite."""

import os
import pathlib

import jax

_CACHE = pathlib.Path(os.environ.get("TRAKJAX_TEST_JAX_CACHE", pathlib.Path.home() / ".cache" / "trakjax-test-jax"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
