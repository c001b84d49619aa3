"""Retraining-free choice of the ridge λ in TRAK's (ΦᵀΦ + λI)⁻¹: the implied-ridge rule.

The rule (:func:`auto_lambda`), per checkpoint::

    λ = ρ̂ / (α · h̄)

    ρ̂ = ‖Φᵀq‖² / Σ_i q_i (f_i − f₀)          the ridge the checkpoint was trained under
    h̄ = Σ_i h_i ‖φ_i‖² / Σ_i ‖φ_i‖²            the loss curvature in the output, h_i = q_i (1 − q_i)
    α = 1/2                                     the fraction of the data each LDS subset keeps

with Φ (N, k) the projected train gradients of the output f, q_i = −∂L/∂f the out-to-loss terms,
f_i the train outputs and f₀ the output of the untrained model (a C-class margin at uniform
probabilities, −log(C − 1); 0 for one logit). Never below 10× the Gram's rank tolerance. Where
the statistics are degenerate (no gradient left, Σ q (f − f₀) ≤ 0, NaN) it falls back to the
former rule, λ = 0.3 · trace(ΦᵀΦ)/N.

Derivation. Linearize the model around the checkpoint, f(z; θ) ≈ f(z; θ̂) + φ(z)ᵀ(θ − θ̂) in
projected coordinates, and say that training minimized Σ_i ℓ(f_i) plus a ridge (ρ/2)‖θ − θ₀‖²
(weight decay; early stopping acts like one, ρ ≈ 1/(η t)). Stationarity at θ̂ gives
Φᵀq = ρ (θ̂ − θ₀), and the linearization gives f − f₀ = Φ (θ̂ − θ₀); hence
qᵀΦΦᵀq = ρ qᵀ(f − f₀), which is ρ̂ above, computed without θ₀. The model retrained on a subset
S that keeps a fraction α of the examples moves by one Newton step
θ_S − θ̂ ≈ (Σ_{i∈S} h_i φ_i φ_iᵀ + ρI)⁻¹ Σ_{i∈S} q_i φ_i, whose part linear in the subset
indicator (what a linear datamodel, and the LDS, can see) has the Hessian at its mean,
α Σ_i h_i φ_i φ_iᵀ + ρI. TRAK's unweighted ΦᵀΦ stands for Σ_i h_i φ_i φ_iᵀ up to the factor h̄
(exact when the h_i are equal), so its ridge is λ = ρ/(α h̄). The constant scale of the scores
does not change any rank correlation. This follows the influence-function view of TRAK's kernel
(Park et al., 2023, "TRAK: Attributing Model Behavior at Scale", §3; Koh & Liang, 2017) and the
observation of Wang et al. (2025, arXiv 2505.24261, "Taming Hyperparameter Sensitivity in Data
Attribution") that the best λ for the LDS can be predicted from full-data quantities alone.

Evidence (``benchmarks/lambda_rules.md``): LDS on report targets against the best λ of a grid
(picked on the other targets) for digits MLPs (trained and early-stopped), a digits CNN and
multinomial and binary logistic regression, at k = 128 … 2048 and with the identity projection.

Cost: Φᵀq (k numbers) and Σ_i ‖φ_i‖², Σ_i h_i ‖φ_i‖² accumulate in the same pass over Φ as the
Gram (O(Nk) next to the Gram's O(Nk²)); q and f come from featurization. No spectrum, no solve.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

FALLBACK_FRACTION = 0.3
"""The former rule, λ = FALLBACK_FRACTION · trace(ΦᵀΦ)/N, used where the statistics are degenerate."""

SUBSET_FRACTION = 0.5
"""α: the LDS's subsets keep half the training set."""


def margin_offset(num_classes: int) -> float:
    """f₀ for the classification margin log p/(1 − p) at uniform probabilities: −log(C − 1).

    0 for two classes (and for one logit, :func:`trakjax.tasks.binary_classification`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return -float(np.log(num_classes - 1))


class RidgeStatistics(NamedTuple):
    """What :func:`auto_lambda` needs from one checkpoint, accumulated in one pass over Φ.

    Attributes:
      num_examples: N.
      trace: Σ_i ‖φ_i‖² = trace(ΦᵀΦ).
      curvature_trace: Σ_i h_i ‖φ_i‖².
      gradient: Φᵀq, (k,) float64: the projected gradient of the training loss (sign aside).
      displacement: Σ_i q_i (f_i − f₀).
    """

    num_examples: int
    trace: float
    curvature_trace: float
    gradient: np.ndarray
    displacement: float


def ridge_statistics(features, out_to_loss, outputs, *, output_offset: float = 0.0, curvature=None,
                     block_rows: int = 4096) -> RidgeStatistics:
    """:class:`RidgeStatistics` of (N, k) features Φ, out-to-loss terms q (N,) and outputs f (N,).

    Args:
      features: Φ, any float dtype (numpy, memory map or jax); read block by block in float64.
      out_to_loss: q = −∂L/∂f per training example.
      outputs: f per training example.
      output_offset: f₀, the output of the untrained model (:func:`margin_offset` for margins).
      curvature: h_i = ∂²L/∂f² per example; default q(1 − q), exact for the logistic loss of a
        margin or a signed logit (classification). Pass ones for squared error.
      block_rows: rows of Φ per block.
    """
    n, k = features.shape
    q = np.asarray(out_to_loss, np.float64).reshape(-1)
    f = np.asarray(outputs, np.float64).reshape(-1)
    if q.shape != (n,) or f.shape != (n,):
        raise ValueError(f"out_to_loss and outputs need {n} entries (the rows of features), got "
                         f"{q.shape[0]} and {f.shape[0]}")
    h = q * (1.0 - q) if curvature is None else np.asarray(curvature, np.float64).reshape(-1)
    if h.shape != (n,):
        raise ValueError(f"curvature needs {n} entries, got {h.shape[0]}")
    gradient = np.zeros(k, np.float64)
    trace = curvature_trace = 0.0
    for start in range(0, n, block_rows):
        block = np.asarray(features[start : start + block_rows], np.float64)
        rows = (block * block).sum(axis=1)
        trace += float(rows.sum())
        curvature_trace += float(rows @ h[start : start + block_rows])
        gradient += block.T @ q[start : start + block_rows]
    return RidgeStatistics(int(n), trace, curvature_trace, gradient, float(q @ (f - float(output_offset))))


def implied_ridge(stats: RidgeStatistics) -> float:
    """ρ̂ = ‖Φᵀq‖² / Σ q (f − f₀): the ridge that balances the checkpoint's remaining gradient
    against how far training moved its outputs (NaN where that is not positive)."""
    gradient_sq = float(np.dot(stats.gradient, stats.gradient))
    if not (np.isfinite(gradient_sq) and np.isfinite(stats.displacement)) or stats.displacement <= 0:
        return float("nan")
    return gradient_sq / stats.displacement


def auto_lambda(stats: RidgeStatistics, *, tolerance: float = 0.0,
                subset_fraction: float = SUBSET_FRACTION) -> float:
    """λ = ρ̂ / (α h̄), never below 10 × ``tolerance`` (see the module docstring).

    Falls back to ``FALLBACK_FRACTION · trace/N`` where ρ̂ or h̄ is not a positive finite number
    (a checkpoint with no gradient left, outputs that did not move past f₀).

    Args:
      stats: :func:`ridge_statistics` of the checkpoint.
      tolerance: the Gram's rank tolerance (:attr:`trakjax.solve.Spectrum.tolerance`, or
        ``rounding_noise · λ_max`` on a path without a spectrum).
      subset_fraction: α, the fraction of the training set the attribution should predict the
        effect of (1/2 for the LDS's half-subsets).
    """
    if not 0.0 < subset_fraction <= 1.0:
        raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction!r}")
    if stats.num_examples < 1 or not stats.trace > 0:
        raise ValueError("auto_lambda needs N >= 1 and trace(ΦᵀΦ) > 0 (every projected gradient is zero?)")
    floor = 10.0 * float(tolerance)
    rho = implied_ridge(stats)
    curvature = stats.curvature_trace / stats.trace
    lam = rho / (subset_fraction * curvature) if curvature > 0 else float("nan")
    if not (np.isfinite(lam) and lam > 0):
        lam = FALLBACK_FRACTION * stats.trace / stats.num_examples
    return max(float(lam), floor)
