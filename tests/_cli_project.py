"""A user's project for the command-line tests: a model module, .npy data, orbax checkpoints,
and a TOML configuration naming them (tests/test_cli.py, tests/test_reliability.py)."""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_SOURCE = """
import flax.linen as nn

class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))

model = Tiny()
"""


def make_project(root: pathlib.Path) -> pathlib.Path:
    """A user's files in ``root``: a model module, .npy data, three orbax checkpoints (untrained)."""
    import flax.linen as nn

    (root / "cli_tiny_model.py").write_text(MODEL_SOURCE)
    (root / "cli_broken_model.py").write_text("import not_a_module_anywhere\n")
    (root / "cli_exiting_model.py").write_text("import sys\nsys.exit(3)\n")
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.normal(size=(12, 5)).astype(np.float32),
        "train_y": rng.integers(0, 3, 12).astype(np.int32),
        "test_x": rng.normal(size=(3, 5)).astype(np.float32),
        "test_y": rng.integers(0, 3, 3).astype(np.int32),
        "wide_x": rng.normal(size=(12, 6)).astype(np.float32),
        "short_y": rng.integers(0, 3, 11).astype(np.int32),
        "big_y": np.full(3, 7, np.int32),
        "other_x": rng.normal(size=(3, 5)).astype(np.float32),
    }
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array)

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))

    with ocp.StandardCheckpointer() as checkpointer:
        for m in range(3):
            checkpointer.save(root / "ckpt" / str(m), Tiny().init(jax.random.key(m), arrays["train_x"][:1]))
    return root


def write_config(directory: pathlib.Path, project: pathlib.Path, **changes) -> pathlib.Path:
    settings = {
        "model": '"cli_tiny_model:model"',
        "task": '"image_classification"',
        "checkpoints": f'["{project}/ckpt/0", "{project}/ckpt/1"]',
        "output": '"out"',
        "proj_dim": "8",
        "batch_size": "4",
        "python_path": f'["{project}"]',
    }
    data = {"train_inputs": "train_x", "train_labels": "train_y", "target_inputs": "test_x",
            "target_labels": "test_y"}
    for key, value in changes.items():
        if key in data:
            data[key] = value
        else:
            settings[key] = value
    lines = [f"{k} = {v}" for k, v in settings.items()] + ["", "[data]"]
    lines += [f'{k} = "{project}/{v}.npy"' for k, v in data.items()]
    path = directory / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


