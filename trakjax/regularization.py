"""Retraining-free choice of the ridge λ in (ΦᵀΦ + λI)⁻¹ (work in progress)."""

from __future__ import annotations

import numpy as np

AUTO_LAMBDA_FRACTION = 0.3


def lambda_for_dof(eigenvalues, target: float) -> float:
    """λ with Σ s/(s+λ) = target (bisection in log λ)."""
    s = np.clip(np.asarray(eigenvalues, np.float64), 0.0, None)
    top = float(s.max())
    lo, hi = 1e-14 * top, 1e8 * top
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        if (s / (s + mid)).sum() > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def auto_lambda(*, trace, num_examples, out_to_loss=None, tolerance=0.0, fraction=AUTO_LAMBDA_FRACTION):
    return max(fraction * float(trace) / int(num_examples), 10.0 * float(tolerance))


def xi_lambda_per_target(eigenvalues, target_coords, scale, floor):
    return max(0.3 * scale, floor)
