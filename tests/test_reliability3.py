"""Reliability, round 3 (issue 18): no stale scores when the model or task changes, no deletion of
files trakjax did not write, no raw errors. One test per case found."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import trakjax
from trakjax import cli, errors, manifest, memory_limits, store_settings
from trakjax import store as store_lib
from trakjax.task_fingerprint import task_fingerprint, versions_key

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _reliability3_helpers as tiny  # noqa: E402
from _cli_project import make_project, write_config  # noqa: E402

ROOT = HERE.parent


def child(*args, wrap=()):
    """Run tests/_reliability3_helpers.py in a child process; (returncode, stdout, stderr)."""
    command = [*wrap, sys.executable, str(HERE / "_reliability3_helpers.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished store of the tiny model, and its scores."""
    root = tmp_path_factory.mktemp("finished") / "store"
    return root, tiny.run_store(root)


def copy_of(finished, tmp_path) -> pathlib.Path:
    root = tmp_path / "store"
    shutil.copytree(finished[0], root)
    return root


def metadata(root) -> dict:
    return json.loads((root / store_lib.METADATA_FILE).read_text())


def write_metadata(root, record) -> None:
    (root / store_lib.METADATA_FILE).write_text(json.dumps(record))


# --------------------------------------------------------------------------- task fingerprints


def test_task_fingerprints_agree_across_two_processes():
    here = tiny.fingerprint()
    runs = [child("fingerprint") for _ in range(2)]
    for code, _, err in runs:
        assert code == 0, err
    assert [json.loads(out) for _, out, _ in runs] == [here, here]


def test_task_fingerprints_change_with_what_the_task_computes():
    params = tiny.checkpoints(1)[0]
    train, _ = tiny.data()
    example = (train[0][0], train[1][0])
    offset = np.arange(tiny.C, dtype=np.float32)

    def fp(**kw):
        return task_fingerprint(tiny.task(**kw), params, example)

    base = fp(offset=offset)
    assert fp(offset=offset.copy()) == base, "closed-over arrays are hashed by content, not identity"
    changed = {
        "squared output": fp(offset=offset, squared=True),
        "closed-over array content": fp(offset=offset + np.float32(1e-3)),
        "model (activation)": fp(activation="relu", offset=offset),
        "no offset": fp(),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    other_params = jax.tree_util.tree_map(lambda x: x + 1, params)
    assert task_fingerprint(tiny.task(offset=offset), other_params, example) == base, "weights are not the task"
    assert base.startswith("task1:") and versions_key().startswith("jax=")


def test_a_changed_task_under_the_same_name_is_refused_and_overwrite_recomputes(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    train, targets = tiny.data()
    squared = tiny.task(squared=True)
    assert squared.name == tiny.task().name
    traker = trakjax.TRAKer(squared, tiny.N, root, proj_dim=tiny.PROJ_DIM, lambda_reg=0.1)
    with pytest.raises(errors.InputsChangedError, match=r"the task 'image_classification': what it computes changed"):
        traker.run(tiny.checkpoints(), train, targets)
    scores = np.array(traker.run(tiny.checkpoints(), train, targets, overwrite=True))
    fresh = trakjax.TRAKer(squared, tiny.N, tmp_path / "fresh", proj_dim=tiny.PROJ_DIM, lambda_reg=0.1)
    np.testing.assert_array_equal(scores, np.array(fresh.run(tiny.checkpoints(), train, targets)))
    assert not np.allclose(scores, finished[1])


def test_the_low_level_api_checks_the_task_at_the_first_batch(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    train, _ = tiny.data()
    traker = trakjax.TRAKer(tiny.task(activation="relu"), tiny.N, root, proj_dim=tiny.PROJ_DIM, lambda_reg=0.1)
    traker.load_checkpoint(tiny.checkpoints(3)[2], model_id=2)
    with pytest.raises(errors.InputsChangedError, match="what it computes changed"):
        traker.featurize((train[0][:4], train[1][:4]), inds=np.arange(4))


def test_a_store_without_a_fingerprint_records_one_with_a_warning(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    record = metadata(root)
    recorded = record.pop("task_fingerprints")
    write_metadata(root, record)
    with pytest.warns(UserWarning, match="records no fingerprint of its task"):
        scores = tiny.run_store(root)
    np.testing.assert_array_equal(scores, finished[1])
    assert metadata(root)["task_fingerprints"] == recorded


def test_a_fingerprint_of_another_jax_version_warns_and_is_not_compared(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    record = metadata(root)
    record["task_fingerprints"] = {"jax=0.0.1 flax=0.0.1": "task1:" + "0" * 32}
    write_metadata(root, record)
    with pytest.warns(UserWarning, match="could not be compared"):
        scores = tiny.run_store(root)
    np.testing.assert_array_equal(scores, finished[1])
    assert set(metadata(root)["task_fingerprints"]) == {"jax=0.0.1 flax=0.0.1", versions_key()}


# --------------------------------------------------------------------------- grad_wrt, settings


def _dense_0(path, leaf):
    return "Dense_0" in path


def _dense_0_renamed(path, leaf):
    return "Dense_0" in path


def test_a_callable_grad_wrt_is_compared_by_its_selection_before_finished_models_are_skipped(tmp_path):
    train, targets = tiny.data()

    def session(grad_wrt):
        return trakjax.TRAKer(tiny.task(), tiny.N, tmp_path / "s", proj_dim=tiny.PROJ_DIM, lambda_reg=0.1,
                              grad_wrt=grad_wrt)

    first = np.array(session(_dense_0).run(tiny.checkpoints(), train, targets))
    assert metadata(tmp_path / "s")["config"]["grad_wrt"] == trakjax.config.GRAD_WRT_SELECTION
    again = np.array(session(_dense_0_renamed).run(tiny.checkpoints(), train, targets))
    np.testing.assert_array_equal(first, again)  # another name, the same leaves: reused
    with pytest.raises(errors.InputsChangedError, match=r"differentiated parameters .*Dense_0.*Dense_1"):
        session(lambda path, leaf: "Dense_1" in path).run(tiny.checkpoints(), train, targets)


def test_unset_settings_adopt_the_store_and_given_ones_are_compared(tmp_path):
    train, targets = tiny.data()
    first = np.array(trakjax.TRAKer(tiny.task(), tiny.N, tmp_path / "s", proj_dim=16, seed=3,
                                    lambda_reg=0.1).run(tiny.checkpoints(), train, targets))
    reopened = trakjax.TRAKer(tiny.task(), tiny.N, tmp_path / "s")  # every setting left unset
    assert (reopened.config.result.proj_dim, reopened.config.result.seed) == (16, 3)
    np.testing.assert_array_equal(np.array(reopened.run(tiny.checkpoints(), train, targets)), first)
    with pytest.raises(errors.StoreError, match="proj_dim: store has 16, this session has 32"):
        trakjax.TRAKer(tiny.task(), tiny.N, tmp_path / "s", proj_dim=32)


def test_a_missing_key_reads_as_the_behaviour_of_the_version_that_wrote_the_store(monkeypatch):
    read = store_settings.stored_as_current({"grad_wrt": "callable m.f"}, {"grad_wrt": None, "model": "m:x"})
    assert read == {"grad_wrt": trakjax.config.GRAD_WRT_SELECTION, "model": "m:x"}  # not recorded: not compared
    # how another issue joins the rule: one line for its key
    keys = dict(store_settings.STORE_KEYS, kernel=store_settings.StoreKey("kernel", absent="identity"))
    monkeypatch.setattr(store_settings, "STORE_KEYS", keys)
    assert store_settings.stored_as_current({}, {"kernel": "gauss_newton"}) == {"kernel": "identity"}


def test_a_done_mask_with_other_values_than_0_and_1_is_reported(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    done = np.load(root / "models" / "0" / "done.npy", mmap_mode="r+")
    done[5] = 7
    done.flush()
    del done
    with pytest.raises(errors.StoreError, match=r"models/0/done.npy is damaged.*rows \[5\].*\[7\]"):
        tiny.run_store(root)


# --------------------------------------------------------------------------- the command line


FACTORY = """
import flax.linen as nn

def make(activation="tanh"):
    act = getattr(nn, activation)

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(act(nn.Dense(4)(x)))

    return Tiny()
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("project"))
    (root / "r3_factory.py").write_text(FACTORY)
    return root


def run_cli(*args) -> int:
    return cli.main([*map(str, args), "--quiet"])


def test_the_cli_records_its_model_settings_and_refuses_a_changed_one(project, tmp_path, capsys):
    config = write_config(tmp_path, project, model='"r3_factory:make"', model_kwargs='{activation = "tanh"}')
    assert run_cli("attribute", "--config", config) == 0
    recorded = metadata(tmp_path / "out" / "store")["config"]
    assert (recorded["model"], recorded["model_kwargs"]) == ("r3_factory:make", {"activation": "tanh"})
    config = write_config(tmp_path, project, model='"r3_factory:make"', model_kwargs='{activation = "relu"}')
    capsys.readouterr()
    assert run_cli("attribute", "--config", config) == 2
    assert "model_kwargs: store has {'activation': 'tanh'}, this session has {'activation': 'relu'}" in capsys.readouterr().err


def test_overwrite_removes_only_trakjax_files_and_refuses_listing_others(project, tmp_path, capsys):
    config = write_config(tmp_path, project)
    assert run_cli("attribute", "--config", config) == 0
    out = tmp_path / "out"
    mine = out / "store" / "models" / "0" / "my_notes.txt"
    mine.write_text("mine")
    beside = out / "notes.txt"
    beside.write_text("beside")
    other = write_config(tmp_path, project, proj_dim="16")
    capsys.readouterr()
    assert run_cli("attribute", "--config", other, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds files trakjax did not create" in err and str(mine) in err and "nothing was removed" in err
    assert mine.read_text() == "mine" and (out / "store" / "models" / "0" / "grads.npy").is_file()
    mine.unlink()
    assert run_cli("attribute", "--config", other, "--overwrite") == 0
    assert beside.read_text() == "beside", "a file beside the store survives an overwrite"
    assert metadata(out / "store")["config"]["proj_dim"] == 16


def test_traker_run_overwrite_keeps_user_files_inside_the_store(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    mine = root / "experiments" / "targets" / "mine.csv"
    mine.write_text("mine")
    train, targets = tiny.data()
    traker = trakjax.TRAKer(tiny.task(), tiny.N, root, proj_dim=tiny.PROJ_DIM, lambda_reg=0.1)
    with pytest.raises(errors.StoreError, match=r"holds files trakjax did not create: .*mine.csv"):
        traker.run(tiny.checkpoints(), (train[0] + 1, train[1]), targets, overwrite=True)
    assert mine.read_text() == "mine"
    assert (root / "experiments" / "targets" / "scores.npy").is_file()


def test_an_output_directory_with_a_users_files_of_trakjax_names_is_refused(project, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "topk.csv").write_text("my table")
    config = write_config(tmp_path, project)
    capsys.readouterr()
    assert run_cli("attribute", "--config", config) == 2
    assert "is not a trakjax output" in capsys.readouterr().err
    assert (out / "topk.csv").read_text() == "my table"
    assert run_cli("attribute", "--config", config, "--overwrite") == 0
    assert (out / "topk.csv").read_text().startswith("target,")


def test_a_symlinked_store_or_output_is_refused_under_overwrite(project, tmp_path, capsys):
    config = write_config(tmp_path, project)
    assert run_cli("attribute", "--config", config) == 0
    real = tmp_path / "real_store"
    (tmp_path / "out" / "store").rename(real)
    (tmp_path / "out" / "store").symlink_to(real)
    capsys.readouterr()
    assert run_cli("attribute", "--config", write_config(tmp_path, project, proj_dim="16"), "--overwrite") == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert (real / store_lib.METADATA_FILE).is_file()


def test_traker_run_overwrite_refuses_a_symlinked_save_dir(finished, tmp_path):
    real = copy_of(finished, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    train, targets = tiny.data()
    traker = trakjax.TRAKer(tiny.task(), tiny.N, link, proj_dim=tiny.PROJ_DIM, lambda_reg=0.1)
    with pytest.raises(errors.StoreError, match="save_dir .*link is a symbolic link"):
        traker.run(tiny.checkpoints(), (train[0] + 1, train[1]), targets, overwrite=True)
    assert (real / "experiments" / "targets" / "scores.npy").is_file()


def test_the_manifest_takes_new_names_in_one_call(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "_PATTERNS", {k: list(v) for k, v in manifest._PATTERNS.items()})
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app.3f2a.js").write_text("x")
    (tmp_path / "report.html").write_text("x")
    assert len(manifest.survey(tmp_path, manifest.OUTPUT)[1]) == 2
    manifest.register(manifest.OUTPUT, "report.html", "assets/", "assets/*.js")
    own, foreign = manifest.survey(tmp_path, manifest.OUTPUT)
    assert foreign == [] and len(own) == 3


# --------------------------------------------------------------------------- raw errors


def test_a_solve_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(errors.InvalidArgumentError, match=r"K_fac=307000 .* largest k that fits is 16384"):
        memory_limits.check_solve_memory(307000, k_fac=307000, limit=(8 * 4 * 16384**2, "a test limit"))
    memory_limits.check_solve_memory(16384, limit=(8 * 4 * 16384**2, "a test limit"))
    monkeypatch.setattr(memory_limits, "process_memory_limit", lambda: (1000, "a test limit"))
    train, targets = tiny.data()
    with pytest.raises(errors.InvalidArgumentError, match="largest k that fits is 5"):
        trakjax.attribute(tiny.task(), tiny.checkpoints(1), train, targets, proj_dim=tiny.PROJ_DIM)
    traker = trakjax.TRAKer(tiny.task(), tiny.N, tmp_path / "s", proj_dim=tiny.PROJ_DIM)
    with pytest.raises(errors.InvalidArgumentError, match="Nothing was computed"):
        traker.run(tiny.checkpoints(1), train, targets)
    assert not list((tmp_path / "s").glob("models/*"))


def test_describe_factorization_given_a_batch_says_it_takes_one_example():
    train, _ = tiny.data()
    with pytest.raises(errors.InvalidArgumentError, match="takes ONE example"):
        trakjax.featurize.describe_factorization(tiny.task(), tiny.checkpoints(1)[0], (train[0][:4], train[1][:4]))


def test_attribute_with_inputs_that_do_not_fit_the_model_fails_before_featurizing():
    train, targets = tiny.data()
    wide = (np.concatenate([train[0], train[0][:, :1]], axis=1), train[1])
    with pytest.raises(errors.InvalidArgumentError, match=r"train does not fit the model.*\(6,\)"):
        trakjax.attribute(tiny.task(), tiny.checkpoints(1), wide, targets, proj_dim=tiny.PROJ_DIM)


def test_attribute_takes_orbax_checkpoint_paths(tmp_path):
    import orbax.checkpoint as ocp

    train, targets = tiny.data()
    params = tiny.checkpoints(2)
    paths = []
    with ocp.StandardCheckpointer() as checkpointer:
        for m, p in enumerate(params):
            paths.append(tmp_path / f"ckpt{m}")
            checkpointer.save(paths[-1], p)
    settings = dict(proj_dim=tiny.PROJ_DIM, lambda_reg=0.1)
    np.testing.assert_array_equal(trakjax.attribute(tiny.task(), paths, train, targets, **settings),
                                  trakjax.attribute(tiny.task(), params, train, targets, **settings))


def _read_only_wrappers(directory) -> list[list[str]]:
    script = f"mount --bind -o ro {directory} {directory} && exec \"$@\""
    return [["unshare", "--mount", "sh", "-c", script, "sh"],
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]]


def _read_only_wrapper(directory):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed: a read-only bind mount cannot be set up")
    for wrap in _read_only_wrappers(directory):
        probe = subprocess.run([*wrap, "sh", "-c", f"touch {directory}/.probe"], capture_output=True, text=True)
        if "Read-only file system" in probe.stderr:
            return wrap
    pytest.skip("neither `unshare --mount` nor `unshare --user --mount` can make a read-only bind mount here")


def test_a_finished_store_on_a_read_only_file_system_is_read_and_writes_name_the_directory(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    (root / store_lib.LOCK_FILE).unlink()  # a read-only copy need not even have its lock file
    wrap = _read_only_wrapper(root)
    code, out, err = child("run", str(root), wrap=wrap)
    assert code == 0, err
    np.testing.assert_array_equal(np.array(json.loads(out)), finished[1])
    code, out, err = child("run", str(root), "other_experiment", wrap=wrap)
    assert code != 0 and f"the store at {root} is read-only" in err and "Traceback" in err
    assert "OSError" not in err.splitlines()[-1]


def test_show_writes_elsewhere_with_out_when_the_run_is_read_only(project, tmp_path, capsys):
    config = write_config(tmp_path, project)
    assert run_cli("attribute", "--config", config) == 0
    out = tmp_path / "out"
    wrap = _read_only_wrapper(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    shown = subprocess.run([*wrap, sys.executable, "-m", "trakjax", "show", str(out), "--quiet"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 2 and "--out" in shown.stderr, shown.stderr
    elsewhere = tmp_path / "shown"
    shown = subprocess.run([*wrap, sys.executable, "-m", "trakjax", "show", str(out), "--out", str(elsewhere),
                            "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert (elsewhere / "topk.csv").read_text() == (out / "topk.csv").read_text()


def test_a_file_size_limit_names_the_file_and_the_size(tmp_path):
    # RLIMIT_FSIZE of the child only: 2 blocks of 512 bytes (POSIX sh), so the store's first
    # array (and maybe its metadata) does not fit
    code, out, err = child("run", str(tmp_path / "s"), wrap=["sh", "-c", 'ulimit -f 2 && exec "$@"', "sh"])
    last = err.strip().splitlines()[-1]
    assert code != 0 and "[Errno 27] cannot write" in last and "bytes" in last and "RLIMIT_FSIZE" in last, last
    assert str(tmp_path / "s") in last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = tiny.run_store(tmp_path / "s")
    np.testing.assert_array_equal(resumed, tiny.run_store(tmp_path / "fresh"))
