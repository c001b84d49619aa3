"""The randomness contract: the projection matrix R as a pure function of (seed, model_id, row, column).

Every backend (this jnp path, the Pallas kernel in ``trakjax.kernels.projection``, any future one)
computes exactly these entries, so projected features never depend on batch size, parameter
chunking, tile size, device count or backend. Stores record :data:`CONTRACT_VERSION`; any change
to the functions below must bump it.

Contract version 1
------------------
All arithmetic is on unsigned 32-bit words (multiply, add, xor and logical shift, wrapping
modulo 2³²), which Pallas's Triton backend lowers::

    mix(x)        = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    GOLDEN        = 0x9e3779b9
    key           = mix(mix(mix(seed_lo ^ GOLDEN) ^ seed_hi) ^ model_id) + kind_tag)
                    kind_tag: 1 for "rademacher", 2 for "normal"
    block         = row >> 11            (64-bit: rows are parameter indices, which pass 2³²)
    bit           = (row >> 6) & 31
    lane          = row & 63
    block_key     = mix(mix(key ^ block_hi) + block_lo)          block = block_hi·2³² + block_lo
    row_key       = mix(block_key + lane)
    column_key    = mix((column · GOLDEN) ^ key)
    word          = mix(mix(row_key ^ column_key) + row_key)

Rademacher: ``R[row, column] = 1 − 2·((word >> bit) & 1)``, so one hash word serves the 32 rows
that share (block, lane): a generator computes a (64, k) word tile per block of 2048 rows and
reads 32 sign planes out of it.

Normal: with ``h1 = mix(word + (2·bit + 1)·GOLDEN)`` and ``h2 = mix(word + (2·bit + 2)·GOLDEN)``,
``u1 = ((h1 >> 8) + 0.5)·2⁻²⁴`` in (0, 1), ``u2 = (h2 >> 8)·2⁻²⁴`` in [0, 1), and the entry is the
Box–Muller value ``sqrt(−2 ln u1)·cos(2π u2)`` in float32. Rademacher entries are exact on every
backend; normal entries agree across backends to the float32 rounding of ``log``, ``sqrt`` and
``cos`` (a few ulp).

``seed`` is in [0, 2⁶⁴) and ``model_id`` in [0, 2³²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trakjax.errors import ArgumentTypeError, InvalidArgumentError

CONTRACT_VERSION = 1
"""Version of the randomness contract; recorded in every store."""

ROWS_PER_BLOCK = 2048
"""Rows of R that share one block key: 32 sign planes × 64 lanes."""
LANES = 64
BITS = 32

PROJECTION_KINDS = ("rademacher", "normal", "identity")
_KIND_TAGS = {"rademacher": 1, "normal": 2}

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
GOLDEN = 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def mix(x):
    """The lowbias32 integer finalizer on uint32 arrays (jnp or numpy); a bijection of 2³²."""
    x = x ^ (x >> 16)
    x = x * _u32(_M1, x)
    x = x ^ (x >> 15)
    x = x * _u32(_M2, x)
    x = x ^ (x >> 16)
    return x


def _u32(value: int, like):
    """``value`` as a uint32 scalar of the same array library as ``like``."""
    if isinstance(like, np.ndarray | np.integer):
        return np.uint32(value)
    return jnp.uint32(value)


def _mix_int(x: int) -> int:
    """:func:`mix` on a Python int (used to derive scalar keys on the host)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def check_seed_and_model_id(seed: int, model_id: int) -> None:
    """Raise ``ValueError`` unless ``seed`` and ``model_id`` fit the contract's word sizes."""
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise ArgumentTypeError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise InvalidArgumentError(f"seed must be in [0, 2**64), got {seed}")
    if not isinstance(model_id, int | np.integer) or isinstance(model_id, bool):
        raise ArgumentTypeError(f"model_id must be an int in [0, 2**32), got {model_id!r}")
    if not 0 <= int(model_id) < 2**32:
        raise InvalidArgumentError(f"model_id must be in [0, 2**32), got {model_id}")


def stream_key(seed: int, model_id: int, kind: str) -> int:
    """The 32-bit key of one projection matrix, as a Python int.

    Args:
      seed: the projection seed, in [0, 2⁶⁴).
      model_id: the checkpoint's id, in [0, 2³²); checkpoints get different matrices.
      kind: ``"rademacher"`` or ``"normal"``.
    """
    check_seed_and_model_id(seed, model_id)
    if kind not in _KIND_TAGS:
        raise InvalidArgumentError(f"kind must be 'rademacher' or 'normal' to have a key, got {kind!r}")
    seed = int(seed)
    key = _mix_int((seed & _MASK32) ^ GOLDEN)
    key = _mix_int(key ^ (seed >> 32))
    key = _mix_int(key ^ int(model_id))
    return (key + _KIND_TAGS[kind]) & _MASK32


def column_keys(key, proj_dim: int, column_start: int = 0):
    """``column_key`` for columns ``column_start .. column_start + proj_dim − 1``: (k,) uint32."""
    key = jnp.asarray(key, jnp.uint32)
    columns = jnp.arange(column_start, column_start + proj_dim, dtype=jnp.uint32)
    return mix((columns * jnp.uint32(GOLDEN)) ^ key)


def block_row_keys(key, block_hi, block_lo, num_blocks: int):
    """``row_key`` for the 64 lanes of ``num_blocks`` consecutive blocks: (num_blocks, 64) uint32.

    ``block_hi``/``block_lo`` are the two 32-bit words of the first block's index (Python ints
    or traced uint32 scalars); the block index is carried into ``block_hi`` where ``block_lo`` wraps.
    """
    key = jnp.asarray(key, jnp.uint32)
    block_hi = jnp.asarray(block_hi, jnp.uint32)
    block_lo = jnp.asarray(block_lo, jnp.uint32)
    lo = block_lo + jnp.arange(num_blocks, dtype=jnp.uint32)
    hi = block_hi + (lo < block_lo).astype(jnp.uint32)
    block_key = mix(mix(key ^ hi) + lo)
    return mix(block_key[:, None] + jnp.arange(LANES, dtype=jnp.uint32)[None, :])


def words(row_key, col_key):
    """The contract's hash word for broadcastable ``row_key`` and ``column_key`` arrays."""
    return mix(mix(row_key ^ col_key) + row_key)


def rademacher_from_words(word, bit):
    """±1.0 float32 entries from hash words and sign-plane indices (broadcastable)."""
    return 1.0 - 2.0 * ((word >> bit) & jnp.uint32(1)).astype(jnp.float32)


def normal_from_words(word, bit):
    """Standard normal float32 entries from hash words and sign-plane indices (Box–Muller)."""
    bit = jnp.asarray(bit, jnp.uint32)
    h1 = mix(word + (2 * bit + 1) * jnp.uint32(GOLDEN))
    h2 = mix(word + (2 * bit + 2) * jnp.uint32(GOLDEN))
    scale = jnp.float32(2.0**-24)
    u1 = ((h1 >> 8).astype(jnp.float32) + jnp.float32(0.5)) * scale
    u2 = (h2 >> 8).astype(jnp.float32) * scale
    return jnp.sqrt(jnp.float32(-2.0) * jnp.log(u1)) * jnp.cos(jnp.float32(2.0 * np.pi) * u2)


def split_u64(value: int) -> tuple[int, int]:
    """(hi, lo) 32-bit words of a non-negative Python int below 2⁶⁴."""
    if not 0 <= value < 2**64:
        raise InvalidArgumentError(f"row index must be in [0, 2**64), got {value}")
    return value >> 32, value & _MASK32


def aligned_rows(kind: str, key, block_hi, block_lo, num_blocks: int, proj_dim: int):
    """R rows for ``num_blocks`` whole blocks starting at block (hi, lo): (num_blocks·2048, k) f32.

    ``block_hi``/``block_lo`` may be traced uint32 scalars (e.g. inside ``lax.fori_loop``).
    """
    row_keys = block_row_keys(key, block_hi, block_lo, num_blocks)  # (nb, 64)
    col_keys = column_keys(key, proj_dim)  # (k,)
    word = words(row_keys[:, None, :, None], col_keys[None, None, None, :])  # (nb, 1, 64, k)
    bit = jnp.arange(BITS, dtype=jnp.uint32)[None, :, None, None]  # (1, 32, 1, 1)
    if kind == "rademacher":
        entries = rademacher_from_words(word, bit)
    elif kind == "normal":
        entries = normal_from_words(word, bit)
    else:
        raise InvalidArgumentError(f"kind must be 'rademacher' or 'normal', got {kind!r}")
    return entries.reshape(num_blocks * ROWS_PER_BLOCK, proj_dim)


def projection_matrix(
    kind: str, seed: int, model_id: int, row_start: int, num_rows: int, proj_dim: int
) -> jax.Array:
    """Rows ``row_start .. row_start + num_rows − 1`` of the contract's R: (num_rows, k) float32.

    This is the plain reference generator: every other path (chunked projection, the Pallas
    kernel) is tested against it. ``row_start`` may exceed 2³².

    Args:
      kind: ``"rademacher"`` (entries ±1) or ``"normal"`` (entries N(0, 1)).
      seed: projection seed in [0, 2⁶⁴).
      model_id: checkpoint id in [0, 2³²).
      row_start: first parameter index (a Python int, any size below 2⁶⁴).
      num_rows: number of rows.
      proj_dim: k, the number of columns.
    """
    if kind not in _KIND_TAGS:
        raise InvalidArgumentError(
            f"projection kind must be one of ('rademacher', 'normal') to have a random matrix, got {kind!r}"
        )
    if proj_dim < 1:
        raise InvalidArgumentError(f"proj_dim must be >= 1, got {proj_dim}")
    if num_rows < 0 or row_start < 0:
        raise InvalidArgumentError(f"row_start and num_rows must be >= 0, got {row_start}, {num_rows}")
    key = stream_key(seed, model_id, kind)
    first_block = row_start // ROWS_PER_BLOCK
    last_block = (row_start + num_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    num_blocks = max(last_block - first_block, 1)
    block_hi, block_lo = split_u64(first_block)
    rows = aligned_rows(kind, key, block_hi, block_lo, num_blocks, proj_dim)
    offset = row_start - first_block * ROWS_PER_BLOCK
    return rows[offset : offset + num_rows]


# --------------------------------------------------------------------------- factor matrices (v2)

FACTOR_CONTRACT_VERSION = 2
"""Version of the randomness contract of the factorized projection family.

Contract v2 = contract v1's dense R, unchanged, plus the factor matrices below. A store holding
factorized features records this version (and the dense family keeps recording
:data:`CONTRACT_VERSION`); any change to the functions of this section must bump it.

Factor matrices (contract v2)
-----------------------------
A factorized leaf W has two axis groups ("sides": side 0 holds the leaf's first axis that is not a
slice axis, side 1 the other group; slice axes, if any, belong to neither). Each (slice, side)
has its own factor matrix P (rows: the side's flattened index, row-major over its leaf axes in
the leaf's order, plus one last row when a bias is folded into that side; columns: the side's
k)::

    path_hash     = FNV-1a 32-bit over the UTF-8 bytes of the leaf's canonical path:
                    h = 0x811c9dc5; for each byte c: h = ((h ^ c) · 0x01000193) mod 2³²
    base          = stream_key(seed, model_id, kind)                    (contract v1)
    factor_key    = mix(mix(mix(mix(mix(base ^ FACTOR_DOMAIN) + path_hash) ^ slice_hi) + slice_lo)
                        ^ (side + 1))
                    FACTOR_DOMAIN = 0x85ebca6b; slice = slice_hi·2³² + slice_lo, the row-major
                    index over the leaf's slice axes (0 for an unsliced leaf); side ∈ {0, 1}
    P[row, col]   = contract v1's entry formula (Rademacher ±1 or Box–Muller normal) with
                    key = factor_key, row = row, column = col

that is, P is rows 0 .. d − 1 of the v1 matrix generated under ``factor_key``
(:func:`aligned_rows`), so the same Pallas-friendly integer ops produce it, and any row can be
generated alone (:func:`factor_rows`, for embedding gathers). The canonical path is the
'/'-joined leaf path (``trakjax.featurize.parameter_paths`` style) with NNX variable wrappers
(the ``value`` attribute key of an ``nnx.Variable``) removed, so linen variables,
``trakjax.flax.from_nnx`` params and an ``nnx.State`` give the same path. A side whose factor
size is at least its dimension is the identity and has no factor matrix.

The second-stage projection (compressing the concatenated factorized features u, K_fac long, to
proj_dim) is contract v1's R generated under its own key::

    second_stage_key = mix(mix(base ^ SECOND_STAGE_DOMAIN) + 0x27d4eb2f)   SECOND_STAGE_DOMAIN = 0xc2b2ae35

with rows 0 .. K_fac − 1 (the index into u) and columns 0 .. proj_dim − 1.
"""

FACTOR_DOMAIN = 0x85EBCA6B
SECOND_STAGE_DOMAIN = 0xC2B2AE35
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def path_hash(path: str) -> int:
    """FNV-1a (32-bit) of ``path``'s UTF-8 bytes, as a Python int."""
    if not isinstance(path, str):
        raise ArgumentTypeError(f"path must be a str, got {path!r}")
    h = _FNV_OFFSET
    for byte in path.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK32
    return h


def factor_key(seed: int, model_id: int, kind: str, path: str, slice_index: int, side: int) -> int:
    """The 32-bit key of one factor matrix (contract v2), as a Python int.

    Args:
      seed, model_id, kind: as in :func:`stream_key`.
      path: the leaf's canonical path ('/'-joined, NNX ``value`` keys removed).
      slice_index: row-major index over the leaf's slice axes (scanned layers, per-head weights),
        in [0, 2⁶⁴); 0 for an unsliced leaf.
      side: 0 (the leaf's leading axis group) or 1 (the trailing group).
    """
    if side not in (0, 1):
        raise InvalidArgumentError(f"side must be 0 or 1, got {side!r}")
    hi, lo = split_u64(int(slice_index))
    key = _mix_int(stream_key(seed, model_id, kind) ^ FACTOR_DOMAIN)
    key = _mix_int(key + path_hash(path))
    key = _mix_int(key ^ hi)
    key = _mix_int(key + lo)
    return _mix_int(key ^ (side + 1))


def second_stage_key(seed: int, model_id: int, kind: str) -> int:
    """The 32-bit key of the second-stage projection of the factorized family (contract v2)."""
    key = _mix_int(stream_key(seed, model_id, kind) ^ SECOND_STAGE_DOMAIN)
    return _mix_int(key + 0x27D4EB2F)


def factor_matrix(kind: str, key, num_rows: int, k: int) -> jax.Array:
    """Rows 0 .. num_rows − 1 of the factor matrix with (possibly traced) ``key``: (num_rows, k) f32."""
    if num_rows < 1 or k < 1:
        raise InvalidArgumentError(f"num_rows and k must be >= 1, got {num_rows}, {k}")
    num_blocks = -(-num_rows // ROWS_PER_BLOCK)
    return aligned_rows(kind, key, 0, 0, num_blocks, k)[:num_rows]


def factor_rows(kind: str, key, rows, k: int) -> jax.Array:
    """Chosen rows of a factor matrix: ``rows`` (any shape, integer, < 2³²) -> (*rows.shape, k) f32.

    Equal to ``factor_matrix(kind, key, n, k)[rows]`` without generating the other rows (for
    embedding gathers: the rows of the token ids only).
    """
    key = jnp.asarray(key, jnp.uint32)
    rows = jnp.asarray(rows).astype(jnp.uint32)
    block = rows >> 11
    bit = (rows >> 6) & jnp.uint32(31)
    lane = rows & jnp.uint32(63)
    block_key = mix(mix(key ^ jnp.uint32(0)) + block)
    row_key = mix(block_key + lane)
    word = words(row_key[..., None], column_keys(key, k))
    if kind == "rademacher":
        return rademacher_from_words(word, bit[..., None])
    if kind == "normal":
        return normal_from_words(word, bit[..., None])
    raise InvalidArgumentError(f"kind must be 'rademacher' or 'normal', got {kind!r}")


# --------------------------------------------------------------------------- sparse second stage (v3)

SPARSE_CONTRACT_VERSION = 4
"""Version of the randomness contract of the sparse (count-sketch) second stage.

Contract v3 = contract v2, unchanged, plus the sparse Johnson–Lindenstrauss map below. Contract
v4 = v3 with the same map; what it compresses changed: the factorized family's dense remainder
(the leaves that are not factorized; up to
:data:`trakjax.factorized.plan.WHOLE_REMAINDER_LIMIT` parameters) enters the sparse map whole,
after the factor blocks, where
v3 first projected it to proj_dim with contract v1's dense R_rest (O(P_rest·k) per example, most
of a small model's featurization time). A store whose factorized features were compressed by the
sparse second stage records this version (dense second-stage stores keep
:data:`FACTOR_CONTRACT_VERSION`), so a v3 store is refused with its configuration rather than
mixed; any change to the functions of this section must bump it.

Sparse map (contract v3)
------------------------
The output columns 0 .. k − 1 are cut into s blocks, block j holding columns
``start_j = ⌊j·k/s⌋ .. start_{j+1} − 1`` (size ``n_j = start_{j+1} − start_j``). Input row r
(an index into the features being compressed, < 2³²) goes to exactly one column of each block,
with a sign::

    base          = stream_key(seed, model_id, kind)                    (contract v1)
    sparse_key    = mix(mix(base ^ SPARSE_DOMAIN) + 0x165667b1)          SPARSE_DOMAIN = 0x27d4eb2f
    row_word      = mix(mix(sparse_key ^ r) + GOLDEN)
    word_j        = mix(row_word + (j + 1)·0x85ebca77)
    column_j(r)   = start_j + ((word_j >> 1) mod n_j)
    sign_j(r)     = 1 − 2·(word_j & 1)

so S (k × K) has s entries ±1 in each column r, one per block, and E[(Su)ᵀ(Su′)] = s·uᵀu′.
"""

SPARSE_DOMAIN = 0x27D4EB2F
_SPARSE_SALT = 0x165667B1
_BLOCK_STEP = 0x85EBCA77


def sparse_key(seed: int, model_id: int, kind: str) -> int:
    """The 32-bit key of the sparse second stage (contract v3), as a Python int."""
    key = _mix_int(stream_key(seed, model_id, kind) ^ SPARSE_DOMAIN)
    return _mix_int(key + _SPARSE_SALT)


def block_starts(k: int, sparsity: int) -> np.ndarray:
    """``start_j = ⌊j·k/s⌋`` for j = 0 .. s: (s + 1,) int64, the blocks' column ranges."""
    if not 1 <= sparsity <= k:
        raise InvalidArgumentError(f"sparsity must be in [1, proj_dim={k}], got {sparsity}")
    return np.array([j * k // sparsity for j in range(sparsity + 1)], np.int64)


def sparse_columns_and_signs(key: int, rows: np.ndarray, k: int, sparsity: int):
    """Columns and signs of rows ``rows`` of the sparse map: ((n, s) int64, (n, s) float32).

    Host-side numpy (the map is tabulated once per checkpoint, :mod:`trakjax.sparse_projection`).
    """
    rows = np.asarray(rows, np.uint64)
    if rows.size and int(rows.max()) >= 2**32:
        raise InvalidArgumentError(f"sparse second stage rows must be < 2**32, got {int(rows.max())}")
    starts = block_starts(k, sparsity)
    sizes = np.diff(starts).astype(np.uint32)
    with np.errstate(over="ignore"):
        row_word = mix(mix(np.uint32(key) ^ rows.astype(np.uint32)) + np.uint32(GOLDEN))
        steps = (np.arange(1, sparsity + 1, dtype=np.uint32) * np.uint32(_BLOCK_STEP)).astype(np.uint32)
        word = mix(row_word[:, None] + steps[None, :])
    columns = starts[:-1][None, :] + ((word >> np.uint32(1)) % sizes[None, :]).astype(np.int64)
    signs = (1.0 - 2.0 * (word & np.uint32(1)).astype(np.float32)).astype(np.float32)
    return columns, signs
