"""The implied-ridge λ rule (trakjax.regularization) against float64 closed forms."""

import numpy as np
import pytest

from trakjax import regularization


def synthetic(n=37, k=5, seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, k))
    q = rng.uniform(0.01, 0.6, size=n)
    f = rng.normal(2.0, 1.5, size=n)
    return phi, q, f


@pytest.mark.parametrize("block_rows", [4, 37, 4096])
def test_ridge_statistics_match_closed_form(block_rows):
    phi, q, f = synthetic()
    stats = regularization.ridge_statistics(phi.astype(np.float32), q, f, output_offset=-np.log(9),
                                            block_rows=block_rows)
    phi32 = phi.astype(np.float32).astype(np.float64)
    assert stats.num_examples == 37
    np.testing.assert_allclose(stats.trace, np.trace(phi32.T @ phi32), rtol=1e-12)
    np.testing.assert_allclose(stats.curvature_trace, ((phi32**2).sum(1) * q * (1 - q)).sum(), rtol=1e-12)
    np.testing.assert_allclose(stats.gradient, phi32.T @ q, rtol=1e-12)
    np.testing.assert_allclose(stats.output_gradient, phi32.T @ (f + np.log(9)), rtol=1e-12)


def closed_form(phi, q, f, f0=0.0, alpha=0.5, start_fraction=0.3):
    gram = phi.T @ phi
    lam0 = start_fraction * np.trace(gram) / len(q)
    d = np.linalg.solve(gram + lam0 * np.eye(len(gram)), phi.T @ (f - f0))
    rho = (phi.T @ q) @ d / (d @ d)
    h_bar = ((phi**2).sum(1) * q * (1 - q)).sum() / (phi**2).sum()
    return gram, lam0, rho, rho / (alpha * h_bar)


@pytest.mark.parametrize("shape", [(37, 5), (12, 30)])  # N > k, and k > N (a singular Gram)
def test_auto_lambda_matches_float64_closed_form(shape):
    phi, q, f = synthetic(*shape, seed=1)
    gram, lam0, rho, lam = closed_form(phi, q, f, f0=-1.0)
    assert rho > 0
    stats = regularization.ridge_statistics(phi, q, f, output_offset=-1.0)
    np.testing.assert_allclose(regularization.implied_ridge(gram, stats, lam0), rho, rtol=1e-7)
    np.testing.assert_allclose(regularization.auto_lambda(gram, stats), lam, rtol=1e-7)
    np.testing.assert_allclose(regularization.auto_lambda(gram, stats, subset_fraction=1.0), lam / 2, rtol=1e-7)
    # Any basis of the Gram gives the same λ: its eigenbasis, with the statistics rotated.
    s, v = np.linalg.eigh(gram)
    rotated = stats._replace(gradient=v.T @ stats.gradient, output_gradient=v.T @ stats.output_gradient)
    np.testing.assert_allclose(regularization.auto_lambda(np.diag(np.clip(s, 0, None)), rotated), lam, rtol=1e-6)


def test_custom_curvature_squared_error():
    phi, q, f = synthetic(seed=5)
    gram, lam0, rho, _ = closed_form(phi, q, f)
    ones = regularization.ridge_statistics(phi, q, f, curvature=np.ones(len(q)))
    np.testing.assert_allclose(regularization.auto_lambda(gram, ones), rho / 0.5, rtol=1e-7)


def test_lambda_scales_like_the_gram_eigenvalues():
    """Φ → sΦ scales ΦᵀΦ's eigenvalues by s², and λ must follow (the same rule at every k and P)."""
    phi, q, f = synthetic(seed=2)

    def lam(x):
        return regularization.auto_lambda(x.T @ x, regularization.ridge_statistics(x, q, f))

    np.testing.assert_allclose(lam(3.0 * phi), 9.0 * lam(phi), rtol=1e-7)


def newton_logistic_regression(n=200, d=4, rho=3.0, seed=3):
    """Binary logistic regression with penalty (ρ/2)‖w‖², from w₀ = 0, solved by Newton's method."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    beta = np.resize([1.5, -2.0, 0.5, 1.0], d)
    y = (x @ beta + 0.8 * rng.normal(size=n) > 0).astype(float)
    sign = 2 * y - 1
    w = np.zeros(d)
    for _ in range(50):
        q = 1 / (1 + np.exp(sign * (x @ w)))        # −∂ℓ/∂f for ℓ = log(1 + e^{−f}), f = sign·xᵀw
        grad = -(x * (sign * q)[:, None]).sum(0) + rho * w
        hess = (x * (q * (1 - q))[:, None]).T @ x + rho * np.eye(d)
        w -= np.linalg.solve(hess, grad)
    assert np.abs(grad).max() < 1e-10
    phi = x * sign[:, None]                         # ∇_w f_i for the signed logit f_i = sign_i·x_iᵀw
    f = phi @ w
    return phi, 1 / (1 + np.exp(f)), f


def test_implied_ridge_recovers_the_ridge_of_a_trained_logistic_regression():
    """With the identity projection, g = ρ w and f − f₀ = Φ w exactly, so ρ̂ → ρ as λ₀ → 0 (the
    derivation's premise), and a wrong f₀ or a λ₀ that shrinks d moves it."""
    rho = 3.0
    phi, q, f = newton_logistic_regression(rho=rho)
    stats = regularization.ridge_statistics(phi, q, f, output_offset=0.0)
    gram = phi.T @ phi
    np.testing.assert_allclose(regularization.implied_ridge(gram, stats, 1e-9), rho, rtol=1e-6)
    wrong = regularization.ridge_statistics(phi, q, f, output_offset=-1.0)
    assert abs(regularization.implied_ridge(gram, wrong, 1e-9) - rho) > 0.05 * rho


def test_implied_ridge_resists_gradient_noise():
    """Noise in g (minibatch training, resampled data) enters gᵀd linearly; the norm form
    ‖g‖²/qᵀ(f − f₀) squares it. With noise as large as the signal the norm form overshoots."""
    rho = 3.0
    phi, q, f = newton_logistic_regression(n=400, d=40, rho=rho, seed=6)
    gram = phi.T @ phi
    stats = regularization.ridge_statistics(phi, q, f)
    rng = np.random.default_rng(0)
    estimates, norm_forms = [], []
    for _ in range(20):
        noise = rng.normal(size=stats.gradient.shape) * np.linalg.norm(stats.gradient) / np.sqrt(40)
        noisy = stats._replace(gradient=stats.gradient + noise)
        estimates.append(regularization.implied_ridge(gram, noisy, 1e-9))
        norm_forms.append(noisy.gradient @ noisy.gradient / (q @ f))
    assert abs(np.mean(estimates) / rho - 1) < 0.1
    assert np.mean(norm_forms) / rho > 1.7


def test_fallback_and_floor():
    phi, q, f = synthetic(seed=4)
    gram = phi.T @ phi
    lam0 = 0.3 * np.trace(gram) / len(q)
    # No gradient left (q = 0): no ρ̂, no curvature, so λ₀ = 0.3·trace/N.
    flat = regularization.ridge_statistics(phi, np.zeros_like(q), f)
    assert np.isnan(regularization.implied_ridge(gram, flat, lam0))
    np.testing.assert_allclose(regularization.auto_lambda(gram, flat), lam0, rtol=1e-12)
    # A gradient pointing against the displacement (ρ̂ < 0): likewise.
    against = regularization.ridge_statistics(phi, q, f)
    against = against._replace(gradient=-np.sign(against.gradient @ np.linalg.solve(
        gram + lam0 * np.eye(len(gram)), against.output_gradient)) * against.gradient)
    np.testing.assert_allclose(regularization.auto_lambda(gram, against), lam0, rtol=1e-12)
    # Never below ten times the rank tolerance; a tolerance far below λ₀ changes nothing.
    stats = regularization.ridge_statistics(phi, q, f)
    lam = regularization.auto_lambda(gram, stats)
    assert regularization.auto_lambda(gram, stats, tolerance=1e-6 * lam0) == pytest.approx(lam)
    for tolerance in (lam, 1e3 * lam):
        assert regularization.auto_lambda(gram, stats, tolerance=tolerance) >= 10 * tolerance
    assert regularization.auto_lambda(gram, stats, tolerance=1e3 * lam) == pytest.approx(1e4 * lam)


def test_margin_offset_and_errors():
    assert regularization.margin_offset(2) == 0.0
    np.testing.assert_allclose(regularization.margin_offset(10), -np.log(9))
    with pytest.raises(ValueError, match="num_classes"):
        regularization.margin_offset(1)
    phi, q, f = synthetic()
    gram = phi.T @ phi
    with pytest.raises(ValueError, match="37 entries"):
        regularization.ridge_statistics(phi, q[:-1], f)
    with pytest.raises(ValueError, match="curvature"):
        regularization.ridge_statistics(phi, q, f, curvature=np.ones(3))
    stats = regularization.ridge_statistics(phi, q, f)
    with pytest.raises(ValueError, match="subset_fraction"):
        regularization.auto_lambda(gram, stats, subset_fraction=0.0)
    with pytest.raises(ValueError, match="trace"):
        regularization.auto_lambda(gram, stats._replace(trace=0.0))
    with pytest.raises(ValueError, match="gram must be"):
        regularization.auto_lambda(gram[:3, :3], stats)


def test_attribute_auto_is_the_implied_ridge_rule_on_its_features():
    """trakjax.attribute's λ under "auto" equals regularization.auto_lambda evaluated in float64
    on the same checkpoint's features, q, outputs, f₀ = −log(C − 1) and h = q(1 − q)."""
    import trakjax
    from trakjax import featurize, solve, tasks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5)).astype(np.float32)
    y = rng.integers(0, 3, 90).astype(np.int32)
    task = tasks.image_classification(lambda p, z: z @ p["w"] + p["b"])
    params = _trained(task, x[:80], y[:80])
    _, details = trakjax.attribute(task, [params], (x[:80], y[:80]), (x[80:], y[80:]), proj_dim=12,
                                   backend="xla", return_details=True, kernel="trak", projection="rademacher")
    assert details[0].lambda_rule == "implied ridge"
    checkpoint = featurize.prepare_checkpoint(task, params, trakjax.Config.create(
        proj_dim=12, backend="xla", projection="rademacher"))
    out = featurize.featurize(task, checkpoint, (x[:80], y[:80]))
    np.testing.assert_allclose(out.output_offset, -np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(out.curvature, out.out_to_loss * (1 - out.out_to_loss), rtol=1e-6)
    phi = out.features.astype(np.float64)
    stats = regularization.ridge_statistics(phi, out.out_to_loss, out.outputs, output_offset=-np.log(2.0))
    gram = phi.T @ phi
    top = np.linalg.eigvalsh(gram)[-1]
    expected = regularization.auto_lambda(gram, stats, tolerance=solve.rounding_noise() * top)
    assert details[0].lambda_reg == pytest.approx(expected, rel=1e-3)
    assert details[0].lambda_reg != pytest.approx(0.3 * np.trace(gram) / 80, rel=1e-2)
    # The Gauss–Newton kernel: λ = ρ̂/α from the h-weighted Gram and fit.
    _, gn_details = trakjax.attribute(task, [params], (x[:80], y[:80]), (x[80:], y[80:]), proj_dim=12,
                                      backend="xla", return_details=True, kernel="gauss-newton",
                                      projection="rademacher")
    h = out.curvature.astype(np.float64)
    weighted = phi.T @ (phi * h[:, None])
    gn_stats = regularization.ridge_statistics(phi, out.out_to_loss, out.outputs, output_offset=-np.log(2.0),
                                               curvature=h, kernel="gauss-newton")
    gn_expected = regularization.auto_lambda(weighted, gn_stats, kernel="gauss-newton",
                                             tolerance=solve.rounding_noise() * np.linalg.eigvalsh(weighted)[-1])
    assert gn_details[0].kernel == "gauss-newton"
    assert gn_details[0].lambda_reg == pytest.approx(gn_expected, rel=1e-3)
    # A task without ridge_terms falls back to the former rule.
    bare = task._replace(ridge_terms=None)
    _, bare_details = trakjax.attribute(bare, [params], (x[:80], y[:80]), (x[80:], y[80:]), proj_dim=12,
                                        backend="xla", return_details=True, projection="rademacher")
    assert bare_details[0].lambda_rule == "0.3·trace/N"
    assert bare_details[0].lambda_reg == pytest.approx(0.3 * np.trace(gram) / 80, rel=1e-4)


def _trained(task, x, y, steps=300, decay=0.05):
    """A softmax regression trained by gradient descent with weight decay (a genuine ridge)."""
    import jax
    import jax.numpy as jnp

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.size), y]) + decay / 2 * jnp.sum(p["w"] ** 2)

    params = {"w": jnp.zeros((x.shape[1], 3)), "b": jnp.zeros(3)}
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, jax.grad(loss)(p)))
    for _ in range(steps):
        params = step(params)
    return jax.tree_util.tree_map(np.asarray, params)


def test_each_ready_made_task_gives_its_untrained_output_and_curvature():
    import jax.numpy as jnp

    from trakjax import tasks
    from trakjax.tasks import TaskState

    q = jnp.array([0.1, 0.5, 0.9], jnp.float32)
    logistic = np.asarray(q * (1 - q))
    x = jnp.ones((3, 4))
    binary = tasks.binary_classification(lambda p, z: z @ p)
    offset, h = binary.ridge_terms(jnp.ones(4), (x, jnp.array([0, 1, 1])), TaskState(), q)
    np.testing.assert_allclose(offset, 0.0)
    np.testing.assert_allclose(h, logistic, rtol=1e-6)
    regression = tasks.regression(lambda p, z: z @ p)
    offset, h = regression.ridge_terms(jnp.ones(4), (x, jnp.zeros(3)), TaskState(), q)
    np.testing.assert_allclose(offset, 0.0)
    np.testing.assert_allclose(h, 1.0)
    # Language modeling: T counted next-token predictions, each margin −log(V − 1) untrained.
    lm = tasks.language_modeling(lambda p, inputs: jnp.zeros(inputs["input_ids"].shape + (7,)) + p)
    batch = {"input_ids": jnp.ones((3, 5), jnp.int32),
             "attention_mask": jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])}
    offset, h = lm.ridge_terms(jnp.float32(0), batch, TaskState(), q)
    counted = np.array([4, 2, 0])
    np.testing.assert_allclose(offset, -counted * np.log(6.0), rtol=1e-6)
    np.testing.assert_allclose(h, logistic / np.maximum(counted, 1), rtol=1e-6)
    clip = tasks.clip(lambda p, z: z, lambda p, z: z, temperature=0.1, n_negatives=20)
    offset, h = clip.ridge_terms(None, (x, x), TaskState(), q)
    np.testing.assert_allclose(offset, -2 * np.log(20.0), rtol=1e-6)
    np.testing.assert_allclose(h, logistic / 2, rtol=1e-6)
    # from_loss: the curvature by autodiff equals the logistic loss's q(1 − q) at its q.
    def margin(p, example, state):
        return example[0] @ p

    derived = tasks.from_loss(margin, lambda f, ex, st: jnp.log1p(jnp.exp(-f)), output_offset=-1.5)
    params = jnp.array([0.3, -0.2, 0.5, 0.1])
    examples = (jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32), jnp.zeros(3))
    q_derived = derived.out_to_loss(params, examples, TaskState())
    offset, h = derived.ridge_terms(params, examples, TaskState(), q_derived)
    np.testing.assert_allclose(offset, -1.5)
    np.testing.assert_allclose(h, q_derived * (1 - q_derived), rtol=1e-5)
    assert tasks.from_loss(margin, lambda f, ex, st: f**2, curvature=False).ridge_terms is None
