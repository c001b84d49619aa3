"""Compression stages: a random JL map M from K inputs to k outputs, as a pair of pure functions.

A stage turns a batch of input vectors u (given as leaves, flattened and concatenated in order:
a gradient pytree, or the factorized family's K_fac features) into ``scale · Mᵀu``, with
E[(Mᵀu)ᵀ(Mᵀu′)] = k·uᵀu′ for both stages, so callers keep their own scaling conventions:

* ``"dense"``: M is a K × k matrix of ±1 or N(0, 1) entries (contract v1 keyed by the caller's
  stream key: :func:`trakjax.randomness.stream_key` for a whole gradient,
  :func:`~trakjax.randomness.second_stage_key` for the factorized features). O(K·k) per example;
  materialized when it fits the memory budget, else generated chunk by chunk, on the ``backend``
  (``"xla"``, or the Pallas kernel of :mod:`trakjax.kernels.projection`).
* ``"sparse"``: the count sketch of :mod:`trakjax.sparse_projection` (contract v3): each input
  goes to s outputs, one in each of s blocks, with random signs; O(s·K) per example, applied as
  a deterministic gather and fold.

The dense family is the dense stage applied to the whole gradient; the factorized family applies
a stage (either) to its K_fac features and the dense stage to its dense remainder. A stage is a
:class:`Stage` of two functions, keyed by name in :data:`STAGES`: a new stage is one entry there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from trakjax import backends, sparse_projection
from trakjax import projection as projection_lib


class StageSpec(NamedTuple):
    """A stage's static description (hashable).

    Attributes:
      name: ``"dense"`` or ``"sparse"`` (a key of :data:`STAGES`).
      kind: the dense map's entries, ``"rademacher"`` or ``"normal"`` (the sparse map's signs are ±1).
      layout: :class:`~trakjax.projection.ParameterLayout` of the input leaves (K = ``layout.total``).
      k: the output dimension.
      sparsity: s, the sparse map's nonzeros per input (1 for the dense stage).
      chunk_rows: rows of M generated at a time when M is not materialized (None: the default).
      precision: matmul precision policy.
      backend: ``"xla"`` or ``"pallas"`` (the dense stage's multiply).
    """

    name: str
    kind: str
    layout: projection_lib.ParameterLayout
    k: int
    sparsity: int = 1
    chunk_rows: int | None = None
    precision: str = "highest"
    backend: str = "xla"


class DenseArrays(NamedTuple):
    """The dense stage's randomness: ``key`` (uint32, M's contract-v1 key) and M materialized
    per input leaf (one (size, k) block per leaf), or ``blocks=None`` to generate it on the fly."""

    key: jax.Array
    blocks: list | None = None


class Stage(NamedTuple):
    """A compression stage as two pure functions.

    * ``instantiate(spec, seed, model_id, key, matrix_cache_bytes) -> arrays``: the stage's
      randomness for one checkpoint (``key``: the dense map's uint32 stream key);
    * ``apply(spec, arrays, leaves, scale) -> (B, k) float32``: ``scale · Mᵀu`` for the batch of
      inputs u whose leaves (B, ...) are ``leaves``; pure and jit-compatible.
    """

    instantiate: Callable[..., Any]
    apply: Callable[..., jax.Array]


def _dense_instantiate(spec: StageSpec, seed: int, model_id: int, key: int, matrix_cache_bytes: int) -> DenseArrays:
    del seed, model_id  # the caller's stream key holds them
    key = jnp.uint32(key)
    blocks = None
    if spec.backend == "xla" and 4 * spec.layout.total * spec.k <= matrix_cache_bytes:
        blocks = _blocks_fn(spec.layout, spec.kind, spec.k)(key)
    return DenseArrays(key, blocks)


def _dense_apply(spec: StageSpec, arrays: DenseArrays, leaves: Sequence[jax.Array], scale: float) -> jax.Array:
    # project() gives Mᵀu/√K.
    out = backends.project(list(leaves), kind=spec.kind, proj_dim=spec.k, key=arrays.key,
                           blocks=arrays.blocks, chunk_rows=spec.chunk_rows, precision=spec.precision,
                           backend=spec.backend)
    return out * jnp.float32(math.sqrt(spec.layout.total) * scale)


def _sparse_instantiate(spec: StageSpec, seed: int, model_id: int, key: int,
                        matrix_cache_bytes: int) -> sparse_projection.SketchTable:
    del key, matrix_cache_bytes  # the table is keyed by the contract-v3 key; it is always tabulated
    sparsity = sparse_projection.check_sparsity(spec.sparsity, spec.k)
    return sparse_projection.sketch_table(seed, model_id, spec.kind, spec.layout.total, spec.k, sparsity)


def _sparse_apply(spec: StageSpec, table, leaves: Sequence[jax.Array], scale: float) -> jax.Array:
    del spec
    batch = leaves[0].shape[0]
    flat = [x.reshape(batch, -1).astype(jnp.float32) for x in leaves]
    u = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)
    # the table's weights are ±√(k/s): E[(Su)ᵀ(Su′)] = k·uᵀu′.
    return sparse_projection.apply_sketch(u, table) * jnp.float32(scale)


@functools.lru_cache(maxsize=16)
def _blocks_fn(layout, kind: str, k: int):
    """A jitted generator of M's per-leaf blocks (one compiled function per layout, kind and k)."""
    return jax.jit(lambda key: projection_lib.projection_blocks(layout, kind, k, key))


DENSE = Stage(_dense_instantiate, _dense_apply)
SPARSE = Stage(_sparse_instantiate, _sparse_apply)

STAGES: dict[str, Stage] = {"dense": DENSE, "sparse": SPARSE}
"""Every compression stage by name (``second_stage`` takes these names)."""


def stage(name: str) -> Stage:
    """The :class:`Stage` called ``name``."""
    return STAGES[name]


__all__ = ["DENSE", "SPARSE", "STAGES", "DenseArrays", "Stage", "StageSpec", "stage"]
