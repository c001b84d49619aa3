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
