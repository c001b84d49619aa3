"""``trakjax demo``: TRAK on sklearn's embedded digits, end to end, in minutes on a CPU.

Stages, each timed (and shown with a progress bar unless quiet):

1. **train**: an ensemble of M small linen MLPs (64 pixels → hidden, ReLU → 10 logits), full-batch
   Adam with optax, one seed each; test accuracy of each and of the ensemble.
2. **save**: each checkpoint to ``DIR/checkpoints/<m>`` with orbax.
3. **featurize**, **finalize**, **score**: the :class:`trakjax.TRAKer` session over a store at
   ``DIR/store``, loading the orbax checkpoints: projected per-example gradients of the training
   images, the kernel solve, then the test targets, and the (N, T) score matrix.
4. **report**: ``DIR/attributions.png`` (8 targets, each with its 5 strongest proponents and
   opponents, labels and scores), ``DIR/topk.csv`` and ``DIR/topk.json``; after the LDS,
   ``DIR/index.html``, the explorer of every target with the run's summary
   (:mod:`trakjax.explorer`).
5. **LDS**: the linear datamodeling score of these scores (:mod:`trakjax.evaluation`): models of
   the same architecture and recipe retrained on random half-subsets, ``jax.vmap``-ed over subsets,
   and the Spearman correlation between their target margins and the summed scores of each subset.

``DIR/run.json`` records what ``trakjax show DIR`` needs to redraw the picture, the table and the
explorer;
``DIR/summary.json`` holds accuracy, LDS and the time of every stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import trakjax
from trakjax import evaluation, explorer, report, tasks
from trakjax.errors import InvalidArgumentError
from trakjax.files import write_atomic
from trakjax.progress import progress_bar

EXPERIMENT = "digits_test"
"""The scoring experiment's name in the demo's store."""
NUM_PICTURED = 8
NUM_SHOWN = 5


class DemoSettings(NamedTuple):
    """Sizes of the demo; the defaults finish in under 3 minutes on a 2-core CPU.

    Attributes:
      out: output directory.
      checkpoints: M, the ensemble size.
      proj_dim: k.
      train_size: N training digits (the rest of the 1797 are test digits).
      num_targets: T test digits attributed (the first 8 are pictured).
      hidden: hidden units of the MLP.
      steps: full-batch Adam steps per model (ensemble and retrained models alike).
      learning_rate: Adam's learning rate.
      lds_subsets: random half-subsets retrained for the LDS (0 skips the LDS stage).
      batch_size: examples per featurize step.
      seed: seeds the data split, the models and the projection.
      top_k: depth of the top-k table.
    """

    out: Path = Path("trakjax-demo")
    checkpoints: int = 10
    proj_dim: int = 512
    train_size: int = 1000
    num_targets: int = 100
    hidden: int = 32
    steps: int = 300
    learning_rate: float = 0.01
    lds_subsets: int = 100
    batch_size: int = 100
    seed: int = 0
    top_k: int = 10


def check_settings(settings: DemoSettings) -> None:
    """Raise ``ValueError`` naming the first setting out of range."""
    for name, low in (("checkpoints", 1), ("proj_dim", 1), ("train_size", 2), ("num_targets", NUM_PICTURED),
                      ("hidden", 1), ("steps", 1), ("batch_size", 1), ("top_k", NUM_SHOWN)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(f"{flag(name)} must be an int >= {low}, got {value!r}")
    if settings.train_size + settings.num_targets > DIGITS:
        raise InvalidArgumentError(
            f"--train-size + --targets must be at most {DIGITS} (the digits data set), got "
            f"{settings.train_size} + {settings.num_targets}"
        )
    if settings.top_k > settings.train_size:
        raise InvalidArgumentError(f"--top-k must be at most --train-size={settings.train_size}, got {settings.top_k}")
    if settings.lds_subsets != 0 and settings.lds_subsets < 3:
        raise InvalidArgumentError(f"--lds-subsets must be 0 (skip the LDS) or at least 3, got {settings.lds_subsets}")
    if not settings.learning_rate > 0:
        raise InvalidArgumentError(f"--learning-rate must be > 0, got {settings.learning_rate}")


DIGITS = 1797
"""Examples in sklearn's digits data set."""


def flag(name: str) -> str:
    """The command-line flag of a :class:`DemoSettings` field."""
    return "--targets" if name == "num_targets" else f"--{name.replace('_', '-')}"


def digits_split(train_size: int, num_targets: int, seed: int):
    """``((x, y) train, (x, y) targets)``: disjoint random digits, pixels in [0, 1] (64,) float32."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(labels.size)
    x = (images / 16.0).astype(np.float32)[order]
    y = labels.astype(np.int32)[order]
    stop = train_size + num_targets
    return (x[:train_size], y[:train_size]), (x[train_size:stop], y[train_size:stop])


def digits_mlp(hidden: int):
    """The demo's linen model: 64 pixels → ``hidden`` (ReLU) → 10 logits."""
    import flax.linen as nn

    class DigitsMLP(nn.Module):
        hidden: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))

    return DigitsMLP(hidden)


def make_trainer(model, optimizer, steps: int):
    """``train(key, x, y) -> params``: ``steps`` full-batch optimizer steps on the mean
    cross-entropy from ``model.init(key, x[:1])``, jitted (the recipe the LDS retrains use)."""
    import jax
    import optax

    def train(key, x, y):
        params = model.init(key, x[:1])
        opt_state = optimizer.init(params)

        def step(carry, _):
            p, s = carry
            grads = jax.grad(
                lambda q: optax.softmax_cross_entropy_with_integer_labels(model.apply(q, x), y).mean()
            )(p)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt_state), None, length=steps)
        return params

    return jax.jit(train)


def prepare_out_dir(out: Path) -> None:
    """Create ``out``, or clear a previous demo's outputs from it.

    Raises:
      ValueError: if ``out`` exists and is not empty but holds no previous demo (``run.json`` of
        kind "demo"), so that nothing of the user's is removed.
    """
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        record = report.read_run_record(out, missing_ok=True, check=False)
        if record is None or record.get("kind") != "demo":
            raise InvalidArgumentError(
                f"--out {out} is not empty and holds no earlier trakjax demo ({report.RUN_FILE}); "
                "choose a new or empty directory"
            )
        for name in ("store", "checkpoints", "data"):
            if (out / name).exists():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


class _Clock:
    """Seconds per stage: :meth:`lap` ends the current stage and starts the next."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


def _save_data(out: Path, train, targets) -> Path:
    data_dir = out / "data"
    data_dir.mkdir()
    for name, array in (("train_inputs", train[0]), ("train_labels", train[1]),
                        ("target_inputs", targets[0]), ("target_labels", targets[1])):
        np.save(data_dir / f"{name}.npy", array)
    return data_dir


def _train_ensemble(model, optimizer, settings: DemoSettings, train, targets, quiet: bool):
    """M checkpoints (numpy pytrees) and their test accuracy (per model, mean, ensemble)."""
    import jax

    trainer = make_trainer(model, optimizer, settings.steps)
    base = jax.random.key(settings.seed)
    checkpoints = []
    bar = progress_bar(settings.checkpoints, "train", "model", not quiet)
    for m in range(settings.checkpoints):
        params = trainer(jax.random.fold_in(base, m), train[0], train[1])
        checkpoints.append(jax.tree_util.tree_map(np.asarray, params))
        bar.update(1)
    bar.close()
    logits = np.stack([np.asarray(model.apply(p, targets[0])) for p in checkpoints])  # (M, T, 10)
    per_model = (logits.argmax(-1) == targets[1][None]).mean(axis=1)
    predictions = logits.mean(axis=0).argmax(-1)
    accuracy = {"models": per_model.tolist(), "mean": float(per_model.mean()),
                "ensemble": float((predictions == targets[1]).mean())}
    return checkpoints, accuracy, predictions.astype(np.int32)


def _save_checkpoints(out: Path, checkpoints) -> list[Path]:
    import orbax.checkpoint as ocp

    paths = []
    with ocp.StandardCheckpointer() as checkpointer:
        for m, params in enumerate(checkpoints):
            paths.append(out / "checkpoints" / str(m))
            checkpointer.save(paths[-1], params)
        checkpointer.wait_until_finished()
    return paths


def _run_record(settings: DemoSettings, accuracy: dict) -> dict:
    return {
        "kind": "demo", "complete": True, "store": "store", "experiment": EXPERIMENT,
        "top_k": settings.top_k, "picture_targets": list(range(NUM_PICTURED)),
        "data": {name: f"data/{name}.npy" for name in
                 ("train_inputs", "train_labels", "target_inputs", "target_labels")},
        "predictions": "data/target_predictions.npy",
        "title": (f"trakjax demo: {settings.checkpoints} MLPs on {settings.train_size} digits, "
                  f"k={settings.proj_dim}; test accuracy {accuracy['ensemble']:.3f}"),
    }


def run(settings: DemoSettings, *, quiet: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``DIR/summary.json``).

    Returns:
      ``{"accuracy": {"models": [...], "mean": a, "ensemble": a}, "lds": {"mean", "ci_low",
      "ci_high", "subsets", "targets"} or None, "seconds": {stage: s}, "picture": path,
      "top_k": [csv, json], "out": DIR}``.
    """
    import optax

    check_settings(settings)
    out = Path(os.path.expanduser(os.fspath(settings.out))).resolve()
    report.check_writable(out, "--out")
    prepare_out_dir(out)
    clock = _Clock()
    # The run record first: a demo killed half-way is still recognized (and cleared) next time.
    report.write_run_record(out, {"kind": "demo", "complete": False})
    train, targets = digits_split(settings.train_size, settings.num_targets, settings.seed)
    data_dir = _save_data(out, train, targets)
    clock.lap("data")
    model, optimizer = digits_mlp(settings.hidden), optax.adam(settings.learning_rate)
    checkpoints, accuracy, predictions = _train_ensemble(model, optimizer, settings, train, targets, quiet)
    np.save(data_dir / "target_predictions.npy", predictions)
    clock.lap("train")
    paths = _save_checkpoints(out, checkpoints)
    clock.lap("save")
    traker = trakjax.TRAKer(
        tasks.image_classification(model.apply), settings.train_size, out / "store",
        proj_dim=settings.proj_dim, seed=settings.seed, batch_size=settings.batch_size,
        params_template=checkpoints[0],
    )
    scores = np.asarray(traker.run(paths, train, targets, EXPERIMENT, progress=not quiet, on_stage=clock.lap))
    record = _run_record(settings, accuracy)
    outputs = report.render(out, record, traker.top_k(EXPERIMENT, settings.top_k), explorer=False)
    clock.lap("report")
    lds = None
    if settings.lds_subsets:
        lds = lds_stage(model, optimizer, settings, train, targets, scores, quiet)
        clock.lap("lds")
    summary = {
        "accuracy": accuracy, "lds": lds, "seconds": clock.seconds, "picture": str(outputs["picture"]),
        "top_k": [str(outputs["csv"]), str(outputs["json"])], "out": str(out),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings._asdict().items()},
    }
    summary["explorer"] = str(out / explorer.PAGE_FILE)
    write_atomic(out / "summary.json", lambda handle: json.dump(summary, handle, indent=1))
    record["summary"] = explorer_summary(summary)
    report.write_run_explorer(out, record, outputs["records"])
    report.write_run_record(out, record)
    log(summary_text(summary, outputs["records"]))
    return summary


def explorer_summary(summary: dict) -> dict:
    """What the explorer shows on top: settings, accuracy, LDS and seconds per stage."""
    settings = {key: value for key, value in summary["settings"].items() if key != "out"}
    return {"settings": settings, **{key: summary[key] for key in ("accuracy", "lds", "seconds")}}


def lds_stage(model, optimizer, settings: DemoSettings, train, targets, scores, quiet: bool) -> dict:
    """LDS of ``scores`` against ``settings.lds_subsets`` models retrained on random half-subsets.

    The models are the demo's MLP trained with the demo's recipe (full batch, same optimizer and
    steps) by :func:`trakjax.evaluation.retrain_margins`, vmapped over subsets in chunks.
    """
    masks = evaluation.subset_masks(settings.train_size, settings.lds_subsets, 0.5, seed=settings.seed + 1)
    chunk = 25
    x0 = train[0][:1]

    def init_fn(key):
        return model.init(key, x0)

    margins = []
    bar = progress_bar(settings.lds_subsets, "LDS retrain", "model", not quiet)
    for start in range(0, settings.lds_subsets, chunk):
        part = masks[start : start + chunk]
        margins.append(evaluation.retrain_margins(
            init_fn, model.apply, optimizer, settings.steps, train, targets, part,
            seed=settings.seed + 10_000 + start, chunk_size=chunk,
        ))
        bar.update(part.shape[0])
    bar.close()
    result = evaluation.lds(scores, masks, np.concatenate(margins))
    return {"mean": result.mean, "ci_low": result.ci_low, "ci_high": result.ci_high,
            "confidence": result.confidence, "subsets": settings.lds_subsets,
            "targets": settings.num_targets}


def lds_and_stage_lines(summary: dict) -> list[str]:
    """The summary's LDS line (with its interval) and seconds per stage, as both demos print them."""
    lds = summary["lds"]
    if lds is None:
        lines = ["  LDS             skipped (--lds-subsets 0)"]
    else:
        lines = [f"  LDS             {lds['mean']:.3f}  ({lds['confidence']:.0%} CI {lds['ci_low']:.3f} .. "
                 f"{lds['ci_high']:.3f}; {lds['subsets']} half-subset retrains, {lds['targets']} targets)"]
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    return lines + [f"  time per stage  {stages}"]


def summary_text(summary: dict, records: list[dict]) -> str:
    """The console summary: accuracy, LDS, time per stage, and a few top proponents."""
    acc = summary["accuracy"]
    settings = summary["settings"]
    lines = [
        "",
        f"trakjax demo: {settings['checkpoints']} MLPs on {settings['train_size']} digits, "
        f"{settings['num_targets']} test digits attributed, k = {settings['proj_dim']}",
        f"  test accuracy   {acc['mean']:.3f} per model (mean), {acc['ensemble']:.3f} ensemble",
    ]
    lines += lds_and_stage_lines(summary)
    seconds = summary["seconds"]
    total = sum(seconds.values())
    attribution = sum(seconds.get(k, 0.0) for k in ("featurize", "finalize", "score"))
    lines.append(f"  total           {total:.1f} s (attribution {attribution:.1f} s, "
                 f"LDS {seconds.get('lds', 0.0):.1f} s)")
    lines.append(f"  picture         {summary['picture']}")
    lines.append(f"  top-k table     {summary['top_k'][0]}, {summary['top_k'][1]}")
    lines.append(f"  explorer        {summary['explorer']}  (open it in a browser)")
    lines.append("")
    lines.append(report.format_top_k(records, num_shown=3, max_targets=3))
    return "\n".join(lines)
