"""The fixed (per-checkpoint) cost of an ensemble of checkpoints, on the GPT-2 shapes (issue 19).

TRAK averages over an ensemble of M checkpoints. What a checkpoint costs besides its examples,
its fixed cost, is paid M times: splitting the parameters, planning the factorization (tracing
the model), drawing the projection (R blocks or factor matrices), sizing micro-batches, and
compiling (or re-using) the jitted featurize step. Issue 19's target: every checkpoint after the
first costs at most a quarter of the first's fixed cost, reading the weights aside.

The models are the GPT-2-shaped Flax NNX language models of benchmarks/factorized.py (imported
from it, with ``tasks.language_modeling``): ``2l`` is 2 layers, d 256, vocab 8192, 64 positions;
``4l`` is 4 layers, d 768, vocab 50257, 128 positions. Checkpoint m is the same model
initialized from seed m (all M held in memory before any timing, so reading weights is aside).

Three measurements per shape and projection family, each in a fresh process (its own compile
caches; no persistent JAX compilation cache, so compile time counts as a user meets it):

1. ``sequence``: for m = 0 .. M − 1 in one process, the wall time of
   ``featurize.prepare_checkpoint(task, params_m, config, model_id=m, init_data=train)`` (with
   ``spec=`` the previous checkpoint's plan where trakjax takes it, as its pipeline does), then of
   ``featurize_batch`` on one fixed batch of 2 sequences (first call: compiles if needed), then
   the same batch again (steady state). The fixed cost is prepare + (first − repeat) batch; the
   table gives it per checkpoint with its ratio to checkpoint 0, the model traces (calls of the
   model's apply function: tracing runs the Python function) and, where the library's functions
   can still be found under their current names, a breakdown of prepare_checkpoint.
2. ``attribute``: the whole ``trakjax.attribute`` call on 4 train and 2 target sequences, for
   M = 1 and M = ``--checkpoints``: (t_M − t_1)/(M − 1) is the marginal cost of a checkpoint.
3. The model traces of each ``attribute`` call (issue 19: they must not grow with M).

Families: ``factorized`` (factor_dims 64, proj_dim 2048) and ``rademacher`` (dense). The dense
family generates R on the fly (P·k·4 bytes exceed the 4 GiB matrix cache at these shapes), which
is per-batch work, not per-checkpoint; at 4 layers (P = 67M) that is prohibitive on a CPU, so
the dense family at ``4l`` differentiates only the last block (``--dense-grad-wrt-4l``) at
proj_dim 512 (``--dense-proj-dim-4l``): the fixed cost it shows is what a checkpoint costs
beside its examples, which is what this script is about.

The k × k solve of each checkpoint runs in numpy/scipy's BLAS (OpenBLAS), whose threads spin
against XLA's on a loaded CPU: on the shared 2-core machine a 2048 × 2048 float64 Cholesky
inverse took 0.5–10 s with OpenBLAS's default threads and a steady 0.4–0.8 s with one.
``--blas-threads 1`` sets OPENBLAS/OMP/MKL_NUM_THREADS in the measured processes; the solve path
taken (Cholesky or eigendecomposition) is printed with the attribute table.

Run:  python benchmarks/ensemble_fixed_cost.py [--shape 2l|4l|both] [--checkpoints 10]
      [--families factorized,rademacher] [--blas-threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SHAPES = {
    "2l": dict(layers=2, d=256, vocab=8192, positions=64),
    "4l": dict(layers=4, d=768, vocab=50257, positions=128),
}
N_TRAIN, N_TARGETS, TINY_BATCH = 4, 2, 2
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
NO_CACHE_NOTE = "no persistent JAX compilation cache (jax_enable_compilation_cache=False): compile time counts"


def _disable_compilation_cache() -> None:
    """No persistent compilation cache: every process compiles as a user's first run does."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def load() -> str:
    """The machine's load average (1, 5, 15 minutes) as ``uptime`` prints it."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def family_settings(family: str, shape: str, args) -> dict:
    """The Config settings of one projection family at one shape."""
    common = dict(batch_size=8, backend="xla", progress=False)
    if family == "factorized":
        return dict(common, projection="factorized", factor_dims=64, proj_dim=2048, grad_wrt=["params"])
    if shape == "4l":
        return dict(common, projection=family, proj_dim=args.dense_proj_dim_4l, grad_wrt=[args.dense_grad_wrt_4l])
    return dict(common, projection=family, proj_dim=2048, grad_wrt=["params"])


# --------------------------------------------------------------------------- instrumentation


class Timers:
    """Wall time and call count of library functions, wrapped by module attribute. A function
    the library no longer calls under that name (an API refactor) reads as not called."""

    def __init__(self):
        self.totals: dict[str, list] = {}

    def wrap(self, module, name: str, label: str) -> bool:
        import jax

        function = getattr(module, name, None)
        if function is None or not callable(function):
            return False
        totals = self.totals.setdefault(label, [0, 0.0])

        @functools.wraps(function)  # keeps the signature (sequence_child reads prepare_checkpoint's)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            value = function(*args, **kwargs)
            jax.block_until_ready(value)  # time the work, not its dispatch
            totals[0] += 1
            totals[1] += time.perf_counter() - start
            return value

        setattr(module, name, timed)
        return True

    def snapshot(self) -> dict:
        return {label: (calls, seconds) for label, (calls, seconds) in self.totals.items()}


def instrument(timers: Timers) -> list[str]:
    """Wrap the parts of prepare_checkpoint that exist under today's names; returns those found."""
    from trakjax import featurize

    found = []
    candidates = [(featurize, "_factorized_projection", "factorized projection (all)"),
                  (featurize, "_dense_projection", "dense projection (R key/blocks)"),
                  (featurize, "_task_state", "task state (task.init)"),
                  (featurize, "resolve_auto_projection", "resolve auto projection"),
                  (featurize, "prepare_checkpoint", "prepare_checkpoint")]
    try:
        from trakjax import factorized
    except ImportError:
        factorized = None
    if factorized is not None:
        candidates += [(factorized, "plan_factorization", "plan_factorization"),
                       (factorized, "factor_matrices", "factor_matrices"),
                       (factorized, "activation_bytes_per_example", "activation_bytes_per_example")]
    for module, name, label in candidates:
        if timers.wrap(module, name, label):
            found.append(label)
    return found


def instrument_attribute(timers: Timers) -> list[str]:
    """Wrap the stages of an attribute call that exist under today's names; returns those found."""
    import importlib

    found = []
    candidates = [("trakjax.attribution", "check_targets_fit", "check_targets_fit"),
                  ("trakjax.featurize", "resolve_auto_projection", "resolve_auto_projection"),
                  ("trakjax.featurize", "prepare_checkpoint", "prepare_checkpoint"),
                  ("trakjax.featurize", "featurize", "featurize (train and targets)"),
                  ("trakjax.pipeline", "checkpoint_kernel", "checkpoint_kernel (Gram, λ, solve)"),
                  ("trakjax.solve", "gram", "  within it: gram"),
                  ("trakjax.regularization", "ridge_statistics", "  within it: ridge_statistics"),
                  ("trakjax.solve", "solve", "  within it: solve"),
                  ("trakjax.solve", "apply_inverse", "apply_inverse"),
                  ("trakjax.scores", "checkpoint_scores", "checkpoint_scores")]
    for module_name, name, label in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if timers.wrap(module, name, label):
            found.append(label)
    return found


def counted_task(apply_fn, counter: list):
    """``tasks.language_modeling`` over ``apply_fn`` wrapped to count its Python calls (traces)."""
    from trakjax import tasks

    def apply(*args, **kwargs):
        counter[0] += 1
        return apply_fn(*args, **kwargs)

    return tasks.language_modeling(apply)


def checkpoints_and_data(spec: dict, count: int):
    """(apply_fn, M parameter pytrees from seeds 0 .. M − 1, train ids, target ids)."""
    import trakjax

    sys.path.insert(0, str(HERE))
    from factorized import gpt2_model

    shape = dict(layers=spec["layers"], d=spec["d"], heads=max(spec["d"] // 64, 1), vocab=spec["vocab"],
                 positions=spec["positions"])
    model = trakjax.flax.from_nnx(gpt2_model(**shape, seed=0))
    params = [model.params] + [trakjax.flax.nnx_params(gpt2_model(**shape, seed=m)) for m in range(1, count)]
    rng = np.random.default_rng(0)
    train = rng.integers(0, spec["vocab"], (N_TRAIN, spec["positions"])).astype(np.int32)
    targets = rng.integers(0, spec["vocab"], (N_TARGETS, spec["positions"])).astype(np.int32)
    return model.apply_fn, params, train, targets


# --------------------------------------------------------------------------- children


def sequence_child(spec: dict) -> dict:
    """Per checkpoint: prepare_checkpoint, featurize_batch (first, repeat), traces, breakdown."""
    import jax

    import trakjax
    from trakjax import featurize

    apply_fn, params, train, _ = checkpoints_and_data(spec, spec["checkpoints"])
    counter = [0]
    task = counted_task(apply_fn, counter)
    config = trakjax.Config.create(**spec["settings"])
    timers = Timers()
    found = instrument(timers)
    batch, indices = train[:TINY_BATCH], np.arange(TINY_BATCH)
    rows = []
    # The run's plan is passed on as the pipeline and TRAKer do (trakjax versions whose
    # prepare_checkpoint takes spec=; older ones plan every checkpoint).
    takes_spec = "spec" in inspect.signature(featurize.prepare_checkpoint).parameters
    planned = {}
    for m, params_m in enumerate(params):
        traces, before = counter[0], timers.snapshot()
        start = time.perf_counter()
        checkpoint = featurize.prepare_checkpoint(task, params_m, config, model_id=m, init_data=train, **planned)
        if takes_spec:
            planned = {"spec": checkpoint.spec}
        jax.block_until_ready(checkpoint)  # whatever arrays it holds (its fields may change)
        prepared = time.perf_counter()
        jax.block_until_ready(featurize.featurize_batch(task, checkpoint, batch, indices))
        first = time.perf_counter()
        jax.block_until_ready(featurize.featurize_batch(task, checkpoint, batch, indices))
        repeat = time.perf_counter()
        after = timers.snapshot()
        breakdown = {label: [after[label][0] - before.get(label, (0, 0.0))[0],
                             after[label][1] - before.get(label, (0, 0.0))[1]] for label in after}
        rows.append(dict(checkpoint=m, prepare_s=prepared - start, first_batch_s=first - prepared,
                         repeat_batch_s=repeat - first, traces=counter[0] - traces, breakdown=breakdown))
        print(f"  checkpoint {m}: {rows[-1]}", file=sys.stderr, flush=True)
        del checkpoint
    return dict(rows=rows, instrumented=found)


def attribute_child(spec: dict) -> dict:
    """The whole attribute call on N_TRAIN train and N_TARGETS targets with M checkpoints."""
    import trakjax

    apply_fn, params, train, targets = checkpoints_and_data(spec, spec["checkpoints"])
    counter = [0]
    task = counted_task(apply_fn, counter)
    timers = Timers()
    instrument_attribute(timers)
    methods = record_solve_methods()
    start = time.perf_counter()
    scores = trakjax.attribute(task, params, train, targets, **spec["settings"])
    seconds = time.perf_counter() - start
    if not np.isfinite(scores).all():
        raise RuntimeError("non-finite scores")
    return dict(seconds=seconds, traces=counter[0], breakdown=timers.snapshot(), solve_methods=methods)


def record_solve_methods() -> list:
    """Wrap ``trakjax.solve.solve`` to record each solve's path ("cholesky" or "eigh")."""
    from trakjax import solve as solve_lib

    methods: list = []
    inner = getattr(solve_lib, "solve", None)
    if inner is None:
        return methods

    def recording(*args, **kwargs):
        solved = inner(*args, **kwargs)
        methods.append(getattr(solved, "method", None))
        return solved

    solve_lib.solve = recording
    return methods


def run_child(kind: str, spec: dict, blas_threads: int | None = None) -> tuple[dict, str, str, float]:
    """One measurement in a fresh process; returns (result, load before, load after, wall s)."""
    environment = dict(os.environ, TQDM_DISABLE="1")
    if blas_threads is not None:  # numpy/scipy's BLAS (the k × k solve), not XLA's thread pool
        environment.update({name: str(blas_threads) for name in BLAS_THREAD_VARIABLES})
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    before, start = load(), time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "child", kind, json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, env=environment)
    wall, after = time.perf_counter() - start, load()
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1]), before, after, wall


# --------------------------------------------------------------------------- report


def print_sequence(title: str, result: dict, before: str, after: str, wall: float) -> None:
    rows = result["rows"]
    fixed = [r["prepare_s"] + max(r["first_batch_s"] - r["repeat_batch_s"], 0.0) for r in rows]
    print(f"\n{title}: per-checkpoint fixed cost (process {wall:.0f} s; load average {before} → {after})")
    print("fixed = prepare_checkpoint + (first − repeat) featurize_batch of 2 sequences\n")
    print("| checkpoint | prepare_checkpoint s | first batch s | repeat batch s | fixed s | fixed / ckpt 0 "
          "| model traces |")
    print("|---|---|---|---|---|---|---|")
    for r, f in zip(rows, fixed, strict=True):
        print(f"| {r['checkpoint']} | {r['prepare_s']:.2f} | {r['first_batch_s']:.2f} | {r['repeat_batch_s']:.2f} "
              f"| {f:.2f} | {f / fixed[0]:.2f} | {r['traces']} |")
    later = fixed[1:]
    if later:
        print(f"\ncheckpoints 1..{len(rows) - 1}: mean fixed {np.mean(later):.2f} s, max ratio "
              f"{max(later) / fixed[0]:.2f} (target ≤ 0.25)")
    labels = [label for label in rows[0]["breakdown"] if label != "prepare_checkpoint"]
    if labels:
        print("\nbreakdown of prepare_checkpoint, seconds (calls), checkpoint 0 / mean of the others:")
        for label in labels:
            first = rows[0]["breakdown"][label]
            others = [r["breakdown"].get(label, [0, 0.0]) for r in rows[1:]] or [[0, 0.0]]
            if first[0] == 0 and all(o[0] == 0 for o in others):
                continue
            print(f"  {label}: {first[1]:.2f} ({first[0]}) / {np.mean([o[1] for o in others]):.2f} "
                  f"({np.mean([o[0] for o in others]):.0f})")
        print("  featurize step compile + first run = first − repeat batch: "
              f"{rows[0]['first_batch_s'] - rows[0]['repeat_batch_s']:.2f} / "
              f"{np.mean([r['first_batch_s'] - r['repeat_batch_s'] for r in rows[1:]] or [0.0]):.2f}")


def print_attribute(title: str, one: dict, many: dict, count: int) -> None:
    r1, rm = one[0], many[0]
    marginal = (rm["seconds"] - r1["seconds"]) / (count - 1)
    stages = [label for label in rm["breakdown"] if label in r1["breakdown"]]
    print(f"\n{title}: the whole attribute call, {N_TRAIN} train and {N_TARGETS} target sequences\n")
    print("| checkpoints | attribute s | prepare_checkpoint s (calls) | model traces | process s | load average |")
    print("|---|---|---|---|---|---|")
    for m, (r, b, a, w) in ((1, one), (count, many)):
        calls, seconds = r["breakdown"].get("prepare_checkpoint", (0, 0.0))
        print(f"| {m} | {r['seconds']:.1f} | {seconds:.1f} ({calls}) | {r['traces']} | {w:.0f} | {b} → {a} |")
    print(f"\nmarginal cost of a checkpoint (t{count} − t1)/{count - 1} = {marginal:.2f} s, "
          f"{marginal / r1['seconds']:.2f} × t1 ({r1['seconds']:.1f} s)")
    if stages:
        print(f"\n| stage (nested: prepare_checkpoint holds no other row) | M = 1: s (calls) | M = {count}: s (calls) "
              f"| per extra checkpoint s |")
        print("|---|---|---|---|")
        for label in stages:
            (c1, s1), (cm, sm) = r1["breakdown"][label], rm["breakdown"][label]
            print(f"| {label} | {s1:.2f} ({c1}) | {sm:.2f} ({cm}) | {(sm - s1) / (count - 1):.2f} |")
    methods = rm.get("solve_methods") or []
    if methods:
        paths = ", ".join(f"{name} × {methods.count(name)}" for name in sorted(set(map(str, methods))))
        print(f"\nsolve paths at M = {count}: {paths}")


def machine() -> str:
    import jax

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, jax {jax.__version__} "
            f"({jax.default_backend()}); {NO_CACHE_NOTE}")


def measure(shape: str, family: str, args, results: dict) -> None:
    spec = dict(SHAPES[shape], settings=family_settings(family, shape, args))
    settings = ", ".join(f"{k}={v}" for k, v in spec["settings"].items() if k not in ("progress",))
    title = f"{shape} ({SHAPES[shape]}), {family}: {settings}"
    print(f"\n=== {title}", flush=True)
    sequence = run_child("sequence", dict(spec, checkpoints=args.checkpoints), args.blas_threads)
    print_sequence(title, *sequence)
    one = run_child("attribute", dict(spec, checkpoints=1), args.blas_threads)
    many = run_child("attribute", dict(spec, checkpoints=args.checkpoints), args.blas_threads)
    print_attribute(title, one, many, args.checkpoints)
    results[f"{shape}/{family}"] = dict(
        settings=spec["settings"], shape=SHAPES[shape],
        sequence=dict(sequence[0], load_before=sequence[1], load_after=sequence[2], process_s=sequence[3]),
        attribute={str(m): dict(r, load_before=b, load_after=a, process_s=w)
                   for m, (r, b, a, w) in ((1, one), (args.checkpoints, many))})
    sys.stdout.flush()


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        _disable_compilation_cache()
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        result = sequence_child(spec) if kind == "sequence" else attribute_child(spec)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["2l", "4l", "both"], default="both")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--families", default="factorized,rademacher",
                        help="comma-separated projections: factorized, rademacher, normal")
    parser.add_argument("--dense-proj-dim-4l", type=int, default=512)
    parser.add_argument("--dense-grad-wrt-4l", default="params/blocks/3",
                        help="path prefix of the parameters the dense family differentiates at 4l")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="set OPENBLAS/OMP/MKL_NUM_THREADS in the measured processes (default: as inherited)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.checkpoints < 2:
        parser.error("--checkpoints must be at least 2")
    _disable_compilation_cache()
    shapes = ["2l", "4l"] if args.shape == "both" else [args.shape]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    start = time.perf_counter()
    threads = "inherited" if args.blas_threads is None else args.blas_threads
    print(f"{machine()}; BLAS threads: {threads}\nload average at start: {load()}", flush=True)
    results: dict = dict(machine=machine(), checkpoints=args.checkpoints, blas_threads=args.blas_threads, runs={})
    for shape in shapes:
        for family in families:
            measure(shape, family, args, results["runs"])
            if args.json is not None:
                args.json.write_text(json.dumps(results, indent=1))
    print(f"\nload average at end: {load()}; {time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
