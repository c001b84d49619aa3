"""The factorized projection family: Kronecker-projected per-example gradients, never built.

For a parameter W reached only through contractions with activations (Dense/Einsum/DenseGeneral
kernels and attention projections through ``dot_general``, convolution kernels, embedding tables
through row gathers, tied output heads), ∇_W f = Σ_t a_t δ_tᵀ, and the feature of W is

    φ_W = P_0ᵀ (∇_W f) P_1 = Σ_t (P_Cᵀ a_t)(P_Fᵀ δ_t)ᵀ  (oriented to k_0 × k_1)
        = (P_0 ⊗ P_1)ᵀ vec(∇_W f)                       (W flattened row-major)

computed from a_t and δ_t without forming ∇_W f (see :mod:`trakjax.factorized.taps`). Sides are
W's two axis groups (the axes its sites contract with activations, and the free ones), not
in/out roles: side 0 is the group holding W's first non-slice axis, side 1 the other. When a
group is not a contiguous run (an Einsum kernel (heads, d, head_dim) contracted on d),
"row-major" means W transposed to (side 0 axes, side 1 axes) first (see
:mod:`trakjax.factorized.plan`). A side whose factor size is at least its dimension is the
identity; a bias folds in as a constant-1 input row; stacked layers (``lax.scan`` over a stacked
leaf), static indices and dot_general batch axes of W get one factor pair per slice.

Scaling: each block is divided by √(product of its random sides' k), so E[φ_Wᵀφ′_W] =
⟨∇_W f, ∇_W f′⟩; the dense remainder (leaves that are not factorized) is R_restᵀ g_rest / √k_rest
(contract v1's R under the dense key; identity when kept whole). With u the concatenation
(K_fac numbers) the features are

    φ = R2ᵀ u / √P       when a second stage runs (proj_dim < K_fac; R2 is K_fac × proj_dim)
    φ = S u / √P         with the sparse second stage (S: k × K_fac, s entries ±√(k/s) per column,
                         :mod:`trakjax.sparse_projection`)
    φ = u · √(K_fac / P) otherwise,

so E[φᵀφ′] = (k/P)·gᵀg′ with k the final dimension, the dense family's convention: λ means the
same in both families.

Division of labour (pure functions; the caller owns configuration, batching, meshes, stores):

1. :func:`plan_factorization` -> :class:`~trakjax.factorized.plan.FactorPlan`: static, hashable;
   which leaves are factorized (sides, sizes, slices, folded bias, feature offset) or dense (why);
   K_fac, P, the final dimension, whether a second stage runs.
2. :func:`factor_matrices` -> :class:`Factors`: every random factor matrix and the keys of the
   dense remainder and of the second stage, once per checkpoint (contract v2,
   :data:`trakjax.randomness.FACTOR_CONTRACT_VERSION`).
3. :func:`factorized_features` -> ``(outputs (B,), features (B, final_dim))``: pure, jit/vmap and
   shard_map compatible.
4. :class:`FactorizationReport`, whose ``str()`` is a table (what
   :func:`trakjax.featurize.describe_factorization` returns for a task).
5. :func:`activation_bytes_per_example`: a per-example memory bound for micro-batch sizing.

``output_fn(diff_leaves: list, example, key) -> scalar`` is the output of ONE example with
everything else (fixed leaves, the task's aux state) closed over;
:func:`trakjax.featurize.output_fn` builds it from a :class:`~trakjax.tasks.Task`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax.factorized import compat
from trakjax import projection as projection_lib
from trakjax import randomness, sparse_projection
from trakjax.errors import InvalidArgumentError
from trakjax.factorized.analysis import Analysis, analyze
from trakjax.factorized.evaluation import Context, LeafArrays, evaluate
from trakjax.factorized.plan import FactorPlan, LeafPlan, c_side, resolve
from trakjax.factorized.report import format_report
from trakjax.factorized.taps import TapConfig

FACTOR_KINDS = ("rademacher", "normal")


# --------------------------------------------------------------------------- tracing


def _struct(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    return jax.ShapeDtypeStruct(np.shape(x), dtype)


def trace_output(output_fn: Callable, diff_leaves: Sequence, example, key=None):
    """The ClosedJaxpr of ``output_fn(diff_leaves, example, key)`` for one example.

    Its invars are the flattened ``(diff_leaves, example, key)``, the leaves first. Arrays or
    ``jax.ShapeDtypeStruct`` are accepted; only shapes and dtypes are used.
    """
    structs = jax.tree_util.tree_map(_struct, (list(diff_leaves), example, key))
    closed = jax.make_jaxpr(lambda d, e, k: output_fn(d, e, k))(*structs)
    if len(closed.out_avals) != 1 or closed.out_avals[0].shape != ():
        raise InvalidArgumentError(
            "output_fn(diff_leaves, example, key) must return one scalar for one example; got "
            f"{[tuple(a.shape) for a in closed.out_avals]}"
        )
    return closed


# --------------------------------------------------------------------------- canonical paths


def _entry_string(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_variable(node) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    # vars(): older flax has a separate VariableState class; newer ones warn on the alias
    types = tuple(t for t in (vars(nnx).get("Variable"), vars(nnx).get("VariableState")) if isinstance(t, type))
    return isinstance(node, types)


def canonical_paths(params) -> list[str]:
    """The canonical '/'-joined path of every leaf of ``params``, in flattening order.

    As :func:`trakjax.featurize.parameter_paths`, with NNX variable wrappers removed (the
    ``value`` attribute key of an ``nnx.Variable``), so an ``nnx.State`` and its pure-dict form
    give the same paths. These paths key the factor matrices (randomness contract v2).
    """
    paths = []
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
        subs = jax.tree_util.tree_leaves_with_path(node) if _is_variable(node) else [((), node)]
        for sub, _ in subs:
            kept = [e for e in sub if not (isinstance(e, jax.tree_util.GetAttrKey) and e.name == "value")]
            paths.append("/".join(_entry_string(e) for e in (*path, *kept)))
    return paths


# --------------------------------------------------------------------------- 1. the plan


def _check_paths(paths, diff_leaves) -> list[str]:
    paths = list(paths)
    if len(paths) != len(diff_leaves) or not all(isinstance(p, str) for p in paths):
        raise InvalidArgumentError(f"paths must be one canonical path string per differentiated leaf "
                         f"({len(diff_leaves)}), got {paths!r}")
    if len(set(paths)) != len(paths):
        raise InvalidArgumentError(f"paths must be unique (they key the factor matrices), got {paths!r}")
    return paths


def plan_factorization(
    output_fn: Callable,
    diff_leaves: Sequence,
    example,
    key=None,
    *,
    paths: Sequence[str],
    factor_dims=64,
    proj_dim: int | str = 2048,
) -> FactorPlan:
    """Detect how each differentiated leaf is featurized and fix the feature layout.

    Args:
      output_fn: ``(diff_leaves, example, key) -> ()``, the output of one example.
      diff_leaves: the differentiated leaves (arrays or ``jax.ShapeDtypeStruct``).
      example: ONE example (no batch axis), arrays or ``jax.ShapeDtypeStruct``.
      key: the example's PRNG key (or its struct), or None.
      paths: canonical path of each differentiated leaf (:func:`canonical_paths`).
      factor_dims: k for both sides, or a pair (k_0, k_1) (side 0: the group of the leaf's first
        non-slice axis, the input side of a kernel; side 1: the other group).
      proj_dim: the final dimension (an int; no second stage when ≥ K_fac, see
        ``FactorPlan.second_stage``) or ``"all"`` (keep all K_fac features, the dense remainder
        whole).

    Returns:
      The :class:`~trakjax.factorized.plan.FactorPlan`.

    Raises:
      ValueError: if no leaf can be factorized (naming every leaf and its reason; use a dense
        projection then), or for bad ``factor_dims``/``proj_dim``/``paths``.
    """
    paths = _check_paths(paths, diff_leaves)
    analysis = analyze(trace_output(output_fn, diff_leaves, example, key), len(paths))
    return resolve(analysis, paths, factor_dims, proj_dim)


# --------------------------------------------------------------------------- 2. factor matrices


class LeafFactors(NamedTuple):
    """A factorized leaf's factor matrices: ``p0``/``p1`` of shape (*slice_shape, D_s, k_s)
    float32, or None for an identity side."""

    p0: jax.Array | None
    p1: jax.Array | None


class Factors(NamedTuple):
    """Everything random of one checkpoint for :func:`factorized_features`.

    ``leaves``: one :class:`LeafFactors` per differentiated leaf (None unless factorized);
    ``dense_key``: uint32 key of the dense remainder's R (contract v1's ``stream_key``);
    ``second_key``: uint32 key of the second-stage R2 (``randomness.second_stage_key``);
    ``dense_blocks``: the dense remainder's R materialized, one (size, k_rest) block per dense
    leaf (``projection.projection_blocks``), or None to generate it chunk by chunk;
    ``second_matrix``: R2 materialized, (K_fac, final_dim), or None to generate it on the fly.
    Materialized or generated, the entries are the same.
    ``second_table``: the sparse second stage (contract v3) tabulated, or None for the dense R2.
    """

    leaves: tuple
    dense_key: jax.Array
    second_key: jax.Array
    dense_blocks: list | None = None
    second_matrix: jax.Array | None = None
    second_table: sparse_projection.SketchTable | None = None


@functools.lru_cache(maxsize=64)
def _generator(kind: str, rows: int, k: int):
    return jax.jit(jax.vmap(lambda key: randomness.factor_matrix(kind, key, rows, k)))


def factor_matrices(
    plan: FactorPlan, *, seed: int, model_id: int, kind: str, matrix_cache_bytes: int = 2**30,
    second_stage: str = "dense", sparsity: int = 1,
) -> Factors:
    """The factor matrices of every factorized leaf and slice, and the projection keys.

    Entry (row, column) of side s of slice i of the leaf at canonical path p is contract v1's
    entry under ``randomness.factor_key(seed, model_id, kind, p, i, s)``. Call once per
    checkpoint (``seed``/``model_id`` are Python ints); the result is a pytree of arrays.

    ``matrix_cache_bytes``: the second-stage R2 (4·K_fac·final_dim bytes) and then the dense
    remainder's R (4·P_rest·k_rest bytes) are materialized when they fit this budget (per
    device); otherwise :func:`factorized_features` generates them chunk by chunk on every call
    (hashing costs about as much as the multiply: materializing is much faster when it fits).

    ``second_stage``: ``"dense"`` (contract v2's R2) or ``"sparse"`` (the count-sketch map of
    contract v3 with ``sparsity`` = s nonzeros per input, :mod:`trakjax.sparse_projection`:
    O(s·K_fac) per example instead of O(K_fac·final_dim)).
    """
    if second_stage not in sparse_projection.SECOND_STAGES:
        raise InvalidArgumentError(f"second_stage must be one of {sparse_projection.SECOND_STAGES}, "
                                   f"got {second_stage!r}")
    if kind not in FACTOR_KINDS:
        raise InvalidArgumentError(f"kind must be one of {FACTOR_KINDS} for the factorized family, got {kind!r}")
    randomness.check_seed_and_model_id(seed, model_id)
    leaves = []
    for leaf in plan.leaves:
        if leaf.treatment != "factorized":
            leaves.append(None)
            continue
        slice_shape = tuple(leaf.shape[a] for a in leaf.slice_axes)
        mats = []
        for s, side in enumerate(leaf.sides):
            if side.identity:
                mats.append(None)
                continue
            keys = np.array([randomness.factor_key(seed, model_id, kind, leaf.path, i, s)
                             for i in range(leaf.num_slices)], np.uint32)
            mats.append(_generator(kind, side.dim, side.k)(keys).reshape(slice_shape + (side.dim, side.k)))
        leaves.append(LeafFactors(*mats))
    dense_key = jnp.uint32(randomness.stream_key(seed, model_id, kind))
    second_key = jnp.uint32(randomness.second_stage_key(seed, model_id, kind))
    budget = int(matrix_cache_bytes)
    second = table = None
    if plan.second_stage and second_stage == "sparse":
        sparsity = sparse_projection.check_sparsity(sparsity, plan.final_dim)
        table = sparse_projection.sketch_table(seed, model_id, kind, plan.k_fac, plan.final_dim, sparsity)
    elif plan.second_stage and 4 * plan.k_fac * plan.final_dim <= budget:
        second = _second_generator(kind, plan.k_fac, plan.final_dim)(second_key)
        budget -= 4 * plan.k_fac * plan.final_dim
    blocks = None
    if plan.dense and not plan.rest_identity and 4 * plan.dense_params * plan.k_rest <= budget:
        layout = projection_lib.parameter_layout(
            [jax.ShapeDtypeStruct(plan.leaves[i].shape, jnp.float32) for i in plan.dense])
        blocks = _blocks_generator(layout, kind, plan.k_rest)(dense_key)
    return Factors(tuple(leaves), dense_key, second_key, blocks, second, table)


@functools.lru_cache(maxsize=16)
def _second_generator(kind: str, rows: int, k: int):
    return jax.jit(lambda key: randomness.factor_matrix(kind, key, rows, k))


@functools.lru_cache(maxsize=16)
def _blocks_generator(layout, kind: str, k: int):
    return jax.jit(lambda key: projection_lib.projection_blocks(layout, kind, k, key))


# --------------------------------------------------------------------------- 3. features


def block_scale(leaf: LeafPlan) -> float:
    """1/√(product of the random sides' k): E[φ_Wᵀφ′_W] = ⟨∇_W f, ∇_W f′⟩."""
    return 1.0 / math.sqrt(math.prod(s.k for s in leaf.sides if not s.identity))


def _structure(plan: FactorPlan) -> FactorPlan:
    return plan._replace(leaves=tuple(leaf._replace(sites=()) for leaf in plan.leaves))


def tap_configs(plan: FactorPlan, analysis: Analysis, precision: str) -> dict:
    """One :class:`~trakjax.factorized.taps.TapConfig` per site of a factorized leaf."""
    taps = {}
    for key, rec in analysis.sites.items():
        leaf = plan.leaves[rec.leaf]
        if leaf.treatment != "factorized":
            continue
        side = c_side(leaf, rec)
        on = leaf.bias >= 0 and analysis.site_bias.get(key) == leaf.bias
        taps[key] = TapConfig(rec.geometry, side, leaf.bias_side == side, bool(on),
                              leaf.bias_side == 1 - side, precision)
    return taps


def factorized_features(
    output_fn: Callable,
    diff_leaves: Sequence,
    batch,
    keys,
    plan: FactorPlan,
    factors: Factors,
    *,
    kind: str,
    precision: str = "highest",
    chunk_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Outputs and factorized features of a batch: ``(outputs (B,) float32, φ (B, final_dim) float32)``.

    Pure and jit/vmap/shard_map compatible: ``plan``, ``kind``, ``precision`` and ``chunk_rows``
    are static; ``diff_leaves``, ``batch``, ``keys`` and ``factors`` may be traced.

    Args:
      output_fn, diff_leaves: as in :func:`plan_factorization` (the leaves' values now).
      batch: pytree of arrays with a leading example axis B.
      keys: (B,) PRNG keys (one per example) or None.
      plan: from :func:`plan_factorization` for this output function and leaf shapes.
      factors: from :func:`factor_matrices` (the checkpoint's seed and model_id).
      kind: ``"rademacher"`` or ``"normal"``, as in :func:`factor_matrices`.
      precision: matmul precision policy of the taps and projections.
      chunk_rows: rows of R generated at a time by the dense remainder and the second stage.

    Raises:
      ValueError: if the output function's detected structure differs from ``plan``.
    """
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    key_struct = None if keys is None else jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype)
    closed = trace_output(output_fn, diff_leaves, example, key_struct)
    analysis = analyze(closed, len(diff_leaves))
    again = resolve(analysis, [leaf.path for leaf in plan.leaves], plan.factor_dims, plan.proj_dim)
    if _structure(again) != _structure(plan):
        raise InvalidArgumentError("factorized_features: the plan does not match this output function "
                         "(recompute it with plan_factorization for these leaves and shapes)")
    ctx = Context(analysis, tap_configs(plan, analysis, precision), frozenset(plan.order))
    values, z_grads, dense_grads = jax.vmap(
        lambda ex, key: _one_example(ctx, closed, plan, factors, list(diff_leaves), ex, key),
        in_axes=(0, None if keys is None else 0),
    )(batch, keys)
    u = _concatenate(plan, factors, z_grads, dense_grads, values.shape[0], kind, precision, chunk_rows)
    scale = 1.0 / math.sqrt(plan.num_params)
    if plan.second_stage and factors.second_table is not None:
        # the table's weights are ±√(k/s): φ = S u/√P, E[φᵀφ′] = (k/P)·uᵀu′ as below.
        phi = sparse_projection.apply_sketch(u, factors.second_table) * jnp.float32(scale)
    elif plan.second_stage:
        # project() divides by √K_fac: φ = R2ᵀu/√P = project(u)·√K_fac/√P.
        second = None if factors.second_matrix is None else [factors.second_matrix]
        phi = projection_lib.project([u], kind=kind, proj_dim=plan.final_dim, key=factors.second_key,
                                     blocks=second, chunk_rows=chunk_rows, precision=precision)
        phi = phi * jnp.float32(math.sqrt(plan.k_fac) * scale)
    else:
        phi = u * jnp.float32(math.sqrt(plan.k_fac) * scale)
    return values.astype(jnp.float32), phi


def _one_example(ctx, closed, plan: FactorPlan, factors: Factors, leaves, example, key):
    """(output, Z gradients in plan order, dense-remainder gradients) of one example."""

    def output(zs, dense_values):
        args = list(leaves)
        for i, value in zip(plan.dense, dense_values, strict=True):
            args[i] = value
        scope = {i: LeafArrays(factors.leaves[i].p0, factors.leaves[i].p1, z, plan.leaves[i].slice_axes)
                 for i, z in zip(plan.order, zs, strict=True)}
        flat = jax.tree_util.tree_leaves((args, example, key))
        return evaluate(ctx, closed, flat, scope)[0]

    zs = []
    for i in plan.order:
        leaf = plan.leaves[i]
        shape = tuple(leaf.shape[a] for a in leaf.slice_axes) + (leaf.sides[0].k, leaf.sides[1].k)
        zs.append(jnp.zeros(shape, jnp.float32))
    dense_values = [leaves[i] for i in plan.dense]
    value, (z_grads, dense_grads) = jax.value_and_grad(output, argnums=(0, 1))(zs, dense_values)
    return value, z_grads, dense_grads


def _concatenate(plan, factors, z_grads, dense_grads, batch, kind, precision, chunk_rows):
    """u: the scaled φ_W blocks in plan order, then the dense remainder: (B, K_fac) float32."""
    blocks = [g.reshape(batch, -1).astype(jnp.float32) * jnp.float32(block_scale(plan.leaves[i]))
              for g, i in zip(z_grads, plan.order, strict=True)]
    if plan.dense:
        if plan.rest_identity:
            blocks.extend(g.reshape(batch, -1).astype(jnp.float32) for g in dense_grads)
        else:
            # project() divides by √P_rest; the block is R_restᵀ g / √k_rest.
            rest = projection_lib.project(list(dense_grads), kind=kind, proj_dim=plan.k_rest,
                                          key=factors.dense_key, blocks=factors.dense_blocks,
                                          chunk_rows=chunk_rows, precision=precision)
            blocks.append(rest * jnp.float32(math.sqrt(plan.dense_params / plan.k_rest)))
    return jnp.concatenate(blocks, axis=1)


# --------------------------------------------------------------------------- 4. description


class FactorizationReport(NamedTuple):
    """How each differentiated leaf is featurized; ``str()`` gives a table."""

    plan: FactorPlan

    def __str__(self) -> str:
        return format_report(self.plan)


def describe(output_fn: Callable, diff_leaves: Sequence, example, key=None, *, paths: Sequence[str],
             factor_dims=64, proj_dim: int | str = 2048) -> FactorizationReport:
    """The :class:`FactorizationReport` of an output function: :func:`plan_factorization`'s
    decisions, without raising when nothing can be factorized (the table gives each reason)."""
    paths = _check_paths(paths, diff_leaves)
    analysis = analyze(trace_output(output_fn, diff_leaves, example, key), len(paths))
    return FactorizationReport(resolve(analysis, paths, factor_dims, proj_dim, require_factorized=False))


# --------------------------------------------------------------------------- 5. memory


def activation_bytes_per_example(
    output_fn: Callable, diff_leaves: Sequence, example, key=None, *, plan: FactorPlan | None = None
) -> int:
    """An upper bound on the bytes one example keeps for the backward pass.

    The bytes of every intermediate value of the one-example jaxpr (what reverse mode may keep
    as residuals; a scan body counts once per iteration, a cond its largest branch), plus, with
    ``plan``, the taps' residuals u (positions × k_C float32 per site of a factorized leaf) and
    the per-example Z gradients and dense-remainder gradients. Micro-batch sizing of the
    factorized family divides a memory budget by this.
    """
    closed = trace_output(output_fn, diff_leaves, example, key)
    jaxpr, _ = compat.open_jaxpr(closed)
    total = _jaxpr_bytes(jaxpr)
    if plan is not None:
        analysis = analyze(closed, len(diff_leaves))
        for rec in analysis.sites.values():
            leaf = plan.leaves[rec.leaf]
            if leaf.treatment == "factorized":
                k_c = leaf.sides[c_side(leaf, rec)].k
                total += 4 * rec.positions * k_c * math.prod(leaf.shape[a] for a in rec.batch_axes)
        total += 4 * (plan.k_factor + plan.dense_params + plan.k_fac)
    return int(total)


def _aval_bytes(aval) -> int:
    try:
        return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
    except TypeError:  # PRNG key dtypes and tokens
        return 0


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            body, _ = compat.open_jaxpr(eqn.params["jaxpr"])
            total += int(eqn.params["length"]) * _jaxpr_bytes(body)
        elif name == "cond":
            total += max(_jaxpr_bytes(compat.open_jaxpr(b)[0]) for b in eqn.params["branches"])
        elif name in compat.JIT_PRIMITIVES or name in compat.REMAT_PRIMITIVES or "call_jaxpr" in eqn.params:
            total += _jaxpr_bytes(compat.open_jaxpr(compat.call_jaxpr(eqn))[0])
        else:
            total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
    return total


__all__ = [
    "FactorPlan",
    "Factors",
    "FactorizationReport",
    "LeafFactors",
    "activation_bytes_per_example",
    "block_scale",
    "canonical_paths",
    "describe",
    "factor_matrices",
    "factorized_features",
    "plan_factorization",
    "trace_output",
]
