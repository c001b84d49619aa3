"""The factorization plan: per differentiated leaf, factorized (with which sides and sizes) or dense.

:func:`resolve` turns an :class:`~trakjax.factorized.analysis.Analysis` into a :class:`FactorPlan`,
a static, hashable description (NamedTuples of tuples) that fixes the feature layout:

* A leaf is **factorized** when it has at least one site, no dense reason, and all its sites
  agree on its slice axes and on the split of the other axes into two groups (contracted and
  free). Side 0 is the group holding the first non-slice axis, side 1 the other; each group keeps
  the leaf's axis order. W's gradient is read as the matrix W_(0),(1) = W transposed to
  (slice axes, side 0 axes, side 1 axes) and flattened row-major per slice: when the groups are
  contiguous (Dense, DenseGeneral, conv kernels, embeddings) that is W's own row-major order; an
  Einsum kernel such as (heads, d, head_dim) contracted on d has side 0 = (heads, head_dim). Bases belong to these axes, not to in/out roles: a tied
  embedding uses side 0 for its vocab axis at the gather and at the output head.
* A leaf whose every use is a bias add onto sites of one factorized W folds into W's side that
  those sites contract (W̃ = [W; b]: that side's dimension grows by one row, the last).
* Every other differentiated leaf is **dense**, with a human-readable reason.

Sizes: with ``factor_dims = (k_0, k_1)``, side s of dimension D_s (folded bias row included) is
the identity (k = D_s) when k_s ≥ D_s, else a random D_s × k_s matrix. A factorized leaf with S
slices contributes S·k'_0·k'_1 features, in sorted canonical path order, then slice order
(row-major over the slice axes), then (i, j) row-major. The dense remainder (P_rest parameters)
follows: k_rest = P_rest (identity) when ``proj_dim == "all"``, P_rest ≤ proj_dim or the second
stage is sparse (``whole_remainder``) and P_rest ≤ :data:`WHOLE_REMAINDER_LIMIT`, else proj_dim.
K_fac is the total. The final dimension is K_fac for ``"all"`` and min(proj_dim, K_fac) for an
int; a second dense projection runs exactly when proj_dim < K_fac.

``factor_dims=None`` sizes the factors from ``proj_dim`` (:func:`auto_factor_size`): one k for
both sides of every leaf, the power of two in [8, 128] that brings the factorized blocks' count
k_factor(k) = Σ S·min(k, D_0)·min(k, D_1) closest to :data:`AUTO_FEATURES_PER_OUTPUT` · proj_dim,
so that K_fac follows proj_dim: a small proj_dim does not pay for many features it compresses
away, a large one gets enough. The plan records the resolved pair.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from trakjax.errors import ArgumentTypeError, InvalidArgumentError
from trakjax.factorized.analysis import Analysis

AUTO_FACTOR_SIZES = (8, 16, 32, 64, 128)
"""The per-side factor sizes ``factor_dims=None`` chooses from (:func:`auto_factor_size`)."""
AUTO_FEATURES_PER_OUTPUT = 32
"""c: with ``factor_dims=None`` the factorized blocks hold about c·proj_dim features (a Kronecker
map's error on a rank-one a δᵀ goes as 1/√k_side, not 1/√(k_0·k_1): its features count for far
fewer JL dimensions than their number; paired LDS in benchmarks/README.md, issue 20)."""
ALL_FEATURES_FACTOR_SIZE = 64
"""The factor size ``factor_dims=None`` means with ``proj_dim="all"`` (no proj_dim to follow)."""
WHOLE_REMAINDER_LIMIT = 2**22
"""The largest dense remainder (P_rest parameters) that ``whole_remainder`` keeps whole (contract
v4). Whole, it costs O(s·P_rest) work per example but its table (8·s·P_rest bytes per checkpoint)
and its gather (4·s·P_rest bytes per example) grow with it; above this a dense R_rest, generated
in chunks, keeps memory bounded (norm layers and position tables of transformers up to billions of
parameters stay far below it)."""


class SidePlan(NamedTuple):
    """One side (axis group) of a factorized leaf: its leaf ``axes``, ``dim`` (rows of P, a
    folded bias row included), ``k`` (columns) and whether it is the ``identity``."""

    axes: tuple[int, ...]
    dim: int
    k: int
    identity: bool


class LeafPlan(NamedTuple):
    """How one differentiated leaf is treated.

    Attributes:
      index: position in the differentiated leaves.
      path: canonical path.
      shape: the leaf's shape.
      treatment: ``"factorized"``, ``"bias"`` (folded into another leaf) or ``"dense"``.
      reason: for ``"dense"``, why; for ``"bias"``, the path of the leaf it folds into.
      slice_axes: leaf axes with one factor pair per index (scanned layers, per-head weights).
      num_slices: product of the slice axes' sizes (1 if none).
      sides: ``(side 0, side 1)`` :class:`SidePlan` of a factorized leaf.
      bias: index of the folded bias leaf, or -1.
      bias_side: the side the bias row is appended to, or -1.
      offset: first feature of this leaf's block in the concatenation, or -1.
      sites: the kinds of the leaf's sites with counts, e.g. ``("dot_general×2", "gather×1")``.
    """

    index: int
    path: str
    shape: tuple[int, ...]
    treatment: str
    reason: str = ""
    slice_axes: tuple[int, ...] = ()
    num_slices: int = 1
    sides: tuple = ()
    bias: int = -1
    bias_side: int = -1
    offset: int = -1
    sites: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def num_features(self) -> int:
        if self.treatment != "factorized":
            return 0
        return self.num_slices * self.sides[0].k * self.sides[1].k


class FactorPlan(NamedTuple):
    """The whole feature layout of the factorized family for one model and output function.

    Attributes:
      leaves: one :class:`LeafPlan` per differentiated leaf (in the caller's order).
      order: indices of the factorized leaves in feature order (sorted canonical path).
      dense: indices of the dense-remainder leaves (in the caller's order).
      factor_dims: the resolved (k_0, k_1) (:func:`auto_factor_size` where ``None`` was requested).
      proj_dim: the requested final dimension (int) or ``"all"``.
      k_factor: features of all factorized blocks.
      k_rest: features of the dense remainder (0 if there is none).
      rest_identity: whether the dense remainder is kept whole.
      k_fac: K_fac = k_factor + k_rest.
      num_params: P, every differentiated parameter.
      dense_params: P_rest.
      final_dim: the number of output features.
      second_stage: whether a second dense projection compresses K_fac to ``final_dim``.
    """

    leaves: tuple[LeafPlan, ...]
    order: tuple[int, ...]
    dense: tuple[int, ...]
    factor_dims: tuple[int, int]
    proj_dim: int | str
    k_factor: int
    k_rest: int
    rest_identity: bool
    k_fac: int
    num_params: int
    dense_params: int
    final_dim: int
    second_stage: bool


def check_factor_dims(factor_dims) -> tuple[int, int]:
    """``(k_0, k_1)`` from an int (both sides) or a pair of positive ints; else ValueError/TypeError."""
    valid = "a positive int (both sides) or a pair (k_in, k_out) of positive ints"

    def one(value):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ArgumentTypeError(f"factor_dims must be {valid}; got factor_dims={factor_dims!r}")
        if value < 1:
            raise InvalidArgumentError(f"factor_dims must be {valid}; got factor_dims={factor_dims!r}")
        return int(value)

    if isinstance(factor_dims, tuple | list):
        if len(factor_dims) != 2:
            raise InvalidArgumentError(f"factor_dims must be {valid}; got factor_dims={factor_dims!r} "
                             f"of length {len(factor_dims)}")
        return one(factor_dims[0]), one(factor_dims[1])
    return one(factor_dims), one(factor_dims)


def auto_factor_size(blocks, proj_dim: int | str) -> int:
    """The factor size k (both sides) that ``factor_dims=None`` means for these leaves.

    Args:
      blocks: one ``(num_slices, dim_0, dim_1)`` per factorized leaf: S and the dimensions D_0,
        D_1 of its two sides, a folded bias row included.
      proj_dim: the final dimension, or ``"all"``.

    Returns:
      For an int ``proj_dim``, the k of :data:`AUTO_FACTOR_SIZES` whose
      k_factor(k) = Σ S·min(k, D_0)·min(k, D_1) is closest to c·proj_dim
      (c = :data:`AUTO_FEATURES_PER_OUTPUT`) in ratio, ties to the larger k; among sizes giving
      the same k_factor (every side already the identity), the smallest. For ``"all"``,
      :data:`ALL_FEATURES_FACTOR_SIZE`. With no block, the smallest size.
    """
    if proj_dim == "all":
        return ALL_FEATURES_FACTOR_SIZE
    target = AUTO_FEATURES_PER_OUTPUT * int(proj_dim)

    def k_factor(k: int) -> int:
        return sum(s * min(k, d0) * min(k, d1) for s, d0, d1 in blocks)

    best, best_distance, best_count = AUTO_FACTOR_SIZES[0], math.inf, None
    for k in AUTO_FACTOR_SIZES:
        count = k_factor(k)
        if count == best_count:  # every side is already the identity: a larger k changes nothing
            continue
        distance = abs(math.log(max(count, 1) / target))
        if distance <= best_distance:
            best, best_distance, best_count = k, distance, count
    return best


def check_proj_dim(proj_dim) -> int | str:
    """A positive int or ``"all"``; else ValueError/TypeError."""
    if proj_dim == "all" and isinstance(proj_dim, str):
        return "all"
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int | np.integer):
        raise ArgumentTypeError(f"proj_dim must be a positive int or 'all' for the factorized family, got {proj_dim!r}")
    if proj_dim < 1:
        raise InvalidArgumentError(f"proj_dim must be a positive int or 'all', got {proj_dim}")
    return int(proj_dim)


def _groups(rec, remaining):
    """The site's (C, F) split as (group 0, group 1): group 0 holds the leaf's first remaining
    axis (for a kernel, its input side); each group sorted. None if C ∪ F is not ``remaining``."""
    c, f = tuple(rec.c_axes), tuple(rec.f_axes)
    if sorted(c + f) != list(remaining):
        return None
    if not c or not f:
        return c + f, ()
    return (c, f) if c[0] < f[0] else (f, c)


def _site_split(st: Analysis, leaf: int) -> tuple | str:
    """(slice axes, (group 0, group 1), site kinds) shared by all of a leaf's sites, or a reason."""
    recs = [st.sites[k] for k in st.leaf_sites[leaf]]
    ndim = len(st.leaf_shapes[leaf])
    slices = {r.slice_axes for r in recs}
    if len(slices) != 1:
        return f"its sites slice it along different axes {sorted(slices)}"
    slice_axes = slices.pop()
    remaining = [a for a in range(ndim) if a not in slice_axes]
    groups = {_groups(r, remaining) for r in recs}
    if None in groups:
        return "a site leaves some of its axes neither contracted nor free"
    if len(groups) != 1:
        return f"its sites disagree on the axis grouping {sorted(groups)}"
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return slice_axes, groups.pop(), tuple(f"{k}×{n}" for k, n in sorted(counts.items()))


def c_side(plan_leaf: LeafPlan, rec) -> int:
    """Which side of the leaf a site contracts with activations."""
    c = tuple(rec.c_axes)
    return 0 if c == plan_leaf.sides[0].axes and (c or not plan_leaf.sides[1].axes) else 1


def _side(axes, shape, extra: int, requested: int) -> SidePlan:
    dim = int(math.prod(shape[a] for a in axes)) + extra
    if requested >= dim:
        return SidePlan(tuple(axes), dim, dim, True)
    return SidePlan(tuple(axes), dim, requested, False)


def _decide(st: Analysis, leaf: int, path: str, factor_dims) -> LeafPlan:
    """A leaf's treatment before biases are folded (biases are candidates: ``"bias"``)."""
    shape = st.leaf_shapes[leaf]
    base = LeafPlan(leaf, path, shape, "dense")
    if st.reasons[leaf]:
        return base._replace(reason="; ".join(st.reasons[leaf]))
    has_sites, has_bias = bool(st.leaf_sites[leaf]), bool(st.bias_uses[leaf])
    if has_sites and has_bias:
        return base._replace(reason="both contracted with activations and added as a bias")
    if has_bias:
        return base._replace(treatment="bias")
    if not has_sites:
        return base._replace(reason="not used by the output function (its gradient is zero)")
    split = _site_split(st, leaf)
    if isinstance(split, str):
        return base._replace(reason=split)
    slice_axes, (g0, g1), kinds = split
    sides = (_side(g0, shape, 0, factor_dims[0]), _side(g1, shape, 0, factor_dims[1]))
    return base._replace(treatment="factorized", slice_axes=slice_axes, sides=sides, sites=kinds,
                         num_slices=int(math.prod(shape[a] for a in slice_axes)))


def _fold_bias(st: Analysis, plans: list, leaf: int, factor_dims) -> None:
    """Fold bias candidate ``leaf`` into its kernel's plan, or send it dense with a reason."""
    plan = plans[leaf]
    kernels = {w for _, w, _ in st.bias_uses[leaf]}
    bias_slices = {axes for _, _, axes in st.bias_uses[leaf]}
    if len(kernels) != 1:
        plans[leaf] = plan._replace(treatment="dense", reason="added to the outputs of several contractions")
        return
    w = kernels.pop()
    kernel = plans[w]
    sides = {c_side(kernel, st.sites[k]) for k, _, _ in st.bias_uses[leaf]} if kernel.sides else set()
    shape = st.leaf_shapes[leaf]
    reason = None
    if kernel.treatment != "factorized":
        reason = f"bias of {kernel.path}, which is dense"
    elif kernel.bias >= 0:
        reason = f"a second bias of {kernel.path}"
    elif len(sides) != 1 or len(bias_slices) != 1:
        reason = f"added on both sides of {kernel.path}, or sliced differently at its sites"
    elif math.prod(shape) != kernel.num_slices * math.prod(st.leaf_shapes[w][a] for a in kernel.sides[1 - next(iter(sides))].axes):
        reason = f"its shape {shape} does not match the free axes of {kernel.path}"
    if reason is not None:
        plans[leaf] = plan._replace(treatment="dense", reason=reason)
        return
    side = next(iter(sides))
    new_sides = list(kernel.sides)
    old = kernel.sides[side]
    new_sides[side] = _side(old.axes, st.leaf_shapes[w], 1, factor_dims[side])
    plans[w] = kernel._replace(sides=tuple(new_sides), bias=leaf, bias_side=side)
    plans[leaf] = plan._replace(reason=kernel.path, slice_axes=bias_slices.pop(),
                                num_slices=kernel.num_slices)


def resolve(st: Analysis, paths, factor_dims, proj_dim, *, require_factorized: bool = True,
            whole_remainder: bool = False) -> FactorPlan:
    """The :class:`FactorPlan` of an analysis (see the module docstring); ``factor_dims=None``
    sizes the factors from ``proj_dim`` (:func:`auto_factor_size`). ``whole_remainder`` keeps a
    dense remainder of up to :data:`WHOLE_REMAINDER_LIMIT` parameters whole (the sparse second
    stage then compresses it with the factor blocks, at O(s·P_rest) per example instead of a dense
    R_rest's O(P_rest·k)).

    Raises:
      ValueError: if no leaf can be factorized and ``require_factorized``, listing every leaf
        with its reason (the caller should then use a dense projection; nothing falls back
        silently).
    """
    proj_dim = check_proj_dim(proj_dim)
    if factor_dims is None:  # sized from proj_dim: the identity plan gives every side's dimension
        whole = resolve(st, paths, 2**62, proj_dim, require_factorized=require_factorized)
        factor_dims = auto_factor_size([(whole.leaves[i].num_slices, whole.leaves[i].sides[0].dim,
                                         whole.leaves[i].sides[1].dim) for i in whole.order], proj_dim)
    factor_dims = check_factor_dims(factor_dims)
    plans = [_decide(st, i, p, factor_dims) for i, p in enumerate(paths)]
    for i, plan in enumerate(plans):
        if plan.treatment == "bias":
            _fold_bias(st, plans, i, factor_dims)
    order = tuple(sorted((p.index for p in plans if p.treatment == "factorized"), key=lambda i: plans[i].path))
    if not order and require_factorized:
        lines = "\n".join(f"  {p.path} {p.shape}: {p.reason}" for p in plans)
        raise InvalidArgumentError(
            "projection='factorized': no differentiated parameter can be factorized (none is "
            f"reached only through contractions with activations):\n{lines}\n"
            "Use a dense projection (projection='rademacher' or 'normal') for this model."
        )
    offset = 0
    for i in order:
        plans[i] = plans[i]._replace(offset=offset)
        offset += plans[i].num_features
    dense = tuple(p.index for p in plans if p.treatment == "dense")
    dense_params = int(sum(plans[i].size for i in dense))
    rest_identity = ((whole_remainder and dense_params <= WHOLE_REMAINDER_LIMIT) or proj_dim == "all"
                     or dense_params <= proj_dim)
    k_rest = dense_params if rest_identity else int(proj_dim)
    k_fac = offset + k_rest
    final_dim = k_fac if proj_dim == "all" else min(int(proj_dim), k_fac)
    return FactorPlan(
        leaves=tuple(plans), order=order, dense=dense, factor_dims=factor_dims, proj_dim=proj_dim,
        k_factor=offset, k_rest=k_rest, rest_identity=bool(rest_identity), k_fac=k_fac,
        num_params=int(sum(p.size for p in plans)), dense_params=dense_params, final_dim=final_dim,
        second_stage=final_dim < k_fac,
    )
