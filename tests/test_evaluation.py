"""trakjax.evaluation: subsets, LDS against a hand computation, retraining against a plain loop."""

import jax
import numpy as np
import optax
import pytest

from trakjax import evaluation

# --------------------------------------------------------------------------- subset_masks


def test_subset_masks_are_deterministic_by_seed_and_half_sized():
    a = evaluation.subset_masks(40, 6, 0.5, seed=3)
    b = evaluation.subset_masks(40, 6, 0.5, seed=3)
    c = evaluation.subset_masks(40, 6, 0.5, seed=4)
    assert a.shape == (6, 40) and a.dtype == bool
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a.sum(axis=1), 20)
    assert len({row.tobytes() for row in a}) == 6  # rows are distinct draws
    np.testing.assert_array_equal(evaluation.subset_masks(10, 2, 0.3, seed=0).sum(axis=1), 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_train=0, n_subsets=2), "n_train must be an int >= 1"),
        (dict(n_train=10, n_subsets=2, fraction=1.0), r"fraction must be a float in \(0, 1\)"),
        (dict(n_train=3, n_subsets=2, fraction=0.1), "gives subsets of 0 examples"),
    ],
)
def test_subset_masks_reject_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluation.subset_masks(**kwargs)


# --------------------------------------------------------------------------- lds


MASKS = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], bool)
SCORES = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, -1.0]])
MARGINS = np.array([[0.1, 4.0], [0.3, 3.0], [0.2, 1.0], [0.4, 2.0]])


def test_lds_matches_a_hand_computed_example():
    # Target 0: predicted masks @ scores = (3, 4, 6, 7), ranks (1, 2, 3, 4); margin ranks
    # (1, 3, 2, 4); Σd² = 2, so Spearman = 1 − 6·2 / (4·(16 − 1)) = 0.8.
    # Target 1: predicted (0, 1, −1, 0) has a tie: ranks (2.5, 4, 1, 2.5); margin ranks
    # (4, 3, 1, 2). Centered: a = (0, 1.5, −1.5, 0), b = (1.5, 0.5, −1.5, −0.5);
    # Σab = 3, Σa² = 4.5, Σb² = 5, so r = 3 / √22.5.
    result = evaluation.lds(SCORES, MASKS, MARGINS, n_bootstrap=500, seed=1)
    expected = np.array([0.8, 3.0 / np.sqrt(22.5)])
    np.testing.assert_allclose(result.per_target, expected, rtol=1e-12)
    assert result.mean == pytest.approx(expected.mean(), rel=1e-12)
    assert expected.min() - 1e-12 <= result.ci_low <= result.mean <= result.ci_high <= expected.max() + 1e-12
    assert result.confidence == 0.95


def test_lds_is_invariant_to_monotone_maps_and_flips_sign():
    rng = np.random.default_rng(0)
    masks = rng.random((30, 12)) < 0.5
    scores = rng.normal(size=(12, 3))
    margins = masks @ scores + 0.1 * rng.normal(size=(30, 3))
    base = evaluation.lds(scores, masks, margins, n_bootstrap=10)
    assert base.mean > 0.9
    np.testing.assert_allclose(evaluation.lds(scores, masks, np.exp(margins), n_bootstrap=10).per_target, base.per_target)
    np.testing.assert_allclose(evaluation.lds(-scores, masks, margins, n_bootstrap=10).per_target, -base.per_target)


def test_lds_rejects_undefined_and_mismatched_inputs():
    with pytest.raises(ValueError, match=r"targets \[0\] have constant margins"):
        evaluation.lds(SCORES, MASKS, np.column_stack([np.ones(4), MARGINS[:, 1]]))
    with pytest.raises(ValueError, match=r"margins must be \(n_subsets, n_targets\) = \(4, 2\)"):
        evaluation.lds(SCORES, MASKS, MARGINS[:3])
    with pytest.raises(ValueError, match="scores has NaN"):
        evaluation.lds(np.where(SCORES == 4.0, np.nan, SCORES), MASKS, MARGINS)


# --------------------------------------------------------------------------- retrain_margins

D, C, N, T = 3, 3, 12, 4


def init_fn(key):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (D, C)), "b": 0.1 * jax.random.normal(k2, (C,))}


def apply_fn(params, x):
    return x @ params["w"] + params["b"]


def tiny_problem():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N + T, D)).astype(np.float32)
    y = rng.integers(0, C, N + T).astype(np.int32)
    return (x[:N], y[:N]), (x[N:], y[N:])


def loop_margins(masks, steps, optimizer, train, targets, seed):
    """One model at a time, in plain Python, on the subset's rows only (not masked weights)."""
    out = []
    for s, mask in enumerate(masks):
        init_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(seed), s))
        params = init_fn(init_key)
        state = optimizer.init(params)
        x, y = train[0][mask], train[1][mask]
        for _ in range(steps):
            grads = jax.grad(
                lambda p, x=x, y=y: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
            )(params)
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        logits = np.asarray(apply_fn(params, targets[0]), np.float64)
        rows = []
        for z, label in zip(logits, targets[1], strict=True):
            others = np.delete(z, label)
            rows.append(z[label] - (others.max() + np.log(np.exp(others - others.max()).sum())))
        out.append(rows)
    return np.array(out)


def test_retrain_margins_matches_a_plain_loop_over_subsets():
    train, targets = tiny_problem()
    masks = evaluation.subset_masks(N, 3, 0.5, seed=2)
    optimizer = optax.adam(0.05)
    got = evaluation.retrain_margins(init_fn, apply_fn, optimizer, 15, train, targets, masks, seed=9, chunk_size=2)
    expected = loop_margins(masks, 15, optimizer, train, targets, seed=9)
    assert got.shape == (3, T)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The subsets matter: different data give different margins.
    assert np.abs(expected[0] - expected[1]).max() > 1e-2


def test_retrain_margins_minibatch_does_not_depend_on_chunking_and_same_init_shares_start():
    train, targets = tiny_problem()
    masks = evaluation.subset_masks(N, 3, 0.5, seed=2)
    args = (init_fn, apply_fn, optax.sgd(0.1), 5, train, targets, masks, 4)
    whole = evaluation.retrain_margins(*args, batch_size=4)
    chunked = evaluation.retrain_margins(*args, batch_size=4, chunk_size=1)
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    same = evaluation.retrain_margins(*args[:6], np.ones((2, N), bool), 4, same_init=True)
    np.testing.assert_allclose(same[0], same[1], rtol=1e-6)
    with pytest.raises(ValueError, match=r"masks rows \[1\] select no training example"):
        evaluation.retrain_margins(*args[:6], np.array([[True] * N, [False] * N]), 0)


def test_brittleness_removes_top_scored_examples_and_counts_flips():
    train, _ = tiny_problem()
    targets = (train[0][:T], train[1][:T])  # training examples: the full-data model fits them
    optimizer = optax.adam(0.05)
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(N, T))
    result = evaluation.brittleness(scores, init_fn, apply_fn, optimizer, 10, train, targets, [2, 4], seed=1)
    assert result.top_margins.shape == result.random_margins.shape == (2, T)
    base = evaluation.retrain_margins(
        init_fn, apply_fn, optimizer, 10, train, targets, np.ones((1, N), bool), 1, same_init=True
    )[0]
    np.testing.assert_allclose(result.base_margins, base, rtol=1e-6)
    # Removing target 0's two top-scored examples, retrained by hand from the same start:
    keep = np.ones((1, N), bool)
    keep[0, np.argsort(-scores[:, 0])[:2]] = False
    by_hand = evaluation.retrain_margins(
        init_fn, apply_fn, optimizer, 10, train, targets, keep, 1, same_init=True
    )[0, 0]
    assert result.top_margins[0, 0] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    evaluated = result.evaluated
    assert evaluated.size > 0
    np.testing.assert_allclose(result.top_flip_rate, (result.top_margins[:, evaluated] < 0).mean(axis=1))
