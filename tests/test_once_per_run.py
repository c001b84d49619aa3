"""Each model analysed once per run, each checkpoint read and prepared once (issue 19).

The model's apply function counts its traces (a jitted or traced call runs the Python function);
1 and 4 checkpoints must trace it equally often, in both families, through ``trakjax.attribute``
and through ``TRAKer.run``. A fresh ``TRAKer.run`` reads every orbax checkpoint once; a rerun
that compares its inputs first reads each at most twice.
"""

import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trakjax
from trakjax import checkpoints as checkpoints_lib
from trakjax import featurize, tasks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _store_helpers as helpers  # noqa: E402

FAMILIES = {
    "dense": dict(helpers.SESSION_KW),
    "factorized": dict(helpers.SESSION_KW, projection="factorized", factor_dims=(8, 4)),
}


@pytest.fixture(scope="module")
def four_checkpoints():
    """Four different weight sets of the digits MLP (two trained, two rescaled copies)."""
    trained = helpers.train_checkpoints(2, steps=5)
    scaled = [jax.tree_util.tree_map(lambda x, s=s: np.asarray(x) * s, p) for p, s in zip(trained, (0.9, 1.1), strict=True)]
    return trained + scaled


def counting_task():
    """The digits task with a fresh apply function (so nothing compiled earlier is reused) that
    counts how often the model runs in Python: once per trace."""
    net = helpers.model()
    calls = []

    def apply(params, x):
        calls.append(1)
        return net.apply(params, x)

    return tasks.image_classification(apply), calls


def small_data():
    (x, y), (tx, ty) = helpers.digits()
    return (x[:64], y[:64]), (tx, ty)  # 32 targets: one batch shape in attribute and the session


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attribute_traces_the_model_as_often_for_four_checkpoints_as_for_one(family, four_checkpoints):
    train, targets = small_data()
    traces = []
    for count in (1, 4):
        task, calls = counting_task()
        trakjax.attribute(task, four_checkpoints[:count], train, targets, kernel="trak", **FAMILIES[family])
        traces.append(len(calls))
    assert traces[0] == traces[1], f"{family}: {traces[0]} traces for 1 checkpoint, {traces[1]} for 4"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_session_run_traces_the_model_as_often_for_four_checkpoints_as_for_one(family, four_checkpoints,
                                                                                   tmp_path):
    train, targets = small_data()
    traces = []
    for count in (1, 4):
        task, calls = counting_task()
        traker = trakjax.TRAKer(task, 64, tmp_path / f"{family}{count}", kernel="trak", **FAMILIES[family])
        traker.run(four_checkpoints[:count], train, targets, progress=False)
        traces.append(len(calls))
    assert traces[0] == traces[1], f"{family}: {traces[0]} traces for 1 checkpoint, {traces[1]} for 4"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_fresh_run_reads_and_prepares_each_checkpoint_once_and_a_rerun_reads_it_at_most_twice(
        family, four_checkpoints, tmp_path, monkeypatch):
    train, targets = small_data()
    paths = [helpers.save_orbax(p, tmp_path / f"ckpt{i}") for i, p in enumerate(four_checkpoints[:3])]
    reads, prepares = [], []
    restore, prepare = checkpoints_lib.restore, featurize.prepare_checkpoint
    monkeypatch.setattr(checkpoints_lib, "restore", lambda path, *a, **k: (reads.append(str(path)), restore(path, *a, **k))[1])
    monkeypatch.setattr(featurize, "prepare_checkpoint",
                        lambda *a, **k: (prepares.append(a[3] if len(a) > 3 else k["model_id"]), prepare(*a, **k))[1])
    task = helpers.task()
    store = tmp_path / "store"
    scores = trakjax.TRAKer(task, 64, store, kernel="trak", **FAMILIES[family]).run(paths, train, targets, progress=False)
    assert sorted(reads) == sorted(paths), "a fresh run reads each checkpoint once"
    assert sorted(prepares) == [0, 1, 2], "a fresh run prepares each checkpoint once"
    reads.clear()
    again = trakjax.TRAKer(task, 64, store, kernel="trak", **FAMILIES[family]).run(paths, train, targets, progress=False)
    assert all(reads.count(p) <= 2 for p in paths) and len(reads) <= 2 * len(paths), reads
    np.testing.assert_array_equal(np.asarray(again), np.asarray(scores))
    # and the result is trakjax.attribute's (the targets were featurized before the solve)
    expected = trakjax.attribute(task, four_checkpoints[:3], train, targets, kernel="trak", **FAMILIES[family])
    np.testing.assert_array_equal(np.asarray(scores), expected)


def test_a_checkpoint_of_another_structure_is_planned_anew_and_the_difference_named(four_checkpoints, caplog):
    config = trakjax.Config.create(**FAMILIES["factorized"])
    train, _ = small_data()
    task = helpers.task()
    first = featurize.prepare_checkpoint(task, four_checkpoints[0], config, 0, init_data=train)
    same = featurize.prepare_checkpoint(task, four_checkpoints[1], config, 1, init_data=train, spec=first.spec)
    assert same.spec is first.spec
    bfloat16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), four_checkpoints[2])
    with caplog.at_level(logging.INFO, logger="trakjax"):
        other = featurize.prepare_checkpoint(task, bfloat16, config, 2, init_data=train, spec=first.spec)
    assert other.spec != first.spec and other.spec.structure.leaves != first.spec.structure.leaves
    assert "the parameters' shapes or dtypes" in caplog.text and "bfloat16" in caplog.text
    difference = featurize.structure_difference(first.spec.structure, other.spec.structure)
    assert difference.startswith("the parameters' shapes or dtypes: ") and "float32" in difference
    assert featurize.structure_difference(first.spec.structure, same.spec.structure) == ""
