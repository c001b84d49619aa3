"""Reports of a finished attribution: the picture of proponents and opponents, the top-k table,
the explorer.

Used by the ``trakjax`` command line (``demo``, ``attribute`` and ``show``); plain numpy and
matplotlib, no JAX. A top-k result is anything with the fields of :class:`trakjax.scores.TopK`:
``proponents`` and ``opponents`` (k, T) train indices, with ``proponent_scores`` (descending) and
``opponent_scores`` (ascending), (k, T).

* :func:`attribution_figure` writes ``attributions.png``: one row per target, the target image,
  then its strongest proponents and opponents, each with its label and score.
* :func:`top_k_records`, :func:`write_top_k` and :func:`format_top_k` give the same top-k as
  JSON records, CSV rows and a console table.
* :func:`write_run_explorer` writes the HTML explorer, ``index.html`` (:mod:`trakjax.explorer`).
* :func:`as_images` decides whether inputs can be drawn: (N, H, W), (N, H, W, C) with C in
  {1, 3, 4}, or (N, D) with D a perfect square (flattened square images, e.g. digits' 64 pixels).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trakjax.errors import InvalidArgumentError, StoreError
from trakjax.files import read_json, write_atomic

PICTURE_FILE = "attributions.png"
TOP_K_CSV = "topk.csv"
TOP_K_JSON = "topk.json"

PANEL_WIDTH_PIXELS = 120
"""Width of one image panel (with its caption) in the picture."""
PANEL_HEIGHT_PIXELS = 150
"""Height of one picture row: the image and a two-line caption."""
HEADER_PIXELS = 60
"""Height of the picture's column headings."""
GAP_PIXELS = 40
"""Blank space between the target column, the proponents and the opponents."""
DPI = 100


def figure_pixels(num_targets: int, num_shown: int) -> tuple[int, int]:
    """(height, width) in pixels of :func:`attribution_figure` for these counts."""
    width = (1 + 2 * num_shown) * PANEL_WIDTH_PIXELS + 2 * GAP_PIXELS
    height = HEADER_PIXELS + num_targets * PANEL_HEIGHT_PIXELS
    return height, width


def as_images(inputs: Any) -> np.ndarray | None:
    """``inputs`` as drawable images (N, H, W) or (N, H, W, C), else ``None``.

    (N, D) inputs are drawn as √D × √D images when D is a perfect square; anything else
    (token ids, dicts of arrays, odd shapes) is not an image.
    """
    if not isinstance(inputs, np.ndarray) or not np.issubdtype(inputs.dtype, np.number):
        return None
    if inputs.ndim == 2:
        side = math.isqrt(inputs.shape[1])
        if side * side == inputs.shape[1] and side > 1:
            return inputs.reshape(inputs.shape[0], side, side)
        return None
    if inputs.ndim == 3:
        return inputs
    if inputs.ndim == 4 and inputs.shape[3] in (1, 3, 4):
        return inputs[..., 0] if inputs.shape[3] == 1 else inputs
    return None


def _label_text(labels, i: int) -> str:
    if labels is None:
        return ""
    value = np.asarray(labels[i])
    if value.ndim:
        return ""
    if np.issubdtype(value.dtype, np.floating):
        return f"{float(value):.3g}"
    return str(value.item())


def _draw(ax, image) -> None:
    image = np.asarray(image, np.float32)
    low, high = float(np.nanmin(image)), float(np.nanmax(image))
    if image.ndim == 3:  # colour: scale to [0, 1] for imshow
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        ax.imshow(image, interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray_r", vmin=low, vmax=high if high > low else low + 1,
                  interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def attribution_figure(
    path: str | os.PathLike,
    top: Any,
    train_images: np.ndarray,
    target_images: np.ndarray,
    *,
    train_labels: Sequence | None = None,
    target_labels: Sequence | None = None,
    target_ids: Sequence[int] | None = None,
    predictions: Sequence | None = None,
    columns: Sequence[int] | None = None,
    num_shown: int = 5,
    title: str | None = None,
) -> tuple[int, int]:
    """Draw targets with their strongest proponents and opponents; write a PNG at ``path``.

    Row r shows target ``columns[r]`` (a column of ``top``), then its ``num_shown`` highest-scored
    training images (proponents: training on them raised the target's output) and its
    ``num_shown`` lowest-scored ones (opponents), each captioned with its training index, label
    and score.

    Args:
      path: the PNG to write.
      top: top-k result (see the module docstring) with k ≥ ``num_shown``.
      train_images: (N, H, W[, C]) training images (see :func:`as_images`).
      target_images: (T, H, W[, C]) target images, indexed like ``top``'s columns.
      train_labels, target_labels: optional labels for captions.
      target_ids: optional names of the targets for captions (default: their column index).
      predictions: optional (T,) predicted labels, shown beside the target's label.
      columns: which targets to draw (default: all columns of ``top``).
      num_shown: proponents and opponents per target.
      title: optional figure title (drawn in the heading row).

    Returns:
      (height, width) in pixels of the written PNG, :func:`figure_pixels`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = np.shape(top.proponents)[0]
    if not 1 <= num_shown <= k:
        raise InvalidArgumentError(f"num_shown must be in [1, k={k}] (the top-k depth), got {num_shown}")
    columns = list(range(np.shape(top.proponents)[1])) if columns is None else [int(c) for c in columns]
    if not columns:
        raise InvalidArgumentError("columns is empty; at least one target is needed for the picture")
    layout = _Layout(*figure_pixels(len(columns), num_shown), num_shown)
    figure = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    _headings(figure, layout, title)
    for r, j in enumerate(columns):
        caption = f"target {j if target_ids is None else target_ids[j]}"
        label = _label_text(target_labels, j)
        if label:
            caption += f"\nlabel {label}"
            if predictions is not None:
                caption += f", pred {_label_text(predictions, j)}"
        _panel(figure, layout, r, 0, target_images[j], caption, None)
        for group, (indices, values, colour) in enumerate((
            (top.proponents, top.proponent_scores, PROPONENT_COLOUR),
            (top.opponents, top.opponent_scores, OPPONENT_COLOUR),
        )):
            for s in range(num_shown):
                i = int(indices[s, j])
                label = _label_text(train_labels, i)
                caption = f"#{i}" + (f" label {label}" if label else "") + f"\n{float(values[s, j]):+.3g}"
                _panel(figure, layout, r, 1 + group * num_shown + s, train_images[i], caption, colour)
    write_atomic(Path(path), lambda handle: figure.savefig(handle, dpi=DPI, format="png"), binary=True)
    return layout.height, layout.width


PROPONENT_COLOUR = "#1b7837"
OPPONENT_COLOUR = "#b2182b"


class _Layout(NamedTuple):
    """Where the panels of :func:`attribution_figure` go, in figure fractions."""

    height: int
    width: int
    num_shown: int

    def left(self, col: int) -> float:
        groups = 0 if col == 0 else 1 if col <= self.num_shown else 2
        return (col * PANEL_WIDTH_PIXELS + groups * GAP_PIXELS) / self.width

    @property
    def panel(self) -> tuple[float, float]:
        return PANEL_WIDTH_PIXELS / self.width, PANEL_HEIGHT_PIXELS / self.height

    @property
    def image(self) -> tuple[float, float]:
        panel_w, panel_h = self.panel
        return 0.78 * panel_w, 0.6 * panel_h  # leaves room for a two-line caption


def _headings(figure, layout: _Layout, title: str | None) -> None:
    panel_w, _ = layout.panel
    shown = layout.num_shown
    y = 1 - 0.5 * HEADER_PIXELS / layout.height
    style = dict(ha="center", va="center", fontsize=11, weight="bold")
    figure.text(layout.left(0) + panel_w / 2, y, "target", **style)
    figure.text(layout.left(1) + shown * panel_w / 2, y, f"{shown} strongest proponents",
                color=PROPONENT_COLOUR, **style)
    figure.text(layout.left(1 + shown) + shown * panel_w / 2, y, f"{shown} strongest opponents",
                color=OPPONENT_COLOUR, **style)
    if title:
        figure.text(0.005, 1 - 0.12 * HEADER_PIXELS / layout.height, title, ha="left", va="top",
                    fontsize=8, color="#555555")


def _panel(figure, layout: _Layout, row: int, col: int, image, caption: str, colour) -> None:
    """One image with its caption below, framed in ``colour`` (none for the target)."""
    (panel_w, panel_h), (image_w, image_h) = layout.panel, layout.image
    bottom = 1 - (HEADER_PIXELS + row * PANEL_HEIGHT_PIXELS) / layout.height - 0.06 * panel_h - image_h
    ax = figure.add_axes((layout.left(col) + (panel_w - image_w) / 2, bottom, image_w, image_h))
    _draw(ax, image)
    ax.set_title(caption, fontsize=8, y=-0.04, va="top", pad=0, **({"color": colour} if colour else {}))
    if colour:
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)


def _value(labels, i: int):
    if labels is None:
        return None
    value = np.asarray(labels[i])
    return value.tolist()


def top_k_records(
    top: Any,
    *,
    train_labels: Sequence | None = None,
    target_labels: Sequence | None = None,
) -> list[dict]:
    """One JSON-able record per target: its label, proponents and opponents with scores.

    ``[{"target": j, "label": y_j, "proponents": [{"rank": 1, "train_index": i, "label": y_i,
    "score": s}, …], "opponents": […]}, …]``, ranks from 1 (strongest first).
    """
    k, num_targets = np.shape(top.proponents)
    records = []
    for j in range(num_targets):
        record = {"target": j, "label": _value(target_labels, j)}
        for name, indices, values in (("proponents", top.proponents, top.proponent_scores),
                                      ("opponents", top.opponents, top.opponent_scores)):
            record[name] = [
                {"rank": r + 1, "train_index": int(indices[r, j]),
                 "label": _value(train_labels, int(indices[r, j])), "score": float(values[r, j])}
                for r in range(k)
            ]
        records.append(record)
    return records


def write_top_k(out_dir: str | os.PathLike, records: list[dict], meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``topk.json`` (``{**meta, "targets": records}``) and ``topk.csv`` in ``out_dir``.

    CSV columns: target, target_label, kind (proponent/opponent), rank, train_index,
    train_label, score. Both files are written atomically (temporary file, then rename).
    """
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / TOP_K_JSON, out_dir / TOP_K_CSV
    write_atomic(json_path, lambda h: json.dump({**(meta or {}), "targets": records}, h, indent=1))

    def rows(handle):
        writer = csv.writer(handle)
        writer.writerow(["target", "target_label", "kind", "rank", "train_index", "train_label", "score"])
        for record in records:
            for kind in ("proponents", "opponents"):
                for entry in record[kind]:
                    writer.writerow([record["target"], _csv(record["label"]), kind[:-1], entry["rank"],
                                     entry["train_index"], _csv(entry["label"]), f"{entry['score']:.9g}"])

    write_atomic(csv_path, rows)
    return csv_path, json_path


def _csv(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def format_top_k(records: list[dict], num_shown: int = 3, max_targets: int = 8) -> str:
    """A console table: for each of the first ``max_targets`` targets, its strongest few."""
    lines = []
    for record in records[:max_targets]:
        label = "" if record["label"] is None else f" (label {_csv(record['label'])})"
        lines.append(f"target {record['target']}{label}")
        for kind in ("proponents", "opponents"):
            shown = ", ".join(
                f"#{e['train_index']}" + ("" if e["label"] is None else f" [{_csv(e['label'])}]")
                + f" {e['score']:+.3g}"
                for e in record[kind][:num_shown]
            )
            lines.append(f"  {kind:<11} {shown}")
    if len(records) > max_targets:
        lines.append(f"… and {len(records) - max_targets} more targets (all in {TOP_K_CSV} / {TOP_K_JSON})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run records

RUN_FILE = "run.json"
"""What ``trakjax show`` needs to redraw a finished run: written by ``demo`` and ``attribute``."""


def write_run_record(out_dir: str | os.PathLike, record: dict) -> Path:
    """Write ``out_dir/run.json`` atomically.

    Fields: ``kind`` ("demo" or "attribute"), ``complete``, ``store`` (the store directory,
    relative to ``out_dir`` or absolute), ``experiment``, ``top_k``, ``data`` (``.npy`` paths of
    train_inputs, train_labels, target_inputs, target_labels; any may be absent),
    ``picture_targets`` (target indices to draw), optional ``predictions`` (a ``.npy`` of
    predicted target labels), ``title``, and for the explorer (:mod:`trakjax.explorer`)
    ``summary`` (settings, accuracy, LDS, timings), ``decoder`` (``"bytes"`` or a vocabulary
    file for token inputs) and ``inputs`` (how inputs are shown: "auto", "image", "tokens",
    "table" or "none").
    """
    path = Path(out_dir) / RUN_FILE
    write_atomic(path, lambda h: json.dump(record, h, indent=1))
    return path


_RUN_RECORD_FIELDS = {
    "kind": (str,), "complete": (bool,), "store": (str,), "experiment": (str,), "top_k": (int,),
    "data": (dict,), "picture_targets": (list,),
}
"""Fields every run record has, with their JSON types (``predictions``, ``title``, ``config``,
``decoder`` and ``inputs`` are optional strings, ``summary`` an optional object)."""


def check_run_record(record: Any, path: Path) -> dict:
    """``record`` if it is a run record of the documented form; else a StoreError naming ``path``
    and the first bad field."""
    if not isinstance(record, dict):
        raise StoreError(f"{path} does not hold a JSON object")
    for field, kinds in _RUN_RECORD_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, kinds) or (int in kinds and isinstance(value, bool)):
            raise StoreError(
                f"{path}: field {field!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}; "
                "the run record is damaged: rerun the command that made it"
            )
    if record["top_k"] < 1 or not all(isinstance(v, str) for v in record["data"].values()):
        raise StoreError(f"{path}: top_k must be >= 1 and data must map names to paths; the run record is damaged")
    for field in ("predictions", "title", "config", "decoder", "inputs"):
        if field in record and not isinstance(record[field], str):
            raise StoreError(f"{path}: field {field!r} must be a string, got {record[field]!r}")
    if "summary" in record and not isinstance(record["summary"], dict):
        raise StoreError(f"{path}: field 'summary' must be an object, got {record['summary']!r}")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in record["picture_targets"]):
        raise StoreError(f"{path}: picture_targets must be a list of target indices")
    return record


def read_run_record(out_dir: str | os.PathLike, *, missing_ok: bool = False, check: bool = True) -> dict | None:
    """``out_dir/run.json`` as a dict (``None`` when absent and ``missing_ok``).

    Args:
      out_dir: the run's output directory.
      missing_ok: return ``None`` for a directory without ``run.json``.
      check: require every documented field (:func:`check_run_record`); without it, only a JSON
        object.

    Raises:
      StoreError: naming the file when it is absent (unless ``missing_ok``), not valid JSON, or
        not of the documented form.
    """
    path = Path(os.path.expanduser(os.fspath(out_dir))) / RUN_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise StoreError(
            f"{out_dir} holds no {RUN_FILE}: it is not the output directory of `trakjax demo` or "
            "`trakjax attribute`"
        )
    record = read_json(path, "run record")
    if not isinstance(record, dict):
        raise StoreError(f"{path} does not hold a JSON object")
    return check_run_record(record, path) if check else record


OUTPUT_NAMES = (RUN_FILE, TOP_K_CSV, TOP_K_JSON, PICTURE_FILE)
"""The files a run writes into its output directory (with ``store/``; :mod:`trakjax.manifest`)."""


def is_trakjax_output(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` is a trakjax output: its ``run.json`` is a run record trakjax wrote."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file() or path.is_symlink():
        return False
    try:
        record = read_json(path, "run record")
        check_run_record(record, path)
    except StoreError:
        return False
    return record["kind"] in ("demo", "attribute")


def check_output_directory(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse to write into a directory that is not a trakjax output but holds files with
    trakjax's output names (a user's own ``topk.csv``, ``run.json``, ``store``), unless
    ``overwrite``; and refuse a directory that is a link when ``overwrite``.

    Raises:
      StoreError: naming the directory and the files.
    """
    from trakjax import manifest  # here: the rest of this module needs no store code

    out_dir = Path(out_dir)
    if overwrite:
        manifest.check_not_link(out_dir, "the output directory")
        store = out_dir / "store"
        if store.is_symlink():
            manifest.check_not_link(store, "the output's store")
    if overwrite or not out_dir.is_dir() or is_trakjax_output(out_dir):
        return
    from trakjax.explorer import ASSET_DIR, PAGE_FILE

    names = (*OUTPUT_NAMES, PAGE_FILE, ASSET_DIR, "store")
    clashing = [out_dir / name for name in names if os.path.lexists(out_dir / name)]
    if clashing:
        raise StoreError(
            f"the output directory {out_dir} is not a trakjax output (no {RUN_FILE} written by "
            f"trakjax) but holds {', '.join(str(p) for p in clashing)}, which trakjax would "
            "replace; use another output directory, or --overwrite to replace them"
        )


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a writable directory or can be created as one.

    The nearest existing ancestor must be a directory in which a file can actually be created
    (probed with a temporary file, removed at once): permission bits alone do not tell, e.g.
    on a read-only file system or for root.
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgumentError(f"{what} {path} is not writable: {existing} is not a directory")
    try:
        import tempfile

        with tempfile.NamedTemporaryFile(dir=existing, prefix=".trakjax-probe-"):
            pass
    except OSError as err:
        raise InvalidArgumentError(f"{what} {path} is not writable: cannot create a file in {existing} ({err.strerror})") from err


def _resolve(out_dir: Path, name: str | None) -> Path | None:
    if name is None:
        return None
    path = Path(name)
    return path if path.is_absolute() else out_dir / path


def _load(out_dir: Path, data: dict, name: str):
    path = _resolve(out_dir, data.get(name))
    if path is None:
        return None
    if not path.is_file():
        raise InvalidArgumentError(f"{RUN_FILE} of {out_dir} names {name} = {path}, which does not exist")
    return np.load(path, mmap_mode="r")


def render(out_dir: str | os.PathLike, record: dict, top: Any, write_dir: str | os.PathLike | None = None,
           *, explorer: bool = True) -> dict:
    """Write the top-k table, for image inputs the picture, and the explorer of a run.

    The picture is drawn when the record's ``inputs`` is "auto" (absent) or "image" and the
    inputs are drawable (:func:`as_images`).

    Args:
      out_dir: the run's output directory.
      record: its run record (see :func:`write_run_record`).
      top: the experiment's top-k (see the module docstring).
      write_dir: where to write them instead (default ``out_dir``).
      explorer: write ``index.html`` too (:func:`write_run_explorer`, with the record's
        ``summary``); a caller that learns the summary later writes it then.

    Returns:
      ``{"records": top-k records, "csv": path, "json": path, "picture": path or None,
      "explorer": path of index.html or None, "explorer_files": the explorer's files}``.
    """
    out_dir = Path(out_dir)
    write_dir = out_dir if write_dir is None else Path(write_dir)
    data = record.get("data", {})
    train_labels = _load(out_dir, data, "train_labels")
    target_labels = _load(out_dir, data, "target_labels")
    records = top_k_records(top, train_labels=train_labels, target_labels=target_labels)
    csv_path, json_path = write_top_k(
        write_dir, records, {"experiment": record.get("experiment"), "k": int(np.shape(top.proponents)[0])}
    )
    picture = None
    drawable = record.get("inputs", "auto") in ("auto", "image")  # not token ids of a square length
    train_images = as_images(_as_array(_load(out_dir, data, "train_inputs"))) if drawable else None
    target_images = as_images(_as_array(_load(out_dir, data, "target_inputs"))) if drawable else None
    if train_images is not None and target_images is not None:
        predictions = _load(out_dir, record, "predictions")
        columns = record.get("picture_targets") or list(range(min(8, np.shape(top.proponents)[1])))
        picture = write_dir / PICTURE_FILE
        attribution_figure(
            picture, top, train_images, target_images, train_labels=train_labels,
            target_labels=target_labels, predictions=predictions, columns=columns,
            num_shown=min(5, np.shape(top.proponents)[0]), title=record.get("title"),
        )
    files = write_run_explorer(out_dir, record, records, write_dir=write_dir) if explorer else []
    return {"records": records, "csv": csv_path, "json": json_path, "picture": picture,
            "explorer": files[-1] if files else None, "explorer_files": files}


def write_run_explorer(out_dir: str | os.PathLike, record: dict, records: list[dict],
                       summary: dict | None = None, write_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the explorer (``index.html`` and its files) of a run: :func:`trakjax.explorer.write_explorer`
    with the inputs, predictions, decoder and title the run record names, and ``summary``
    (default: the record's), into ``write_dir`` (default ``out_dir``). Returns the files
    written, ``index.html`` last."""
    from trakjax import explorer as explorer_lib

    out_dir = Path(out_dir)
    data = record.get("data", {})
    decoder = record.get("decoder")
    if decoder is not None and decoder != "bytes":
        decoder = _resolve(out_dir, decoder)
    return explorer_lib.write_explorer(
        out_dir if write_dir is None else Path(write_dir), records, train_inputs=_load(out_dir, data, "train_inputs"),
        target_inputs=_load(out_dir, data, "target_inputs"), decoder=decoder,
        predictions=_load(out_dir, record, "predictions"),
        summary=record.get("summary") if summary is None else summary,
        title=record.get("title"), kind=record.get("inputs", "auto"),
    )


def _as_array(value):
    return None if value is None else np.asarray(value)


def open_store(path: str | os.PathLike):
    """Open the finished store at ``path`` with the configuration it records."""
    from trakjax import store as store_lib  # here: the rest of this module needs no JAX

    path = Path(path)
    metadata_path = path / store_lib.METADATA_FILE
    if not metadata_path.is_file():
        raise StoreError(f"{path} is not a trakjax store (no {store_lib.METADATA_FILE})")
    metadata = store_lib.read_json(metadata_path)
    config = metadata.get("config") if isinstance(metadata, dict) else None
    if not isinstance(config, dict):
        raise StoreError(f"{metadata_path} records no configuration")
    return store_lib.Store.open(path, config)


def stored_top_k(store, experiment: str, k: int, block_rows: int = 8192):
    """Top-k of an experiment's finalized score matrix, streamed block by block."""
    from trakjax import scores as scores_lib  # here: the rest of this module needs no JAX

    scores = store.scores(experiment)
    k = min(int(k), scores.shape[0])
    blocks = ((s, scores[s : s + block_rows]) for s in range(0, scores.shape[0], block_rows))
    return scores_lib.top_k(blocks, k)


def describe_unfinished(out_dir: Path, record: dict) -> str:
    """What an unfinished run lacks, from its store: checkpoints featurized and finalized, the
    experiment's scores, the output files."""
    from trakjax import store as store_lib  # here: the rest of this module needs no JAX

    root = _resolve(out_dir, record.get("store") if isinstance(record.get("store"), str) else "store")
    if not (root / store_lib.METADATA_FILE).is_file():
        return f"its store {root} does not exist yet, so nothing is featurized, scored or written"
    store = open_store(root)
    ids = store.model_ids()
    finalized = [m for m in ids if store.is_finalized(m)]
    parts = [f"{len(ids)} checkpoint(s) featurized so far, {len(finalized)} finalized"]
    experiment = record.get("experiment")
    if not isinstance(experiment, str) or not store.has_experiment(experiment):
        parts.append("no target has been scored")
    else:
        try:
            store.scores(experiment)
        except StoreError:
            parts.append(f"the scores of experiment {experiment!r} are not finalized")
    from trakjax.explorer import PAGE_FILE

    absent = [name for name in (TOP_K_JSON, TOP_K_CSV, PAGE_FILE) if not (out_dir / name).is_file()]
    if absent:
        parts.append(f"missing outputs: {', '.join(absent)}")
    return "; ".join(parts)


def show(out_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Redraw the picture, the top-k table and the explorer of a finished run from its store.

    ``out`` is where to write them (default ``out_dir``); a finished run on a read-only file
    system is read, and its tables written to ``out``.

    Returns :func:`render`'s dict.

    Raises:
      StoreError: if ``out_dir`` holds no run record or a damaged one, the run did not finish,
        or its store has no finalized scores for the recorded experiment.
      InvalidArgumentError: if ``out_dir`` is not a directory.
    """
    out_dir = Path(os.path.expanduser(os.fspath(out_dir)))
    if not out_dir.is_dir():
        raise InvalidArgumentError(f"{out_dir} is not a directory")
    record = read_run_record(out_dir, check=False)
    if record.get("complete") is not True:
        raise StoreError(
            f"the run in {out_dir} did not finish (its {RUN_FILE} is not marked complete): "
            f"{describe_unfinished(out_dir, record)}; rerun the command that made it"
        )
    record = check_run_record(record, out_dir / RUN_FILE)
    store = open_store(_resolve(out_dir, record["store"]))
    experiment = record["experiment"]
    if experiment not in store.experiment_names():
        raise StoreError(
            f"the store at {store.root} has no experiment {experiment!r} (it has "
            f"{store.experiment_names()})"
        )
    num_targets = store.scores(experiment).shape[1]
    bad = [c for c in record["picture_targets"] if not 0 <= c < num_targets]
    if bad:
        raise StoreError(
            f"{out_dir / RUN_FILE}: picture_targets {bad} are out of range for {num_targets} targets"
        )
    top = stored_top_k(store, experiment, record["top_k"])
    write_dir = out_dir if out is None else Path(os.path.expanduser(os.fspath(out)))
    try:
        check_writable(write_dir, "the directory to write the picture and tables in")
    except InvalidArgumentError as err:
        hint = "" if out is not None else "; give another with --out DIR"
        raise InvalidArgumentError(f"{err}{hint}") from err
    write_dir.mkdir(parents=True, exist_ok=True)
    return render(out_dir, record, top, write_dir)
