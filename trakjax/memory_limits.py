"""The memory this process may use, and whether a kernel solve of a given k fits in it.

The solve (:func:`trakjax.solve.solve`) works on (k, k) float64 matrices on the host: the Gram
ΦᵀΦ, the Cholesky factor of ΦᵀΦ + λI (LAPACK ``potrf``/``potri`` overwrite one copy with the
explicit inverse), the inverse's lower triangle and its symmetrized copy: about
:data:`SOLVE_COPIES` · 8 · k² bytes at the peak (the eigendecomposition fallback needs one more
copy, its eigenvectors). With ``projection="factorized"`` and ``proj_dim="all"`` k is K_fac, the
number of factorized features, which can be large: :func:`check_solve_memory` refuses before
any featurizing when the solve cannot fit, saying which k would.

The limit is the cgroup's ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) where one is
set, else the machine's physical memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from trakjax.errors import InvalidArgumentError

SOLVE_COPIES = 4
"""(k, k) float64 matrices alive at the solve's peak on its Cholesky path."""
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _cgroup_limit(files=CGROUP_LIMIT_FILES) -> int | None:
    for name in files:
        path = Path(name)
        if not path.is_file():
            continue
        text = path.read_text().strip()
        if text.isdigit() and int(text) < 2**60:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def physical_memory_bytes() -> int:
    """The machine's physical memory in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def process_memory_limit() -> tuple[int, str]:
    """``(bytes, where the figure comes from)``: the cgroup limit if set, else physical memory."""
    limit = _cgroup_limit()
    physical = physical_memory_bytes()
    if limit is not None and limit < physical:
        return limit, "the cgroup's memory limit"
    return physical, "the machine's physical memory"


def solve_peak_bytes(k: int) -> int:
    """Bytes of the float64 solve's peak for a (k, k) kernel: :data:`SOLVE_COPIES` · 8 · k²."""
    return SOLVE_COPIES * 8 * int(k) ** 2


def largest_solvable_dim(limit_bytes: int) -> int:
    """The largest k whose solve peak fits in ``limit_bytes``."""
    return math.isqrt(max(int(limit_bytes), 0) // (SOLVE_COPIES * 8))


def check_solve_memory(k: int, *, k_fac: int | None = None, limit: tuple[int, str] | None = None) -> None:
    """Raise before any work if the kernel solve of dimension ``k`` cannot fit in memory.

    Args:
      k: the features' final dimension (K_fac under ``proj_dim="all"``).
      k_fac: the factorized features' count, when the features are factorized (named in the
        message, with the settings that would fit).
      limit: ``(bytes, description)`` (default: :func:`process_memory_limit`).

    Raises:
      InvalidArgumentError: naming k (and K_fac), the peak, the limit and the largest k that fits.
    """
    limit_bytes, where = process_memory_limit() if limit is None else limit
    need = solve_peak_bytes(k)
    if need <= limit_bytes:
        return
    fits = largest_solvable_dim(limit_bytes)
    what = f"K_fac={k_fac} factorized features (proj_dim='all')" if k_fac is not None and k == k_fac else f"k={k}"
    fix = (f"use proj_dim <= {fits} (a second projection of the K_fac features) or smaller factor_dims "
           f"(K_fac <= {fits})" if k_fac is not None else f"use proj_dim <= {fits}")
    raise InvalidArgumentError(
        f"the kernel solve for {what} needs about {need / 2**30:.1f} GiB ({SOLVE_COPIES} float64 "
        f"({k}, {k}) matrices: the Gram, its Cholesky factor, the inverse), more than "
        f"{limit_bytes / 2**30:.1f} GiB ({where}); the largest k that fits is {fits}: {fix}. "
        "Nothing was computed"
    )
