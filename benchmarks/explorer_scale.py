"""The explorer at scale: 10,000 targets × top-10 over 50,000 CIFAR-sized training images.

Writes the page with :func:`trakjax.explorer.write_explorer` from synthetic top-k records (random
indices and scores: what is timed does not depend on the values), then opens it from disk in
headless Chromium and waits for ``data-ready``. Prints the write time, the page's size on disk,
the thumbnail size the budget allowed, and Chromium's wall time to a dumped DOM, next to the
same for a 10-target page (the browser's own start-up is the small page's time); then the same
top-k over byte sequences shown as decoded text.

    python benchmarks/explorer_scale.py [--targets 10000] [--train 50000] [--k 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from trakjax import explorer, report


class _TopK(NamedTuple):
    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def synthetic(num_train: int, num_targets: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = np.sort(rng.normal(size=(2 * k, num_targets)).astype(np.float32), axis=0)
    top = _TopK(rng.integers(0, num_train, (k, num_targets)), scores[::-1][:k],
                rng.integers(0, num_train, (k, num_targets)), scores[:k])
    labels = rng.integers(0, 10, num_train)
    records = report.top_k_records(top, train_labels=labels, target_labels=rng.integers(0, 10, num_targets))
    train = rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8)
    targets = rng.integers(0, 256, (num_targets, 32, 32, 3), dtype=np.uint8)
    return records, train, targets


def chromium_seconds(page: Path, *output: str) -> tuple[float, bytes]:
    """Wall seconds of one headless Chromium run on ``page`` (fresh profile), and its stdout."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as profile:
        start = time.perf_counter()
        process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--virtual-time-budget=30000", *output, page.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, cwd=profile)
        try:
            out, _ = process.communicate(timeout=300)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        seconds = time.perf_counter() - start
    return seconds, out


def browser_figures(page: Path) -> str:
    """Seconds to a screenshot of the first screen, and to a dumped DOM (which serializes the
    inlined data too), and whether the dumped page was ready without errors."""
    with tempfile.TemporaryDirectory() as where:
        shot, _ = chromium_seconds(page, f"--screenshot={where}/page.png")
    dump, out = chromium_seconds(page, "--dump-dom")
    ok = b'data-ready="1"' in out and b'id="trakjax-errors" hidden' in out
    return f"Chromium to a screenshot {shot:.1f} s, to a dumped DOM {dump:.1f} s (ready, no errors: {ok})"


def measure_text(out: Path, num_train: int, num_targets: int, k: int, length: int = 256) -> None:
    """The same top-k over byte sequences (printable ASCII), shown as decoded text."""
    records, _, _ = synthetic(num_train, num_targets, k)
    rng = np.random.default_rng(1)
    train = rng.integers(32, 127, (num_train, length), dtype=np.int32)
    targets = rng.integers(32, 127, (num_targets, length), dtype=np.int32)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    files = explorer.write_explorer(out, records, train_inputs=train, target_inputs=targets, decoder="bytes")
    write = time.perf_counter() - start
    print(f"{num_targets:>6} targets × top-{k}, {num_train} train sequences of {length} bytes as text: "
          f"write {write:.1f} s; index.html {files[-1].stat().st_size / 2**20:.1f} MiB; "
          f"{browser_figures(files[-1])}")


def measure(out: Path, num_train: int, num_targets: int, k: int) -> None:
    records, train, targets = synthetic(num_train, num_targets, k)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    files = explorer.write_explorer(out, records, train_inputs=train, target_inputs=targets)
    write = time.perf_counter() - start
    page = files[-1]
    pixels = [f for f in files if f.name.startswith("pixels-")]
    text = page.read_text(encoding="utf-8")
    data = json.loads(text[text.index('id="trakjax-data">') + 18 : text.index("</script>\n<noscript>")])
    images = data["images"]
    print(f"{num_targets:>6} targets × top-{k}, {num_train} train images 32×32×3: write {write:.1f} s; "
          f"index.html {page.stat().st_size / 2**20:.1f} MiB; {len(pixels)} thumbnail files, "
          f"{sum(f.stat().st_size for f in pixels) / 2**20:.1f} MiB ({images['height']}×{images['width']} "
          f"thumbnails, subsampling step {images['step']}); {browser_figures(page)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "trakjax-explorer-scale")
    args = parser.parse_args()
    measure(args.out / "small", args.train, 10, args.k)
    measure(args.out / "large", args.train, args.targets, args.k)
    measure_text(args.out / "text", args.train, args.targets, args.k)


if __name__ == "__main__":
    main()
