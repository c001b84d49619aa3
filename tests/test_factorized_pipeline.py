"""projection="factorized" everywhere the dense family works: attribute, the session and its store
(resume), the jitted scorer, the TOML configuration; λ = 0 equivalence with the identity
projection; what the store records. (Exactness of the features themselves, layer by layer, is
tests/test_factorized.py; meshes and jax.distributed are tests/test_scale_out.py.)"""

import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trakjax
from trakjax import cli, errors, randomness, tasks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _store_helpers as helpers  # noqa: E402
from _cli_project import make_project, write_config  # noqa: E402

FACTORIZED = dict(helpers.SESSION_KW, projection="factorized", factor_dims=(8, 4))
"""The digits MLP (64-16-10): Dense_0 (64+1)×16 → 8×4, Dense_1 (16+1)×10 → 8×4; K_fac = 64 > k = 32."""


@pytest.fixture(scope="module")
def checkpoints():
    return helpers.train_checkpoints()


@pytest.fixture(scope="module")
def expected(checkpoints):
    train, targets = helpers.digits()
    return trakjax.attribute(helpers.task(), checkpoints, train, targets, **FACTORIZED)


def test_the_session_and_its_store_equal_attribute_bit_for_bit(checkpoints, expected, tmp_path):
    scores = helpers.run_session(tmp_path, checkpoints, **FACTORIZED)
    np.testing.assert_array_equal(scores, expected)
    config = json.loads((tmp_path / "trakjax_store.json").read_text())
    assert config["config"]["projection"] == "factorized" and config["config"]["factor_dims"] == [8, 4]
    # the default second stage is the sparse one (contract v4), recorded with its s
    assert config["config"]["contract_version"] == randomness.SPARSE_CONTRACT_VERSION == 4
    assert (config["config"]["second_stage"], config["config"]["sparsity"]) == ("sparse", 2)
    assert config["parameters"]["differentiated"]["k_fac"] == 64
    assert config["parameters"]["differentiated"]["proj_dim"] == 32
    # a contract-v3 store (its dense remainder projected densely before the sparse map) is refused
    config["config"]["contract_version"] = 3
    (tmp_path / "trakjax_store.json").write_text(json.dumps(config))
    with pytest.raises(errors.StoreError, match="contract_version: store has 3, this session has 4"):
        helpers.run_session(tmp_path, checkpoints, **FACTORIZED)


def test_a_resumed_partly_featurized_store_ends_bit_identical(checkpoints, expected, tmp_path):
    helpers.run_session(tmp_path, checkpoints, batch=24, train_rows=(0, 100), phases=("featurize",), **FACTORIZED)
    np.testing.assert_array_equal(helpers.run_session(tmp_path, checkpoints, batch=40, **FACTORIZED), expected)


def test_the_jitted_scorer_equals_attribute(checkpoints, expected):
    train, targets = helpers.digits()
    features = trakjax.train_features(helpers.task(), checkpoints, train, **FACTORIZED)
    assert all(f is not None for f in features.projections)
    score = jax.jit(trakjax.scorer(helpers.task(), features))
    got = np.asarray(score(checkpoints, targets))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_lambda_zero_with_identity_sides_equals_the_identity_projection():
    # Every side at identity and proj_dim="all": the features are vec(∇_W f), up to one scale, so
    # λ = 0 scores (invariant to an invertible change of basis) equal the identity projection's.
    # (A binary logistic model: the multiclass margin has a structural null space at λ = 0.)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 6)).astype(np.float32), rng.integers(0, 2, 80).astype(np.int32)
    params = [{"w": rng.normal(size=(6, 1)).astype(np.float32), "b": np.zeros(1, np.float32)}]
    task = tasks.binary_classification(lambda p, z: (z @ p["w"] + p["b"])[:, 0])
    train, targets = (x[:64], y[:64]), (x[64:], y[64:])
    identity = trakjax.attribute(task, params, train, targets, projection="identity", lambda_reg=0.0)
    factorized = trakjax.attribute(task, params, train, targets, projection="factorized", proj_dim="all",
                                   factor_dims=16, lambda_reg=0.0)
    np.testing.assert_allclose(factorized, identity, rtol=2e-4, atol=2e-4 * np.abs(identity).max())


def test_an_int_proj_dim_above_k_fac_keeps_k_fac_features_and_says_so(checkpoints, caplog):
    train, targets = helpers.digits()
    with caplog.at_level(logging.INFO, logger="trakjax"):
        _, details = trakjax.attribute(helpers.task(), checkpoints[:1], train, targets, return_details=True,
                                       **dict(FACTORIZED, proj_dim=1000))
    assert details[0].proj_dim == 64
    assert "proj_dim=1000 ≥ K_fac=64, so all 64 factorized features are kept" in caplog.text


def test_describe_factorization_lists_each_leaf():
    train, _ = helpers.digits()
    params = helpers.train_checkpoints(1, steps=1)[0]
    table = str(trakjax.describe_factorization(helpers.task(), params, (train[0][0], train[1][0]),
                                               factor_dims=(8, 4), proj_dim=32))
    for leaf in ("params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_0/bias"):
        assert leaf in table
    assert "K_fac" in table


def test_a_model_with_nothing_to_factorize_is_a_clear_error():
    train, targets = helpers.digits()
    task = tasks.image_classification(lambda p, z: z * p["scale"] @ jnp.ones((64, 10)))  # element-wise only
    with pytest.raises(errors.InvalidArgumentError, match=r"no differentiated parameter can be factorized(?s:.*)scale"):
        trakjax.attribute(task, [{"scale": np.ones(64, np.float32)}], train, targets, projection="factorized")


def test_the_toml_configuration_runs_the_factorized_family(tmp_path, capsys):
    (tmp_path / "project").mkdir()
    project = make_project(tmp_path / "project")
    config = write_config(tmp_path, project, projection='"factorized"', factor_dims="[2, 2]", proj_dim='"all"')
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    stored = np.load(tmp_path / "out" / "store" / "experiments" / "targets" / "scores.npy")
    sys.path.insert(0, str(project))
    try:
        import cli_tiny_model
    finally:
        sys.path.remove(str(project))
    from trakjax import checkpoints as checkpoints_lib

    params = [checkpoints_lib.restore(project / "ckpt" / str(m)) for m in range(2)]
    train = (np.load(project / "train_x.npy"), np.load(project / "train_y.npy"))
    targets = (np.load(project / "test_x.npy"), np.load(project / "test_y.npy"))
    expected = trakjax.attribute(tasks.image_classification(cli_tiny_model.model.apply), params, train, targets,
                                 projection="factorized", factor_dims=2, proj_dim="all", batch_size=4,
                                 grad_wrt=["params"])
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
