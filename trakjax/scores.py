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
