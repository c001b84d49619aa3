"""trakjax.flax: NNX and linen models with held-fixed state (batch statistics, RNG state).

Gradients through the adapters are checked against Flax's own differentiation (``nnx.grad`` on
the stateful module, ``jax.grad`` of ``module.apply`` over the params collection alone), and
attribution through them against the float64 closed form of ``task_helpers``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from task_helpers import (
    closed_form_scores,
    kernel_scores,
    projected,
    relative_error,
    relative_lambda,
    train_and_target_grads,
)

import trakjax
import trakjax.flax
from trakjax import featurize, tasks
from trakjax.tasks import TaskState

SEED = 2
K = 16


def data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)


def margins(logits, labels):
    return jax.vmap(tasks.classification_margin)(logits, labels)


# --------------------------------------------------------------------------- linen


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x))
        return nn.Dense(3)(nn.relu(x))


def test_linen_holds_batch_stats_fixed_and_differentiates_params():
    module = LinenNet()
    train, targets = data(20, 0), data(4, 1)
    variables = jax.jit(module.init)(jax.random.key(0), train[0])
    rng = np.random.default_rng(0)
    stats = {"BatchNorm_0": {"mean": rng.normal(size=6).astype(np.float32),
                             "var": rng.uniform(0.5, 2.0, size=6).astype(np.float32)}}
    variables = {"params": variables["params"], "batch_stats": stats}
    model = trakjax.flax.from_linen(module, variables, train=False)
    assert model.grad_wrt == ["params"]
    paths = featurize.parameter_paths(model.params)
    mask = featurize.select_parameters(model.params, model.grad_wrt)
    assert [p for p, m in zip(paths, mask, strict=True) if not m] == [
        "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"]

    def params_only(p, batch):  # batch_stats closed over: flax's own apply, no adapter
        logits = module.apply({"params": p, "batch_stats": stats}, batch[0], train=False)
        return margins(logits, batch[1])

    task = tasks.image_classification(model.apply_fn)
    q = np.asarray(jax.jit(task.out_to_loss)(model.params, train, TaskState()), np.float64)
    expected, lam = closed_form_scores(
        *train_and_target_grads(params_only, variables["params"], train, targets), q,
        proj_dim=K, seed=SEED, model_id=0,
    )
    got = trakjax.attribute(
        task, [model.params], train, targets, proj_dim=K, seed=SEED, lambda_reg=lam,
        grad_wrt=model.grad_wrt, backend="xla", kernel="trak", projection="rademacher",
    )
    assert relative_error(got, expected) < 1e-4

    with pytest.raises(ValueError, match=r"differentiate=\['weights'\] names collections not in variables"):
        trakjax.flax.from_linen(module, variables, differentiate=["weights"])


# --------------------------------------------------------------------------- NNX


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 6, rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.norm(self.hidden(x)))))


def nnx_net(seed):
    net = NNXNet(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    net.norm.mean[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    net.norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=6), jnp.float32)
    return net


def test_nnx_gradients_match_nnx_grad_and_the_module_is_left_in_train_mode():
    net = nnx_net(0)
    model = trakjax.flax.from_nnx(net)
    x, y = data(3, 2)
    assert net.norm.use_running_average is False and net.drop.deterministic is False
    evaluated = nnx.clone(net)
    evaluated.eval()
    np.testing.assert_allclose(jax.jit(model.apply_fn)(model.params, x), evaluated(x), rtol=1e-6)
    assert sorted(model.params) == ["params", "state"]
    assert "mean" in model.params["state"]["norm"]  # batch statistics are held fixed

    task = tasks.image_classification(model.apply_fn)
    grads, _ = jax.jit(
        lambda p, b: trakjax.per_example_grads(task, p, b, grad_wrt=model.grad_wrt)
    )(model.params, (x, y))
    assert all(leaf is None for leaf in jax.tree_util.tree_leaves(
        grads["state"], is_leaf=lambda v: v is None))
    for i in range(2):
        expected = nnx.grad(
            lambda m, i=i: tasks.classification_margin(m(x[i : i + 1])[0], y[i])
        )(evaluated)
        expected = nnx.to_pure_dict(expected)
        for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
            got = grads["params"]
            for key in path:
                got = got[key.key]
            np.testing.assert_allclose(got[i], leaf, rtol=1e-5, atol=1e-6)


def test_nnx_checkpoints_end_to_end():
    nets = [nnx_net(1), nnx_net(2)]
    model = trakjax.flax.from_nnx(nets[0])
    checkpoints = [model.params, trakjax.flax.nnx_params(nets[1])]
    assert jax.tree_util.tree_structure(checkpoints[0]) == jax.tree_util.tree_structure(checkpoints[1])
    train, targets = data(20, 3), data(4, 4)
    task = tasks.image_classification(model.apply_fn)

    def outputs(p, state, batch):
        return margins(model.apply_fn({"params": p, "state": state}, batch[0]), batch[1])

    phis, psis, qs = [], [], []
    for m, params in enumerate(checkpoints):
        qs.append(np.asarray(jax.jit(task.out_to_loss)(params, train, TaskState()), np.float64))
        g_train, g_targets = train_and_target_grads(
            lambda p, b, s=params["state"]: outputs(p, s, b), params["params"], train, targets
        )
        phis.append(projected(g_train, K, SEED, m))
        psis.append(projected(g_targets, K, SEED, m))
    lam = relative_lambda(phis, K)
    kernel = np.mean([kernel_scores(phi, psi, lam) for phi, psi in zip(phis, psis, strict=True)], axis=0)
    expected = kernel * np.mean(qs, axis=0)[:, None]
    got = trakjax.attribute(
        task, checkpoints, train, targets, proj_dim=K, seed=SEED, lambda_reg=lam,
        grad_wrt=model.grad_wrt, backend="xla", kernel="trak", projection="rademacher",
    )
    assert relative_error(got, expected) < 1e-4
