"""Retraining-free choice of the ridge λ in TRAK's (ΦᵀΦ + λI)⁻¹: the implied-ridge rule.

The rule (:func:`auto_lambda`), per checkpoint::

    λ  = ρ̂ / (α · h̄)
    ρ̂  = gᵀd / dᵀd          g = Φᵀq,   d = (ΦᵀΦ + λ₀I)⁻¹ Φᵀ(f − f₀),   λ₀ = 0.3 · trace(ΦᵀΦ)/N
    h̄  = Σ_i h_i ‖φ_i‖² / Σ_i ‖φ_i‖²,   h_i = q_i (1 − q_i)
    α  = 1/2

Φ (N, k) holds the projected train gradients of the model output f, q_i = −∂L/∂f_i the
out-to-loss terms, f_i the train outputs, f₀ the output of the untrained model (a C-class margin
log p/(1 − p) at uniform probabilities: −log(C − 1), :func:`margin_offset`; 0 for one logit),
h_i = ∂²L/∂f_i² the loss curvature in the output (q(1 − q) for the logistic loss of a margin or
signed logit) and α the fraction of the training set each LDS subset keeps. λ is never below 10×
the Gram's rank tolerance; where the statistics are degenerate (no gradient left, ρ̂ ≤ 0, NaN)
it falls back to λ₀, the former ``lambda_reg="auto"``.

Derivation. Linearize the model at the checkpoint in projected coordinates,
f(z; θ) ≈ f(z; θ̂) + φ(z)ᵀ(θ − θ̂), and say training minimized Σ_i ℓ(f_i) + (ρ/2)‖θ − θ₀‖²:
explicit weight decay, or the implicit ridge of stopping early (ρ ≈ 1/(η t) for gradient descent).
Stationarity at θ̂ gives g = Φᵀq = ρ δ with δ = θ̂ − θ₀, and the linearization gives
f − f₀ = Φ δ, so δ is estimated by the ridge least-squares fit d of f − f₀ on Φ and ρ by the
regression of g on d, ρ̂ = gᵀd/dᵀd. (The shorter ρ̂ = ‖g‖²/qᵀ(f − f₀) is the same in exact
arithmetic but squares the noise in g: with minibatch training or checkpoints fit to resampled
data, g is dominated by gradient noise and that form overshoots λ tenfold, which the LDS pays for;
gᵀd is linear in the noise, which averages out.) A model retrained on a subset S keeping a
fraction α of the data moves by one Newton step, θ_S − θ̂ ≈ (Σ_{i∈S} h_i φ_i φ_iᵀ + ρI)⁻¹
Σ_{i∈S} q_i φ_i, whose part linear in the subset indicators (all that a linear datamodel, and the
LDS, can see) has the Hessian at its mean, α Σ_i h_i φ_i φ_iᵀ + ρI. TRAK's unweighted ΦᵀΦ stands
for Σ_i h_i φ_i φ_iᵀ up to the factor h̄ (exact when the h_i are equal), so its ridge is
λ = ρ/(α h̄); the constant factor of the scores changes no rank correlation. This is the
influence-function reading of TRAK's kernel (Park et al., 2023, "TRAK: Attributing Model Behavior
at Scale", §3; Koh & Liang, 2017, "Understanding Black-box Predictions via Influence Functions").
Wang et al. (2025, arXiv 2505.24261, "Taming Hyperparameter Sensitivity in Data Attribution:
Practical Selection Without Costly Retraining") study the same choice and select λ without
retraining by a surrogate indicator of full-data quantities; their definition was not reachable
here, and the rule above is derived independently (benchmarks/README.md, "lambda_rules.py").

Evidence (``benchmarks/lambda_rules.py``, tables in benchmarks/README.md): LDS on held-out
targets against the best λ of a log grid (picked on other targets), paired per target, in ten
settings at k = 128, 512, 1024, 2048 and with the identity projection (50 rows): digits MLPs
64-64-10 and 64-32-10 trained full-batch, trained with minibatches and stopped early, a digits
CNN, multinomial logistic regression on digits and wine, binary logistic regression on
breast_cancer (one optimum, and bootstrap checkpoints). The best λ ranged from 0.03·trace/N (CNN)
to 5.6·trace/N (binary LR); this rule was within 0.007 of it in every row (mean paired
difference; worst −0.007), where the former 0.3·trace/N lost up to 0.084 (wine), 0.074
(breast_cancer), 0.038 (LR on digits), 0.033 (early-stopped MLP) and 0.031 (CNN). On the digits MLP
64-64-10 it matched the former rule (paired differences +0.002, −0.000, −0.000, −0.000 at
k = 128, 512, 1024, 2048). Rules in q̄, effective degrees of freedom, λ_max or ‖ΦᵀΦ‖_F²/trace,
each with its best constant fit on the other settings, lost 0.06 to 0.19 on a held-out one.

Cost: g = Φᵀq, Φᵀ(f − f₀), Σ_i ‖φ_i‖² and Σ_i h_i ‖φ_i‖² accumulate in the pass over Φ that
builds the Gram (O(Nk) beside its O(Nk²)); d is one conjugate-gradient solve with the Gram
(O(k²) per iteration, a few dozen iterations; or a Cholesky of ΦᵀΦ + λ₀I). No spectrum. Measured
at k = 2048 (digits MLP, 2-core CPU): the statistics 0.01 s, the solve 0.05 s (62 iterations),
against 0.22 s for the Gram and 0.31 s for the Cholesky of ΦᵀΦ + λI.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trakjax.errors import InvalidArgumentError

START_FRACTION = 0.3
"""λ₀ = START_FRACTION · trace(ΦᵀΦ)/N: the ridge of the least-squares fit d (and the fallback λ)."""

SUBSET_FRACTION = 0.5
"""α: the LDS's subsets keep half the training set."""


def margin_offset(num_classes: int) -> float:
    """f₀ for the classification margin log p/(1 − p) at uniform probabilities: −log(C − 1).

    0 for two classes (and for one logit, :func:`trakjax.tasks.binary_classification`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise InvalidArgumentError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return -float(np.log(num_classes - 1))


class RidgeStatistics(NamedTuple):
    """What :func:`auto_lambda` needs from one checkpoint besides the Gram, from one pass over Φ.

    Attributes:
      num_examples: N.
      trace: Σ_i ‖φ_i‖² = trace(ΦᵀΦ).
      curvature_trace: Σ_i h_i ‖φ_i‖².
      gradient: g = Φᵀq, (k,) float64: the training loss's gradient, projected (sign aside).
      output_gradient: Φᵀ(f − f₀), (k,) float64.
    """

    num_examples: int
    trace: float
    curvature_trace: float
    gradient: np.ndarray
    output_gradient: np.ndarray


def pack(stats: RidgeStatistics) -> np.ndarray:
    """The statistics as one float64 vector (for summing over processes, ``unpack`` to read)."""
    head = np.array([stats.num_examples, stats.trace, stats.curvature_trace], np.float64)
    return np.concatenate([head, stats.gradient, stats.output_gradient])


def unpack(vector: np.ndarray) -> RidgeStatistics:
    """Inverse of :func:`pack`; a sum of packed statistics is the statistics of all their rows."""
    k = (vector.shape[0] - 3) // 2
    return RidgeStatistics(int(round(vector[0])), float(vector[1]), float(vector[2]),
                           vector[3 : 3 + k].copy(), vector[3 + k :].copy())


def ridge_statistics(features, out_to_loss, outputs, *, output_offset=0.0, curvature=None,
                     block_rows: int = 4096, kernel: str = "trak") -> RidgeStatistics:
    """:class:`RidgeStatistics` of (N, k) features Φ, out-to-loss terms q (N,) and outputs f (N,).

    Args:
      features: Φ, any float dtype (numpy, memory map or jax); read block by block in float64.
      out_to_loss: q = −∂L/∂f per training example.
      outputs: f per training example.
      output_offset: f₀, the output of the untrained model (:func:`margin_offset` for margins):
        one float, or (N,) per example (a task's ``ridge_terms``).
      curvature: h_i = ∂²L/∂f² per example; default q(1 − q), exact for the logistic loss of a
        margin or a signed logit (classification). Pass ones for squared error.
      block_rows: rows of Φ per block.
      kernel: ``"trak"``, or ``"gauss-newton"``: ``output_gradient`` is then ΦᵀH(f − f₀), the
        right-hand side of the h-weighted least-squares fit d = (ΦᵀHΦ + λ₀I)⁻¹ΦᵀH(f − f₀)
        (:func:`auto_lambda` with the weighted Gram), so that only ΦᵀHΦ is ever formed.
    """
    n, k = features.shape
    q = np.asarray(out_to_loss, np.float64).reshape(-1)
    f = np.asarray(outputs, np.float64).reshape(-1)
    if q.shape != (n,) or f.shape != (n,):
        raise InvalidArgumentError(f"out_to_loss and outputs need {n} entries (the rows of features), got "
                         f"{q.shape[0]} and {f.shape[0]}")
    h = q * (1.0 - q) if curvature is None else np.asarray(curvature, np.float64).reshape(-1)
    if h.shape != (n,):
        raise InvalidArgumentError(f"curvature needs {n} entries, got {h.shape[0]}")
    moved = f - np.asarray(output_offset, np.float64)
    if kernel not in ("trak", "gauss-newton"):
        raise InvalidArgumentError(f"kernel must be 'trak' or 'gauss-newton', got {kernel!r}")
    if kernel == "gauss-newton":
        moved = moved * h
    gradient = np.zeros(k, np.float64)
    output_gradient = np.zeros(k, np.float64)
    trace = curvature_trace = 0.0
    for start in range(0, n, block_rows):
        block = np.asarray(features[start : start + block_rows], np.float64)
        rows = (block * block).sum(axis=1)
        trace += float(rows.sum())
        curvature_trace += float(rows @ h[start : start + block_rows])
        gradient += block.T @ q[start : start + block_rows]
        output_gradient += block.T @ moved[start : start + block_rows]
    return RidgeStatistics(int(n), trace, curvature_trace, gradient, output_gradient)


def _conjugate_gradient(matrix: np.ndarray, rhs: np.ndarray, shift: float, rtol: float = 1e-8,
                        max_iter: int = 1000) -> np.ndarray:
    """(matrix + shift·I)⁻¹ rhs for a symmetric positive semi-definite matrix and shift > 0."""
    x = np.zeros_like(rhs)
    r = rhs.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = (rtol * np.sqrt(float(rhs @ rhs))) ** 2
    for _ in range(max_iter):
        if rr <= stop:
            break
        ap = matrix @ p + shift * p
        step = rr / float(p @ ap)
        x += step * p
        r -= step * ap
        rr, previous = float(r @ r), rr
        p = r + (rr / previous) * p
    return x


def implied_ridge(gram: np.ndarray, stats: RidgeStatistics, start_lambda: float) -> float:
    """ρ̂ = gᵀd / dᵀd, d = (ΦᵀΦ + start_lambda·I)⁻¹ Φᵀ(f − f₀): the ridge the checkpoint was
    trained under, in the Gram's units (NaN where it is not a positive finite number).

    ``gram`` is ΦᵀΦ (k, k), or any matrix with the same action on the span of Φ's rows (for
    example diag(s) in its eigenbasis, with ``stats`` in that basis).
    """
    gram = np.asarray(gram, np.float64)
    k = stats.gradient.shape[0]
    if gram.shape != (k, k) or stats.output_gradient.shape != (k,):
        raise InvalidArgumentError(f"gram must be ({k}, {k}) and output_gradient ({k},) for a gradient of {k}; "
                         f"got {gram.shape} and {stats.output_gradient.shape}")
    if not start_lambda > 0:
        raise InvalidArgumentError(f"start_lambda must be > 0, got {start_lambda!r}")
    d = _conjugate_gradient(gram, stats.output_gradient, float(start_lambda))
    dd = float(d @ d)
    rho = float(stats.gradient @ d) / dd if dd > 0 else float("nan")
    return rho if np.isfinite(rho) and rho > 0 else float("nan")


def auto_lambda(gram: np.ndarray, stats: RidgeStatistics, *, tolerance: float = 0.0,
                subset_fraction: float = SUBSET_FRACTION, kernel: str = "trak") -> float:
    """λ = ρ̂ / (α h̄), never below 10 × ``tolerance`` (see the module docstring); for the
    Gauss–Newton kernel (``gram`` = ΦᵀHΦ) λ = ρ̂ / α.

    Falls back to λ₀ = ``START_FRACTION · trace/N`` where ρ̂ or h̄ is not a positive finite number
    (a checkpoint with no gradient left, outputs that did not move).

    Gauss–Newton kernel: α ΦᵀHΦ + ρI = α(ΦᵀHΦ + (ρ/α)I), so λ = ρ̂/α with no h̄. ρ̂ = gᵀd/dᵀd as
    above with d the h-weighted fit (ΦᵀHΦ + λ₀I)⁻¹ΦᵀH(f − f₀) (``stats`` from
    :func:`ridge_statistics` with ``kernel="gauss-newton"``), and λ₀ = ``START_FRACTION`` ·
    tr(ΦᵀHΦ)/N, so that only the weighted Gram is needed; the fallback is that λ₀.

    Args:
      gram: ΦᵀΦ, (k, k) (float64 or float32; read as float64).
      stats: :func:`ridge_statistics` of the checkpoint.
      tolerance: the Gram's rank tolerance (:attr:`trakjax.solve.Spectrum.tolerance`, or
        ``rounding_noise · λ_max`` on a path without a spectrum).
      subset_fraction: α, the fraction of the training set whose removal or keeping the scores
        should predict (1/2 for the LDS's half-subsets).
    """
    if not 0.0 < subset_fraction <= 1.0:
        raise InvalidArgumentError(f"subset_fraction must be in (0, 1], got {subset_fraction!r}")
    if kernel not in ("trak", "gauss-newton"):
        raise InvalidArgumentError(f"kernel must be 'trak' or 'gauss-newton', got {kernel!r}")
    weighted = kernel == "gauss-newton"
    trace = stats.curvature_trace if weighted else stats.trace
    if stats.num_examples < 1 or not trace > 0:
        raise InvalidArgumentError(
            f"auto_lambda needs N >= 1 and trace({'ΦᵀHΦ' if weighted else 'ΦᵀΦ'}) > 0 "
            "(every projected gradient, or every curvature, is zero?)")
    floor = 10.0 * float(tolerance)
    start = START_FRACTION * trace / stats.num_examples
    rho = implied_ridge(gram, stats, start)
    curvature = 1.0 if weighted else stats.curvature_trace / stats.trace
    lam = rho / (subset_fraction * curvature) if curvature > 0 else float("nan")
    if not (np.isfinite(lam) and lam > 0):
        lam = start
    return max(float(lam), floor)
