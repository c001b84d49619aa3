"""The ``trakjax`` command line: ``trakjax demo`` attributes digits predictions to training images."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import flax.linen as nn
    import jax
    import numpy as np
    import optax
    from sklearn.datasets import load_digits

    import trakjax
    from trakjax import tasks

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32)
    labels = labels.astype(np.int32)
    train = (images[:1000], labels[:1000])
    targets = (images[1000:1008], labels[1000:1008])
    model = MLP()
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply(p, train[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, train[1]).mean()

        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    checkpoints = []
    for seed in range(args.checkpoints):
        params = model.init(jax.random.key(seed), train[0][:1])
        state = optimizer.init(params)
        for _ in range(200):
            params, state = step(params, state)
        checkpoints.append(params)
    print(f"trained {args.checkpoints} MLPs on 1000 digits in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    scores = trakjax.attribute(
        tasks.image_classification(model.apply), checkpoints, train, targets,
        proj_dim=args.proj_dim, progress=not args.quiet,
    )
    print(f"attributed {targets[0].shape[0]} test digits in {time.perf_counter() - start:.1f} s")
    for j in range(targets[0].shape[0]):
        top = np.argsort(-scores[:, j])[:5]
        described = ", ".join(f"#{i} (label {train[1][i]}, {scores[i, j]:.3g})" for i in top)
        print(f"test digit {j} (label {targets[1][j]}): top proponents {described}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trakjax", description="TRAK data attribution for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="attribute digits predictions to training images")
    demo.add_argument("--checkpoints", type=int, default=3)
    demo.add_argument("--proj-dim", type=int, default=512)
    demo.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
