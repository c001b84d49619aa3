"""Scores larger than memory: a 1,000,000 train × 2,000 target score matrix at k = 512, streamed.

Synthetic features are written into a TRAKer store (one checkpoint: F (N, k) float32, the targets'
Ψ (T, k), q (N,)); then

1. ``TRAKer.top_k(exp, 10)`` streams the scores block by block straight from the features and keeps
   the 10 top proponents and opponents per target: the score matrix is never written or held;
2. ``TRAKer.finalize_scores(exp)`` computes the (N, T) float32 matrix (8 GB) block by block into the
   store's memory-mapped file;
3. ``TRAKer.top_k(exp, 10)`` again, now reading the finished matrix back block by block.

Peak anonymous memory (RssAnon from /proc/self/status, sampled every 20 ms by a thread; the pages of
memory-mapped files are file-backed and not counted) is reported for each step, with throughput.
A spot check compares a few score entries with a float64 computation, and the two top-k results
with each other.

Run:  python benchmarks/score_memory.py [--train 1000000] [--targets 2000] [--proj-dim 512]
      [--save-dir DIR]   (needs about 11 GB of free disk; the store is deleted at the end)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import tempfile
import threading
import time

import numpy as np


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class AnonPeak:
    """Track the peak of RssAnon by sampling it every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = status_kib("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))


def gib(kib: int) -> float:
    return kib / 2**20


def build_store(save_dir: pathlib.Path, n: int, t: int, k: int, chunk: int = 65536):
    """A TRAKer on a store holding one finalized synthetic checkpoint and experiment targets."""
    import jax.numpy as jnp

    import trakjax
    from trakjax import tasks, trees

    def apply_fn(params, x):
        return x @ params["w"]

    traker = trakjax.TRAKer(tasks.image_classification(apply_fn), n, save_dir, proj_dim=k,
                            backend="xla")
    params = {"w": np.zeros((k, 10), np.float32)}
    tree = trees.tree_record(params)
    store = traker.store
    store.register_model(0, trees.fingerprint(params), tree,
                         {"paths": tree["paths"], "num_params": 10 * k, "proj_dim": k})
    rng = np.random.default_rng(0)
    arrays = store.train_arrays(0)
    for start in range(0, n, chunk):  # q and done; Φ itself is not needed for scoring
        stop = min(start + chunk, n)
        arrays.out_to_loss[start:stop] = rng.uniform(0.0, 1.0, stop - start).astype(np.float32)
    arrays.done[:] = 1
    arrays.out_to_loss.flush()
    arrays.done.flush()
    scale = np.float32(1.0 / np.sqrt(k))

    def fill(out):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            out[start:stop] = rng.standard_normal((stop - start, k), np.float32) * scale

    store.write_features(0, fill, {"lambda_reg": 0.0, "rank": k, "condition": 1.0, "scale": 1.0})
    store.register_target_model("synthetic", t, 0)
    targets = store.target_arrays("synthetic", 0)
    psi = rng.standard_normal((t, k), np.float32)
    store.write_target_rows(targets, np.arange(t), psi)
    del jnp
    return traker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1_000_000)
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args()
    n, t, k = args.train, args.targets, args.proj_dim
    root = pathlib.Path(args.save_dir or tempfile.mkdtemp(prefix="trakjax_score_memory_"))
    save_dir = root / "store"
    shutil.rmtree(save_dir, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"N = {n:,} train, T = {t:,} targets, k = {k}; the score matrix is "
          f"{n * t * 4 / 2**30:.2f} GiB float32")
    import jax

    import trakjax  # noqa: F401

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; RssAnon after imports "
          f"{gib(status_kib('RssAnon')):.2f} GiB")
    start = time.perf_counter()
    with AnonPeak() as peak:
        traker = build_store(save_dir, n, t, k)
    print(f"set-up (synthetic store): {time.perf_counter() - start:.1f} s, peak RssAnon "
          f"{gib(peak.peak):.2f} GiB")
    flops = 2.0 * n * t * k
    results = {}
    for step in ("top_k from features", "finalize_scores", "top_k from the score file"):
        start = time.perf_counter()
        with AnonPeak() as peak:
            if step == "finalize_scores":
                scores = traker.finalize_scores("synthetic")
            else:
                results[step] = traker.top_k("synthetic", args.top)
        seconds = time.perf_counter() - start
        rate = f"{n / seconds:,.0f} train rows/s, {flops / seconds / 1e9:.1f} GFLOP/s" if step != "top_k from the score file" else f"{n * t * 4 / seconds / 2**30:.2f} GiB/s read"
        print(f"{step}: {seconds:.1f} s, {rate}, peak RssAnon {gib(peak.peak):.2f} GiB, "
              f"VmHWM {gib(status_kib('VmHWM')):.2f} GiB (includes file pages)", flush=True)
    first, second = results.values()
    for field in first._fields:
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    features = traker.store.features(0)
    psi = traker.store.target_arrays("synthetic", 0, "r").grads
    q = traker.store.train_arrays(0, "r").out_to_loss
    rows = np.random.default_rng(1).integers(0, n, 64)
    exact = (np.asarray(features[rows], np.float64) @ np.asarray(psi, np.float64).T) * np.asarray(q[rows], np.float64)[:, None]
    error = np.abs(np.asarray(scores[rows]) - exact).max() / np.abs(exact).max()
    best = first.proponents[0]
    check = np.asarray(scores[best, np.arange(t)])
    np.testing.assert_array_equal(check, first.proponent_scores[0])
    print(f"spot check: 64 rows against float64, max relative error {error:.1e}; the two top-k "
          "passes agree and match the stored matrix")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    del scores, features, psi, q, traker
    if args.save_dir is None:
        shutil.rmtree(root)
    else:
        shutil.rmtree(save_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
