"""Per-example gradients of a task's output: which leaves are differentiated, and the output as a
function of those leaves.

* :func:`select_parameters` turns ``grad_wrt`` into a mask over the parameter pytree. Only the
  selected leaves are differentiated: the rest are closed over as constants, so XLA never
  computes their gradients.
* :func:`output_fn` is the task's output of ONE example as a function of the differentiated
  leaves; every projection family differentiates it.
* :func:`per_example_grads` is ``jax.vmap(jax.value_and_grad(output))`` over a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from trakjax.config import GradWrt
from trakjax.errors import ArgumentTypeError, InvalidArgumentError
from trakjax.tasks import Task, TaskState, describe_shapes
from trakjax.trees import leaf_paths

parameter_paths = leaf_paths
"""The '/'-joined path of every leaf of a params pytree (:func:`trakjax.trees.leaf_paths`)."""

__all__ = [
    "check_scalar_output", "has_aux", "merge_parameters", "output_fn", "parameter_paths", "per_example_grads",
    "select_parameters", "split_parameters", "task_output_fn", "value_and_grads",
]


# --------------------------------------------------------------------------- parameter selection


def _mask_from_grad_wrt(grad_wrt, paths, leaves, params) -> list[bool]:
    if grad_wrt is None:
        return [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    if isinstance(grad_wrt, str):
        raise ArgumentTypeError(
            f"grad_wrt must be a sequence of path prefixes, not a single string; use [{grad_wrt!r}]"
        )
    if callable(grad_wrt):
        return [bool(grad_wrt(p, x)) for p, x in zip(paths, leaves, strict=True)]
    if isinstance(grad_wrt, list | tuple) and all(isinstance(s, str) for s in grad_wrt):
        mask = [False] * len(paths)
        for prefix in grad_wrt:
            hits = [i for i, p in enumerate(paths) if p == prefix or p.startswith(prefix.rstrip("/") + "/")]
            if not hits:
                raise InvalidArgumentError(
                    f"grad_wrt entry {prefix!r} matches no parameter; valid paths are {paths}"
                )
            for i in hits:
                mask[i] = True
        return mask
    try:
        return jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda m, _: bool(m), grad_wrt, params))
    except (ValueError, TypeError) as err:
        raise InvalidArgumentError(
            "grad_wrt must be None, a sequence of path prefixes, a callable (path, leaf) -> bool "
            f"or a pytree of bools shaped like params; got {type(grad_wrt).__name__}: {err}"
        ) from err


def select_parameters(params, grad_wrt: GradWrt = None) -> list[bool]:
    """Which leaves of ``params`` (in flattening order) are differentiated.

    Args:
      params: the parameter pytree.
      grad_wrt: ``None`` for every floating-point leaf; a sequence of '/'-joined path prefixes
        (``["params/Dense_0", "params/head/kernel"]``); a callable ``(path, leaf) -> bool``; or a
        pytree of bools with the structure of ``params`` (an optax-style mask).

    Returns:
      One bool per leaf of ``params``.

    Raises:
      InvalidArgumentError: if a path prefix matches no leaf (listing the valid paths), if the
        selection is empty, or if a selected leaf is not floating point.
    """
    with_path = jax.tree_util.tree_leaves_with_path(params)
    paths = leaf_paths(params)
    leaves = [x for _, x in with_path]
    if not leaves:
        raise InvalidArgumentError("params has no leaves")
    mask = _mask_from_grad_wrt(grad_wrt, paths, leaves, params)
    if not any(mask):
        raise InvalidArgumentError(f"grad_wrt={grad_wrt!r} selects no parameter; valid paths are {paths}")
    for flag, path, leaf in zip(mask, paths, leaves, strict=True):
        if flag and not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise InvalidArgumentError(
                f"grad_wrt selects {path!r} of dtype {jnp.result_type(leaf)}; only floating-point "
                "parameters can be differentiated"
            )
    return [bool(m) for m in mask]


def split_parameters(params, mask: Sequence[bool]) -> tuple[list, list]:
    """(differentiated leaves, fixed leaves) of ``params`` under ``mask``."""
    leaves = jax.tree_util.tree_leaves(params)
    diff = [x for x, m in zip(leaves, mask, strict=True) if m]
    fixed = [x for x, m in zip(leaves, mask, strict=True) if not m]
    return diff, fixed


def merge_parameters(treedef, mask: Sequence[bool], diff: Sequence, fixed: Sequence):
    """Inverse of :func:`split_parameters`."""
    diff_iter, fixed_iter = iter(diff), iter(fixed)
    leaves = [next(diff_iter) if m else next(fixed_iter) for m in mask]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------- per-example gradients


def check_scalar_output(task: Task, value, example) -> None:
    """Raise (at trace time) unless ``task.output`` gave one scalar for one example."""
    shape = jnp.shape(value)
    if shape != ():
        raise InvalidArgumentError(
            f"task {task.name!r}: output(params, example, state) must return one scalar per "
            f"example; got shape {tuple(shape)} for an example of shape {describe_shapes(example)}"
            " (reduce it, e.g. sum a sequence's per-token terms, or pick one output)"
        )


def output_fn(task: Task, treedef, mask, fixed, aux=None, *, with_aux: bool = False) -> Callable:
    """``output(diff_leaves, example, key) -> ()``: the task's output of ONE example as a function
    of the differentiated leaves, the fixed leaves and the task's ``aux`` closed over.

    With ``with_aux`` (for a task with ``output_with_aux``), ``-> (f (), out_aux)``: the task's
    ``output_with_aux``, the same f and what its ``from_outputs`` reads, from one pass.
    """

    def output(diff_leaves, example, key):
        params = merge_parameters(treedef, mask, diff_leaves, fixed)
        state = TaskState(aux, key)
        if with_aux:
            value, out_aux = task.output_with_aux(params, example, state)
            check_scalar_output(task, value, example)
            return value, out_aux
        value = task.output(params, example, state)
        check_scalar_output(task, value, example)
        return value

    return output


def has_aux(task: Task) -> bool:
    """Whether featurization takes the task's auxiliary outputs from the features' pass."""
    return task.output_with_aux is not None


def task_output_fn(task: Task, params, mask, state: TaskState | None = None) -> tuple[Callable, list]:
    """``(output_fn, diff_leaves)`` of ``params`` under ``mask`` (see :func:`output_fn`)."""
    state = TaskState() if state is None else state
    diff, fixed = split_parameters(params, mask)
    return output_fn(task, jax.tree_util.tree_structure(params), tuple(mask), fixed, state.aux), diff


def value_and_grads(task: Task, treedef, mask, diff, fixed, batch, state: TaskState, *, with_aux: bool = False):
    """``(outputs (B,), gradient leaves (B, *leaf_shape))`` of the differentiated leaves ``diff``.

    ``jax.vmap(jax.value_and_grad(output))`` over the batch, the fixed leaves closed over as
    constants; ``state.key``, if given, is a (B,) batch of keys. With ``with_aux``:
    ``((outputs, out_aux), grads)``, ``out_aux`` the task's auxiliary outputs batched (B, ...).
    """
    output = output_fn(task, treedef, mask, fixed, state.aux, with_aux=with_aux)
    key_axis = None if state.key is None else 0
    grad = jax.value_and_grad(output, has_aux=with_aux)
    return jax.vmap(grad, in_axes=(None, 0, key_axis))(diff, batch, state.key)


def per_example_grads(
    task: Task,
    params,
    batch,
    *,
    grad_wrt: GradWrt = None,
    state: TaskState = TaskState(),
):
    """Per-example gradients of ``task.output`` and the outputs themselves.

    ``jax.vmap(jax.value_and_grad(output))`` over the batch, differentiating only the leaves that
    ``grad_wrt`` selects.

    Args:
      task: the :class:`~trakjax.tasks.Task`.
      params: the parameter pytree of one checkpoint.
      batch: pytree of arrays with a leading example axis B.
      grad_wrt: see :func:`select_parameters`.
      state: :class:`~trakjax.tasks.TaskState`; ``state.key``, if given, is a (B,) batch of keys.

    Returns:
      ``(grads, outputs)``: ``grads`` has the structure of ``params`` with each selected leaf
      (B, *leaf_shape) and ``None`` in place of unselected leaves; ``outputs`` is (B,).
    """
    mask = select_parameters(params, grad_wrt)
    treedef = jax.tree_util.tree_structure(params)
    diff, fixed = split_parameters(params, mask)
    outputs, grads = value_and_grads(task, treedef, tuple(mask), diff, fixed, batch, state)
    leaves = iter(grads)
    full = [next(leaves) if m else None for m in mask]
    return jax.tree_util.tree_unflatten(treedef, full), outputs
