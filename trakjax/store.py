"""The attribution store: one directory per attribution run, resumable, shareable between processes.

Layout of a store directory (every array is a ``.npy`` file, opened as a memory map and readable
by plain ``numpy.load``)::

    trakjax_store.json                  run metadata: the configuration, the parameter layout
    .lock                               fcntl.flock lock guarding shared metadata
    models/<model_id>/model.json        fingerprint of the weights; solve details once finalized
    models/<model_id>/grads.npy         (N, k) projected train gradients Φ, storage dtype
    models/<model_id>/out_to_loss.npy   (N,) float32 out-to-loss terms q
    models/<model_id>/done.npy          (N,) uint8, 1 where row i of Φ and q is written
    models/<model_id>/features.npy      (N, k) F = Φ (ΦᵀΦ + λI)⁻¹, storage dtype (once finalized)
    experiments/<name>/experiment.json  number of targets, scored model_ids, score status
    experiments/<name>/targets/<model_id>/grads.npy   (T, k) target gradients Ψ, storage dtype
    experiments/<name>/targets/<model_id>/done.npy    (T,) uint8
    experiments/<name>/scores.npy       (N, T) float32 scores
    experiments/<name>/scores_done.npy  (num_blocks,) uint8, 1 where a block of score rows is written

Storage dtypes: float32 and float16 files hold those dtypes; bfloat16 files hold the bfloat16 bit
patterns as uint16 (``np.load(path).view(ml_dtypes.bfloat16)`` reads them).

Guarantees:

* Metadata writes are atomic: a temporary file in the same directory is written, fsynced and
  renamed over the old one, then the directory is fsynced. A reader sees the old or the new file.
* Array files are created under a temporary name, their blocks reserved (``posix_fallocate``, after
  a ``shutil.disk_usage`` check), then renamed: a full disk gives a clear ``OSError`` and no file.
* Rows are written data first, then flushed, then marked done in the done mask (flushed last), so
  a process killed at any moment leaves only rows that are either complete and marked or
  unmarked (recomputed on resume).
* Reopening a store with a different configuration raises :class:`StoreError`, listing every
  differing field with both values; different weights under an existing model_id likewise. A
  different trakjax version only warns.
* On open every array file the metadata refers to is checked (present, ``.npy`` header, shape,
  dtype and file size), and a bad file is reported by path.
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
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import featurize as featurize_lib

logger = logging.getLogger("trakjax")

FORMAT_VERSION = 1
"""Version of this directory layout."""
METADATA_FILE = "trakjax_store.json"
LOCK_FILE = ".lock"
DONE_DTYPE = np.dtype(np.uint8)
OUT_TO_LOSS_DTYPE = np.dtype(np.float32)
SCORES_DTYPE = np.dtype(np.float32)
NPY_HEADER_BYTES = 4096
"""An upper bound on a ``.npy`` header of this store's arrays."""
DISK_HEADROOM_BYTES = 16 * 2**20
"""Free space kept beyond an array's own size when creating it."""
FULL_HASH_BYTES = 2**20
"""Leaves up to this size are hashed whole by :func:`fingerprint`."""
FINGERPRINT_WINDOWS = 64
FINGERPRINT_WINDOW_ELEMENTS = 1024
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TMP_MARK = ".tmp."


class StoreError(ValueError):
    """A store that does not match the request, or whose files are damaged."""


# --------------------------------------------------------------------------- small helpers


def _trakjax_version() -> str:
    from trakjax import __version__

    return __version__


def fsync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """A unique sibling of ``path`` for writing before a rename: ``.<name>.tmp.<host>.<pid>.<id>``."""
    host = socket.gethostname().replace(".", "_")
    return path.with_name(f".{path.name}{_TMP_MARK}{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _remove_quietly_if_present(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_json_atomic(path: Path, content: Any) -> None:
    """Write ``content`` as JSON to ``path`` atomically: temporary file, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly_if_present(tmp)
        raise
    fsync_directory(path.parent)


def read_json(path: Path) -> Any:
    """Read a JSON metadata file; a damaged one raises :class:`StoreError` naming it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StoreError(f"store metadata file {path} is not valid JSON ({err})") from err


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by dead processes of this host.

    Temporary names carry ``<host>.<pid>``; a file whose process is gone (a killed writer) is
    removed. Files of live processes and of other hosts are left alone.
    """
    host = socket.gethostname().replace(".", "_")
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if _TMP_MARK not in name or not name.startswith("."):
            continue
        parts = name.rsplit(_TMP_MARK, 1)[1].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if _process_alive(int(parts[1])):
            continue
        _remove_quietly_if_present(entry)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- array files


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


def check_free_disk(directory: Path, nbytes: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` unless ``directory``'s file system has room for ``nbytes``."""
    free = shutil.disk_usage(directory).free
    if nbytes + DISK_HEADROOM_BYTES > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough free disk to create {what}: it needs {nbytes / 2**30:.3f} GiB "
            f"(+{DISK_HEADROOM_BYTES / 2**20:.0f} MiB headroom) but {directory} has "
            f"{free / 2**30:.3f} GiB free; free space or use another save_dir",
        )


def create_array(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Create a zero-filled ``.npy`` file at ``path`` atomically, with its disk blocks reserved.

    The free space is checked first (``shutil.disk_usage``), the file is written under a temporary
    name, its blocks reserved with ``posix_fallocate`` (so later writes through a memory map
    cannot hit a full disk), fsynced and renamed over ``path``.

    Raises:
      OSError: ``ENOSPC`` with the sizes when the disk is too full; nothing is left behind.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_free_disk(path.parent, nbytes + NPY_HEADER_BYTES, str(path))
    tmp = temporary_path(path)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        del array
        size = os.path.getsize(tmp)
        with open(tmp, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(
                        err.errno,
                        f"the disk filled up while reserving {size / 2**30:.3f} GiB for {path}; "
                        "nothing was written; free space or use another save_dir",
                    ) from err
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # The file system cannot reserve blocks: the size check above must do.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly_if_present(tmp)
        raise
    fsync_directory(path.parent)


def check_array_file(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Check that ``path`` is a complete ``.npy`` file of ``shape`` and ``dtype``.

    Raises:
      StoreError: naming ``path`` when it is missing, not a ``.npy`` file, of another shape or
        dtype, truncated, or longer than its header says.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if not path.is_file():
        raise StoreError(f"store array file {path} is missing (expected shape {shape}, {dtype})")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(f)
            else:
                found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as err:
            raise StoreError(f"store array file {path} has no valid .npy header ({err})") from err
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    if tuple(found_shape) != shape or np.dtype(found_dtype) != dtype or fortran:
        raise StoreError(
            f"store array file {path} holds shape {tuple(found_shape)} {np.dtype(found_dtype)}"
            f"{' (Fortran order)' if fortran else ''}, but this store expects shape {shape} {dtype}"
        )
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise StoreError(
            f"store array file {path} is {state}: {size} bytes, expected {expected} for shape "
            f"{shape} {dtype}"
        )


def open_array(path: Path, shape: tuple[int, ...], dtype, mode: str = "r+") -> np.memmap:
    """:func:`check_array_file`, then open ``path`` as a memory map."""
    check_array_file(path, shape, dtype)
    return np.lib.format.open_memmap(path, mode=mode)


def write_rows(
    data: Sequence[tuple[np.ndarray, np.ndarray]], done: np.memmap, indices: np.ndarray
) -> None:
    """Write rows, then mark them done: the ordering that makes a killed writer safe.

    Args:
      data: ``(memmap, values)`` pairs; ``memmap[indices] = values`` for each (cast on assignment).
      done: the (N,) uint8 done mask.
      indices: (B,) row indices.

    Each data array is flushed (``msync``) before the done mask is written, and the done mask is
    flushed last.
    """
    for array, values in data:
        array[indices] = values
    for array, _ in data:
        array.flush()
    done[indices] = 1
    done.flush()


# --------------------------------------------------------------------------- fingerprints and layouts


def _leaf_sample(leaf) -> np.ndarray:
    size = int(np.prod(np.shape(leaf), dtype=np.int64))
    itemsize = np.dtype(jnp.result_type(leaf)).itemsize
    if size * itemsize <= FULL_HASH_BYTES:
        return np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    starts = np.linspace(0, size - FINGERPRINT_WINDOW_ELEMENTS, FINGERPRINT_WINDOWS).astype(np.int64)
    index = (starts[:, None] + np.arange(FINGERPRINT_WINDOW_ELEMENTS)).reshape(-1)
    if isinstance(leaf, jax.Array):
        return np.asarray(jnp.ravel(leaf)[jnp.asarray(index)])
    return np.asarray(np.ravel(np.asarray(leaf))[index])


def fingerprint(params) -> str:
    """A short hash identifying a checkpoint's weights, computed cheaply.

    blake2b over every leaf's path, shape and dtype and over its bytes: all of them for leaves
    up to 1 MiB, and 64 evenly spaced windows of 1024 elements (the first and last elements
    included) for larger leaves, so hashing costs at most about 256 KiB per large leaf, read on
    the leaf's device. Two trained checkpoints differ in every window; a change confined to the
    gaps between windows of a large leaf is not seen.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in zip(featurize_lib.parameter_paths(params), jax.tree_util.tree_leaves(params), strict=True):
        digest.update(f"{path}|{tuple(np.shape(leaf))}|{jnp.result_type(leaf)}\n".encode())
        digest.update(_leaf_sample(leaf).tobytes())
    return "blake2b-sampled-1:" + digest.hexdigest()


def tree_record(params) -> dict:
    """The parameter tree's layout: '/'-joined leaf paths, shapes and dtypes, in flattening order."""
    leaves = jax.tree_util.tree_leaves(params)
    return {
        "paths": featurize_lib.parameter_paths(params),
        "shapes": [list(np.shape(x)) for x in leaves],
        "dtypes": [str(jnp.result_type(x)) for x in leaves],
    }


def tree_differences(stored: dict, found: dict, *, check_order: bool = True,
                     names: tuple[str, str] = ("store", "new tree")) -> list[str]:
    """Human-readable differences between two :func:`tree_record` results (leaves matched by
    path; with ``check_order``, the flattening order must agree too). ``names`` label the two."""
    lines = []
    stored_leaves = dict(zip(stored["paths"], zip(stored["shapes"], stored["dtypes"], strict=True), strict=True))
    found_leaves = dict(zip(found["paths"], zip(found["shapes"], found["dtypes"], strict=True), strict=True))
    missing = [p for p in stored["paths"] if p not in found_leaves]
    extra = [p for p in found["paths"] if p not in stored_leaves]
    first, second = names
    if missing:
        lines.append(f"leaves missing from the {second}: {missing}")
    if extra:
        lines.append(f"leaves not in the {first}'s tree: {extra}")
    for path, (shape, dtype) in stored_leaves.items():
        if path in found_leaves and found_leaves[path] != (shape, dtype):
            other = found_leaves[path]
            lines.append(
                f"{path}: {first} has shape {tuple(shape)} {dtype}, {second} has {tuple(other[0])} {other[1]}"
            )
    if check_order and not lines and stored["paths"] != found["paths"]:
        lines.append(f"leaf order differs: {first} has {stored['paths']}, {second} has {found['paths']}")
    return lines


def config_differences(stored: dict, requested: dict) -> list[str]:
    """``"field: store has A, this session has B"`` for every field that differs."""
    lines = []
    for key in sorted(set(stored) | set(requested)):
        a = stored.get(key, "<absent>")
        b = requested.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: store has {a!r}, this session has {b!r}")
    return lines


# --------------------------------------------------------------------------- the store


class TrainArrays(NamedTuple):
    """One checkpoint's train-side arrays (memory maps).

    ``grads`` is Φ (N, k) viewed in the storage dtype, ``out_to_loss`` q (N,) float32, ``done``
    the (N,) uint8 mask; ``files`` the raw memory maps to flush.
    """

    grads: np.ndarray
    out_to_loss: np.memmap
    done: np.memmap
    files: tuple


class TargetArrays(NamedTuple):
    """One checkpoint's target gradients Ψ (T, k) in the storage dtype and their (T,) done mask."""

    grads: np.ndarray
    done: np.memmap
    files: tuple


class ScoreArrays(NamedTuple):
    """The (N, T) float32 score matrix, its per-block done mask and the block size in rows."""

    scores: np.memmap
    done: np.memmap
    block_rows: int


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

    # ----------------------------------------------------------------- opening and locking

    @classmethod
    def open(cls, root, config: dict, *, validate: bool = True) -> Store:
        """Open the store at ``root``, creating it with ``config`` when it does not exist.

        Args:
          root: the store directory.
          config: JSON-able run configuration (proj_dim, seed, projection, contract version, ...).
          validate: check every array file the metadata refers to.

        Raises:
          StoreError: if the store holds another configuration (every differing field listed
            with both values) or a damaged file (named by path).
        """
        root = Path(root).resolve()
        if root.exists() and not root.is_dir():
            raise StoreError(f"save_dir {root} exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, {})
        with store.lock():
            path = root / METADATA_FILE
            if path.exists():
                metadata = read_json(path)
                stored = metadata.get("config")
                if not isinstance(stored, dict) or metadata.get("format_version") != FORMAT_VERSION:
                    raise StoreError(
                        f"{path} is not a trakjax store of format version {FORMAT_VERSION} "
                        f"(found format_version={metadata.get('format_version')!r})"
                    )
                differences = config_differences(stored, config)
                if differences:
                    raise StoreError(
                        f"the store at {root} was created with another configuration:\n  "
                        + "\n  ".join(differences)
                        + "\nUse another save_dir, or the store's configuration"
                    )
                version = _trakjax_version()
                if metadata.get("trakjax_version") != version:
                    warnings.warn(
                        f"the store at {root} was written by trakjax {metadata.get('trakjax_version')}, "
                        f"this is trakjax {version}; its configuration matches, so it is used",
                        stacklevel=3,
                    )
            else:
                remove_stale_temporaries(root)  # a creation killed before its first rename
                if any(p.name != LOCK_FILE and _TMP_MARK not in p.name for p in root.iterdir()):
                    raise StoreError(
                        f"save_dir {root} is not empty and holds no {METADATA_FILE}; it is not a "
                        "trakjax store (use an empty or new directory)"
                    )
                metadata = {
                    "format_version": FORMAT_VERSION,
                    "trakjax_version": _trakjax_version(),
                    "config": config,
                    "parameters": None,
                }
                write_json_atomic(path, metadata)
            store._metadata = metadata
            for folder in store._folders():
                remove_stale_temporaries(folder)
            if validate:
                store.validate()
        return store

    def _folders(self) -> list[Path]:
        """Every directory of the store (where temporary files may be left)."""
        return [self.root] + [p for p in self.root.rglob("*") if p.is_dir()]

    @contextlib.contextmanager
    def lock(self, path: Path | None = None) -> Iterator[None]:
        """Hold an exclusive ``fcntl.flock`` on ``path`` (default: the store's lock file).

        Re-entrant within this object; other processes (and other Store objects) wait.
        """
        path = Path(path) if path is not None else self.root / LOCK_FILE
        if path in self._held:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.add(path)
            try:
                yield
            finally:
                self._held.discard(path)
        finally:
            os.close(fd)

    def _refresh(self) -> dict:
        self._metadata = read_json(self.root / METADATA_FILE)
        return self._metadata

    @property
    def config(self) -> dict:
        """The run configuration recorded at creation."""
        return dict(self._metadata["config"])

    @property
    def train_set_size(self) -> int:
        return int(self._metadata["config"]["train_set_size"])

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(jnp.dtype(self._metadata["config"]["dtype"]))

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
        """Check every array file the metadata refers to; raise :class:`StoreError` naming a bad one."""
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
            if info.get("finalized"):
                check_array_file(folder / "features.npy", (n, k), storage)
        for name in self.experiment_names():
            info = self.experiment_info(name)
            t = int(info["num_targets"])
            for model_id in info["model_ids"]:
                folder = self._target_dir(name, model_id)
                check_array_file(folder / "grads.npy", (t, k), storage)
                check_array_file(folder / "done.npy", (t,), DONE_DTYPE)
            scores = info.get("scores")
            if scores:
                folder = self._experiment_dir(name)
                check_array_file(folder / "scores.npy", (n, t), SCORES_DTYPE)
                check_array_file(folder / "scores_done.npy", (_num_blocks(n, scores["block_rows"]),), DONE_DTYPE)

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
        return read_json(path)

    def has_model(self, model_id: int) -> bool:
        return (self._model_dir(model_id) / "model.json").is_file()

    def check_parameters(self, tree: dict, differentiated: dict | None = None) -> None:
        """Raise :class:`StoreError` if ``tree`` (:func:`tree_record`) or ``differentiated`` differ
        from the store's parameter record (no-op before the first checkpoint)."""
        record = self.parameters()
        if record is None:
            return
        lines = tree_differences(record["tree"], tree)
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
          weights: :func:`fingerprint` of its parameters.
          tree: :func:`tree_record` of its parameters.
          differentiated: ``{"paths": [...], "num_params": P, "proj_dim": k}``.

        Raises:
          StoreError: if the parameters' layout differs from the store's, or ``model_id`` exists
            with other weights (both fingerprints given).
        """
        model_id = int(model_id)
        with self.lock():
            self.check_parameters(tree, differentiated)
            if self.has_model(model_id):
                stored = self.model_info(model_id)["fingerprint"]
                if stored != weights:
                    raise StoreError(
                        f"model_id {model_id} in the store at {self.root} holds other weights: "
                        f"fingerprint {stored} in the store, {weights} for this checkpoint. Use a "
                        "new model_id for a different checkpoint, or another save_dir"
                    )
                return
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
            write_json_atomic(
                folder / "model.json",
                {"model_id": model_id, "fingerprint": weights, "finalized": None},
            )

    def check_weights(self, model_id: int, weights: str) -> None:
        """Raise :class:`StoreError` unless ``model_id`` is stored with fingerprint ``weights``."""
        stored = self.model_info(model_id)["fingerprint"]
        if stored != weights:
            raise StoreError(
                f"model_id {model_id} in the store at {self.root} was featurized with other "
                f"weights: fingerprint {stored} in the store, {weights} for this checkpoint"
            )

    def train_arrays(self, model_id: int, mode: str = "r+") -> TrainArrays:
        folder = self._model_dir(model_id)
        n, k = self.train_set_size, self.proj_dim()
        grads = open_array(folder / "grads.npy", (n, k), file_dtype(self.storage_dtype), mode)
        q = open_array(folder / "out_to_loss.npy", (n,), OUT_TO_LOSS_DTYPE, mode)
        done = open_array(folder / "done.npy", (n,), DONE_DTYPE, mode)
        return TrainArrays(storage_view(grads, self.storage_dtype), q, done, (grads, q))

    def missing_train(self, model_id: int) -> np.ndarray:
        """Indices of training examples not yet featurized for ``model_id``, ascending."""
        done = self.train_arrays(model_id, "r").done
        return np.flatnonzero(np.asarray(done) == 0)

    @staticmethod
    def write_train_rows(arrays: TrainArrays, indices: np.ndarray, features: np.ndarray,
                         out_to_loss: np.ndarray) -> None:
        """Write rows of Φ and q into ``arrays`` (opened ``r+``), flush, then mark them done."""
        write_rows(
            [(arrays.grads, features), (arrays.out_to_loss, out_to_loss)], arrays.done, indices
        )

    def is_finalized(self, model_id: int) -> bool:
        return bool(self.model_info(model_id).get("finalized"))

    def write_features(self, model_id: int, fill: Callable[[np.ndarray], Any], details: dict) -> None:
        """Create F for ``model_id`` atomically, then mark the model finalized.

        ``fill(out)`` writes the (N, k) features into ``out`` (a storage-dtype view of a temporary
        memory map). The file is flushed, fsynced and renamed to ``features.npy``; only then is
        ``model.json`` rewritten with ``details`` (λ, rank, ...) as the finalized record.
        """
        folder = self._model_dir(model_id)
        n, k = self.train_set_size, self.proj_dim()
        final = folder / "features.npy"
        tmp_name = temporary_path(final)
        dtype = file_dtype(self.storage_dtype)
        remove_stale_temporaries(folder)
        create_array(tmp_name, (n, k), dtype)
        try:
            out = np.lib.format.open_memmap(tmp_name, mode="r+")
            fill(storage_view(out, self.storage_dtype))
            out.flush()
            del out
            with open(tmp_name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            _remove_quietly_if_present(tmp_name)
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
        path = self._experiment_dir(name) / "experiment.json"
        if not path.is_file():
            raise StoreError(
                f"experiment {name!r} does not exist in the store at {self.root} (experiments: "
                f"{self.experiment_names()}); call start_scoring_checkpoint({name!r}, ...) first"
            )
        return read_json(path)

    def register_target_model(self, name: str, num_targets: int, model_id: int) -> None:
        """Create experiment ``name`` (T targets) if new and target arrays for ``model_id``.

        Raises:
          StoreError: if the experiment exists with another number of targets.
        """
        check_experiment_name(name)
        with self.lock():
            path = self._experiment_dir(name) / "experiment.json"
            if path.is_file():
                info = read_json(path)
                if int(info["num_targets"]) != int(num_targets):
                    raise StoreError(
                        f"experiment {name!r} in the store at {self.root} has num_targets="
                        f"{info['num_targets']}, this call has num_targets={num_targets}; use "
                        "another exp_name for other targets"
                    )
            else:
                info = {"name": name, "num_targets": int(num_targets), "model_ids": [], "scores": None}
            if int(model_id) in info["model_ids"]:
                return
            folder = self._target_dir(name, model_id)
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
            k = self.proj_dim()
            create_array(folder / "done.npy", (int(num_targets),), DONE_DTYPE)
            create_array(folder / "grads.npy", (int(num_targets), k), file_dtype(self.storage_dtype))
            info["model_ids"] = sorted(info["model_ids"] + [int(model_id)])
            write_json_atomic(path, info)

    def target_arrays(self, name: str, model_id: int, mode: str = "r+") -> TargetArrays:
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

    def score_arrays(self, name: str, model_ids: Sequence[int], block_rows: int) -> ScoreArrays:
        """The experiment's score matrix for ``model_ids``: reused when it was started for the
        same models and block size (its done blocks kept), else created anew.

        Creating anew first clears the experiment's score record, then replaces the done mask
        (zeros), then the score file, then writes the new record: a kill between any two steps
        leaves a state whose done mask never vouches for blocks it does not hold.
        """
        n = self.train_set_size
        with self.lock():
            info = self.experiment_info(name)
            t = int(info["num_targets"])
            folder = self._experiment_dir(name)
            wanted = {"model_ids": [int(m) for m in model_ids], "block_rows": int(block_rows)}
            record = info.get("scores")
            if not record or {k: record[k] for k in wanted} != wanted:
                remove_stale_temporaries(folder)
                if record:
                    info["scores"] = None
                    write_json_atomic(folder / "experiment.json", info)
                create_array(folder / "scores_done.npy", (_num_blocks(n, block_rows),), DONE_DTYPE)
                create_array(folder / "scores.npy", (n, t), SCORES_DTYPE)
                info["scores"] = dict(wanted, complete=False)
                write_json_atomic(folder / "experiment.json", info)
            scores = open_array(folder / "scores.npy", (n, t), SCORES_DTYPE, "r+")
            done = open_array(folder / "scores_done.npy", (_num_blocks(n, block_rows),), DONE_DTYPE, "r+")
        return ScoreArrays(scores, done, int(block_rows))

    def write_score_block(self, arrays: ScoreArrays, block: int, start: int, values: np.ndarray) -> None:
        """Write a block of score rows, flush, then mark the block done."""
        arrays.scores[start : start + values.shape[0]] = values
        arrays.scores.flush()
        arrays.done[block] = 1
        arrays.done.flush()

    def complete_scores(self, name: str) -> None:
        """Record the experiment's score matrix as complete (after every block is flushed)."""
        with self.lock():
            info = self.experiment_info(name)
            info["scores"]["complete"] = True
            write_json_atomic(self._experiment_dir(name) / "experiment.json", info)

    def scores(self, name: str) -> np.memmap:
        """The experiment's complete (N, T) float32 score matrix, read-only."""
        info = self.experiment_info(name)
        record = info.get("scores")
        if not record or not record.get("complete"):
            raise StoreError(f"experiment {name!r} has no finalized scores; call finalize_scores first")
        n, t = self.train_set_size, int(info["num_targets"])
        return open_array(self._experiment_dir(name) / "scores.npy", (n, t), SCORES_DTYPE, "r")


def _num_blocks(num_rows: int, block_rows: int) -> int:
    return -(-int(num_rows) // int(block_rows))


def check_experiment_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is usable as a directory name."""
    if not isinstance(name, str) or not _EXPERIMENT_NAME.match(name):
        raise ValueError(
            f"exp_name must be 1-128 characters from [A-Za-z0-9_.-], not starting with '.' or "
            f"'-', got {name!r}"
        )
