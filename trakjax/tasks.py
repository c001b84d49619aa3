"""Tasks: the model output function f(z; θ) and the output-to-loss term Q = −∂L/∂f.

A :class:`Task` is a NamedTuple of pure functions, in the spirit of optax's
``GradientTransformation``. Applying TRAK to a new task means writing these two functions
(Park et al., 2023, §3; the reference library's ``AbstractModelOutput``):

* ``output(params, example, state) -> scalar``: f for ONE example (no batch axis). trakjax
  differentiates it with ``jax.vmap(jax.grad(output))``.
* ``out_to_loss(params, batch, state) -> (B,)``: Q for a batch, with the reference's sign
  convention (classification gives 1 − p). Derive it analytically where you can; otherwise
  :func:`from_loss` derives it by autodiff of the loss written as a function of the output scalar.

``state`` is a :class:`TaskState`: ``aux`` is per-checkpoint auxiliary state that ``init(params,
data)`` computes once per checkpoint (an embedding bank, for example), and ``key`` is a PRNG key
for tasks that sample (one key per example, derived from the example's index, so results do not
depend on batch boundaries; a (B,) batch of keys in ``out_to_loss``). Collections held fixed, such
as flax's ``batch_stats``, stay inside ``params`` and are left out of ``grad_wrt``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TaskState(NamedTuple):
    """What a task sees besides parameters and data: per-checkpoint ``aux`` and a PRNG ``key``."""

    aux: Any = None
    key: Any = None


class Task(NamedTuple):
    """A TRAK task: the model output function and its output-to-loss term.

    Attributes:
      output: ``(params, example, state) -> ()`` the model output f(z; θ) of one example.
      out_to_loss: ``(params, batch, state) -> (B,)`` Q = −∂L/∂f for each example of a batch.
      init: optional ``(params, data) -> aux``, run once per checkpoint on the training data
        (a pytree of arrays with a leading example axis) before featurizing or scoring.
      uses_key: whether ``output``/``out_to_loss`` read ``state.key``.
      validate: optional ``(params, batch) -> None`` host-side check of one batch (shapes, label
        ranges); raises ``ValueError`` with the function, shapes and valid range.
      name: a short name for messages.
    """

    output: Callable[..., jax.Array]
    out_to_loss: Callable[..., jax.Array]
    init: Callable[..., Any] | None = None
    uses_key: bool = False
    validate: Callable[..., None] | None = None
    name: str = "custom"


def _label_range_check(name: str, apply_fn, params, images, labels) -> None:
    """Check logits are (B, C) and labels are integers in [0, C), using only shapes where possible."""
    logits = jax.eval_shape(apply_fn, params, images)
    batch = np.shape(labels)[0] if np.ndim(labels) else None
    if len(logits.shape) != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"{name}: apply_fn(params, images) must return logits of shape (B, num_classes) = "
            f"({batch}, C); got {tuple(logits.shape)} for images of shape {tuple(np.shape(images))}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name}: labels must be a (B,) integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    num_classes = logits.shape[1]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name}: labels must be in [0, {num_classes}) for logits of shape "
            f"{tuple(logits.shape)}; got {labels[bad][:5].tolist()} at batch positions "
            f"{np.flatnonzero(bad)[:5].tolist()}"
        )


def classification_margin(logits: jax.Array, label) -> jax.Array:
    """logit[y] − logsumexp(logits without y) = log p/(1 − p), for one (C,) logit vector."""
    others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
    return logits[label] - jax.nn.logsumexp(others)


def image_classification(
    apply_fn: Callable[[Any, jax.Array], jax.Array], temperature: float = 1.0
) -> Task:
    """Multiclass classification, as in the TRAK paper and the reference library.

    Examples are ``(image, label)``; ``apply_fn(params, images) -> (B, C) logits`` on a batch.

    * output: the margin f = logit_y − log Σ_{j≠y} exp(logit_j) = log p/(1 − p).
    * out_to_loss: Q = 1 − p_y with p = softmax(logits / temperature). For temperature 1 this is
      exactly −∂L/∂f of the cross-entropy L = log(1 + e^{−f}). As in the reference, the
      temperature enters Q only.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def output(params, example, state):
        del state
        image, label = example
        logits = apply_fn(params, image[None])[0]
        return classification_margin(logits.astype(jnp.float32), label)

    def out_to_loss(params, batch, state):
        del state
        images, labels = batch
        logits = apply_fn(params, images).astype(jnp.float32)
        probs = jax.nn.softmax(logits / temperature, axis=-1)
        return 1.0 - jnp.take_along_axis(probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]

    def validate(params, batch):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(
                "image_classification: each batch must be a pair (images, labels), got "
                f"{type(batch).__name__}"
            )
        _label_range_check("image_classification", apply_fn, params, batch[0], batch[1])

    return Task(output, out_to_loss, validate=validate, name="image_classification")


def from_loss(
    output: Callable[..., jax.Array],
    loss: Callable[..., jax.Array],
    *,
    init: Callable[..., Any] | None = None,
    uses_key: bool = False,
    validate: Callable[..., None] | None = None,
    name: str = "from_loss",
) -> Task:
    """A task whose Q is derived by autodiff: Q = −∂L/∂f, with L written as a function of f.

    This is the fallback of the reference's documentation for tasks with no analytic Q.

    Args:
      output: ``(params, example, state) -> ()``, the model output f of one example.
      loss: ``(f, example, state) -> ()``, the training loss of one example as a function of
        the output scalar f (e.g. ``lambda f, ex, s: jnp.log1p(jnp.exp(-f))`` for
        classification with the margin output).
      init, uses_key, validate, name: as in :class:`Task`.
    """

    def out_to_loss(params, batch, state):
        def one(example, key):
            example_state = TaskState(state.aux, key)
            f = output(params, example, example_state)
            return -jax.grad(loss)(f, example, example_state)

        keys = state.key
        if keys is None:
            return jax.vmap(lambda ex: one(ex, None))(batch)
        return jax.vmap(one)(batch, keys)

    return Task(output, out_to_loss, init=init, uses_key=uses_key, validate=validate, name=name)
