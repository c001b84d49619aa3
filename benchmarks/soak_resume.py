"""Soak test of resume: SIGKILL a TRAKer run at random moments, restart it, compare bit for bit.

Set-up: a 64-16-10 MLP trained for 30 Adam steps (optax) on 192 digits, two checkpoints saved with
orbax; k = 32, batches of 16, 32 targets. A worker process runs the reference sequence of calls
(load_checkpoint/featurize per model, finalize_features, start_scoring_checkpoint/score per model,
finalize_scores). One uninterrupted worker run gives the reference store. Then, trial after trial,
a worker is started on a fresh store and killed with SIGKILL after a random delay (uniform over the
uninterrupted run's duration, from when its imports are done), restarted with the same calls and
killed again, up to --kills-per-trial times, then run to the end. Each finished store's arrays
(Φ, q, F, Ψ, scores) are compared with the reference's byte for byte.

Reported: kills survived (kills that landed before the run's work was done, each followed by a
restart), runs identical, bytes lost
(bytes of the finished stores' arrays that differ from the reference, plus temporary files left
behind), rows featurized more than once (work redone: rows whose featurization had started but
was not yet marked done when a kill landed), and where the kills landed.

Concurrent trials (``--concurrent-trials``, default 10 of each):

* two sessions finalizing one experiment's scores at the same moment with different model_ids
  ([0, 1] and [1]), in two processes, with small score blocks so that their writes interleave;
  each must get exactly its own matrix (compared byte for byte with a single process's), and the
  store must end with a complete record;
* two ``trakjax attribute --config`` runs started together on one output directory: both must
  exit 0, the scores must equal a single run's byte for byte, and ``trakjax show`` must redraw it.

Run:  python benchmarks/soak_resume.py [--kills 50] [--kills-per-trial 5] [--seed 0]
      [--concurrent-trials 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

N_TRAIN = 192
N_TARGETS = 32
PROJ_DIM = 32
BATCH = 16
NUM_MODELS = 2
EXPERIMENT = "soak"
ARRAYS = ("grads.npy", "out_to_loss.npy", "output_shift.npy", "curvature.npy", "done.npy", "features.npy")


# --------------------------------------------------------------------------- the worker


def _digits(path):
    with np.load(path) as f:
        images, labels = f["images"].astype(np.float32) / 16.0, f["labels"].astype(np.int32)
    train = (images[:N_TRAIN], labels[:N_TRAIN])
    targets = (images[N_TRAIN : N_TRAIN + N_TARGETS], labels[N_TRAIN : N_TRAIN + N_TARGETS])
    return train, targets


def _model():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))

    return MLP()


def worker(save_dir: str, spec: dict) -> None:
    """The reference-style calls; progress lines go to spec["log"] (appended, flushed)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", spec["jax_cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import trakjax
    from trakjax import featurize as featurize_lib
    from trakjax import tasks

    log = open(spec["log"], "a", buffering=1)
    real_featurize_batch = featurize_lib.featurize_batch

    def logged_featurize_batch(task, checkpoint, batch, indices=None, **kw):
        if kw.get("split", featurize_lib.TRAIN_SPLIT) == featurize_lib.TRAIN_SPLIT:
            log.write(f"rows {np.unique(indices).size}\n")  # before computing: work started
        return real_featurize_batch(task, checkpoint, batch, indices, **kw)

    featurize_lib.featurize_batch = logged_featurize_batch
    train, targets = _digits(spec["digits"])
    task = tasks.image_classification(_model().apply)
    print("ready", flush=True)
    log.write("phase start\n")
    traker = trakjax.TRAKer(task, N_TRAIN, save_dir, proj_dim=PROJ_DIM, seed=7, batch_size=BATCH,
                            backend="xla")
    for model_id, path in enumerate(spec["checkpoints"]):
        log.write(f"phase featurize model {model_id}\n")
        traker.load_checkpoint(path, model_id)
        for start in range(0, N_TRAIN, BATCH):
            batch = (train[0][start : start + BATCH], train[1][start : start + BATCH])
            traker.featurize(batch, num_samples=BATCH)
    log.write("phase finalize_features\n")
    traker.finalize_features()
    for model_id, path in enumerate(spec["checkpoints"]):
        log.write(f"phase score model {model_id}\n")
        traker.start_scoring_checkpoint(EXPERIMENT, path, model_id, N_TARGETS)
        for start in range(0, N_TARGETS, BATCH):
            traker.score((targets[0][start : start + BATCH], targets[1][start : start + BATCH]),
                         inds=np.arange(start, start + BATCH))
    log.write("phase finalize_scores\n")
    traker.finalize_scores(EXPERIMENT)
    log.write("phase finished\n")
    log.close()
    print("finished", flush=True)
    os._exit(0)  # skip interpreter teardown, so that kills land in the work


def finalize_worker(save_dir: str, spec: dict) -> None:
    """Finalize the experiment's scores for spec["model_ids"]; save what the call returned."""
    import jax

    jax.config.update("jax_compilation_cache_dir", spec["jax_cache"])
    import trakjax
    from trakjax import tasks

    traker = trakjax.TRAKer(tasks.image_classification(_model().apply), N_TRAIN, save_dir,
                            proj_dim=PROJ_DIM, seed=7, batch_size=BATCH, backend="xla",
                            score_block_rows=BATCH)
    print("ready", flush=True)
    time.sleep(spec["delay"])
    np.save(spec["out"], np.asarray(traker.finalize_scores(EXPERIMENT, spec["model_ids"])))
    os._exit(0)


# --------------------------------------------------------------------------- the driver


def prepare(workdir: pathlib.Path) -> dict:
    """Digits on disk, two trained checkpoints saved with orbax; the worker spec."""
    import jax
    import optax
    import orbax.checkpoint as ocp
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    digits_path = workdir / "digits.npz"
    np.savez(digits_path, images=images, labels=labels)
    (x, y), _ = _digits(digits_path)
    model = _model()
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    paths = []
    for seed in range(NUM_MODELS):
        params = model.init(jax.random.key(seed), x[:1])
        state = optimizer.init(params)
        for _ in range(30):
            params, state = step(params, state)
        path = str(workdir / f"checkpoint_{seed}")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
        paths.append(path)
    return {"checkpoints": paths, "digits": str(digits_path),
            "jax_cache": str(workdir / "jax_cache")}


def start_worker(save_dir: pathlib.Path, spec: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", str(save_dir), json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def store_arrays(root: pathlib.Path) -> dict[str, bytes]:
    """{relative path: bytes} of the arrays that hold results."""
    out = {}
    for model_id in range(NUM_MODELS):
        for name in ARRAYS:
            path = root / "models" / str(model_id) / name
            out[str(path.relative_to(root))] = path.read_bytes()
        for name in ("grads.npy", "done.npy"):
            path = root / "experiments" / EXPERIMENT / "targets" / str(model_id) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    path = root / "experiments" / EXPERIMENT / "scores.npy"
    out[str(path.relative_to(root))] = path.read_bytes()
    return out


def differing_bytes(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        return max(len(a), len(b))
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    return int((x != y).sum())


def last_phase(log: pathlib.Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("phase ")]
    return lines[-1][len("phase "):] if lines else "imports"


def concurrent_finalize_trials(workdir: pathlib.Path, spec: dict, reference_dir: pathlib.Path,
                               trials: int, rng: random.Random) -> tuple[int, int]:
    """Two processes finalize [0, 1] and [1] at once; returns (runs with both correct, bytes lost)."""

    def finalize(save_dir, ids, out, delay=0.0):
        job = dict(spec, model_ids=ids, out=str(out), delay=delay)
        return subprocess.Popen([sys.executable, __file__, "--finalize-worker", str(save_dir), json.dumps(job)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def clean_copy(name):
        """The reference store with every feature and target written, and no score matrix."""
        target = workdir / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(reference_dir, target)
        experiment = target / "experiments" / EXPERIMENT
        (experiment / "scores.npy").unlink()
        info = json.loads((experiment / "experiment.json").read_text())
        (experiment / "experiment.json").write_text(json.dumps(dict(info, scores=None)))
        return target

    expected = {}
    for ids in ([0, 1], [1]):  # one process alone, each model_id set
        store = clean_copy("alone")
        process = finalize(store, ids, workdir / "alone.npy")
        process.stdout.readline()
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(err[-3000:])
        expected[tuple(ids)] = (workdir / "alone.npy").read_bytes()
    good = lost = 0
    for trial in range(trials):
        store = clean_copy(f"concurrent_{trial}")
        outs = {ids: workdir / f"concurrent_{trial}_{len(ids)}.npy" for ids in expected}
        processes = [finalize(store, list(ids), outs[ids], rng.uniform(0.0, 0.3)) for ids in expected]
        for process in processes:
            process.stdout.readline()
        for process in processes:
            _, err = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"a concurrent finalize failed:\n{err[-3000:]}")
        trial_lost = sum(differing_bytes(outs[ids].read_bytes(), expected[ids]) for ids in expected)
        info = json.loads((store / "experiments" / EXPERIMENT / "experiment.json").read_text())
        complete = bool(info["scores"] and info["scores"]["complete"])
        final = (store / "experiments" / EXPERIMENT / "scores.npy").read_bytes()
        trial_lost += differing_bytes(final, expected[tuple(info["scores"]["model_ids"])]) if complete else len(final)
        good += trial_lost == 0 and complete
        lost += trial_lost
        print(f"concurrent finalize trial {trial}: bytes lost {trial_lost}, record complete for "
              f"{info['scores']['model_ids'] if complete else None}", flush=True)
        shutil.rmtree(store)
    return good, lost


CLI_MODEL = """
import flax.linen as nn

class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.tanh(nn.Dense(8)(x)))

model = Tiny()
"""


def concurrent_cli_trials(workdir: pathlib.Path, spec: dict, trials: int) -> tuple[int, int]:
    """Two ``trakjax attribute`` runs on one output at once; returns (good runs, bytes lost)."""
    import jax
    import orbax.checkpoint as ocp

    project = workdir / "cli_project"
    project.mkdir(exist_ok=True)
    (project / "soak_cli_model.py").write_text(CLI_MODEL)
    (train, labels), (test, test_labels) = _digits(spec["digits"])
    for name, array in (("x", train), ("y", labels), ("tx", test), ("ty", test_labels)):
        np.save(project / f"{name}.npy", array)
    sys.path.insert(0, str(project))
    import soak_cli_model

    with ocp.StandardCheckpointer() as checkpointer:
        for m in range(2):
            checkpointer.save(project / "ckpt" / str(m), soak_cli_model.model.init(jax.random.key(m), train[:1]))

    def config(out):
        path = out.parent / f"{out.name}.toml"
        path.write_text(f'model = "soak_cli_model:model"\ntask = "image_classification"\n'
                        f'checkpoints = ["{project}/ckpt/0", "{project}/ckpt/1"]\noutput = "{out}"\n'
                        f'proj_dim = {PROJ_DIM}\nbatch_size = {BATCH}\npython_path = ["{project}"]\n\n[data]\n'
                        f'train_inputs = "{project}/x.npy"\ntrain_labels = "{project}/y.npy"\n'
                        f'target_inputs = "{project}/tx.npy"\ntarget_labels = "{project}/ty.npy"\n')
        return path

    env = dict(os.environ, TRAKJAX_JAX_CACHE=spec["jax_cache"])

    def cli(*args):
        return subprocess.Popen([sys.executable, "-m", "trakjax", *args, "--quiet"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    alone = workdir / "cli_alone"
    shutil.rmtree(alone, ignore_errors=True)
    if cli("attribute", "--config", str(config(alone))).wait() != 0:
        raise RuntimeError("a single trakjax attribute run failed")
    expected = (alone / "store" / "experiments" / "targets" / "scores.npy").read_bytes()
    good = lost = 0
    for trial in range(trials):
        out = workdir / f"cli_{trial}"
        shutil.rmtree(out, ignore_errors=True)
        path = config(out)
        runs = [cli("attribute", "--config", str(path)) for _ in range(2)]
        codes = [run.wait() for run in runs]
        errors = [run.stderr.read().strip() for run in runs]
        scores = out / "store" / "experiments" / "targets" / "scores.npy"
        trial_lost = differing_bytes(scores.read_bytes(), expected) if scores.exists() else len(expected)
        shown = cli("show", str(out)).wait()
        ok = codes == [0, 0] and shown == 0 and trial_lost == 0
        good += ok
        lost += trial_lost
        print(f"concurrent CLI trial {trial}: exit codes {codes}, show {shown}, bytes lost {trial_lost}"
              + ("" if ok else f"; stderr {errors}"), flush=True)
        shutil.rmtree(out)
    return good, lost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--kills-per-trial", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the stores here (default: a temp dir)")
    parser.add_argument("--concurrent-trials", type=int, default=10,
                        help="trials of each concurrent scenario (0 skips them)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="trakjax_soak_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    spec = prepare(workdir)

    def run(save_dir, log, kill_after=None):
        """One worker; SIGKILL it ``kill_after`` s after its imports. Returns (killed, seconds)."""
        process = start_worker(save_dir, dict(spec, log=str(log)))
        line = process.stdout.readline().strip()
        if line != "ready":
            _, err = process.communicate()
            raise RuntimeError(f"worker failed before its work:\n{err[-3000:]}")
        start = time.perf_counter()
        killed = False
        if kill_after is not None:
            try:
                process.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
        _, err = process.communicate()
        if not killed and process.returncode != 0:
            raise RuntimeError(f"worker failed ({process.returncode}):\n{err[-3000:]}")
        return killed, time.perf_counter() - start

    reference_dir = workdir / "reference"
    shutil.rmtree(reference_dir, ignore_errors=True)
    run(reference_dir, workdir / "reference.log")  # compiles into the cache
    shutil.rmtree(reference_dir)
    _, duration = run(reference_dir, workdir / "reference.log")
    reference = store_arrays(reference_dir)
    rows_needed = NUM_MODELS * N_TRAIN
    print(f"uninterrupted run: {duration:.2f} s of work after imports; "
          f"{sum(len(b) for b in reference.values())} bytes of result arrays")

    kills = 0
    trials = []
    landed = collections.Counter()
    started = time.perf_counter()
    while kills < args.kills:
        trial = len(trials)
        save_dir = workdir / f"trial_{trial}"
        log = workdir / f"trial_{trial}.log"
        shutil.rmtree(save_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
        trial_kills = 0
        for _ in range(args.kills_per_trial):
            killed, _ = run(save_dir, log, kill_after=rng.uniform(0.0, duration))
            if not killed:
                break
            phase = last_phase(log)
            landed[phase] += 1
            if phase == "finished":  # the work was done; the kill hit the exit
                break
            trial_kills += 1
        if last_phase(log) != "finished":
            run(save_dir, log)
        kills += trial_kills
        result = store_arrays(save_dir)
        lost = sum(differing_bytes(result[k], reference[k]) for k in reference)
        leftovers = [p for p in save_dir.rglob("*") if ".tmp." in p.name]
        lost += sum(p.stat().st_size for p in leftovers)
        rows = sum(int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("rows "))
        trials.append({"kills": trial_kills, "identical": lost == 0, "bytes_lost": lost,
                       "rows_redone": rows - rows_needed})
        print(f"trial {trial}: {trial_kills} kills, identical={lost == 0}, bytes lost {lost}, "
              f"rows featurized more than once {rows - rows_needed}", flush=True)
        shutil.rmtree(save_dir)
    elapsed = time.perf_counter() - started
    survived = sum(t["kills"] for t in trials)
    killed_runs = [t for t in trials if t["kills"] > 0]
    print()
    print(f"kills survived: {survived} (in {len(killed_runs)} killed runs of {len(trials)} trials), "
          f"{elapsed:.0f} s")
    print(f"runs identical to the uninterrupted run: {sum(t['identical'] for t in trials)} / {len(trials)}")
    print(f"bytes lost: {sum(t['bytes_lost'] for t in trials)}")
    print(f"rows featurized more than once (work redone after a kill): "
          f"{sum(t['rows_redone'] for t in trials)} of {rows_needed * len(trials)} rows featurized")
    print("where the kills landed (last phase logged; 'finished' = after the work, not counted "
          "above): " + ", ".join(f"{k}: {v}" for k, v in sorted(landed.items())))
    concurrent_ok = True
    if args.concurrent_trials:
        good, lost = concurrent_finalize_trials(workdir, spec, reference_dir, args.concurrent_trials, rng)
        print(f"concurrent finalize_scores with model_ids [0, 1] and [1]: {good} / "
              f"{args.concurrent_trials} trials each got its own matrix; bytes lost {lost}")
        cli_good, cli_lost = concurrent_cli_trials(workdir, spec, args.concurrent_trials)
        print(f"two trakjax attribute runs on one output: {cli_good} / {args.concurrent_trials} "
              f"trials both exited 0 with identical scores and show redrew it; bytes lost {cli_lost}")
        concurrent_ok = good == cli_good == args.concurrent_trials
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.workdir is None:
        shutil.rmtree(workdir)
    return 0 if all(t["identical"] for t in trials) and concurrent_ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--finalize-worker":
        finalize_worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main())
