"""The ``trakjax`` command line: the demo end to end (tiny), ``show``, and bad input.

The commands run in-process through ``trakjax.cli.main(argv)`` (the conftest's compilation cache
applies); one test runs ``python -m trakjax`` in a subprocess for the real exit code and stderr.
Scores written by the CLI are checked against ``trakjax.attribute`` on the same checkpoints.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import orbax.checkpoint as ocp
import pytest

import trakjax
from trakjax import cli, demo, report

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _cli_project import make_project, write_config  # noqa: E402

TINY_DEMO = ["--checkpoints", "2", "--proj-dim", "32", "--train-size", "60", "--targets", "8",
             "--hidden", "8", "--steps", "30", "--batch-size", "30", "--top-k", "5",
             "--lds-subsets", "4"]


def restore(path):
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.tree_util.tree_map(np.asarray, checkpointer.restore(path))


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"trakjax {command}: error"), lines[0]
    return lines[0]


def test_demo_end_to_end_tiny_then_show_redraws_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *TINY_DEMO]) == 0
    captured = capsys.readouterr()
    for bar in ("train", "featurize", "finalize", "score", "LDS retrain"):
        assert bar in captured.err, f"no {bar!r} progress bar"
    assert "test accuracy" in captured.out and "LDS" in captured.out and "time per stage" in captured.out

    # The picture: 8 targets × (target + 5 proponents + 5 opponents), at its documented size.
    picture = out / "attributions.png"
    image = matplotlib.image.imread(picture)
    assert image.shape[:2] == (60 + 8 * 150, 11 * 120 + 2 * 40) == report.figure_pixels(8, 5)
    assert image[..., :3].std() > 0.05  # not blank

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) == {"data", "train", "save", "featurize", "finalize", "score",
                                       "report", "lds"}
    # The store's scores are trakjax.attribute's on the orbax checkpoints the demo saved.
    settings = demo.DemoSettings(checkpoints=2, proj_dim=32, train_size=60, num_targets=8, hidden=8,
                                 steps=30, batch_size=30, top_k=5, lds_subsets=4)
    train, targets = demo.digits_split(60, 8, settings.seed)
    np.testing.assert_array_equal(np.load(out / "data" / "train_inputs.npy"), train[0])
    checkpoints = [restore(out / "checkpoints" / str(m)) for m in range(2)]
    model = demo.digits_mlp(8)
    task = trakjax.tasks.image_classification(model.apply)
    expected = trakjax.attribute(task, checkpoints, train, targets, proj_dim=32, batch_size=30)
    stored = np.load(out / "store" / "experiments" / demo.EXPERIMENT / "scores.npy")

    # The summary reports these checkpoints' accuracy and the LDS of these scores.
    logits = np.stack([np.asarray(model.apply(p, targets[0])) for p in checkpoints])
    per_model = (logits.argmax(-1) == targets[1]).mean(axis=1)
    assert summary["accuracy"]["models"] == per_model.tolist()
    assert summary["accuracy"]["ensemble"] == float((logits.mean(0).argmax(-1) == targets[1]).mean())
    import optax

    lds = demo.lds_stage(model, optax.adam(settings.learning_rate), settings, train, targets, stored, True)
    assert summary["lds"] == json.loads(json.dumps(lds)) and summary["lds"]["subsets"] == 4
    assert stored.shape == (60, 8)
    assert np.linalg.norm(stored - expected) / np.linalg.norm(expected) < 1e-5

    # The top-k table agrees with the scores.
    table = json.loads((out / "topk.json").read_text())
    assert table["k"] == 5 and len(table["targets"]) == 8
    for record in table["targets"]:
        j = record["target"]
        assert [e["train_index"] for e in record["proponents"]] == list(np.argsort(-stored[:, j], kind="stable")[:5])
        assert record["label"] == int(targets[1][j])
    csv_rows = (out / "topk.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 8 * 2 * 5

    # show: redraws both from the store alone.
    before = (out / "topk.csv").read_text()
    (out / "topk.csv").unlink()
    picture.unlink()
    page = (out / "index.html").read_text()
    (out / "index.html").unlink()
    assert cli.main(["show", str(out), "--quiet"]) == 0
    assert (out / "topk.csv").read_text() == before
    assert (out / "index.html").read_text() == page  # the explorer, with the demo's summary
    assert matplotlib.image.imread(picture).shape[:2] == report.figure_pixels(8, 5)

    # A second demo into the same directory replaces the first; a foreign directory is refused.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(foreign), *TINY_DEMO]) == 2
    assert "holds no earlier trakjax demo" in one_error_line(capsys.readouterr().err, "demo")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- attribute --config

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's files: a model module, .npy data, orbax checkpoints (untrained)."""
    return make_project(tmp_path_factory.mktemp("project"))


BAD_INPUTS = {
    "missing data file": ({"train_labels": "nowhere"}, "names files that do not exist: data.train_labels"),
    "missing checkpoint": ({"checkpoints": '["ckpt/9"]'}, "names files that do not exist: checkpoints[0]"),
    "module not found": ({"model": '"no_such_module_xyz:model"'}, "cannot import module 'no_such_module_xyz'"),
    "module failing to import": ({"model": '"cli_broken_model:model"'}, "ModuleNotFoundError"),
    "no such attribute": ({"model": '"cli_tiny_model:nothing"'}, "has no attribute 'nothing'"),
    "inputs too wide for the model": ({"train_inputs": "wide_x"}, "data.train_inputs of shape (12, 6) do not fit the model"),
    "labels of another length": ({"train_labels": "short_y"}, "disagree on the number of examples"),
    "labels out of range": ({"target_labels": "big_y"}, "labels must be in [0, 3)"),
    "output under a file": ({"output": '"a_file/out"'}, "is not writable"),
    "invalid toml": ({"proj_dim": "= 8"}, "is not valid TOML"),
    "unknown key": ({"projdim": "8"}, "unknown keys ['projdim']"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_attribute_rejects_bad_input_with_one_line_and_exit_2_creating_nothing(case, project, tmp_path, capsys):
    changes, message = BAD_INPUTS[case]
    (tmp_path / "a_file").write_text("")
    config = write_config(tmp_path, project, **changes)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["attribute", "--config", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err, "attribute")
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_attribute_rejects_a_read_only_output_directory(project, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        config = write_config(tmp_path, project, output=f'"{locked}/out"')
        assert cli.main(["attribute", "--config", str(config)]) == 2
        assert "is not writable" in one_error_line(capsys.readouterr().err, "attribute")
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o755)


def test_attribute_runs_resumes_and_matches_attribute(project, tmp_path, capsys):
    config = write_config(tmp_path, project, top_k="4")
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "featurize" not in captured.err  # --quiet: no progress bars
    scores_path = tmp_path / "out" / "store" / "experiments" / "targets" / "scores.npy"
    first = np.load(scores_path)
    checkpoints = [restore(project / "ckpt" / str(m)) for m in range(2)]
    train = (np.load(project / "train_x.npy"), np.load(project / "train_y.npy"))
    targets = (np.load(project / "test_x.npy"), np.load(project / "test_y.npy"))
    sys.path.insert(0, str(project))
    try:
        import cli_tiny_model
    finally:
        sys.path.remove(str(project))
    task = trakjax.tasks.image_classification(cli_tiny_model.model.apply)
    expected = trakjax.attribute(task, checkpoints, train, targets, proj_dim=8, batch_size=4,
                                 grad_wrt=["params"])
    assert np.linalg.norm(first - expected) / np.linalg.norm(expected) < 1e-5
    table = json.loads((tmp_path / "out" / "topk.json").read_text())
    assert len(table["targets"]) == 3 and len(table["targets"][0]["opponents"]) == 4
    assert not (tmp_path / "out" / "attributions.png").exists()  # (12, 5) inputs are no images
    page = (tmp_path / "out" / "index.html").read_text()
    assert '"kind":"table"' in page and '"settings.proj_dim","8"' in page
    # Rerun: everything is done already, the scores stay bit-identical.
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(scores_path), first)
    # Another configuration into the same store is refused with the differing field.
    other = write_config(tmp_path, project, proj_dim="16")
    capsys.readouterr()
    assert cli.main(["attribute", "--config", str(other), "--quiet"]) == 2
    assert "proj_dim" in one_error_line(capsys.readouterr().err, "attribute")


def test_python_dash_m_trakjax_exits_2_with_one_line(tmp_path):
    cache = os.environ.get("TRAKJAX_TEST_JAX_CACHE", pathlib.Path.home() / ".cache" / "trakjax-test-jax")
    env = dict(os.environ, TRAKJAX_JAX_CACHE=str(cache))  # the conftest's cache, for the CLI
    result = subprocess.run(
        [sys.executable, "-m", "trakjax", "attribute", "--config", str(tmp_path / "missing.toml")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in one_error_line(result.stderr, "attribute")
    result = subprocess.run([sys.executable, "-m", "trakjax", "demo", "--checkpoints", "many"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "invalid int value" in one_error_line(result.stderr, "demo")


NNX_SOURCE = """
import jax
from flax import nnx

class Net(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.0, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.tanh(self.norm(self.hidden(x))))

def make(seed=0):
    return Net(nnx.Rngs(seed))
"""


def test_attribute_with_an_nnx_model_holds_batch_stats_fixed(project, tmp_path, capsys):
    from flax import nnx

    import trakjax.flax

    (tmp_path / "cli_nnx_model.py").write_text(NNX_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_nnx_model
    finally:
        sys.path.remove(str(tmp_path))
    models = []
    with ocp.StandardCheckpointer() as checkpointer:
        for m in range(2):
            model = cli_nnx_model.make(seed=10 + m)
            model.train()  # one step in training mode: batch stats of some data, not the init's
            model(np.random.default_rng(m).normal(2.0, 3.0, size=(16, 5)).astype(np.float32))
            model.eval()
            # one checkpoint as nnx.state (the Flax guide's way), one as its pure dict
            state = nnx.state(model)
            checkpointer.save(tmp_path / "nnx" / str(m), state if m == 0 else nnx.to_pure_dict(state))
            models.append(model)
    config = write_config(tmp_path, project, model='"cli_nnx_model:make"',
                          checkpoints=f'["{tmp_path}/nnx/0", "{tmp_path}/nnx/1"]')
    config.write_text(config.read_text().replace(f'python_path = ["{project}"]', "python_path = []"))
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    stored = np.load(tmp_path / "out" / "store" / "experiments" / "targets" / "scores.npy")
    adapted = [trakjax.flax.from_nnx(model) for model in models]
    task = trakjax.tasks.image_classification(adapted[0].apply_fn)
    train = (np.load(project / "train_x.npy"), np.load(project / "train_y.npy"))
    targets = (np.load(project / "test_x.npy"), np.load(project / "test_y.npy"))
    expected = trakjax.attribute(task, [a.params for a in adapted], train, targets, proj_dim=8,
                                 batch_size=4, grad_wrt=["params"])
    assert np.linalg.norm(stored - expected) / np.linalg.norm(expected) < 1e-5
    assert np.abs(np.asarray(adapted[0].params["state"]["norm"]["mean"])).max() > 0.1
    # Checkpoints of another architecture (the linen ones) are refused before anything is written.
    capsys.readouterr()
    bad = write_config(tmp_path / "out", project, model='"cli_nnx_model:make"')  # linen checkpoints
    bad.write_text(bad.read_text().replace(f'python_path = ["{project}"]', f'python_path = ["{tmp_path}"]'))
    assert cli.main(["attribute", "--config", str(bad)]) == 2
    assert "does not match the NNX module's state" in one_error_line(capsys.readouterr().err, "attribute")
