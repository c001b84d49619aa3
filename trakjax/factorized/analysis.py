"""Detection: where each differentiated leaf meets the activations, read off the output's jaxpr.

:func:`analyze` walks the jaxpr of ``output(diff_leaves, example, key)`` for one example. Every
differentiated leaf W is followed through layout-only operations (:mod:`trakjax.factorized.views`)
to the equations that consume it:

* a **site** is a contraction of W with activations, of which ∇_W f = Σ_t a_t δ_tᵀ:
  ``dot_general`` (Dense, Einsum, DenseGeneral, attention projections, tied heads; a batch
  dimension on W makes per-slice factors), ``conv_general_dilated`` with W as the kernel
  (``feature_group_count = batch_group_count = 1``), and ``gather`` of whole rows of W (embedding
  lookups). Its :class:`SiteRecord` holds the contracted (C) and free (F) leaf axes, the slice
  axes (static indices, scanned axes, dot_general batch axes) and the static geometry the tap
  of :mod:`trakjax.factorized.taps` needs;
* a **bias add** is ``add(site output, view of a leaf b)`` where b is broadcast along the site's
  free axes only; b may then fold into W's factorization as a constant-1 input row;
* ``jit``/``pjit``/``closed_call``, remat (``jax.checkpoint``) and ``cond`` (every branch) are
  walked into; ``scan`` is walked into with W's consts passed whole and its xs sliced per
  iteration (the scanned leaf axis becomes a slice axis).

Anything else that consumes a view of W gives W a reason to go dense: ``custom_jvp_call`` /
``custom_vjp_call`` (the custom rule is kept intact, so a leaf flowing into one is not
factorized), ``while``, element-wise ops (``mul``, an ``add`` that is not a bias add), partial
slices, non-row gathers, grouped convolutions, contractions of two parameters, unknown
primitives. The decisions per leaf are made in :mod:`trakjax.factorized.plan`.

Sites and calls are keyed by the path of equation ids from the top-level jaxpr, so a sub-jaxpr
shared by two calls (JAX caches the jaxprs of jitted functions) keeps its sites apart.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

from jax import lax

from trakjax.factorized import compat
from trakjax.factorized.views import CAST_PRIMITIVES, View, leaf_view, propagate

LAYOUT_PRIMITIVES = CAST_PRIMITIVES | {"transpose", "squeeze", "reshape", "broadcast_in_dim", "slice", "dynamic_slice"}


class SiteRecord(NamedTuple):
    """One contraction of leaf ``leaf`` with activations.

    Attributes:
      key: the equation's key (path of equation ids).
      kind: ``"dot_general"``, ``"conv_general_dilated"`` or ``"gather"``.
      leaf: index of the differentiated leaf.
      c_axes, f_axes: leaf axes contracted with the activations, and free (in the output).
      slice_axes: the other leaf axes, sorted: static indices, scanned axes, batch axes.
      static_index: ``(axis, index)`` pairs of the statically indexed slice axes.
      batch_axes: dot_general batch axes of the leaf, in leaf order.
      geometry: the kind's static geometry for :mod:`trakjax.factorized.taps`.
      positions: number of positions t summed over (for memory estimates).
    """

    key: tuple
    kind: str
    leaf: int
    c_axes: tuple[int, ...]
    f_axes: tuple[int, ...]
    slice_axes: tuple[int, ...]
    static_index: tuple[tuple[int, int], ...]
    batch_axes: tuple[int, ...]
    geometry: tuple
    positions: int


class CallRecord(NamedTuple):
    """A call, cond or scan equation that views of differentiated leaves flow into.

    ``scan_xs`` lists ``(leaf, leaf axis)`` for leaves a scan slices per iteration,
    ``scan_consts`` the leaves it receives whole.
    """

    leaves: frozenset
    scan_xs: tuple[tuple[int, int], ...] = ()
    scan_consts: frozenset = frozenset()


class SiteOut(NamedTuple):
    """The output of a site: per output axis ``("F", leaf axes)``, ``("x",)`` or ``("batch", axis)``."""

    key: tuple
    leaf: int
    dims: tuple
    fixed: tuple


class DotGeometry(NamedTuple):
    """A dot_general site: x → (batch…, n, d_C) by ``x_perm``; output → (batch…, n, d_F) by ``y_perm``."""

    w_pos: int
    x_perm: tuple[int, ...]
    x_shape: tuple[int, ...]
    y_perm: tuple[int, ...]
    y_shape: tuple[int, ...]
    d_c: int
    d_f: int


class ConvGeometry(NamedTuple):
    """A convolution site: P_C as a kernel = rows reshaped to ``c_shape + (k,)``, transposed by
    ``kernel_perm``; the output's feature axis moves last by ``y_perm``."""

    c_shape: tuple[int, ...]
    kernel_perm: tuple[int, ...]
    window_strides: tuple
    padding: tuple
    lhs_dilation: tuple
    rhs_dilation: tuple
    dimension_numbers: tuple
    y_perm: tuple[int, ...]
    d_c: int
    d_f: int


class GatherGeometry(NamedTuple):
    """A row-gather site: row index = Σ_j idx[..., j]·strides[j] (bounds ``sizes``); the output
    → (positions, d_F) by ``y_perm``; ``fill`` zeroes out-of-bounds rows (else they are clipped)."""

    strides: tuple[int, ...]
    sizes: tuple[int, ...]
    fill: bool
    y_perm: tuple[int, ...]
    d_c: int
    d_f: int


class Analysis:
    """What :func:`analyze` found: sites, calls, bias adds and dense reasons, per leaf."""

    def __init__(self, leaf_shapes):
        self.leaf_shapes = [tuple(s) for s in leaf_shapes]
        n = len(self.leaf_shapes)
        self.sites: dict[tuple, SiteRecord] = {}
        self.calls: dict[tuple, CallRecord] = {}
        self.site_bias: dict[tuple, int] = {}
        self.reasons: list[list[str]] = [[] for _ in range(n)]
        self.leaf_sites: list[list[tuple]] = [[] for _ in range(n)]
        self.bias_uses: list[list[tuple[tuple, int, tuple]]] = [[] for _ in range(n)]

    def dense(self, leaf: int, reason: str) -> None:
        if reason not in self.reasons[leaf]:
            self.reasons[leaf].append(reason)


def analyze(closed_jaxpr, num_leaves: int) -> Analysis:
    """Analyse the jaxpr of ``output(diff_leaves, example, key)``; its first invars are the leaves."""
    jaxpr, _ = compat.open_jaxpr(closed_jaxpr)
    shapes = [v.aval.shape for v in jaxpr.invars[:num_leaves]]
    state = Analysis(shapes)
    env = {v: leaf_view(i, len(s)) for i, (v, s) in enumerate(zip(jaxpr.invars, shapes, strict=False))}
    outs = _walk(jaxpr, env, (), state)
    for info in outs:
        if isinstance(info, View):
            state.dense(info.leaf, "returned by the output function")
    return state


def _uses(jaxpr) -> Counter:
    counts: Counter = Counter()
    for eqn in jaxpr.eqns:
        counts.update(v for v in eqn.invars if not isinstance(v, compat.Literal))
    counts.update(v for v in jaxpr.outvars if not isinstance(v, compat.Literal))
    return counts


def _walk(jaxpr, env: dict, path: tuple, st: Analysis) -> list:
    """Walk one jaxpr with ``env`` mapping its invars to infos; returns the outvars' infos."""
    uses = _uses(jaxpr)
    for eqn in jaxpr.eqns:
        infos = [None if isinstance(v, compat.Literal) else env.get(v) for v in eqn.invars]
        if not any(x is not None for x in infos):
            continue
        key = path + (id(eqn),)
        outs = _equation(eqn, infos, key, uses, st)
        for var, info in zip(eqn.outvars, outs, strict=False):
            if info is not None:
                env[var] = info
    return [None if isinstance(v, compat.Literal) else env.get(v) for v in jaxpr.outvars]


def _views(infos) -> list[tuple[int, View]]:
    return [(i, x) for i, x in enumerate(infos) if isinstance(x, View)]


def _no_site_outputs(infos) -> list:
    """Infos passed into a sub-jaxpr: a site output entering a call is an ordinary activation
    there (a bias add inside cannot see the output's other uses outside)."""
    return [None if isinstance(x, SiteOut) else x for x in infos]


def _equation(eqn, infos, key, uses, st: Analysis) -> list:
    """Infos of ``eqn``'s outputs; records sites, calls and dense reasons."""
    name = eqn.primitive.name
    views = _views(infos)
    n_out = len(eqn.outvars)
    if not views:
        so = infos[0] if len(infos) == 1 else None
        if name in CAST_PRIMITIVES and isinstance(so, SiteOut) and uses[eqn.invars[0]] == 1:
            return [so]
        if name in ("add", "add_any"):
            return [None]
        return [None] * n_out
    if name in LAYOUT_PRIMITIVES and [i for i, _ in views] == [0]:
        view = views[0][1]
        out = propagate(eqn, view, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape,
                        st.leaf_shapes[view.leaf])
        if isinstance(out, str):
            st.dense(view.leaf, f"{out} ({name})")
            return [None]
        return [out]
    if name == "dot_general":
        return [_dot_site(eqn, infos, key, st)]
    if name == "conv_general_dilated":
        return [_conv_site(eqn, infos, key, st)]
    if name == "gather":
        return [_gather_site(eqn, infos, key, st)]
    if name in ("add", "add_any"):
        _bias_add(eqn, infos, key, uses, st)
        return [None]
    if name in compat.JIT_PRIMITIVES or name in compat.REMAT_PRIMITIVES:
        sub, _ = compat.open_jaxpr(compat.call_jaxpr(eqn))
        st.calls[key] = CallRecord(frozenset(v.leaf for _, v in views))
        outs = _walk(sub, dict(zip(sub.invars, _no_site_outputs(infos), strict=True)), key, st)
        sub_uses = _uses(sub)
        return [x if not isinstance(x, SiteOut) or sub_uses[v] == 1 else None
                for x, v in zip(outs, sub.outvars, strict=True)]
    if name == "cond":
        return _cond(eqn, infos, key, uses, st)
    if name == "scan":
        return _scan(eqn, infos, key, uses, st)
    for _, view in views:
        if name in compat.CUSTOM_PRIMITIVES:
            st.dense(view.leaf, f"flows into {name}{_callee(eqn)} (a custom derivative rule, kept "
                                "intact)")
        elif name == "while":
            st.dense(view.leaf, "used inside a while loop")
        elif name in ("mul", "add", "sub", "div"):
            st.dense(view.leaf, f"used element-wise by {name}, not contracted with activations")
        else:
            st.dense(view.leaf, f"consumed by {name}")
    return [None] * n_out


def _callee(eqn) -> str:
    """`` 'name'`` of the function a custom_jvp/custom_vjp call wraps, when JAX recorded it."""
    sub = eqn.params.get("call_jaxpr")
    info = getattr(getattr(sub, "jaxpr", sub), "debug_info", None)
    name = getattr(info, "func_name", None)
    return f" {name!r}" if isinstance(name, str) and name else ""


def _escaping(outs, outvars, uses, st: Analysis, where: str) -> None:
    """Views returned by a cond branch or scan body and used outside send their leaf dense."""
    for x, var in zip(outs, outvars, strict=True):
        if isinstance(x, View) and uses[var] > 0:
            st.dense(x.leaf, f"returned from a {where} and used outside it")


def _cond(eqn, infos, key, uses, st: Analysis) -> list:
    views = _views(infos[1:])
    if _views(infos[:1]):
        st.dense(infos[0].leaf, "used as a cond predicate")
    st.calls[key] = CallRecord(frozenset(v.leaf for _, v in views))
    for b, branch in enumerate(eqn.params["branches"]):
        sub, _ = compat.open_jaxpr(branch)
        outs = _walk(sub, dict(zip(sub.invars, _no_site_outputs(infos[1:]), strict=True)), key + (b,), st)
        _escaping(outs, eqn.outvars, uses, st, "cond branch")
    return [None] * len(eqn.outvars)


def _scan(eqn, infos, key, uses, st: Analysis) -> list:
    n_consts, n_carry = compat.scan_counts(eqn.params)
    sub, _ = compat.open_jaxpr(eqn.params["jaxpr"])
    body_infos = list(infos)
    xs_axes: dict[int, set] = {}
    consts: set = set()
    for i, info in enumerate(infos):
        if not isinstance(info, View):
            body_infos[i] = None if isinstance(info, SiteOut) else info
            continue
        if n_consts <= i < n_consts + n_carry:
            st.dense(info.leaf, "carried through a scan loop")
            body_infos[i] = None
        elif i < n_consts:
            consts.add(info.leaf)
        elif len(info.dims[0]) == 1:
            axis = info.dims[0][0]
            xs_axes.setdefault(info.leaf, set()).add(axis)
            body_infos[i] = info._replace(dims=info.dims[1:],
                                          fixed=tuple(sorted(info.fixed + ((axis, ("scan", key)),))))
        else:
            st.dense(info.leaf, "scanned over an axis that is not one leaf axis")
            body_infos[i] = None
    for leaf, axes in xs_axes.items():
        if len(axes) > 1 or leaf in consts:
            st.dense(leaf, "enters one scan both whole and sliced, or sliced along two axes")
    scan_xs = tuple(sorted((leaf, next(iter(axes))) for leaf, axes in xs_axes.items()))
    st.calls[key] = CallRecord(frozenset(consts | set(xs_axes)), scan_xs, frozenset(consts))
    outs = _walk(sub, dict(zip(sub.invars, body_infos, strict=True)), key, st)
    _escaping(outs, eqn.outvars, uses, st, "scan body")
    return [None] * len(eqn.outvars)


def _split_fixed(view: View) -> tuple[tuple, tuple]:
    """(static (axis, index) pairs, scanned axes) of a view."""
    static = tuple((a, t[1]) for a, t in view.fixed if t[0] == "index")
    scanned = tuple(a for a, t in view.fixed if t[0] == "scan")
    return static, scanned


def _record(st: Analysis, key, kind, view: View, c_axes, f_axes, batch_axes, geometry, positions):
    static, scanned = _split_fixed(view)
    slice_axes = tuple(sorted({a for a, _ in static} | set(scanned) | set(batch_axes)))
    rec = SiteRecord(key, kind, view.leaf, tuple(sorted(c_axes)), tuple(sorted(f_axes)), slice_axes,
                     static, tuple(batch_axes), geometry, int(positions))
    st.sites[key] = rec
    st.leaf_sites[view.leaf].append(key)
    return rec


def _first(run) -> float:
    return run[0] if run else math.inf


def _dot_site(eqn, infos, key, st: Analysis):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    views = _views(infos[:2])
    if len(views) == 2:
        for _, v in views:
            st.dense(v.leaf, "contracted with another parameter (dot_general of two parameters)")
        return None
    w_pos, view = views[0]
    w_aval, x_aval = eqn.invars[w_pos].aval, eqn.invars[1 - w_pos].aval
    wc, xc, wb, xb = (lc, rc, lb, rb) if w_pos == 0 else (rc, lc, rb, lb)
    wc, xc, wb, xb = map(tuple, (wc, xc, wb, xb))
    bad = [d for d, run in enumerate(view.dims) if not run and w_aval.shape[d] != 1]
    if bad:
        st.dense(view.leaf, "broadcast along an axis before a contraction")
        return None
    if any(len(view.dims[d]) != 1 for d in wb):
        st.dense(view.leaf, "dot_general batch axis that is not one leaf axis")
        return None
    w_free = tuple(d for d in range(len(w_aval.shape)) if d not in wc and d not in wb)
    x_free = tuple(d for d in range(len(x_aval.shape)) if d not in xc and d not in xb)
    batch_order = sorted(range(len(wb)), key=lambda i: view.dims[wb[i]][0])
    c_order = sorted(range(len(wc)), key=lambda i: _first(view.dims[wc[i]]))
    f_sorted = sorted(w_free, key=lambda d: _first(view.dims[d]))
    x_perm = tuple(xb[i] for i in batch_order) + x_free + tuple(xc[i] for i in c_order)
    b_sizes = tuple(x_aval.shape[xb[i]] for i in batch_order)
    n = math.prod(x_aval.shape[d] for d in x_free)
    d_c = math.prod(w_aval.shape[d] for d in wc)
    d_f = math.prod(w_aval.shape[d] for d in w_free)
    nb, nxf = len(wb), len(x_free)
    w_free_pos = {d: nb + (0 if w_pos == 0 else nxf) + i for i, d in enumerate(w_free)}
    x_free_pos = [nb + (len(w_free) if w_pos == 0 else 0) + i for i in range(nxf)]
    y_perm = tuple(batch_order) + tuple(x_free_pos) + tuple(w_free_pos[d] for d in f_sorted)
    geometry = DotGeometry(w_pos, x_perm, b_sizes + (n, d_c), y_perm, b_sizes + (n, d_f), d_c, d_f)
    c_axes = [a for d in wc for a in view.dims[d]]
    f_axes = [a for d in w_free for a in view.dims[d]]
    batch_axes = sorted(view.dims[d][0] for d in wb)
    _record(st, key, "dot_general", view, c_axes, f_axes, batch_axes, geometry, math.prod(b_sizes) * n)
    out_dims = [None] * len(eqn.outvars[0].aval.shape)
    for i, d in enumerate(wb):
        out_dims[i] = ("batch", view.dims[d][0])
    for d, pos in w_free_pos.items():
        out_dims[pos] = ("F", view.dims[d])
    out_dims = tuple(x if x is not None else ("x",) for x in out_dims)
    return SiteOut(key, view.leaf, out_dims, view.fixed)


def _conv_site(eqn, infos, key, st: Analysis):
    params = eqn.params
    if isinstance(infos[0], View):
        st.dense(infos[0].leaf, "used as the input of a convolution, not as its kernel")
    view = infos[1]
    if not isinstance(view, View):
        return None
    groups = (params["feature_group_count"], params["batch_group_count"])
    if groups != (1, 1):
        st.dense(view.leaf, f"grouped or depthwise convolution (feature_group_count={groups[0]}, "
                            f"batch_group_count={groups[1]})")
        return None
    if any(len(run) != 1 for run in view.dims):
        st.dense(view.leaf, "convolution kernel whose axes are not one leaf axis each")
        return None
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn
    axis = [run[0] for run in view.dims]
    c_axes = sorted(axis[d] for d in rhs_spec[1:])
    shape = eqn.invars[1].aval.shape
    c_shape = tuple(st.leaf_shapes[view.leaf][a] for a in c_axes)
    kernel_perm = tuple(len(c_axes) if d == rhs_spec[0] else c_axes.index(axis[d]) for d in range(len(shape)))
    out_shape = eqn.outvars[0].aval.shape
    y_perm = tuple(d for d in range(len(out_shape)) if d != out_spec[1]) + (out_spec[1],)
    geometry = ConvGeometry(c_shape, kernel_perm, tuple(params["window_strides"]), tuple(map(tuple, params["padding"])),
                            tuple(params["lhs_dilation"]), tuple(params["rhs_dilation"]), dn, y_perm,
                            math.prod(c_shape), shape[rhs_spec[0]])
    positions = math.prod(out_shape) // max(out_shape[out_spec[1]], 1)
    _record(st, key, "conv_general_dilated", view, c_axes, [axis[rhs_spec[0]]], (), geometry, positions)
    dims = tuple(("F", (axis[rhs_spec[0]],)) if d == out_spec[1] else ("x",) for d in range(len(out_shape)))
    return SiteOut(key, view.leaf, dims, view.fixed)


def _gather_site(eqn, infos, key, st: Analysis):
    if isinstance(infos[1], View):
        st.dense(infos[1].leaf, "used as gather indices")
    view = infos[0]
    if not isinstance(view, View):
        return None
    dn, params = eqn.params["dimension_numbers"], eqn.params
    shape = eqn.invars[0].aval.shape
    collapsed = tuple(dn.collapsed_slice_dims)
    row_lookup = (
        not tuple(getattr(dn, "operand_batching_dims", ()))
        and sorted(dn.start_index_map) == sorted(collapsed)
        and all(params["slice_sizes"][d] == (1 if d in collapsed else shape[d]) for d in range(len(shape)))
        and all(len(run) == 1 for run in view.dims)
    )
    if not row_lookup:
        st.dense(view.leaf, "gather that is not a lookup of whole rows")
        return None
    axis = [run[0] for run in view.dims]
    c_axes = sorted(axis[d] for d in collapsed)
    leaf_shape = st.leaf_shapes[view.leaf]
    strides = tuple(math.prod(leaf_shape[b] for b in c_axes if b > axis[d]) for d in dn.start_index_map)
    sizes = tuple(shape[d] for d in dn.start_index_map)
    free = [d for d in range(len(shape)) if d not in collapsed]
    out_shape = eqn.outvars[0].aval.shape
    offset = sorted(dn.offset_dims)
    batch_pos = [d for d in range(len(out_shape)) if d not in offset]
    y_perm = tuple(batch_pos) + tuple(offset[i] for i in sorted(range(len(free)), key=lambda i: axis[free[i]]))
    fill = params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
    d_f = math.prod(shape[d] for d in free)
    geometry = GatherGeometry(strides, sizes, bool(fill), y_perm, math.prod(sizes), d_f)
    positions = math.prod(out_shape[d] for d in batch_pos)
    _record(st, key, "gather", view, c_axes, [axis[d] for d in free], (), geometry, positions)
    dims = [("x",)] * len(out_shape)
    for i, d in enumerate(free):
        dims[offset[i]] = ("F", (axis[d],))
    return SiteOut(key, view.leaf, tuple(dims), view.fixed)


def _bias_add(eqn, infos, key, uses, st: Analysis) -> None:
    """Record ``add(site output, bias view)``; any other add of a view sends the leaf dense."""
    site = [(i, x) for i, x in enumerate(infos) if isinstance(x, SiteOut)]
    views = _views(infos)
    reason = "added to an activation (add), not contracted"
    if len(views) != 1 or len(site) != 1:
        for _, v in views:
            st.dense(v.leaf, reason)
        return
    (si, so), (_, bv) = site[0], views[0]
    rec = st.sites[so.key]
    ok = (
        uses[eqn.invars[si]] == 1
        and eqn.invars[si].aval.shape == eqn.outvars[0].aval.shape
        and not rec.batch_axes
        and so.key not in st.site_bias
        and _aligned(so, bv, rec, st)
    )
    if not ok:
        st.dense(bv.leaf, reason + " (not a bias of one contraction's output axes)")
        return
    st.site_bias[so.key] = bv.leaf
    st.bias_uses[bv.leaf].append((so.key, so.leaf, tuple(a for a, _ in bv.fixed)))


def _aligned(so: SiteOut, bv: View, rec: SiteRecord, st: Analysis) -> bool:
    """Whether the bias view runs along exactly the site's free axes, slice for slice."""
    b_axes = sorted(a for run in bv.dims for a in run)
    if len(b_axes) != len(rec.f_axes):
        return False
    to_bias = dict(zip(rec.f_axes, b_axes, strict=True))
    w_shape, b_shape = st.leaf_shapes[so.leaf], st.leaf_shapes[bv.leaf]
    if any(w_shape[a] != b_shape[to_bias[a]] for a in rec.f_axes):
        return False
    for out, run in zip(so.dims, bv.dims, strict=True):
        if out[0] == "F":
            if tuple(to_bias[a] for a in out[1]) != run:
                return False
        elif run:
            return False
    w_tokens = [t for _, t in so.fixed]
    b_tokens = [t for _, t in bv.fixed]
    return w_tokens == b_tokens and len(bv.dims) == len(so.dims)
