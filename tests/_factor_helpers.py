"""Models and an explicit float64 reference for the factorized family's tests."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import factorized, randomness


def per_example_grads(output_fn, leaves, batch, keys=None):
    """jax.jit(jax.vmap(jax.grad(output_fn))) over the batch: one (B, *shape) array per leaf."""
    grad = jax.grad(lambda d, ex, k: output_fn(d, ex, k))
    fn = jax.jit(jax.vmap(grad, in_axes=(None, 0, None if keys is None else 0)))
    return fn(list(leaves), batch, keys)


def _identity_or(matrix, slices, dim):
    if matrix is None:
        return np.broadcast_to(np.eye(dim), (slices, dim, dim))
    return np.asarray(matrix, np.float64).reshape(slices, dim, -1)


def _slices_first(g, slice_axes, order=None):
    """(B, *shape) -> (B, slice axes..., other axes...): the others in ``order`` (default: leaf order)."""
    ndim = g.ndim - 1
    rest = [a for a in range(ndim) if a not in slice_axes] if order is None else list(order)
    return g.transpose([0] + [1 + a for a in slice_axes] + [1 + a for a in rest])


def reference_features(plan, factors, grads, *, kind, seed, model_id):
    """φ from explicitly materialized per-example gradients and explicit kron(P_0, P_1), float64."""
    grads = [np.asarray(g, np.float64) for g in grads]
    batch = grads[0].shape[0]
    blocks = []
    for i in plan.order:
        leaf = plan.leaves[i]
        s0, s1 = leaf.sides
        n = leaf.num_slices
        d0 = math.prod(leaf.shape[a] for a in s0.axes)
        d1 = math.prod(leaf.shape[a] for a in s1.axes)
        g = _slices_first(grads[i], leaf.slice_axes, s0.axes + s1.axes).reshape(batch, n, d0, d1)
        if leaf.bias >= 0:
            b = _slices_first(grads[leaf.bias], plan.leaves[leaf.bias].slice_axes).reshape(batch, n, -1)
            g = np.concatenate([g, b[:, :, None, :]], 2) if leaf.bias_side == 0 else np.concatenate([g, b[:, :, :, None]], 3)
        p0 = _identity_or(factors.leaves[i].p0, n, s0.dim)
        p1 = _identity_or(factors.leaves[i].p1, n, s1.dim)
        scale = math.sqrt(math.prod(s.k for s in leaf.sides if not s.identity))
        for s in range(n):
            blocks.append(g[:, s].reshape(batch, -1) @ np.kron(p0[s], p1[s]) / scale)
    if plan.dense:
        rest = np.concatenate([grads[i].reshape(batch, -1) for i in plan.dense], 1)
        if not plan.rest_identity:
            r = np.asarray(randomness.projection_matrix(kind, seed, model_id, 0, rest.shape[1], plan.k_rest), np.float64)
            rest = rest @ r / math.sqrt(plan.k_rest)
        blocks.append(rest)
    u = np.concatenate(blocks, 1)
    assert u.shape[1] == plan.k_fac
    if plan.second_stage:
        key = randomness.second_stage_key(seed, model_id, kind)
        r2 = np.asarray(randomness.factor_matrix(kind, key, plan.k_fac, plan.final_dim), np.float64)
        return u @ r2 / math.sqrt(plan.num_params)
    return u * math.sqrt(plan.k_fac / plan.num_params)


def run_features(output_fn, leaves, batch, paths, *, keys=None, factor_dims=64, proj_dim=2048,
                 kind="rademacher", seed=0, model_id=0, example=None, jit=True):
    """(plan, factors, outputs, features) of the factorized family on a batch."""
    if example is None:
        example = jax.tree_util.tree_map(lambda x: x[0], batch)
    key0 = None if keys is None else keys[0]
    plan = factorized.plan_factorization(output_fn, leaves, example, key0, paths=paths,
                                         factor_dims=factor_dims, proj_dim=proj_dim)
    factors = factorized.factor_matrices(plan, seed=seed, model_id=model_id, kind=kind)

    def fn(leaves, batch, keys, factors):
        return factorized.factorized_features(output_fn, leaves, batch, keys, plan, factors, kind=kind)

    fn = jax.jit(fn) if jit else fn
    outputs, features = fn(list(leaves), batch, keys, factors)
    return plan, factors, np.asarray(outputs), np.asarray(features)


def check_exact(output_fn, leaves, batch, paths, *, keys=None, rtol=1e-5, **kwargs):
    """Factorized features equal the explicit reference; returns the plan."""
    plan, factors, _, features = run_features(output_fn, leaves, batch, paths, keys=keys, **kwargs)
    grads = per_example_grads(output_fn, leaves, batch, keys)
    expected = reference_features(plan, factors, grads, kind=kwargs.get("kind", "rademacher"),
                                  seed=kwargs.get("seed", 0), model_id=kwargs.get("model_id", 0))
    assert features.shape == expected.shape == (jax.tree_util.tree_leaves(batch)[0].shape[0], plan.final_dim)
    err = np.linalg.norm(features - expected) / np.linalg.norm(expected)
    assert err <= rtol, (err, plan)
    return plan


def relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


__all__ = ["check_exact", "per_example_grads", "reference_features", "relative_error", "run_features", "jnp"]
