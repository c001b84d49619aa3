"""The factorized family as a :class:`~trakjax.projection_family.ProjectionFamily`.

``plan`` traces the output once (one example), analyses the jaxpr, resolves the
:class:`~trakjax.factorized.plan.FactorPlan` and bounds a step's per-example memory from the same
trace; ``instantiate`` draws one checkpoint's factor matrices and stages
(:func:`~trakjax.factorized.features.factor_matrices`); ``features`` is
:func:`~trakjax.factorized.features.factorized_features` for the task's output.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from trakjax import gradients, sparse_projection
from trakjax.config import Config
from trakjax.errors import InvalidArgumentError
from trakjax.factorized.analysis import analyze
from trakjax.factorized.features import (
    Factors,
    closed_activation_bytes,
    factor_matrices,
    factorized_features,
    trace_output,
)
from trakjax.factorized.plan import FactorPlan, resolve
from trakjax.projection import parameter_layout
from trakjax.projection_family import FeatureSpec, PlanRequest, ProjectionFamily
from trakjax.tasks import Task, TaskState

logger = logging.getLogger("trakjax")

NAME = "factorized"


class FactorizedDetail(NamedTuple):
    """The factorized spec's own static part: the plan, the second stage's name (``"dense"`` or
    ``"sparse"``; None when all K_fac features are kept) and its sparsity s."""

    plan: FactorPlan
    second_stage: str | None
    sparsity: int


def plan(task: Task, request: PlanRequest, config: Config) -> FeatureSpec:
    """Trace the output on one example, find its layers, fix the feature layout (one trace)."""
    result = config.result
    if request.example is None:
        raise InvalidArgumentError(
            "projection='factorized' traces the model on one example to find its layers: pass the "
            "training data (init_data) or an example"
        )
    with_aux = gradients.has_aux(task)
    output = gradients.output_fn(task, request.treedef, request.mask, request.fixed, request.aux, with_aux=with_aux)
    traced = trace_output(output, list(request.diff), request.example, request.key, has_aux=with_aux)
    closed = traced[0] if with_aux else traced
    # the sparse second stage takes the dense remainder whole (contract v4): O(s·P_rest) per example
    factor_plan = resolve(analyze(closed, len(request.paths)), list(request.paths), result.factor_dims,
                          result.requested_dim, whole_remainder=result.resolved_second_stage == "sparse")
    if not factor_plan.second_stage and result.proj_dim != "all":
        logger.info("projection='factorized': proj_dim=%s ≥ K_fac=%d, so all %d factorized features "
                    "are kept (no second projection)", result.requested_dim, factor_plan.k_fac, factor_plan.k_fac)
    stage = result.resolved_second_stage if factor_plan.second_stage else None
    detail = FactorizedDetail(factor_plan, stage, result.resolved_sparsity if stage == "sparse" else 1)
    example_bytes = closed_activation_bytes(closed, len(request.paths), plan=factor_plan)
    if stage == "sparse":  # the sketch's gather, (k, m) numbers per example
        example_bytes += 4 * factor_plan.final_dim * sparse_projection.table_width(
            factor_plan.k_fac, factor_plan.final_dim, detail.sparsity, 0)
    return FeatureSpec(NAME, result.factor_kind, request.treedef, request.mask, parameter_layout(list(request.diff)),
                       factor_plan.final_dim, int(example_bytes), config.run.chunk_rows, result.precision,
                       request.backend, detail)


def instantiate(spec: FeatureSpec, seed: int, model_id: int, matrix_cache_bytes: int) -> Factors:
    """One checkpoint's factor matrices and stages (:func:`factor_matrices`)."""
    detail = spec.detail
    return factor_matrices(detail.plan, seed=seed, model_id=model_id, kind=spec.kind,
                           matrix_cache_bytes=matrix_cache_bytes, second_stage=detail.second_stage or "dense",
                           sparsity=detail.sparsity, backend=spec.backend)


def features(task: Task, spec: FeatureSpec, arrays: Factors, diff, fixed, batch, state: TaskState):
    """``(φ (B, final_dim), f (B,), extras)``: the Kronecker-projected features of the batch;
    ``extras["aux"]`` holds the task's auxiliary outputs when it has ``output_with_aux``."""
    with_aux = gradients.has_aux(task)
    output = gradients.output_fn(task, spec.treedef, spec.mask, fixed, state.aux, with_aux=with_aux)
    result = factorized_features(output, diff, batch, state.key, spec.detail.plan, arrays, kind=spec.kind,
                                 precision=spec.precision, chunk_rows=spec.chunk_rows, backend=spec.backend,
                                 has_aux=with_aux)
    if with_aux:
        outputs, phi, out_aux = result
        return phi, outputs, {"aux": out_aux}
    outputs, phi = result
    return phi, outputs, {}


def record(spec: FeatureSpec) -> dict:
    """What the store records: P, the final k and K_fac."""
    return {"num_params": int(spec.layout.total), "proj_dim": int(spec.proj_dim),
            "k_fac": int(spec.detail.plan.k_fac)}


def scoring_arrays(spec: FeatureSpec, arrays: Factors) -> Factors:
    """All of them: the factor matrices are what a scorer needs per checkpoint."""
    del spec
    return arrays


FAMILY = ProjectionFamily(plan, instantiate, features, record, scoring_arrays, needs_example=True)
"""The factorized family (``projection="factorized"``)."""

__all__ = ["FAMILY", "NAME", "FactorizedDetail", "features", "instantiate", "plan", "record", "scoring_arrays"]
