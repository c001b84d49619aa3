"""The sparse Johnson–Lindenstrauss (count-sketch) projection: O(s·K) per example, deterministic.

A dense second stage compresses K numbers to k with a K × k random matrix: O(K·k) work and
memory traffic per example. The sparse map S (randomness contract v3,
:func:`trakjax.randomness.sparse_columns_and_signs`) sends each input coordinate to s distinct
output coordinates, one in each of s blocks of about k/s columns, with random signs (Kane and
Nelson 2014, "Sparser Johnson–Lindenstrauss transforms"; GraSS/FactGraSS, Hu et al. 2025, use it
for gradient compression). It costs O(s·K) per example.

Scaling: with weights ±√(k/s) (:func:`sketch_table`), E[(Su)ᵀ(Su′)] = k·uᵀu′, the same as a dense ±1
map's E[(Rᵀu)ᵀ(Rᵀu′)], so the callers' conventions (E[φᵀφ′] = (k/P)·gᵀg′) hold unchanged. At
s = 1 the variance of one inner product is that of the dense Rademacher map up to a term in
Σ_r u_r²u′_r² (heavy coordinates); larger s shrinks that term by 1/s.

Determinism: no scatter. The map is tabulated once per checkpoint on the host
(:func:`fold_table`): for each output column c, the input rows that land in it and their signs,
padded to the largest column load m with an index one past the input (read as zero). Applying it
is a gather of (B, k, m) and a sum over m in a fixed order: :func:`apply_sketch`. The padding
costs k·m − s·K extra gathers, small when K/k is large (m is close to s·K/k); m depends on
(K, k, s) only (:func:`table_width`), so checkpoints share one compiled step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import randomness
from trakjax.errors import InvalidArgumentError

SECOND_STAGES = ("dense", "sparse")
"""Second stages of the factorized family: the dense contract-v1 R2, or this sparse map."""


class SketchTable(NamedTuple):
    """The sparse map tabulated by output column (a pytree of arrays).

    ``rows``: (k, m) int32, the input rows of each output column, padded with K (one past the
    last input, read as zero); ``weights``: (k, m) float32, their signs times ``scale`` (0 for
    padding).
    """

    rows: jax.Array
    weights: jax.Array


def fold_table(columns: np.ndarray, signs: np.ndarray, k: int, scale: float = 1.0) -> SketchTable:
    """Tabulate a sparse map given row by row (``columns``/``signs`` (K, s)) by output column,
    its weights ``scale·sign``.

    Rows are listed in increasing order within each column (a stable sort), so the fold sums in
    a fixed order. Host-side numpy, once per checkpoint.
    """
    num_rows, sparsity = columns.shape
    flat_columns = columns.reshape(-1)
    flat_rows = np.repeat(np.arange(num_rows, dtype=np.int64), sparsity)
    flat_signs = signs.reshape(-1)
    order = np.argsort(flat_columns, kind="stable")
    counts = np.bincount(flat_columns, minlength=k)
    width = table_width(num_rows, k, sparsity, int(counts.max()) if counts.size else 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(order.size) - np.repeat(starts, counts)
    table_rows = np.full((k, width), num_rows, np.int32)
    table_signs = np.zeros((k, width), np.float32)
    table_rows[flat_columns[order], slot] = flat_rows[order]
    table_signs[flat_columns[order], slot] = flat_signs[order] * np.float32(scale)
    return SketchTable(jnp.asarray(table_rows), jnp.asarray(table_signs))


def table_width(num_rows: int, k: int, sparsity: int, largest_load: int) -> int:
    """The table's width m: a bound on the largest column load that depends on (K, k, s) only,
    μ + 6√μ + 8 rounded up to a multiple of 8 with μ = s·K/k the mean load, so that every
    checkpoint's table has the same shape (one compilation); the load itself when larger (a
    rare event, rounded up likewise)."""
    mean = sparsity * num_rows / k
    bound = int(np.ceil(mean + 6.0 * np.sqrt(mean) + 8.0))
    return -(-max(bound, largest_load, 1) // 8) * 8


def sketch_table(seed: int, model_id: int, kind: str, num_rows: int, k: int, sparsity: int) -> SketchTable:
    """The contract-v3 sparse map from ``num_rows`` inputs to ``k`` outputs, tabulated with
    weights ±√(k/s): E[(Su)ᵀ(Su′)] = k·uᵀu′, as a dense ±1 map."""
    if num_rows < 1 or num_rows >= 2**31:
        raise InvalidArgumentError(f"the sparse second stage needs 1 <= inputs < 2**31, got {num_rows}")
    key = randomness.sparse_key(seed, model_id, kind)
    columns, signs = randomness.sparse_columns_and_signs(key, np.arange(num_rows), k, sparsity)
    return fold_table(columns, signs, k, float(np.sqrt(k / sparsity)))


def apply_sketch(u: jax.Array, table: SketchTable) -> jax.Array:
    """``S u`` (S with the table's weights) for every row of ``u``: (B, K) -> (B, k) float32, pure and jit-able.

    A gather of the table's rows (padding reads an appended zero column) and a sum over the
    table's width: deterministic, no scatter-add.
    """
    u = jnp.asarray(u, jnp.float32)
    padded = jnp.concatenate([u, jnp.zeros((u.shape[0], 1), jnp.float32)], axis=1)
    gathered = jnp.take(padded, table.rows, axis=1)  # (B, k, m)
    return jnp.sum(gathered * table.weights[None], axis=-1)


def check_sparsity(sparsity, k: int | None = None) -> int:
    """``sparsity`` as an int in [1, k] (k when known)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | np.integer) or sparsity < 1:
        raise InvalidArgumentError(f"sparsity must be a positive int, got {sparsity!r}")
    if k is not None and sparsity > k:
        raise InvalidArgumentError(f"sparsity must be at most proj_dim={k}, got {sparsity}")
    return int(sparsity)


__all__ = ["SECOND_STAGES", "SketchTable", "apply_sketch", "check_sparsity", "fold_table", "sketch_table"]
