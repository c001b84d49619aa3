"""Reliability: no stale results, no half-complete stores, no writes through planted links, and
every bad input a clear one-line error. One test per failure class found by trying bad inputs
and faults against the library, the store and the CLI."""

import json
import pathlib
import sys
import threading

import numpy as np
import pytest

import trakjax
from trakjax import cli, errors, files, report
from trakjax import store as store_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _store_helpers as helpers  # noqa: E402
from _cli_project import make_project, write_config  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"))


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"trakjax {command}: error"), lines[0]
    return lines[0]


def snapshot(root: pathlib.Path) -> dict:
    """Every file under ``root`` with its bytes (the .lock files aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# --------------------------------------------------------------------------- stale results


@pytest.mark.parametrize("change", ["two of three checkpoints", "a checkpoint replaced", "other targets"])
def test_a_rerun_with_changed_inputs_is_refused_and_overwrite_recomputes_as_fresh(change, project, tmp_path, capsys):
    three = f'["{project}/ckpt/0", "{project}/ckpt/1", "{project}/ckpt/2"]'
    config = write_config(tmp_path, project, checkpoints=three)
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    before = snapshot(out)
    changed = {
        "two of three checkpoints": dict(checkpoints=f'["{project}/ckpt/0", "{project}/ckpt/1"]'),
        "a checkpoint replaced": dict(checkpoints=f'["{project}/ckpt/0", "{project}/ckpt/2", "{project}/ckpt/1"]'),
        "other targets": dict(checkpoints=three, target_inputs="other_x"),
    }[change]
    config = write_config(tmp_path, project, **changed)
    capsys.readouterr()
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err, "attribute")
    assert "changed since" in line and "--overwrite" in line
    assert {"two of three checkpoints": "ensemble model_ids [0, 1, 2], this run has [0, 1]",
            "a checkpoint replaced": "checkpoint model_id 1",
            "other targets": "experiment 'targets': targets"}[change] in line
    assert snapshot(out) == before, "a refused rerun must leave the earlier result as it was"
    assert cli.main(["show", str(out), "--quiet"]) == 0  # still a finished run
    assert cli.main(["attribute", "--config", str(config), "--quiet", "--overwrite"]) == 0
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = write_config(fresh_dir, project, **changed)
    assert cli.main(["attribute", "--config", str(fresh), "--quiet"]) == 0
    scores = "store/experiments/targets/scores.npy"
    np.testing.assert_array_equal(np.load(out / scores), np.load(fresh_dir / "out" / scores))


def test_another_setting_leaves_a_finished_output_intact(project, tmp_path, capsys):
    config = write_config(tmp_path, project)
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    before = snapshot(tmp_path / "out")
    other = write_config(tmp_path, project, proj_dim="16")
    capsys.readouterr()
    assert cli.main(["attribute", "--config", str(other), "--quiet"]) == 2
    assert "proj_dim: store has 8, this session has 16" in one_error_line(capsys.readouterr().err, "attribute")
    assert snapshot(tmp_path / "out") == before  # run.json too: show still redraws it
    assert cli.main(["show", str(tmp_path / "out"), "--quiet"]) == 0
    assert cli.main(["attribute", "--config", str(other), "--quiet", "--overwrite"]) == 0
    assert np.load(tmp_path / "out" / "store" / "models" / "0" / "grads.npy").shape == (12, 16)


def test_interleaved_finalize_scores_with_other_model_ids_each_get_their_own_matrix(tmp_path, monkeypatch):
    checkpoints = helpers.train_checkpoints()
    helpers.run_session(tmp_path, checkpoints, phases=("featurize", "finalize", "score"))
    train, targets = helpers.digits()
    expected = {ids: trakjax.attribute(helpers.task(), [checkpoints[m] for m in ids], train, targets,
                                       model_ids=list(ids), **helpers.SESSION_KW) for ids in ((0, 1), (1,))}
    first = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, tmp_path, score_block_rows=64, **helpers.SESSION_KW)
    second = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, tmp_path, score_block_rows=64, **helpers.SESSION_KW)
    results = {}
    write = store_lib.Store.write_score_block

    def interleaving(self, arrays, block, start, values):
        write(self, arrays, block, start, values)
        if arrays.model_ids == (0, 1) and block == 1 and "second" not in results:
            results["second"] = np.array(second.finalize_scores(helpers.EXPERIMENT, [1]))

    monkeypatch.setattr(store_lib.Store, "write_score_block", interleaving)
    results["first"] = np.array(first.finalize_scores(helpers.EXPERIMENT, [0, 1]))
    np.testing.assert_array_equal(results["first"], expected[(0, 1)])
    np.testing.assert_array_equal(results["second"], expected[(1,)])
    info = json.loads((tmp_path / "experiments" / helpers.EXPERIMENT / "experiment.json").read_text())
    assert info["scores"] == {"model_ids": [0, 1], "block_rows": 64, "complete": True}


def test_a_killed_second_finalize_never_marks_zero_rows_complete(tmp_path, monkeypatch):
    checkpoints = helpers.train_checkpoints()
    full = helpers.run_session(tmp_path, checkpoints)
    traker = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, tmp_path, score_block_rows=64, **helpers.SESSION_KW)
    write = store_lib.Store.write_score_block

    def dies(self, arrays, block, start, values):
        if block == 2:
            raise KeyboardInterrupt("killed mid-way")
        write(self, arrays, block, start, values)

    monkeypatch.setattr(store_lib.Store, "write_score_block", dies)
    with pytest.raises(KeyboardInterrupt):
        traker.finalize_scores(helpers.EXPERIMENT, [0])
    monkeypatch.undo()
    info = json.loads((tmp_path / "experiments" / helpers.EXPERIMENT / "experiment.json").read_text())
    assert info["scores"]["model_ids"] == [0, 1] and info["scores"]["complete"]
    np.testing.assert_array_equal(traker.finalize_scores(helpers.EXPERIMENT, [0, 1]), full)
    resumed = traker.finalize_scores(helpers.EXPERIMENT, [0])  # resumes its partial matrix
    train, targets = helpers.digits()
    np.testing.assert_array_equal(
        resumed, trakjax.attribute(helpers.task(), checkpoints[:1], train, targets, **helpers.SESSION_KW))
    with pytest.raises(errors.StoreError, match="score blocks are not written yet"):
        arrays = traker.store.score_arrays(helpers.EXPERIMENT, [1], 64)
        traker.store.complete_scores(helpers.EXPERIMENT, arrays)


# --------------------------------------------------------------------------- names, paths, links


def test_experiment_names_are_whole_matches_and_save_dirs_expand_the_home(tmp_path, monkeypatch):
    for name in ("exp\n", "exp\nx", ".hidden", "a/b", ""):
        with pytest.raises(errors.InvalidArgumentError, match="exp_name must be"):
            store_lib.check_experiment_name(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    traker = trakjax.TRAKer(helpers.task(), 16, "~/runs/x", proj_dim=8, projection="rademacher")
    traker.load_checkpoint({"w": np.zeros((64, 10), np.float32)}, 0)
    assert (tmp_path / "home" / "runs" / "x" / store_lib.METADATA_FILE).is_file()
    assert not (tmp_path / "~").exists()


def test_writers_replace_planted_links_and_never_write_through_them(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("run.json", ".run.json.tmp", "topk.csv", ".topk.csv.tmp"):
        (out / name).symlink_to(victim)
    report.write_run_record(out, {"kind": "attribute"})
    report.write_top_k(out, [])
    assert victim.read_text() == "precious"
    assert not (out / "run.json").is_symlink() and json.loads((out / "run.json").read_text()) == {"kind": "attribute"}


def test_concurrent_writers_of_one_file_do_not_crash_each_other(tmp_path):
    failures = []

    def writer(i):
        try:
            for j in range(50):
                files.write_json_atomic(tmp_path / "run.json", {"writer": i, "j": j})
        except Exception as err:  # noqa: BLE001  (collected and reported below)
            failures.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert json.loads((tmp_path / "run.json").read_text())["j"] == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("content,pattern", [
    ("[]", "is not a trakjax store of format version 1"),
    ('{"format_version": 1, "trakjax_version": "x", "config": {}, "parameters": 5}', "does not have the expected form"),
    ('{"name": "digits", "model_ids": [0], "scores": null}', "does not have the expected form"),
    ('{"name": "digits", "num_targets": "32", "model_ids": [0], "scores": null}', "does not have the expected form"),
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_store_metadata_of_the_wrong_shape_is_a_store_error_naming_the_file(content, pattern, tmp_path):
    checkpoints = helpers.train_checkpoints()
    helpers.run_session(tmp_path, checkpoints[:1], models=[0], phases=("featurize", "finalize", "score"))
    target = (tmp_path / store_lib.METADATA_FILE if "format_version" in str(content) or content == "[]"
              else tmp_path / "experiments" / helpers.EXPERIMENT / "experiment.json")
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    with pytest.raises(errors.StoreError, match=pattern) as info:
        traker = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, tmp_path, **helpers.SESSION_KW)
        traker.finalize_scores(helpers.EXPERIMENT)
    assert str(target) in str(info.value)


@pytest.mark.parametrize("damage,message", [
    (lambda r: r.pop("store"), "field 'store' must be str"),
    (lambda r: r.update(top_k="10"), "field 'top_k' must be int"),
    (lambda r: r.update(picture_targets=[0, 99]), "picture_targets [99] are out of range for 3 targets"),
    (lambda r: r.update(data=[]), "field 'data' must be dict"),
])
def test_show_reports_a_damaged_run_record_in_one_line(damage, message, project, tmp_path, capsys):
    config = write_config(tmp_path, project)
    assert cli.main(["attribute", "--config", str(config), "--quiet"]) == 0
    path = tmp_path / "out" / "run.json"
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(["show", str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys.readouterr().err, "show")


def test_an_empty_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    traker = trakjax.TRAKer(helpers.task(), 16, tmp_path / "store", proj_dim=8)
    with pytest.raises(errors.InvalidArgumentError, match="is not an orbax checkpoint directory.*it is empty"):
        traker.load_checkpoint(tmp_path / "empty", 0)
    assert not (tmp_path / "store").exists()


def test_a_model_module_that_exits_on_import_is_a_one_line_error(project, tmp_path, capsys):
    config = write_config(tmp_path, project, model='"cli_exiting_model:model"')
    assert cli.main(["attribute", "--config", str(config)]) == 2
    assert "cannot import module 'cli_exiting_model' (SystemExit: 3)" in one_error_line(capsys.readouterr().err, "attribute")


def test_a_grad_wrt_typo_creates_nothing(project, tmp_path, capsys):
    config = write_config(tmp_path, project, grad_wrt='["params/Dense_9"]')
    assert cli.main(["attribute", "--config", str(config)]) == 2
    assert "grad_wrt entry 'params/Dense_9' matches no parameter" in one_error_line(capsys.readouterr().err, "attribute")
    assert not (tmp_path / "out").exists()
    traker = trakjax.TRAKer(helpers.task(), 16, tmp_path / "store", proj_dim=8, grad_wrt=["params/Dense_9"],
                            projection="rademacher")
    with pytest.raises(errors.InvalidArgumentError, match="matches no parameter"):
        traker.load_checkpoint(helpers.train_checkpoints(1, steps=1)[0], 0)
    assert not (tmp_path / "store").exists()


def test_numpy_integers_are_integers_and_the_store_records_python_ones(tmp_path):
    traker = trakjax.TRAKer(helpers.task(), np.int64(16), tmp_path, proj_dim=np.int64(8), seed=np.int32(2),
                            projection="rademacher")
    traker.load_checkpoint(helpers.train_checkpoints(1, steps=1)[0], np.int64(0))
    config = json.loads((tmp_path / store_lib.METADATA_FILE).read_text())["config"]
    assert config["proj_dim"] == 8 and config["seed"] == 2 and config["train_set_size"] == 16


def test_inputs_of_huge_magnitude_name_the_overflow(tmp_path):
    train, targets = helpers.digits()
    params = [{"w": np.zeros((64, 10), np.float32)}]  # f = x w: its gradient is x itself
    task = trakjax.tasks.regression(lambda p, x: (x @ p["w"])[:, 0])
    huge = (train[0] * 1e20, train[1].astype(np.float32))  # finite features, squares past float32
    with pytest.raises(errors.NumericalError, match=r"the Gram ΦᵀΦ overflowed float32: the features are "
                       r"finite but reach \|φ\| = .*rescale"):
        trakjax.attribute(task, params, huge, (targets[0], targets[1].astype(np.float32)), proj_dim=8,
                          batch_size=64, backend="xla")


def test_targets_of_another_shape_fail_before_featurizing(monkeypatch):
    from trakjax import featurize

    calls = []
    monkeypatch.setattr(featurize, "featurize_batch", lambda *a, **k: calls.append(a))
    train, targets = helpers.digits()
    checkpoints = helpers.train_checkpoints(1, steps=1)
    wide = (np.concatenate([targets[0], targets[0][:, :1]], axis=1), targets[1])
    with pytest.raises(errors.InvalidArgumentError, match=r"targets do not fit the model: one target "
                       r"example has shapes \{\[0\]: \(65,\), \[1\]: \(\)\}, one training example has "
                       r"\{\[0\]: \(64,\), \[1\]: \(\)\}"):
        trakjax.attribute(helpers.task(), checkpoints, train, wide, proj_dim=8)
    assert calls == []
