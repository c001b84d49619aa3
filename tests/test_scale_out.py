"""Scale-out: sharded featurize/Gram/scores over simulated devices, and 2 processes over gloo.

Each configuration runs in a subprocess, so the rest of the suite keeps its single device.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def _env(devices=None, projection="rademacher", kernel="trak"):
    env = dict(os.environ, TRAKJAX_TEST_PROJECTION=projection, TRAKJAX_TEST_KERNEL=kernel)
    env.setdefault(
        "TRAKJAX_TEST_JAX_CACHE",
        str(pathlib.Path.home() / ".cache" / "trakjax-test-jax"),
    )
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _single_device_scores(tmp_path, projection, kernel="trak"):
    out = tmp_path / "one.npy"
    subprocess.run([sys.executable, WORKER, out, "devices"], check=True, env=_env(1, projection, kernel),
                   timeout=300)
    return np.load(out)[0]


@pytest.mark.parametrize("devices,projection,kernel", [
    (4, "rademacher", "trak"), (8, "rademacher", "trak"), (4, "factorized", "trak"),
    (4, "rademacher", "gauss-newton"),  # the weighted Gram ΦᵀHΦ: a weighted psum over devices
])
def test_sharded_over_devices_equals_one_device(devices, projection, kernel, tmp_path):
    out = tmp_path / "scores.npy"
    done = subprocess.run(
        [sys.executable, WORKER, out, "devices"], check=True, env=_env(devices, projection, kernel), timeout=300,
        capture_output=True, text=True,
    )
    assert f"devices={devices}" in done.stdout
    everything, single = np.load(out)
    assert np.abs(single).max() > 0
    rel = np.linalg.norm(everything - single) / np.linalg.norm(single)
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("mode,projection,kernel", [
    ("process", "rademacher", "trak"), ("session", "rademacher", "trak"),
    ("process", "factorized", "trak"), ("session", "factorized", "trak"),
    ("session", "rademacher", "gauss-newton"),  # ΦᵀHΦ and the clipped-h counts summed over processes
])
def test_two_processes_equal_one_process(mode, projection, kernel, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, tmp_path / f"p{i}.npy", mode, str(i), "2", str(port), tmp_path / "store"],
            env=_env(1, projection, kernel), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
    finally:
        for proc in procs:
            proc.kill()
    reference = _single_device_scores(tmp_path, projection, kernel)
    for i in range(2):
        scores = np.load(tmp_path / f"p{i}.npy")
        rel = np.linalg.norm(scores - reference) / np.linalg.norm(reference)
        assert rel <= 1e-5, (i, rel)
