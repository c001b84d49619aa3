"""Parity with the reference library (MadryLab trak 0.3.2, CPU torch) on identical weights.

A digits MLP is trained in JAX; its weights are loaded into an equivalent torch module. traker
runs with its no-op projector in float32; trakjax runs ``projection="identity"`` with
``reference_compat=True`` (the reference's 1/mean|A⁻¹| rescaling). Digits has pixels that are 0
in every image, so the identity Gram is singular and both sides get the same absolute λ.
"""

import logging

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import trakjax
from trakjax import tasks

_WHY = ("the reference library (torch, traker) is in the test extra on Python 3.11 only, where "
        "a CPU torch wheel exists")
torch = pytest.importorskip("torch", reason=_WHY)
trak = pytest.importorskip("trak", reason=_WHY)
from trak.projectors import NoOpProjector  # noqa: E402

N_TRAIN, N_TARGET, HIDDEN = 120, 12, 16


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(10)(x)


def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[1000 : 1000 + N_TARGET], y[1000 : 1000 + N_TARGET])


def train_params(seed, train):
    model = MLP()
    params = model.init(jax.random.key(seed), train[0][:1])
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply(p, train[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, train[1]).mean()

        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(60):
        params, state = step(params, state)
    return params


def torch_model(params):
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    p = params["params"]
    with torch.no_grad():
        for layer, name in ((model[0], "Dense_0"), (model[2], "Dense_1")):
            layer.weight.copy_(torch.tensor(np.asarray(p[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(p[name]["bias"])))
    return model


def reference_scores(checkpoints, train, targets, lam, save_dir):
    model = torch_model(checkpoints[0])
    traker = trak.TRAKer(
        model=model, task="image_classification", train_set_size=N_TRAIN, save_dir=str(save_dir),
        device="cpu", projector=NoOpProjector(device="cpu"), use_half_precision=False, lambda_reg=lam,
        logging_level=logging.ERROR,
    )
    x, y = (torch.tensor(a) for a in train)
    y = y.long()
    for model_id, params in enumerate(checkpoints):
        traker.load_checkpoint(torch_model(params).state_dict(), model_id=model_id)
        for start in range(0, N_TRAIN, 40):
            traker.featurize(batch=[x[start : start + 40], y[start : start + 40]], num_samples=40)
    traker.finalize_features()
    tx, ty = (torch.tensor(a) for a in targets)
    for model_id, params in enumerate(checkpoints):
        traker.start_scoring_checkpoint("parity", torch_model(params).state_dict(), model_id, N_TARGET)
        traker.score(batch=[tx, ty.long()], num_samples=N_TARGET)
    return np.asarray(traker.finalize_scores("parity"), np.float64)


@pytest.mark.parametrize("num_checkpoints", [1, 3])
def test_identity_scores_match_traker(num_checkpoints, tmp_path):
    train, targets = digits()
    checkpoints = [train_params(seed, train) for seed in range(num_checkpoints)]
    lam = 1e-2
    expected = reference_scores(checkpoints, train, targets, lam, tmp_path / "trak")
    got = trakjax.attribute(
        tasks.image_classification(MLP().apply), checkpoints, train, targets,
        projection="identity", lambda_reg=lam, reference_compat=True, batch_size=40,
        backend="xla",
    )
    assert got.shape == expected.shape == (N_TRAIN, N_TARGET)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 1e-4, rel
    # Sanity: the comparison is not trivially satisfied.
    assert np.abs(expected).max() > 0
