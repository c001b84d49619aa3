"""The kernel solve's rank detection, and the clear errors trakjax.attribute gives on bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import trakjax
from trakjax import solve, tasks

D, C = 6, 4


def apply_fn(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def make_params(seed=0, hidden=8):
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(size=(D, hidden)).astype(np.float32), "w2": rng.normal(size=(hidden, C)).astype(np.float32)}


def make_data(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, C, n).astype(np.int32)


TASK = tasks.image_classification(apply_fn)


def test_solve_matches_inverse_and_reports_rank_and_condition():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(50, 6))
    kernel = solve.solve(phi.T @ phi, 0.5, method="eigh")
    np.testing.assert_allclose(kernel.inverse, np.linalg.inv(phi.T @ phi + 0.5 * np.eye(6)), rtol=1e-10)
    assert kernel.rank == 6
    eig = np.linalg.eigvalsh(phi.T @ phi)
    assert kernel.condition == pytest.approx((eig[-1] + 0.5) / (eig[0] + 0.5))
    compat = solve.solve(phi.T @ phi, 0.5, reference_compat=True)  # the Cholesky path
    assert compat.method == "cholesky"
    np.testing.assert_allclose(compat.inverse * compat.scale, kernel.inverse, rtol=1e-12)
    assert np.abs(compat.inverse).mean() == pytest.approx(1.0)


def test_gram_accumulates_blocks_in_float64():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(1000, 9)).astype(np.float32)
    exact = phi.astype(np.float64).T @ phi.astype(np.float64)
    np.testing.assert_allclose(solve.gram(phi, block_rows=256), exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_default_lambda_is_finite_and_positive_on_a_rank_deficient_gram():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(5, 20))  # N = 5 < k = 20
    kernel = solve.solve(phi.T @ phi, None, num_examples=5, method="eigh")
    assert kernel.rank == 5
    assert np.isfinite(kernel.inverse).all() and kernel.lambda_reg > 0
    with pytest.raises(ValueError, match=r"numerical rank 5 < k .*min\(k=20, N=5\).*lambda_reg=None"):
        solve.solve(phi.T @ phi, 0.0, num_examples=5)


def test_k_at_least_n_with_lambda_zero_raises_instead_of_returning_noise():
    x, y = make_data(20)
    with pytest.raises(ValueError, match=r"rank .* < k .*N=20"):
        trakjax.attribute(TASK, [make_params()], (x, y), (x[:3], y[:3]), proj_dim=32, lambda_reg=0.0, backend="xla")
    # The default λ keeps it well posed.
    scores = trakjax.attribute(TASK, [make_params()], (x, y), (x[:3], y[:3]), proj_dim=32, backend="xla")
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_grad_wrt_with_fewer_parameters_than_k_raises_at_any_n():
    x, y = make_data(200)
    with pytest.raises(ValueError, match=r"P=32"):
        trakjax.attribute(
            TASK, [make_params()], (x, y), (x[:3], y[:3]), proj_dim=48, lambda_reg=0.0,
            grad_wrt=["w2"], backend="xla",
        )


def test_too_few_distinct_examples_is_detected_numerically():
    x, y = make_data(4)
    x, y = np.tile(x, (30, 1)), np.tile(y, 30)  # 120 rows, 4 distinct examples
    with pytest.raises(ValueError, match=r"numerical rank 4 < k"):
        trakjax.attribute(TASK, [make_params()], (x, y), (x[:3], y[:3]), proj_dim=16, lambda_reg=0.0, backend="xla")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(proj_dim=0), "proj_dim must be >= 1"),
        (dict(projection="gaussian"), "projection must be one of"),
        (dict(lambda_reg=-1.0), "lambda_reg must be None or a finite float >= 0"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(precision="fast"), "precision must be one of"),
        (dict(model_ids=[0, 0]), "model_ids must hold 2 distinct ints"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, message):
    x, y = make_data(30)
    with pytest.raises(ValueError, match=message):
        trakjax.attribute(TASK, [make_params(0), make_params(1)], (x, y), (x[:2], y[:2]), **{"proj_dim": 8, **kwargs})


def test_bad_data_and_checkpoints_raise_value_errors():
    x, y = make_data(30)
    params = make_params()
    with pytest.raises(ValueError, match="mismatched leading axes"):
        trakjax.attribute(TASK, [params], (x, y[:29]), (x[:2], y[:2]), proj_dim=8)
    with pytest.raises(ValueError, match="empty"):
        trakjax.attribute(TASK, [params], (x[:0], y[:0]), (x[:2], y[:2]), proj_dim=8)
    with pytest.raises(ValueError, match="checkpoints is empty"):
        trakjax.attribute(TASK, [], (x, y), (x[:2], y[:2]), proj_dim=8)
    with pytest.raises(ValueError, match=r"checkpoints\[1\] has pytree structure"):
        trakjax.attribute(TASK, [params, {"w1": params["w1"]}], (x, y), (x[:2], y[:2]), proj_dim=8)
    with pytest.raises(ValueError, match=r"checkpoints\[1\] has leaf shapes"):
        trakjax.attribute(TASK, [params, make_params(hidden=9)], (x, y), (x[:2], y[:2]), proj_dim=8)
    bad = y.copy()
    bad[3] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        trakjax.attribute(TASK, [params], (x, bad), (x[:2], y[:2]), proj_dim=8)
    x_nan = x.copy()
    x_nan[[2, 5]] = np.inf
    with pytest.raises(ValueError, match=r"model_id=0, example indices \[2, 5\]"):
        trakjax.attribute(TASK, [params], (x_nan, y), (x[:2], y[:2]), proj_dim=8, backend="xla")


def test_callable_data_is_reread_for_every_checkpoint():
    x, y = make_data(30)
    calls = []

    def train():
        calls.append(1)
        return iter([(x[:16], y[:16]), (x[16:], y[16:])])

    checkpoints = [make_params(0), make_params(1)]
    dense = dict(proj_dim=8, backend="xla", projection="rademacher")  # "auto" reads a first batch once more
    from_iterator = trakjax.attribute(TASK, checkpoints, train, (x[:3], y[:3]), **dense)
    from_arrays = trakjax.attribute(TASK, checkpoints, (x, y), (x[:3], y[:3]), batch_size=7, **dense)
    assert len(calls) == 2
    np.testing.assert_allclose(from_iterator, from_arrays, rtol=1e-4, atol=1e-6)


def test_the_cholesky_path_runs_well_above_the_noise_and_matches_the_eigendecomposition():
    rng = np.random.default_rng(5)
    phi = rng.normal(size=(300, 40)).astype(np.float32)
    gram = solve.gram(phi)
    top = np.linalg.eigvalsh(gram)[-1]
    estimate = solve.largest_eigenvalue(gram)  # a lower bound, close even with a small gap
    assert top * (1 - 1e-2) <= estimate <= top * (1 + 1e-12)
    for lam in (1e-3 * top, 1.0, "auto"):
        fast = solve.solve(gram, lam, num_examples=300)
        exact = solve.solve(gram, lam, num_examples=300, method="eigh")
        assert fast.method == "cholesky" and exact.method == "eigh"
        assert fast.lambda_reg == pytest.approx(exact.lambda_reg, rel=1e-12)
        np.testing.assert_allclose(fast.inverse, exact.inverse, rtol=1e-8, atol=1e-12 * np.abs(exact.inverse).max())
        assert fast.rank is None and exact.rank == 40
        # The condition estimate (λ̂_max + λ)/λ bounds the exact one (λ_min ≥ 0).
        assert fast.condition >= exact.condition * (1 - 1e-6)
    # Below the margin (λ near the noise), and at λ = 0, the eigendecomposition runs.
    assert solve.solve(gram, 1e-9 * top).method == "eigh"
    assert solve.solve(gram, 0.0).method == "eigh"


def test_a_failed_cholesky_falls_back_to_the_eigendecomposition_and_its_rank_check(monkeypatch):
    # Eigenvalues 1 … 1e-2 and one of −1e-4: a PSD Gram spoiled by noise larger than the margin.
    rng = np.random.default_rng(6)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    eigenvalues = np.concatenate([np.geomspace(1.0, 1e-2, 11), [-1e-4]])
    gram = (basis * eigenvalues) @ basis.T
    calls = []
    monkeypatch.setattr(solve, "spectrum", lambda *a, **k: calls.append(1) or real_spectrum(*a, **k))
    # λ above 10·eps32·λ_max, below the negative eigenvalue's magnitude: the Cholesky fails and
    # the eigendecomposition finds rank 11 < k with λ under its tolerance 4·1e-4.
    with pytest.raises(trakjax.errors.NumericalError, match=r"numerical rank 11 < k.*well above 0.0004"):
        solve.solve(gram, 5e-5)
    assert calls == [1]
    kernel = solve.solve(gram, 1e-2)  # well above: the Cholesky succeeds, no eigendecomposition
    assert kernel.method == "cholesky" and calls == [1]
    np.testing.assert_allclose(kernel.inverse, np.linalg.inv(gram + 1e-2 * np.eye(12)), rtol=1e-9)


real_spectrum = solve.spectrum
