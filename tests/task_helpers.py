"""Shared float64 closed form for the task tests: TRAK scores from batched per-example gradients.

The per-example gradients here come from ``jax.jacrev`` of the model's outputs computed on the
whole batch at once (no per-example ``vmap``, no batch axis of 1), so they check the tasks'
single-example output functions against the batched model. The algebra is float64 numpy;
R comes from :func:`trakjax.randomness.projection_matrix`, the contract's plain generator.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import randomness


def batched_grads(outputs_fn, params, *args) -> np.ndarray:
    """(B, P) float64 Jacobian of ``outputs_fn(params, *args) -> (B,)``, leaves in flattening order.

    Data go in as arguments, not closed over, so that equal shapes give equal programs (and
    hits in the persistent compilation cache).
    """
    jac = jax.jit(jax.jacrev(outputs_fn))(params, *args)
    leaves = jax.tree_util.tree_leaves(jac)
    batch = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(batch, -1) for x in leaves], axis=1)


def train_and_target_grads(outputs_fn, params, train, targets, *args):
    """(G_train, G_targets) from one Jacobian of ``outputs_fn(params, train ++ targets, *args)``."""
    n = jax.tree_util.tree_leaves(train)[0].shape[0]
    both = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), train, targets)
    g = batched_grads(outputs_fn, params, both, *args)
    return g[:n], g[n:]


@functools.lru_cache(maxsize=16)
def contract_matrix(num_params: int, proj_dim: int, seed: int, model_id: int) -> np.ndarray:
    generate = jax.jit(randomness.projection_matrix, static_argnums=(0, 1, 2, 3, 4, 5))
    return np.asarray(generate("rademacher", seed, model_id, 0, num_params, proj_dim), np.float64)


def projected(g, proj_dim: int, seed: int, model_id: int) -> np.ndarray:
    """φ = G R / √P, float64, R the contract's matrix of (seed, model_id)."""
    p = g.shape[1]
    return g @ contract_matrix(p, proj_dim, seed, model_id) / np.sqrt(p)


def kernel_scores(phi, psi, lam) -> np.ndarray:
    """Φ (ΦᵀΦ + λI)⁻¹ Ψᵀ in float64."""
    k = phi.shape[1]
    return phi @ np.linalg.solve(phi.T @ phi + lam * np.eye(k), psi.T)


def relative_lambda(phis, proj_dim: int, relative: float = 0.1) -> float:
    """An absolute λ at ``relative`` times the mean eigenvalue trace(ΦᵀΦ)/k (mean over Φs)."""
    return float(relative * np.mean([np.trace(phi.T @ phi) for phi in phis]) / proj_dim)


def closed_form_scores(g_train, g_targets, q, *, proj_dim, seed, model_id, relative=0.1):
    """(scores (N, T), λ) for one checkpoint: Φ (ΦᵀΦ + λI)⁻¹ Ψᵀ ⊙ q, λ from :func:`relative_lambda`."""
    phi = projected(g_train, proj_dim, seed, model_id)
    psi = projected(g_targets, proj_dim, seed, model_id)
    lam = relative_lambda([phi], proj_dim, relative)
    return kernel_scores(phi, psi, lam) * np.asarray(q, np.float64)[:, None], lam


def relative_error(got, expected) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected))


# --------------------------------------------------------------------------- a tiny CLIP pair


def clip_fns():
    def normalize(e):
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def image_fn(params, images):
        return normalize(jnp.tanh(images @ params["img"]))

    def text_fn(params, texts):
        return normalize(texts @ params["txt"])

    return image_fn, text_fn


def clip_params(seed):
    rng = np.random.default_rng(seed)
    return {"img": rng.normal(size=(5, 4)).astype(np.float32),
            "txt": rng.normal(size=(3, 4)).astype(np.float32)}


def clip_data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)
