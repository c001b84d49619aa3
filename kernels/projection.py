"""The Pallas projection kernel: Y = G·R with R (P, k) generated tile by tile inside the kernel.

R never exists in memory. Its entries follow the randomness contract of
:mod:`trakjax.randomness` exactly (Rademacher entries bit for bit, normal entries to a few ulp of
``log``/``sqrt``/``cos``), so the kernel and the jnp/XLA path (:func:`trakjax.projection.project`)
compute the same projection, whatever the tile sizes, chunking or backend.

How the kernel walks R
----------------------
The contract lays rows out as ``row = block·2048 + bit·64 + lane``, and one 32-bit hash word per
(block, lane, column) carries the signs of the 32 rows (bit planes) that share (block, lane). The
grid is (column tiles, batch tiles, segments along P): a program owns one (block_b, block_k) tile
of Y and one segment of up to :data:`SEGMENT_BLOCKS` blocks (the split over P keeps the GPU busy
when B and k are small; segment partial sums are added afterwards, in an order that does not
depend on the tile sizes). Column tiles vary fastest, so programs running together read the same
slab of G from L2. For each block of 2048 rows of its segment, a program:

1. computes the (64, block_k) word tile once (the 64 row keys of the block against the block_k
   column keys; 4 ``mix`` calls per word),
2. loops over the 32 bit planes: plane ``bit`` is rows ``block·2048 + bit·64 + [0, 64)``, i.e. a
   contiguous (block_b, 64) slab of G times a (64, block_k) ±1 tile read out of the words with a
   shift, a mask and an or (the sign bit of the float ±1.0), and accumulates the dot in float32.

So one hash word serves 32 entries and generating a Rademacher entry costs ~3 integer operations;
normal entries (Box–Muller, :func:`trakjax.randomness.normal_from_words`) cost two more ``mix``
calls, a ``log``, a ``sqrt`` and a ``cos`` each, and are generation-bound.

Precision (accumulation is always float32): bfloat16/float16 G times ±1 in the same dtype has
exact products. A float32 G is split into bfloat16 terms ``g = g₁ + g₂ + g₃`` (exact: 3·8
mantissa bits), so ``"highest"`` runs three bfloat16 tensor-core dots with exact products instead
of a float32 FMA loop, ``"high"`` two (g₁ + g₂: 16 mantissa bits, relative error about 2⁻¹⁷
per entry), and ``"default"`` one TF32 dot, as XLA does on GPU. Normal entries are not exact in
bfloat16: ``"highest"`` is a float32 (IEEE) dot, ``"high"`` the bf16×3 split of both operands,
``"default"`` TF32. In interpret mode (CPU) the same splits run with exact products.

Shapes, offsets and index width
-------------------------------
Each ``pallas_call`` gets one chunk of G, padded with zeros to whole tiles: B up to a multiple of
``block_b``, the chunk's columns to whole 2048-row blocks (on the left to the block boundary of
its first row, on the right to the end of its last block), and k up to a multiple of ``block_k``
(the extra columns of Y are dropped). Zero rows and columns contribute exact zeros, so ragged
edges are never wrong. The chunk's first block index is passed in as two uint32 words (hi, lo),
and the kernel carries ``lo`` into ``hi`` where it wraps, so parameter indices beyond 2³² (and up
to 2⁶⁴) are exact. In-kernel column offsets are int32 values below the chunk width, which
:func:`project` and :func:`project_pytree` keep below :data:`MAX_CHUNK_COLUMNS` (2²⁴); Pallas
switches its pointer offsets to 64 bits for arrays over 4 GiB.

Why Triton, and what a Mosaic GPU port would take
-------------------------------------------------
This kernel uses Pallas's Triton backend (``jax.experimental.pallas`` with
``pallas.triton.CompilerParams``), because it is the only Pallas GPU backend that both lowers on
the GPU machines (JAX 0.11, where it is deprecated but present, and no longer the default: the
explicit ``CompilerParams`` select it) and runs under ``interpret=True`` on CPU with JAX 0.10, so
the CPU test suite exercises the very kernel body that runs on the GPU. Mosaic GPU has no public
interpreter. JAX 0.11 emits a ``DeprecationWarning`` when it lowers a Triton ``pallas_call``;
that happens when the enclosing ``jax.jit`` is lowered, not where the kernel is traced, so
:func:`_silence_triton_deprecation` installs a ``warnings`` filter for exactly that message (and
nothing else) the first time a compiled (non-interpret) kernel is built.

A Mosaic GPU port (``jax.experimental.pallas.mosaic_gpu``, Hopper and newer) would take:
``plgpu.kernel`` instead of ``pallas_call``; G tiles streamed through shared memory with TMA
(``plgpu.emit_pipeline`` over the 2048-row blocks and bit planes); the ±1 tile, generated in
registers, stored to shared memory in the swizzled, tiled layout that ``wgmma`` requires of its B
operand (with a fence before the MMA); a warpgroup-sized accumulator (``plgpu.ACC``, M a multiple
of 64) and explicit barriers between generating the next tile and the MMA consuming the previous
one; and GPU-only tests, since Mosaic GPU kernels cannot run on CPU. The randomness contract
needs nothing new: it is 32-bit integer multiply, xor and shift throughout.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from trakjax import projection as projection_lib
from trakjax import randomness
from trakjax.errors import ArgumentTypeError, InvalidArgumentError

ROWS_PER_BLOCK = randomness.ROWS_PER_BLOCK
LANES = randomness.LANES
BITS = randomness.BITS

MAX_CHUNK_COLUMNS = 2**24
"""Most columns of G (rows of R) handed to one ``pallas_call``: keeps in-kernel offsets small."""
SEGMENT_BLOCKS = 32
"""2048-row blocks per grid program along P (65,536 rows): the split over P that keeps the GPU
busy at small B and k. Fixed, so that the summation order never depends on the tile sizes."""
DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Bytes of padded G per ``pallas_call`` chunk in :func:`project_pytree` (default)."""
DEFAULT_BLOCK_B = 64
DEFAULT_BLOCK_K = 128
MIN_BLOCK = 16
"""Triton's dot needs every dimension ≥ 16."""

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SIGN_BIT = 0x80000000
_ONE_F32_BITS = 0x3F800000
_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


# --------------------------------------------------------------------------- kernel body


def _sign_tile(word, bit):
    """Rademacher entries ``1 − 2·((word >> bit) & 1)`` as float32 ±1.0, by building the float.

    Bit ``bit`` of the word is shifted into the float's sign bit and or-ed onto the bits of 1.0.
    """
    sign = (word << (jnp.uint32(31) - bit)) & jnp.uint32(_SIGN_BIT)
    return lax.bitcast_convert_type(sign | jnp.uint32(_ONE_F32_BITS), jnp.float32)


def _split_bf16(x, terms: int):
    """``terms`` bfloat16 arrays whose float32 sum is ``x`` (float32), leading term first.

    Three terms represent a float32 exactly (8 + 8 + 8 mantissa bits).
    """
    parts = []
    rest = x
    for _ in range(terms):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return parts


def _mac(acc, a, b, precision=None):
    """``acc + a·b`` with float32 accumulation (Triton folds the add into the dot)."""
    return acc + jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _accumulate_plane(acc, g, word, bit, kind: str, mode: str):
    """``acc`` plus a (block_b, 64) slab of G times the (64, block_k) entries of plane ``bit``."""
    if kind == "rademacher":
        signs = _sign_tile(word, bit)
        if mode == "native":  # bfloat16 / float16 G: products are exact.
            return _mac(acc, g, signs.astype(g.dtype))
        if mode == "tf32":
            return _mac(acc, g, signs, lax.Precision.DEFAULT)
        # float32 G as bfloat16 terms ("split3": exact; "split2": 16 of G's 24 mantissa bits),
        # each multiplied by the ±1 tile into a fresh float32 product, smallest last-added first.
        # Products are exact; chaining the terms' dots into one accumulator (acc + a·s + b·s + …)
        # measured a relative error of 1.2e-4 on an H200, separate products 1.7e-6.
        signs = signs.astype(jnp.bfloat16)
        parts = _split_bf16(g, 3 if mode == "split3" else 2)
        total = jnp.dot(parts[-1], signs, preferred_element_type=jnp.float32)
        for part in reversed(parts[:-1]):
            total = total + jnp.dot(part, signs, preferred_element_type=jnp.float32)
        return acc + total
    entries = randomness.normal_from_words(word, bit)
    g = g.astype(jnp.float32)
    if mode == "ieee":
        return _mac(acc, g, entries, lax.Precision.HIGHEST)
    if mode == "bf16x3":
        g1, g2 = _split_bf16(g, 2)
        r1, r2 = _split_bf16(entries, 2)
        return _mac(_mac(_mac(acc, g2, r1), g1, r2), g1, r1)
    return _mac(acc, g, entries, lax.Precision.DEFAULT)  # "tf32"


def _projection_kernel(params_ref, g_ref, out_ref, *, kind: str, mode: str, num_blocks: int):
    """One (block_b, block_k) tile of Y = G·R over one segment of the chunk's 2048-row blocks.

    ``params_ref`` holds uint32 (key, first block hi, first block lo, 0); ``g_ref`` is this
    program's (block_b, num_blocks·2048) rows of G; ``out_ref`` is its (block_b, block_k) tile
    of the segment's partial sum. Grid: (column tiles, batch tiles, segments of
    :data:`SEGMENT_BLOCKS` blocks).
    """
    block_b, block_k = out_ref.shape
    key = params_ref[0]
    block_hi = params_ref[1]
    block_lo = params_ref[2]
    first_column = pl.program_id(0) * block_k
    first_block = pl.program_id(2) * SEGMENT_BLOCKS
    segment_blocks = jnp.minimum(SEGMENT_BLOCKS, num_blocks - first_block)
    columns = (first_column + lax.broadcasted_iota(jnp.int32, (block_k,), 0)).astype(jnp.uint32)
    column_keys = randomness.mix((columns * jnp.uint32(randomness.GOLDEN)) ^ key)
    lanes = lax.broadcasted_iota(jnp.int32, (LANES,), 0).astype(jnp.uint32)

    def block_body(step, acc):
        block = first_block + step  # int32 block index within the chunk (< 2**13)
        lo = block_lo + block.astype(jnp.uint32)
        hi = block_hi + (lo < block_lo).astype(jnp.uint32)  # carry where lo wraps
        block_key = randomness.mix(randomness.mix(key ^ hi) + lo)
        row_keys = randomness.mix(block_key + lanes)
        word = randomness.words(row_keys[:, None], column_keys[None, :])  # (64, block_k)

        def plane_body(bit, acc):
            start = pl.multiple_of(block * ROWS_PER_BLOCK + bit * LANES, LANES)
            g = g_ref[:, pl.ds(start, LANES)]
            return _accumulate_plane(acc, g, word, bit.astype(jnp.uint32), kind, mode)

        return lax.fori_loop(0, BITS, plane_body, acc)

    acc = lax.fori_loop(0, segment_blocks, block_body, jnp.zeros((block_b, block_k), jnp.float32))
    out_ref[...] = acc


# --------------------------------------------------------------------------- pallas_call


def _silence_triton_deprecation() -> None:
    """Ignore JAX 0.11's DeprecationWarning for Triton ``pallas_call`` lowering (that message only)."""
    warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)


def _triton_compiler_params(num_warps: int | None, num_stages: int | None):
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot_mode(kind: str, dtype, precision: str) -> str:
    """How :func:`_accumulate_plane` multiplies, for a projection kind, G dtype and precision policy."""
    projection_lib.matmul_precision(precision)  # validates the name
    if kind == "rademacher":
        if jnp.dtype(dtype) != jnp.float32:
            return "native"
        return {"highest": "split3", "high": "split2", "default": "tf32"}[precision]
    return {"highest": "ieee", "high": "bf16x3", "default": "tf32"}[precision]


def _default_interpret() -> bool:
    return jax.default_backend() != "gpu"


def _check_block(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ArgumentTypeError(f"{name} must be an int (a power of two >= {MIN_BLOCK}), got {value!r}")
    value = int(value)
    if value < MIN_BLOCK or value & (value - 1):
        raise InvalidArgumentError(f"{name} must be a power of two >= {MIN_BLOCK}, got {value}")
    return value


def tile_sizes(batch: int, proj_dim: int, block_b: int | None = None, block_k: int | None = None):
    """(block_b, block_k): powers of two ≥ 16, by default no larger than the padded B and k."""
    if block_b is None:
        block_b = min(DEFAULT_BLOCK_B, max(MIN_BLOCK, pl.next_power_of_2(batch)))
    if block_k is None:
        block_k = min(DEFAULT_BLOCK_K, max(MIN_BLOCK, pl.next_power_of_2(proj_dim)))
    return _check_block("block_b", block_b), _check_block("block_k", block_k)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _kernel_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype in _KERNEL_DTYPES:
        return dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    raise ArgumentTypeError(f"gradients must be floating point (float32, bfloat16 or float16), got {dtype}")


def _project_blocks(g, key, block_hi, block_lo, *, kind, proj_dim_padded, block_b, block_k,
                    precision, interpret, num_warps=None, num_stages=None):
    """Y = G·R for a tile-aligned chunk: g (Bp, nb·2048), rows from block (hi, lo); (Bp, kp) f32.

    ``key``, ``block_hi`` and ``block_lo`` are uint32 scalars, possibly traced.
    """
    batch_padded, columns = g.shape
    num_blocks = columns // ROWS_PER_BLOCK
    params = jnp.stack([
        jnp.asarray(key, jnp.uint32), jnp.asarray(block_hi, jnp.uint32),
        jnp.asarray(block_lo, jnp.uint32), jnp.uint32(0),
    ])
    kernel = functools.partial(
        _projection_kernel, kind=kind, mode=_dot_mode(kind, g.dtype, precision),
        num_blocks=num_blocks,
    )
    compiler_params = None
    if not interpret:
        _silence_triton_deprecation()
        if num_warps is None:  # the word, sign and accumulator tiles need the registers of 8 warps
            num_warps = 8 if block_b * block_k >= 64 * 128 else 4
        compiler_params = _triton_compiler_params(num_warps, num_stages)
    num_segments = -(-num_blocks // SEGMENT_BLOCKS)
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_segments, batch_padded, proj_dim_padded), jnp.float32),
        grid=(proj_dim_padded // block_k, batch_padded // block_b, num_segments),
        in_specs=[
            pl.BlockSpec((4,), lambda j, i, s: (0,)),
            pl.BlockSpec((block_b, columns), lambda j, i, s: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_b, block_k), lambda j, i, s: (s, i, j)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="trakjax_projection",
    )(params, g)
    return partials[0] if num_segments == 1 else jnp.sum(partials, axis=0)


def _check_kind(kind: str) -> None:
    if kind not in ("rademacher", "normal"):
        raise InvalidArgumentError(f"kind must be 'rademacher' or 'normal' for the Pallas kernel, got {kind!r}")


# --------------------------------------------------------------------------- public API


def project(
    g,
    *,
    kind: str,
    proj_dim: int,
    key,
    row_start: int = 0,
    precision: str = "highest",
    interpret: bool | None = None,
    block_b: int | None = None,
    block_k: int | None = None,
    chunk_columns: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Y = G · R[row_start : row_start + n] with R generated in the kernel: (B, k) float32.

    No 1/√P scale (see :func:`project_pytree` for φ).

    Args:
      g: (B, n) float32, bfloat16 or float16: n consecutive parameters of B examples.
      kind: ``"rademacher"`` or ``"normal"``.
      proj_dim: k ≥ 1.
      key: the matrix's key, :func:`trakjax.randomness.stream_key` (an int or a uint32 scalar,
        possibly traced).
      row_start: the parameter index of ``g[:, 0]``, a Python int in [0, 2⁶⁴ − n].
      precision: ``"highest"``, ``"high"`` or ``"default"`` (see the module docstring).
      interpret: run the kernel in Pallas interpret mode; default: off GPU.
      block_b, block_k: tile sizes, powers of two ≥ 16 (default: 64 and 128, capped at the
        padded B and k). Results do not depend on them.
      chunk_columns: columns of G per ``pallas_call``, a multiple of 2048 (default: the whole
        block-aligned span, capped at :data:`MAX_CHUNK_COLUMNS`).
      num_warps, num_stages: Triton compiler parameters (compiled mode only).
    """
    _check_kind(kind)
    proj_dim = projection_lib.check_kind_and_dim(kind, proj_dim, 0)
    if key is None:
        raise InvalidArgumentError("project needs key= (the uint32 key of R, trakjax.randomness.stream_key)")
    if g.ndim != 2:
        raise InvalidArgumentError(f"g must be a (B, n) array, got shape {g.shape}")
    batch, num_rows = g.shape
    if isinstance(row_start, bool) or not isinstance(row_start, int | np.integer):
        raise ArgumentTypeError(f"row_start must be a Python int (it may exceed 2**32), got {row_start!r}")
    row_start = int(row_start)
    if row_start < 0 or row_start + num_rows > 2**64:
        raise InvalidArgumentError(f"rows [row_start, row_start + n) must lie in [0, 2**64), got row_start={row_start}, n={num_rows}")
    if chunk_columns is None:
        chunk_columns = MAX_CHUNK_COLUMNS
    if chunk_columns < ROWS_PER_BLOCK or chunk_columns % ROWS_PER_BLOCK or chunk_columns > MAX_CHUNK_COLUMNS:
        raise InvalidArgumentError(
            f"chunk_columns must be a multiple of {ROWS_PER_BLOCK} in [{ROWS_PER_BLOCK}, "
            f"{MAX_CHUNK_COLUMNS}], got {chunk_columns}"
        )
    if interpret is None:
        interpret = _default_interpret()
    dtype = _kernel_dtype(g.dtype)
    block_b, block_k = tile_sizes(batch, proj_dim, block_b, block_k)
    batch_padded = _round_up(batch, block_b)
    proj_dim_padded = _round_up(proj_dim, block_k)
    out = jnp.zeros((batch_padded, proj_dim_padded), jnp.float32)
    if num_rows == 0:
        return out[:batch, :proj_dim]
    first_block = row_start // ROWS_PER_BLOCK
    left = row_start - first_block * ROWS_PER_BLOCK
    span = left + num_rows  # columns of the block-aligned, left-padded chunk
    for chunk_start in range(0, span, chunk_columns):
        chunk_stop = min(chunk_start + chunk_columns, span)
        lo_col, hi_col = max(chunk_start - left, 0), chunk_stop - left
        pad_left = left - chunk_start if chunk_start < left else 0
        width = _round_up(chunk_stop - chunk_start, ROWS_PER_BLOCK)
        piece = g[:, lo_col:hi_col].astype(dtype)
        piece = jnp.pad(piece, ((0, batch_padded - batch), (pad_left, width - pad_left - (hi_col - lo_col))))
        block_hi, block_lo = randomness.split_u64(first_block + chunk_start // ROWS_PER_BLOCK)
        out = out + _project_blocks(
            piece, key, block_hi, block_lo, kind=kind, proj_dim_padded=proj_dim_padded,
            block_b=block_b, block_k=block_k, precision=precision, interpret=interpret,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out[:batch, :proj_dim]


def reference_rows(kind: str, key, num_rows: int, proj_dim: int, row_start: int = 0) -> jax.Array:
    """Rows ``row_start .. row_start + num_rows − 1`` of R, materialized: (num_rows, k) float32.

    The contract's jnp generator (:func:`trakjax.randomness.aligned_rows`, as in
    :func:`trakjax.randomness.projection_matrix`) for a possibly traced ``key``.
    """
    _check_kind(kind)
    first_block = row_start // ROWS_PER_BLOCK
    last_block = -(-(row_start + num_rows) // ROWS_PER_BLOCK)
    block_hi, block_lo = randomness.split_u64(first_block)
    rows = randomness.aligned_rows(
        kind, key, block_hi, block_lo, max(last_block - first_block, 1), proj_dim
    )
    offset = row_start - first_block * ROWS_PER_BLOCK
    return rows[offset : offset + num_rows]


def reference_project(g, *, kind: str, proj_dim: int, key, row_start: int = 0) -> jax.Array:
    """The plain-jnp reference of :func:`project`: G · R with R materialized, (B, k) float32.

    R from :func:`reference_rows`; the matmul is full float32.
    """
    rows = reference_rows(kind, key, g.shape[1], proj_dim, row_start)
    return jnp.matmul(g.astype(jnp.float32), rows, precision=lax.Precision.HIGHEST)


def _pytree_chunk_columns(batch_padded: int, itemsize: int, chunk_bytes: int) -> int:
    columns = chunk_bytes // (batch_padded * itemsize)
    columns = columns // ROWS_PER_BLOCK * ROWS_PER_BLOCK
    return int(min(MAX_CHUNK_COLUMNS, max(ROWS_PER_BLOCK, columns)))


def project_pytree(
    grads,
    *,
    kind: str,
    proj_dim: int | None,
    key,
    precision: str = "highest",
    interpret: bool | None = None,
    block_b: int | None = None,
    block_k: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """φ = Rᵀ g / √P for a pytree of per-example gradients, on the Pallas kernel: (B, k) float32.

    The same value as :func:`trakjax.projection.project` (the XLA path) with the same
    arguments. Leaves (B, *shape) are taken in ``jax.tree_util`` order, each flattened in C
    order, occupying consecutive rows of R from row 0; P is their total per-example size.

    The parameter index space is cut into aligned chunks of whole 2048-row blocks holding about
    ``chunk_bytes`` of (padded) G. A run of chunks inside one leaf is sliced out of that leaf
    in a ``lax.fori_loop`` (the chunk's first block index is carried as two uint32 words); a
    chunk that straddles leaves is assembled from their slices. The leaves are never
    concatenated into one (B, P) array.

    Args:
      grads: pytree of per-example gradients, leaves (B, *leaf_shape), float32/bfloat16/float16.
      kind: ``"rademacher"`` or ``"normal"`` (``"identity"`` is delegated to the XLA path).
      proj_dim: k.
      key: uint32 key of R (:func:`trakjax.randomness.stream_key`), possibly traced.
      precision: ``"highest"``, ``"high"`` or ``"default"``.
      interpret: Pallas interpret mode; default: off GPU.
      block_b, block_k: tile sizes (powers of two ≥ 16); results do not depend on them.
      chunk_bytes: bytes of padded G per kernel call.
      num_warps, num_stages: Triton compiler parameters (compiled mode only).
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        raise InvalidArgumentError("grads has no leaves: nothing to project (check grad_wrt)")
    if kind == "identity":
        return projection_lib.project(grads, kind=kind, proj_dim=proj_dim, precision=precision)
    _check_kind(kind)
    if key is None:
        raise InvalidArgumentError("project_pytree needs key= (the uint32 key of R) for a random projection")
    batch = leaves[0].shape[0]
    flat = []
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != batch:
            raise InvalidArgumentError(
                f"every gradient leaf must have the batch size {batch} as its leading axis, got "
                f"shape {leaf.shape}"
            )
        flat.append(leaf.reshape(batch, -1).astype(_kernel_dtype(leaf.dtype)))
    sizes = [x.shape[1] for x in flat]
    total = sum(sizes)
    proj_dim = projection_lib.check_kind_and_dim(kind, proj_dim, total)
    if chunk_bytes < 1:
        raise InvalidArgumentError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if interpret is None:
        interpret = _default_interpret()
    block_b, block_k = tile_sizes(batch, proj_dim, block_b, block_k)
    batch_padded = _round_up(batch, block_b)
    proj_dim_padded = _round_up(proj_dim, block_k)
    itemsize = max(jnp.dtype(x.dtype).itemsize for x in flat)
    chunk_rows = _pytree_chunk_columns(batch_padded, itemsize, chunk_bytes)
    key = jnp.asarray(key, jnp.uint32)
    call = functools.partial(
        _project_blocks, kind=kind, proj_dim_padded=proj_dim_padded, block_b=block_b,
        block_k=block_k, precision=precision, interpret=interpret, num_warps=num_warps,
        num_stages=num_stages,
    )

    def pad(piece, width):
        return jnp.pad(piece, ((0, batch_padded - batch), (0, width - piece.shape[1])))

    def apply_chunk(acc, piece, block_hi, block_lo):
        return acc + call(pad(piece, _round_up(piece.shape[1], ROWS_PER_BLOCK)), key, block_hi, block_lo)

    init = jnp.zeros((batch_padded, proj_dim_padded), jnp.float32)
    out = projection_lib.accumulate_chunks(flat, chunk_rows, init, apply_chunk)
    return out[:batch, :proj_dim] * jnp.float32(1.0 / math.sqrt(total))


@functools.cache
def gpu_lowering_available() -> tuple[bool, str]:
    """Whether the kernel compiles with Pallas Triton for the default GPU, and why not if not.

    Compiles (without running) a tiny projection: the only reliable test, since support depends
    on the JAX version, the jaxlib build and the GPU model. Cached for the process.
    """
    try:
        platform = jax.default_backend()
    except RuntimeError as err:
        return False, f"no JAX backend ({err})"
    if platform != "gpu":
        return False, f"the default JAX platform is {platform!r}, not 'gpu'"
    device = jax.devices()[0]
    g = jax.ShapeDtypeStruct((MIN_BLOCK, ROWS_PER_BLOCK), jnp.bfloat16)
    key = jax.ShapeDtypeStruct((), jnp.uint32)

    def probe(g, key):
        return project(g, kind="rademacher", proj_dim=MIN_BLOCK, key=key, interpret=False)

    try:
        jax.jit(probe).lower(g, key).compile()
    except Exception as err:  # noqa: BLE001 - any failure means "not available", with its reason
        return False, (
            f"Pallas Triton cannot compile the projection kernel for {device.device_kind} "
            f"(jax {jax.__version__}): {type(err).__name__}: {err}"
        )
    return True, f"Pallas Triton compiles for {device.device_kind} (jax {jax.__version__})"
