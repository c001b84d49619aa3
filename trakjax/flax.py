"""Adapters from Flax models to what trakjax's tasks take: ``(params, apply_fn, grad_wrt)``.

A task calls ``apply_fn(params, inputs)`` and trakjax differentiates the leaves of ``params``
that ``grad_wrt`` selects (:func:`trakjax.featurize.select_parameters`); the other leaves are
held fixed, closed over as constants, never differentiated.

* :func:`from_nnx`: a Flax NNX module. ``nnx.split`` separates its ``nnx.Param`` variables from
  every other variable (batch statistics, RNG state, …); ``params`` holds both as pure dicts,
  ``{"params": …, "state": …}``; ``apply_fn`` merges them back (``nnx.merge``) and calls the
  module; ``grad_wrt = ["params"]``.
* :func:`from_linen`: a linen module and its variables. ``params`` is the variables dict
  (``{"params": …, "batch_stats": …}``), ``apply_fn`` is ``module.apply`` with no mutable
  collection, and ``grad_wrt = ["params"]``: collections such as ``batch_stats`` are held fixed.

Pass ``grad_wrt`` on to :func:`trakjax.attribute` / :func:`trakjax.train_features`::

    model = trakjax.flax.from_nnx(module)
    task = trakjax.tasks.image_classification(model.apply_fn)
    scores = trakjax.attribute(task, [model.params], train, targets, grad_wrt=model.grad_wrt)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from flax import nnx

from trakjax.errors import ArgumentTypeError, InvalidArgumentError

PARAMS = "params"
"""Key of the differentiated variables in :func:`from_nnx`'s ``params`` (and linen's collection)."""
STATE = "state"
"""Key of the held-fixed variables in :func:`from_nnx`'s ``params``."""


class FlaxModel(NamedTuple):
    """A Flax model in trakjax's terms.

    Attributes:
      params: the parameter pytree handed to tasks (one checkpoint).
      apply_fn: ``(params, *inputs, **kwargs) -> outputs``, pure.
      grad_wrt: path prefixes of the differentiated leaves, for ``grad_wrt=``.
    """

    params: Any
    apply_fn: Callable[..., Any]
    grad_wrt: list[str]


def nnx_params(module: nnx.Module, wrt: Any = nnx.Param) -> dict:
    """``{"params": values of the variables matching wrt, "state": every other variable}``.

    Both are pure dicts of arrays (``nnx.to_pure_dict``), so checkpoints of one architecture
    share a pytree structure and paths read ``params/<submodule>/<name>``.
    """
    _, diff, rest = nnx.split(module, wrt, ...)
    return {PARAMS: nnx.to_pure_dict(diff), STATE: nnx.to_pure_dict(rest)}


def from_nnx(
    module: nnx.Module,
    *,
    wrt: Any = nnx.Param,
    method: str | Callable[..., Any] | None = None,
    eval_mode: bool = True,
) -> FlaxModel:
    """Adapt a Flax NNX module: parameters from ``nnx.split``, ``apply_fn`` by ``nnx.merge``.

    Args:
      module: the model (left unchanged).
      wrt: NNX filter of the differentiated variables (default ``nnx.Param``); every other
        variable (``nnx.BatchStat``, RNG state, …) is held fixed.
      method: what ``apply_fn`` calls on the merged module: ``None`` for ``module(*inputs)``, a
        method name (``"encode_image"``), or a function ``(module, *inputs) -> outputs``.
      eval_mode: call ``.eval()`` on a copy of the module first, so that dropout is off and
        batch normalization uses its running statistics (attribution needs a deterministic
        output function).

    Returns:
      :class:`FlaxModel` with ``params = {"params": …, "state": …}`` (see :func:`nnx_params`),
      ``apply_fn(params, *inputs, **kwargs)`` and ``grad_wrt = ["params"]``. For further
      checkpoints of the same architecture use :func:`nnx_params` on each; ``apply_fn`` serves
      them all.
    """
    if not isinstance(module, nnx.Module):
        raise ArgumentTypeError(f"from_nnx: module must be a flax.nnx.Module, got {type(module).__name__}")
    if eval_mode:
        module = nnx.clone(module)
        module.eval()
    graphdef, diff, rest = nnx.split(module, wrt, ...)
    if not nnx.to_flat_state(diff):
        raise InvalidArgumentError(
            f"from_nnx: the filter wrt={wrt!r} matches no variable of {type(module).__name__}"
        )
    call = _method_caller(method, type(module).__name__)

    def apply_fn(params, *inputs, **kwargs):
        merged = nnx.merge(graphdef, params[PARAMS], params[STATE])
        return call(merged, *inputs, **kwargs)

    params = {PARAMS: nnx.to_pure_dict(diff), STATE: nnx.to_pure_dict(rest)}
    return FlaxModel(params, apply_fn, [PARAMS])


def _method_caller(method, owner: str) -> Callable[..., Any]:
    if method is None:
        return lambda module, *inputs, **kwargs: module(*inputs, **kwargs)
    if isinstance(method, str):
        def call(module, *inputs, **kwargs):
            if not hasattr(module, method):
                raise InvalidArgumentError(f"method={method!r}: {owner} has no such attribute")
            return getattr(module, method)(*inputs, **kwargs)

        return call
    if callable(method):
        return method
    raise ArgumentTypeError(f"method must be None, a method name or a callable, got {method!r}")


def from_linen(
    module: Any,
    variables: Mapping[str, Any],
    *,
    differentiate: Sequence[str] = (PARAMS,),
    method: str | Callable[..., Any] | None = None,
    **apply_kwargs: Any,
) -> FlaxModel:
    """Adapt a linen module: ``apply`` with collections other than ``differentiate`` held fixed.

    Args:
      module: the ``flax.linen.Module``.
      variables: its variables, e.g. ``{"params": …, "batch_stats": …}`` from ``module.init``.
      differentiate: collections whose leaves are differentiated (default ``("params",)``).
      method: passed to ``module.apply`` (a method name or function), e.g. ``"encode_image"``.
      **apply_kwargs: fixed keyword arguments of every call, e.g. ``train=False`` so that
        batch normalization reads ``batch_stats`` instead of updating it. No collection is
        mutable: a module that tries to update one raises flax's error.

    Returns:
      :class:`FlaxModel` with ``params = variables``, ``apply_fn(variables, *inputs, **kwargs)
      = module.apply(variables, *inputs, method=method, **apply_kwargs, **kwargs)`` and
      ``grad_wrt = list(differentiate)``.
    """
    if not isinstance(variables, Mapping):
        raise ArgumentTypeError(
            f"from_linen: variables must be a dict of collections (e.g. {{'params': ..., "
            f"'batch_stats': ...}}), got {type(variables).__name__}"
        )
    if isinstance(differentiate, str):
        raise ArgumentTypeError(f"differentiate must be a sequence of collection names, e.g. [{differentiate!r}]")
    missing = [name for name in differentiate if name not in variables]
    if missing or not differentiate:
        raise InvalidArgumentError(
            f"from_linen: differentiate={list(differentiate)} names collections not in variables "
            f"(which has {sorted(variables)})"
        )

    def apply_fn(params, *inputs, **kwargs):
        return module.apply(params, *inputs, method=method, **apply_kwargs, **kwargs)

    return FlaxModel(dict(variables), apply_fn, list(differentiate))
