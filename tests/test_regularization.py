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
    np.testing.assert_allclose(stats.displacement, q @ (f + np.log(9)), rtol=1e-12)


def test_auto_lambda_closed_form_and_custom_curvature():
    phi, q, f = synthetic(seed=1)
    stats = regularization.ridge_statistics(phi, q, f, output_offset=-1.0)
    g = phi.T @ q
    rho = g @ g / (q @ (f + 1.0))
    h_bar = ((phi**2).sum(1) * q * (1 - q)).sum() / (phi**2).sum()
    np.testing.assert_allclose(regularization.implied_ridge(stats), rho, rtol=1e-12)
    np.testing.assert_allclose(regularization.auto_lambda(stats), rho / (0.5 * h_bar), rtol=1e-12)
    np.testing.assert_allclose(regularization.auto_lambda(stats, subset_fraction=1.0), rho / h_bar, rtol=1e-12)
    # Squared error: h = 1, so h̄ = 1 and λ = ρ̂/α.
    ones = regularization.ridge_statistics(phi, q, f, output_offset=-1.0, curvature=np.ones(len(q)))
    np.testing.assert_allclose(regularization.auto_lambda(ones), rho / 0.5, rtol=1e-12)


def test_lambda_scales_like_the_gram_eigenvalues():
    """Φ → sΦ scales ΦᵀΦ's eigenvalues by s², and λ must follow (the same rule at every k and P)."""
    phi, q, f = synthetic(seed=2)
    base = regularization.auto_lambda(regularization.ridge_statistics(phi, q, f))
    scaled = regularization.auto_lambda(regularization.ridge_statistics(3.0 * phi, q, f))
    np.testing.assert_allclose(scaled, 9.0 * base, rtol=1e-12)


def test_implied_ridge_recovers_the_ridge_of_a_trained_logistic_regression():
    """Binary logistic regression with penalty (ρ/2)‖w‖², solved to convergence by Newton's method
    from w₀ = 0: the identity-projection statistics give ρ̂ = ρ exactly (the derivation's premise)."""
    rng = np.random.default_rng(3)
    n, d, rho = 200, 4, 3.0
    x = rng.normal(size=(n, d))
    y = (x @ np.array([1.5, -2.0, 0.5, 1.0]) + 0.8 * rng.normal(size=n) > 0).astype(float)
    sign = 2 * y - 1
    w = np.zeros(d)
    for _ in range(50):
        z = sign * (x @ w)
        q = 1 / (1 + np.exp(z))                     # −∂ℓ/∂f for ℓ = log(1 + e^{−f}), f = sign·xᵀw
        grad = -(x * (sign * q)[:, None]).sum(0) + rho * w
        hess = (x * (q * (1 - q))[:, None]).T @ x + rho * np.eye(d)
        w -= np.linalg.solve(hess, grad)
    assert np.abs(grad).max() < 1e-10
    phi = x * sign[:, None]                         # ∇_w f_i for the signed logit f_i = sign_i·x_iᵀw
    f = phi @ w
    q = 1 / (1 + np.exp(f))
    stats = regularization.ridge_statistics(phi, q, f, output_offset=0.0)
    np.testing.assert_allclose(regularization.implied_ridge(stats), rho, rtol=1e-8)
    # Off by a wrong f₀ (the displacement then counts outputs the model started with).
    wrong = regularization.ridge_statistics(phi, q, f, output_offset=-1.0)
    assert abs(regularization.implied_ridge(wrong) - rho) > 0.05 * rho


def test_fallback_and_floor():
    phi, q, f = synthetic(seed=4)
    trace = (phi**2).sum()
    # Outputs that never moved past f₀: Σ q (f − f₀) ≤ 0, so the former rule 0.3·trace/N.
    stale = regularization.ridge_statistics(phi, q, f, output_offset=100.0)
    assert np.isnan(regularization.implied_ridge(stale))
    np.testing.assert_allclose(regularization.auto_lambda(stale), 0.3 * trace / len(q), rtol=1e-12)
    # No gradient left and no curvature: likewise.
    flat = regularization.ridge_statistics(phi, np.zeros_like(q), f)
    np.testing.assert_allclose(regularization.auto_lambda(flat), 0.3 * trace / len(q), rtol=1e-12)
    # Never below ten times the rank tolerance.
    stats = regularization.ridge_statistics(phi, q, f)
    lam = regularization.auto_lambda(stats)
    assert regularization.auto_lambda(stats, tolerance=lam) == pytest.approx(10 * lam)
    assert regularization.auto_lambda(stats, tolerance=lam / 100) == pytest.approx(lam)


def test_margin_offset_and_errors():
    assert regularization.margin_offset(2) == 0.0
    np.testing.assert_allclose(regularization.margin_offset(10), -np.log(9))
    with pytest.raises(ValueError, match="num_classes"):
        regularization.margin_offset(1)
    phi, q, f = synthetic()
    with pytest.raises(ValueError, match="37 entries"):
        regularization.ridge_statistics(phi, q[:-1], f)
    with pytest.raises(ValueError, match="curvature"):
        regularization.ridge_statistics(phi, q, f, curvature=np.ones(3))
    stats = regularization.ridge_statistics(phi, q, f)
    with pytest.raises(ValueError, match="subset_fraction"):
        regularization.auto_lambda(stats, subset_fraction=0.0)
    with pytest.raises(ValueError, match="trace"):
        regularization.auto_lambda(stats._replace(trace=0.0))
