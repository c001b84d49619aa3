"""The randomness contract: an independent pure-Python implementation, golden values, statistics."""

import math

import numpy as np
import pytest
from contract_reference import M32, py_mix

from trakjax import randomness


def py_entry(kind, seed, model_id, row, column):
    """Contract v1, written from the randomness module's docstring with Python ints only."""
    golden = 0x9E3779B9
    tag = {"rademacher": 1, "normal": 2}[kind]
    key = py_mix((seed & M32) ^ golden)
    key = py_mix(key ^ (seed >> 32))
    key = py_mix(key ^ model_id)
    key = (key + tag) & M32
    block, bit, lane = row >> 11, (row >> 6) & 31, row & 63
    block_key = py_mix((py_mix(key ^ (block >> 32)) + (block & M32)) & M32)
    row_key = py_mix((block_key + lane) & M32)
    column_key = py_mix(((column * golden) & M32) ^ key)
    word = py_mix((py_mix(row_key ^ column_key) + row_key) & M32)
    if kind == "rademacher":
        return 1.0 - 2.0 * ((word >> bit) & 1)
    h1 = py_mix((word + (2 * bit + 1) * golden) & M32)
    h2 = py_mix((word + (2 * bit + 2) * golden) & M32)
    u1 = ((h1 >> 8) + 0.5) * 2.0**-24
    u2 = (h2 >> 8) * 2.0**-24
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


CASES = [
    (0, 0, 0, 17),
    (0, 0, 2047, 5),
    (12345, 3, 2048 + 64 * 7 + 3, 0),
    (2**40 + 7, 2**31 + 5, 10_000_019, 1023),
    (1, 0, 2**32 + 2048 * 3 + 100, 2),  # parameter index beyond 2**32
    (1, 0, 2**43 * 1024 + 9, 7),  # block index beyond 2**32: exercises the high word
]


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
@pytest.mark.parametrize("seed,model_id,row,column", CASES)
def test_entries_match_independent_python_implementation(kind, seed, model_id, row, column):
    matrix = randomness.projection_matrix(kind, seed, model_id, row, 1, column + 1)
    expected = py_entry(kind, seed, model_id, row, column)
    got = float(matrix[0, column])
    if kind == "rademacher":
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_golden_values_are_frozen():
    # Contract v1. If this fails, the contract changed: bump CONTRACT_VERSION instead.
    assert randomness.CONTRACT_VERSION == 1
    rows = np.asarray(randomness.projection_matrix("rademacher", 0, 0, 0, 4, 8))
    golden = np.array(
        [
            [-1, 1, -1, 1, -1, 1, -1, 1],
            [-1, -1, -1, -1, -1, 1, -1, 1],
            [-1, -1, 1, -1, -1, 1, -1, 1],
            [-1, 1, -1, -1, -1, 1, 1, -1],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(rows, golden)
    assert randomness.stream_key(0, 0, "rademacher") == py_mix(py_mix(py_mix(0x9E3779B9) ^ 0) ^ 0) + 1
    normal = np.asarray(randomness.projection_matrix("normal", 7, 1, 2**32 + 5, 1, 3))[0]
    expected = [py_entry("normal", 7, 1, 2**32 + 5, c) for c in range(3)]
    np.testing.assert_allclose(normal, expected, rtol=1e-5)


def test_row_ranges_are_consistent_slices():
    whole = np.asarray(randomness.projection_matrix("rademacher", 5, 2, 1000, 5000, 33))
    part = np.asarray(randomness.projection_matrix("rademacher", 5, 2, 3047, 1100, 33))
    np.testing.assert_array_equal(part, whole[2047:3147])


def test_model_ids_and_seeds_give_different_matrices():
    a = np.asarray(randomness.projection_matrix("rademacher", 0, 0, 0, 4096, 64))
    b = np.asarray(randomness.projection_matrix("rademacher", 0, 1, 0, 4096, 64))
    c = np.asarray(randomness.projection_matrix("rademacher", 1, 0, 0, 4096, 64))
    for other in (b, c):
        agreement = (a == other).mean()
        assert 0.47 < agreement < 0.53


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_sign_balance_column_correlations_and_moments(kind):
    p, k = 16384, 256
    r = np.asarray(randomness.projection_matrix(kind, 3, 4, 2**33, p, k), np.float64)
    # Sign balance per column: the mean of ±1 (or N(0,1)) entries has std 1/sqrt(p).
    assert np.abs(r.mean(axis=0)).max() < 5.0 / math.sqrt(p)
    assert abs(r.mean()) < 5.0 / math.sqrt(p * k)
    # Column correlations: off-diagonal entries of RᵀR/p have std 1/sqrt(p).
    corr = r.T @ r / p
    off = corr[~np.eye(k, dtype=bool)]
    assert np.abs(off).max() < 6.0 / math.sqrt(p)
    assert abs(off.std() * math.sqrt(p) - 1.0) < 0.05
    # Rows sharing one hash word (same block and lane, different bit) are uncorrelated too.
    shared = r[0::64][:32]  # rows 0, 64, 128, ...: bits 0..31 of lane 0 in block 0
    inner = shared @ shared.T / k
    assert np.abs(inner[~np.eye(32, dtype=bool)]).max() < 6.0 / math.sqrt(k)
    if kind == "normal":
        assert abs(r.var() - 1.0) < 0.01
        assert abs((r**4).mean() - 3.0) < 0.05
    else:
        assert set(np.unique(r)) == {-1.0, 1.0}


def test_johnson_lindenstrauss_norm_preservation():
    rng = np.random.default_rng(0)
    p, k = 4096, 512
    g = rng.normal(size=(50, p)).astype(np.float32)
    r = np.asarray(randomness.projection_matrix("rademacher", 11, 0, 0, p, k))
    ratio = np.linalg.norm(g @ r / math.sqrt(k), axis=1) / np.linalg.norm(g, axis=1)
    # ‖Rᵀg‖/√k concentrates around ‖g‖ with relative spread about 1/sqrt(2k) ≈ 0.03.
    assert abs(ratio.mean() - 1.0) < 0.02
    assert np.abs(ratio - 1.0).max() < 0.15


def test_bad_seed_and_model_id_are_rejected():
    with pytest.raises(ValueError, match="model_id"):
        randomness.stream_key(0, 2**32, "rademacher")
    with pytest.raises(ValueError, match="seed"):
        randomness.stream_key(-1, 0, "rademacher")
    with pytest.raises(ValueError, match="kind"):
        randomness.projection_matrix("gaussian", 0, 0, 0, 4, 4)
