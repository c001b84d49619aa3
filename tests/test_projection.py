"""The jnp/XLA projection: exact ±1 entries, reach, chunk- and batch-size invariance, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trakjax import projection, randomness

# Leaves of a small "model": a big leaf spanning several chunks, small leaves straddling chunks,
# and sizes that are not multiples of anything.
SHAPES = [(7,), (61, 67), (3, 5), (2053,), (11,)]
P = sum(int(np.prod(s)) for s in SHAPES)
KEY = randomness.stream_key(9, 2, "rademacher")


def _grads(batch, seed=0, fill=None):
    rng = np.random.default_rng(seed)
    leaves = []
    for shape in SHAPES:
        if fill is None:
            leaves.append(rng.normal(size=(batch, *shape)).astype(np.float32))
        else:
            leaves.append(np.full((batch, *shape), fill, np.float32))
    return {"a": leaves[0], "b": leaves[1], "c": leaves[2], "d": leaves[3], "e": leaves[4]}


def _flat(grads):
    leaves = jax.tree_util.tree_leaves(grads)
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _project(grads, k, **kw):
    kw.setdefault("key", KEY)
    return np.asarray(projection.project(grads, kind="rademacher", proj_dim=k, **kw))


def test_matches_dense_reference():
    g = _grads(3)
    r = np.asarray(randomness.projection_matrix("rademacher", 9, 2, 0, P, 37), np.float64)
    expected = _flat(g).astype(np.float64) @ r / math.sqrt(P)
    np.testing.assert_allclose(_project(g, 37, chunk_rows=2048), expected, rtol=1e-5, atol=1e-5)


def test_all_ones_input_gives_exact_integers_with_the_parity_of_p():
    out = _project(_grads(1, fill=1.0), 64, chunk_rows=2048)[0] * math.sqrt(P)
    ints = np.round(out)
    np.testing.assert_allclose(out, ints, atol=1e-2)
    assert np.all(np.abs(ints) <= P)
    assert np.all((ints.astype(np.int64) - P) % 2 == 0)


@pytest.mark.parametrize("position", [0, P - 1])
def test_single_nonzero_entry_reaches_every_output(position):
    g = _grads(1, fill=0.0)
    flat = _flat(g)
    flat[0, position] = 1.0
    # write back into the leaves
    sizes = [int(np.prod(s)) for s in SHAPES]
    parts = np.split(flat, np.cumsum(sizes)[:-1], axis=1)
    g = dict(zip("abcde", [p.reshape(1, *s) for p, s in zip(parts, SHAPES, strict=True)], strict=True))
    out = _project(g, 50, chunk_rows=4096)[0] * math.sqrt(P)
    np.testing.assert_array_equal(np.abs(out), np.ones(50, np.float32))
    row = np.asarray(randomness.projection_matrix("rademacher", 9, 2, position, 1, 50))[0]
    np.testing.assert_array_equal(out, row)


def test_invariant_to_chunk_size_batch_size_and_materialization():
    g = _grads(8, seed=3)
    k = 33
    reference = _project(g, k, chunk_rows=2048)
    for chunk_rows in (4096, 8192, 2048 * 64):
        np.testing.assert_allclose(_project(g, k, chunk_rows=chunk_rows), reference, rtol=1e-5, atol=1e-5)
    layout = projection.parameter_layout(jax.tree_util.tree_map(lambda x: x[0], g))
    blocks = projection.projection_blocks(layout, "rademacher", k, jnp.uint32(KEY))
    np.testing.assert_allclose(_project(g, k, blocks=blocks), reference, rtol=1e-5, atol=1e-5)
    for size in (1, 3):
        part = jax.tree_util.tree_map(lambda x, size=size: x[:size], g)
        np.testing.assert_allclose(_project(part, k, chunk_rows=4096), reference[:size], rtol=1e-5, atol=1e-5)


def test_k_equal_one_and_normal_kind():
    g = _grads(2, seed=1)
    key = randomness.stream_key(0, 0, "normal")
    out = np.asarray(projection.project(g, kind="normal", proj_dim=1, key=key, chunk_rows=2048))
    r = np.asarray(randomness.projection_matrix("normal", 0, 0, 0, P, 1), np.float64)
    np.testing.assert_allclose(out, _flat(g) @ r / math.sqrt(P), rtol=1e-4, atol=1e-5)


def test_identity_is_gradient_over_sqrt_p():
    g = _grads(2, seed=2)
    out = np.asarray(projection.project(g, kind="identity", proj_dim=None))
    np.testing.assert_allclose(out, _flat(g) / math.sqrt(P), rtol=1e-6)


def test_bfloat16_gradients_are_projected_in_float32():
    g = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), _grads(2, seed=4))
    out = _project(g, 16, chunk_rows=2048)
    exact = _flat(jax.tree_util.tree_map(lambda x: np.asarray(x.astype(jnp.float32)), g))
    r = np.asarray(randomness.projection_matrix("rademacher", 9, 2, 0, P, 16), np.float64)
    np.testing.assert_allclose(out, exact @ r / math.sqrt(P), rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32


def test_errors_name_the_argument():
    g = _grads(1)
    with pytest.raises(ValueError, match="projection must be one of"):
        projection.project(g, kind="gaussian", proj_dim=4, key=KEY)
    with pytest.raises(ValueError, match="proj_dim must be >= 1"):
        projection.project(g, kind="rademacher", proj_dim=0, key=KEY)
    with pytest.raises(ValueError, match="proj_dim must be None or"):
        projection.project(g, kind="identity", proj_dim=5)
    with pytest.raises(ValueError, match="chunk_rows"):
        projection.project(g, kind="rademacher", proj_dim=4, key=KEY, chunk_rows=1000)
