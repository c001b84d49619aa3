"""Scores: the ensemble of per-checkpoint kernels, weighted by the out-to-loss term.

With M checkpoints, train features F_m (N, k), target features Ψ_m (T, k) and out-to-loss terms
q^m (N,) (Park et al., 2023, eq. 17 and Algorithm 1)::

    S = ( (1/M) Σ_m F_m Ψ_mᵀ ) ⊙ q̄[:, None],     q̄ = (1/M) Σ_m q^m

S[i, j] is the attribution of train example i to target j: positive for proponents (training
on i raised the target's output), negative for opponents.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import sharding as sharding_lib
from trakjax.solve import row_blocks

SCORE_BLOCK_ROWS = 8192


def _block_scores(train_block, target_features):
    return jnp.matmul(
        train_block.astype(jnp.float32), target_features.astype(jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.cache
def _scores_fn(mesh):
    return sharding_lib.shard_map_rows(_block_scores, mesh, 1, 1)


def checkpoint_scores(train_features, target_features, *, block_rows: int = SCORE_BLOCK_ROWS,
                      mesh=None) -> np.ndarray:
    """F Ψᵀ for one checkpoint: (N, k) × (T, k) -> (N, T) float32, by blocks of train rows
    (split over ``mesh``'s devices when given)."""
    if train_features.shape[1] != target_features.shape[1]:
        raise ValueError(
            f"train features have k={train_features.shape[1]} but target features have "
            f"k={target_features.shape[1]}"
        )
    target = jnp.asarray(np.asarray(target_features, np.float32))
    fn = _scores_fn(mesh if sharding_lib.mesh_size(mesh) > 1 else None)
    out = np.empty((train_features.shape[0], target.shape[0]), np.float32)
    for start, rows, block in row_blocks(train_features, block_rows, sharding_lib.mesh_size(mesh)):
        out[start : start + rows] = np.asarray(fn(block, target))[:rows]
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
