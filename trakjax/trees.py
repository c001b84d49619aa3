"""Pytree paths, layouts, differences and content fingerprints.

* :func:`path_string` / :func:`leaf_paths` name every leaf of a pytree by its '/'-joined path
  (``params/Dense_0/kernel``): the names ``grad_wrt`` prefixes, stores and messages use.
* :func:`tree_record` describes a tree's layout (paths, shapes, dtypes) as JSON;
  :func:`tree_differences` lists how two layouts differ, for error messages.
* :func:`fingerprint` hashes a pytree's content (paths, shapes, dtypes and every byte): a
  checkpoint's weights or a data set. Stores record these hashes so that a rerun with other
  weights or other data is detected instead of returning a stale result.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trakjax.errors import InvalidArgumentError

FINGERPRINT_SCHEME = "blake2b-2"
"""The current :func:`fingerprint` scheme: every byte of every leaf."""
SAMPLED_SCHEME = "blake2b-sampled-1"
"""The scheme of trakjax 0.1 stores: large leaves hashed through 64 windows of 1024 elements."""
_SAMPLED_FULL_BYTES = 2**20
_SAMPLED_WINDOWS = 64
_SAMPLED_WINDOW_ELEMENTS = 1024
_HASH_CHUNK_BYTES = 64 * 2**20


def path_string(path) -> str:
    """The '/'-joined form of a ``jax.tree_util`` key path: ``params/Dense_0/kernel``."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(str(entry.name))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return "/".join(parts)


def leaf_paths(tree) -> list[str]:
    """The '/'-joined path of every leaf of ``tree``, in flattening order."""
    return [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def leaves_by_path(tree) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf of ``tree``."""
    return {path_string(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def tree_record(tree) -> dict:
    """A tree's layout as JSON: '/'-joined leaf paths, shapes and dtypes, in flattening order."""
    leaves = jax.tree_util.tree_leaves(tree)
    return {
        "paths": leaf_paths(tree),
        "shapes": [list(np.shape(x)) for x in leaves],
        "dtypes": [str(jnp.result_type(x)) for x in leaves],
    }


def tree_differences(stored: dict, found: dict, *, check_order: bool = True,
                     names: tuple[str, str] = ("store", "new tree")) -> list[str]:
    """Human-readable differences between two :func:`tree_record` results.

    Leaves are matched by path; with ``check_order`` the flattening order must agree too.
    ``names`` label the two sides in the messages.
    """
    lines = []
    stored_leaves = dict(zip(stored["paths"], zip(stored["shapes"], stored["dtypes"], strict=True), strict=True))
    found_leaves = dict(zip(found["paths"], zip(found["shapes"], found["dtypes"], strict=True), strict=True))
    first, second = names
    missing = [p for p in stored["paths"] if p not in found_leaves]
    extra = [p for p in found["paths"] if p not in stored_leaves]
    if missing:
        lines.append(f"leaves missing from the {second}: {missing}")
    if extra:
        lines.append(f"leaves not in the {first}'s tree: {extra}")
    for path, (shape, dtype) in stored_leaves.items():
        if path in found_leaves and [list(found_leaves[path][0]), found_leaves[path][1]] != [list(shape), dtype]:
            other = found_leaves[path]
            lines.append(
                f"{path}: {first} has shape {tuple(shape)} {dtype}, {second} has {tuple(other[0])} {other[1]}"
            )
    if check_order and not lines and list(stored["paths"]) != list(found["paths"]):
        lines.append(f"leaf order differs: {first} has {stored['paths']}, {second} has {found['paths']}")
    return lines


def _leaf_bytes(leaf) -> np.ndarray:
    """The leaf's elements as a flat C-ordered host array (memory maps are read, not copied)."""
    return np.ascontiguousarray(np.asarray(leaf)).reshape(-1)


def _sampled_bytes(leaf) -> np.ndarray:
    size = int(np.prod(np.shape(leaf), dtype=np.int64))
    itemsize = np.dtype(jnp.result_type(leaf)).itemsize
    if size * itemsize <= _SAMPLED_FULL_BYTES:
        return _leaf_bytes(leaf)
    starts = np.linspace(0, size - _SAMPLED_WINDOW_ELEMENTS, _SAMPLED_WINDOWS).astype(np.int64)
    index = (starts[:, None] + np.arange(_SAMPLED_WINDOW_ELEMENTS)).reshape(-1)
    if isinstance(leaf, jax.Array):
        return np.asarray(jnp.ravel(leaf)[jnp.asarray(index)])
    return np.asarray(np.ravel(np.asarray(leaf))[index])


def fingerprint(tree, scheme: str = FINGERPRINT_SCHEME) -> str:
    """A content hash of a pytree of arrays: ``"<scheme>:<hex>"``.

    blake2b (128 bits) over every leaf's path, shape and dtype and over its bytes, in flattening
    order. ``scheme`` :data:`FINGERPRINT_SCHEME` hashes every byte (a checkpoint of 124M float32
    parameters takes about a second); :data:`SAMPLED_SCHEME` is the scheme trakjax 0.1 stores
    recorded (64 windows of 1024 elements of each leaf over 1 MiB), kept so that those stores
    can still be checked.
    """
    if scheme not in (FINGERPRINT_SCHEME, SAMPLED_SCHEME):
        raise InvalidArgumentError(f"unknown fingerprint scheme {scheme!r}")
    digest = hashlib.blake2b(digest_size=16)
    with_path = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in with_path:
        digest.update(f"{path_string(path)}|{tuple(np.shape(leaf))}|{jnp.result_type(leaf)}\n".encode())
        if scheme == SAMPLED_SCHEME:
            digest.update(_sampled_bytes(leaf).tobytes())
            continue
        flat = _leaf_bytes(leaf)
        step = max(1, _HASH_CHUNK_BYTES // max(flat.itemsize, 1))
        for start in range(0, flat.size, step):
            digest.update(flat[start : start + step].tobytes())
    return f"{scheme}:{digest.hexdigest()}"


def same_fingerprint(stored: str, tree) -> tuple[bool, str]:
    """Whether ``tree`` hashes to ``stored`` under ``stored``'s own scheme; and its hash."""
    scheme = stored.split(":", 1)[0] if isinstance(stored, str) else FINGERPRINT_SCHEME
    if scheme not in (FINGERPRINT_SCHEME, SAMPLED_SCHEME):
        scheme = FINGERPRINT_SCHEME
    found = fingerprint(tree, scheme)
    return found == stored, found
