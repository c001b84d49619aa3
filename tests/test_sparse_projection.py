"""The sparse (count-sketch) second stage, randomness contract v3: an independent pure-Python
implementation, golden values, the deterministic gather-and-fold against an explicit matrix,
inner-product statistics against closed forms for s ∈ {1, 2, 4}, the Gram's spectral error
against the dense map, and the factorized family and settings with it."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from contract_reference import GOLDEN, M32, py_mix

from trakjax import Config, factorized, featurize, randomness, sparse_projection, tasks
from trakjax.errors import InvalidArgumentError


def py_stream_key(seed, model_id, kind):
    key = py_mix((seed & M32) ^ GOLDEN)
    key = py_mix(key ^ (seed >> 32))
    key = py_mix(key ^ model_id)
    return (key + {"rademacher": 1, "normal": 2}[kind]) & M32


def py_sparse_map(seed, model_id, kind, rows, k, s):
    """Contract v3, written from the randomness module's docstring with Python ints only."""
    key = py_mix((py_mix(py_stream_key(seed, model_id, kind) ^ 0x27D4EB2F) + 0x165667B1) & M32)
    starts = [j * k // s for j in range(s + 1)]
    columns, signs = [], []
    for r in rows:
        row_word = py_mix((py_mix(key ^ r) + GOLDEN) & M32)
        cs, ss = [], []
        for j in range(s):
            word = py_mix((row_word + (j + 1) * 0x85EBCA77) & M32)
            cs.append(starts[j] + (word >> 1) % (starts[j + 1] - starts[j]))
            ss.append(1.0 - 2.0 * (word & 1))
        columns.append(cs)
        signs.append(ss)
    return np.array(columns), np.array(signs)


def explicit_matrix(columns, signs, k):
    """S as a dense (k, K) float64 matrix."""
    matrix = np.zeros((k, columns.shape[0]))
    for j in range(columns.shape[1]):
        matrix[columns[:, j], np.arange(columns.shape[0])] += signs[:, j]
    return matrix


@pytest.mark.parametrize("seed,model_id,kind,k,s", [
    (0, 0, "rademacher", 2048, 1), (2**40 + 7, 3, "normal", 100, 3), (5, 2**32 - 1, "rademacher", 64, 4),
])
def test_contract_v3_matches_an_independent_implementation(seed, model_id, kind, k, s):
    rows = [0, 1, 2, 63, 64, 2047, 2048, 123456, 2**31 + 5, 2**32 - 1]
    key = randomness.sparse_key(seed, model_id, kind)
    columns, signs = randomness.sparse_columns_and_signs(key, np.array(rows, np.uint64), k, s)
    expected_columns, expected_signs = py_sparse_map(seed, model_id, kind, rows, k, s)
    np.testing.assert_array_equal(columns, expected_columns)
    np.testing.assert_array_equal(signs, expected_signs)
    starts = randomness.block_starts(k, s)
    for j in range(s):  # one column in each block
        assert np.all((columns[:, j] >= starts[j]) & (columns[:, j] < starts[j + 1]))


def test_contract_v3_golden_values():
    key = randomness.sparse_key(0, 0, "rademacher")
    columns, signs = randomness.sparse_columns_and_signs(key, np.arange(4), 2048, 2)
    assert randomness.SPARSE_CONTRACT_VERSION == 4  # v4: the map of v3; the remainder enters it whole
    assert key == GOLDEN_KEY
    assert columns.tolist() == GOLDEN_COLUMNS
    assert signs.tolist() == GOLDEN_SIGNS


GOLDEN_KEY = 2815174032
GOLDEN_COLUMNS = [[24, 1991], [900, 1355], [869, 1894], [977, 1174]]
GOLDEN_SIGNS = [[1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("s", [1, 2, 4])
def test_gather_and_fold_equals_the_explicit_matrix(s):
    num_rows, k = 300, 24
    table = sparse_projection.sketch_table(7, 2, "rademacher", num_rows, k, s)
    columns, signs = py_sparse_map(7, 2, "rademacher", range(num_rows), k, s)
    u = np.random.default_rng(s).normal(size=(5, num_rows))
    expected = u @ explicit_matrix(columns, signs, k).T * math.sqrt(k / s)
    apply = jax.jit(sparse_projection.apply_sketch)
    got = np.asarray(apply(u.astype(np.float32), table))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # deterministic (no scatter-add): the same bits on every call
    np.testing.assert_array_equal(np.asarray(apply(u.astype(np.float32), table)), got)


def _heavy_vectors(rng, num_rows):
    u = rng.normal(size=num_rows)
    v = 0.6 * u + 0.8 * rng.normal(size=num_rows)
    u[0] *= 6.0  # a heavy coordinate, shared: the count sketch's weak spot
    v[0] *= 6.0
    return u, v


@pytest.mark.parametrize("s", [1, 2, 4])
def test_inner_products_unbiased_with_the_dense_maps_variance(s):
    """E[(Su)ᵀ(Sv)]/k = uᵀv and Var = (‖u‖²‖v‖² + (uᵀv)² − 2Σu_r²v_r²)/k: the dense Rademacher
    map's variance, for every s (blocks of k/s columns, weights √(k/s))."""
    rng = np.random.default_rng(0)
    num_rows, k, trials = 40, 16, 3000
    u, v = _heavy_vectors(rng, num_rows)
    values = np.empty(trials)
    for t in range(trials):
        key = randomness.sparse_key(1, t, "rademacher")
        columns, signs = randomness.sparse_columns_and_signs(key, np.arange(num_rows), k, s)
        matrix = explicit_matrix(columns, signs, k) * math.sqrt(k / s)
        values[t] = (matrix @ u) @ (matrix @ v) / k
    exact = u @ v
    variance = (u @ u * (v @ v) + exact**2 - 2 * np.sum(u**2 * v**2)) / k
    assert abs(values.mean() - exact) < 4 * math.sqrt(variance / trials)
    assert values.var() == pytest.approx(variance, rel=0.12)


def test_gram_spectral_error_against_the_dense_stage():
    """‖G̃ − G‖₂/‖G‖₂ of a Gram with heavy coordinates, sparse s ∈ {1, 2, 4} against dense,
    averaged over 4 maps: printed, and no sparse map more than 1.5× the dense error."""
    rng = np.random.default_rng(1)
    num, num_rows, k = 40, 1500, 128
    features = rng.normal(size=(num, num_rows)) * rng.gamma(0.5, size=num_rows)  # heavy-tailed columns
    gram = features @ features.T
    norm = np.linalg.norm(gram, 2)

    def error(compressed):
        return np.linalg.norm(compressed @ compressed.T / k - gram, 2) / norm

    dense = np.mean([error(features @ np.asarray(
        randomness.projection_matrix("rademacher", 0, m, 0, num_rows, k), np.float64)) for m in range(4)])
    errors = {}
    for s in (1, 2, 4):
        maps = [sparse_projection.sketch_table(0, m, "rademacher", num_rows, k, s) for m in range(4)]
        errors[s] = np.mean([error(np.asarray(sparse_projection.apply_sketch(
            features.astype(np.float32), table), np.float64)) for table in maps])
    print(f"Gram spectral error: dense {dense:.4f}, " + ", ".join(f"s={s} {e:.4f}" for s, e in errors.items()))
    assert all(e <= 1.5 * dense for e in errors.values()), (dense, errors)


class _GainMLP(nn.Module):
    """An MLP whose hidden layer has an element-wise gain: a dense-remainder leaf of 40 > k."""

    @nn.compact
    def __call__(self, x):
        gain = self.param("gain", nn.initializers.ones, (40,))
        return nn.Dense(3)(nn.tanh(nn.Dense(40)(x)) * gain)


@pytest.mark.parametrize("s", [1, 4])
def test_factorized_features_with_the_sparse_stage(s):
    """φ = √(k/s)·S₀ u/√P with u the factorized features and the dense remainder, both kept whole
    (proj_dim='all'), and the remainder (40 gains, more than k = 20) whole under the sparse stage
    (contract v4), not first projected to k by a dense R_rest."""
    model = _GainMLP()
    x = jax.random.normal(jax.random.key(0), (4, 9))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(lambda p, im: model.apply(p, im))
    mask = featurize.select_parameters(params, None)
    output_fn, diff = featurize.task_output_fn(task, params, mask)
    paths = [p for p, m in zip(factorized.canonical_paths(params), mask, strict=True) if m]
    batch = (x, np.array([0, 1, 2, 1]))
    example = jax.tree_util.tree_map(lambda a: a[0], batch)

    def features(proj_dim, stage):
        plan = factorized.plan_factorization(output_fn, diff, example, None, paths=paths, factor_dims=8,
                                             proj_dim=proj_dim, whole_remainder=stage == "sparse")
        factors = factorized.factor_matrices(plan, seed=3, model_id=1, kind="rademacher",
                                             second_stage=stage, sparsity=s)
        return plan, np.asarray(factorized.factorized_features(
            output_fn, diff, batch, None, plan, factors, kind="rademacher")[1], np.float64)

    plan_all, whole = features("all", "dense")
    plan, sparse = features(20, "sparse")
    assert plan.second_stage and plan.rest_identity and plan.k_rest == plan.dense_params == 40
    assert plan.k_fac == plan_all.k_fac and factors_have_no_remainder_matrix(plan, s)
    columns, signs = py_sparse_map(3, 1, "rademacher", range(plan.k_fac), 20, s)
    expected = whole @ explicit_matrix(columns, signs, 20).T * math.sqrt(20 / s) / math.sqrt(plan.k_fac)
    np.testing.assert_allclose(sparse, expected, rtol=1e-5, atol=1e-6)


def test_a_remainder_above_the_limit_is_projected_densely_even_with_the_sparse_stage(monkeypatch):
    """Whole, a remainder costs memory in proportion to P_rest (its table and gather): above
    WHOLE_REMAINDER_LIMIT it goes through a dense R_rest (generated in chunks) as before."""
    from trakjax.factorized import plan as plan_lib

    model = _GainMLP()
    x = jax.random.normal(jax.random.key(0), (2, 9))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(lambda p, im: model.apply(p, im))
    output_fn, diff = featurize.task_output_fn(task, params, featurize.select_parameters(params, None))
    paths = factorized.canonical_paths(params)
    example = (x[0], np.int32(0))
    kept = factorized.plan_factorization(output_fn, diff, example, None, paths=paths, factor_dims=8,
                                         proj_dim=20, whole_remainder=True)
    monkeypatch.setattr(plan_lib, "WHOLE_REMAINDER_LIMIT", 39)
    projected = factorized.plan_factorization(output_fn, diff, example, None, paths=paths, factor_dims=8,
                                              proj_dim=20, whole_remainder=True)
    assert (kept.rest_identity, kept.k_rest) == (True, 40)
    assert (projected.rest_identity, projected.k_rest) == (False, 20)
    assert factorized.factor_matrices(projected, seed=3, model_id=1, kind="rademacher", second_stage="sparse",
                                      sparsity=2).remainder is not None


def factors_have_no_remainder_matrix(plan, s) -> bool:
    return factorized.factor_matrices(plan, seed=3, model_id=1, kind="rademacher", second_stage="sparse",
                                      sparsity=s).remainder is None


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_the_family_keeps_the_remainder_whole_with_the_sparse_stage_only(stage):
    model = _GainMLP()
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9)))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(lambda p, im: model.apply(p, im))
    config = Config.create(projection="factorized", proj_dim=20, factor_dims=8, second_stage=stage)
    example = (jax.ShapeDtypeStruct((9,), np.float32), jax.ShapeDtypeStruct((), np.int32))
    spec = featurize.plan_features(task, params, config, example)
    plan = spec.detail.plan
    assert plan.second_stage and plan.dense_params == 40
    assert plan.rest_identity == (stage == "sparse")
    assert plan.k_rest == (40 if stage == "sparse" else 20)
    if stage == "sparse":  # micro-batches are sized with the sketch's (k, m) gather counted
        width = sparse_projection.table_width(plan.k_fac, 20, 2, 0)
        assert spec.example_bytes >= 4 * (plan.k_fac + 20 * width)
    table = str(featurize.describe_factorization(task, params, (x[0], 0), factor_dims=8, proj_dim=20,
                                                 second_stage=stage))
    assert ("kept whole" in table) == (stage == "sparse")


def test_settings_and_store_record():
    result = Config.create(projection="factorized", second_stage="sparse", sparsity=2).result
    record = result.record()
    assert (record["second_stage"], record["sparsity"]) == ("sparse", 2)
    assert record["contract_version"] == randomness.SPARSE_CONTRACT_VERSION
    dense = Config.create(projection="factorized", second_stage="dense").result.record()
    assert "second_stage" not in dense and dense["contract_version"] == randomness.FACTOR_CONTRACT_VERSION
    with pytest.raises(InvalidArgumentError, match="second_stage"):
        Config.create(projection="factorized", second_stage="count")
    with pytest.raises(InvalidArgumentError, match="sparsity"):
        Config.create(projection="factorized", second_stage="dense", sparsity=2)
    with pytest.raises(InvalidArgumentError, match="sparsity"):
        Config.create(projection="factorized", second_stage="sparse", proj_dim=4, sparsity=8)
    with pytest.raises(InvalidArgumentError, match="projection='factorized' only"):
        Config.create(projection="rademacher", second_stage="sparse")
