"""Online attribution: TRAK scores of a probe batch inside a Flax + optax training loop.

An NNX MLP learns sklearn's digits with optax. Every ``refresh_every`` steps the loop refreshes
the train features at the current parameters (``trakjax.train_features``: the jitted featurize
step, then the Gram and its solve); at every step its jitted train step also scores a fixed probe
batch with ``score_fn`` (per-example gradients and projection inside the same jit, no host round
trip) and picks each probe example's top proponents. At a refresh step the features and the
scores come from the same parameters, so the scores equal ``trakjax.attribute`` there; between
refreshes the features lag the parameters by up to ``refresh_every − 1`` steps.

Run ``python examples/online_attribution.py --help``; ``main(...)`` is importable (the test runs
it tiny).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import trakjax
import trakjax.flax


class MLP(nnx.Module):
    """64 pixels -> hidden (ReLU) -> 10 logits."""

    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def digits_split(train_size: int, probe_size: int, seed: int):
    """((x, y) train, (x, y) probe): disjoint random digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    if train_size + probe_size > order.size:
        raise ValueError(
            f"train_size + probe_size must be at most {order.size} (the digits data set), got "
            f"{train_size} + {probe_size}"
        )
    x = (digits.data / 16.0).astype(np.float32)[order]
    y = digits.target.astype(np.int32)[order]
    train = (x[:train_size], y[:train_size])
    probe = (x[train_size : train_size + probe_size], y[train_size : train_size + probe_size])
    return train, probe


def main(
    train_size: int = 512,
    probe_size: int = 8,
    steps: int = 300,
    refresh_every: int = 100,
    batch_size: int = 64,
    proj_dim: int = 256,
    hidden: int = 32,
    learning_rate: float = 0.05,
    top: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train with online attribution; returns what a caller needs to check the scores.

    Returns:
      A dict: ``params`` (final), ``task``, ``train``, ``probe``, ``attribution_kwargs`` (the
      settings of ``train_features``, valid for ``trakjax.attribute``), ``losses`` (per step),
      and ``last_refresh``: ``{"step", "params", "scores" (N, probe_size), "top" (probe_size,
      top)}`` from the last step that refreshed the features, where the features and the
      scored parameters are the same.
    """
    say = log or (lambda message: None)
    train, probe = digits_split(train_size, probe_size, seed)
    model = trakjax.flax.from_nnx(MLP(hidden, nnx.Rngs(seed)))
    task = trakjax.tasks.image_classification(model.apply_fn)
    attribution_kwargs = dict(proj_dim=proj_dim, seed=seed, grad_wrt=model.grad_wrt,
                              batch_size=batch_size)
    optimizer = optax.sgd(learning_rate, momentum=0.9)
    params = model.params
    opt_state = optimizer.init(params["params"])

    def loss_fn(trainable, fixed, x, y):
        logits = model.apply_fn({"params": trainable, "state": fixed}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y, score_fn, probe):
        probe_scores = score_fn(params, probe)  # (N, probe_size), at the pre-update parameters
        top_proponents = jax.lax.top_k(probe_scores.T, top)[1]  # (probe_size, top)
        loss, grads = jax.value_and_grad(loss_fn)(params["params"], params["state"], x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params["params"])
        params = {"params": optax.apply_updates(params["params"], updates), "state": params["state"]}
        return params, opt_state, loss, probe_scores, top_proponents

    rng = np.random.default_rng(seed + 1)
    losses = []
    last_refresh = None
    score_fn = None
    for step in range(steps):
        refresh = step % refresh_every == 0
        if refresh:
            features = trakjax.train_features(task, [params], train, **attribution_kwargs)
            score_fn = trakjax.scorer(task, features)
        batch = rng.choice(train_size, size=min(batch_size, train_size), replace=False)
        scored_params = params
        params, opt_state, loss, probe_scores, top_proponents = train_step(
            params, opt_state, train[0][batch], train[1][batch], score_fn, probe
        )
        losses.append(float(loss))
        if refresh:
            last_refresh = {"step": step, "params": scored_params,
                            "scores": np.asarray(probe_scores), "top": np.asarray(top_proponents)}
            say(f"step {step:4d}  loss {losses[-1]:.3f}  (train features refreshed)")
            for j, row in enumerate(np.asarray(top_proponents)[: min(probe_size, 4)]):
                labels = ", ".join(f"#{i} ({train[1][i]})" for i in row)
                say(f"    probe {j} (label {probe[1][j]}): top proponents {labels}")
    say(f"step {steps - 1:4d}  loss {losses[-1]:.3f}")
    return {
        "params": params, "task": task, "train": train, "probe": probe,
        "attribution_kwargs": attribution_kwargs, "losses": losses, "last_refresh": last_refresh,
    }


def _arguments() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("train_size", 512), ("probe_size", 8), ("steps", 300),
                          ("refresh_every", 100), ("batch_size", 64), ("proj_dim", 256),
                          ("hidden", 32), ("top", 3), ("seed", 0)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    return vars(parser.parse_args())


if __name__ == "__main__":
    main(**_arguments())
