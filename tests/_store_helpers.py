"""Shared set-up for the store and session tests: a tiny digits MLP, orbax checkpoints, a run.

Used in-process by tests/test_session.py and in subprocesses by tests/_session_worker.py, so that
both compute with the same shapes (one compiled shape per step, bit-identical results).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

N_TRAIN = 256
N_TARGETS = 32
PROJ_DIM = 32
BATCH = 32
SEED = 5
NUM_MODELS = 2
EXPERIMENT = "digits"
SESSION_KW = dict(proj_dim=PROJ_DIM, seed=SEED, batch_size=BATCH, backend="xla", projection="rademacher")


def configure_jax_cache() -> None:
    """The persistent compilation cache of tests/conftest.py, for subprocesses."""
    import jax

    cache = pathlib.Path(
        os.environ.get("TRAKJAX_TEST_JAX_CACHE", pathlib.Path.home() / ".cache" / "trakjax-test-jax")
    )
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


DIGITS_ENV = "TRAKJAX_TEST_DIGITS"
"""An .npz of the digits (images, labels) written by the parent test: workers skip importing sklearn."""


def save_digits(path) -> str:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    np.savez(path, images=images, labels=labels)
    return str(path)


def digits():
    """(train, targets): ((256, 64) float32 images, (256,) int32 labels) and 32 targets."""
    if os.environ.get(DIGITS_ENV):
        with np.load(os.environ[DIGITS_ENV]) as f:
            images, labels = f["images"], f["labels"]
    else:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32)
    labels = labels.astype(np.int32)
    train = (images[:N_TRAIN], labels[:N_TRAIN])
    targets = (images[N_TRAIN : N_TRAIN + N_TARGETS], labels[N_TRAIN : N_TRAIN + N_TARGETS])
    return train, targets


def model():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))

    return MLP()


def task():
    from trakjax import tasks

    return tasks.image_classification(model().apply)


def train_checkpoints(num_models: int = NUM_MODELS, steps: int = 30):
    """``num_models`` MLPs trained for ``steps`` full-batch Adam steps (optax), seeds 0, 1, ..."""
    import jax
    import optax

    (x, y), _ = digits()
    net = model()
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y).mean()

        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    checkpoints = []
    for seed in range(num_models):
        params = net.init(jax.random.key(seed), x[:1])
        state = optimizer.init(params)
        for _ in range(steps):
            params, state = step(params, state)
        checkpoints.append(jax.device_get(params))
    return checkpoints


def save_orbax(params, path) -> str:
    """Save ``params`` with orbax's StandardCheckpointer; returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()
    return path


def run_session(save_dir, checkpoints, *, batch=BATCH, train_rows=None, models=None, plan=None,
                phases=("featurize", "finalize", "score", "scores"), **kw):
    """The reference-style sequence of TRAKer calls over the digits set-up.

    Args:
      save_dir: the store.
      checkpoints: one params pytree or orbax path per model_id.
      batch: examples per featurize/score call (the last call of a range may be smaller).
      train_rows: (start, stop) of the training rows to featurize (default all).
      models: which model_ids to featurize/score (default all).
      plan: featurize these [model_id, start, stop] ranges instead of train_rows × models.
      phases: which of featurize, finalize, score, scores to run.
      kw: TRAKer arguments overriding SESSION_KW.

    Returns:
      The scores (a copy) when "scores" ran, else None.
    """
    import trakjax

    train, targets = digits()
    options = dict(SESSION_KW, **kw)
    traker = trakjax.TRAKer(task(), N_TRAIN, save_dir, **options)
    models = range(len(checkpoints)) if models is None else models
    if plan is None:
        plan = [(model_id, *(train_rows or (0, N_TRAIN))) for model_id in models]
    if "featurize" in phases:
        for model_id, start, stop in plan:
            traker.load_checkpoint(checkpoints[model_id], model_id)
            for s in range(start, stop, batch):
                e = min(s + batch, stop)
                traker.featurize((train[0][s:e], train[1][s:e]), inds=np.arange(s, e))
    if "finalize" in phases:
        traker.finalize_features()
    if "score" in phases:
        for model_id in models:
            traker.start_scoring_checkpoint(EXPERIMENT, checkpoints[model_id], model_id, N_TARGETS)
            for s in range(0, N_TARGETS, batch):
                e = min(s + batch, N_TARGETS)
                traker.score((targets[0][s:e], targets[1][s:e]), num_samples=e - s)
    if "scores" in phases:
        return np.array(traker.finalize_scores(EXPERIMENT))
    return None


def store_snapshot(root) -> dict:
    """{relative path: bytes} of every file in a store (lock files included)."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
