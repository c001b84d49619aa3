"""Data sets as pytrees with a leading example axis, and the batches trakjax reads from them.

A data set is either a pytree of arrays that share their leading (example) axis, e.g.
``(images, labels)`` or a dict of token arrays, or a zero-argument callable returning a fresh
iterator of such batches (re-read for every checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from trakjax.errors import InvalidArgumentError


def _leaf_desc(path, leaf) -> str:
    return f"{jax.tree_util.keystr(path) or '<root>'} {tuple(np.shape(leaf))}"


def num_examples(data: Any, name: str = "data") -> int:
    """Length of the leading axis shared by every leaf of ``data``.

    Raises:
      ValueError: naming ``name`` when ``data`` has no leaves, a scalar leaf, leaves with
        different leading axes, or zero examples.
    """
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        raise InvalidArgumentError(f"{name} has no arrays: expected a pytree of arrays with a leading example axis")
    lengths = set()
    for path, leaf in leaves:
        if np.ndim(leaf) == 0:
            raise InvalidArgumentError(
                f"{name} leaf {_leaf_desc(path, leaf)} is a scalar; every leaf needs a leading example axis"
            )
        lengths.add(np.shape(leaf)[0])
    if len(lengths) > 1:
        desc = ", ".join(_leaf_desc(p, x) for p, x in leaves)
        raise InvalidArgumentError(
            f"{name} has mismatched leading axes: {desc}; every leaf must have the same number of examples"
        )
    n = lengths.pop()
    if n == 0:
        raise InvalidArgumentError(f"{name} is empty (0 examples); at least one example is needed")
    return int(n)


def take(data: Any, start: int, stop: int) -> Any:
    """Examples ``start .. stop − 1`` of every leaf."""
    return jax.tree_util.tree_map(lambda x: x[start:stop], data)


def pad_batch(batch: Any, size: int) -> Any:
    """Pad a batch to ``size`` examples by repeating its last example (rows dropped later)."""
    n = num_examples(batch, "batch")
    if n == size:
        return batch
    return jax.tree_util.tree_map(
        lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], size - n, axis=0)]),
        batch,
    )


def iterate_batches(data: Any, batch_size: int, name: str = "data") -> Iterator[tuple[int, Any]]:
    """Yield ``(first_index, batch)`` over ``data`` in order.

    ``data`` is a pytree of arrays (sliced into ``batch_size`` examples) or a zero-argument
    callable returning an iterator of batches (taken as they come, validated one by one).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if callable(data):
        start = 0
        seen = False
        for batch in data():
            n = num_examples(batch, f"a batch of {name}")
            yield start, batch
            start += n
            seen = True
        if not seen:
            raise InvalidArgumentError(f"{name}() returned an empty iterator; at least one batch is needed")
        return
    total = num_examples(data, name)
    for start in range(0, total, batch_size):
        yield start, take(data, start, min(start + batch_size, total))



def canonical_dtype(dtype) -> np.dtype:
    """The dtype JAX gives a value of ``dtype`` (int64 is int32 and float64 float32 without
    ``jax_enable_x64``); extended dtypes (PRNG keys) are returned as they are."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return jax.dtypes.canonicalize_dtype(dtype)
