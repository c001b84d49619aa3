"""The projection backend seam: the jnp/XLA path everywhere, the Pallas kernel on GPU.

``backend="xla"`` is :func:`trakjax.projection.project`. ``backend="pallas"`` is the kernel in
:mod:`trakjax.kernels.projection` (interpret mode off GPU). ``backend="auto"`` picks Pallas where
a GPU and a lowering for it are available and XLA elsewhere, with a logged note when it falls
back. Both compute the same R (the contract in :mod:`trakjax.randomness`).
"""

from __future__ import annotations

import logging

import jax

from trakjax import projection as projection_lib
from trakjax.errors import InvalidArgumentError

logger = logging.getLogger("trakjax")

BACKENDS = ("xla", "pallas", "auto")


def pallas_available() -> tuple[bool, str]:
    """Whether the Pallas projection kernel can run compiled here, and why not if it cannot."""
    try:
        platform = jax.default_backend()
    except RuntimeError as err:  # no backend initialised at all
        return False, f"no JAX backend ({err})"
    if platform != "gpu":
        return False, f"the default JAX platform is {platform!r}, not 'gpu'"
    try:
        from trakjax.kernels import projection as kernel
    except ImportError as err:
        return False, f"the Pallas kernel cannot be imported ({err})"
    return kernel.gpu_lowering_available()


def resolve(backend: str) -> str:
    """Map a requested backend to ``"xla"`` or ``"pallas"``.

    Raises:
      ValueError: for an unknown backend name.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    available, reason = pallas_available()
    if available:
        return "pallas"
    logger.info("backend='auto': using the XLA projection (Pallas GPU unavailable: %s)", reason)
    return "xla"


def project(grads, *, kind, proj_dim, key=None, blocks=None, chunk_rows=None,
            precision="highest", backend="xla"):
    """φ = Rᵀ g / √P on the chosen backend; see :func:`trakjax.projection.project`."""
    if backend == "pallas" and kind != "identity" and blocks is None:
        from trakjax.kernels import projection as kernel

        return kernel.project_pytree(
            grads, kind=kind, proj_dim=proj_dim, key=key, precision=precision
        )
    return projection_lib.project(
        grads, kind=kind, proj_dim=proj_dim, key=key, blocks=blocks, chunk_rows=chunk_rows,
        precision=precision,
    )
