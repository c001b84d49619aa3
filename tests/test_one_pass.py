"""One model pass per featurize batch: tasks' ``from_outputs`` (Q and the curvature h from the
outputs f the features' pass computed) against their ``out_to_loss``/``ridge_terms``, the batched
model call gone from the step, and custom tasks with only ``out_to_loss`` unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trakjax import Config, featurize, tasks


class _MLP(nn.Module):
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(nn.tanh(nn.Dense(8)(x)))


def _setup(task_name):
    x = jax.random.normal(jax.random.key(0), (6, 5)) * 3.0
    if task_name == "regression":
        model = _MLP(1)
        params = model.init(jax.random.key(1), x[:1])
        return tasks.regression(model.apply), params, (x, jnp.linspace(-2.0, 2.0, 6))
    if task_name == "binary":
        model = _MLP(1)
        params = model.init(jax.random.key(1), x[:1])
        return tasks.binary_classification(model.apply), params, (x, jnp.array([0, 1, 1, 0, 1, 0]))
    model = _MLP(4)
    params = model.init(jax.random.key(1), x[:1])
    labels = jnp.array([0, 1, 2, 3, 1, 0])
    if task_name == "image":
        return tasks.image_classification(model.apply), params, (x, labels)

    def output(p, example, state):
        return tasks.classification_margin(model.apply(p, example[0][None])[0], example[1])

    task = tasks.from_loss(output, lambda f, ex, st: jnp.log1p(jnp.exp(-f)), output_offset=-np.log(3.0))
    return task, params, (x, labels)


@pytest.mark.parametrize("task_name", ["image", "binary", "regression", "from_loss"])
def test_q_and_curvature_from_outputs_equal_the_extra_pass(task_name):
    """Float differences: σ(−f) from the margin against 1 − softmax_y (the same number through
    logsumexp rather than a normalization; from_loss's h by double autodiff) differ in the last
    float32 bits, so the comparison has a tolerance."""
    task, params, batch = _setup(task_name)
    assert task.from_outputs is not None
    state = tasks.TaskState()
    outputs = jax.vmap(lambda ex: task.output(params, ex, state))(batch)
    q, h = task.from_outputs(outputs, batch, state)
    q_pass = task.out_to_loss(params, batch, state)
    _, h_pass = task.ridge_terms(params, batch, state, q_pass)
    np.testing.assert_allclose(np.asarray(q), np.asarray(q_pass), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_pass), rtol=1e-5, atol=1e-6)


def test_temperature_keeps_the_extra_pass():
    task = tasks.image_classification(lambda p, x: x, temperature=2.0)
    assert task.from_outputs is None


@pytest.mark.parametrize("one_pass", [True, False])
def test_featurize_step_calls_out_to_loss_only_without_from_outputs(one_pass):
    """A task with from_outputs never runs out_to_loss (its batched model pass); a custom task
    with only out_to_loss keeps that pass, and both give the same q."""
    model = _MLP(4)
    x = jax.random.normal(jax.random.key(0), (6, 5))
    batch = (x, jnp.array([0, 1, 2, 3, 1, 0]))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(model.apply)
    calls = []
    original = task.out_to_loss

    def out_to_loss(p, b, state):
        calls.append(b[1].shape)
        return original(p, b, state)

    task = task._replace(out_to_loss=out_to_loss)
    if not one_pass:
        task = task._replace(from_outputs=None)
    checkpoint = featurize.prepare_checkpoint(task, params, Config.create(proj_dim=16), 0, init_data=batch)
    out = featurize.featurize_batch(task, checkpoint, batch)
    assert bool(calls) == (not one_pass)
    expected = np.asarray(tasks.one_minus_p(model.apply(params, x), batch[1]))
    np.testing.assert_allclose(out.out_to_loss, expected, rtol=1e-5, atol=1e-6)
