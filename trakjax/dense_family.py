"""The dense projection family: φ = Rᵀ∇_θ f / √P with R a P × k matrix of ±1 or N(0, 1) entries
(randomness contract v1), or R = I (``"identity"``, k = P).

Per-example gradients of the differentiated leaves (:func:`trakjax.gradients.value_and_grads`),
then the dense stage of :mod:`trakjax.second_stage` on the whole gradient, keyed by
:func:`trakjax.randomness.stream_key` and run on the ``backend`` (XLA, or the Pallas kernel).
R is materialized once per checkpoint when it fits ``matrix_cache_bytes``, else generated chunk by
chunk in every step (the same entries either way).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from trakjax import gradients, randomness, second_stage
from trakjax.config import Config
from trakjax.projection import parameter_layout
from trakjax.projection_family import FeatureSpec, PlanRequest, ProjectionFamily
from trakjax.tasks import Task, TaskState

NAME = "dense"
KINDS = ("rademacher", "normal", "identity")


def _stage(spec: FeatureSpec) -> second_stage.StageSpec:
    return second_stage.StageSpec("dense", spec.kind, spec.layout, spec.proj_dim, 1, spec.chunk_rows,
                                  spec.precision, spec.backend)


def plan(task: Task, request: PlanRequest, config: Config) -> FeatureSpec:
    """The dense spec: the differentiated leaves' layout, k, and a step's per-example gradient bytes."""
    del task  # the dense family needs no trace
    result = config.result
    layout = parameter_layout(list(request.diff))
    grad_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in request.diff)
    return FeatureSpec(NAME, result.projection, request.treedef, request.mask, layout,
                       result.projection_dim(layout.total), int(grad_bytes), config.run.chunk_rows,
                       result.precision, request.backend)


def instantiate(spec: FeatureSpec, seed: int, model_id: int, matrix_cache_bytes: int) -> second_stage.DenseArrays:
    """R's key (contract v1's ``stream_key``) and, when it fits the budget on the XLA backend, R
    materialized per leaf; nothing for the identity."""
    if spec.kind == "identity":
        return second_stage.DenseArrays(None, None)
    key = randomness.stream_key(seed, model_id, spec.kind)
    return second_stage.DENSE.instantiate(_stage(spec), seed, model_id, key, matrix_cache_bytes)


def features(task: Task, spec: FeatureSpec, arrays: second_stage.DenseArrays, diff, fixed, batch,
             state: TaskState):
    """``(φ (B, k), f (B,), extras)``: per-example gradients, then R_mᵀ g / √P; ``extras["aux"]``
    holds the task's auxiliary outputs when it has ``output_with_aux``."""
    with_aux = gradients.has_aux(task)
    values, grads = gradients.value_and_grads(task, spec.treedef, spec.mask, diff, fixed, batch, state,
                                              with_aux=with_aux)
    phi = second_stage.DENSE.apply(_stage(spec), arrays, grads, 1.0 / math.sqrt(spec.layout.total))
    if with_aux:
        outputs, out_aux = values
        return phi, outputs, {"aux": out_aux}
    return phi, values, {}


def record(spec: FeatureSpec) -> dict:
    """What the store records: P and k."""
    return {"num_params": int(spec.layout.total), "proj_dim": int(spec.proj_dim)}


def scoring_arrays(spec: FeatureSpec, arrays: second_stage.DenseArrays) -> second_stage.DenseArrays:
    """R's key only: a scorer generates R chunk by chunk rather than hold it per checkpoint."""
    del spec
    return second_stage.DenseArrays(arrays.key, None)


FAMILY = ProjectionFamily(plan, instantiate, features, record, scoring_arrays)
"""The dense family (``projection`` ``"rademacher"``, ``"normal"`` or ``"identity"``)."""

__all__ = ["FAMILY", "KINDS", "NAME", "features", "instantiate", "plan", "record", "scoring_arrays"]
