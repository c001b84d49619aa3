"""A tiny model, data and tasks for tests/test_reliability3.py, importable by child processes
(the fingerprint's two-process test and the read-only and file-size children)."""

import json
import sys

import numpy as np

N, T, D, C = 12, 3, 5, 3
PROJ_DIM = 8


def data():
    rng = np.random.default_rng(0)
    train = (rng.normal(size=(N, D)).astype(np.float32), rng.integers(0, C, N).astype(np.int32))
    targets = (rng.normal(size=(T, D)).astype(np.float32), rng.integers(0, C, T).astype(np.int32))
    return train, targets


def model(activation: str = "tanh"):
    import flax.linen as nn

    act = getattr(nn, activation)

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(C)(act(nn.Dense(4)(x)))

    return Tiny()


def checkpoints(count: int = 2):
    import jax

    x = data()[0][0]
    return [jax.device_get(model().init(jax.random.key(m), x[:1])) for m in range(count)]


def task(activation: str = "tanh", *, squared: bool = False, offset=None):
    """image_classification over the tiny model; ``squared`` squares the output, ``offset``
    (an array of C values) is closed over and added to the logits."""
    from trakjax import tasks

    net = model(activation)

    def apply_fn(params, x):
        logits = net.apply(params, x)
        return logits if offset is None else logits + offset

    base = tasks.image_classification(apply_fn)
    if not squared:
        return base
    return base._replace(output=lambda p, z, s: base.output(p, z, s) ** 2)


def fingerprint() -> str:
    from trakjax.task_fingerprint import task_fingerprint

    params = checkpoints(1)[0]
    train, _ = data()
    example = (train[0][0], train[1][0])
    return task_fingerprint(task(offset=np.arange(C, dtype=np.float32)), params, example)


def run_store(save_dir, experiment: str = "targets"):
    """TRAKer.run over the tiny model into ``save_dir``; the scores as a float64 array."""
    import trakjax

    train, targets = data()
    traker = trakjax.TRAKer(task(), N, save_dir, proj_dim=PROJ_DIM, lambda_reg=0.1)
    return np.array(traker.run(checkpoints(), train, targets, experiment), np.float64)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "fingerprint":
        print(json.dumps(fingerprint()))
    elif command == "run":
        scores = run_store(sys.argv[2], *sys.argv[3:])
        print(json.dumps(scores.tolist()))
