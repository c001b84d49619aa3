"""Atomic file primitives: every file trakjax writes goes through these.

* A file is written under a unique temporary name in its target directory, created exclusively
  (``O_CREAT | O_EXCL | O_NOFOLLOW``: never through a link planted at that name, never shared
  with a concurrent writer), flushed, fsynced, then renamed over the target, and the directory
  is fsynced: a reader sees the old file or the new one, never a mix, and a link planted at the
  target name is replaced, not followed (:func:`write_atomic`, :func:`write_json_atomic`).
* ``.npy`` arrays are created the same way with their disk blocks reserved
  (:func:`create_array`), checked on open (:func:`check_array_file`), and written row by row,
  data first and the done mask last (:func:`write_rows`), so that a killed writer leaves only
  rows that are complete and marked, or unmarked.
* Temporary names carry ``<host>.<pid>``, so that files left by killed writers are found and
  removed (:func:`remove_stale_temporaries`).

I/O errors propagate; nothing is swallowed. Damaged metadata raises
:class:`~trakjax.errors.StoreError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from trakjax.errors import StoreError

TMP_MARK = ".tmp."
"""Marks temporary names: ``.<name>.tmp.<host>.<pid>.<random>``."""
NPY_HEADER_BYTES = 4096
"""An upper bound on the ``.npy`` header of trakjax's arrays."""
DISK_HEADROOM_BYTES = 16 * 2**20
"""Free space kept beyond an array's own size when creating it."""


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def fsync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """A unique sibling of ``path`` for writing before a rename: ``.<name>.tmp.<host>.<pid>.<id>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def remove_if_present(path: Path) -> None:
    """Delete ``path`` if it exists (a missing file is not an error)."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def exclusive_temporary(path: Path, mode: str = "w") -> Iterator[tuple[IO, Path]]:
    """Open a new temporary sibling of ``path`` exclusively; yield ``(file, temporary path)``.

    The file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a name that exists, a link
    included, is never opened) and removed again if the block raises.
    """
    tmp = temporary_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o644)
    try:
        binary = "b" in mode
        text = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, "wb" if binary else "w", **text) as handle:
            yield handle, tmp
    except BaseException:
        remove_if_present(tmp)
        raise


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (``ulimit -f``, RLIMIT_FSIZE), or None if unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


@contextlib.contextmanager
def naming_file_too_large(path: Path, nbytes: int | None) -> Iterator[None]:
    """Turn ``EFBIG`` (File too large, which names no file) into an OSError naming ``path``,
    the size it needed and the file-size limit."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.EFBIG:
            raise
        limit = file_size_limit()
        size = "" if nbytes is None else f" it needs {nbytes} bytes ({nbytes / 2**20:.1f} MiB), but"
        raise OSError(
            errno.EFBIG,
            f"cannot write {path}:{size} the file-size limit (ulimit -f, RLIMIT_FSIZE) is "
            f"{'unknown' if limit is None else f'{limit} bytes'}; nothing was published under "
            "that name; raise the limit (ulimit -f unlimited) and rerun to resume",
        ) from err


def write_atomic(path: Path, write: Callable[[IO], Any], *, binary: bool = False) -> None:
    """Write ``path`` atomically: ``write(handle)`` into an exclusive temporary file, fsync, rename.

    A link at ``path`` is replaced by the new file, never followed; concurrent writers each use
    their own temporary file and the last rename wins. A file-size limit hit while writing
    raises an OSError naming ``path``.
    """
    path = Path(path)
    with naming_file_too_large(path, None), exclusive_temporary(path, "wb" if binary else "w") as (handle, tmp):
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    publish(tmp, path)


def publish(tmp: Path, path: Path) -> None:
    """Rename a written, fsynced temporary file over ``path`` and fsync the directory; the
    temporary file is removed if the rename fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_if_present(tmp)
        raise
    fsync_directory(Path(path).parent)


def write_json_atomic(path: Path, content: Any) -> None:
    """Write ``content`` as JSON to ``path`` atomically (see :func:`write_atomic`)."""

    def dump(handle):
        json.dump(content, handle, indent=1, sort_keys=True)
        handle.write("\n")

    write_atomic(path, dump)


def read_json(path: Path, what: str = "store metadata file") -> Any:
    """Read a JSON file; a damaged one raises :class:`~trakjax.errors.StoreError` naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise StoreError(f"{what} {path} is not UTF-8 text ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StoreError(f"{what} {path} is not valid JSON ({err})") from err


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by dead processes of this host.

    Temporary names carry ``<host>.<pid>``; a file whose process is gone (a killed writer) is
    removed. Files of live processes and of other hosts are left alone.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if TMP_MARK not in name or not name.startswith("."):
            continue
        parts = name.rsplit(TMP_MARK, 1)[1].split(".")
        if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
            continue
        if _process_alive(int(parts[1])):
            continue
        remove_if_present(entry)
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


def _reserve_blocks(handle, size: int, path: Path) -> None:
    """``posix_fallocate`` the file's blocks, so later writes through a memory map cannot hit a
    full disk; a file system that cannot reserve blocks relies on the free-space check."""
    try:
        os.posix_fallocate(handle.fileno(), 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                err.errno,
                f"the disk filled up while reserving {size / 2**30:.3f} GiB for {path}; "
                "nothing was written; free space or use another save_dir",
            ) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def create_array(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Create a zero-filled ``.npy`` file at ``path`` atomically, with its disk blocks reserved.

    The free space is checked first, the file is written under an exclusive temporary name, its
    blocks reserved, fsynced and renamed over ``path``.

    Raises:
      OSError: ``ENOSPC`` with the sizes when the disk is too full; nothing is left behind.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_free_disk(path.parent, nbytes + NPY_HEADER_BYTES, str(path))
    with naming_file_too_large(path, nbytes + NPY_HEADER_BYTES), exclusive_temporary(path, "wb") as (handle, tmp):
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        size = handle.tell() + nbytes
        handle.truncate(size)
        handle.flush()
        _reserve_blocks(handle, size, path)
        os.fsync(handle.fileno())
    publish(tmp, path)


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
