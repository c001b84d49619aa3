"""A fingerprint of what a task computes: its jaxprs on one example, with constants by content.

Stores compare it before reusing results, so that a task whose functions changed under the same
name (a squared output, an edited custom task, another model, ``model_kwargs`` or
``apply_kwargs``) is not served the earlier scores.

The fingerprint is a blake2b digest of the jaxprs of ``task.output`` (one example),
``task.out_to_loss`` and ``task.ridge_terms`` (a batch of one) and ``task.init`` (a batch of
one), traced with the parameters and the task state as arguments (abstract: nothing is
computed), so that only the computation and the arrays it closes over enter it. Closed-over
arrays become the jaxprs' constants, hashed by content (dtype, shape and bytes, streamed into
the digest), never by name or address.

What it does not see: the printed jaxpr names ``custom_jvp``/``custom_vjp`` rules by their
functions' names only (a rule edited under the same name is not seen), and nothing inside a host
callback (``jax.pure_callback``, ``io_callback``) beyond the callback's name. The printed form
changes between JAX releases, so the digest is recorded with the JAX and Flax versions that
traced it (:func:`versions_key`); on other versions it is not compared.
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trakjax.tasks import Task, TaskState

DIGEST_BYTES = 16
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_HASH_CHUNK_BYTES = 1 << 24


def versions_key() -> str:
    """``"jax=<version> flax=<version>"``: what the printed jaxpr depends on besides the task."""
    try:
        flax_version = metadata.version("flax")
    except metadata.PackageNotFoundError:
        flax_version = "absent"
    return f"jax={jax.__version__} flax={flax_version}"


def _abstract(tree):
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
        return x

    return jax.tree_util.tree_map(leaf, tree)


def _with_batch_axis(example):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), example)


def _hash_array(digest, value) -> None:
    array = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    raw = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    for start in range(0, len(raw), _HASH_CHUNK_BYTES):
        digest.update(raw[start : start + _HASH_CHUNK_BYTES])


def _hash_constants(digest, closed) -> None:
    """Every constant of a closed jaxpr and of the jaxprs nested in its equations, by content."""
    for const in closed.consts:
        _hash_array(digest, const) if hasattr(const, "shape") else digest.update(repr(const).encode())
    for eqn in closed.jaxpr.eqns:
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                if hasattr(inner, "consts") and hasattr(inner, "jaxpr"):
                    _hash_constants(digest, inner)


def _hash_function(digest, name: str, fn, *args) -> None:
    closed = jax.make_jaxpr(fn)(*args)
    digest.update(f"\n[{name}]\n".encode())
    digest.update(_ADDRESS.sub("", str(closed)).encode())
    _hash_constants(digest, closed)


def task_fingerprint(task: Task, params, example, aux: Any = None) -> str:
    """The blake2b digest (hex) of what ``task`` computes; see the module docstring.

    Args:
      task: the :class:`~trakjax.tasks.Task`.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; only shapes are used).
      example: ONE example (no example axis; arrays or ``jax.ShapeDtypeStruct``).
      aux: the task's per-checkpoint state (``task.init``'s result; shapes only), if any.

    Returns:
      ``"task1:" + 32 hex digits``.
    """
    params, example, aux = _abstract(params), _abstract(example), _abstract(aux)
    batch = _with_batch_axis(example)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype) if task.uses_key else None
    keys = None if key is None else jax.ShapeDtypeStruct((1,), key.dtype)
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    digest.update(f"uses_key={task.uses_key}".encode())
    _hash_function(digest, "output", lambda p, z, a, k: task.output(p, z, TaskState(a, k)),
                   params, example, aux, key)
    _hash_function(digest, "out_to_loss", lambda p, b, a, k: task.out_to_loss(p, b, TaskState(a, k)),
                   params, batch, aux, keys)
    if task.ridge_terms is not None:
        q = jax.ShapeDtypeStruct((1,), jnp.float32)
        _hash_function(digest, "ridge_terms",
                       lambda p, b, a, k, q_: task.ridge_terms(p, b, TaskState(a, k), q_),
                       params, batch, aux, keys, q)
    if task.init is not None:
        try:
            _hash_function(digest, "init", task.init, params, batch)
        except (TypeError, ValueError):  # host code that cannot be traced: seen by name only
            name = f"{getattr(task.init, '__module__', '?')}.{getattr(task.init, '__qualname__', '?')}"
            digest.update(f"\n[init, not traceable]\n{name}".encode())
    return "task1:" + digest.hexdigest()
