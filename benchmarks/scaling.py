"""Scale-out bookkeeping: per-device shard sizes and work over 1, 2, 4, 8 simulated devices, and
the wall time of a 2-process jax.distributed run (gloo CPU collectives) against 1 process.

Simulated CPU devices share one process and its cores, so their wall times say nothing about
speed-up: what this checks is that every device gets an equal share of the examples and of the
per-step FLOPs, that the Gram is reduced (not recomputed), and that scores do not change.

Run:  python benchmarks/scaling.py [--train 1000] [--checkpoints 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def problem(n_train):
    import flax.linen as nn
    import jax
    import numpy as np
    from sklearn.datasets import load_digits

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    model = MLP()
    checkpoints = [model.init(jax.random.key(s), x[:1]) for s in range(2)]
    return model, (x[:n_train], y[:n_train]), (x[1500:1532], y[1500:1532]), checkpoints


def worker(args):
    import jax
    import numpy as np

    if args.mode == "process":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.processes, process_id=args.process_id)
    import trakjax
    from trakjax import Config, featurize, sharding, tasks

    model, train, targets, checkpoints = problem(args.train)
    checkpoints = checkpoints[: args.checkpoints]
    task = tasks.image_classification(model.apply)
    mesh = sharding.data_mesh()
    result = {"devices": len(jax.local_devices()), "process": jax.process_index()}
    if args.mode == "devices":
        config = Config.create(proj_dim=512, batch_size=64, backend="xla", mesh=mesh)
        checkpoint = featurize.prepare_checkpoint(task, checkpoints[0], config)
        batch = (train[0][:checkpoint.micro_batch], train[1][:checkpoint.micro_batch])
        lowered = checkpoint.train_step.lower(
            checkpoint.diff, checkpoint.fixed, batch, None,
            np.arange(checkpoint.micro_batch, dtype=np.int32), featurize.task_key(0, 0, 0),
            checkpoint.proj_key, checkpoint.blocks)
        cost = lowered.compile().cost_analysis()
        result.update(step_examples=checkpoint.micro_batch,
                      examples_per_device=checkpoint.micro_batch // result["devices"],
                      step_flops_per_device=float(cost.get("flops", float("nan"))),
                      train_rows_per_device=-(-args.train // result["devices"]))
    start = time.perf_counter()
    scores = trakjax.attribute(task, checkpoints, train, targets, proj_dim=512, batch_size=64,
                               backend="xla", mesh=mesh)
    result["attribute_seconds"] = time.perf_counter() - start
    if args.out:
        np.save(args.out, scores)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(extra, env_devices=1, processes=None):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={env_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--worker", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc):
    out, err = proc.communicate(timeout=1800)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {err[-1500:]}")
    return json.loads(lines[-1][7:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="devices", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import tempfile

    import numpy as np

    print(f"{os.cpu_count()} CPU cores; N = {args.train} train, 32 targets, k = 512, "
          f"{args.checkpoints} checkpoints, batch 64")
    common = ["--train", str(args.train), "--checkpoints", str(args.checkpoints)]
    with tempfile.TemporaryDirectory() as tmp:
        print("\n| devices | examples/step | examples/device/step | step GFLOP/device | train rows/device | attribute s | max rel. diff vs 1 device |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for devices in (1, 2, 4, 8):
            out = os.path.join(tmp, f"d{devices}.npy")
            r = collect(spawn(common + ["--mode", "devices", "--out", out], env_devices=devices))
            scores = np.load(out)
            base = scores if base is None else base
            rel = np.linalg.norm(scores - base) / np.linalg.norm(base)
            print(f"| {devices} | {r['step_examples']} | {r['examples_per_device']} | "
                  f"{r['step_flops_per_device'] / 1e9:.3f} | {r['train_rows_per_device']} | "
                  f"{r['attribute_seconds']:.1f} | {rel:.1e} |", flush=True)

        one = collect(spawn(common + ["--mode", "single", "--out", os.path.join(tmp, "p1.npy")]))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.perf_counter()
        procs = [spawn(common + ["--mode", "process", "--port", str(port), "--processes", "2",
                                 "--process-id", str(i), "--out", os.path.join(tmp, f"p2_{i}.npy")])
                 for i in range(2)]
        results = [collect(p) for p in procs]
        wall = time.perf_counter() - start
        two = np.load(os.path.join(tmp, "p2_0.npy"))
        rel = np.linalg.norm(two - np.load(os.path.join(tmp, "p1.npy"))) / np.linalg.norm(two)
        print(f"\n1 process: attribute {one['attribute_seconds']:.1f} s; 2 processes (gloo, 127.0.0.1): "
              f"attribute {max(r['attribute_seconds'] for r in results):.1f} s "
              f"(wall incl. start-up {wall:.1f} s); scores rel. diff {rel:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
