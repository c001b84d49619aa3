"""Featurization: per-example gradients of the model output, projected to k dimensions.

For checkpoint θ_m and example z_i this computes ``φ_i = R_mᵀ ∇_θ f(z_i; θ_m) / √P`` (or a
factorized family's features) together with f(z_i; θ_m) and, for training examples, the
output-to-loss term ``q_i = −∂L/∂f`` and the curvature h.

* :func:`plan_features` plans once per run: the projection family's ``plan``
  (:mod:`trakjax.projection_family`, :mod:`trakjax.families`) on the checkpoint's structure,
  a hashable :class:`~trakjax.projection_family.FeatureSpec` keyed by its :class:`StructureKey`.
* :func:`prepare_checkpoint` does the per-checkpoint work once (parameter split, the task's
  auxiliary state, the family's randomness: R's key and R materialized when it fits the budget,
  or the factor matrices), reusing the run's spec when the structure matches.
* :func:`per_example_features` is the one per-example step, pure and jit-compatible; the
  featurize step and the jitted scorer (:mod:`trakjax.scoring_fn`) both run it.
* :func:`featurize_batch` featurizes batches of examples with one jitted step, micro-batched so
  that a micro-batch of per-example memory fits ``grad_memory_bytes``; :func:`featurize` runs it
  over a whole data set.
* Parameter selection and the output function live in :mod:`trakjax.gradients` and are
  re-exported here (:func:`select_parameters`, :func:`per_example_grads`, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import backends, compiler_options, factorized, families, randomness
from trakjax import data as data_lib
from trakjax import projection as projection_lib
from trakjax import sharding as sharding_lib
from trakjax.config import (
    AUTO_PROJECTION,
    DEFAULT_GRAD_MEMORY_BYTES,
    DEFAULT_MATRIX_CACHE_BYTES,
    DEFAULT_SECOND_STAGE,
    SECOND_STAGES,
    Config,
    GradWrt,
    check_choice,
)
from trakjax.errors import InvalidArgumentError, NumericalError
from trakjax.gradients import (
    merge_parameters,
    output_fn,
    parameter_paths,
    per_example_grads,
    select_parameters,
    split_parameters,
    task_output_fn,
)
from trakjax.projection_family import FeatureSpec, PlanRequest
from trakjax.tasks import Task, TaskState, describe_shapes

logger = logging.getLogger("trakjax")

TRAIN_SPLIT = 0
TARGET_SPLIT = 1

__all__ = [
    "DEFAULT_GRAD_MEMORY_BYTES", "DEFAULT_MATRIX_CACHE_BYTES", "TARGET_SPLIT", "TRAIN_SPLIT",
    "BatchFeatures", "Checkpoint", "FeatureSpec", "Features", "GradWrt", "StructureKey",
    "choose_projection", "describe_factorization", "featurize", "featurize_batch", "merge_parameters",
    "one_example", "output_fn", "parameter_paths", "per_example_features", "per_example_grads",
    "plan_features", "prepare_checkpoint", "resolve_auto_projection", "select_parameters",
    "split_parameters", "structure_difference", "structure_key", "task_key", "task_output_fn",
]

def per_example_features(task: Task, spec: FeatureSpec, arrays, diff, fixed, batch, state: TaskState):
    """The per-example step: ``(φ (B, k) float32, outputs (B,), extras)``; pure and jit-compatible.

    The family that planned ``spec`` computes it (:mod:`trakjax.families`): the dense family
    φ_i = R_mᵀ ∇_θ f(z_i; θ_m) / √P, the factorized family the Kronecker-projected features.
    ``arrays`` is the checkpoint's randomness (the family's ``instantiate``); ``diff`` and
    ``fixed`` are the differentiated and fixed leaves; ``extras`` is the family's dict of more
    results of the same pass.
    """
    return families.family_of(spec).features(task, spec, arrays, diff, fixed, batch, state)


def describe_factorization(
    task: Task,
    params,
    example,
    *,
    grad_wrt: GradWrt = None,
    factor_dims=None,
    proj_dim: int | str = 2048,
    second_stage: str | None = None,
    state: TaskState | None = None,
) -> factorized.FactorizationReport:
    """How ``projection="factorized"`` treats every differentiated leaf of a task; print it.

    Each leaf is factorized (its sides' factor sizes, random or identity, slices for stacked
    layers or heads, a folded bias, the sites it is used at) or goes to the dense remainder
    (with the reason: used element-wise, inside a custom rule, a partial slice, ...).

    Args:
      task: a :class:`~trakjax.tasks.Task`.
      params: one checkpoint's parameter pytree.
      example: ONE example (no batch axis).
      grad_wrt: see :func:`select_parameters`.
      factor_dims: an int for both sides or a pair (k_in, k_out); ``None``: sized from
        ``proj_dim`` as the featurization does (:func:`trakjax.factorized.plan.auto_factor_size`).
      proj_dim: the final dimension or ``"all"``.
      second_stage: ``"sparse"`` or ``"dense"`` (``None``: the default,
        :data:`trakjax.config.DEFAULT_SECOND_STAGE`); the sparse stage keeps the dense remainder
        whole.
      state: :class:`~trakjax.tasks.TaskState` (its ``aux`` for tasks with ``init``; a key is
        made up for tasks that sample).

    Returns:
      A :class:`~trakjax.factorized.FactorizationReport` (``str()`` is a table). Unlike the
      featurization it does not raise when nothing can be factorized: the table says why.
    """
    state = TaskState() if state is None else state
    mask = select_parameters(params, grad_wrt)
    output, diff = task_output_fn(task, params, mask, state)
    paths = [p for p, m in zip(factorized.canonical_paths(params), mask, strict=True) if m]
    key = state.key if state.key is not None or not task.uses_key else jax.random.key(0)
    _check_one_example(task, params, example, TaskState(state.aux, key))
    stage = DEFAULT_SECOND_STAGE if second_stage is None else check_choice("second_stage", second_stage,
                                                                          SECOND_STAGES)
    return factorized.describe(output, diff, example, key, paths=paths, factor_dims=factor_dims,
                               proj_dim=proj_dim, whole_remainder=stage == "sparse")


def _check_one_example(task: Task, params, example, state: TaskState) -> None:
    """Raise unless ``task.output`` takes ``example`` as ONE example and returns a scalar.

    A batch (a leading example axis) makes the output a vector or fails inside the model; the
    first row is not taken for the caller, since an example may have a leading axis of its own.
    """
    shapes = describe_shapes(example)
    advice = ("describe_factorization takes ONE example, without the batch axis: pass e.g. "
              "jax.tree.map(lambda x: x[0], batch)")
    try:
        out = jax.eval_shape(lambda p, z: task.output(p, z, state), params, example)
    except Exception as err:  # noqa: BLE001  (any failure to trace is reported with the shapes)
        lines = str(err).strip().splitlines()
        raise InvalidArgumentError(
            f"task {task.name!r}: task.output fails on example of shapes {shapes} "
            f"({type(err).__name__}: {lines[0] if lines else ''}); {advice}") from err
    if jax.tree_util.tree_structure(out).num_leaves != 1 or np.shape(jax.tree_util.tree_leaves(out)[0]) != ():
        raise InvalidArgumentError(
            f"task {task.name!r}: task.output returns shape {jax.tree_util.tree_map(np.shape, out)} for "
            f"example of shapes {shapes}, not a scalar: is it a batch? {advice}")


AUTO_FACTORIZED_SHARE = 0.5
"""``projection="auto"`` picks the factorized family when the factorizable leaves (and the biases
folded into them) hold more than this share of the differentiated parameters."""


def choose_projection(
    task: Task, params, example, *, grad_wrt: GradWrt = None, state: TaskState | None = None
) -> tuple[str, float]:
    """What ``projection="auto"`` resolves to: ``("factorized" or "rademacher", share)``.

    ``share`` is the fraction of differentiated parameters in leaves the factorized family
    factorizes (:func:`describe_factorization`: one trace of one example); above
    :data:`AUTO_FACTORIZED_SHARE` the factorized family, else the dense Rademacher projection.
    Without an example (nothing to trace) it is the dense family, share 0.
    """
    if example is None:
        return "rademacher", 0.0
    return _family_of_plan(describe_factorization(task, params, example, grad_wrt=grad_wrt, state=state).plan)


def _family_of_plan(plan) -> tuple[str, float]:
    """(family, share) of :func:`choose_projection` from a factorization plan."""
    covered = sum(math.prod(leaf.shape) for leaf in plan.leaves if leaf.treatment in ("factorized", "bias"))
    share = covered / max(plan.num_params, 1)
    return ("factorized" if share > AUTO_FACTORIZED_SHARE else "rademacher"), float(share)


def resolve_auto_projection(task: Task, params, config: Config, example=None, aux=None, init_data=None) -> Config:
    """``config`` with ``projection="auto"`` resolved (:func:`choose_projection`) and, for the
    factorized family, an unset ``factor_dims`` sized from ``proj_dim``
    (:func:`trakjax.factorized.plan.auto_factor_size`), both logged; unchanged otherwise.
    ``example`` defaults to ``init_data``'s first and ``aux`` to ``task.init(params, init_data)``."""
    result = config.result
    unsized = result.projection == "factorized" and result.factor_dims is None
    if result.projection != "auto" and not unsized:
        return config
    if example is None and init_data is not None:
        example = one_example(init_data)
    if aux is None:
        aux = _task_state(task, params, init_data)
    state = TaskState(aux, jax.random.key(0) if task.uses_key else None)
    plan = None  # one trace serves both decisions
    if example is not None:
        plan = describe_factorization(task, params, example, grad_wrt=result.grad_wrt,
                                      factor_dims=result.factor_dims, proj_dim=result.requested_dim,
                                      state=state).plan
    if result.projection == "auto":
        family, share = _family_of_plan(plan) if plan is not None else ("rademacher", 0.0)
        logger.info("projection='auto' resolved to %r: factorizable leaves hold %.1f%% of the differentiated "
                    "parameters", family, 100 * share)
        result = result.resolve_projection(family)
    if result.projection == "factorized" and result.factor_dims is None and plan is not None:
        logger.info("factor_dims sized from proj_dim=%s: %s (K_fac = %d)", result.requested_dim,
                    plan.factor_dims, plan.k_fac)
        result = dataclasses.replace(result, factor_dims=plan.factor_dims)
    return Config(result, config.run, config.given_settings())


# --------------------------------------------------------------------------- per-checkpoint featurizer


class Checkpoint(NamedTuple):
    """Everything :func:`featurize_batch` needs for one checkpoint, computed once.

    Attributes:
      model_id: the checkpoint's id (selects its projection matrix).
      seed: the run's seed (the projection's, and the task's PRNG keys).
      params: the full parameter pytree.
      mask: per-leaf differentiation flags.
      diff, fixed: the differentiated and fixed leaves.
      arrays: the family's randomness for this checkpoint (its ``instantiate``: R's key and
        materialized blocks, or the factor matrices).
      aux: the task's auxiliary state for this checkpoint.
      micro_batch: examples per jitted step (a multiple of the mesh size).
      devices: number of devices the steps shard examples over.
      spec: the run's :class:`~trakjax.projection_family.FeatureSpec` (planned once per run).
      train_step: the jitted step ``(diff, fixed, batch, aux, indices, split_key, arrays) ->
        (features, outputs, out_to_loss, output_offset, curvature)``.
      target_step: the same without the out-to-loss term (its q is zeros).
    """

    model_id: int
    seed: int
    params: Any
    mask: tuple[bool, ...]
    diff: list
    fixed: list
    arrays: Any
    aux: Any
    micro_batch: int
    devices: int
    spec: FeatureSpec
    train_step: Callable
    target_step: Callable

    @property
    def proj_dim(self) -> int:
        """The final k."""
        return self.spec.proj_dim

    @property
    def layout(self) -> projection_lib.ParameterLayout:
        """The differentiated leaves' layout (P = ``layout.total``)."""
        return self.spec.layout

    @property
    def record(self) -> dict:
        """What the store records of the featurization (the family's ``record``)."""
        return families.family_of(self.spec).record(self.spec)


def task_key(seed: int, model_id: int, split: int) -> jax.Array:
    """The base PRNG key of a task's sampling for one checkpoint and split (train or target).

    Example ``i`` gets ``jax.random.fold_in(task_key(...), i)``, so a sample never depends on
    the batch it was computed in.
    """
    key = jax.random.key(int(seed) & 0xFFFFFFFF)
    key = jax.random.fold_in(key, int(seed) >> 32)
    key = jax.random.fold_in(key, int(model_id))
    return jax.random.fold_in(key, int(split))


def example_keys(task: Task, split_key, indices):
    """(B,) per-example PRNG keys ``fold_in(split_key, i)``, or ``None`` if the task samples nothing."""
    if not task.uses_key:
        return None
    return jax.vmap(lambda i: jax.random.fold_in(split_key, i))(indices)


@functools.lru_cache(maxsize=64)
def _make_step(task: Task, spec: FeatureSpec, mesh, with_out_to_loss: bool):
    """A jitted featurize step for one static configuration (shared across checkpoints).

    With a mesh of several devices the step is ``shard_map``-ped: the batch and its indices are
    sharded over the ``"data"`` axis, parameters, task state and projection inputs replicated.
    """

    def step(diff, fixed, batch, aux, indices, split_key, arrays):
        state = TaskState(aux, example_keys(task, split_key, indices))
        features, outputs, extras = per_example_features(task, spec, arrays, diff, fixed, batch, state)
        params = merge_parameters(spec.treedef, spec.mask, diff, fixed)
        curvature_from_outputs = None
        if with_out_to_loss and task.from_outputs is not None:  # one model pass per batch
            from_pass = (outputs, batch, state, extras["aux"]) if "aux" in extras else (outputs, batch, state)
            q, curvature_from_outputs = task.from_outputs(*from_pass)
            q = q.astype(jnp.float32)
        elif with_out_to_loss:
            q = task.out_to_loss(params, batch, state).astype(jnp.float32)
        else:
            q = jnp.zeros(outputs.shape, jnp.float32)
        if q.shape != (features.shape[0],):
            raise InvalidArgumentError(
                f"task {task.name!r}: out_to_loss must return a (B,) array; got out_to_loss shape "
                f"{q.shape} for a batch of {features.shape[0]}"
            )
        offset = curvature = jnp.zeros(outputs.shape, jnp.float32)
        if with_out_to_loss and task.ridge_terms is not None:
            offset, curvature = task.ridge_terms(params, batch, state, q)
            if curvature_from_outputs is not None:  # (ridge_terms' own h is then dead code)
                curvature = curvature_from_outputs
        return (features, outputs.astype(jnp.float32), q, jnp.broadcast_to(offset, q.shape).astype(jnp.float32),
                jnp.broadcast_to(curvature, q.shape).astype(jnp.float32))

    options = compiler_options.featurize_step_options(sharding_lib.mesh_platform(mesh))
    if sharding_lib.mesh_size(mesh) == 1:
        return jax.jit(step, compiler_options=options)
    rows, same = jax.sharding.PartitionSpec(sharding_lib.DATA_AXIS), jax.sharding.PartitionSpec()
    return jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(same, same, rows, same, rows, same, same),
            out_specs=(rows,) * 5, check_vma=False,
        ),
        compiler_options=options,
    )


def _task_state(task: Task, params, init_data):
    """The task's per-checkpoint auxiliary state (``task.init(params, train)``), or None."""
    if task.init is None:
        return None
    if init_data is None:
        raise InvalidArgumentError(
            f"task {task.name!r} has an init function (per-checkpoint state) and needs "
            "init_data: the training data"
        )
    return task.init(params, init_data)


def _micro_batch(config: Config, example_bytes: int, devices: int, share: int) -> int:
    """Examples per jitted step: the batch size, capped so that a micro-batch of per-example
    memory (gradients, or activations for the factorized family) fits the per-device budget, and
    a multiple of the device count."""
    per_device = max(1, config.run.grad_memory_bytes // share // max(example_bytes, 1))
    micro = int(min(sharding_lib.round_up(config.run.batch_size, devices), per_device * devices))
    return sharding_lib.round_up(micro, devices)


def one_example(data) -> Any:
    """The first example of a data set (arrays, or a callable's first batch) as
    ``jax.ShapeDtypeStruct`` leaves without the example axis: what the factorization traces.
    Dtypes are JAX's canonical ones (int64 labels read as int32 without ``jax_enable_x64``, as
    the model sees them)."""
    batch = data if not callable(data) else next(iter(data()))
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], data_lib.canonical_dtype(np.asarray(x[:1]).dtype)),
        batch)


class StructureKey(NamedTuple):
    """What a :class:`~trakjax.projection_family.FeatureSpec` depends on: structure, not weights.

    Two checkpoints with equal keys share one plan (and one compiled step). Each field is
    hashable: treedefs, and (shape, dtype) pairs for arrays (a bfloat16 checkpoint traces other
    casts than a float32 one).
    """

    parameters: Any
    differentiated: tuple
    leaves: tuple
    task_state: tuple
    example: tuple
    key: tuple
    settings: tuple


_PLAN_SETTINGS = ("projection", "proj_dim", "factor_dims", "factor_kind", "second_stage", "sparsity", "precision")


def _abstract_tree(tree) -> tuple:
    """(treedef, ((shape, dtype) or the value's type name for each leaf)): hashable."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        (tuple(np.shape(x)), str(x.dtype)) if hasattr(x, "dtype") else type(x).__name__ for x in leaves)


def structure_key(params, mask, config: Config, example=None, aux=None, key=None) -> StructureKey:
    """The :class:`StructureKey` of one checkpoint's planning inputs (no trace, no weights read)."""
    result = config.result
    settings = tuple(repr(getattr(result, name)) for name in _PLAN_SETTINGS)
    settings += (repr(config.run.chunk_rows), backends.resolve(config.run.backend))
    return StructureKey(jax.tree_util.tree_structure(params), tuple(mask), _abstract_tree(params)[1],
                        _abstract_tree(aux), _abstract_tree(example), _abstract_tree(key), settings)


def structure_difference(planned: StructureKey, found: StructureKey) -> str:
    """What differs between two :class:`StructureKey` (empty when they are equal), for messages."""
    names = {"parameters": "the parameters' tree structure", "differentiated": "the differentiated leaves (grad_wrt)",
             "leaves": "the parameters' shapes or dtypes", "task_state": "the task's state (task.init)",
             "example": "the example's structure, shapes or dtypes", "key": "the task's PRNG key",
             "settings": "the projection settings"}
    parts = []
    for name in StructureKey._fields:
        before, now = getattr(planned, name), getattr(found, name)
        if before != now:
            parts.append(f"{names[name]}: {_short(before)} planned, {_short(now)} now")
    return "; ".join(parts)


def _short(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _example_key(task: Task):
    """The key the plan traces with (a made-up one for tasks that sample), or None."""
    return jax.random.key(0) if task.uses_key else None


def plan_features(task: Task, params, config: Config, example=None, aux=None) -> FeatureSpec:
    """Plan the featurization once per run: the family's ``plan`` on the checkpoint's structure.

    Args:
      task: the :class:`~trakjax.tasks.Task`.
      params: a checkpoint's parameter pytree (arrays or ``jax.ShapeDtypeStruct``: only
        structure, shapes and dtypes matter, and the fixed leaves the output closes over).
      config: the run's :class:`~trakjax.Config`, its projection resolved (not ``"auto"``).
      example: ONE example (``jax.ShapeDtypeStruct`` leaves), for families that trace the model.
      aux: the task's per-checkpoint state.

    Returns:
      The :class:`~trakjax.projection_family.FeatureSpec`; pass it to :func:`prepare_checkpoint`
      for every checkpoint of the run, so that none is traced or planned again.
    """
    result = config.result
    if result.projection == AUTO_PROJECTION:
        raise InvalidArgumentError("plan_features needs a resolved projection: call resolve_auto_projection first")
    mask = tuple(select_parameters(params, result.grad_wrt))
    diff, fixed = split_parameters(params, mask)
    key = _example_key(task)
    paths = tuple(p for p, m in zip(factorized.canonical_paths(params), mask, strict=True) if m)
    request = PlanRequest(jax.tree_util.tree_structure(params), mask,
                          tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in diff),
                          tuple(fixed), paths, example, key, aux, backends.resolve(config.run.backend))
    spec = families.family_for(result.projection).plan(task, request, config)
    return spec._replace(structure=structure_key(params, mask, config, example, aux, key))


def _spec_for(task: Task, params, mask, config: Config, example, aux, spec: FeatureSpec | None) -> FeatureSpec:
    """``spec`` when it was planned for this checkpoint's structure, else a new plan (logged)."""
    if spec is not None:
        found = structure_key(params, mask, config, example, aux, _example_key(task))
        if spec.structure == found:
            return spec
        logger.info("this checkpoint differs from the run's plan (%s): planning it anew",
                    structure_difference(spec.structure, found))
    return plan_features(task, params, config, example, aux)


def prepare_checkpoint(
    task: Task,
    params,
    config: Config,
    model_id: int = 0,
    init_data: Any = None,
    example: Any = None,
    *,
    spec: FeatureSpec | None = None,
) -> Checkpoint:
    """Do the per-checkpoint work once: split parameters, task state, the family's randomness.

    Args:
      task: the :class:`~trakjax.tasks.Task`.
      params: the checkpoint's parameter pytree.
      config: the run's :class:`~trakjax.Config`.
      model_id: the checkpoint's id in [0, 2³²); it selects the projection matrix.
      init_data: the training data (pytree with a leading example axis) handed to
        ``task.init`` when the task has one; its first example also serves ``example``.
      example: one example (no example axis; arrays or ``jax.ShapeDtypeStruct``) for the
        factorized family to trace the model on (default: ``init_data``'s first).
      spec: the run's plan (:func:`plan_features`, or an earlier checkpoint's ``spec``): reused
        when this checkpoint has its structure, so that nothing is traced again; planned here
        otherwise.

    Returns:
      A :class:`Checkpoint` for :func:`featurize_batch`.
    """
    result, run = config.result, config.run
    randomness.check_seed_and_model_id(result.seed, model_id)
    mask = tuple(select_parameters(params, result.grad_wrt))
    diff, fixed = split_parameters(params, mask)
    diff = [jnp.asarray(x) for x in diff]
    fixed = [jnp.asarray(x) if hasattr(x, "shape") else x for x in fixed]
    mesh = run.mesh
    devices = sharding_lib.mesh_size(mesh)
    # Simulated CPU devices of one process share host memory: split the budgets between them.
    share = devices if sharding_lib.cpu_devices_share_memory(mesh) else 1
    aux = _task_state(task, params, init_data)
    if example is None and init_data is not None and families.needs_example(result.projection):
        example = one_example(init_data)
    if result.projection == AUTO_PROJECTION:  # callers resolve once per run; this resolves a direct call
        config = resolve_auto_projection(task, params, config, example, aux)
    spec = _spec_for(task, params, mask, config, example, aux, spec)
    family = families.family_of(spec)
    arrays = family.instantiate(spec, result.seed, int(model_id), run.matrix_cache_bytes // share)
    micro_batch = _micro_batch(config, spec.example_bytes, devices, share)
    if devices > 1:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        diff, fixed, arrays, aux = jax.device_put((diff, fixed, arrays, aux), replicated)
    step_mesh = mesh if devices > 1 else None
    return Checkpoint(
        model_id=int(model_id), seed=result.seed, params=params, mask=mask, diff=diff, fixed=fixed,
        arrays=arrays, aux=aux, micro_batch=micro_batch, devices=devices, spec=spec,
        train_step=_make_step(task, spec, step_mesh, True),
        target_step=_make_step(task, spec, step_mesh, False),
    )


class BatchFeatures(NamedTuple):
    """Featurized examples: ``features`` (B, k) φ, ``outputs`` (B,) f, ``out_to_loss`` (B,) q;
    for training examples of tasks with ``ridge_terms``, ``output_offset`` (B,) f₀ and
    ``curvature`` (B,) h (zeros otherwise; :mod:`trakjax.regularization`)."""

    features: np.ndarray
    outputs: np.ndarray
    out_to_loss: np.ndarray
    output_offset: np.ndarray | None = None
    curvature: np.ndarray | None = None


def _padded_size(n: int, micro_batch: int, devices: int) -> int:
    """Step size for ``n`` examples: a power of two (few compiled shapes), a multiple of the
    device count, at most ``micro_batch``."""
    size = 1
    while size < n:
        size *= 2
    return sharding_lib.round_up(min(size, micro_batch), devices)


def check_finite(features, outputs, q, indices, model_id: int, with_out_to_loss: bool) -> None:
    """Raise :class:`~trakjax.errors.NumericalError` naming the examples whose φ, f or q is NaN/Inf."""
    bad = ~np.isfinite(features).all(axis=1) | ~np.isfinite(outputs)
    if with_out_to_loss:
        bad |= ~np.isfinite(q)
    if bad.any():
        where = indices[bad]
        raise NumericalError(
            f"non-finite (NaN or Inf) per-example gradient, output or out-to-loss term for "
            f"{where.size} example(s) at checkpoint model_id={model_id}, "
            f"example indices {where[:10].tolist()}{' ...' if where.size > 10 else ''}"
        )


def featurize_batch(
    task: Task,
    checkpoint: Checkpoint,
    batch,
    indices=None,
    *,
    split: int = TRAIN_SPLIT,
    with_out_to_loss: bool = True,
) -> BatchFeatures:
    """Featurize one batch of examples at one prepared checkpoint.

    Args:
      task: the task ``checkpoint`` was prepared with.
      checkpoint: from :func:`prepare_checkpoint`.
      batch: pytree of arrays with a leading example axis B.
      indices: (B,) global example indices (for task PRNG keys and error messages); default
        ``0 .. B − 1``.
      split: :data:`TRAIN_SPLIT` or :data:`TARGET_SPLIT` (targets get other PRNG keys).
      with_out_to_loss: compute q (train examples); targets skip it.

    Returns:
      :class:`BatchFeatures` as float32 numpy arrays.

    Raises:
      NumericalError: if any per-example gradient, output or q is NaN or Inf, naming the example
        indices and the checkpoint.
    """
    n = data_lib.num_examples(batch, "batch")
    indices = np.arange(n) if indices is None else np.asarray(indices).reshape(-1)
    if indices.shape[0] != n:
        raise InvalidArgumentError(f"indices has {indices.shape[0]} entries but the batch has {n} examples")
    if task.validate is not None:
        task.validate(checkpoint.params, batch)
    step = checkpoint.train_step if with_out_to_loss else checkpoint.target_step
    split_key = task_key(checkpoint.seed, checkpoint.model_id, split)
    parts = []
    micro = checkpoint.micro_batch
    for start in range(0, n, micro):
        stop = min(start + micro, n)
        size = _padded_size(stop - start, micro, checkpoint.devices)
        part = data_lib.pad_batch(data_lib.take(batch, start, stop), size)
        part_indices = np.concatenate(
            [indices[start:stop], np.repeat(indices[stop - 1 : stop], size - (stop - start))]
        ).astype(np.int32)
        out = step(checkpoint.diff, checkpoint.fixed, part, checkpoint.aux, part_indices, split_key,
                   checkpoint.arrays)
        parts.append(tuple(np.asarray(x)[: stop - start] for x in out))
    features, outputs, q, offset, curvature = (np.concatenate(p) for p in zip(*parts, strict=True))
    check_finite(features, outputs, q, indices, checkpoint.model_id, with_out_to_loss)
    return BatchFeatures(features, outputs, q, offset, curvature)


class Features(NamedTuple):
    """Featurized data set: ``features`` (N, k), ``outputs`` (N,), ``out_to_loss`` (N,), and
    ``output_offset``, ``curvature`` (N,) as in :class:`BatchFeatures`; float32."""

    features: np.ndarray
    outputs: np.ndarray
    out_to_loss: np.ndarray
    output_offset: np.ndarray | None = None
    curvature: np.ndarray | None = None


def featurize(
    task: Task,
    checkpoint: Checkpoint,
    data,
    *,
    batch_size: int = 64,
    split: int = TRAIN_SPLIT,
    with_out_to_loss: bool = True,
    index_offset: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Features:
    """Featurize a whole data set at one prepared checkpoint.

    Args:
      task: the task ``checkpoint`` was prepared with.
      checkpoint: from :func:`prepare_checkpoint`.
      data: a pytree of arrays with a leading example axis, or a zero-argument callable
        returning an iterator of such batches.
      batch_size: examples per batch when ``data`` is arrays.
      split, with_out_to_loss: as in :func:`featurize_batch`.
      index_offset: global index of ``data``'s first example (when ``data`` is one slice of a
        larger set, e.g. one process's share); it keys the task's sampling.
      progress: called with the number of examples after each batch (for progress bars).

    Returns:
      :class:`Features` with N rows, in data order.
    """
    parts = []
    for start, batch in data_lib.iterate_batches(data, batch_size):
        n = data_lib.num_examples(batch, "batch")
        parts.append(
            featurize_batch(
                task, checkpoint, batch, np.arange(index_offset + start, index_offset + start + n),
                split=split, with_out_to_loss=with_out_to_loss,
            )
        )
        if progress is not None:
            progress(n)
    return Features(*(np.concatenate(p) for p in zip(*parts, strict=True)))
