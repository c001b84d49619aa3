"""Scores: the ensemble of per-checkpoint kernels, weighted by the out-to-loss term.

With M checkpoints, train features F_m (N, k), target features Ψ_m (T, k) and out-to-loss terms
q^m (N,) (Park et al., 2023, eq. 17 and Algorithm 1)::

    S = ( (1/M) Σ_m F_m Ψ_mᵀ ) ⊙ q̄[:, None],     q̄ = (1/M) Σ_m q^m

S[i, j] is the attribution of train example i to target j: positive for proponents (training
on i raised the target's output), negative for opponents.

For score matrices larger than memory, :func:`score_blocks` yields S block by block of train rows
(bit for bit the rows of :func:`ensemble_scores`), and :func:`top_k` keeps the top proponents and
opponents of each target from such a stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import sharding as sharding_lib
from trakjax.errors import InvalidArgumentError

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
        raise InvalidArgumentError(
            f"train features have k={train_features.shape[1]} but target features have "
            f"k={target_features.shape[1]}"
        )
    target = jnp.asarray(np.asarray(target_features, np.float32))
    n = train_features.shape[0]
    out = np.empty((n, target.shape[0]), np.float32)
    step = sharding_lib.round_up(block_rows, sharding_lib.mesh_size(mesh))
    for start in range(0, n, step):
        stop = min(start + step, n)
        out[start:stop] = _score_rows(train_features, target, start, stop, block_rows, mesh)
    return out


def _score_rows(train_features, target, start: int, stop: int, block_rows: int, mesh=None) -> np.ndarray:
    """Rows [start, stop) of F Ψᵀ, one block (stop − start ≤ block_rows rounded up to the
    mesh size), on a device target.

    The block is padded to that size whenever N exceeds it (and to a multiple of the device
    count otherwise), so every block of a matrix has one compiled shape and a row's scores never
    depend on which block computed them.
    """
    devices = sharding_lib.mesh_size(mesh)
    full = sharding_lib.round_up(block_rows, devices)
    n = train_features.shape[0]
    block = np.asarray(train_features[start:stop], np.float32)
    rows = block.shape[0]
    target_rows = full if n > full else sharding_lib.round_up(rows, devices)
    if rows < target_rows:
        block = np.concatenate([block, np.zeros((target_rows - rows, block.shape[1]), np.float32)])
    fn = _scores_fn(mesh if devices > 1 else None)
    return np.asarray(fn(block, target))[:rows]


def ensemble(per_checkpoint: Iterable[tuple]):
    """S = ((1/M) Σ_m S_m) ⊙ q̄[:, None] from one ``(S_m, q^m)`` pair per checkpoint.

    ``S_m`` is (N, T) (e.g. F_m Ψ_mᵀ, or a (N, 1) column of leverages) and ``q^m`` (N,). The
    pairs may come from a generator: they are consumed once, in order, and only the running sums
    are held. Numpy inputs are summed in float64 and give float32; jax arrays (inside ``jax.jit``)
    are summed in their own dtype and give that dtype.

    Raises:
      InvalidArgumentError: if there is no pair.
    """
    total = q_total = None
    count = 0
    for part, q in per_checkpoint:
        if not isinstance(part, jax.Array):
            part, q = np.asarray(part, np.float64), np.asarray(q, np.float64)
        total = part if total is None else total + part
        q_total = q if q_total is None else q_total + q
        count += 1
    return combine(total, q_total, count)


def combine(score_sum, out_to_loss_sum, num_checkpoints: int):
    """S = (score_sum / M) ⊙ (out_to_loss_sum / M)[:, None]: (N, T).

    Args:
      score_sum: Σ_m S_m, (N, T), numpy (float64 sums give float32 scores) or jax.
      out_to_loss_sum: Σ_m q^m, (N,).
      num_checkpoints: M.
    """
    if num_checkpoints < 1:
        raise InvalidArgumentError(f"the ensemble needs at least one checkpoint, got {num_checkpoints}")
    if isinstance(score_sum, jax.Array):
        return (score_sum / num_checkpoints) * (out_to_loss_sum / num_checkpoints)[:, None]
    q_mean = np.asarray(out_to_loss_sum, np.float64) / num_checkpoints
    return (np.asarray(score_sum, np.float64) / num_checkpoints * q_mean[:, None]).astype(np.float32)


def _check_per_checkpoint(train_features, target_features, out_to_loss) -> None:
    if not (len(train_features) == len(target_features) == len(out_to_loss)) or not train_features:
        raise InvalidArgumentError(
            "train_features, target_features and out_to_loss need one entry per checkpoint "
            f"(at least one); got {len(train_features)}, {len(target_features)}, {len(out_to_loss)}"
        )


def ensemble_scores(
    train_features: Sequence, target_features: Sequence, out_to_loss: Sequence
) -> np.ndarray:
    """S for M checkpoints at once, from per-checkpoint F_m (N, k), Ψ_m (T, k) and q^m (N,)."""
    _check_per_checkpoint(train_features, target_features, out_to_loss)
    return ensemble(
        (checkpoint_scores(f, psi), q)
        for f, psi, q in zip(train_features, target_features, out_to_loss, strict=True)
    )


def num_score_blocks(num_train: int, block_rows: int = SCORE_BLOCK_ROWS) -> int:
    """Number of row blocks :func:`score_blocks` splits N train rows into."""
    return -(-int(num_train) // int(block_rows))


def score_blocks(
    train_features: Sequence,
    target_features: Sequence,
    out_to_loss: Sequence,
    *,
    block_rows: int = SCORE_BLOCK_ROWS,
    blocks: Iterable[int] | None = None,
    mesh=None,
) -> Iterator[tuple[int, np.ndarray]]:
    """S block by block over train rows, never the whole (N, T) matrix: bounded memory.

    Block b holds rows [b·block_rows, min((b + 1)·block_rows, N)) of
    ``S = ((1/M) Σ_m F_m Ψ_mᵀ) ⊙ q̄[:, None]``; each block's values are bit for bit those of
    :func:`ensemble_scores` (the same compiled block shapes, the same float64 sums in checkpoint
    order). Memory is about ``block_rows · T · 24`` bytes plus the M target matrices.

    Args:
      train_features: M arrays F_m (N, k), any float dtype; memory maps are read block by block.
      target_features: M arrays Ψ_m (T, k).
      out_to_loss: M arrays q^m (N,).
      block_rows: rows per block.
      blocks: which block numbers to compute (default: all, in order).
      mesh: split each block's rows over this mesh's devices (``block_rows`` should then be a
        multiple of the device count).

    Yields:
      ``(first_row, block)`` with ``block`` (rows, T) float32.
    """
    _check_per_checkpoint(train_features, target_features, out_to_loss)
    n = train_features[0].shape[0]
    for m, (f, psi, q) in enumerate(zip(train_features, target_features, out_to_loss, strict=True)):
        if f.shape[0] != n or np.shape(q) != (n,) or f.shape[1] != psi.shape[1]:
            raise InvalidArgumentError(
                f"checkpoint {m}: train features {tuple(f.shape)}, target features "
                f"{tuple(psi.shape)} and out_to_loss {np.shape(q)} do not fit N={n}"
            )
    targets = [jnp.asarray(np.asarray(psi, np.float32)) for psi in target_features]
    for b in range(num_score_blocks(n, block_rows)) if blocks is None else blocks:
        start = int(b) * block_rows
        stop = min(start + block_rows, n)
        if not 0 <= start < n:
            raise InvalidArgumentError(
                f"block {b} is out of range: N={n} rows make {num_score_blocks(n, block_rows)} blocks"
            )
        yield start, ensemble(
            (_score_rows(f, target, start, stop, block_rows, mesh), q[start:stop])
            for f, target, q in zip(train_features, targets, out_to_loss, strict=True)
        )


class TopK(NamedTuple):
    """The k highest and k lowest scores of each target.

    Attributes:
      proponents: (k, T) int64 train indices, highest score first.
      proponent_scores: (k, T) float32, descending.
      opponents: (k, T) int64 train indices, lowest (most negative) score first.
      opponent_scores: (k, T) float32, ascending.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def _keep_top(best_idx, best_val, start, block, k):
    """Merge a (rows, T) block whose first row is ``start`` into the running top-k (largest).

    Returns ``(indices, values)``, each (min(k, rows seen), T). Once k rows are held, only block
    entries above a column's current k-th value are candidates, so a block costs one comparison
    pass plus a sort of its few candidates.
    """
    num_targets = block.shape[1]
    if best_val is not None and best_val.shape[0] == k:
        threshold = best_val.min(axis=0)
        rows, cols = np.nonzero(block > threshold[None, :])
        if rows.size == 0:
            return best_idx, best_val
        values = np.concatenate([best_val.ravel(), block[rows, cols]])
        columns = np.concatenate([np.tile(np.arange(num_targets), k), cols])
        indices = np.concatenate([best_idx.ravel(), start + rows.astype(np.int64)])
        order = np.lexsort((indices, -values, columns))
        firsts = np.searchsorted(columns[order], np.arange(num_targets))
        pick = order[firsts[None, :] + np.arange(k)[:, None]]
        return indices[pick], values[pick]
    if best_val is None:
        candidates = block
        candidate_idx = np.broadcast_to(start + np.arange(block.shape[0])[:, None], block.shape)
    else:
        candidates = np.concatenate([best_val, block])
        candidate_idx = np.concatenate(
            [best_idx, np.broadcast_to(start + np.arange(block.shape[0])[:, None], block.shape)]
        )
    order = np.lexsort((candidate_idx, -candidates), axis=0)[:k]
    return np.take_along_axis(candidate_idx, order, axis=0), np.take_along_axis(candidates, order, axis=0)


def _sorted(indices, values):
    """Order each column by value descending, ties by index ascending."""
    order = np.lexsort((indices, -values), axis=0)
    return np.take_along_axis(indices, order, axis=0), np.take_along_axis(values, order, axis=0)


def top_k(blocks: Iterable[tuple[int, np.ndarray]], k: int) -> TopK:
    """Top-k proponents and opponents of every target from a stream of score blocks.

    Only the running (k, T) winners and one block are held: the (N, T) matrix never is.
    Ties are broken towards the lower train index when blocks come in ascending row order (as
    :func:`score_blocks` yields them); out of order, any of the rows tied at the k-th place may
    be kept.

    Args:
      blocks: ``(first_row, block (rows, T))`` pairs, e.g. from :func:`score_blocks` or slices
        of a stored score matrix; rows may come in any order but must not repeat.
      k: how many of each to keep (fewer if the stream has fewer rows).

    Returns:
      :class:`TopK`.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidArgumentError(f"k must be an int >= 1, got {k!r}")
    top_idx = top_val = low_idx = low_val = None
    for start, block in blocks:
        block = np.asarray(block, np.float32)
        if block.ndim != 2:
            raise InvalidArgumentError(f"score blocks must be (rows, T), got shape {block.shape}")
        top_idx, top_val = _keep_top(top_idx, top_val, int(start), block, int(k))
        low_idx, neg_val = _keep_top(low_idx, None if low_val is None else -low_val, int(start), -block, int(k))
        low_val = -neg_val
    if top_val is None:
        raise InvalidArgumentError("top_k got no score blocks")
    top_idx, top_val = _sorted(top_idx, top_val)
    low_idx, neg = _sorted(low_idx, -low_val)
    return TopK(top_idx, top_val, low_idx, -neg)


@jax.jit
def _block_row_dots(a, b):
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)


def row_dots(a, b, *, block_rows: int = SCORE_BLOCK_ROWS) -> np.ndarray:
    """Σ_c a[i, c] · b[i, c] for every row i: (N, k) × (N, k) -> (N,) float64.

    With a = F_m = Φ_m A_m⁻¹ and b = Φ_m this is the leverage φ_iᵀ A_m⁻¹ φ_i of each training
    example (the diagonal of F_m Φ_mᵀ, without forming the (N, N) matrix).
    """
    if a.shape != b.shape or len(a.shape) != 2:
        raise InvalidArgumentError(f"row_dots needs two (N, k) arrays of one shape, got {a.shape} and {b.shape}")
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
        raise InvalidArgumentError(f"scores must be (n_train, n_targets), got shape {scores.shape}")
    tau = np.asarray(threshold, np.float64)
    if tau.ndim == 0:
        tau = np.full(scores.shape[1], float(tau))
    if tau.shape != (scores.shape[1],):
        raise InvalidArgumentError(
            f"threshold must be a float or a ({scores.shape[1]},) array, got shape {tau.shape}"
        )
    if not np.isfinite(tau).all() or (tau < 0).any():
        raise InvalidArgumentError("threshold must be finite and >= 0")
    s64 = scores.astype(np.float64)
    return (np.sign(s64) * np.maximum(np.abs(s64) - tau[None, :], 0.0)).astype(np.float32)


def sparsity_threshold(scores, keep_fraction: float) -> np.ndarray:
    """Per-target τ_j that keeps about ``keep_fraction`` of the scores non-zero: (T,) float64.

    τ_j is the (1 − keep_fraction) quantile of |S[:, j]|, for :func:`soft_threshold`.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise InvalidArgumentError(f"scores must be (n_train, n_targets), got shape {scores.shape}")
    if not (isinstance(keep_fraction, int | float | np.floating) and 0.0 < keep_fraction <= 1.0):
        raise InvalidArgumentError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    if keep_fraction == 1.0:
        return np.zeros(scores.shape[1])
    return np.quantile(np.abs(scores), 1.0 - keep_fraction, axis=0)
