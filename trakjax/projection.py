"""Random projection of per-example gradients: φ = Rᵀ g / √P, on the jnp/XLA path.

R (P, k) follows the randomness contract in :mod:`trakjax.randomness`: entry (row, column) is a
pure function of (seed, model_id, row, column), so φ does not depend on the batch size, on how
the parameters are chunked, or on the backend. This module never concatenates a batch of
per-example gradients into one (B, P) array, and never holds R whole unless asked to:

* :func:`project` walks the flattened parameter index space in aligned chunks of ``chunk_rows``
  rows. A chunk that lies inside one parameter leaf is read from that leaf in place (a
  ``lax.fori_loop`` over the leaf's chunks); a chunk that straddles leaves (small leaves, or leaf
  ends) is assembled from slices, at most ``chunk_rows`` columns at a time. Each chunk of R is
  generated once per call and applied to every example of the batch.
* :func:`projection_blocks` materializes R once, split into one (n_leaf, k) block per leaf, for
  when P·k fits the memory budget; :func:`project` then applies the blocks, with no generation.

The ``"identity"`` kind has R = I (so k = P): φ = g / √P, the reference's ``NoOpProjector``
followed by its 1/√P normalization.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from trakjax import randomness
from trakjax.errors import ArgumentTypeError, InvalidArgumentError

_PRECISIONS = {
    "highest": lax.Precision.HIGHEST,
    "high": lax.Precision.HIGH,
    "default": lax.Precision.DEFAULT,
}

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Bytes of R generated at a time on the on-the-fly path (per chunk)."""


def matmul_precision(precision: str) -> lax.Precision:
    """Map a precision policy name to ``lax.Precision``.

    ``"highest"`` is full float32 (the default everywhere in trakjax); ``"high"`` and ``"default"``
    allow bf16x3 / TF32 / bf16 passes on accelerators, which are faster and less exact.
    """
    if precision not in _PRECISIONS:
        raise InvalidArgumentError(
            f"precision must be one of {tuple(_PRECISIONS)}, got {precision!r}"
        )
    return _PRECISIONS[precision]


class ParameterLayout(NamedTuple):
    """Where each differentiated leaf sits in the flattened parameter index space.

    ``sizes[i]`` elements of leaf ``i`` occupy rows ``offsets[i] .. offsets[i] + sizes[i] − 1`` of
    R, in ``jax.tree_util`` flattening order, each leaf flattened in C order.
    """

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    total: int


def parameter_layout(tree) -> ParameterLayout:
    """The :class:`ParameterLayout` of a pytree of (unbatched) parameter arrays or shapes."""
    sizes = []
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.shape if hasattr(leaf, "shape") else tuple(leaf)
        sizes.append(int(np.prod(shape, dtype=np.int64)))
    offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1])
    return ParameterLayout(tuple(sizes), offsets, int(sum(sizes)))


def check_kind_and_dim(kind: str, proj_dim: int | None, num_params: int) -> int:
    """Validate ``kind``/``proj_dim`` and return the effective k (``num_params`` for identity)."""
    if kind not in randomness.PROJECTION_KINDS:
        raise InvalidArgumentError(
            f"projection must be one of {randomness.PROJECTION_KINDS}, got {kind!r}"
        )
    if kind == "identity":
        if proj_dim is not None and proj_dim != num_params:
            raise InvalidArgumentError(
                f"projection='identity' keeps all {num_params} differentiated parameters, so "
                f"proj_dim must be None or {num_params}, got {proj_dim}"
            )
        return num_params
    if proj_dim is None:
        raise InvalidArgumentError("proj_dim must be an int >= 1 for a random projection, got None")
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int | np.integer):
        raise ArgumentTypeError(f"proj_dim must be an int >= 1, got {proj_dim!r}")
    if proj_dim < 1:
        raise InvalidArgumentError(f"proj_dim must be >= 1, got {proj_dim}")
    return int(proj_dim)


def default_chunk_rows(proj_dim: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows of R per on-the-fly chunk: a multiple of 2048 holding about ``chunk_bytes`` of R."""
    rows = chunk_bytes // (4 * proj_dim)
    return max(randomness.ROWS_PER_BLOCK, rows // randomness.ROWS_PER_BLOCK * randomness.ROWS_PER_BLOCK)


def projection_blocks(
    layout: ParameterLayout, kind: str, proj_dim: int, key
) -> list[jax.Array]:
    """R materialized as one (size_i, k) float32 block per leaf of ``layout``.

    Args:
      layout: the differentiated parameters' :class:`ParameterLayout`.
      kind: ``"rademacher"`` or ``"normal"``.
      proj_dim: k.
      key: the matrix's 32-bit key, :func:`trakjax.randomness.stream_key` (may be traced).

    Returns:
      A list with one (size_i, k) float32 array per leaf: rows ``offsets[i] ..`` of R.
    """
    blocks = []
    for size, offset in zip(layout.sizes, layout.offsets, strict=True):
        blocks.append(_rows(kind, key, offset, size, proj_dim))
    return blocks


def _rows(kind: str, key, row_start: int, num_rows: int, proj_dim: int) -> jax.Array:
    """Rows [row_start, row_start + num_rows) of R for a (possibly traced) key; static offsets."""
    first_block = row_start // randomness.ROWS_PER_BLOCK
    last_block = -(-(row_start + num_rows) // randomness.ROWS_PER_BLOCK)
    num_blocks = max(last_block - first_block, 1)
    hi, lo = randomness.split_u64(first_block)
    rows = randomness.aligned_rows(kind, key, hi, lo, num_blocks, proj_dim)
    start = row_start - first_block * randomness.ROWS_PER_BLOCK
    return rows[start : start + num_rows]


def project(
    grads,
    *,
    kind: str,
    proj_dim: int | None,
    key=None,
    blocks: list[jax.Array] | None = None,
    chunk_rows: int | None = None,
    precision: str = "highest",
) -> jax.Array:
    """Project a batch of per-example gradients: φ = Rᵀ g / √P.

    Args:
      grads: pytree of per-example gradients, each leaf (B, *leaf_shape), any float dtype.
        Leaves are taken in ``jax.tree_util`` order; P is their total per-example size.
      kind: ``"rademacher"``, ``"normal"`` or ``"identity"``.
      proj_dim: k (``None`` or P for ``"identity"``).
      key: the matrix's uint32 key (:func:`trakjax.randomness.stream_key` of seed, model_id and
        kind); may be a traced scalar. Unused for ``"identity"`` or when ``blocks`` is given.
      blocks: R already materialized by :func:`projection_blocks` for this layout and key.
      chunk_rows: rows of R per generated chunk, a multiple of 2048 (default: about 64 MiB of R).
      precision: matmul precision policy, see :func:`matmul_precision`.

    Returns:
      (B, k) float32 projected features φ.
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        raise InvalidArgumentError("grads has no leaves: nothing to project (check grad_wrt)")
    batch = leaves[0].shape[0]
    flat = [leaf.reshape(batch, -1) for leaf in leaves]
    num_params = sum(x.shape[1] for x in flat)
    proj_dim = check_kind_and_dim(kind, proj_dim, num_params)
    scale = jnp.float32(1.0 / math.sqrt(num_params))
    prec = matmul_precision(precision)

    if kind == "identity":
        return jnp.concatenate([x.astype(jnp.float32) for x in flat], axis=1) * scale

    if blocks is not None:
        if len(blocks) != len(flat):
            raise InvalidArgumentError(
                f"blocks has {len(blocks)} entries but grads has {len(flat)} leaves"
            )
        out = jnp.zeros((batch, proj_dim), jnp.float32)
        for x, block in zip(flat, blocks, strict=True):
            out = out + jnp.matmul(
                x.astype(jnp.float32), block, precision=prec, preferred_element_type=jnp.float32
            )
        return out * scale

    if key is None:
        raise InvalidArgumentError("project needs key= (or blocks=) for a random projection")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(proj_dim)
    if chunk_rows < 1 or chunk_rows % randomness.ROWS_PER_BLOCK:
        raise InvalidArgumentError(
            f"chunk_rows must be a positive multiple of {randomness.ROWS_PER_BLOCK}, got {chunk_rows}"
        )
    return _project_chunked(flat, kind, proj_dim, key, chunk_rows, prec) * scale


class LeafRun(NamedTuple):
    """``count`` whole chunks inside leaf ``leaf``; the first starts at global row ``start``,
    which is column ``local_start`` of the leaf."""

    leaf: int
    start: int
    local_start: int
    count: int


class MixedChunk(NamedTuple):
    """The chunk of rows [start, stop): it straddles leaves or is the ragged last chunk, and is
    assembled from ``(leaf, first column, end column)`` slices."""

    start: int
    stop: int
    pieces: tuple[tuple[int, int, int], ...]


def chunk_plan(sizes, chunk_rows: int) -> list[LeafRun | MixedChunk]:
    """How the flattened parameter axis (leaves of ``sizes``) splits into aligned chunks.

    Chunk c is rows [c·chunk_rows, (c + 1)·chunk_rows) of R. Consecutive chunks that lie inside
    one leaf form a :class:`LeafRun` (read in place, in a loop); any other chunk is a
    :class:`MixedChunk`. There are at most ``len(sizes) + 1`` mixed chunks.
    """
    offsets = np.concatenate([[0], np.cumsum(list(sizes), dtype=np.int64)]).tolist()
    total = offsets[-1]
    num_chunks = -(-total // chunk_rows)
    plan: list[LeafRun | MixedChunk] = []
    chunk = leaf = 0
    while chunk < num_chunks:
        start = chunk * chunk_rows
        stop = min(start + chunk_rows, total)
        while offsets[leaf + 1] <= start:
            leaf += 1
        leaf_start, leaf_stop = offsets[leaf], offsets[leaf + 1]
        if stop - start == chunk_rows and stop <= leaf_stop:
            count = (leaf_stop - start) // chunk_rows
            plan.append(LeafRun(leaf, start, start - leaf_start, count))
            chunk += count
            continue
        pieces = []
        j = leaf
        while j < len(sizes) and offsets[j] < stop:
            first = max(start, offsets[j]) - offsets[j]
            end = min(stop, offsets[j + 1]) - offsets[j]
            if end > first:
                pieces.append((j, first, end))
            j += 1
        plan.append(MixedChunk(start, stop, tuple(pieces)))
        chunk += 1
    return plan


def accumulate_chunks(flat, chunk_rows: int, init, apply_chunk):
    """Fold ``apply_chunk(acc, g_chunk, block_hi, block_lo)`` over the chunks of :func:`chunk_plan`.

    Args:
      flat: per-example gradient leaves, each (B, n_i).
      chunk_rows: rows per chunk, a multiple of 2048.
      init: the initial accumulator.
      apply_chunk: ``(acc, g_chunk (B, width), block_hi, block_lo) -> acc``, where the chunk's
        rows of R start at block (block_hi, block_lo) (uint32 scalars, traced inside loops) and
        ``width`` is ``chunk_rows`` except for the ragged last chunk.

    Chunks inside one leaf are sliced out of it in place within a ``lax.fori_loop``; chunks that
    straddle leaves are assembled from slices (at most ``chunk_rows`` columns at a time).
    """
    blocks_per_chunk = chunk_rows // randomness.ROWS_PER_BLOCK
    acc = init
    for item in chunk_plan([x.shape[1] for x in flat], chunk_rows):
        if isinstance(item, LeafRun):
            x = flat[item.leaf]
            base_hi, base_lo = randomness.split_u64(item.start // randomness.ROWS_PER_BLOCK)

            def body(i, acc, x=x, base_hi=base_hi, base_lo=base_lo, local=item.local_start):
                g_chunk = lax.dynamic_slice_in_dim(x, local + i * chunk_rows, chunk_rows, axis=1)
                lo = jnp.uint32(base_lo) + (i * blocks_per_chunk).astype(jnp.uint32)
                hi = jnp.uint32(base_hi) + (lo < jnp.uint32(base_lo)).astype(jnp.uint32)
                return apply_chunk(acc, g_chunk, hi, lo)

            acc = body(jnp.int32(0), acc) if item.count == 1 else lax.fori_loop(0, item.count, body, acc)
            continue
        pieces = [flat[leaf][:, first:end] for leaf, first, end in item.pieces]
        dtype = jnp.result_type(*[p.dtype for p in pieces])
        g_chunk = pieces[0] if len(pieces) == 1 else jnp.concatenate([p.astype(dtype) for p in pieces], axis=1)
        hi, lo = randomness.split_u64(item.start // randomness.ROWS_PER_BLOCK)
        acc = apply_chunk(acc, g_chunk, jnp.uint32(hi), jnp.uint32(lo))
    return acc


def _project_chunked(flat, kind, proj_dim, key, chunk_rows, prec):
    """Σ over aligned chunks c of G[:, c] @ R[c]; see the module docstring."""
    key = jnp.asarray(key, jnp.uint32)

    def apply_chunk(acc, g_chunk, hi, lo):
        width = g_chunk.shape[1]
        num_blocks = -(-width // randomness.ROWS_PER_BLOCK)
        r_chunk = randomness.aligned_rows(kind, key, hi, lo, num_blocks, proj_dim)[:width]
        return acc + jnp.matmul(
            g_chunk.astype(jnp.float32), r_chunk, precision=prec, preferred_element_type=jnp.float32
        )

    init = jnp.zeros((flat[0].shape[0], proj_dim), jnp.float32)
    return accumulate_chunks(flat, chunk_rows, init, apply_chunk)
