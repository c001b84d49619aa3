"""Peak memory of featurizing a 50M-parameter MLP at k = 4096, trakjax against the reference.

An MLP 4096 → 4096 → 4096 → 4096 (about 50.3 million parameters), 16 examples, k = 4096,
Rademacher projection, float32. The 16 per-example gradients alone are about 3.2 GB: trakjax keeps
them as separate leaves (never one (B, P) copy) and generates each chunk of R once, applying it to
all 16 examples. R itself (P·k·4 bytes = 824 GB) is never held.

Each library runs in its own subprocess (so each peak RSS, VmHWM, is its own), the reference
under a timeout and an address-space limit so that it cannot take the machine down.

Run:  python benchmarks/featurize_memory.py [--examples 16] [--reference-timeout 1200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from bench_common import peak_rss_gib

WIDTH = 4096
DEPTH = 3
PROJ_DIM = 4096


def run_trakjax(examples: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trakjax import Config, featurize, tasks

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(DEPTH - 1):
                x = nn.relu(nn.Dense(WIDTH)(x))
            return nn.Dense(WIDTH)(x)  # a 4096-way classifier head

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, WIDTH)))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, WIDTH)).astype(np.float32)
    y = rng.integers(0, WIDTH, examples).astype(np.int32)
    task = tasks.image_classification(model.apply)
    config = Config.create(proj_dim=PROJ_DIM, batch_size=examples, backend="xla")
    checkpoint = featurize.prepare_checkpoint(task, params, config, model_id=0)
    start = time.perf_counter()
    out = featurize.featurize_batch(task, checkpoint, (x, y))
    elapsed = time.perf_counter() - start
    return {
        "library": "trakjax", "num_params": int(num_params), "examples": examples,
        "seconds": elapsed, "examples_per_s": examples / elapsed, "peak_rss_gib": peak_rss_gib(),
        "micro_batch": checkpoint.micro_batch, "matrix_cached": checkpoint.arrays.blocks is not None,
        "finite": bool(np.isfinite(out.features).all()),
    }


def run_reference(examples: int) -> dict:
    import logging
    import tempfile

    import numpy as np
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    layers = []
    for _ in range(DEPTH - 1):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(WIDTH, WIDTH))
    model = torch.nn.Sequential(*layers).eval()
    num_params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(examples, WIDTH)).astype(np.float32))
    y = torch.tensor(rng.integers(0, WIDTH, examples)).long()
    projector = BasicProjector(
        grad_dim=num_params, proj_dim=PROJ_DIM, seed=0, proj_type=ProjectionType.rademacher,
        device="cpu", dtype=torch.float32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(
            model=model, task="image_classification", train_set_size=examples, save_dir=tmp,
            device="cpu", projector=projector, use_half_precision=False, logging_level=logging.ERROR,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        start = time.perf_counter()
        traker.featurize(batch=[x, y], num_samples=examples)
        elapsed = time.perf_counter() - start
    return {
        "library": "reference", "num_params": int(num_params), "examples": examples,
        "seconds": elapsed, "examples_per_s": examples / elapsed, "peak_rss_gib": peak_rss_gib(),
    }


def child(which: str, examples: int, memory_limit_gib: float | None) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--examples", str(examples)]

    def limit():
        if memory_limit_gib:
            size = int(memory_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return cmd, limit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--reference-timeout", type=float, default=1200.0)
    parser.add_argument("--reference-memory-gib", type=float, default=20.0,
                        help="address-space limit for the reference subprocess")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--child", choices=["trakjax", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_trakjax(args.examples) if args.child == "trakjax" else run_reference(args.examples)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    runs = [("trakjax", None, None)]
    if not args.skip_reference:
        runs.append(("reference", args.reference_timeout, args.reference_memory_gib))
    for which, timeout, memory in runs:
        cmd, limit = child(which, args.examples, memory)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
        except subprocess.TimeoutExpired:
            print(f"{which}: did not finish within {timeout:.0f} s", flush=True)
            continue
        wall = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"{which}: failed (exit {proc.returncode}) after {wall:.0f} s"
                  f"{f' under a {memory:.0f} GiB address-space limit' if memory else ''}: {' | '.join(tail)}",
                  flush=True)
            continue
        result = json.loads(lines[-1][7:])
        print(f"{which}: {result['num_params'] / 1e6:.1f}M parameters, {result['examples']} examples, "
              f"k={PROJ_DIM}: {result['examples_per_s']:.3f} ex/s ({result['seconds']:.1f} s), "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB; "
              + ", ".join(f"{k}={v}" for k, v in result.items()
                          if k in ("micro_batch", "matrix_cached", "finite")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
