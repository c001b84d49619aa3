"""trakjax.store: atomic metadata, configuration and fingerprint checks, damaged files, full disks;
and the streaming score functions the store's score matrices are written with."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from trakjax import scores as scores_lib
from trakjax import solve as solve_lib
from trakjax import store as store_lib
from trakjax import trees
from trakjax.pipeline import round_to

N, K = 40, 8
CONFIG = {"proj_dim": K, "seed": 0, "projection": "rademacher", "contract_version": 1,
          "train_set_size": N, "dtype": "float32", "lambda_reg": None}


def _records(params):
    tree = trees.tree_record(params)
    differentiated = {"paths": tree["paths"], "num_params": 12, "proj_dim": K}
    return tree, differentiated


PARAMS = {"b": np.arange(4, dtype=np.float32), "w": np.ones((2, 4), np.float32)}


def _store_with_model(root):
    store = store_lib.Store.open(root, CONFIG)
    store.register_model(0, trees.fingerprint(PARAMS), *_records(PARAMS))
    return store


def test_metadata_write_is_atomic_and_ordered_write_fsync_rename_fsync(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    store_lib.write_json_atomic(path, {"version": 1})
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b))[1])
    store_lib.write_json_atomic(path, {"version": 2})
    assert calls == [("fsync", False), ("replace", str(path)), ("fsync", True)]
    assert json.loads(path.read_text()) == {"version": 2}

    def crash_midway(obj, f, **kw):
        f.write('{"version": 3, "trunc')
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(json, "dump", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        store_lib.write_json_atomic(path, {"version": 3})
    assert json.loads(path.read_text()) == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_metadata_survives_sigkill_during_rewrites(tmp_path):
    """A process rewriting metadata in a loop is killed with SIGKILL: the file is always whole."""
    path = tmp_path / "meta.json"
    code = (
        "import sys; from trakjax.store import write_json_atomic\n"
        "import pathlib; p = pathlib.Path(sys.argv[1]); i = 0\n"
        "def write(i): write_json_atomic(p, {'i': i, 'pad': 'x' * (1000 + 997 * (i % 300))})\n"
        "write(i); i += 1\n"
        "print('ready', flush=True)  # the file exists from here on\n"
        "while True:\n"
        "    write(i); i += 1\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    seen, reads, deadline = set(), 0, time.monotonic() + 30.0
    while (reads < 20 or len(seen) < 2) and time.monotonic() < deadline:
        time.sleep(0.02)
        content = json.loads(path.read_text())  # whole at every moment, never partial
        seen.add(content["i"])
        reads += 1
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    content = json.loads(path.read_text())
    assert len(content["pad"]) == 1000 + 997 * (content["i"] % 300)
    assert len(seen) > 1
    # The killed writer's temporary file, if any, is removed as stale.
    store_lib.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = store_lib.temporary_path(tmp_path / "x").name.split(".tmp.")[1].split(".")[0]
    stale = tmp_path / f".grads.npy.tmp.{host}.{dead.pid}.abcd1234"
    live = tmp_path / f".grads.npy.tmp.{host}.{os.getpid()}.abcd1234"
    other_host = tmp_path / f".grads.npy.tmp.otherhost.{dead.pid}.abcd1234"
    for p in (stale, live, other_host):
        p.write_bytes(b"x")
    assert store_lib.remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and other_host.exists()


def test_reopening_with_another_configuration_lists_every_differing_field(tmp_path):
    store_lib.Store.open(tmp_path, CONFIG)
    other = dict(CONFIG, proj_dim=16, contract_version=2, dtype="bfloat16")
    with pytest.raises(store_lib.StoreError) as info:
        store_lib.Store.open(tmp_path, other)
    message = str(info.value)
    for line in ("contract_version: store has 1, this session has 2",
                 "dtype: store has 'float32', this session has 'bfloat16'",
                 "proj_dim: store has 8, this session has 16"):
        assert line in message
    assert "seed" not in message
    store_lib.Store.open(tmp_path, CONFIG)  # the same configuration reopens


def test_another_trakjax_version_only_warns(tmp_path):
    store_lib.Store.open(tmp_path, CONFIG)
    path = tmp_path / store_lib.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["trakjax_version"] = "0.0.1"
    path.write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match="written by trakjax 0.0.1"):
        store_lib.Store.open(tmp_path, CONFIG)


def test_other_weights_or_another_tree_under_a_model_id_raise(tmp_path):
    store = _store_with_model(tmp_path)
    store.register_model(0, trees.fingerprint(PARAMS), *_records(PARAMS))  # same weights: resume
    changed = dict(PARAMS, w=PARAMS["w"] + np.float32(1e-3))
    with pytest.raises(store_lib.StoreError, match="model_id 0 .* holds other weights: fingerprint blake2b"):
        store.register_model(0, trees.fingerprint(changed), *_records(changed))
    wider = {"b": np.zeros(5, np.float32), "w": np.ones((2, 5), np.float32)}
    with pytest.raises(store_lib.StoreError, match=r"w: store has shape \(2, 4\) float32, new tree has \(2, 5\) float32"):
        store.register_model(1, trees.fingerprint(wider), *_records(wider))
    assert store.model_ids() == [0]


def test_fingerprint_sees_every_weight_of_small_leaves_and_windows_of_large_ones():
    import jax

    rng = np.random.default_rng(0)
    small = {"a": rng.normal(size=(30, 20)).astype(np.float32)}
    big = {"a": rng.normal(size=(1024, 1024)).astype(np.float32)}  # 4 MiB: sampled
    for params in (small, big):
        base = trees.fingerprint(params)
        assert trees.fingerprint(jax.device_put(params)) == base  # numpy or jax, same bytes
        for flat_index in (0, params["a"].size - 1):
            changed = params["a"].copy().reshape(-1)
            changed[flat_index] += 1
            assert trees.fingerprint({"a": changed.reshape(params["a"].shape)}) != base
        assert trees.fingerprint({"a": params["a"].astype(np.float16)}) != base
        assert trees.fingerprint({"b": params["a"]}) != base


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong shape", "not npy", "longer"])
def test_damaged_array_files_are_reported_by_path_on_open(tmp_path, damage):
    _store_with_model(tmp_path)
    target = tmp_path / "models" / "0" / "grads.npy"
    if damage == "truncated":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) - 4)
        pattern = "is truncated"
    elif damage == "missing":
        target.unlink()
        pattern = "is missing"
    elif damage == "wrong shape":
        np.save(target, np.zeros((N, K + 1), np.float32))
        pattern = r"holds shape \(40, 9\) float32, but this store expects shape \(40, 8\) float32"
    elif damage == "not npy":
        target.write_bytes(b"garbage" * 100)
        pattern = "has no valid .npy header"
    else:
        with open(target, "ab") as f:
            f.write(b"\0" * 8)
        pattern = "longer than its header says"
    with pytest.raises(store_lib.StoreError, match=f"{target}.*{pattern}|{pattern}.*{target}") as info:
        store_lib.Store.open(tmp_path, CONFIG)
    assert str(target) in str(info.value)


def test_a_full_disk_gives_a_clear_error_and_no_file(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError, match="not enough free disk to create .*big.npy: it needs 0.0") as info:
        store_lib.create_array(tmp_path / "big.npy", (1000, 1000), np.float32)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="the disk filled up while reserving") as info:
        store_lib.create_array(tmp_path / "big.npy", (1000, 1000), np.float32)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_io_errors_propagate_and_leave_the_old_metadata(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    store_lib.write_json_atomic(path, {"version": 1})

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        store_lib.write_json_atomic(path, {"version": 2})
    with pytest.raises(OSError, match="Input/output error"):
        store_lib.create_array(tmp_path / "a.npy", (4,), np.float32)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_rows_are_written_before_they_are_marked_done(tmp_path):
    store = _store_with_model(tmp_path)
    arrays = store.train_arrays(0)
    order = []

    class Recorder(np.memmap):
        def __setitem__(self, index, value):
            order.append("write " + os.path.basename(self.filename))
            super().__setitem__(index, value)

        def flush(self):
            order.append("flush " + os.path.basename(self.filename))
            super().flush()

    grads, q, done = (a.view(Recorder) for a in (arrays.grads, arrays.out_to_loss, arrays.done))
    rows = np.array([3, 1, 7])
    values = np.arange(3 * K, dtype=np.float32).reshape(3, K)
    store_lib.write_rows([(grads, values), (q, np.ones(3, np.float32))], done, rows)
    assert order == ["write grads.npy", "write out_to_loss.npy", "flush grads.npy",
                     "flush out_to_loss.npy", "write done.npy", "flush done.npy"]
    assert store.missing_train(0).tolist() == [i for i in range(N) if i not in (1, 3, 7)]
    np.testing.assert_array_equal(np.load(tmp_path / "models" / "0" / "grads.npy")[rows], values)


def _ensemble_inputs(n, t, k, m, seed=0):
    rng = np.random.default_rng(seed)
    features = [rng.normal(size=(n, k)).astype(np.float32) for _ in range(m)]
    targets = [rng.normal(size=(t, k)).astype(np.float32) for _ in range(m)]
    q = [rng.uniform(size=n).astype(np.float32) for _ in range(m)]
    return features, targets, q


def test_score_blocks_equal_the_whole_ensemble_bit_for_bit_and_float64(tmp_path):
    n, t, k, rows = 300, 7, 16, 64
    features, targets, q = _ensemble_inputs(n, t, k, 3)
    whole = scores_lib.combine(
        sum(scores_lib.checkpoint_scores(f, p, block_rows=rows).astype(np.float64)
            for f, p in zip(features, targets, strict=True)),
        sum(x.astype(np.float64) for x in q), 3,
    )
    out = np.full((n, t), np.nan, np.float32)
    for b in [4, 0, 2, 1, 3]:  # any order, any subset
        for start, block in scores_lib.score_blocks(features, targets, q, block_rows=rows, blocks=[b]):
            out[start : start + block.shape[0]] = block
    np.testing.assert_array_equal(out, whole)
    exact = sum(f.astype(np.float64) @ p.astype(np.float64).T for f, p in zip(features, targets, strict=True)) / 3
    exact *= (sum(x.astype(np.float64) for x in q) / 3)[:, None]
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_top_k_over_streamed_blocks_equals_a_full_sort():
    n, t, k = 500, 9, 7
    scores = np.random.default_rng(3).normal(size=(n, t)).astype(np.float32)
    blocks = [(s, scores[s : s + 64]) for s in range(0, n, 64)]
    result = scores_lib.top_k(reversed(blocks), k)
    order = np.argsort(-scores, axis=0, kind="stable")[:k]
    np.testing.assert_array_equal(result.proponents, order)
    np.testing.assert_array_equal(result.proponent_scores, np.take_along_axis(scores, order, 0))
    low = np.argsort(scores, axis=0, kind="stable")[:k]
    np.testing.assert_array_equal(result.opponents, low)
    np.testing.assert_array_equal(result.opponent_scores, np.take_along_axis(scores, low, 0))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        scores_lib.top_k(blocks, 0)
    ties = np.random.default_rng(4).integers(-3, 4, size=(n, t)).astype(np.float32)
    result = scores_lib.top_k(((s, ties[s : s + 64]) for s in range(0, n, 64)), k)
    np.testing.assert_array_equal(result.proponents, np.argsort(-ties, axis=0, kind="stable")[:k])
    np.testing.assert_array_equal(result.opponents, np.argsort(ties, axis=0, kind="stable")[:k])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_inverse_into_a_storage_memmap_equals_rounding_the_result(tmp_path, dtype):
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(50, 6)).astype(np.float32)
    kernel = solve_lib.solve(solve_lib.gram(phi), 0.1)
    storage = np.dtype(jnp.dtype(dtype))
    store_lib.create_array(tmp_path / "f.npy", phi.shape, store_lib.file_dtype(storage))
    out = np.lib.format.open_memmap(tmp_path / "f.npy", mode="r+")
    solve_lib.apply_inverse(phi, kernel, block_rows=16, out=store_lib.storage_view(out, storage))
    out.flush()
    expected = round_to(solve_lib.apply_inverse(phi, kernel, block_rows=16), storage)
    stored = store_lib.storage_view(np.load(tmp_path / "f.npy"), storage).astype(np.float32)
    np.testing.assert_array_equal(stored, expected)
