"""Scores: the ensemble of per-checkpoint kernels, weighted by the out-to-loss term.

With M checkpoints, train features F_m (N, k), target features Ψ_m (T, k) and out-to-loss terms
q^m (N,) (Park et al., 2023, eq. 17 and Algorithm 1)::

    S = ( (1/M) Σ_m F_m Ψ_mᵀ ) ⊙ q̄[:, None],     q̄ = (1/M) Σ_m q^m

S[i, j] is the attribution of train example i to target j: positive for proponents (training
on i raised the target's output), negative for opponents.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCORE_BLOCK_ROWS = 8192


@jax.jit
def _block_scores(train_block, target_features):
    return jnp.matmul(
        train_block.astype(jnp.float32), target_features.astype(jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,
    )


def checkpoint_scores(train_features, target_features, *, block_rows: int = SCORE_BLOCK_ROWS) -> np.ndarray:
    """F Ψᵀ for one checkpoint: (N, k) × (T, k) -> (N, T) float32, block by block over N."""
    n = train_features.shape[0]
    if train_features.shape[1] != target_features.shape[1]:
        raise ValueError(
            f"train features have k={train_features.shape[1]} but target features have "
            f"k={target_features.shape[1]}"
        )
    target = jnp.asarray(np.asarray(target_features, np.float32))
    out = np.empty((n, target.shape[0]), np.float32)
    for start in range(0, n, block_rows):
        block = np.asarray(train_features[start : start + block_rows], np.float32)
        rows = block.shape[0]
        if rows < block_rows and n > block_rows:
            block = np.concatenate([block, np.zeros((block_rows - rows, block.shape[1]), np.float32)])
        out[start : start + rows] = np.asarray(_block_scores(block, target))[:rows]
    return out


def combine(score_sum: np.ndarray, out_to_loss_sum: np.ndarray, num_checkpoints: int) -> np.ndarray:
    """S = (score_sum / M) ⊙ (out_to_loss_sum / M)[:, None]: (N, T) float32.

    Args:
      score_sum: Σ_m F_m Ψ_mᵀ, (N, T).
      out_to_loss_sum: Σ_m q^m, (N,).
      num_checkpoints: M.
    """
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints must be >= 1, got {num_checkpoints}")
    q_mean = np.asarray(out_to_loss_sum, np.float64) / num_checkpoints
    return (np.asarray(score_sum, np.float64) / num_checkpoints * q_mean[:, None]).astype(np.float32)


def ensemble_scores(
    train_features: Sequence, target_features: Sequence, out_to_loss: Sequence
) -> np.ndarray:
    """S for M checkpoints at once, from per-checkpoint F_m (N, k), Ψ_m (T, k) and q^m (N,)."""
    if not (len(train_features) == len(target_features) == len(out_to_loss)) or not train_features:
        raise ValueError(
            "train_features, target_features and out_to_loss need one entry per checkpoint "
            f"(at least one); got {len(train_features)}, {len(target_features)}, {len(out_to_loss)}"
        )
    total = None
    q_total = None
    for f, psi, q in zip(train_features, target_features, out_to_loss, strict=True):
        part = checkpoint_scores(f, psi).astype(np.float64)
        total = part if total is None else total + part
        q64 = np.asarray(q, np.float64)
        q_total = q64 if q_total is None else q_total + q64
    return combine(total, q_total, len(train_features))


@jax.jit
def _block_row_dots(a, b):
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)


def row_dots(a, b, *, block_rows: int = SCORE_BLOCK_ROWS) -> np.ndarray:
    """Σ_c a[i, c] · b[i, c] for every row i: (N, k) × (N, k) -> (N,) float64.

    With a = F_m = Φ_m A_m⁻¹ and b = Φ_m this is the leverage φ_iᵀ A_m⁻¹ φ_i of each training
    example (the diagonal of F_m Φ_mᵀ, without forming the (N, N) matrix).
    """
    if a.shape != b.shape or len(a.shape) != 2:
        raise ValueError(f"row_dots needs two (N, k) arrays of one shape, got {a.shape} and {b.shape}")
    n = a.shape[0]
    out = np.empty(n, np.float64)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        out[start:stop] = np.asarray(
            _block_row_dots(np.asarray(a[start:stop], np.float32), np.asarray(b[start:stop], np.float32))
        )
    return out


def soft_threshold(scores, threshold) -> np.ndarray:
    """The soft-thresholding operator of the TRAK paper (Park et al., 2023, Algorithm 1, optional):

        S'[i, j] = sign(S[i, j]) · max(|S[i, j]| − τ_j, 0)

    It shrinks every score towards zero by τ_j and zeroes those smaller than τ_j in magnitude
    (the paper assumes sparse ground-truth attributions; it chooses τ by cross-validation).

    Args:
      scores: (N, T) scores.
      threshold: τ: a float ≥ 0 for every target, or a (T,) array of per-target thresholds (see
        :func:`sparsity_threshold`).

    Returns:
      (N, T) float32.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_train, n_targets), got shape {scores.shape}")
    tau = np.asarray(threshold, np.float64)
    if tau.ndim == 0:
        tau = np.full(scores.shape[1], float(tau))
    if tau.shape != (scores.shape[1],):
        raise ValueError(
            f"threshold must be a float or a ({scores.shape[1]},) array, got shape {tau.shape}"
        )
    if not np.isfinite(tau).all() or (tau < 0).any():
        raise ValueError("threshold must be finite and >= 0")
    s64 = scores.astype(np.float64)
    return (np.sign(s64) * np.maximum(np.abs(s64) - tau[None, :], 0.0)).astype(np.float32)


def sparsity_threshold(scores, keep_fraction: float) -> np.ndarray:
    """Per-target τ_j that keeps about ``keep_fraction`` of the scores non-zero: (T,) float64.

    τ_j is the (1 − keep_fraction) quantile of |S[:, j]|, for :func:`soft_threshold`.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_train, n_targets), got shape {scores.shape}")
    if not (isinstance(keep_fraction, int | float | np.floating) and 0.0 < keep_fraction <= 1.0):
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    if keep_fraction == 1.0:
        return np.zeros(scores.shape[1])
    return np.quantile(np.abs(scores), 1.0 - keep_fraction, axis=0)
