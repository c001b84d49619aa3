"""The featurize step's per-executable XLA options (trakjax.compiler_options): applied on the
CPU only, probed so that an XLA without the option falls back to its defaults, no reduction left
to YNNPACK, and the same features either way."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trakjax import Config, compiler_options, featurize, sharding, tasks


class _LayerNormMLP(nn.Module):
    """A layer norm over a middle axis's positions: its gain gradient is a (B, T, d) → (B, d) sum."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(nn.Dense(6)(x))
        return nn.Dense(3)(jnp.tanh(h).mean(axis=1))


def _featurize(projection):
    x = jax.random.normal(jax.random.key(0), (4, 5, 7))
    model = _LayerNormMLP()
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(model.apply)
    config = Config.create(projection=projection, proj_dim=16, batch_size=4, backend="xla", seed=3)
    batch = (x, jnp.array([0, 1, 2, 1]))
    checkpoint = featurize.prepare_checkpoint(task, params, config, 0, example=(x[0], batch[1][0]))
    return featurize.featurize_batch(task, checkpoint, batch)


@pytest.fixture
def fresh_probe(monkeypatch):
    compiler_options._cpu_options_accepted.cache_clear()
    monkeypatch.setattr(compiler_options, "STATUS", {})
    yield
    compiler_options._cpu_options_accepted.cache_clear()


def test_cpu_gets_the_options_other_platforms_none(fresh_probe):
    assert compiler_options.featurize_step_options("cpu") == compiler_options.CPU_STEP_OPTIONS
    assert compiler_options.STATUS["cpu"].startswith("applied")
    assert compiler_options.featurize_step_options("gpu") == {}
    assert compiler_options.featurize_step_options("tpu") == {}
    assert sharding.mesh_platform(None) == jax.default_backend()


def test_no_reduction_is_left_to_ynnpack_under_the_options():
    reduce_middle_axis = jax.jit(lambda x: jnp.sum(x * x, axis=1),
                                 compiler_options=compiler_options.featurize_step_options("cpu"))
    text = reduce_middle_axis.lower(jax.ShapeDtypeStruct((8, 128, 64), jnp.float32)).compile().as_text()
    fusions = [line for line in text.splitlines() if "ynn_fusion" in line and "reduce" in line]
    assert fusions == []


def test_an_xla_that_rejects_the_option_gets_its_defaults(fresh_probe, monkeypatch):
    monkeypatch.setattr(compiler_options, "CPU_STEP_OPTIONS", {"xla_no_such_option_for_trakjax": "1"})
    assert compiler_options.featurize_step_options("cpu") == {}
    assert compiler_options.STATUS["cpu"].startswith("not applied")
    assert "xla_no_such_option_for_trakjax" in compiler_options.STATUS["cpu"]
    features = _featurize("factorized")  # the step still compiles, with XLA's defaults
    assert np.isfinite(np.asarray(features.features)).all()


@pytest.mark.parametrize("projection", ["factorized", "rademacher"])
def test_features_are_the_same_with_and_without_the_options(fresh_probe, monkeypatch, projection):
    calls = []
    real = compiler_options.featurize_step_options

    def spy(platform):
        calls.append(platform)
        return real(platform)

    monkeypatch.setattr(compiler_options, "featurize_step_options", spy)
    with_options = _featurize(projection)
    assert calls and set(calls) == {jax.default_backend()}
    monkeypatch.setattr(compiler_options, "featurize_step_options", lambda platform: {})
    without = _featurize(projection)
    for name in ("features", "outputs", "out_to_loss"):
        np.testing.assert_allclose(getattr(with_options, name), getattr(without, name), rtol=2e-5, atol=1e-6)
