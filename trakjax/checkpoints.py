"""Orbax checkpoints in: restore a params pytree, or read its tree without reading arrays.

What a training job leaves behind is an orbax directory written by
``orbax.checkpoint.StandardCheckpointer().save(path, tree)``. :func:`restore` reads one back
(into a template's structure when one is given), :func:`abstract_tree` reads only its metadata
(shapes and dtypes). Every failure names the path: a directory that does not exist, one that is
not an orbax checkpoint (an empty directory included), or one whose tree differs from the
template (each difference listed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from trakjax import trees
from trakjax.errors import InvalidArgumentError

_METADATA_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
"""Files one of which every orbax checkpoint directory holds."""


def checkpoint_path(path) -> Path:
    """``path`` (``~`` expanded, absolute), checked to be an orbax checkpoint directory.

    Raises:
      InvalidArgumentError: naming the path when it is missing, not a directory, or holds none
        of orbax's metadata files (an empty directory, say).
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not path.is_dir():
        raise InvalidArgumentError(f"orbax checkpoint path {path} does not exist or is not a directory")
    if not any((path / name).exists() for name in _METADATA_FILES):
        contents = sorted(p.name for p in path.iterdir())[:5]
        raise InvalidArgumentError(
            f"{path} is not an orbax checkpoint directory: it holds none of orbax's metadata files "
            f"({', '.join(_METADATA_FILES[:2])}, ...){'; it is empty' if not contents else f'; it holds {contents}'}"
        )
    return path


def strip_value_level(tree):
    """Replace every ``{"value": leaf}`` dict by ``leaf``: ``nnx.state`` saved by orbax comes back so."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {key: strip_value_level(value) for key, value in tree.items()}
    return tree


def _with_checkpointer(path: Path, read):
    """``read(checkpointer)`` with an orbax StandardCheckpointer; a failure names ``path``."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return read(checkpointer)
    except Exception as err:  # noqa: BLE001  (orbax raises many types for unreadable directories)
        text = str(err).strip().splitlines()
        raise InvalidArgumentError(
            f"{path} could not be read as an orbax checkpoint ({type(err).__name__}: "
            f"{text[0] if text else ''})"
        ) from err


def abstract_tree(path) -> Any:
    """The tree (``jax.ShapeDtypeStruct`` leaves) of the orbax checkpoint at ``path``, from its
    metadata alone (no array is read)."""
    path = checkpoint_path(path)
    metadata = _with_checkpointer(path, lambda checkpointer: checkpointer.metadata(path))
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        tree = getattr(metadata, "item_metadata", metadata)
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree,
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )


def restore(path, template=None) -> Any:
    """Restore a params pytree (numpy leaves) from an orbax checkpoint directory.

    The checkpoint is restored as orbax wrote it (no casting), then, with a ``template``, its
    leaves are matched to the template's by '/'-joined path and put into the template's pytree
    structure (so containers such as tuples or flax structs come back as they were).

    Args:
      path: a directory written by ``orbax.checkpoint.StandardCheckpointer().save``.
      template: optional pytree (arrays or ``jax.ShapeDtypeStruct``) whose structure, shapes and
        dtypes the checkpoint must have.

    Raises:
      InvalidArgumentError: naming ``path`` when it does not exist, is not an orbax checkpoint,
        or holds a tree with other leaves, shapes or dtypes than ``template`` (each listed).
    """
    path = checkpoint_path(path)
    restored = _with_checkpointer(path, lambda checkpointer: checkpointer.restore(path))
    restored = jax.tree_util.tree_map(np.asarray, restored)
    if template is None:
        return restored
    found, wanted = trees.tree_record(restored), trees.tree_record(template)
    lines = trees.tree_differences(wanted, found, check_order=False, names=("expected tree", "checkpoint"))
    if lines:
        raise InvalidArgumentError(
            f"the orbax checkpoint at {path} holds a different tree structure than this run's "
            "checkpoints:\n  " + "\n  ".join(lines)
        )
    by_path = dict(zip(found["paths"], jax.tree_util.tree_leaves(restored), strict=True))
    leaves = [by_path[p] for p in wanted["paths"]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
