"""trakjax.scorer: jitted scores equal trakjax.attribute, with no host round trip.

An MLP on sklearn's digits with two checkpoints; the pure score_fn runs inside jax.jit with the
train features as an argument, and must equal attribute at the same parameters (which is itself
checked against float64 closed forms in test_task_library and test_attribute_closed_form).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import trakjax
from trakjax import tasks

K = 32
SEED = 11
MODEL_IDS = [5, 9]


def mlp(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_params(seed, hidden=8):
    rng = np.random.default_rng(seed)
    return {
        "b1": (0.1 * rng.normal(size=hidden)).astype(np.float32),
        "b2": (0.1 * rng.normal(size=10)).astype(np.float32),
        "w1": (rng.normal(size=(64, hidden)) / 8).astype(np.float32),
        "w2": (rng.normal(size=(hidden, 10)) / np.sqrt(hidden)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def setup():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    train, targets = (x[:64], y[:64]), (x[64:70], y[64:70])
    task = tasks.image_classification(mlp)
    checkpoints = [mlp_params(0), mlp_params(1)]
    kwargs = dict(proj_dim=K, seed=SEED, model_ids=MODEL_IDS, backend="xla")
    expected = trakjax.attribute(task, checkpoints, train, targets, **kwargs)
    features = trakjax.train_features(task, checkpoints, train, **kwargs)
    return task, checkpoints, train, targets, expected, features


@jax.jit
def user_step(score_fn, params, batch):
    """Stands in for a user's jitted training step that scores a probe batch."""
    return score_fn(params, batch)


def rel(got, expected):
    return float(np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected))


def test_jitted_scores_equal_attribute_for_listed_and_stacked_checkpoints(setup):
    task, checkpoints, _, targets, expected, features = setup
    assert features.features.shape == (2, 64, K) and features.out_to_loss.shape == (2, 64)
    assert features.contract.model_ids == tuple(MODEL_IDS)
    score_fn = trakjax.scorer(task, features)
    got = user_step(score_fn, checkpoints, targets)
    assert got.shape == (64, 6)
    assert rel(got, expected) < 1e-5
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *checkpoints)
    assert rel(user_step(score_fn, stacked, targets), expected) < 1e-5


def test_no_host_round_trip_and_no_recompile_on_refresh(setup):
    task, checkpoints, train, targets, expected, features = setup
    traces = []

    @jax.jit
    def step(score_fn, params, batch):
        traces.append(1)
        return score_fn(params, batch)

    score_fn = trakjax.scorer(task, features)
    on_device = jax.device_put((checkpoints, targets))
    step(score_fn, *on_device).block_until_ready()
    with jax.transfer_guard("disallow"):  # any implicit host<->device transfer raises
        out = step(score_fn, *on_device)
    assert rel(out, expected) < 1e-5
    # Refreshed features (other parameters, same shapes) reuse the compiled step.
    moved = [jax.tree_util.tree_map(lambda x: x * 1.01, p) for p in checkpoints]
    refreshed = trakjax.train_features(
        task, moved, train, proj_dim=K, seed=SEED, model_ids=MODEL_IDS, backend="xla"
    )
    got = step(trakjax.scorer(task, refreshed), moved, targets)
    assert len(traces) == 1
    again = trakjax.attribute(
        task, moved, train, targets, proj_dim=K, seed=SEED, model_ids=MODEL_IDS, backend="xla"
    )
    assert rel(got, again) < 1e-5


def test_one_checkpoint_with_bfloat16_feature_storage():
    digits = load_digits()
    x = (digits.data[:40] / 16.0).astype(np.float32)
    y = digits.target[:40].astype(np.int32)
    task = tasks.image_classification(mlp)
    params = mlp_params(3)
    kwargs = dict(proj_dim=K, seed=SEED, backend="xla", dtype="bfloat16")
    expected = trakjax.attribute(task, [params], (x[:32], y[:32]), (x[32:], y[32:]), **kwargs)
    features = trakjax.train_features(task, [params], (x[:32], y[:32]), **kwargs)
    got = user_step(trakjax.scorer(task, features), params, (x[32:], y[32:]))
    assert rel(got, expected) < 1e-5


def test_params_that_do_not_match_the_featurized_checkpoints_raise(setup):
    task, checkpoints, _, targets, _, features = setup
    score_fn = trakjax.scorer(task, features)
    with pytest.raises(ValueError, match=r"params is one checkpoint, but the train features hold M = 2"):
        score_fn(checkpoints[0], targets)
    with pytest.raises(ValueError, match=r"params is a list of 3 pytrees.*M = 2"):
        score_fn(checkpoints + checkpoints[:1], targets)
    wide = [mlp_params(0, hidden=9), mlp_params(1, hidden=9)]
    with pytest.raises(ValueError, match=r"params\[0\] leaf 'b1' has shape \(9,\), the featurized checkpoints' has \(8,\)"):
        user_step(score_fn, wide, targets)
    missing = [{k: v for k, v in p.items() if k != "b2"} for p in checkpoints]
    with pytest.raises(ValueError, match=r"params\[0\] does not match.*missing \['b2'\]"):
        score_fn(missing, targets)
    with pytest.raises(ValueError, match=r"task 'regression' differs from the task 'image_classification'"):
        trakjax.scorer(tasks.regression(mlp), features)(checkpoints, targets)
    with pytest.raises(TypeError, match="train_features must be a TrainFeatures"):
        trakjax.scorer(task, features.features)
