"""A Flax NNX convolutional network on digits, end to end: train, attribute, draw.

Several CNNs (one seed each) learn sklearn's 8×8 digits with optax; ``trakjax.flax.from_nnx``
turns each into a parameter pytree and an ``apply_fn``; ``trakjax.attribute`` scores every
training image on every test image; the strongest proponents and opponents of a few test images
are printed and drawn to ``OUT/attributions.png``.

    python examples/nnx_cnn.py --out nnx-cnn            # about a minute on a 2-core CPU
    python examples/nnx_cnn.py --help                   # sizes (tiny ones for a quick check)

``main(...)`` is importable; the test runs it tiny.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import trakjax
import trakjax.flax
from trakjax import report


class CNN(nnx.Module):
    """(B, 8, 8, 1) images → conv 3×3 (``channels``) → ReLU → 2×2 average pool → 10 logits."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, channels, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(16 * channels, 10, rngs=rngs)

    def __call__(self, images):
        x = jax.nn.relu(self.conv(images))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def digits(train_size: int, num_targets: int, seed: int = 0):
    """((images, labels) train, (images, labels) targets): images (n, 8, 8, 1) in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(y.size)[: train_size + num_targets]
    images = (x[order] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    labels = y[order].astype(np.int32)
    return (images[:train_size], labels[:train_size]), (images[train_size:], labels[train_size:])


def train_cnn(seed: int, channels: int, train, steps: int, batch_size: int, learning_rate: float):
    """Train one CNN with minibatch Adam; returns its :class:`trakjax.flax.FlaxModel`."""
    model = trakjax.flax.from_nnx(CNN(channels, nnx.Rngs(seed)))
    optimizer = optax.adam(learning_rate)
    trainable, fixed = model.params["params"], model.params["state"]

    @jax.jit
    def step(trainable, opt_state, x, y):
        def loss(p):
            logits = model.apply_fn({"params": p, "state": fixed}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    opt_state = optimizer.init(trainable)
    rng = np.random.default_rng(seed)
    n = train[1].shape[0]
    for _ in range(steps):
        batch = rng.choice(n, size=min(batch_size, n), replace=False)
        trainable, opt_state = step(trainable, opt_state, train[0][batch], train[1][batch])
    return model._replace(params={"params": trainable, "state": fixed})


def main(
    out: str | Path = "nnx-cnn",
    checkpoints: int = 4,
    train_size: int = 1000,
    num_targets: int = 50,
    channels: int = 8,
    steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 0.01,
    proj_dim: int = 512,
    log=print,
) -> dict[str, Any]:
    """Train ``checkpoints`` CNNs, attribute the targets, print and draw the top-k.

    Returns:
      ``{"scores": (N, T), "accuracy": float, "picture": path, "top": TopK, "models": [...],
      "train": …, "targets": …, "grad_wrt": …}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, targets = digits(train_size, num_targets)
    models = [train_cnn(seed, channels, train, steps, batch_size, learning_rate)
              for seed in range(checkpoints)]
    apply_fn = models[0].apply_fn  # one graphdef serves every checkpoint of this architecture
    logits = jnp.mean(jnp.stack([apply_fn(m.params, targets[0]) for m in models]), axis=0)
    predictions = np.asarray(logits.argmax(-1))
    accuracy = float((predictions == targets[1]).mean())
    log(f"{checkpoints} CNNs trained; ensemble test accuracy {accuracy:.3f}")

    task = trakjax.tasks.image_classification(apply_fn)
    scores = trakjax.attribute(
        task, [m.params for m in models], train, targets, proj_dim=proj_dim,
        grad_wrt=models[0].grad_wrt,  # ["params"]: nnx.Param variables only
    )
    top = trakjax.scores.top_k([(0, scores)], 5)
    for j in range(min(3, num_targets)):
        best = ", ".join(f"#{i} (label {train[1][i]})" for i in top.proponents[:3, j])
        log(f"test image {j} (label {targets[1][j]}): top proponents {best}")
    picture = out / report.PICTURE_FILE
    report.attribution_figure(
        picture, top, train[0][..., 0], targets[0][..., 0], train_labels=train[1],
        target_labels=targets[1], predictions=predictions, columns=range(min(8, num_targets)),
        title=f"NNX CNN, {checkpoints} checkpoints, k={proj_dim}",
    )
    log(f"picture: {picture}")
    return {"scores": scores, "accuracy": accuracy, "picture": picture, "top": top,
            "models": models, "train": train, "targets": targets, "grad_wrt": models[0].grad_wrt}


def _arguments() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="nnx-cnn")
    for name, default in (("checkpoints", 4), ("train_size", 1000), ("num_targets", 50),
                          ("channels", 8), ("steps", 400), ("batch_size", 64), ("proj_dim", 512)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    return vars(parser.parse_args())


if __name__ == "__main__":
    main(**_arguments())
