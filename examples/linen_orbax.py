"""A Flax linen MLP with batch norm, end to end through orbax and ``trakjax attribute --config``.

What a user with their own model does: train (optax; ``batch_stats`` updated in training and held
fixed in attribution), save each checkpoint with orbax, save the data as ``.npy`` files, describe
the run in a TOML file, and run ``trakjax attribute --config`` on it: featurize and score through
a resumable store, then a top-k CSV/JSON and a picture. ``trakjax show OUT/run`` redraws them.

    python examples/linen_orbax.py --out linen-orbax    # under a minute on a 2-core CPU
    python examples/linen_orbax.py --help               # sizes (tiny ones for a quick check)

The TOML it writes (``OUT/run.toml``) names this file's ``MLP`` as the model: any importable
``module:attribute`` works, with ``python_path`` listing where to import it from.
``main(...)`` is importable; the test runs it tiny.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


class MLP(nn.Module):
    """64 pixels → Dense(hidden) → BatchNorm → ReLU → 10 logits."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


def train_mlp(seed: int, hidden: int, train, steps: int, batch_size: int, learning_rate: float) -> dict:
    """Minibatch Adam on the cross-entropy; returns the variables ``{"params", "batch_stats"}``."""
    model = MLP(hidden)
    variables = model.init(jax.random.key(seed), train[0][:1])
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state

    rng = np.random.default_rng(seed)
    n = train[1].shape[0]
    for _ in range(steps):
        batch = rng.choice(n, size=min(batch_size, n), replace=False)
        params, batch_stats, opt_state = step(params, batch_stats, opt_state, train[0][batch], train[1][batch])
    return {"params": params, "batch_stats": batch_stats}


def write_config(path: Path, *, hidden: int, checkpoints: list[str], proj_dim: int,
                 batch_size: int) -> None:
    """The TOML run configuration of ``trakjax attribute`` (paths relative to its directory)."""
    listed = ", ".join(json.dumps(c) for c in checkpoints)
    path.write_text(f"""\
# trakjax attribute --config {path.name}
model = "linen_orbax:MLP"             # module:attribute; called with model_kwargs
model_kwargs = {{hidden = {hidden}}}
python_path = [{json.dumps(str(HERE))}]
apply_kwargs = {{train = false}}        # batch norm reads batch_stats (held fixed)
task = "image_classification"
checkpoints = [{listed}]
output = "run"
proj_dim = {proj_dim}
batch_size = {batch_size}
top_k = 10

[data]
train_inputs = "data/train_x.npy"
train_labels = "data/train_y.npy"
target_inputs = "data/test_x.npy"
target_labels = "data/test_y.npy"
""")


def main(
    out: str | Path = "linen-orbax",
    checkpoints: int = 4,
    train_size: int = 1000,
    num_targets: int = 50,
    hidden: int = 32,
    steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 0.01,
    proj_dim: int = 512,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train, save with orbax, write data and config, run ``trakjax attribute --config``.

    Returns:
      ``{"config": path, "exit_code": int, "run": OUT/run, "checkpoints": [variables, ...],
      "train": …, "targets": …}``.
    """
    from trakjax import cli

    out = Path(out).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(y.size)[: train_size + num_targets]
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    train, targets = (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])
    for name, array in (("train_x", train[0]), ("train_y", train[1]), ("test_x", targets[0]),
                        ("test_y", targets[1])):
        np.save(out / "data" / f"{name}.npy", array)
    saved, paths = [], []
    with ocp.StandardCheckpointer() as checkpointer:
        for seed in range(checkpoints):
            variables = train_mlp(seed, hidden, train, steps, batch_size, learning_rate)
            path = out / "checkpoints" / str(seed)
            if not path.exists():  # orbax refuses to overwrite; a rerun resumes instead
                checkpointer.save(path, variables)
            saved.append(variables)
            paths.append(f"checkpoints/{seed}")
        checkpointer.wait_until_finished()
    config = out / "run.toml"
    write_config(config, hidden=hidden, checkpoints=paths, proj_dim=proj_dim, batch_size=batch_size)
    code = cli.main(["attribute", "--config", str(config)] + (["--quiet"] if quiet else []))
    return {"config": config, "exit_code": code, "run": out / "run", "checkpoints": saved,
            "train": train, "targets": targets}


def _arguments() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="linen-orbax")
    for name, default in (("checkpoints", 4), ("train_size", 1000), ("num_targets", 50),
                          ("hidden", 32), ("steps", 400), ("batch_size", 64), ("proj_dim", 512)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--quiet", action="store_true")
    return vars(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main(**_arguments())["exit_code"])
