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
(contract v1's R under the dense key; identity when kept whole, as it always is with the sparse
second stage: contract v4). With u the concatenation
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import projection as projection_lib
from trakjax import randomness, sparse_projection
from trakjax import second_stage as second_stage_lib
from trakjax.data import canonical_dtype
from trakjax.errors import InvalidArgumentError
from trakjax.factorized import compat
from trakjax.factorized.analysis import Analysis, analyze
from trakjax.factorized.evaluation import Context, LeafArrays, evaluate
from trakjax.factorized.plan import FactorPlan, LeafPlan, c_side, resolve
from trakjax.factorized.report import format_report
from trakjax.factorized.taps import TapConfig

FACTOR_KINDS = ("rademacher", "normal")


# --------------------------------------------------------------------------- tracing


def _struct(x) -> jax.ShapeDtypeStruct:
    """The shape and JAX's canonical dtype of ``x`` (int64 reads as int32 without x64, as a trace
    of the value would see it)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    return jax.ShapeDtypeStruct(np.shape(x), canonical_dtype(dtype))


def trace_output(output_fn: Callable, diff_leaves: Sequence, example, key=None, *, has_aux: bool = False):
    """The ClosedJaxpr of ``output_fn(diff_leaves, example, key)`` for one example.

    Its invars are the flattened ``(diff_leaves, example, key)``, the leaves first. Arrays or
    ``jax.ShapeDtypeStruct`` are accepted; only shapes and dtypes are used. With ``has_aux``,
    ``output_fn`` returns ``(f, aux)``: the jaxpr's outputs are f then aux's leaves, and the
    result is ``(closed, aux_treedef)``.
    """
    structs = jax.tree_util.tree_map(_struct, (list(diff_leaves), example, key))
    closed, shapes = jax.make_jaxpr(lambda d, e, k: output_fn(d, e, k), return_shape=True)(*structs)
    if has_aux and not (isinstance(shapes, tuple) and len(shapes) == 2):
        raise InvalidArgumentError("output_fn(diff_leaves, example, key) must return (f, aux) with has_aux=True")
    value = shapes[0] if has_aux else shapes
    if not isinstance(value, jax.ShapeDtypeStruct) or value.shape != () or (
            not has_aux and len(closed.out_avals) != 1):
        raise InvalidArgumentError(
            "output_fn(diff_leaves, example, key) must return one scalar for one example; got "
            f"{[tuple(a.shape) for a in closed.out_avals]}"
        )
    if has_aux:
        return closed, jax.tree_util.tree_structure(shapes[1])
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
    whole_remainder: bool = False,
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
      whole_remainder: keep the dense remainder whole even when P_rest > proj_dim (what the
        sparse second stage does: it then compresses the remainder with the factor blocks).

    Returns:
      The :class:`~trakjax.factorized.plan.FactorPlan`.

    Raises:
      ValueError: if no leaf can be factorized (naming every leaf and its reason; use a dense
        projection then), or for bad ``factor_dims``/``proj_dim``/``paths``.
    """
    paths = _check_paths(paths, diff_leaves)
    analysis = analyze(trace_output(output_fn, diff_leaves, example, key), len(paths))
    return resolve(analysis, paths, factor_dims, proj_dim, whole_remainder=whole_remainder)


# --------------------------------------------------------------------------- 2. factor matrices


class LeafFactors(NamedTuple):
    """A factorized leaf's factor matrices: ``p0``/``p1`` of shape (*slice_shape, D_s, k_s)
    float32, or None for an identity side."""

    p0: jax.Array | None
    p1: jax.Array | None


class Factors(NamedTuple):
    """Everything random of one checkpoint for :func:`factorized_features`.

    ``leaves``: one :class:`LeafFactors` per differentiated leaf (None unless factorized);
    ``second``: the second stage's arrays (:mod:`trakjax.second_stage`: the dense R2's
    :class:`~trakjax.second_stage.DenseArrays`, contract v2's key, R2 materialized or None; or
    the sparse map's :class:`~trakjax.sparse_projection.SketchTable`, contract v3), or None
    without a second stage; ``remainder``: the dense remainder's
    :class:`~trakjax.second_stage.DenseArrays` (contract v1's key, R materialized or None), or
    None when there is no projected remainder. Materialized or generated, the entries are the same.
    """

    leaves: tuple
    second: Any = None
    remainder: Any = None


@functools.lru_cache(maxsize=64)
def _generator(kind: str, rows: int, k: int):
    return jax.jit(jax.vmap(lambda key: randomness.factor_matrix(kind, key, rows, k)))


def _vector_layout(size: int) -> projection_lib.ParameterLayout:
    return projection_lib.parameter_layout([jax.ShapeDtypeStruct((size,), jnp.float32)])


def stage_specs(plan: FactorPlan, *, kind: str, second_stage: str = "dense", sparsity: int = 1,
                chunk_rows: int | None = None, precision: str = "highest", backend: str = "xla"):
    """``(second, remainder)``: the :class:`~trakjax.second_stage.StageSpec` of the second stage
    (K_fac → final_dim; None without one) and of the dense remainder (P_rest → k_rest; None when
    it is kept whole or absent)."""
    second = remainder = None
    if plan.second_stage:
        second = second_stage_lib.StageSpec(second_stage, kind, _vector_layout(plan.k_fac), plan.final_dim,
                                            sparsity if second_stage == "sparse" else 1, chunk_rows,
                                            precision, backend)
    if plan.dense and not plan.rest_identity:
        layout = projection_lib.parameter_layout(
            [jax.ShapeDtypeStruct(plan.leaves[i].shape, jnp.float32) for i in plan.dense])
        remainder = second_stage_lib.StageSpec("dense", kind, layout, plan.k_rest, 1, chunk_rows,
                                               precision, backend)
    return second, remainder


def factor_matrices(
    plan: FactorPlan, *, seed: int, model_id: int, kind: str, matrix_cache_bytes: int = 2**30,
    second_stage: str = "dense", sparsity: int = 1, backend: str = "xla",
) -> Factors:
    """The factor matrices of every factorized leaf and slice, and the stages' randomness.

    Entry (row, column) of side s of slice i of the leaf at canonical path p is contract v1's
    entry under ``randomness.factor_key(seed, model_id, kind, p, i, s)``. Call once per
    checkpoint (``seed``/``model_id`` are Python ints); the result is a pytree of arrays.

    ``matrix_cache_bytes``: the dense second stage's R2 (4·K_fac·final_dim bytes) and then the
    dense remainder's R (4·P_rest·k_rest bytes) are materialized when they fit this budget (per
    device); otherwise :func:`factorized_features` generates them chunk by chunk on every call
    (hashing costs about as much as the multiply: materializing is much faster when it fits).

    ``second_stage``: ``"dense"`` (contract v2's R2) or ``"sparse"`` (the count-sketch map of
    contract v3 with ``sparsity`` = s nonzeros per input, :mod:`trakjax.sparse_projection`:
    O(s·K_fac) per example instead of O(K_fac·final_dim)). ``backend``: the dense stages' multiply.
    """
    if second_stage not in second_stage_lib.STAGES:
        raise InvalidArgumentError(f"second_stage must be one of {tuple(second_stage_lib.STAGES)}, "
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
    second_spec, remainder_spec = stage_specs(plan, kind=kind, second_stage=second_stage, sparsity=sparsity,
                                              backend=backend)
    budget = int(matrix_cache_bytes)
    second = remainder = None
    if second_spec is not None:
        second = second_stage_lib.stage(second_stage).instantiate(
            second_spec, seed, model_id, randomness.second_stage_key(seed, model_id, kind), budget)
        if getattr(second, "blocks", None) is not None:
            budget -= 4 * plan.k_fac * plan.final_dim
    if remainder_spec is not None:
        remainder = second_stage_lib.DENSE.instantiate(
            remainder_spec, seed, model_id, randomness.stream_key(seed, model_id, kind), budget)
    return Factors(tuple(leaves), second, remainder)


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
    backend: str = "xla",
    has_aux: bool = False,
) -> tuple[jax.Array, ...]:
    """Outputs and factorized features of a batch: ``(outputs (B,) float32, φ (B, final_dim) float32)``,
    and with ``has_aux`` the output function's aux (``output_fn`` then returns ``(f, aux)``) batched:
    ``(outputs, φ, aux)``.

    Pure and jit/vmap/shard_map compatible: ``plan``, ``kind``, ``precision``, ``chunk_rows``
    and ``backend`` are static; ``diff_leaves``, ``batch``, ``keys`` and ``factors`` may be traced.

    Args:
      output_fn, diff_leaves: as in :func:`plan_factorization` (the leaves' values now).
      batch: pytree of arrays with a leading example axis B.
      keys: (B,) PRNG keys (one per example) or None.
      plan: from :func:`plan_factorization` for this output function and leaf shapes.
      factors: from :func:`factor_matrices` (the checkpoint's seed and model_id); its second
        stage (dense or sparse) is the one applied.
      kind: ``"rademacher"`` or ``"normal"``, as in :func:`factor_matrices`.
      precision: matmul precision policy of the taps and projections.
      chunk_rows: rows of R generated at a time by the dense remainder and the second stage.
      backend: ``"xla"`` or ``"pallas"``: the dense stages' multiply.
      has_aux: whether ``output_fn`` returns ``(f, aux)`` (aux is not differentiated).

    Raises:
      ValueError: if the output function's detected structure differs from ``plan``.
    """
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], canonical_dtype(x.dtype)), batch)
    key_struct = None if keys is None else jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype)
    traced = trace_output(output_fn, diff_leaves, example, key_struct, has_aux=has_aux)
    closed, aux_tree = traced if has_aux else (traced, None)
    analysis = analyze(closed, len(diff_leaves))
    again = resolve(analysis, [leaf.path for leaf in plan.leaves], plan.factor_dims, plan.proj_dim,
                    whole_remainder=plan.rest_identity)
    if _structure(again) != _structure(plan):
        raise InvalidArgumentError("factorized_features: the plan does not match this output function "
                         "(recompute it with plan_factorization for these leaves and shapes)")
    ctx = Context(analysis, tap_configs(plan, analysis, precision), frozenset(plan.order))
    values, z_grads, dense_grads = jax.vmap(
        lambda ex, key: _one_example(ctx, closed, aux_tree, plan, factors, list(diff_leaves), ex, key),
        in_axes=(0, None if keys is None else 0),
    )(batch, keys)
    values, out_aux = values if has_aux else (values, None)
    name = _second_stage_name(factors)
    # (the sparse map's s is in its table: applying it needs no sparsity)
    second_spec, remainder_spec = stage_specs(plan, kind=kind, second_stage=name or "dense",
                                              chunk_rows=chunk_rows, precision=precision, backend=backend)
    u = _concatenate(plan, factors, z_grads, dense_grads, values.shape[0], remainder_spec)
    scale = 1.0 / math.sqrt(plan.num_params)
    if second_spec is not None:  # φ = Mᵀu/√P, E[φᵀφ′] = (k/P)·uᵀu′
        phi = second_stage_lib.stage(name).apply(second_spec, factors.second, [u], scale)
    else:
        phi = u * jnp.float32(math.sqrt(plan.k_fac) * scale)
    if has_aux:
        return values.astype(jnp.float32), phi, out_aux
    return values.astype(jnp.float32), phi


def _second_stage_name(factors: Factors) -> str | None:
    """Which stage ``factors.second`` holds the randomness of (None: no second stage)."""
    if factors.second is None:
        return None
    return "sparse" if isinstance(factors.second, sparse_projection.SketchTable) else "dense"


def _one_example(ctx, closed, aux_tree, plan: FactorPlan, factors: Factors, leaves, example, key):
    """(output, Z gradients in plan order, dense-remainder gradients) of one example; the output
    is ``(f, aux)`` when ``aux_tree`` (the aux outputs' treedef) is given."""

    def output(zs, dense_values):
        args = list(leaves)
        for i, value in zip(plan.dense, dense_values, strict=True):
            args[i] = value
        scope = {i: LeafArrays(factors.leaves[i].p0, factors.leaves[i].p1, z, plan.leaves[i].slice_axes)
                 for i, z in zip(plan.order, zs, strict=True)}
        flat = jax.tree_util.tree_leaves((args, example, key))
        outs = evaluate(ctx, closed, flat, scope)
        if aux_tree is None:
            return outs[0]
        return outs[0], jax.tree_util.tree_unflatten(aux_tree, outs[1:])

    zs = []
    for i in plan.order:
        leaf = plan.leaves[i]
        shape = tuple(leaf.shape[a] for a in leaf.slice_axes) + (leaf.sides[0].k, leaf.sides[1].k)
        zs.append(jnp.zeros(shape, jnp.float32))
    dense_values = [leaves[i] for i in plan.dense]
    grad = jax.value_and_grad(output, argnums=(0, 1), has_aux=aux_tree is not None)
    value, (z_grads, dense_grads) = grad(zs, dense_values)
    return value, z_grads, dense_grads


def _concatenate(plan, factors, z_grads, dense_grads, batch, remainder_spec):
    """u: the scaled φ_W blocks in plan order, then the dense remainder: (B, K_fac) float32."""
    blocks = [g.reshape(batch, -1).astype(jnp.float32) * jnp.float32(block_scale(plan.leaves[i]))
              for g, i in zip(z_grads, plan.order, strict=True)]
    if plan.dense:
        if plan.rest_identity:
            blocks.extend(g.reshape(batch, -1).astype(jnp.float32) for g in dense_grads)
        else:  # the block is R_restᵀ g / √k_rest
            blocks.append(second_stage_lib.DENSE.apply(remainder_spec, factors.remainder, list(dense_grads),
                                                       1.0 / math.sqrt(plan.k_rest)))
    return jnp.concatenate(blocks, axis=1)


# --------------------------------------------------------------------------- 4. description


class FactorizationReport(NamedTuple):
    """How each differentiated leaf is featurized; ``str()`` gives a table."""

    plan: FactorPlan

    def __str__(self) -> str:
        return format_report(self.plan)


def describe(output_fn: Callable, diff_leaves: Sequence, example, key=None, *, paths: Sequence[str],
             factor_dims=64, proj_dim: int | str = 2048, whole_remainder: bool = False) -> FactorizationReport:
    """The :class:`FactorizationReport` of an output function: :func:`plan_factorization`'s
    decisions, without raising when nothing can be factorized (the table gives each reason)."""
    paths = _check_paths(paths, diff_leaves)
    analysis = analyze(trace_output(output_fn, diff_leaves, example, key), len(paths))
    return FactorizationReport(resolve(analysis, paths, factor_dims, proj_dim, require_factorized=False,
                                       whole_remainder=whole_remainder))


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
    return closed_activation_bytes(trace_output(output_fn, diff_leaves, example, key), len(diff_leaves), plan)


def closed_activation_bytes(closed, num_leaves: int, plan: FactorPlan | None = None) -> int:
    """:func:`activation_bytes_per_example` of an already traced output (``closed``, the
    ClosedJaxpr of :func:`trace_output` with ``num_leaves`` differentiated leaves)."""
    jaxpr, _ = compat.open_jaxpr(closed)
    total = _jaxpr_bytes(jaxpr)
    if plan is not None:
        analysis = analyze(closed, num_leaves)
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
