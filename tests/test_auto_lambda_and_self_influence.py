"""lambda_reg="auto" on rank-deficient Grams, self-influence against a float64 closed form, and
soft-thresholding."""

import numpy as np
import pytest
from test_attribute_closed_form import (
    C,
    D,
    N,
    apply_fn,
    closed_form_grads,
    closed_form_q,
    make_data,
    make_params,
)

import trakjax
from trakjax import scores, solve, tasks

TASK = tasks.image_classification(apply_fn)


def test_auto_lambda_is_finite_and_positive_on_rank_deficient_grams():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(5, 20))  # N = 5 < k = 20: rank 5
    gram = phi.T @ phi
    kernel = solve.solve(gram, "auto", num_examples=5, method="eigh")
    assert kernel.rank == 5 and kernel.lambda_reg > kernel.spectrum.tolerance
    assert kernel.lambda_reg == pytest.approx(0.3 * np.trace(gram) / 5, rel=1e-12)
    np.testing.assert_allclose(kernel.inverse, np.linalg.inv(gram + kernel.lambda_reg * np.eye(20)), rtol=1e-9)
    assert np.isfinite(kernel.condition)
    # The default path (a Cholesky: λ is far above the noise) gives the same λ and inverse.
    default = solve.solve(gram, "auto", num_examples=5)
    assert default.method == "cholesky" and default.rank is None and default.spectrum is None
    assert default.lambda_reg == pytest.approx(kernel.lambda_reg, rel=1e-12)
    np.testing.assert_allclose(default.inverse, kernel.inverse, rtol=1e-9, atol=1e-12 * np.abs(kernel.inverse).max())
    # None means auto.
    assert solve.solve(gram, None, num_examples=5).lambda_reg == default.lambda_reg
    # A rank-1 Gram with a huge N: 0.3·trace/N would fall below the noise; the floor (ten times
    # the noise level) keeps ΦᵀΦ + λI invertible, on either path.
    v = rng.normal(size=(8, 1))
    tiny = solve.solve(v @ v.T, "auto", num_examples=10**12, method="eigh")
    assert tiny.rank == 1 and np.isfinite(tiny.inverse).all()
    assert tiny.lambda_reg == pytest.approx(10 * tiny.spectrum.tolerance) and tiny.lambda_reg > 0
    floored = solve.solve(v @ v.T, "auto", num_examples=10**12)
    assert floored.lambda_reg == pytest.approx(tiny.lambda_reg, rel=1e-6) and np.isfinite(floored.inverse).all()


def test_auto_lambda_needs_num_examples_and_rejects_other_strings():
    gram = np.eye(3)
    with pytest.raises(ValueError, match="lambda_reg='auto' needs num_examples"):
        solve.solve(gram, "auto")
    with pytest.raises(ValueError, match="lambda_reg must be 'auto', None or a float"):
        solve.solve(gram, "automatic", num_examples=3)


def test_attribute_with_auto_lambda_when_k_exceeds_parameters_and_examples():
    train, targets = make_data(0)
    small = (train[0][:8], train[1][:8])  # N = 8, P = 28, k = 64: rank ≤ 8
    got, details = trakjax.attribute(
        TASK, [make_params(0)], small, targets, proj_dim=64, lambda_reg="auto", backend="xla", kernel="trak", projection="rademacher",
        return_details=True,
    )
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    assert details[0].rank is None and details[0].lambda_reg > 0  # the Cholesky path: no spectrum


def closed_form_self_influence(checkpoints, train, lam=None):
    p = D * C + C
    leverage = np.zeros(len(train[1]))
    q = np.zeros(len(train[1]))
    for params in checkpoints:
        phi = closed_form_grads(params, *train) / np.sqrt(p)
        gram = phi.T @ phi
        lam_m = 0.3 * np.trace(gram) / phi.shape[0] if lam is None else lam
        inverse = np.linalg.inv(gram + lam_m * np.eye(p))
        leverage += np.einsum("ik,kl,il->i", phi, inverse, phi)
        q += closed_form_q(params, *train)
    m = len(checkpoints)
    return leverage / m * q / m


@pytest.mark.parametrize("lam", [0.05, None])
def test_self_influence_matches_float64_closed_form(lam):
    train, _ = make_data(1)
    checkpoints = [make_params(0), make_params(1)]
    got = trakjax.self_influence(
        TASK, checkpoints, train, projection="identity", lambda_reg=lam, backend="xla", kernel="trak", batch_size=16
    )
    expected = closed_form_self_influence(checkpoints, train, lam)
    assert got.shape == (N,)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    # It is the diagonal of attribute(train, train).
    full = trakjax.attribute(
        TASK, checkpoints, train, train, projection="identity", lambda_reg=lam, backend="xla", kernel="trak", batch_size=16
    )
    np.testing.assert_allclose(got, np.diag(full), rtol=1e-5, atol=1e-7)


def test_soft_threshold_shrinks_towards_zero():
    s = np.array([[3.0, -0.5], [-2.0, 2.0], [0.5, -4.0]])
    np.testing.assert_allclose(
        scores.soft_threshold(s, np.array([1.0, 1.0])), [[2.0, 0.0], [-1.0, 1.0], [0.0, -3.0]]
    )
    np.testing.assert_allclose(scores.soft_threshold(s, 0.0), s)
    tau = scores.sparsity_threshold(s, 1 / 3)
    assert (np.count_nonzero(scores.soft_threshold(s, tau), axis=0) <= 1).all()
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        scores.soft_threshold(s, -1.0)
