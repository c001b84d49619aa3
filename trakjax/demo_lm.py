"""``trakjax demo --task lm``: TRAK on a small byte-level language model, end to end on a CPU.

The setting is :mod:`trakjax.text_lm`: windows of ``sequence_length`` bytes of a fixed list of the
Python standard library's source files (nothing downloaded; the list's and the content's
SHA-256 and the Python version are recorded, since each Python's library differs: do not
compare LDS figures across Python versions). Stages, each timed and shown with a progress bar
unless quiet:

1. **train**: M small causal transformers (Flax NNX, 2 layers) on N training windows, Adam on
   minibatches; held-out loss (nats per byte) and next-byte accuracy of each.
2. **save**: each checkpoint to ``DIR/checkpoints/<m>`` with orbax.
3. **featurize**, **finalize**, **score**: the :class:`trakjax.TRAKer` session with the
   factorized projection family (``projection="factorized"``) and
   :func:`trakjax.tasks.language_modeling`: each of T held-out windows attributed to the N
   training windows, an (N, T) score matrix.
4. **report**: ``DIR/topk.csv`` and ``DIR/topk.json`` (labels are the windows' file numbers, an
   index into the corpus's file list in ``DIR/summary.json``); after the LDS, ``DIR/index.html``,
   the explorer, with every window decoded as text (the "bytes" decoder).
5. **LDS**: models of the same recipe retrained on random half-subsets
   (:func:`trakjax.text_lm.retrain_outputs`, ``jax.vmap``-ed over subsets), and the Spearman
   correlation between their held-out outputs f (summed next-byte log-odds) and the summed
   scores of each subset (:func:`trakjax.evaluation.lds`), with a bootstrap confidence interval.

``DIR/run.json`` records what ``trakjax show DIR`` needs (with ``"decoder": "bytes"``);
``DIR/summary.json`` holds the corpus's provenance, losses, LDS, and the seconds of every stage.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import trakjax
from trakjax import demo, evaluation, explorer, report, text_lm
from trakjax.errors import InvalidArgumentError
from trakjax.files import write_atomic
from trakjax.progress import progress_bar

EXPERIMENT = "held_out_text"
"""The scoring experiment's name in the demo's store."""
LDS_CHUNK = 16
"""Subsets retrained at once (one vmapped program)."""


class LMDemoSettings(NamedTuple):
    """Sizes of the LM demo; the defaults took 3 min 23 s on an idle 2-core CPU (340 CPU seconds,
    most of it the LDS retrains).

    Attributes:
      out: output directory.
      checkpoints: M, models trained on all N windows (TRAK's ensemble).
      proj_dim: k of the factorized projection.
      train_size: N training windows.
      num_targets: T held-out windows attributed.
      width: d, the transformer's width (2 layers, 4 heads).
      sequence_length: L, bytes per window.
      steps: Adam steps per model (ensemble and retrained models alike).
      minibatch: windows per Adam step.
      learning_rate: Adam's learning rate.
      lds_subsets: random half-subsets retrained for the LDS (0 skips the LDS stage).
      batch_size: examples per featurize step.
      seed: seeds the split, the models, the projection and the subsets.
      top_k: depth of the top-k table.
    """

    out: Path = Path("trakjax-demo-lm")
    checkpoints: int = 4
    proj_dim: int = 1024
    train_size: int = 500
    num_targets: int = 50
    width: int = 64
    sequence_length: int = 64
    steps: int = 200
    minibatch: int = 16
    learning_rate: float = 1e-3
    lds_subsets: int = 64
    batch_size: int = 50
    seed: int = 0
    top_k: int = 10


def check_settings(settings: LMDemoSettings) -> None:
    """Raise ``ValueError`` naming the first setting out of range."""
    for name, low in (("checkpoints", 1), ("proj_dim", 1), ("train_size", 2), ("num_targets", 1),
                      ("width", 4), ("sequence_length", 2), ("steps", 1), ("minibatch", 1),
                      ("batch_size", 1), ("top_k", 1)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(f"{demo.flag(name)} must be an int >= {low}, got {value!r}")
    if settings.width % 4:
        raise InvalidArgumentError(f"--width must be a multiple of 4 (the heads), got {settings.width}")
    if settings.top_k > settings.train_size:
        raise InvalidArgumentError(f"--top-k must be at most --train-size={settings.train_size}, got {settings.top_k}")
    if settings.lds_subsets != 0 and settings.lds_subsets < 3:
        raise InvalidArgumentError(f"--lds-subsets must be 0 (skip the LDS) or at least 3, got {settings.lds_subsets}")
    if not settings.learning_rate > 0:
        raise InvalidArgumentError(f"--learning-rate must be > 0, got {settings.learning_rate}")


def lm_config(settings: LMDemoSettings) -> text_lm.LMConfig:
    """The model shape the settings ask for."""
    return text_lm.LMConfig(sequence_length=settings.sequence_length, width=settings.width)


def _save_data(out: Path, corpus: text_lm.Corpus, train: text_lm.Sequences,
               targets: text_lm.Sequences) -> None:
    data_dir = out / "data"
    data_dir.mkdir()
    for name, array in (("train_inputs", train.ids), ("train_labels", corpus.file_index[train.index]),
                        ("target_inputs", targets.ids), ("target_labels", corpus.file_index[targets.index])):
        np.save(data_dir / f"{name}.npy", array)


def _train(config, settings: LMDemoSettings, train, targets, quiet: bool):
    """M checkpoints (numpy pytrees) and their held-out loss and next-byte accuracy."""
    import jax
    import jax.numpy as jnp

    checkpoints = []
    bar = progress_bar(settings.checkpoints, "train", "model", not quiet)
    for m in range(settings.checkpoints):
        checkpoints += text_lm.train_models(
            config, train.ids, 1, settings.steps, settings.seed, batch_size=settings.minibatch,
            learning_rate=settings.learning_rate, first_model=m)
        bar.update(1)
    bar.close()
    apply_fn = text_lm.model(config).apply_fn
    loss_fn = jax.jit(text_lm.sequence_loss(config))
    held_out = jnp.asarray(targets.ids)
    losses, accuracy = [], []
    for params in checkpoints:
        losses.append(float(jnp.mean(loss_fn(params, held_out))))
        predicted = jnp.argmax(apply_fn(params, held_out)[:, :-1], axis=-1)
        accuracy.append(float(jnp.mean(predicted == held_out[:, 1:])))
    train_loss = float(jnp.mean(loss_fn(checkpoints[0], jnp.asarray(train.ids[:256]))))
    return checkpoints, {"held_out_loss": losses, "held_out_next_byte_accuracy": accuracy,
                         "mean_held_out_loss": float(np.mean(losses)),
                         "train_loss_model_0": train_loss}


def _run_record(settings: LMDemoSettings, quality: dict) -> dict:
    return {
        "kind": "demo", "complete": True, "store": "store", "experiment": EXPERIMENT,
        "top_k": settings.top_k, "picture_targets": [],
        "data": {name: f"data/{name}.npy" for name in
                 ("train_inputs", "train_labels", "target_inputs", "target_labels")},
        "decoder": text_lm.DECODER, "inputs": "tokens",
        "title": (f"trakjax LM demo: {settings.checkpoints} byte-level transformers on "
                  f"{settings.train_size} windows of Python's standard library, "
                  f"k={settings.proj_dim} (factorized); held-out loss "
                  f"{quality['mean_held_out_loss']:.2f} nats/byte; labels are file numbers"),
    }


def run(settings: LMDemoSettings, *, quiet: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the LM demo; returns the summary (also written to ``DIR/summary.json``).

    Returns:
      ``{"corpus": provenance, "quality": losses, "lds": {"mean", "ci_low", "ci_high",
      "confidence", "subsets", "targets"} or None, "seconds": {stage: s}, "cpu_seconds": s,
      "top_k": [csv, json], "explorer": path, "out": DIR, "settings": {...}}``.
    """
    check_settings(settings)
    out = Path(os.path.expanduser(os.fspath(settings.out))).resolve()
    report.check_writable(out, "--out")
    demo.prepare_out_dir(out)
    clock = demo._Clock()
    report.write_run_record(out, {"kind": "demo", "complete": False})
    config = lm_config(settings)
    corpus = text_lm.load_corpus(settings.sequence_length)
    train, targets = text_lm.split_corpus(corpus, settings.train_size, settings.num_targets, settings.seed)
    _save_data(out, corpus, train, targets)
    clock.lap("data")
    checkpoints, quality = _train(config, settings, train, targets, quiet)
    clock.lap("train")
    paths = demo._save_checkpoints(out, checkpoints)
    clock.lap("save")
    traker = trakjax.TRAKer(
        text_lm.task(config), settings.train_size, out / "store", proj_dim=settings.proj_dim,
        seed=settings.seed, batch_size=settings.batch_size, projection="factorized",
        grad_wrt=text_lm.GRAD_WRT, params_template=checkpoints[0],
    )
    scores = np.asarray(traker.run(paths, train.ids, targets.ids, EXPERIMENT, progress=not quiet,
                                   on_stage=clock.lap))
    record = _run_record(settings, quality)
    outputs = report.render(out, record, traker.top_k(EXPERIMENT, settings.top_k), explorer=False)
    clock.lap("report")
    lds = None
    if settings.lds_subsets:
        lds = lds_stage(config, settings, train, targets, scores, quiet)
        clock.lap("lds")
    summary = {
        "corpus": corpus.describe(), "quality": quality, "lds": lds, "seconds": clock.seconds,
        "cpu_seconds": _cpu_seconds(), "top_k": [str(outputs["csv"]), str(outputs["json"])],
        "explorer": str(out / explorer.PAGE_FILE), "out": str(out),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings._asdict().items()},
    }
    write_atomic(out / "summary.json", lambda handle: json.dump(summary, handle, indent=1))
    record["summary"] = {"settings": {k: v for k, v in summary["settings"].items() if k != "out"},
                         **{key: summary[key] for key in ("quality", "lds", "seconds")},
                         "corpus": {k: v for k, v in summary["corpus"].items() if k != "directory"}}
    report.write_run_explorer(out, record, outputs["records"])
    report.write_run_record(out, record)
    log(summary_text(summary, outputs["records"], train.ids, targets.ids))
    return summary


def _cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def lds_masks(settings: LMDemoSettings) -> np.ndarray:
    """The demo's LDS subsets: (lds_subsets, train_size) bool, random halves from ``seed + 1``."""
    return evaluation.subset_masks(settings.train_size, settings.lds_subsets, 0.5, seed=settings.seed + 1)


def lds_stage(config, settings: LMDemoSettings, train, targets, scores, quiet: bool) -> dict:
    """LDS of ``scores`` against ``settings.lds_subsets`` models retrained on random half-subsets
    with the demo's recipe (:func:`trakjax.text_lm.retrain_outputs`), in chunks of
    :data:`LDS_CHUNK`; chunk c's models start from ``fold_in(key(seed + 10000 + c·LDS_CHUNK), s)``."""
    masks = lds_masks(settings)
    outputs = []
    bar = progress_bar(settings.lds_subsets, "LDS retrain", "model", not quiet)
    for start in range(0, settings.lds_subsets, LDS_CHUNK):
        part = masks[start : start + LDS_CHUNK]
        outputs.append(text_lm.retrain_outputs(
            config, train.ids, targets.ids, part, steps=settings.steps,
            seed=settings.seed + 10_000 + start, batch_size=settings.minibatch,
            learning_rate=settings.learning_rate, chunk_size=LDS_CHUNK,
        ))
        bar.update(part.shape[0])
    bar.close()
    result = evaluation.lds(scores, masks, np.concatenate(outputs))
    return {"mean": result.mean, "ci_low": result.ci_low, "ci_high": result.ci_high,
            "confidence": result.confidence, "subsets": settings.lds_subsets,
            "targets": settings.num_targets}


def _snippet(ids: np.ndarray, limit: int = 60) -> str:
    text = text_lm.decode(ids)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def summary_text(summary: dict, records: list[dict], train_ids: np.ndarray, target_ids: np.ndarray) -> str:
    """The console summary: corpus, losses, LDS, time per stage, and one target's proponents."""
    settings, quality, corpus = summary["settings"], summary["quality"], summary["corpus"]
    lines = [
        "",
        f"trakjax LM demo: {settings['checkpoints']} byte-level transformers (2 layers, d = "
        f"{settings['width']}) on {settings['train_size']} windows of {settings['sequence_length']} "
        f"bytes, {settings['num_targets']} held-out windows attributed, factorized k = {settings['proj_dim']}",
        f"  corpus          {len(corpus['files'])} files of Python {corpus['python_version']}'s standard "
        f"library, {corpus['sequences']} windows, content sha256 {corpus['content_hash'][:16]}",
        f"  held-out loss   {quality['mean_held_out_loss']:.3f} nats/byte (mean of models; "
        f"train loss {quality['train_loss_model_0']:.3f})",
    ]
    lines += demo.lds_and_stage_lines(summary)
    seconds = summary["seconds"]
    lines.append(f"  total           {sum(seconds.values()):.1f} s ({summary['cpu_seconds']:.0f} CPU s)")
    lines.append(f"  top-k table     {summary['top_k'][0]}, {summary['top_k'][1]}")
    lines.append(f"  explorer        {summary['explorer']}  (open it in a browser)")
    if records:
        first = records[0]
        lines += ["", f"  held-out window 0: {_snippet(target_ids[first['target']])}"]
        for entry in first["proponents"][:3]:
            lines.append(f"    proponent {entry['rank']} (train {entry['train_index']}, score "
                         f"{entry['score']:.3g}): {_snippet(train_ids[entry['train_index']])}")
    return "\n".join(lines)
