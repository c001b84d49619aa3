"""Randomness contract v2 (factor matrices): an independent pure-Python implementation, golden
values, row-on-demand generation and statistics."""

import math

import numpy as np
import pytest
from contract_reference import GOLDEN, M32, py_mix

from trakjax import randomness


def py_fnv1a(text):
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & M32
    return h


def py_stream_key(seed, model_id, kind):
    key = py_mix((seed & M32) ^ GOLDEN)
    key = py_mix(key ^ (seed >> 32))
    key = py_mix(key ^ model_id)
    return (key + {"rademacher": 1, "normal": 2}[kind]) & M32


def py_factor_key(seed, model_id, kind, path, slice_index, side):
    """Contract v2, written from the randomness module's docstring with Python ints only."""
    key = py_mix(py_stream_key(seed, model_id, kind) ^ 0x85EBCA6B)
    key = py_mix(key + py_fnv1a(path))
    key = py_mix(key ^ (slice_index >> 32))
    key = py_mix(key + (slice_index & M32))
    return py_mix(key ^ (side + 1))


def py_entry(kind, key, row, column):
    """Contract v1's entry formula under a given key."""
    block, bit, lane = row >> 11, (row >> 6) & 31, row & 63
    block_key = py_mix((py_mix(key ^ (block >> 32)) + (block & M32)) & M32)
    row_key = py_mix((block_key + lane) & M32)
    column_key = py_mix(((column * GOLDEN) & M32) ^ key)
    word = py_mix((py_mix(row_key ^ column_key) + row_key) & M32)
    if kind == "rademacher":
        return 1.0 - 2.0 * ((word >> bit) & 1)
    h1 = py_mix((word + (2 * bit + 1) * GOLDEN) & M32)
    h2 = py_mix((word + (2 * bit + 2) * GOLDEN) & M32)
    u1 = ((h1 >> 8) + 0.5) * 2.0**-24
    u2 = (h2 >> 8) * 2.0**-24
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


CASES = [
    (0, 0, "params/Dense_0/kernel", 0, 0, 0, 5),
    (0, 0, "params/Dense_0/kernel", 0, 1, 7, 3),
    (12345, 3, "params/blocks/attn/query/kernel", 11, 0, 2047 + 64 * 3, 63),
    (2**40 + 7, 2**31 + 5, "layers/w", 2**33 + 5, 1, 4099, 17),  # slice index beyond 2**32
    (1, 2, "é/ü/kernel", 3, 0, 64, 1),  # non-ASCII path: UTF-8 bytes
]


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
@pytest.mark.parametrize("seed,model_id,path,slice_index,side,row,column", CASES)
def test_factor_entries_match_independent_python_implementation(
    kind, seed, model_id, path, slice_index, side, row, column
):
    key = randomness.factor_key(seed, model_id, kind, path, slice_index, side)
    assert key == py_factor_key(seed, model_id, kind, path, slice_index, side)
    got = float(randomness.factor_matrix(kind, key, row + 1, column + 1)[row, column])
    expected = py_entry(kind, key, row, column)
    if kind == "rademacher":
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_factor_golden_values_are_frozen():
    # Contract v2. If this fails, the contract changed: bump FACTOR_CONTRACT_VERSION instead.
    assert randomness.FACTOR_CONTRACT_VERSION == 2
    assert randomness.CONTRACT_VERSION == 1  # the dense R is unchanged by v2
    assert randomness.path_hash("") == 0x811C9DC5
    assert randomness.path_hash("params/Dense_0/kernel") == 1678849520
    assert randomness.factor_key(0, 0, "rademacher", "params/Dense_0/kernel", 0, 0) == 3358551120
    assert randomness.factor_key(12345, 7, "normal", "layers/w", 2**33 + 5, 1) == 143520852
    assert randomness.second_stage_key(0, 0, "rademacher") == 2409277192
    key = randomness.factor_key(0, 0, "rademacher", "params/Dense_0/kernel", 0, 0)
    rows = np.asarray(randomness.factor_matrix("rademacher", key, 3, 6))
    golden = [[1, 1, -1, 1, -1, 1], [1, -1, 1, 1, -1, 1], [1, 1, 1, -1, 1, -1]]
    np.testing.assert_array_equal(rows, np.array(golden, np.float32))
    key = randomness.factor_key(7, 1, "normal", "params/embed/embedding", 0, 1)
    normal = np.asarray(randomness.factor_matrix("normal", key, 2, 3))
    np.testing.assert_allclose(normal, [[py_entry("normal", key, r, c) for c in range(3)] for r in range(2)],
                               rtol=1e-5)


def test_keys_differ_by_path_slice_side_and_from_the_dense_stream():
    base = dict(seed=5, model_id=2, kind="rademacher")
    keys = {
        randomness.factor_key(**base, path="a/kernel", slice_index=0, side=0),
        randomness.factor_key(**base, path="a/kernel", slice_index=0, side=1),
        randomness.factor_key(**base, path="a/kernel", slice_index=1, side=0),
        randomness.factor_key(**base, path="b/kernel", slice_index=0, side=0),
        randomness.second_stage_key(5, 2, "rademacher"),
        randomness.stream_key(5, 2, "rademacher"),
    }
    assert len(keys) == 6
    with pytest.raises(ValueError, match="side"):
        randomness.factor_key(**base, path="a", slice_index=0, side=2)


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_factor_rows_on_demand_equal_the_materialized_matrix(kind):
    key = randomness.factor_key(3, 4, kind, "params/embed/embedding", 0, 0)
    whole = np.asarray(randomness.factor_matrix(kind, key, 5000, 9))
    rows = np.array([[0, 4999, 2048], [63, 64, 4097]])
    np.testing.assert_array_equal(np.asarray(randomness.factor_rows(kind, key, rows, 9)), whole[rows])


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_factor_matrix_statistics(kind):
    d, k = 4096, 64
    key = randomness.factor_key(1, 0, kind, "params/Dense_0/kernel", 0, 0)
    p = np.asarray(randomness.factor_matrix(kind, key, d, k), np.float64)
    assert np.abs(p.mean(axis=0)).max() < 5.0 / math.sqrt(d)
    gram = p.T @ p / d  # E[PᵀP] = d·I: off-diagonal entries have std 1/sqrt(d)
    assert np.abs(gram[~np.eye(k, dtype=bool)]).max() < 6.0 / math.sqrt(d)
    assert np.abs(np.diag(gram) - 1.0).max() < (1e-12 if kind == "rademacher" else 0.15)
    other = np.asarray(randomness.factor_matrix(
        kind, randomness.factor_key(1, 0, kind, "params/Dense_0/kernel", 0, 1), d, k), np.float64)
    cross = p.T @ other / d  # different sides are independent
    assert np.abs(cross).max() < 6.0 / math.sqrt(d)
