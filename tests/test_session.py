"""trakjax.TRAKer: equality with trakjax.attribute, orbax checkpoints, resume, splitting, bad input.

The set-up (tests/_store_helpers.py): a 64-16-10 MLP trained for 30 Adam steps on 256 digits, two
checkpoints saved with orbax, 32 targets, k = 32, batches of 32. Every comparison is against
``trakjax.attribute`` on the same inputs (itself checked against float64 closed forms and the
reference library elsewhere), bit for bit where the computation is the same.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import trakjax
from trakjax import checkpoints as checkpoints_lib
from trakjax import featurize as featurize_lib
from trakjax import files, trees
from trakjax import store as store_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _store_helpers as helpers  # noqa: E402

WORKER = pathlib.Path(__file__).resolve().parent / "_session_worker.py"


@pytest.fixture(scope="module")
def checkpoints():
    return helpers.train_checkpoints()


@pytest.fixture(scope="module")
def orbax_paths(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    return [helpers.save_orbax(p, root / f"model_{i}") for i, p in enumerate(checkpoints)]


@pytest.fixture(scope="module")
def expected(checkpoints):
    train, targets = helpers.digits()
    return trakjax.attribute(helpers.task(), checkpoints, train, targets, **helpers.SESSION_KW)


def test_session_on_orbax_checkpoints_equals_attribute_bit_for_bit(checkpoints, orbax_paths, expected, tmp_path):
    scores = helpers.run_session(tmp_path / "store", orbax_paths)
    assert scores.shape == (helpers.N_TRAIN, helpers.N_TARGETS) and scores.dtype == np.float32
    assert np.abs(expected).max() > 0
    np.testing.assert_array_equal(scores, expected)
    # Plain numpy reads every array of the store: Φ and q are featurization's own.
    root = tmp_path / "store"
    train, _ = helpers.digits()
    config = trakjax.Config.create(**helpers.SESSION_KW)
    direct = featurize_lib.featurize(helpers.task(), featurize_lib.prepare_checkpoint(
        helpers.task(), checkpoints[0], config, 0), train, batch_size=helpers.BATCH)
    phi = np.load(root / "models" / "0" / "grads.npy")
    np.testing.assert_allclose(phi, direct.features, rtol=1e-6, atol=1e-7 * np.abs(direct.features).max())
    np.testing.assert_allclose(np.load(root / "models" / "0" / "out_to_loss.npy"), direct.out_to_loss, rtol=1e-6)
    np.testing.assert_array_equal(np.load(root / "experiments" / helpers.EXPERIMENT / "scores.npy"), expected)
    assert np.load(root / "models" / "1" / "done.npy").all()


def test_session_in_bfloat16_equals_attribute_and_stores_bfloat16_bits(checkpoints, tmp_path):
    train, targets = helpers.digits()
    expected = trakjax.attribute(
        helpers.task(), checkpoints, train, targets, dtype="bfloat16", **helpers.SESSION_KW
    )
    scores = helpers.run_session(tmp_path, checkpoints, dtype="bfloat16")
    np.testing.assert_array_equal(scores, expected)
    bits = np.load(tmp_path / "models" / "0" / "features.npy")
    assert bits.dtype == np.uint16
    values = bits.view(jax.numpy.bfloat16).astype(np.float32)
    assert np.isfinite(values).all() and np.abs(values).max() > 0


def test_orbax_round_trip_restores_the_trained_weights(checkpoints, orbax_paths, tmp_path):
    for params, path in zip(checkpoints, orbax_paths, strict=True):
        for template in (None, params):
            restored = checkpoints_lib.restore(path, template)
            assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
            for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert trees.fingerprint(restored) == trees.fingerprint(params)
    assert trees.fingerprint(checkpoints[0]) != trees.fingerprint(checkpoints[1])
    wider = jax.tree_util.tree_map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype), checkpoints[0])
    path = helpers.save_orbax(wider, tmp_path / "wider")
    with pytest.raises(ValueError, match=r"(?s)different tree structure.*params/Dense_1/bias: expected tree "
                       r"has shape \(16,\) float32, checkpoint has \(17,\) float32"):
        checkpoints_lib.restore(path, checkpoints[0])


def test_a_partly_done_batch_computes_only_its_missing_rows(checkpoints, expected, tmp_path, monkeypatch):
    train, _ = helpers.digits()
    computed = []
    original = featurize_lib.featurize_batch

    def spy(task, checkpoint, batch, indices=None, **kw):
        computed.append(np.unique(np.asarray(indices)))
        return original(task, checkpoint, batch, indices, **kw)

    monkeypatch.setattr(featurize_lib, "featurize_batch", spy)
    traker = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, tmp_path, **helpers.SESSION_KW)
    traker.load_checkpoint(checkpoints[0], 0)
    traker.featurize((train[0][3:10], train[1][3:10]), inds=np.arange(3, 10))
    assert [c.tolist() for c in computed] == [list(range(3, 10))]
    computed.clear()
    traker.featurize((train[0][:32], train[1][:32]), inds=np.arange(32))
    assert [c.tolist() for c in computed] == [[0, 1, 2] + list(range(10, 32))]
    computed.clear()
    traker.featurize((train[0][:32], train[1][:32]), num_samples=32)
    assert computed == [], "a fully featurized batch must not be recomputed"
    monkeypatch.undo()
    scores = helpers.run_session(tmp_path, checkpoints)
    np.testing.assert_array_equal(scores, expected)


def test_other_batch_boundaries_agree_to_float32_rounding(checkpoints, expected, tmp_path):
    helpers.run_session(tmp_path, checkpoints, batch=24, train_rows=(0, 100), phases=("featurize",),
                        batch_size=8)
    scores = helpers.run_session(tmp_path, checkpoints, batch=40)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_top_k_streams_the_same_proponents_and_opponents(checkpoints, expected, tmp_path):
    helpers.run_session(tmp_path, checkpoints, phases=("featurize", "finalize", "score"))
    traker = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, tmp_path, score_block_rows=48,
                            **helpers.SESSION_KW)
    streamed = traker.top_k(helpers.EXPERIMENT, 5)  # from features: no score file written
    assert not (tmp_path / "experiments" / helpers.EXPERIMENT / "scores.npy").exists()
    order = np.argsort(-expected, axis=0, kind="stable")
    np.testing.assert_array_equal(streamed.proponents, order[:5])
    np.testing.assert_array_equal(streamed.proponent_scores, np.take_along_axis(expected, order[:5], 0))
    low = np.argsort(expected, axis=0, kind="stable")[:5]
    np.testing.assert_array_equal(streamed.opponents, low)
    stored = traker.finalize_scores(helpers.EXPERIMENT)  # blocks of 48 rows, padded
    np.testing.assert_array_equal(stored, expected)
    from_file = traker.top_k(helpers.EXPERIMENT, 5)
    np.testing.assert_array_equal(from_file.proponents, streamed.proponents)


def test_bad_input_raises_clear_errors_and_leaves_the_store_as_it_was(checkpoints, orbax_paths, tmp_path):
    train, targets = helpers.digits()
    root = tmp_path / "store"
    traker = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, root, **helpers.SESSION_KW)
    with pytest.raises(ValueError, match="load_checkpoint"):
        traker.featurize((train[0][:32], train[1][:32]), num_samples=32)
    traker.load_checkpoint(orbax_paths[0], 0)
    traker.featurize((train[0][:100], train[1][:100]), inds=np.arange(100))
    before = helpers.store_snapshot(root)

    fresh = trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, root, **helpers.SESSION_KW)
    with pytest.raises(ValueError, match="no checkpoint is loaded"):
        fresh.featurize((train[0][:32], train[1][:32]), num_samples=32)
    with pytest.raises(ValueError, match="156 of 256 training examples not featurized yet "
                       r"\(first indices \[100, 101, 102"):
        fresh.finalize_features()
    with pytest.raises(ValueError, match="not finalized"):
        fresh.start_scoring_checkpoint("exp", checkpoints[0], 0, helpers.N_TARGETS)
    with pytest.raises(ValueError, match="start_scoring_checkpoint"):
        fresh.score(targets, num_samples=helpers.N_TARGETS)
    with pytest.raises(ValueError, match="not in the store"):
        fresh.start_scoring_checkpoint("exp", checkpoints[1], 1, helpers.N_TARGETS)
    with pytest.raises(ValueError, match=r"does not exist"):
        fresh.load_checkpoint(str(tmp_path / "no_such_checkpoint"), 1)
    other = helpers.save_orbax({"params": {"w": np.ones((64, 10), np.float32)}}, tmp_path / "other")
    with pytest.raises(ValueError, match="different tree structure"):
        fresh.load_checkpoint(other, 1)
    with pytest.raises(store_lib.StoreError, match="model_id 0 .* holds other weights"):
        fresh.load_checkpoint(checkpoints[1], 0)
    fresh.load_checkpoint(orbax_paths[0], 0)  # resuming model 0 changes nothing
    with pytest.raises(ValueError, match=r"inds must be in \[0, 256\)"):
        fresh.featurize((train[0][:2], train[1][:2]), inds=np.array([255, 256]))
    with pytest.raises(ValueError, match=r"inds must be distinct; repeated: \[7\]"):
        fresh.featurize((train[0][:3], train[1][:3]), inds=np.array([7, 8, 7]))
    with pytest.raises(ValueError, match="exactly one of inds and num_samples"):
        fresh.featurize((train[0][:3], train[1][:3]))
    big = (np.concatenate([train[0], train[0][:1]]), np.concatenate([train[1], train[1][:1]]))
    with pytest.raises(ValueError, match="overflows train_set_size=256"):
        fresh.featurize(big, num_samples=257)
    with pytest.raises(ValueError, match="experiment 'exp' does not exist"):
        fresh.finalize_scores("exp")
    with pytest.raises(store_lib.StoreError, match=r"proj_dim: store has 32, this session has 16"):
        trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, root, **dict(helpers.SESSION_KW, proj_dim=16))
    assert helpers.store_snapshot(root) == before


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    return helpers.save_digits(tmp_path_factory.mktemp("digits") / "digits.npz")


def _worker(save_dir, spec, digits_file):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(save_dir), json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, **{helpers.DIGITS_ENV: digits_file}),
    )


def _finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"worker failed ({process.returncode}):\n{out}\n{err[-3000:]}"
    return out


def test_two_processes_splitting_the_work_equal_a_single_run(orbax_paths, expected, tmp_path, digits_file):
    """Two processes featurize disjoint rows of model 0 (one also all of model 1), then score
    one model each, in parallel, into one store."""
    helpers.run_session(tmp_path, orbax_paths, phases=())  # create the store
    half = helpers.N_TRAIN // 2 + 16
    first = _worker(tmp_path, {"checkpoints": orbax_paths, "phases": ["featurize"],
                               "plan": [[0, 0, half], [1, 0, helpers.N_TRAIN]]}, digits_file)
    second = _worker(tmp_path, {"checkpoints": orbax_paths, "phases": ["featurize"],
                                "plan": [[0, half, helpers.N_TRAIN]]}, digits_file)
    _finish(first)
    _finish(second)
    helpers.run_session(tmp_path, orbax_paths, phases=("finalize",))
    scorers = [_worker(tmp_path, {"checkpoints": orbax_paths, "phases": ["score"], "models": [m]}, digits_file)
               for m in range(helpers.NUM_MODELS)]
    for process in scorers:
        _finish(process)
    scores = helpers.run_session(tmp_path, orbax_paths, phases=("scores",))
    np.testing.assert_array_equal(scores, expected)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(orbax_paths, expected, tmp_path, digits_file):
    """Kill a full run with SIGKILL three times at random moments, rerun the same calls to the end."""
    reference = tmp_path / "reference"
    start = time.perf_counter()
    helpers.run_session(reference, orbax_paths)
    duration = time.perf_counter() - start  # a worker's work (cold caches) takes longer
    killed = tmp_path / "killed"
    rng = random.Random(1)
    spec = {"checkpoints": orbax_paths}
    kills = 0
    for _ in range(3):
        process = _worker(killed, spec, digits_file)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.1, 0.9) * duration)
        os.kill(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        kills += "finished" not in out  # a kill after the work was done does not count
    assert kills >= 1
    _finish(_worker(killed, spec, digits_file))
    scores = np.load(killed / "experiments" / helpers.EXPERIMENT / "scores.npy")
    np.testing.assert_array_equal(scores, expected)
    for model_id in range(helpers.NUM_MODELS):
        for name in ("grads.npy", "out_to_loss.npy", "features.npy"):
            np.testing.assert_array_equal(
                np.load(killed / "models" / str(model_id) / name),
                np.load(reference / "models" / str(model_id) / name),
            )
    leftovers = [p for p in killed.rglob("*") if files.TMP_MARK in p.name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
