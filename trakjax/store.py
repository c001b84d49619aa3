"""The attribution store: one directory per attribution run, resumable, shareable between processes.

Layout of a store directory (every array is a ``.npy`` file, opened as a memory map and readable
by plain ``numpy.load``; docs/design.md, "The store")::

    trakjax_store.json                  run metadata: the result settings, the parameter layout,
                                        the training data's fingerprint, the task's fingerprints
                                        by the JAX/Flax versions that traced them
    .lock                               fcntl.flock lock guarding shared metadata
    models/<model_id>/model.json        fingerprint of the weights; solve details once finalized
    models/<model_id>/grads.npy         (N, k) projected train gradients Φ, storage dtype
    models/<model_id>/out_to_loss.npy   (N,) float32 out-to-loss terms q
    models/<model_id>/done.npy          (N,) uint8, 1 where row i of Φ and q is written
    models/<model_id>/output_shift.npy  (N,) float32 f − f₀ (output minus an untrained model's),
    models/<model_id>/curvature.npy     (N,) float32 h = ∂²L/∂f²: what lambda_reg="auto" reads
    models/<model_id>/features.npy      (N, k) F = Φ (ΦᵀΦ + λI)⁻¹, storage dtype (once finalized)
    experiments/<name>/experiment.json  number of targets, their fingerprint, scored model_ids,
                                        the model_ids of the finished score matrix
    experiments/<name>/targets/<model_id>/grads.npy   (T, k) target gradients Ψ, storage dtype
    experiments/<name>/targets/<model_id>/done.npy    (T,) uint8
    experiments/<name>/scores.npy       (N, T) float32 scores, once finished
    experiments/<name>/partial/<key>/   scores.npy and scores_done.npy ((num_blocks,) uint8) of a
                                        score matrix being computed for one set of model_ids

Storage dtypes: float32 and float16 files hold those dtypes; bfloat16 files hold the bfloat16 bit
patterns as uint16 (``np.load(path).view(ml_dtypes.bfloat16)`` reads them).

Guarantees:

* Every file is written atomically through :mod:`trakjax.files` (exclusive temporary name,
  fsync, rename, directory fsync); no writer follows a link planted in the store.
* Rows are written data first, then flushed, then marked done, so a process killed at any moment
  leaves only rows that are complete and marked, or unmarked (recomputed on resume).
* A score matrix is computed in its own ``partial/<key>`` directory (one per set of model_ids
  and block size) and moved to ``scores.npy`` under the store lock only when every block is
  written; the finished record names its model_ids. Two sessions finishing with different
  model_ids never share a file, and each gets its own matrix.
* Reopening a store with other result settings raises :class:`StoreError`, listing every
  differing field with both values; other weights under an existing model_id, or other training
  data (when its fingerprint was recorded), likewise. A different trakjax version only warns.
* Every metadata file is checked against its schema when read, and every array file the
  metadata refers to is checked on open (present, ``.npy`` header, shape, dtype and size): a bad
  file is reported by path.
* A key the store's configuration lacks reads as the behaviour of the version that wrote it
  (:mod:`trakjax.store_settings`).
* :meth:`Store.clear` removes only the files trakjax creates (:mod:`trakjax.manifest`) and
  refuses, listing them, when it finds others.
* A store that cannot be written opens read-only: finished results are read, and every write
  raises :class:`StoreError` naming the directory.
* A done mask holding values other than 0 and 1 is reported as damage.
* I/O errors propagate; nothing is swallowed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from trakjax import manifest, trees
from trakjax.errors import InputsChangedError, InvalidArgumentError, StoreError
from trakjax.files import (
    TMP_MARK,
    check_array_file,
    create_array,
    fsync_directory,
    open_array,
    read_json,
    remove_if_present,
    remove_stale_temporaries,
    temporary_path,
    write_json_atomic,
    write_rows,
)
from trakjax.store_settings import implied_by_absence, stored_as_current
from trakjax.version import __version__

__all__ = [
    "FORMAT_VERSION", "METADATA_FILE", "ScoreArrays", "Store", "StoreError", "TargetArrays",
    "TrainArrays", "check_array_file", "check_experiment_name", "config_differences", "create_array",
    "file_dtype", "open_array", "read_json", "remove_stale_temporaries",
    "storage_view", "temporary_path", "write_json_atomic",
    "write_rows",
]

logger = logging.getLogger("trakjax")

FORMAT_VERSION = 1
"""Version of this directory layout."""
METADATA_FILE = "trakjax_store.json"
LOCK_FILE = ".lock"
DONE_DTYPE = np.dtype(np.uint8)
OUT_TO_LOSS_DTYPE = np.dtype(np.float32)
SCORES_DTYPE = np.dtype(np.float32)
RIDGE_FILES = ("output_shift.npy", "curvature.npy")
"""Per training example, f − f₀ and h for ``lambda_reg="auto"`` (absent in trakjax 0.1 stores)."""
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_experiment_name(name: str) -> None:
    """Raise unless ``name`` is usable as a directory name (1-128 of [A-Za-z0-9_.-], whole)."""
    if not isinstance(name, str) or not _EXPERIMENT_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"exp_name must be 1-128 characters from [A-Za-z0-9_.-], not starting with '.' or "
            f"'-', got {name!r}"
        )


def file_dtype(storage: np.dtype) -> np.dtype:
    """The dtype of a storage dtype's ``.npy`` file: bfloat16 is kept as its uint16 bit pattern."""
    storage = np.dtype(storage)
    if storage == np.dtype(jnp.bfloat16):
        return np.dtype(np.uint16)
    return storage


def storage_view(array: np.ndarray, storage: np.dtype) -> np.ndarray:
    """View a file array as its storage dtype (bfloat16 bits -> bfloat16); shares memory."""
    storage = np.dtype(storage)
    if array.dtype == storage:
        return array
    return array.view(storage)


def recorded_setting(stored: dict, key: str):
    """The store's value of configuration ``key``, reading a missing key as
    :data:`trakjax.store_settings.STORE_KEYS` says (``"<absent>"`` where it implies none)."""
    return stored.get(key, implied_by_absence(key, "<absent>"))


def config_differences(stored: dict, requested: dict) -> list[str]:
    """``"field: store has A, this session has B"`` for every field that differs (a field
    missing on either side read as :data:`trakjax.store_settings.STORE_KEYS` says)."""
    lines = []
    for key in sorted(set(stored) | set(requested)):
        a = recorded_setting(stored, key)
        b = recorded_setting(requested, key)
        if a != b:
            lines.append(f"{key}: store has {a!r}, this session has {b!r}")
    return lines


# --------------------------------------------------------------------------- metadata schemas

_INT, _STR, _BOOL, _REAL = "int", "str", "bool", "real"


def _fits(value, kind) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _REAL:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(kind, list):  # a list of one kind
        return isinstance(value, list) and all(_fits(v, kind[0]) for v in value)
    if isinstance(kind, tuple):  # any of these kinds
        return any(_fits(value, k) for k in kind)
    if kind is None:
        return value is None
    if isinstance(kind, dict):  # an object with these keys ("key?": optional)
        if not isinstance(value, dict):
            return False
        for key, sub in kind.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return False
            if not _fits(value[name], sub):
                return False
        return True
    if kind is dict:
        return isinstance(value, dict)
    raise TypeError(f"unknown schema kind {kind!r}")


_TREE = {"paths": [_STR], "shapes": [[_INT]], "dtypes": [_STR]}
_DIFFERENTIATED = {"paths": [_STR], "num_params": _INT, "proj_dim": _INT, "k_fac?": _INT}
_STORE_SCHEMA = {
    "format_version": _INT, "trakjax_version": _STR, "config": dict,
    "parameters": (None, {"tree": _TREE, "differentiated": _DIFFERENTIATED}),
    "train_fingerprint?": (None, _STR),
    "task_fingerprints?": dict,
}
_READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)
"""What opening the lock file for writing raises in a directory this process cannot write."""
_FINALIZED = {"lambda_reg": _REAL, "rank": (None, _INT), "condition": (_REAL, _STR), "scale": _REAL,
              "method?": _STR, "lambda_rule?": _STR, "kernel?": _STR, "clipped_curvature?": _INT}
_MODEL_SCHEMA = {"model_id": _INT, "fingerprint": _STR, "finalized": (None, _FINALIZED)}
_SCORES_RECORD = {"model_ids": [_INT], "block_rows": _INT, "complete": _BOOL}
_EXPERIMENT_SCHEMA = {
    "name": _STR, "num_targets": _INT, "model_ids": [_INT], "scores": (None, _SCORES_RECORD),
    "targets_fingerprint?": (None, _STR),
}


def _consistent(record: dict) -> bool:
    """Cross-field checks the schema cannot express: a tree's lists have one entry per leaf,
    model_id lists hold distinct ids."""
    tree = (record.get("parameters") or {}).get("tree")
    if tree and not len(tree["paths"]) == len(tree["shapes"]) == len(tree["dtypes"]):
        return False
    for ids in (record.get("model_ids"), (record.get("scores") or {}).get("model_ids")):
        if ids is not None and len(set(ids)) != len(ids):
            return False
    return True


def read_record(path: Path, schema: dict, what: str) -> dict:
    """Read a JSON metadata file and check it against ``schema``; raise StoreError naming it."""
    record = read_json(path, what)
    if not _fits(record, schema) or not _consistent(record):
        expected = ", ".join(f"{k.rstrip('?')}{' (optional)' if k.endswith('?') else ''}" for k in schema)
        raise StoreError(
            f"{what} {path} does not have the expected form (a JSON object with {expected}, of "
            f"the right types); it is damaged: restore it or use a new store"
        )
    return record


# --------------------------------------------------------------------------- array bundles


class TrainArrays(NamedTuple):
    """One checkpoint's train-side arrays (memory maps).

    ``grads`` is Φ (N, k) viewed in the storage dtype, ``out_to_loss`` q (N,) float32, ``done``
    the (N,) uint8 mask; ``files`` the raw memory maps to flush; ``output_shift`` f − f₀ and
    ``curvature`` h (N,) float32 for ``lambda_reg="auto"`` (None in stores of trakjax 0.1).
    """

    grads: np.ndarray
    out_to_loss: np.memmap
    done: np.memmap
    files: tuple
    output_shift: np.memmap | None = None
    curvature: np.memmap | None = None


class TargetArrays(NamedTuple):
    """One checkpoint's target gradients Ψ (T, k) in the storage dtype and their (T,) done mask."""

    grads: np.ndarray
    done: np.memmap
    files: tuple


class ScoreArrays(NamedTuple):
    """A score matrix being computed: (N, T) float32 scores, its per-block done mask, the block
    size in rows, the model_ids it ensembles and its directory."""

    scores: np.memmap
    done: np.memmap
    block_rows: int
    model_ids: tuple[int, ...] = ()
    folder: Path | None = None


def _num_blocks(num_rows: int, block_rows: int) -> int:
    return -(-int(num_rows) // int(block_rows))


def _score_key(model_ids: Sequence[int], block_rows: int) -> str:
    text = json.dumps({"model_ids": [int(m) for m in model_ids], "block_rows": int(block_rows)})
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def check_done_mask(path: Path) -> None:
    """Raise :class:`StoreError` naming ``path`` if a done mask holds values other than 0 and 1
    (damage: such a row would count as written)."""
    done = np.load(path, mmap_mode="r")
    bad = np.flatnonzero(np.asarray(done) > 1)
    if bad.size:
        shown = bad[:10].tolist()
        raise StoreError(
            f"store array file {path} is damaged: a done mask holds only 0 and 1, but rows "
            f"{shown}{' ...' if bad.size > 10 else ''} ({bad.size} in all) hold "
            f"{np.asarray(done)[bad[:10]].tolist()}; restore it, or delete the file's folder to "
            "recompute those results"
        )


def _config_int(config: dict, key: str, root: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StoreError(f"the store at {root} records {key}={value!r}; expected an int >= 1")
    return value


# --------------------------------------------------------------------------- the store


class Store:
    """An attribution store directory (see the module docstring for its layout).

    Open one with :meth:`Store.open`. Methods that change shared metadata take the store's file
    lock; rows of arrays are written lock-free (processes write disjoint or identical rows).
    A Store object is meant for one thread.
    """

    def __init__(self, root: Path, metadata: dict):
        self.root = Path(root)
        self._metadata = metadata
        self._held: set[Path] = set()
        self.read_only = False
        """True when the store's directory cannot be written (a read-only file system, no
        permission): finished results are read, and any write raises :class:`StoreError`."""

    # ----------------------------------------------------------------- opening and locking

    @classmethod
    def open(cls, root, config: dict, *, validate: bool = True) -> Store:
        """Open the store at ``root`` (``~`` expanded), creating it with ``config`` when absent.

        Args:
          root: the store directory.
          config: JSON-able run configuration (the result settings, task, N, ...).
          validate: check every array file the metadata refers to.

        Raises:
          StoreError: if the store holds another configuration (every differing field listed
            with both values) or a damaged file (named by path).
        """
        root = Path(os.path.expanduser(os.fspath(root))).resolve()
        if root.exists() and not root.is_dir():
            raise StoreError(f"save_dir {root} exists and is not a directory")
        if not (root / METADATA_FILE).is_file():
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                if err.errno not in _READ_ONLY_ERRORS:
                    raise
                raise StoreError(
                    f"cannot create the store at {root}: {err.strerror} (a read-only file system or "
                    "no write permission); use a writable save_dir"
                ) from err
        store = cls(root, {})
        store.read_only = not store._writable()
        with store.lock():
            path = root / METADATA_FILE
            metadata = store._existing(path, config) if path.exists() else store._create(path, config)
            store._metadata = metadata
            if not store.read_only:
                for folder in store._folders():
                    remove_stale_temporaries(folder)
            if validate:
                store.validate()
        return store

    def _writable(self) -> bool:
        """Whether this process can create files in the store's directory (the lock file)."""
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            if err.errno in _READ_ONLY_ERRORS:
                return False
            raise
        os.close(fd)
        return True

    def require_writable(self, action: str) -> None:
        """Raise :class:`StoreError` naming the directory if the store is read-only."""
        if self.read_only:
            raise StoreError(
                f"the store at {self.root} is read-only (a read-only file system or no write "
                f"permission): its finished results can be read, but {action} writes to it; make "
                "it writable or use another save_dir"
            )

    def _existing(self, path: Path, config: dict) -> dict:
        metadata = read_json(path)
        if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
            found = metadata.get("format_version") if isinstance(metadata, dict) else None
            raise StoreError(
                f"{path} is not a trakjax store of format version {FORMAT_VERSION} "
                f"(found format_version={found!r})"
            )
        metadata = read_record(path, _STORE_SCHEMA, "store metadata file")
        differences = config_differences(stored_as_current(metadata["config"], config), config)
        if differences:
            raise StoreError(
                f"the store at {self.root} was created with another configuration:\n  "
                + "\n  ".join(differences) + "\nUse another save_dir, or the store's configuration"
            )
        if metadata["trakjax_version"] != __version__:
            warnings.warn(
                f"the store at {self.root} was written by trakjax {metadata['trakjax_version']}, "
                f"this is trakjax {__version__}; its configuration matches, so it is used",
                stacklevel=4,
            )
        return metadata

    def _create(self, path: Path, config: dict) -> dict:
        self.require_writable("creating a store")
        remove_stale_temporaries(self.root)  # a creation killed before its first rename
        if any(p.name != LOCK_FILE and TMP_MARK not in p.name for p in self.root.iterdir()):
            raise StoreError(
                f"save_dir {self.root} is not empty and holds no {METADATA_FILE}; it is not a "
                "trakjax store (use an empty or new directory)"
            )
        metadata = {
            "format_version": FORMAT_VERSION, "trakjax_version": __version__, "config": config,
            "parameters": None, "train_fingerprint": None,
        }
        write_json_atomic(path, metadata)
        return metadata

    def _folders(self) -> list[Path]:
        """Every directory of the store (where temporary files may be left)."""
        return [self.root] + [p for p in self.root.rglob("*") if p.is_dir() and not p.is_symlink()]

    @contextlib.contextmanager
    def lock(self, path: Path | None = None) -> Iterator[None]:
        """Hold an exclusive ``fcntl.flock`` on ``path`` (default: the store's lock file).

        Re-entrant within this object; other processes (and other Store objects) wait.
        """
        path = Path(path) if path is not None else self.root / LOCK_FILE
        if path in self._held:
            yield
            return
        if self.read_only:  # readers of a read-only store share its lock where there is one
            if not path.exists():
                yield
                return
            fd, mode = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), fcntl.LOCK_SH
        else:
            fd, mode = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644), fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode)
            self._held.add(path)
            try:
                yield
            finally:
                self._held.discard(path)
        finally:
            os.close(fd)

    def _refresh(self) -> dict:
        self._metadata = read_record(self.root / METADATA_FILE, _STORE_SCHEMA, "store metadata file")
        return self._metadata

    @property
    def config(self) -> dict:
        """The run configuration recorded at creation."""
        return dict(self._metadata["config"])

    @property
    def train_set_size(self) -> int:
        return _config_int(self._metadata["config"], "train_set_size", self.root)

    @property
    def storage_dtype(self) -> np.dtype:
        name = self._metadata["config"].get("dtype")
        if name not in ("float32", "bfloat16", "float16"):
            raise StoreError(f"the store at {self.root} records an unknown feature dtype {name!r}")
        return np.dtype(jnp.dtype(name))

    def parameters(self) -> dict | None:
        """The parameter record (tree layout, differentiated leaves, P, k), once a checkpoint is in."""
        return self._refresh().get("parameters")

    def proj_dim(self) -> int:
        record = self.parameters()
        if record is None:
            raise StoreError(f"the store at {self.root} has no checkpoint yet")
        return int(record["differentiated"]["proj_dim"])

    # ----------------------------------------------------------------- validation

    def validate(self) -> None:
        """Check every metadata and array file; raise :class:`StoreError` naming a bad one."""
        record = self._metadata.get("parameters")
        if record is None:
            return
        k = int(record["differentiated"]["proj_dim"])
        n = self.train_set_size
        storage = file_dtype(self.storage_dtype)
        for model_id in self.model_ids():
            folder = self._model_dir(model_id)
            info = self.model_info(model_id)
            check_array_file(folder / "grads.npy", (n, k), storage)
            check_array_file(folder / "out_to_loss.npy", (n,), OUT_TO_LOSS_DTYPE)
            check_array_file(folder / "done.npy", (n,), DONE_DTYPE)
            check_done_mask(folder / "done.npy")
            for name in RIDGE_FILES:
                if (folder / name).exists():
                    check_array_file(folder / name, (n,), OUT_TO_LOSS_DTYPE)
            if info.get("finalized"):
                check_array_file(folder / "features.npy", (n, k), storage)
        for name in self.experiment_names():
            info = self.experiment_info(name)
            t = int(info["num_targets"])
            for model_id in info["model_ids"]:
                folder = self._target_dir(name, model_id)
                check_array_file(folder / "grads.npy", (t, k), storage)
                check_array_file(folder / "done.npy", (t,), DONE_DTYPE)
                check_done_mask(folder / "done.npy")
            if (info.get("scores") or {}).get("complete"):
                check_array_file(self._experiment_dir(name) / "scores.npy", (n, t), SCORES_DTYPE)

    # ----------------------------------------------------------------- training data

    def check_train_data(self, data_fingerprint: str) -> None:
        """Record the training data's fingerprint, or check it against the recorded one.

        Raises:
          InputsChangedError: the store's features were computed from other training data.
        """
        with self.lock():
            metadata = self._refresh()
            stored = metadata.get("train_fingerprint")
            if stored is None:
                self.require_writable("recording the training data's fingerprint")
                metadata["train_fingerprint"] = data_fingerprint
                write_json_atomic(self.root / METADATA_FILE, metadata)
            elif stored != data_fingerprint:
                raise InputsChangedError(
                    f"the store at {self.root} holds features of other training data: fingerprint "
                    f"{stored} in the store, {data_fingerprint} for this run"
                )

    def train_fingerprint(self) -> str | None:
        """The recorded fingerprint of the training data, or None."""
        return self._refresh().get("train_fingerprint")

    def clear(self) -> None:
        """Delete every checkpoint's and experiment's results, keeping the configuration.

        Only trakjax's own files are removed (:mod:`trakjax.manifest`); if ``models/`` or
        ``experiments/`` hold anything else, nothing is removed and the files are listed.
        """
        self.require_writable("discarding its results")
        with self.lock():
            manifest.remove_own_files(self.root, manifest.STORE, what="the store",
                                      within=("models", "experiments"))
            metadata = self._refresh()
            metadata["parameters"] = None
            metadata["train_fingerprint"] = None
            metadata.pop("task_fingerprints", None)
            write_json_atomic(self.root / METADATA_FILE, metadata)

    # ----------------------------------------------------------------- the task's fingerprint

    def task_fingerprint(self, versions: str) -> str | None:
        """The task fingerprint recorded under ``versions`` (the JAX and Flax versions that
        traced it, :func:`trakjax.task_fingerprint.versions_key`), or None."""
        return (self._refresh().get("task_fingerprints") or {}).get(versions)

    def task_fingerprint_versions(self) -> list[str]:
        """The versions under which a task fingerprint is recorded."""
        return sorted(self._refresh().get("task_fingerprints") or {})

    def record_task_fingerprint(self, versions: str, digest: str) -> None:
        """Record the task fingerprint ``digest`` traced under ``versions``."""
        self.require_writable("recording the task's fingerprint")
        with self.lock():
            metadata = self._refresh()
            recorded = dict(metadata.get("task_fingerprints") or {})
            recorded[versions] = digest
            metadata["task_fingerprints"] = recorded
            write_json_atomic(self.root / METADATA_FILE, metadata)

    # ----------------------------------------------------------------- models (train side)

    def _model_dir(self, model_id: int) -> Path:
        return self.root / "models" / str(int(model_id))

    def model_ids(self) -> list[int]:
        """Registered model_ids, ascending."""
        folder = self.root / "models"
        if not folder.is_dir():
            return []
        ids = [int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "model.json").is_file()]
        return sorted(ids)

    def model_info(self, model_id: int) -> dict:
        path = self._model_dir(model_id) / "model.json"
        if not path.is_file():
            raise StoreError(
                f"model_id {model_id} is not in the store at {self.root} (registered: "
                f"{self.model_ids()}); load_checkpoint(checkpoint, {model_id}) and featurize first"
            )
        return read_record(path, _MODEL_SCHEMA, "model record")

    def has_model(self, model_id: int) -> bool:
        return (self._model_dir(model_id) / "model.json").is_file()

    def fingerprint_of(self, params, model_id: int | None = None) -> str:
        """The fingerprint of ``params`` in the scheme ``model_id`` was registered with (the
        current scheme for a new model_id), for :meth:`register_model` and :meth:`check_weights`."""
        scheme = trees.FINGERPRINT_SCHEME
        if model_id is not None and self.has_model(model_id):
            stored = self.model_info(model_id)["fingerprint"].split(":", 1)[0]
            if stored in (trees.FINGERPRINT_SCHEME, trees.SAMPLED_SCHEME):
                scheme = stored
        return trees.fingerprint(params, scheme)

    def check_parameters(self, tree: dict, differentiated: dict | None = None) -> None:
        """Raise :class:`StoreError` if ``tree`` (:func:`trakjax.trees.tree_record`) or
        ``differentiated`` differ from the store's parameter record (no-op before the first
        checkpoint)."""
        record = self.parameters()
        if record is None:
            return
        lines = trees.tree_differences(record["tree"], tree)
        if differentiated is not None:
            lines += config_differences(record["differentiated"], differentiated)
        if lines:
            raise StoreError(
                f"the checkpoint's parameters do not match the store at {self.root}:\n  "
                + "\n  ".join(lines)
            )

    def register_model(self, model_id: int, weights: str, tree: dict, differentiated: dict) -> None:
        """Add ``model_id`` (creating its arrays) or check it against its stored weights.

        Args:
          model_id: the checkpoint's id.
          weights: the fingerprint of its parameters (:meth:`fingerprint_of`).
          tree: :func:`trakjax.trees.tree_record` of its parameters.
          differentiated: ``{"paths": [...], "num_params": P, "proj_dim": k}``.

        Raises:
          StoreError: if the parameters' layout differs from the store's, or ``model_id`` exists
            with other weights (both fingerprints given).
        """
        model_id = int(model_id)
        with self.lock():
            self.check_parameters(tree, differentiated)
            if self.has_model(model_id):
                self.check_weights(model_id, weights)
                return
            self.require_writable(f"registering model_id {model_id}")
            if self._metadata.get("parameters") is None:
                self._metadata["parameters"] = {"tree": tree, "differentiated": differentiated}
                write_json_atomic(self.root / METADATA_FILE, self._metadata)
            folder = self._model_dir(model_id)
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
            n, k = self.train_set_size, int(differentiated["proj_dim"])
            create_array(folder / "done.npy", (n,), DONE_DTYPE)
            create_array(folder / "grads.npy", (n, k), file_dtype(self.storage_dtype))
            create_array(folder / "out_to_loss.npy", (n,), OUT_TO_LOSS_DTYPE)
            for name in RIDGE_FILES:
                create_array(folder / name, (n,), OUT_TO_LOSS_DTYPE)
            write_json_atomic(
                folder / "model.json", {"model_id": model_id, "fingerprint": weights, "finalized": None}
            )

    def check_weights(self, model_id: int, weights: str) -> None:
        """Raise :class:`StoreError` unless ``model_id`` is stored with fingerprint ``weights``."""
        stored = self.model_info(model_id)["fingerprint"]
        if stored != weights:
            raise StoreError(
                f"model_id {model_id} in the store at {self.root} holds other weights: "
                f"fingerprint {stored} in the store, {weights} for this checkpoint. Use a new "
                "model_id for a different checkpoint, or another save_dir"
            )

    def train_arrays(self, model_id: int, mode: str = "r+") -> TrainArrays:
        if mode != "r":
            self.require_writable(f"featurizing model_id {model_id}")
        folder = self._model_dir(model_id)
        n, k = self.train_set_size, self.proj_dim()
        grads = open_array(folder / "grads.npy", (n, k), file_dtype(self.storage_dtype), mode)
        q = open_array(folder / "out_to_loss.npy", (n,), OUT_TO_LOSS_DTYPE, mode)
        done = open_array(folder / "done.npy", (n,), DONE_DTYPE, mode)
        ridge = [open_array(folder / name, (n,), OUT_TO_LOSS_DTYPE, mode) if (folder / name).exists() else None
                 for name in RIDGE_FILES]
        return TrainArrays(storage_view(grads, self.storage_dtype), q, done, (grads, q), *ridge)

    def missing_train(self, model_id: int) -> np.ndarray:
        """Indices of training examples not yet featurized for ``model_id``, ascending."""
        done = self.train_arrays(model_id, "r").done
        return np.flatnonzero(np.asarray(done) == 0)

    @staticmethod
    def write_train_rows(arrays: TrainArrays, indices: np.ndarray, features: np.ndarray,
                         out_to_loss: np.ndarray, output_shift=None, curvature=None) -> None:
        """Write rows of Φ and q (and f − f₀ and h where the store keeps them) into ``arrays``
        (opened ``r+``), flush, then mark them done."""
        data = [(arrays.grads, features), (arrays.out_to_loss, out_to_loss)]
        for array, values in ((arrays.output_shift, output_shift), (arrays.curvature, curvature)):
            if array is not None:
                data.append((array, np.zeros(len(indices), np.float32) if values is None else values))
        write_rows(data, arrays.done, indices)

    def is_finalized(self, model_id: int) -> bool:
        return bool(self.model_info(model_id).get("finalized"))

    def write_features(self, model_id: int, fill: Callable[[np.ndarray], Any], details: dict) -> None:
        """Create F for ``model_id`` atomically, then mark the model finalized.

        ``fill(out)`` writes the (N, k) features into ``out`` (a storage-dtype view of a temporary
        memory map). The file is flushed, fsynced and renamed to ``features.npy``; only then is
        ``model.json`` rewritten with ``details`` (λ, rank, ...) as the finalized record.
        """
        self.require_writable(f"finalizing model_id {model_id}")
        folder = self._model_dir(model_id)
        n, k = self.train_set_size, self.proj_dim()
        final = folder / "features.npy"
        tmp_name = temporary_path(final)
        remove_stale_temporaries(folder)
        create_array(tmp_name, (n, k), file_dtype(self.storage_dtype))
        try:
            out = np.lib.format.open_memmap(tmp_name, mode="r+")
            fill(storage_view(out, self.storage_dtype))
            out.flush()
            del out
            with open(tmp_name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            remove_if_present(tmp_name)
            raise
        fsync_directory(folder)
        with self.lock():
            info = self.model_info(model_id)
            info["finalized"] = details
            write_json_atomic(folder / "model.json", info)

    def features(self, model_id: int) -> np.ndarray:
        """F (N, k) of a finalized model, read-only, in the storage dtype."""
        if not self.is_finalized(model_id):
            raise StoreError(
                f"model_id {model_id} is not finalized; call finalize_features([{model_id}]) first"
            )
        n, k = self.train_set_size, self.proj_dim()
        array = open_array(self._model_dir(model_id) / "features.npy", (n, k),
                           file_dtype(self.storage_dtype), "r")
        return storage_view(array, self.storage_dtype)

    # ----------------------------------------------------------------- experiments (target side)

    def _experiment_dir(self, name: str) -> Path:
        return self.root / "experiments" / name

    def _target_dir(self, name: str, model_id: int) -> Path:
        return self._experiment_dir(name) / "targets" / str(int(model_id))

    def experiment_names(self) -> list[str]:
        folder = self.root / "experiments"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "experiment.json").is_file())

    def has_experiment(self, name: str) -> bool:
        return (self._experiment_dir(name) / "experiment.json").is_file()

    def experiment_info(self, name: str) -> dict:
        check_experiment_name(name)
        path = self._experiment_dir(name) / "experiment.json"
        if not path.is_file():
            raise StoreError(
                f"experiment {name!r} does not exist in the store at {self.root} (experiments: "
                f"{self.experiment_names()}); call start_scoring_checkpoint({name!r}, ...) first"
            )
        info = read_record(path, _EXPERIMENT_SCHEMA, "experiment record")
        if info["num_targets"] < 1:
            raise StoreError(f"experiment record {path} has num_targets={info['num_targets']}; expected >= 1")
        return info

    def register_target_model(self, name: str, num_targets: int, model_id: int,
                              targets_fingerprint: str | None = None) -> None:
        """Create experiment ``name`` (T targets) if new and target arrays for ``model_id``.

        Args:
          name: the experiment.
          num_targets: T.
          model_id: a registered checkpoint.
          targets_fingerprint: the targets' content fingerprint, when the caller has the whole
            target set; recorded, and checked against the recorded one.

        Raises:
          StoreError: if the experiment exists with another number of targets.
          InputsChangedError: if it exists with targets of another fingerprint.
        """
        check_experiment_name(name)
        with self.lock():
            path = self._experiment_dir(name) / "experiment.json"
            if path.is_file():
                info = self.experiment_info(name)
                self._check_targets(name, info, int(num_targets), targets_fingerprint)
                before = dict(info)
            else:
                info = {"name": name, "num_targets": int(num_targets), "model_ids": [], "scores": None,
                        "targets_fingerprint": targets_fingerprint}
                before = None
            if info.get("targets_fingerprint") is None and targets_fingerprint is not None:
                info["targets_fingerprint"] = targets_fingerprint
            if int(model_id) not in info["model_ids"]:
                self.require_writable(f"scoring experiment {name!r}")
                folder = self._target_dir(name, model_id)
                folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(folder)
                k = self.proj_dim()
                create_array(folder / "done.npy", (int(num_targets),), DONE_DTYPE)
                create_array(folder / "grads.npy", (int(num_targets), k), file_dtype(self.storage_dtype))
                info["model_ids"] = sorted(info["model_ids"] + [int(model_id)])
            if info != before:
                self.require_writable(f"scoring experiment {name!r}")
                (self._experiment_dir(name)).mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, info)

    def _check_targets(self, name: str, info: dict, num_targets: int, targets_fingerprint) -> None:
        if int(info["num_targets"]) != num_targets:
            raise StoreError(
                f"experiment {name!r} in the store at {self.root} has num_targets="
                f"{info['num_targets']}, this call has num_targets={num_targets}; use "
                "another exp_name for other targets"
            )
        stored = info.get("targets_fingerprint")
        if stored is not None and targets_fingerprint is not None and stored != targets_fingerprint:
            raise InputsChangedError(
                f"experiment {name!r} in the store at {self.root} holds other targets: fingerprint "
                f"{stored} in the store, {targets_fingerprint} for this run; use another exp_name "
                "for other targets"
            )

    def target_arrays(self, name: str, model_id: int, mode: str = "r+") -> TargetArrays:
        if mode != "r":
            self.require_writable(f"scoring experiment {name!r}")
        info = self.experiment_info(name)
        if int(model_id) not in info["model_ids"]:
            raise StoreError(
                f"experiment {name!r} has no target gradients for model_id {model_id} (it has "
                f"{info['model_ids']}); call start_scoring_checkpoint({name!r}, checkpoint, "
                f"{model_id}, num_targets) and score the targets"
            )
        t, k = int(info["num_targets"]), self.proj_dim()
        folder = self._target_dir(name, model_id)
        grads = open_array(folder / "grads.npy", (t, k), file_dtype(self.storage_dtype), mode)
        done = open_array(folder / "done.npy", (t,), DONE_DTYPE, mode)
        return TargetArrays(storage_view(grads, self.storage_dtype), done, (grads,))

    def missing_targets(self, name: str, model_id: int) -> np.ndarray:
        done = self.target_arrays(name, model_id, "r").done
        return np.flatnonzero(np.asarray(done) == 0)

    @staticmethod
    def write_target_rows(arrays: TargetArrays, indices: np.ndarray, features: np.ndarray) -> None:
        """Write rows of Ψ into ``arrays`` (opened ``r+``), flush, then mark them done."""
        write_rows([(arrays.grads, features)], arrays.done, indices)

    # ----------------------------------------------------------------- score matrices

    def finished_scores(self, name: str, model_ids: Sequence[int],
                        block_rows: int | None = None) -> np.memmap | None:
        """The experiment's finished score matrix if it ensembles exactly ``model_ids`` (and was
        computed in blocks of ``block_rows``, when given), else None."""
        with self.lock():
            record = self.experiment_info(name).get("scores")
            if (record and record["complete"] and record["model_ids"] == [int(m) for m in model_ids]
                    and block_rows in (None, record["block_rows"])):
                return self.scores(name)
        return None

    def score_arrays(self, name: str, model_ids: Sequence[int], block_rows: int) -> ScoreArrays:
        """The partial score matrix of ``name`` for ``model_ids`` and ``block_rows``: reused with
        its done blocks when it exists (a resumed call), else created (zeros, nothing done).

        It lives in ``partial/<key>`` of the experiment, apart from the finished ``scores.npy``
        and from partial matrices of other model_ids.
        """
        n = self.train_set_size
        ids = tuple(int(m) for m in model_ids)
        self.require_writable(f"computing the scores of experiment {name!r}")
        with self.lock():
            t = int(self.experiment_info(name)["num_targets"])
            folder = self._experiment_dir(name) / "partial" / _score_key(ids, block_rows)
            blocks = _num_blocks(n, block_rows)
            if not (folder / "scores_done.npy").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(folder)
                create_array(folder / "scores.npy", (n, t), SCORES_DTYPE)
                create_array(folder / "scores_done.npy", (blocks,), DONE_DTYPE)
            scores = open_array(folder / "scores.npy", (n, t), SCORES_DTYPE, "r+")
            done = open_array(folder / "scores_done.npy", (blocks,), DONE_DTYPE, "r+")
        return ScoreArrays(scores, done, int(block_rows), ids, folder)

    def write_score_block(self, arrays: ScoreArrays, block: int, start: int, values: np.ndarray) -> None:
        """Write a block of score rows, flush, then mark the block done."""
        arrays.scores[start : start + values.shape[0]] = values
        arrays.scores.flush()
        arrays.done[block] = 1
        arrays.done.flush()

    def complete_scores(self, name: str, arrays: ScoreArrays) -> np.memmap:
        """Finish a partial score matrix: under the store lock, check that every block is done,
        move it to ``scores.npy``, record its model_ids as complete, and return it read-only
        (opened before the lock is released, so a later finish by another session cannot swap
        it under the caller).

        Raises:
          StoreError: if some block is not written (nothing is marked complete then).
        """
        with self.lock():
            info = self.experiment_info(name)
            record = info.get("scores")
            wanted = {"model_ids": list(arrays.model_ids), "block_rows": arrays.block_rows, "complete": True}
            if record == wanted and not (arrays.folder / "scores.npy").exists():
                return self.scores(name)  # another session finished this very matrix
            missing = np.flatnonzero(np.asarray(open_array(
                arrays.folder / "scores_done.npy", arrays.done.shape, DONE_DTYPE, "r")) == 0)
            if missing.size:
                raise StoreError(
                    f"experiment {name!r}: {missing.size} score blocks are not written yet "
                    f"(first {missing[:10].tolist()}); nothing was marked complete"
                )
            final = self._experiment_dir(name) / "scores.npy"
            info["scores"] = None
            write_json_atomic(self._experiment_dir(name) / "experiment.json", info)
            os.replace(arrays.folder / "scores.npy", final)
            fsync_directory(final.parent)
            info["scores"] = wanted
            write_json_atomic(self._experiment_dir(name) / "experiment.json", info)
            shutil.rmtree(arrays.folder)
            return self.scores(name)

    def scores(self, name: str) -> np.memmap:
        """The experiment's finished (N, T) float32 score matrix, read-only."""
        info = self.experiment_info(name)
        record = info.get("scores")
        if not record or not record.get("complete"):
            raise StoreError(f"experiment {name!r} has no finalized scores; call finalize_scores first")
        n, t = self.train_set_size, int(info["num_targets"])
        return open_array(self._experiment_dir(name) / "scores.npy", (n, t), SCORES_DTYPE, "r")
