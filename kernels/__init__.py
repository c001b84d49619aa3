"""Pallas kernels for trakjax, installed as ``trakjax.kernels`` (package-dir mapping)."""
