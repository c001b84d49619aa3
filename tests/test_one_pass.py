"""One model pass per featurize batch: tasks' ``from_outputs`` (Q and the curvature h from the
outputs f the features' pass computed) against their ``out_to_loss``/``ridge_terms``, the batched
model call gone from the step, and custom tasks with only ``out_to_loss`` unchanged."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trakjax import Config, featurize, tasks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from task_helpers import clip_data, clip_fns, clip_params  # noqa: E402


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


# --------------------------------------------------------------------------- tasks whose Q needs more than f


class _TinyLM(nn.Module):
    """Embedding, one Dense mixing layer, a tied-free head: (B, L) ids -> (B, L, V) logits."""

    vocab: int = 11

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, 6)(ids)
        h = nn.tanh(nn.Dense(6)(h))
        return nn.Dense(self.vocab)(h)


def _lm_setup():
    ids = jax.random.randint(jax.random.key(2), (6, 7), 0, 11)
    mask = jnp.ones((6, 7), jnp.float32).at[5, 3:].set(0.0).at[4, :].set(0.0)  # padding, an empty row
    model = _TinyLM()
    params = model.init(jax.random.key(3), ids[:1])
    def apply(p, inputs):
        return model.apply(p, inputs["input_ids"])

    return tasks.language_modeling(apply), params, {"input_ids": ids, "attention_mask": mask}


def _clip_setup():
    image_fn, text_fn = clip_fns()
    return tasks.clip(image_fn, text_fn, temperature=0.5, n_negatives=4), clip_params(0), clip_data(6, 0)


@pytest.mark.parametrize("projection", ["rademacher", "factorized"])
@pytest.mark.parametrize("setup", [_lm_setup, _clip_setup], ids=["language_modeling", "clip"])
def test_q_and_h_from_the_features_pass_for_tasks_with_aux(setup, projection):
    """language_modeling's per-token terms and CLIP's two margins come out of the features' own
    forward pass (output_with_aux): the step never runs out_to_loss's model pass, and q and h equal
    the extra pass's out_to_loss and ridge_terms. Float differences: the same numbers summed per
    example rather than per batch, to float32 rounding."""
    task, params, batch = setup()
    assert task.output_with_aux is not None and task.from_outputs is not None
    config = Config.create(proj_dim=16, projection=projection, kernel="trak", backend="xla",
                           **({"factor_dims": 4} if projection == "factorized" else {}))
    passes = []
    original = task.out_to_loss
    task = task._replace(out_to_loss=lambda p, b, st: (passes.append(1), original(p, b, st))[1])
    checkpoint = featurize.prepare_checkpoint(task, params, config, 0, init_data=batch)
    out = featurize.featurize_batch(task, checkpoint, batch)
    assert not passes, "the step ran out_to_loss's batched model pass"
    task = task._replace(out_to_loss=original)
    keys = featurize.example_keys(task, featurize.task_key(0, 0, featurize.TRAIN_SPLIT), jnp.arange(6))
    state = tasks.TaskState(checkpoint.aux, keys)
    q_pass = np.asarray(task.out_to_loss(params, batch, state))
    _, h_pass = task.ridge_terms(params, batch, state, jnp.asarray(q_pass))
    np.testing.assert_allclose(out.out_to_loss, q_pass, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.curvature, np.asarray(h_pass), rtol=1e-5, atol=1e-7)
    outputs = jax.vmap(lambda ex, key: task.output(params, ex, tasks.TaskState(checkpoint.aux, key)))(
        batch, keys)
    np.testing.assert_allclose(out.outputs, np.asarray(outputs), rtol=1e-5, atol=1e-5)
    if setup is _lm_setup:
        assert out.out_to_loss[4] == 0.0  # a sequence with no counted token has Q = 0
