"""trakjax.attribute against a float64 numpy computation of the formula of docs/design.md ("The math").

The model is a linear softmax classifier, logits = x W + b, whose margin gradients have a closed
form: with z the logits, y the label and s = softmax over the classes other than y,
∂f/∂z_j = 1 for j = y and −s_j otherwise; ∂f/∂W = x ⊗ ∂f/∂z and ∂f/∂b = ∂f/∂z.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import trakjax
from trakjax import tasks

D, C = 6, 4
N, T = 30, 5


def apply_fn(params, x):
    return x @ params["w"] + params["b"]


def make_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N + T, D)).astype(np.float32)
    y = rng.integers(0, C, size=N + T).astype(np.int32)
    return (x[:N], y[:N]), (x[N:], y[N:])


def make_params(seed):
    rng = np.random.default_rng(100 + seed)
    return {
        "b": rng.normal(size=(C,)).astype(np.float32),
        "w": rng.normal(size=(D, C)).astype(np.float32),
    }


def closed_form_grads(params, x, y):
    """(n, P) float64 margin gradients, in jax's leaf order: b then w (flattened C order)."""
    w = params["w"].astype(np.float64)
    b = params["b"].astype(np.float64)
    x = x.astype(np.float64)
    z = x @ w + b
    rows = []
    for zi, xi, yi in zip(z, x, y, strict=True):
        others = np.delete(np.arange(C), yi)
        s = np.exp(zi[others] - zi[others].max())
        s /= s.sum()
        dz = np.zeros(C)
        dz[yi] = 1.0
        dz[others] = -s
        rows.append(np.concatenate([dz, np.outer(xi, dz).ravel()]))
    return np.array(rows)


def closed_form_q(params, x, y):
    z = x.astype(np.float64) @ params["w"].astype(np.float64) + params["b"].astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return 1.0 - p[np.arange(len(y)), y]


def closed_form_scores(checkpoints, train, targets, lam, reference_compat=False):
    p = D * C + C
    total = np.zeros((N, T))
    q_total = np.zeros(N)
    for params in checkpoints:
        phi = closed_form_grads(params, *train) / np.sqrt(p)
        psi = closed_form_grads(params, *targets) / np.sqrt(p)
        inverse = np.linalg.inv(phi.T @ phi + lam * np.eye(p))
        if reference_compat:
            inverse /= np.abs(inverse).mean()
        total += phi @ inverse @ psi.T
        q_total += closed_form_q(params, *train)
    m = len(checkpoints)
    return total / m * (q_total / m)[:, None]


@pytest.mark.parametrize("reference_compat", [False, True])
def test_identity_projection_matches_float64_closed_form(reference_compat):
    train, targets = make_data(0)
    checkpoints = [make_params(0), make_params(1)]
    task = tasks.image_classification(apply_fn)
    lam = 0.05
    got = trakjax.attribute(
        task, checkpoints, train, targets, projection="identity", lambda_reg=lam,
        batch_size=16, backend="xla", kernel="trak", reference_compat=reference_compat,
    )
    expected = closed_form_scores(checkpoints, train, targets, lam, reference_compat)
    assert got.shape == (N, T)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


def test_lambda_zero_raises_on_the_structural_null_space_of_the_margin():
    # Σ_j ∂f/∂z_j = 0, so the identity Gram has rank P − (D + 1) = 21 < 28 = k even with N > P.
    train, targets = make_data(1)
    task = tasks.image_classification(apply_fn)
    with pytest.raises(ValueError, match="numerical rank 21 < k"):
        trakjax.attribute(
            task, [make_params(2)], train, targets, projection="identity", lambda_reg=0.0,
            backend="xla", kernel="trak",
        )


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_random_projection_matches_closed_form_with_the_contract_matrix(lam):
    # k = 8 below the rank (21) of the gradients: λ = 0 is well posed and means exactly zero.
    train, targets = make_data(2)
    params = make_params(3)
    k = 8
    task = tasks.image_classification(apply_fn)
    got = trakjax.attribute(
        task, [params], train, targets, projection="rademacher", proj_dim=k, seed=5, lambda_reg=lam, backend="xla", kernel="trak",
        model_ids=[7],
    )
    p = D * C + C
    r = np.asarray(trakjax.randomness.projection_matrix("rademacher", 5, 7, 0, p, k), np.float64)
    phi = closed_form_grads(params, *train) @ r / np.sqrt(p)
    psi = closed_form_grads(params, *targets) @ r / np.sqrt(p)
    expected = phi @ np.linalg.inv(phi.T @ phi + lam * np.eye(k)) @ psi.T
    expected *= closed_form_q(params, *train)[:, None]
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


def test_feature_storage_dtypes_and_bfloat16_parameters():
    train, targets = make_data(3)
    checkpoints = [make_params(4)]
    task = tasks.image_classification(apply_fn)
    exact = closed_form_scores(checkpoints, train, targets, 0.05)
    for dtype, tol in (("bfloat16", 5e-2), ("float16", 5e-3)):
        got = trakjax.attribute(
            task, checkpoints, train, targets, projection="identity", lambda_reg=0.05,
            dtype=dtype, backend="xla", kernel="trak",
        )
        rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert rel <= tol, (dtype, rel)
    bf16 = [{k: jnp.asarray(v, jnp.bfloat16) for k, v in checkpoints[0].items()}]
    got = trakjax.attribute(
        task, bf16, train, targets, projection="identity", lambda_reg=0.05, backend="xla", kernel="trak"
    )
    rounded = [{k: np.asarray(v.astype(jnp.float32)) for k, v in bf16[0].items()}]
    expected = closed_form_scores(rounded, train, targets, 0.05)
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 5e-2, rel
