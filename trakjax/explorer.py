"""The HTML explorer: ``OUT/index.html``, every target with its proponents and opponents.

One static page that opens from disk (``file://``) with no server and nothing fetched: the
top-k data is inlined in ``index.html`` as ``<script type="application/json">`` (``<`` escaped
as ``\\u003c``), and everything else is loaded by ``<script src>`` / ``<link>`` from sibling
files with content-hashed names under ``OUT/explorer/`` (:data:`OWNED_PATTERNS`):

* ``app-<hash>.js`` and ``style-<hash>.css``: the page's code and style, plain JavaScript and CSS
  shipped in the package (``trakjax/explorer_assets``), no framework and no build step;
* ``pixels-<hash>.js``: thumbnails of image inputs, raw uint8 pixels (base64) in chunks of about
  :data:`CHUNK_BYTES`, loaded when an entry that shows them is rendered and drawn on a canvas.
  Their total is held under a size budget: images are subsampled (every f-th row and column)
  until they fit, and beyond the budget at the smallest size the remaining ones get no
  thumbnail.

How inputs are shown (``input_kind="auto"`` decides from the arrays, see :func:`input_kind`):
images (N, H, W[, C]) as thumbnails; token ids (N, L) as text when a decoder is given (the
byte-level ``"bytes"``: ids 0..255 are bytes, decoded as UTF-8 with ``errors="replace"``; or a
vocabulary file), otherwise as ids; tabular rows as their first values; anything else (e.g. 5-D
arrays) as indices and scores only. The page puts text in with ``textContent`` only.

Every file is written under a temporary name and renamed (:mod:`trakjax.files`); assets first,
``index.html`` last, then assets of an earlier page that the new one does not use are removed.
:func:`write_explorer` is the one entry point; the functions before it are pure (but for
:func:`load_vocabulary`, which reads its file).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from trakjax import manifest
from trakjax.errors import InvalidArgumentError
from trakjax.files import remove_if_present, write_atomic

PAGE_FILE = "index.html"
"""The page, in the output directory; written last."""
ASSET_DIR = "explorer"
"""The page's sibling files, in this subdirectory of the output directory."""
OWNED_PATTERNS = (PAGE_FILE, f"{ASSET_DIR}/app-*.js", f"{ASSET_DIR}/style-*.css",
                  f"{ASSET_DIR}/pixels-*.js")
"""Every file the explorer writes, as glob patterns relative to the output directory (the one
list to join trakjax's manifest of its own files)."""
manifest.register(manifest.OUTPUT, *OWNED_PATTERNS, f"{ASSET_DIR}/")
PIXEL_BUDGET_BYTES = 48 * 2**20
"""Default upper bound on the raw thumbnail pixels written (base64 adds a third on disk)."""
CHUNK_BYTES = 2**20
"""Raw pixels per thumbnail file (about; at least one image per file)."""
MIN_THUMBNAIL_SIDE = 8
"""Images are not subsampled below this many pixels per side."""
MAX_TEXT_CHARACTERS = 2000
"""Decoded text longer than this is cut (and marked cut)."""
TEXT_BUDGET_CHARACTERS = 16 * 2**20
"""Upper bound on the decoded text of all examples together: with many examples each is cut
shorter (to no fewer than :data:`MIN_TEXT_CHARACTERS`)."""
MIN_TEXT_CHARACTERS = 200
MAX_SHOWN_IDS = 64
"""Token ids shown per example when there is no decoder."""
MAX_TABLE_VALUES = 8
"""Values shown per tabular example."""
INPUT_KINDS = ("auto", "image", "tokens", "table", "none")
_ASSETS = resources.files("trakjax") / "explorer_assets"


# --------------------------------------------------------------------------- what to show


def input_kind(inputs: Any, decoder: Any = None) -> str:
    """How inputs are shown: "image", "tokens", "table" or "none" (not drawable).

    * "tokens": a decoder is given, or (N, L) integer ids other than uint8;
    * "image": (N, H, W), (N, H, W, C) with C in {1, 3, 4}, or (N, D) with D a square
      (see :func:`trakjax.report.as_images`);
    * "table": other (N,) or (N, D) numbers;
    * "none": anything else (no inputs, 5-D arrays, dicts without ``input_ids``).
    """
    from trakjax.report import as_images

    inputs = _token_array(inputs)
    if not isinstance(inputs, np.ndarray) or not np.issubdtype(inputs.dtype, np.number) or inputs.ndim < 1:
        return "none"
    integer_ids = np.issubdtype(inputs.dtype, np.integer) and inputs.dtype != np.uint8
    if inputs.ndim == 2 and (decoder is not None or integer_ids):
        return "tokens"
    if as_images(inputs) is not None:
        return "image"
    return "table" if inputs.ndim <= 2 else "none"


def resolve_kind(kind: str, train_inputs: Any, target_inputs: Any, decoder: Any = None) -> str:
    """The kind the page shows: ``kind`` when both inputs fit it, else what :func:`input_kind`
    finds for both ("none" when they differ). "image" needs drawable images of one shape on both
    sides; "tokens" needs (N, L) numbers (or ``input_ids``); "table" (N,) or (N, D) numbers."""
    found = [input_kind(train_inputs, decoder), input_kind(target_inputs, decoder)]
    if kind == "none":
        return "none"
    if kind == "image" and _same_images(train_inputs, target_inputs):
        return "image"
    if kind == "tokens":
        arrays = [_token_array(x) for x in (train_inputs, target_inputs)]
        if all(isinstance(a, np.ndarray) and a.ndim == 2 and np.issubdtype(a.dtype, np.number) for a in arrays):
            return "tokens"
    if kind == "table" and all(f in ("table", "image", "tokens") for f in found):
        return "table"
    if found[0] != found[1] or (found[0] == "image" and not _same_images(train_inputs, target_inputs)):
        return "none"
    return found[0]


def _same_images(train_inputs: Any, target_inputs: Any) -> bool:
    from trakjax.report import as_images

    drawn = [None if x is None else as_images(np.asarray(x)) for x in (train_inputs, target_inputs)]
    return all(d is not None for d in drawn) and drawn[0].shape[1:] == drawn[1].shape[1:]


def _token_array(inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input_ids")
    return None if inputs is None else np.asarray(inputs) if not isinstance(inputs, np.ndarray) else inputs


def referenced_train(records: Sequence[Mapping]) -> np.ndarray:
    """(R,) int64 train indices listed in ``records``, in order of first appearance: target by
    target, proponents then opponents by rank (so the thumbnails of the first targets, which the
    page shows first, lie together in the first chunks)."""
    listed = [e["train_index"] for r in records for name in ("proponents", "opponents") for e in r[name]]
    flat = np.asarray(listed, np.int64)
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)]


def load_vocabulary(path: str | os.PathLike) -> list[str]:
    """A vocabulary file as a list (token id → string).

    ``.json``: a list of strings, or a ``{token: id}`` object (as Hugging Face's vocab.json);
    anything else: UTF-8 text, one token per line (line i is token i).
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise InvalidArgumentError(f"decoder: vocabulary file {path} does not exist")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix != ".json":
        return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    content = json.loads(text)
    if isinstance(content, list) and all(isinstance(t, str) for t in content):
        return content
    if isinstance(content, dict) and all(isinstance(v, int) for v in content.values()):
        tokens = [""] * (max(content.values(), default=-1) + 1)
        for token, index in content.items():
            tokens[index] = token
        return tokens
    raise InvalidArgumentError(f"decoder: {path} must hold a list of token strings or a {{token: id}} object")


def decode_tokens(ids: np.ndarray, decoder: str | Sequence[str]) -> str:
    """Token ids (L,) as text.

    ``decoder="bytes"``: ids 0..255 are bytes, decoded as UTF-8 with ``errors="replace"``;
    a sequence of strings: the vocabulary (id → token, concatenated). Ids outside the decoder's
    range appear as ``⟨id⟩``, never dropped.
    """
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    size = 256 if isinstance(decoder, str) else len(decoder)
    inside = (ids >= 0) & (ids < size)
    bounds = [0, *(np.flatnonzero(np.diff(inside)) + 1).tolist(), ids.size]
    pieces: list[str] = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        run = ids[start:stop]
        if run.size == 0:
            continue
        if not inside[start]:
            pieces.extend(f"⟨{int(i)}⟩" for i in run)
        elif isinstance(decoder, str):
            pieces.append(run.astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        else:
            pieces.append("".join(decoder[i] for i in run.tolist()))
    return "".join(pieces)


def _resolve_decoder(decoder: Any) -> str | list[str] | None:
    if decoder is None or decoder == "bytes":
        return decoder
    if isinstance(decoder, str | os.PathLike):
        return load_vocabulary(decoder)
    if isinstance(decoder, Sequence) and all(isinstance(t, str) for t in decoder):
        return list(decoder)
    raise InvalidArgumentError(f'decoder must be None, "bytes", a vocabulary file path or a list of strings, got {decoder!r}')


def text_limit(num_examples: int) -> int:
    """Characters of decoded text kept per example when ``num_examples`` are shown: all of
    :data:`MAX_TEXT_CHARACTERS` while the total fits :data:`TEXT_BUDGET_CHARACTERS`, less beyond."""
    share = TEXT_BUDGET_CHARACTERS // max(num_examples, 1)
    return max(MIN_TEXT_CHARACTERS, min(MAX_TEXT_CHARACTERS, share))


def example_content(inputs: Any, index: int, kind: str, decoder: str | list[str] | None,
                    max_characters: int = MAX_TEXT_CHARACTERS) -> Any:
    """What the page shows of example ``index``: ``{"text": …, "cut": bool}`` (decoded tokens, at
    most ``max_characters``), ``{"ids": […], "length": L}``, ``{"values": […], "size": D}`` or
    ``None``; cut where long (with the full length, so the page says so)."""
    if kind == "tokens":
        row = np.asarray(_token_array(inputs)[index]).reshape(-1)
        if decoder is None:
            return {"ids": row[:MAX_SHOWN_IDS].astype(np.int64).tolist(), "length": int(row.size)}
        text = decode_tokens(row, decoder)
        return {"text": text[:max_characters], "cut": len(text) > max_characters}
    if kind == "table":
        row = np.asarray(_token_array(inputs)[index]).reshape(-1)
        return {"values": [_number(v) for v in row[:MAX_TABLE_VALUES].tolist()], "size": int(row.size)}
    return None


def _number(value: Any) -> Any:
    """A JSON number (6 significant digits for floats); non-finite floats as strings."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.6g}")


# --------------------------------------------------------------------------- thumbnails


def thumbnail_layout(num_images: int, shape: tuple[int, ...], budget_bytes: int) -> tuple[int, int]:
    """``(step, count)``: subsample every ``step``-th row and column and keep the first ``count``
    images, so that ``count`` images of ``shape`` (H, W[, C]) fit ``budget_bytes`` (one byte
    per value), with sides not below :data:`MIN_THUMBNAIL_SIDE` unless already smaller."""
    height, width = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    step = 1
    while True:
        size = -(-height // step) * -(-width // step) * channels
        if size * num_images <= budget_bytes:
            return step, num_images
        smaller = -(-min(height, width) // (step + 1))
        if smaller < MIN_THUMBNAIL_SIDE:
            return step, min(num_images, budget_bytes // size)
        step += 1


def to_uint8(images: np.ndarray, low: float, high: float) -> np.ndarray:
    """Images scaled from [low, high] to uint8 [0, 255] (uint8 images unchanged)."""
    if images.dtype == np.uint8:
        return images
    scale = 255.0 / (high - low) if high > low else 0.0
    scaled = (np.asarray(images, np.float64) - low) * scale
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _value_range(images: Any, indices: np.ndarray, block: int = 1024) -> tuple[float, float]:
    low, high = math.inf, -math.inf
    for start in range(0, indices.size, block):
        part = np.asarray(images[np.sort(indices[start : start + block])], np.float64)
        finite = part[np.isfinite(part)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (0.0, 1.0) if low > high else (low, high)


def pack_thumbnails(
    sources: Sequence[tuple[Any, np.ndarray]], budget_bytes: int = PIXEL_BUDGET_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[dict, list[tuple[str, bytes]]]:
    """Thumbnails of the listed images, packed into chunks.

    Args:
      sources: ``(images, indices)`` pairs: (N, H, W[, C]) images (all of the same H, W, C) and
        the (R,) indices to pack, in priority order (the first get thumbnails when the budget is
        short).
      budget_bytes: upper bound on the raw pixels packed.
      chunk_bytes: raw pixels per chunk (at least one image).

    Returns:
      ``(layout, chunks)``: ``layout`` has height, width, channels, ``per_chunk`` and
      ``slots`` (one list per source: the thumbnail slot of each index, -1 for none); slot s is
      image ``s % per_chunk`` of chunk ``s // per_chunk``. ``chunks`` is a list of (name,
      raw uint8 bytes), named by their content hash. Values are scaled to uint8 over the range of
      each source's packed images.
    """
    first = sources[0][0]
    shape = tuple(first.shape[1:])
    total = sum(int(indices.size) for _, indices in sources)
    step, count = thumbnail_layout(total, shape, budget_bytes)
    sample = np.asarray(first[:1])[:, ::step, ::step]
    per_image = int(sample[0].size)
    per_chunk = max(1, chunk_bytes // per_image)
    slots, pixels, used = [], [], 0
    for images, indices in sources:
        take = indices[: max(0, count - used)]
        low, high = _value_range(images, take)
        for start in range(0, take.size, 1024):
            part = np.asarray(images[take[start : start + 1024]])[:, ::step, ::step]
            pixels.append(to_uint8(part, low, high).reshape(part.shape[0], -1))
        slots.append(list(range(used, used + take.size)) + [-1] * (indices.size - take.size))
        used += take.size
    flat = np.concatenate(pixels) if pixels else np.zeros((0, per_image), np.uint8)
    chunks = []
    for start in range(0, flat.shape[0], per_chunk):
        data = flat[start : start + per_chunk].tobytes()
        chunks.append((f"pixels-{_hash(data)}.js", data))
    layout = {"height": int(sample.shape[1]), "width": int(sample.shape[2]),
              "channels": int(sample.shape[3]) if sample.ndim == 4 else 1, "per_chunk": per_chunk,
              "step": step, "slots": slots, "chunks": [name for name, _ in chunks]}
    return layout, chunks


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def pixel_script(name: str, data: bytes) -> str:
    """The ``.js`` file of one thumbnail chunk: a call that hands its base64 pixels to the page."""
    return f'trakjaxPixels("{name}","{base64.b64encode(data).decode("ascii")}");\n'


# --------------------------------------------------------------------------- the page data


def json_safe(value: Any) -> Any:
    """``value`` (a label: number, bool, string, None or nested lists) with non-finite floats as
    strings ("nan", "inf"), which JSON cannot hold."""
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _target_entry(record: Mapping, prediction: Any) -> dict:
    entry = {"t": int(record["target"]), "y": json_safe(record.get("label"))}
    if prediction is not None:
        entry["pred"] = json_safe(prediction)
    for key, name in (("p", "proponents"), ("o", "opponents")):
        entry[key] = [int(e["train_index"]) for e in record[name]]
        entry[key + "s"] = [_number(e["score"]) for e in record[name]]
    return entry


def summary_rows(summary: Mapping | None) -> list[list[str]]:
    """The run summary as ``[name, text]`` rows: nested dicts flattened (``lds.mean``), numbers
    with 4 significant digits, long lists shortened to their mean and length."""
    rows: list[list[str]] = []

    def text(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list) and len(value) > 6 and all(isinstance(v, int | float) for v in value):
            return f"mean {float(np.mean(value)):.4g} over {len(value)} values"
        if isinstance(value, list | dict):
            return json.dumps(value)
        return str(value)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            rows.append([prefix, text(value)])

    walk("", dict(summary or {}))
    return rows


def summary_headline(summary: Mapping | None) -> list[str]:
    """The key figures of a run summary, each a short phrase: accuracy (``accuracy`` a number or
    a dict with ``ensemble`` or ``mean``), LDS (``lds`` a number or a dict with ``mean`` and
    optionally ``ci_low``, ``ci_high``, ``confidence``) and the total of ``seconds``."""
    summary = dict(summary or {})
    phrases = []
    accuracy = summary.get("accuracy")
    if isinstance(accuracy, Mapping):
        which = "ensemble" if isinstance(accuracy.get("ensemble"), int | float) else "mean"
        accuracy = accuracy.get(which)
    if isinstance(accuracy, int | float) and not isinstance(accuracy, bool):
        phrases.append(f"accuracy {accuracy:.3f}")
    lds = summary.get("lds")
    if isinstance(lds, Mapping) and isinstance(lds.get("mean"), int | float):
        text = f"LDS {lds['mean']:.3f}"
        if all(isinstance(lds.get(key), int | float) for key in ("ci_low", "ci_high", "confidence")):
            text += f" ({lds['confidence']:.0%} CI {lds['ci_low']:.3f} .. {lds['ci_high']:.3f})"
        phrases.append(text)
    elif isinstance(lds, int | float) and not isinstance(lds, bool):
        phrases.append(f"LDS {lds:.3f}")
    seconds = summary.get("seconds")
    if isinstance(seconds, Mapping) and seconds:
        phrases.append(f"{sum(float(v) for v in seconds.values()):.1f} s in all")
    return phrases


def page_data(
    records: Sequence[Mapping], *, kind: str, train_inputs: Any = None, target_inputs: Any = None,
    decoder: Any = None, predictions: Any = None, summary: Mapping | None = None,
    title: str | None = None, images: dict | None = None,
) -> dict:
    """The JSON the page reads: targets with their top-k (``t`` index, ``y`` label, ``pred``,
    ``p``/``ps`` proponents and scores, ``o``/``os`` opponents), train labels and contents of the
    listed training examples, target contents, the summary rows and the thumbnail layout."""
    train = referenced_train(records)
    train_labels: dict[str, Any] = {}
    for record in records:
        for name in ("proponents", "opponents"):
            for e in record[name]:
                train_labels.setdefault(str(e["train_index"]), json_safe(e.get("label")))
    content = {"train": {}, "target": {}}
    if kind in ("tokens", "table"):
        limit = text_limit(len(train) + len(records))
        content["train"] = {str(i): example_content(train_inputs, int(i), kind, decoder, limit) for i in train}
        content["target"] = {str(r["target"]): example_content(target_inputs, int(r["target"]), kind, decoder, limit)
                             for r in records}
    predicted = [None] * len(records) if predictions is None else [
        np.asarray(predictions[int(r["target"])]).tolist() for r in records]
    return {
        "version": 1, "title": title or "trakjax attributions", "kind": kind,
        "decoded": decoder is not None, "k": max((len(r["proponents"]) for r in records), default=0),
        "summary": summary_rows(summary), "headline": summary_headline(summary), "targets": [_target_entry(r, p) for r, p in zip(records, predicted, strict=True)],
        "train_labels": train_labels, "content": content, "images": images, "asset_dir": ASSET_DIR,
    }


def embed_json(content: Any) -> str:
    """``content`` as JSON safe inside ``<script type="application/json">``: every ``<`` is
    written ``\\u003c`` (so no ``</script>`` or ``<!--`` can end or change the element)."""
    return json.dumps(content, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def page_html(data: dict, app_name: str, style_name: str) -> str:
    """``index.html``: the inlined data, the error element, and the app and style files."""
    template = (_ASSETS / "page.html").read_text(encoding="utf-8")
    values = {"TITLE": html.escape(data["title"]), "STYLE": f"{ASSET_DIR}/{style_name}",
              "APP": f"{ASSET_DIR}/{app_name}", "DATA": embed_json(data)}
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda match: values[match.group(1)], template)


# --------------------------------------------------------------------------- the writer


def write_explorer(
    out_dir: str | os.PathLike, records: Sequence[Mapping], *, train_inputs: Any = None,
    target_inputs: Any = None, decoder: Any = None, predictions: Any = None,
    summary: Mapping | None = None, title: str | None = None, kind: str = "auto",
    pixel_budget_bytes: int = PIXEL_BUDGET_BYTES,
) -> list[Path]:
    """Write the explorer of a run into ``out_dir``; returns the files written, ``index.html`` last.

    Args:
      out_dir: the run's output directory (created if absent).
      records: the top-k records, as :func:`trakjax.report.top_k_records` gives them (and
        ``topk.json`` holds under ``"targets"``).
      train_inputs, target_inputs: the (N, …) and (T, …) inputs, arrays or memory maps (or dicts,
        whose ``input_ids`` are used for tokens); ``None`` shows indices and scores only.
      decoder: for token inputs: ``None`` (ids), ``"bytes"``, a vocabulary file path (see
        :func:`load_vocabulary`) or a list of token strings.
      predictions: optional (T,) predicted labels.
      summary: the run's settings, accuracy, LDS, timings: a JSON-able dict, shown on top.
      title: the page's title.
      kind: one of :data:`INPUT_KINDS`; "auto" decides with :func:`input_kind`.
      pixel_budget_bytes: upper bound on thumbnail pixels (see :func:`pack_thumbnails`).
    """
    if kind not in INPUT_KINDS:
        raise InvalidArgumentError(f"kind must be one of {list(INPUT_KINDS)}, got {kind!r}")
    decoder = _resolve_decoder(decoder)
    kind = resolve_kind(kind, train_inputs, target_inputs, decoder)
    images, chunks = None, []
    if kind == "image" and records:
        from trakjax.report import as_images

        targets = np.asarray([int(r["target"]) for r in records], np.int64)
        train = referenced_train(records)
        images, chunks = pack_thumbnails(
            [(as_images(np.asarray(target_inputs)), targets), (as_images(np.asarray(train_inputs)), train)],
            pixel_budget_bytes)
        images["train"] = train.tolist()
    data = page_data(records, kind=kind, train_inputs=train_inputs, target_inputs=target_inputs,
                     decoder=decoder, predictions=predictions, summary=summary, title=title, images=images)
    return _write_files(Path(out_dir), data, chunks)


def _write_files(out_dir: Path, data: dict, chunks: list[tuple[str, bytes]]) -> list[Path]:
    assets = out_dir / ASSET_DIR
    assets.mkdir(parents=True, exist_ok=True)
    app = (_ASSETS / "app.js").read_bytes()
    style = (_ASSETS / "style.css").read_bytes()
    files = [(f"app-{_hash(app)}.js", app), (f"style-{_hash(style)}.css", style)]
    files += [(name, pixel_script(name, raw).encode("ascii")) for name, raw in chunks]
    written = []
    for name, content in files:
        path = assets / name
        if not (path.is_file() and path.read_bytes() == content):
            write_atomic(path, lambda handle, content=content: handle.write(content), binary=True)
        written.append(path)
    page = out_dir / PAGE_FILE
    text = page_html(data, files[0][0], files[1][0])
    write_atomic(page, lambda handle: handle.write(text))
    written.append(page)
    keep = {path.name for path in written}
    for pattern in OWNED_PATTERNS[1:]:
        for stale in out_dir.glob(pattern):
            if stale.name not in keep:
                remove_if_present(stale)
    return written
