"""trakjax.Config: one validated configuration for every entry point; the error hierarchy; stores
written by trakjax 0.1 keep opening."""

import json
import pathlib
import shutil
import sys
import warnings

import jax
import numpy as np
import pytest

import trakjax
from trakjax import errors, featurize
from trakjax.config import DEFAULT_PROJ_DIM, Config, ResultSettings, RunSettings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _store_helpers as helpers  # noqa: E402

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "store_v1"


def test_create_routes_each_setting_to_its_half_and_numpy_numbers_count():
    config = Config.create(proj_dim=np.int64(16), seed=np.uint32(3), lambda_reg=np.float32(0.5),
                           batch_size=np.int16(8), grad_wrt=["params/Dense_0"])
    assert config.result.proj_dim == 16 and type(config.result.proj_dim) is int
    assert config.result.seed == 3 and type(config.result.seed) is int
    assert config.result.lambda_reg == 0.5 and type(config.result.lambda_reg) is float
    assert config.run.batch_size == 8 and type(config.run.batch_size) is int
    assert config.result.grad_wrt == ("params/Dense_0",)
    assert config.replace(batch_size=32).result == config.result  # run settings leave results alone
    assert Config.create(config, lambda_reg=None).result.lambda_reg == "auto"
    assert Config.create(projection="rademacher").result.projection_dim(10_000) == DEFAULT_PROJ_DIM == 2048
    assert Config.create(projection="identity").result.projection_dim(37) == 37


@pytest.mark.parametrize("settings,kind,message", [
    (dict(proj_dim=0), errors.InvalidArgumentError, "proj_dim must be >= 1, got 0"),
    (dict(proj_dim=2.5), errors.ArgumentTypeError, "proj_dim must be an int >= 1, got 2.5"),
    (dict(proj_dim=True), errors.ArgumentTypeError, "proj_dim must be an int >= 1, got True"),
    (dict(seed=-1), errors.InvalidArgumentError, r"seed must be an int in \[0, 18446744073709551616\), got -1"),
    (dict(lambda_reg="big"), errors.InvalidArgumentError, "lambda_reg must be 'auto', None or a float >= 0, got 'big'"),
    (dict(lambda_reg=float("nan")), errors.InvalidArgumentError, "lambda_reg must be None or a finite float"),
    (dict(projection="gaussian"), errors.InvalidArgumentError, "projection must be one of"),
    (dict(dtype="int8"), errors.InvalidArgumentError, "dtype must be one of"),
    (dict(precision="fast"), errors.InvalidArgumentError, "precision must be one of .*'fast'"),
    (dict(backend="cuda"), errors.InvalidArgumentError, "backend must be one of .*'cuda'"),
    (dict(batch_size=0), errors.InvalidArgumentError, "batch_size must be an int >= 1, got 0"),
    (dict(chunk_rows=1000), errors.InvalidArgumentError, "chunk_rows must be a positive multiple of 2048, got 1000"),
    (dict(grad_wrt="params"), errors.ArgumentTypeError, r"use \['params'\]"),
    (dict(mesh="cpu"), errors.ArgumentTypeError, "mesh must be a jax.sharding.Mesh"),
    (dict(progress="yes"), errors.ArgumentTypeError, "progress must be a bool"),
    (dict(proj_dimm=8), errors.InvalidArgumentError, r"unknown settings \['proj_dimm'\]; valid settings are"),
])
def test_a_bad_setting_is_a_trakjax_error_naming_it_its_value_and_what_is_valid(settings, kind, message):
    with pytest.raises(kind, match=message) as info:
        Config.create(**settings)
    assert isinstance(info.value, errors.TrakjaxError)
    assert isinstance(info.value, ValueError if kind is errors.InvalidArgumentError else TypeError)


def test_settings_are_checked_before_any_featurization(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(featurize, "featurize_batch", lambda *a, **k: calls.append(a))
    train, targets = helpers.digits()
    params = [{"w": np.zeros((64, 10), np.float32)}]
    task = trakjax.tasks.image_classification(lambda p, x: x @ p["w"])
    for call in (
        lambda: trakjax.attribute(task, params, train, targets, lambda_reg=-1.0),
        lambda: trakjax.self_influence(task, params, train, precision="fast"),
        lambda: trakjax.train_features(task, params, train, batch_size=0),
        lambda: trakjax.TRAKer(task, 256, tmp_path / "store", proj_dim=np.int64(0)),
    ):
        with pytest.raises(errors.InvalidArgumentError):
            call()
    assert calls == [], "a bad setting must fail before featurizing anything"
    assert not (tmp_path / "store").exists(), "a bad setting must leave no store behind"


def test_every_entry_point_takes_a_config_and_keywords_override_it():
    checkpoints = helpers.train_checkpoints(1, steps=5)
    train, targets = helpers.digits()
    train = (train[0][:64], train[1][:64])
    task = helpers.task()
    config = Config(ResultSettings(proj_dim=16, seed=2, lambda_reg=0.1), RunSettings(batch_size=32, backend="xla"))
    by_config = trakjax.attribute(task, checkpoints, train, targets, config)
    by_keywords = trakjax.attribute(task, checkpoints, train, targets, proj_dim=16, seed=2,
                                    lambda_reg=0.1, batch_size=32, backend="xla")
    np.testing.assert_array_equal(by_config, by_keywords)
    overridden = trakjax.attribute(task, checkpoints, train, targets, config, seed=3)
    assert not np.array_equal(overridden, by_config)  # seed 3 is another projection
    features = trakjax.train_features(task, checkpoints, train, config)
    np.testing.assert_allclose(np.asarray(trakjax.scorer(task, features)(checkpoints[0], targets)),
                               by_config, rtol=1e-5, atol=1e-6 * np.abs(by_config).max())


def test_the_error_hierarchy_is_one_base_with_builtin_parents():
    assert issubclass(errors.StoreError, errors.TrakjaxError) and issubclass(errors.StoreError, ValueError)
    assert issubclass(errors.InputsChangedError, errors.StoreError)
    assert issubclass(errors.ConfigError, errors.InvalidArgumentError)
    assert issubclass(errors.NumericalError, ValueError)
    assert issubclass(errors.ArgumentTypeError, TypeError)
    from trakjax import run_config, store

    assert not hasattr(run_config, "BadInput") and store.StoreError is errors.StoreError


def _fixture_inputs():
    with np.load(FIXTURE / "inputs.npz") as f:
        train, targets = (f["train_x"], f["train_y"]), (f["target_x"], f["target_y"])
        checkpoints = []
        for m in range(2):
            params = {"params": {}}
            for layer in ("Dense_0", "Dense_1"):
                params["params"][layer] = {name: f[f"{m}/params/{layer}/{name}"] for name in ("bias", "kernel")}
            checkpoints.append(params)
    return checkpoints, train, targets


def test_a_store_written_by_trakjax_0_1_keeps_opening_and_resuming(tmp_path):
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    checkpoints, _, targets = _fixture_inputs()
    expected = np.load(FIXTURE / "expected_scores.npy")
    with pytest.warns(UserWarning, match="written by trakjax 0.1.0"):
        traker = trakjax.TRAKer(helpers.task(), 40, tmp_path / "store", proj_dim=16, seed=7, batch_size=8,
                                backend="xla")
    np.testing.assert_array_equal(traker.finalize_scores("old"), expected)
    # Its weights (sampled fingerprints) still check, and a new experiment scores like attribute.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for m, params in enumerate(checkpoints):
            traker.load_checkpoint(params, m)  # resumes: nothing to do
            traker.start_scoring_checkpoint("new", params, m, num_targets=6)
            traker.score(targets, num_samples=6)
        new = traker.finalize_scores("new")
    close = dict(rtol=1e-5, atol=1e-6 * np.abs(expected).max())  # another JAX may round otherwise
    np.testing.assert_allclose(new, expected, **close)
    changed = jax.tree_util.tree_map(lambda x: x + 1, checkpoints[0])
    with pytest.raises(errors.StoreError, match="holds other weights: fingerprint blake2b-sampled-1:"):
        traker.load_checkpoint(changed, 0)
    # Its features were finalized with the λ rule of trakjax 0.1 (0.3·trace/N), and stay so.
    for m in range(2):
        info = json.loads((tmp_path / "store" / "models" / str(m) / "model.json").read_text())
        gram = np.load(tmp_path / "store" / "models" / str(m) / "grads.npy").astype(np.float64)
        assert info["finalized"]["lambda_reg"] == pytest.approx(0.3 * (gram**2).sum() / 40, rel=1e-5)
