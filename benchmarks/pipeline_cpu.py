"""Whole-pipeline speed on CPU: trakjax.attribute against the reference (traker 0.3.2), same weights.

Two measurements, each printed as a table with the machine:

* ``cnn`` (default): the 373k-parameter CNN of featurize_cpu.py on 32×32×3 inputs, n = 1024
  training examples, 8 targets, batch 256, k = 2048, float32, one checkpoint, one process;
  trakjax twice, with its defaults (no ``projection`` argument: ``"auto"``, whose resolved family
  is printed) and with ``projection="rademacher"`` (the reference's projection), the reference
  with its Rademacher projection. The whole pipeline (trakjax: ``trakjax.attribute``; the reference: featurize,
  finalize_features, start_scoring_checkpoint + score, finalize_scores) and featurization alone
  (trakjax: prepare_checkpoint (R materialized) + featurize of the 1024 examples; the reference:
  featurize of the same batches), all timed after one warm-up run of everything in the same
  process (compilation excluded), ``--runs`` times; the median is reported. Target: the
  whole-pipeline ratio within 10% of the featurize-only ratio of the same run (fixed
  per-checkpoint costs amortized).
* ``lds-wall``: the LDS benchmark's pipeline (benchmarks/lds_digits.py: 10 checkpoints of a
  64-64-10 MLP on 1000 digits, 797 targets, normal projection, batch 256) timed cold: each
  (library, k) runs in a fresh Python process with an empty JAX compilation cache, compilation
  included, as a user meets it. Printed: seconds from the end of the imports to the scores, and
  the process's whole wall time. Target: trakjax ≤ the reference at k = 2048.

Run:  python benchmarks/pipeline_cpu.py [cnn|lds-wall] [--runs 3] [--proj-dims 1024 2048]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
N_TRAIN, N_TARGETS, BATCH, PROJ_DIM = 1024, 8, 256, 2048


def machine() -> str:
    import jax

    return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, python "
            f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}); load "
            f"average {os.getloadavg()[0]:.1f}")


# --------------------------------------------------------------------------- cnn


def cnn_problem():
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(HERE))
    from featurize_cpu import CNN

    model = CNN()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN + N_TARGETS, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, N_TRAIN + N_TARGETS).astype(np.int32)
    return model, params, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def trakjax_times(model, params, train, targets, projection: str | None = None) -> tuple[float, float]:
    """(whole pipeline s, featurization alone s), after a warm-up of both; ``projection=None``:
    trakjax's default."""
    import trakjax
    from trakjax import featurize, tasks

    task = tasks.image_classification(model.apply)
    settings = dict(proj_dim=PROJ_DIM, batch_size=BATCH, backend="xla")
    if projection is not None:
        settings["projection"] = projection

    def whole():
        return trakjax.attribute(task, [params], train, targets, **settings)

    def features_only():
        checkpoint = featurize.prepare_checkpoint(task, params, trakjax.Config.create(**settings), 0, train)
        return featurize.featurize(task, checkpoint, train, batch_size=BATCH).features

    whole(), features_only()  # compile
    start = time.perf_counter()
    whole()
    middle = time.perf_counter()
    features_only()
    return middle - start, time.perf_counter() - middle


def reference_times(params, train, targets) -> tuple[float, float]:
    """(whole pipeline s, featurization alone s) of traker 0.3.2 on CPU torch, after a warm-up."""
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    sys.path.insert(0, str(HERE))
    from featurize_cpu import torch_cnn

    model = torch_cnn(params)
    x, y = torch.tensor(train[0]), torch.tensor(train[1]).long()
    tx, ty = torch.tensor(targets[0]), torch.tensor(targets[1]).long()

    def run(save_dir):
        projector = BasicProjector(grad_dim=sum(p.numel() for p in model.parameters()), proj_dim=PROJ_DIM,
                                   seed=0, proj_type=ProjectionType.rademacher, device="cpu",
                                   dtype=torch.float32)
        start = time.perf_counter()
        traker = TRAKer(model=model, task="image_classification", train_set_size=N_TRAIN, save_dir=save_dir,
                        device="cpu", projector=projector, use_half_precision=False,
                        logging_level=logging.ERROR)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for b in range(0, N_TRAIN, BATCH):
            traker.featurize(batch=[x[b : b + BATCH], y[b : b + BATCH]], num_samples=BATCH)
        featurized = time.perf_counter()
        traker.finalize_features()
        traker.start_scoring_checkpoint("targets", model.state_dict(), 0, N_TARGETS)
        traker.score(batch=[tx, ty], num_samples=N_TARGETS)
        traker.finalize_scores("targets")
        return time.perf_counter() - start, featurized - start

    with tempfile.TemporaryDirectory() as tmp:
        run(os.path.join(tmp, "warm"))
        return run(os.path.join(tmp, "timed"))


def cnn(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    model, params, train, targets = cnn_problem()
    import trakjax
    from trakjax import featurize, tasks

    default = featurize.resolve_auto_projection(tasks.image_classification(model.apply), params,
                                                trakjax.Config.create(proj_dim=PROJ_DIM), init_data=train)
    resolved = default.result.projection
    rows = []
    for run in range(args.runs):
        measured = [trakjax_times(model, params, train, targets, projection) for projection in (None, "rademacher")]
        ref_whole, ref_features = reference_times(params, train, targets)
        rows.append([N_TRAIN / ref_whole, N_TRAIN / ref_features]
                    + [N_TRAIN / seconds for pair in measured for seconds in pair])
        print(f"run {run}: reference whole {rows[-1][0]:.1f} ex/s; trakjax defaults ({resolved}) whole "
              f"{rows[-1][2]:.1f}, rademacher whole {rows[-1][4]:.1f} ex/s", flush=True)
    med = [statistics.median(r[i] for r in rows) for i in range(6)]
    print(f"\n{machine()}")
    print(f"CNN (373k parameters), n = {N_TRAIN}, {N_TARGETS} targets, batch {BATCH}, k = {PROJ_DIM}; "
          f"median of {args.runs} runs; trakjax's defaults resolve projection='auto' to {resolved!r}\n")
    print("| trakjax | stage | trakjax ex/s | reference ex/s | trakjax / reference |")
    print("|---|---|---|---|---|")
    for name, whole, features in ((f"defaults ({resolved})", med[2], med[3]), ("projection='rademacher'", med[4], med[5])):
        print(f"| {name} | whole pipeline (featurize, solve, score) | {whole:.1f} | {med[0]:.1f} | {whole / med[0]:.2f}× |")
        print(f"| {name} | featurization alone | {features:.1f} | {med[1]:.1f} | {features / med[1]:.2f}× |")
    print(f"\nwith defaults: whole-pipeline ratio {med[2] / med[0]:.2f}× (target ≥ 10×)")


# --------------------------------------------------------------------------- lds-wall


def lds_child(library: str, k: int, data: str) -> None:
    """One cold pipeline in this fresh process; prints a JSON line of seconds."""
    imported = time.perf_counter()
    with np.load(data, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    train = (arrays["train_x"], arrays["train_y"])
    targets = (arrays["target_x"], arrays["target_y"])
    m = sum(1 for name in arrays if name.endswith("/params/Dense_0/kernel"))
    checkpoints = [{"params": {layer: {w: arrays[f"{i}/params/{layer}/{w}"] for w in ("bias", "kernel")}
                               for layer in ("Dense_0", "Dense_1")}} for i in range(m)]
    hidden = checkpoints[0]["params"]["Dense_0"]["kernel"].shape[1]
    sys.path.insert(0, str(HERE))
    if library == "trakjax":
        from lds_digits import MLP

        import trakjax
        from trakjax import tasks

        imported = time.perf_counter()
        scores = trakjax.attribute(tasks.image_classification(MLP(hidden).apply), checkpoints, train, targets,
                                   proj_dim=k, projection="normal", batch_size=256, backend="xla")
    else:
        import tempfile as tf

        from lds_digits import Reference

        imported = time.perf_counter()
        with tf.TemporaryDirectory() as tmp:
            ref = Reference(checkpoints, train, targets, k, hidden, False, os.path.join(tmp, "store"))
            scores, _ = ref.scores(0.01 * ref.mean_sq_norm)  # one finalize + score, as trakjax does
    print(json.dumps({"seconds": time.perf_counter() - imported, "finite": bool(np.isfinite(scores).all())}))


def lds_wall(args) -> None:
    import jax

    sys.path.insert(0, str(HERE))
    from lds_digits import MLP, digits, train_checkpoints

    train, targets = digits(1000)
    checkpoints = train_checkpoints(MLP(64), train, 200)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="trakjax_wall_"))
    data = tmp / "inputs.npz"
    flat = {f"{i}/" + "/".join(str(k.key) for k in path): np.asarray(leaf)
            for i, params in enumerate(checkpoints)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(data, train_x=train[0], train_y=train[1], target_x=targets[0], target_y=targets[1], **flat)
    results = {}
    for k in args.proj_dims:
        for library in ("trakjax", "reference"):
            cache = tmp / f"empty_cache_{library}_{k}"  # cold: nothing compiled yet
            env = dict(os.environ, TQDM_DISABLE="1", JAX_COMPILATION_CACHE_DIR=str(cache))
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "lds-child", library, str(k), str(data)],
                                  capture_output=True, text=True, env=env, check=True)
            total = time.perf_counter() - start
            child = json.loads(done.stdout.strip().splitlines()[-1])
            results[library, k] = (child["seconds"], total)
            print(f"k={k} {library}: {child['seconds']:.1f} s after imports, {total:.1f} s in all "
                  f"(finite scores: {child['finite']})", flush=True)
    print(f"\n{machine()}")
    print("LDS benchmark pipeline, cold (fresh process, empty compilation cache): 10 checkpoints, "
          "MLP 64-64-10, N = 1000, T = 797, normal projection, batch 256\n")
    print("| k | trakjax s (after imports) | reference s (after imports) | trakjax process s | reference process s |")
    print("|---|---|---|---|---|")
    for k in args.proj_dims:
        ours, ref = results["trakjax", k], results["reference", k]
        print(f"| {k} | {ours[0]:.1f} | {ref[0]:.1f} | {ours[1]:.1f} | {ref[1]:.1f} |")


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "lds-child":
        lds_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="cnn", choices=["cnn", "lds-wall"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--proj-dims", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args(argv)
    cnn(args) if args.mode == "cnn" else lds_wall(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
