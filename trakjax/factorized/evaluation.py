"""The rewriting evaluator: runs the output's jaxpr with a tap on every factorized site.

:func:`evaluate` is ``jax.core.eval_jaxpr`` with three changes, all driven by an
:class:`~trakjax.factorized.analysis.Analysis` of the same jaxpr:

* at a site of a factorized leaf, the equation is evaluated as is and its output goes through
  :func:`trakjax.factorized.taps.tap` with that leaf's factor matrices and zero Z (indexed at the
  site's static slice indices, its dot_general batch axes leading);
* a jit/pjit/closed_call with factorized leaves flowing in is evaluated inline; a remat call is
  rebuilt with ``jax.checkpoint`` (same ``policy`` and ``prevent_cse``, so rematerialization is
  kept); a ``cond`` is rebuilt with ``lax.switch``; a ``scan`` is rebuilt with ``lax.scan`` and
  the factor matrices and Z of the leaves it slices are passed as xs (moved to lead with the
  scanned axis), those of the leaves it receives whole as closed-over constants;
* a convolution whose input or output has fewer spatial positions than its window is computed
  as matmuls of its patches (:mod:`~trakjax.factorized.small_convolutions`: XLA's CPU backend runs it
  swapped, slowly);
* every other equation (custom_jvp/custom_vjp calls included: their rules stay intact) is
  re-bound unchanged.

``scope`` maps each factorized leaf to its :class:`LeafArrays`, whose leading dims are the leaf's
slice axes not yet consumed by an enclosing scan. A scan body gets the factors of the leaves it
receives whole and of those it slices along one of their slice axes; a leaf sliced along another
axis has no site inside (the analysis would have made that axis a slice axis), so its factors
stay outside.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from trakjax.factorized import compat, small_convolutions
from trakjax.factorized.analysis import Analysis
from trakjax.factorized.taps import TapConfig, tap


class LeafArrays(NamedTuple):
    """One factorized leaf's factor matrices and Z in a scope.

    ``p0``/``p1``: (*slices, D_s, k_s) float32, or None for an identity side; ``z``:
    (*slices, k_0, k_1); ``axes``: the leaf's slice axes that the leading dims hold (leaf order).
    """

    p0: jax.Array | None
    p1: jax.Array | None
    z: jax.Array
    axes: tuple[int, ...]


class Context(NamedTuple):
    """Static inputs of the evaluation: the analysis and one :class:`TapConfig` per site key."""

    analysis: Analysis
    taps: dict
    factorized: frozenset


def evaluate(ctx: Context, closed_jaxpr, args, scope: dict) -> list:
    """Evaluate ``closed_jaxpr`` on ``args`` with the taps of ``ctx`` (see the module docstring)."""
    jaxpr, consts = compat.open_jaxpr(closed_jaxpr)
    return _eval(ctx, jaxpr, consts, list(args), (), scope)


def _eval(ctx: Context, jaxpr, consts, args, path: tuple, scope: dict) -> list:
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        key = path + (id(eqn),)
        invals = [compat.read(env, v) for v in eqn.invars]
        call = ctx.analysis.calls.get(key)
        if key in ctx.taps:
            outs = _bind(eqn, invals)
            outs[0] = _tap(ctx, key, eqn, invals, outs[0], scope)
        elif call is not None and call.leaves & ctx.factorized & scope.keys():
            outs = _call(ctx, eqn, invals, key, scope, call)
        else:
            outs = _bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [compat.read(env, v) for v in jaxpr.outvars]


def _bind(eqn, invals) -> list:
    """Evaluate one equation unchanged, except a convolution whose input or output is smaller than
    its window: that one by patches (:mod:`~trakjax.factorized.small_convolutions`), the same values."""
    if eqn.primitive.name == "conv_general_dilated":
        y = small_convolutions.convolve_bound(invals[0], invals[1], compat.bind_params(eqn))
        if y is not None:
            return [y]
    return compat.bind(eqn, invals)


def _tap(ctx: Context, key, eqn, invals, y, scope):
    rec = ctx.analysis.sites[key]
    cfg: TapConfig = ctx.taps[key]
    arrays = scope[rec.leaf]
    static = dict(rec.static_index)
    index = tuple(static.get(a, slice(None)) for a in arrays.axes)
    p0, p1, z = (None if t is None else t[index] for t in (arrays.p0, arrays.p1, arrays.z))
    p_c, p_f = (p0, p1) if cfg.c_side == 0 else (p1, p0)
    if rec.kind == "dot_general":
        x = invals[1 - cfg.geometry.w_pos]
    elif rec.kind == "conv_general_dilated":
        x = invals[0]
    else:
        x = invals[1]
    return tap(cfg, y, x, z, p_c, p_f)


def _split(scope: dict, leaves) -> tuple[dict, dict]:
    """(traced arrays, static axes) of ``leaves``' scope entries, to pass through a transform."""
    arrays = {leaf: (scope[leaf].p0, scope[leaf].p1, scope[leaf].z) for leaf in leaves}
    axes = {leaf: scope[leaf].axes for leaf in leaves}
    return arrays, axes


def _join(arrays: dict, axes: dict) -> dict:
    return {leaf: LeafArrays(*arrays[leaf], axes[leaf]) for leaf in arrays}


def _call(ctx: Context, eqn, invals, key, scope, call) -> list:
    name = eqn.primitive.name
    leaves = sorted(call.leaves & ctx.factorized & scope.keys())  # factors this scope holds
    if name in compat.JIT_PRIMITIVES:
        sub, consts = compat.open_jaxpr(compat.call_jaxpr(eqn))
        return _eval(ctx, sub, consts, invals, key, scope)
    if name in compat.REMAT_PRIMITIVES:
        sub, consts = compat.open_jaxpr(eqn.params["jaxpr"])
        arrays, axes = _split(scope, leaves)

        def body(vals, arrays):
            return _eval(ctx, sub, consts, vals, key, _join(arrays, axes))

        fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
        return fn(invals, arrays)
    if name == "cond":
        return _cond(ctx, eqn, invals, key, scope, leaves)
    if name == "scan":
        return _scan(ctx, eqn, invals, key, scope, call)
    raise NotImplementedError(f"factorized evaluation of {name} with factorized leaves flowing in")


def _cond(ctx: Context, eqn, invals, key, scope, leaves) -> list:
    arrays, axes = _split(scope, leaves)

    def branch(b):
        sub, consts = compat.open_jaxpr(eqn.params["branches"][b])
        return lambda ops, arrays: _eval(ctx, sub, consts, ops, key + (b,), _join(arrays, axes))

    branches = [branch(b) for b in range(len(eqn.params["branches"]))]
    return list(lax.switch(invals[0], branches, invals[1:], arrays))


def _scan(ctx: Context, eqn, invals, key, scope, call) -> list:
    n_consts, n_carry = compat.scan_counts(eqn.params)
    sub, consts = compat.open_jaxpr(eqn.params["jaxpr"])
    inner = {leaf: scope[leaf] for leaf in call.scan_consts if leaf in ctx.factorized and leaf in scope}
    sliced, axes = {}, {}
    for leaf, axis in call.scan_xs:
        arr = scope.get(leaf)
        if leaf not in ctx.factorized or arr is None or axis not in arr.axes:
            continue  # no site of this leaf inside needs its factors
        pos = arr.axes.index(axis)
        sliced[leaf] = tuple(None if t is None else jnp.moveaxis(t, pos, 0) for t in arr[:3])
        axes[leaf] = arr.axes[:pos] + arr.axes[pos + 1:]
    const_vals = invals[:n_consts]

    def body(carry, xs):
        vals, arrays = xs
        body_scope = {**inner, **_join(arrays, axes)}
        outs = _eval(ctx, sub, consts, [*const_vals, *carry, *vals], key, body_scope)
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(
        body, invals[n_consts:n_consts + n_carry], (invals[n_consts + n_carry:], sliced),
        length=eqn.params["length"], reverse=eqn.params["reverse"], unroll=eqn.params["unroll"],
    )
    return [*carry, *ys]
