"""The curvature-weighted (Gauss–Newton) kernel (ΦᵀHΦ + λI)⁻¹: float64 closed forms.

A binary logistic regression (signed logit, identity projection, one checkpoint) is the case
where the kernel is exact: its scores must equal the one-step Newton influence
ψ_jᵀ(Σ_i h_i φ_i φ_iᵀ + λI)⁻¹ φ_i q_i computed by hand from the data and weights in float64.
"""

import json

import jax
import numpy as np
import pytest

import trakjax
from trakjax import curvature, pipeline, regularization, solve, tasks
from trakjax.errors import InvalidArgumentError, NumericalError, StoreError

N, D, T = 48, 4, 6
P = D + 1  # the identity projection is φ = g/√P: an absolute λ on ΦᵀHΦ is λ·P on the gradients' GᵀHG


def linear(params, x):
    return x @ params["w"] + params["b"]


def problem():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N + T, D)).astype(np.float32)
    logits = x @ np.array([1.5, -1.0, 0.5, 0.0]) + 0.3 * rng.normal(size=N + T)
    y = (logits > 0).astype(np.int32)
    return (x[:N], y[:N]), (x[N:], y[N:])


def fit(train, steps: int, ridge: float, rate: float = 1.0) -> dict:
    """Gradient descent in float64 on Σ softplus(−s·f) + (ridge/2)‖θ‖² from 0, ``steps`` steps."""
    x, y = train
    design = np.hstack([x.astype(np.float64), np.ones((x.shape[0], 1))])
    sign = 2.0 * y - 1.0
    theta = np.zeros(D + 1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(sign * (design @ theta)))  # 1 − σ(s f)
        theta -= rate * (-(design * (sign * p)[:, None]).sum(0) + ridge * theta) / x.shape[0]
    return {"w": theta[:D].astype(np.float32), "b": np.float32(theta[D])}


def newton_influence(params, train, targets, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(ψ_jᵀ(ΦᵀHΦ + λI)⁻¹φ_i, q) in float64: φ_i = s_i [x_i, 1], q = 1 − σ(s f), h = q(1 − q)."""
    theta = np.concatenate([np.asarray(params["w"], np.float64), [float(params["b"])]])

    def rows(data):
        x, y = data
        sign = 2.0 * y - 1.0
        design = np.hstack([x.astype(np.float64), np.ones((x.shape[0], 1))]) * sign[:, None]
        return design, 1.0 / (1.0 + np.exp(design @ theta))

    phi, q = rows(train)
    psi, _ = rows(targets)
    hessian = phi.T @ (phi * (q * (1 - q))[:, None]) + lam * np.eye(D + 1)
    return phi @ np.linalg.solve(hessian, psi.T), q


def test_weighted_gram_equals_float64_closed_form():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(37, 6)).astype(np.float32)
    h = rng.uniform(0.0, 0.3, 37)
    expected = phi.astype(np.float64).T @ (phi.astype(np.float64) * h[:, None])
    for rows in (8, 4096):  # padded blocks (zero weights) and one block
        got = solve.gram(phi, weights=h, block_rows=rows)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="weights need 37"):
        solve.gram(phi, weights=h[:5])


def test_curvature_clipped_at_zero_and_counted():
    h, clipped = curvature.clipped_curvature([0.2, -0.1, 0.0, -3.0])
    assert clipped == 2 and h.tolist() == [0.2, 0.0, 0.0, 0.0]
    with pytest.raises(InvalidArgumentError, match="NaN or infinite for 1 of 2"):
        curvature.clipped_curvature([0.1, np.nan])


def test_logistic_regression_scores_equal_one_step_newton_influence():
    train, targets = problem()
    params = fit(train, 3000, ridge=1.0)
    lam = 1.0  # the training ridge: GᵀHG + λI is the regularized loss's exact Hessian
    task = tasks.binary_classification(linear)
    scores, details = trakjax.attribute(task, [params], train, targets, projection="identity",
                                        kernel="gauss-newton", lambda_reg=lam / P, return_details=True)
    influence, q = newton_influence(params, train, targets, lam)
    expected = influence * q[:, None]
    assert details[0].kernel == "gauss-newton" and details[0].clipped_curvature == 0
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    trak = trakjax.attribute(task, [params], train, targets, projection="identity", kernel="trak",
                             lambda_reg=lam / P)
    assert np.abs(trak - expected).max() > 0.5 * np.abs(expected).max()  # TRAK's kernel is not this


def test_ensemble_of_checkpoints_of_different_training_lengths_is_the_plain_average():
    """Each checkpoint's (ΦᵀHΦ + λI)⁻¹ scales like 1/h̄_m; the ensemble averages the checkpoints'
    Newton steps as they are (no rescaling by h̄_m), times q̄."""
    train, targets = problem()
    checkpoints = [fit(train, 5, ridge=0.0, rate=0.5), fit(train, 3000, ridge=0.0, rate=1.0)]
    lam = 0.05
    task = tasks.binary_classification(linear)
    scores = trakjax.attribute(task, checkpoints, train, targets, projection="identity",
                               kernel="gauss-newton", lambda_reg=lam / P)
    parts = [newton_influence(params, train, targets, lam) for params in checkpoints]
    h_bar = [float(np.mean(q * (1 - q))) for _, q in parts]
    assert h_bar[0] > 3 * h_bar[1]  # the short run is far less confident
    q_bar = np.mean([q for _, q in parts], axis=0)
    expected = np.mean([influence for influence, _ in parts], axis=0) * q_bar[:, None]
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_implied_ridge_for_the_weighted_kernel_equals_closed_form():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(40, 5))
    delta = rng.normal(size=5)
    f = 0.2 + phi @ delta + 0.1 * rng.normal(size=40)  # outputs moved by the linearized model
    q = phi @ np.linalg.solve(phi.T @ phi, 3.0 * delta)  # Φᵀq = ρδ with ρ = 3
    h = rng.uniform(0.05, 0.25, 40)
    stats = regularization.ridge_statistics(phi, q, f, output_offset=0.2, curvature=h, kernel="gauss-newton")
    weighted = phi.T @ (phi * h[:, None])
    start = regularization.START_FRACTION * np.trace(weighted) / 40
    d = np.linalg.solve(weighted + start * np.eye(5), phi.T @ (h * (f - 0.2)))
    rho = float((phi.T @ q) @ d / (d @ d))
    assert 1.0 < rho < 9.0
    lam = regularization.auto_lambda(weighted, stats, kernel="gauss-newton")
    np.testing.assert_allclose(lam, rho / regularization.SUBSET_FRACTION, rtol=1e-6)


def test_rank_message_names_curved_examples():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(30, 8))
    h = np.zeros(30)
    h[:5] = 0.2  # only 5 examples carry curvature: rank ≤ 5 < k = 8
    weighted = phi.T @ (phi * h[:, None])
    with pytest.raises(NumericalError, match=r"ΦᵀHΦ.*#\{h>0\}=5"):
        solve.solve(weighted, 0.0, kernel="gauss-newton", num_examples=30, num_curved=5)


def test_kernel_resolution_and_tasks_without_curvature():
    train, targets = problem()
    params = fit(train, 200, ridge=1.0)
    plain = tasks.binary_classification(linear)._replace(ridge_terms=None, name="no curvature")
    _, details = trakjax.attribute(plain, [params], train, targets, projection="identity", return_details=True)
    assert details[0].kernel == "trak" and details[0].lambda_rule == "0.3·trace/N"
    with pytest.raises(InvalidArgumentError, match="needs the loss curvature.*no curvature"):
        trakjax.attribute(plain, [params], train, targets, projection="identity", kernel="gauss-newton")
    assert curvature.resolve_kernel("auto", has_curvature=True, reference_compat=True) == "trak"
    assert curvature.resolve_kernel("auto", has_curvature=True) == curvature.DEFAULT_KERNEL
    with pytest.raises(InvalidArgumentError, match="reference_compat"):
        trakjax.Config.create(kernel="gauss-newton", reference_compat=True)
    with pytest.raises(InvalidArgumentError, match="kernel must be one of"):
        trakjax.Config.create(kernel="newton")


def test_from_loss_gives_curvature_without_output_offset():
    """from_loss's curvature (autodiff) with f₀ unknown: the Gauss–Newton kernel runs and λ falls
    back to 0.3·tr(ΦᵀHΦ)/N; the scores equal the analytic task's at the same λ."""
    train, targets = problem()
    params = fit(train, 200, ridge=1.0)

    def signed_logit(p, example, state):
        x, y = example
        return (2.0 * y - 1.0) * linear(p, x)

    task = tasks.from_loss(signed_logit, lambda f, example, state: jax.nn.softplus(-f))
    scores, details = trakjax.attribute(task, [params], train, targets, projection="identity", return_details=True)
    assert details[0].kernel == "gauss-newton" and details[0].lambda_rule == "0.3·trace/N"
    analytic = trakjax.attribute(tasks.binary_classification(linear), [params], train, targets,
                                 projection="identity", kernel="gauss-newton", lambda_reg=details[0].lambda_reg)
    np.testing.assert_allclose(scores, analytic, rtol=1e-4, atol=1e-4 * np.abs(analytic).max())
    no_curvature = tasks.from_loss(signed_logit, lambda f, example, state: jax.nn.softplus(-f), curvature=False)
    assert no_curvature.ridge_terms is None


def test_store_records_and_checks_the_kernel(tmp_path):
    train, targets = problem()
    params = fit(train, 200, ridge=1.0)
    task = tasks.binary_classification(linear)
    common = dict(projection="identity", batch_size=16, backend="xla")
    first = trakjax.TRAKer(task, N, tmp_path / "gn", **common)
    assert first.config.result.kernel == curvature.DEFAULT_KERNEL
    scores = np.array(first.run([params], train, targets))
    expected = trakjax.attribute(task, [params], train, targets, kernel=curvature.DEFAULT_KERNEL, **common)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    other = "trak" if curvature.DEFAULT_KERNEL == "gauss-newton" else "gauss-newton"
    with pytest.raises(StoreError, match=f"kernel: store has '{curvature.DEFAULT_KERNEL}'"):
        trakjax.TRAKer(task, N, tmp_path / "gn", kernel=other, **common)
    # A store written before the kernel setting (no "kernel" key) ran TRAK's kernel.
    old = trakjax.TRAKer(task, N, tmp_path / "old", kernel="trak", **common)
    old.run([params], train, targets)
    metadata = tmp_path / "old" / "trakjax_store.json"
    record = json.loads(metadata.read_text())
    del record["config"]["kernel"]
    metadata.write_text(json.dumps(record))
    assert trakjax.TRAKer(task, N, tmp_path / "old", **common).config.result.kernel == "trak"
    with pytest.raises(StoreError, match="kernel: store has 'trak', this session has 'gauss-newton'"):
        trakjax.TRAKer(task, N, tmp_path / "old", kernel="gauss-newton", **common)


def test_scorer_inside_jit_uses_the_weighted_kernel():
    train, targets = problem()
    checkpoints = [fit(train, 50, ridge=0.0), fit(train, 400, ridge=0.0)]
    task = tasks.binary_classification(linear)
    kwargs = dict(projection="identity", kernel="gauss-newton", lambda_reg=0.05, backend="xla")
    expected = trakjax.attribute(task, checkpoints, train, targets, **kwargs)
    features = trakjax.train_features(task, checkpoints, train, **kwargs)
    score_fn = trakjax.scorer(task, features)
    got = jax.jit(lambda p, batch: score_fn(p, batch))(checkpoints, targets)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_checkpoint_kernel_counts_clipped_curvature():
    rng = np.random.default_rng(4)
    phi = rng.normal(size=(20, 3)).astype(np.float32)
    h = rng.uniform(0.1, 0.2, 20)
    h[[3, 7]] = -0.5
    ridge = pipeline.RidgeInputs(np.full(20, 0.3), rng.normal(size=20), h)
    settings = trakjax.Config.create(lambda_reg=0.1).result
    solved = pipeline.checkpoint_kernel(phi, settings, proj_dim=3, num_examples=20, num_params=3, ridge=ridge,
                                        kernel="gauss-newton")
    assert solved.clipped_curvature == 2 and solved.kernel == "gauss-newton"
    kept = np.maximum(h, 0.0)
    expected = np.linalg.inv(phi.astype(np.float64).T @ (phi * kept[:, None]) + 0.1 * np.eye(3))
    np.testing.assert_allclose(solved.inverse, expected, rtol=1e-5)
