"""Per-example gradients, grad_wrt, micro-batching, NaN detection and the task protocol."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trakjax import Config, featurize, randomness, tasks

D, H, C = 5, 7, 3


def apply_fn(params, x):
    hidden = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
    return hidden @ params["head"]["w"] + params["head"]["b"] * params["scale"]


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layer1": {"w": rng.normal(size=(D, H)).astype(np.float32), "b": rng.normal(size=H).astype(np.float32)},
        "head": {"w": rng.normal(size=(H, C)).astype(np.float32), "b": rng.normal(size=C).astype(np.float32)},
        "scale": np.float32(1.0),
        "step": np.int32(3),  # an integer leaf: never differentiated
    }


def make_batch(n=9, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, C, n).astype(np.int32)


TASK = tasks.image_classification(apply_fn)


def test_per_example_grads_match_a_loop_of_jax_grad():
    params = make_params()
    x, y = make_batch()
    grads, outputs = featurize.per_example_grads(TASK, params, (x, y), grad_wrt=["layer1", "head/w"])
    assert grads["head"]["b"] is None and grads["scale"] is None and grads["step"] is None
    for i in range(x.shape[0]):
        one = jax.grad(lambda p, i=i: TASK.output(p, (x[i], y[i]), tasks.TaskState()), allow_int=True)(params)
        np.testing.assert_allclose(grads["layer1"]["w"][i], one["layer1"]["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grads["head"]["w"][i], one["head"]["w"], rtol=1e-5, atol=1e-6)
        assert outputs[i] == pytest.approx(float(TASK.output(params, (x[i], y[i]), tasks.TaskState())), rel=1e-5)


def test_grad_wrt_forms_agree_and_errors_list_valid_paths():
    params = make_params()
    by_path = featurize.select_parameters(params, ["head"])
    by_callable = featurize.select_parameters(params, lambda path, leaf: path.startswith("head/"))
    by_mask = featurize.select_parameters(
        params, {"layer1": {"w": False, "b": False}, "head": {"w": True, "b": True}, "scale": False, "step": False}
    )
    assert by_path == by_callable == by_mask
    assert sum(by_path) == 2
    everything = featurize.select_parameters(params, None)
    assert featurize.parameter_paths(params)[everything.index(False)] == "step"
    with pytest.raises(ValueError, match="matches no parameter; valid paths are"):
        featurize.select_parameters(params, ["hed"])
    with pytest.raises(TypeError, match="sequence of path prefixes"):
        featurize.select_parameters(params, "head")
    with pytest.raises(ValueError, match="only floating-point"):
        featurize.select_parameters(params, ["step"])


def _step_flops(grad_wrt):
    params = make_params()
    config = Config.create(proj_dim=8, grad_wrt=grad_wrt, backend="xla", batch_size=16)
    checkpoint = featurize.prepare_checkpoint(TASK, params, config, 0)
    x, y = make_batch(16)
    lowered = checkpoint.target_step.lower(
        checkpoint.diff, checkpoint.fixed, (x, y), None, np.arange(16, dtype=np.int32),
        featurize.task_key(0, 0, 1), checkpoint.arrays,
    )
    return lowered.compile().cost_analysis()["flops"]


def test_grad_wrt_really_skips_the_unselected_parameters():
    # Differentiating only the head must not compute the first layer's weight gradients:
    # the compiled step does measurably less work.
    assert _step_flops(["head"]) < 0.8 * _step_flops(None)


def test_featurize_is_invariant_to_batch_and_micro_batch_size():
    params = make_params()
    x, y = make_batch(13)
    config = Config.create(proj_dim=24, backend="xla", batch_size=13)
    whole = featurize.featurize(TASK, featurize.prepare_checkpoint(TASK, params, config, 3), (x, y), batch_size=13)
    tiny = config.replace(batch_size=4, grad_memory_bytes=3 * 4 * 67)  # P = 67: 3 examples per micro-batch
    checkpoint = featurize.prepare_checkpoint(TASK, params, tiny, 3)
    assert checkpoint.micro_batch == 3
    split = featurize.featurize(TASK, checkpoint, (x, y), batch_size=5)
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And equal to the dense contract matrix applied to per-example gradients.
    grads, _ = featurize.per_example_grads(TASK, params, (x, y))
    flat = np.concatenate([np.asarray(g).reshape(13, -1) for g in jax.tree_util.tree_leaves(grads)], axis=1)
    r = np.asarray(randomness.projection_matrix("rademacher", 0, 3, 0, flat.shape[1], 24), np.float64)
    np.testing.assert_allclose(whole.features, flat @ r / math.sqrt(flat.shape[1]), rtol=1e-4, atol=1e-5)


def test_non_finite_gradients_are_reported_with_indices_and_checkpoint():
    params = make_params()
    x, y = make_batch(6)
    x[4, 0] = np.nan
    config = Config.create(proj_dim=8, backend="xla")
    checkpoint = featurize.prepare_checkpoint(TASK, params, config, model_id=5)
    with pytest.raises(ValueError, match=r"model_id=5, example indices \[104\]"):
        featurize.featurize_batch(TASK, checkpoint, (x, y), np.arange(100, 106))


def test_out_to_loss_from_autodiff_equals_the_analytic_classification_term():
    params = make_params()
    x, y = make_batch()

    def loss(f, example, state):
        del example, state
        return jnp.log1p(jnp.exp(-f))  # cross-entropy written as a function of the margin

    derived = tasks.from_loss(TASK.output, loss)
    analytic = TASK.out_to_loss(params, (x, y), tasks.TaskState())
    autodiff = derived.out_to_loss(params, (x, y), tasks.TaskState())
    np.testing.assert_allclose(autodiff, analytic, rtol=1e-5, atol=1e-6)
    # The margin is log p / (1 − p):
    logits = apply_fn(params, x)
    p = jax.nn.softmax(logits)[np.arange(len(y)), y]
    margins = jax.vmap(lambda ex: TASK.output(params, ex, tasks.TaskState()))((x, y))
    np.testing.assert_allclose(margins, np.log(p / (1 - p)), rtol=1e-4, atol=1e-5)


def test_labels_outside_the_logit_range_are_rejected():
    params = make_params()
    x, y = make_batch(4)
    y[2] = C
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        TASK.validate(params, (x, y))
