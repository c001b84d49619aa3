"""examples/nnx_cnn.py and examples/linen_orbax.py, run tiny, end to end."""

import importlib.util
import json
import pathlib
import sys

import flax.linen  # noqa: F401  (imported before the examples, as their users would)
import jax
import matplotlib.image
import numpy as np
import orbax.checkpoint as ocp

import trakjax
import trakjax.flax
from trakjax import cli, report

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # linen's dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_nnx_cnn_example_attributes_and_draws(tmp_path):
    example = load_example("nnx_cnn")
    lines = []
    result = example.main(out=tmp_path, checkpoints=2, train_size=40, num_targets=8, channels=2,
                          steps=10, batch_size=16, proj_dim=16, log=lines.append)
    scores = result["scores"]
    assert scores.shape == (40, 8) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert any("top proponents" in line for line in lines)
    top = result["top"]
    np.testing.assert_array_equal(top.proponents[0], scores.argmax(axis=0))
    np.testing.assert_array_equal(top.opponents[0], scores.argmin(axis=0))
    assert matplotlib.image.imread(result["picture"]).shape[:2] == report.figure_pixels(8, 5)
    # Only nnx.Param variables are differentiated: the conv kernel, biases and the head.
    assert result["grad_wrt"] == [trakjax.flax.PARAMS]


def test_linen_orbax_example_runs_the_cli_and_resumes(tmp_path):
    example = load_example("linen_orbax")
    result = example.main(out=tmp_path, checkpoints=2, train_size=40, num_targets=8, hidden=4,
                          steps=5, batch_size=16, proj_dim=16, quiet=True)
    assert result["exit_code"] == 0
    run = result["run"]
    stored = np.load(run / "store" / "experiments" / "targets" / "scores.npy")
    # The CLI's scores are trakjax.attribute's, with batch_stats held fixed.
    with ocp.StandardCheckpointer() as checkpointer:
        restored = [checkpointer.restore(tmp_path / "checkpoints" / str(m)) for m in range(2)]
    for saved, loaded in zip(result["checkpoints"], restored, strict=True):
        assert set(loaded) == {"params", "batch_stats"}
        jax.tree_util.tree_map(np.testing.assert_array_equal, saved, loaded)
    adapted = trakjax.flax.from_linen(example.MLP(4), restored[0], train=False)
    task = trakjax.tasks.image_classification(adapted.apply_fn)
    expected = trakjax.attribute(task, restored, result["train"], result["targets"], proj_dim=16,
                                 batch_size=16, grad_wrt=adapted.grad_wrt)
    assert np.linalg.norm(stored - expected) / np.linalg.norm(expected) < 1e-5
    assert matplotlib.image.imread(run / "attributions.png").shape[:2] == report.figure_pixels(8, 5)
    assert json.loads((run / "run.json").read_text())["complete"] is True
    # Rerunning the example resumes: the same scores, bit for bit.
    again = example.main(out=tmp_path, checkpoints=2, train_size=40, num_targets=8, hidden=4,
                         steps=5, batch_size=16, proj_dim=16, quiet=True)
    assert again["exit_code"] == 0
    np.testing.assert_array_equal(np.load(run / "store" / "experiments" / "targets" / "scores.npy"), stored)
    assert cli.main(["show", str(run), "--quiet"]) == 0
