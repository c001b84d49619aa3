"""Featurization: per-example gradients of the model output, projected to k dimensions.

For checkpoint θ_m and example z_i this computes ``φ_i = R_mᵀ ∇_θ f(z_i; θ_m) / √P`` together
with f(z_i; θ_m) and, for training examples, the output-to-loss term ``q_i = −∂L/∂f``.

* :func:`select_parameters` turns ``grad_wrt`` into a mask over the parameter pytree. Only the
  selected leaves are differentiated: the rest are closed over as constants, so XLA never
  computes their gradients.
* :func:`per_example_grads` is ``jax.vmap(jax.value_and_grad(output))`` over a batch.
* :func:`per_example_features` is the one per-example step, pure and jit-compatible: gradients
  then projection, for a :class:`FeatureSpec`. Featurization and the jitted scorer
  (:mod:`trakjax.scoring_fn`) both run it.
* :func:`prepare_checkpoint` does the per-checkpoint work once (parameter split, the task's
  auxiliary state, the projection key, R materialized when it fits the budget);
  :func:`featurize_batch` then featurizes batches of examples with one jitted step, micro-batched
  so that a micro-batch of per-example gradients fits ``grad_memory_bytes``.
* :func:`featurize` runs :func:`featurize_batch` over a whole data set.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import backends, factorized, randomness
from trakjax import data as data_lib
from trakjax import projection as projection_lib
from trakjax import sharding as sharding_lib
from trakjax.config import DEFAULT_GRAD_MEMORY_BYTES, DEFAULT_MATRIX_CACHE_BYTES, Config, GradWrt
from trakjax.errors import ArgumentTypeError, InvalidArgumentError, NumericalError
from trakjax.tasks import Task, TaskState, describe_shapes
from trakjax.trees import leaf_paths

logger = logging.getLogger("trakjax")

TRAIN_SPLIT = 0
TARGET_SPLIT = 1

__all__ = [
    "DEFAULT_GRAD_MEMORY_BYTES", "DEFAULT_MATRIX_CACHE_BYTES", "TARGET_SPLIT", "TRAIN_SPLIT",
    "BatchFeatures", "Checkpoint", "FeatureSpec", "Features", "FeaturizeConfig", "GradWrt",
    "choose_projection", "describe_factorization", "featurize", "resolve_auto_projection", "one_example", "output_fn", "task_output_fn", "featurize_batch", "merge_parameters", "parameter_paths", "per_example_features",
    "per_example_grads", "prepare_checkpoint", "select_parameters", "split_parameters", "task_key",
]

parameter_paths = leaf_paths
"""The '/'-joined path of every leaf of a params pytree (:func:`trakjax.trees.leaf_paths`)."""


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


def output_fn(task: Task, treedef, mask, fixed, aux=None) -> Callable:
    """``output(diff_leaves, example, key) -> ()``: the task's output of ONE example as a function
    of the differentiated leaves, the fixed leaves and the task's ``aux`` closed over."""

    def output(diff_leaves, example, key):
        params = merge_parameters(treedef, mask, diff_leaves, fixed)
        value = task.output(params, example, TaskState(aux, key))
        check_scalar_output(task, value, example)
        return value

    return output


def task_output_fn(task: Task, params, mask, state: TaskState | None = None) -> tuple[Callable, list]:
    """``(output_fn, diff_leaves)`` of ``params`` under ``mask`` (see :func:`output_fn`)."""
    state = TaskState() if state is None else state
    diff, fixed = split_parameters(params, mask)
    return output_fn(task, jax.tree_util.tree_structure(params), tuple(mask), fixed, state.aux), diff


def value_and_grads(task: Task, treedef, mask, diff, fixed, batch, state: TaskState):
    """``(outputs (B,), gradient leaves (B, *leaf_shape))`` of the differentiated leaves ``diff``.

    ``jax.vmap(jax.value_and_grad(output))`` over the batch, the fixed leaves closed over as
    constants; ``state.key``, if given, is a (B,) batch of keys.
    """
    output = output_fn(task, treedef, mask, fixed, state.aux)
    key_axis = None if state.key is None else 0
    return jax.vmap(jax.value_and_grad(output), in_axes=(None, 0, key_axis))(diff, batch, state.key)


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


class FeatureSpec(NamedTuple):
    """The static description of how examples become features (hashable; shared by checkpoints).

    Attributes:
      treedef: pytree structure of the parameters.
      mask: which leaves are differentiated.
      kind: ``"rademacher"``, ``"normal"`` or ``"identity"``; the factors' kind for the
        factorized family.
      proj_dim: effective k (the final dimension for the factorized family).
      chunk_rows: rows of R per generated chunk (``None``: the default).
      precision: matmul precision policy of the projection.
      backend: ``"xla"`` or ``"pallas"``.
      plan: the :class:`~trakjax.factorized.plan.FactorPlan` for ``projection="factorized"``,
        else None.
    """

    treedef: Any
    mask: tuple[bool, ...]
    kind: str
    proj_dim: int
    chunk_rows: int | None
    precision: str
    backend: str
    plan: Any = None


def per_example_features(task: Task, spec: FeatureSpec, diff, fixed, batch, state: TaskState,
                         proj_key=None, blocks=None):
    """The per-example step: ``(φ (B, k) float32, outputs (B,))``; pure and jit-compatible.

    Dense family: φ_i = R_mᵀ ∇_θ f(z_i; θ_m) / √P for the differentiated leaves ``diff`` (the
    fixed ones closed over), with R_m the contract's matrix of ``proj_key`` (or ``blocks``, R
    materialized), on ``spec.backend``. Factorized family (``spec.plan``): the Kronecker-projected
    features of :func:`trakjax.factorized.factorized_features`, ``blocks`` holding the checkpoint's
    :class:`~trakjax.factorized.Factors`.
    """
    if spec.plan is not None:
        output = output_fn(task, spec.treedef, spec.mask, fixed, state.aux)
        outputs, features = factorized.factorized_features(
            output, diff, batch, state.key, spec.plan, blocks, kind=spec.kind,
            precision=spec.precision, chunk_rows=spec.chunk_rows,
        )
        return features, outputs
    outputs, grads = value_and_grads(task, spec.treedef, spec.mask, diff, fixed, batch, state)
    features = backends.project(
        grads, kind=spec.kind, proj_dim=spec.proj_dim, key=proj_key, blocks=blocks,
        chunk_rows=spec.chunk_rows, precision=spec.precision, backend=spec.backend,
    )
    return features, outputs


def describe_factorization(
    task: Task,
    params,
    example,
    *,
    grad_wrt: GradWrt = None,
    factor_dims=64,
    proj_dim: int | str = 2048,
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
      factor_dims: an int for both sides or a pair (k_in, k_out).
      proj_dim: the final dimension or ``"all"``.
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
    return factorized.describe(output, diff, example, key, paths=paths, factor_dims=factor_dims,
                               proj_dim=proj_dim)


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
    plan = describe_factorization(task, params, example, grad_wrt=grad_wrt, state=state).plan
    covered = sum(math.prod(leaf.shape) for leaf in plan.leaves if leaf.treatment in ("factorized", "bias"))
    share = covered / max(plan.num_params, 1)
    return ("factorized" if share > AUTO_FACTORIZED_SHARE else "rademacher"), float(share)


def resolve_auto_projection(task: Task, params, config: Config, example=None, aux=None, init_data=None) -> Config:
    """``config`` with ``projection="auto"`` resolved (:func:`choose_projection`) and logged;
    unchanged for any other projection. ``example`` defaults to ``init_data``'s first and ``aux``
    to ``task.init(params, init_data)``."""
    result = config.result
    if result.projection != "auto":
        return config
    if example is None and init_data is not None:
        example = one_example(init_data)
    if aux is None:
        aux = _task_state(task, params, init_data)
    state = TaskState(aux, jax.random.key(0) if task.uses_key else None)
    family, share = choose_projection(task, params, example, grad_wrt=result.grad_wrt, state=state)
    logger.info("projection='auto' resolved to %r: factorizable leaves hold %.1f%% of the differentiated "
                "parameters", family, 100 * share)
    return Config(result.resolve_projection(family), config.run, config.given_settings())


# --------------------------------------------------------------------------- per-checkpoint featurizer


def FeaturizeConfig(**settings) -> Config:  # noqa: N802  (kept for trakjax 0.1 callers)
    """A :class:`trakjax.Config` from keyword settings; the name trakjax 0.1 used."""
    return Config.create(**settings)


class Checkpoint(NamedTuple):
    """Everything :func:`featurize_batch` needs for one checkpoint, computed once.

    Attributes:
      model_id: the checkpoint's id (selects its projection matrix).
      seed: the run's seed (the projection's, and the task's PRNG keys).
      params: the full parameter pytree.
      mask: per-leaf differentiation flags.
      diff, fixed: the differentiated and fixed leaves.
      layout: :class:`~trakjax.projection.ParameterLayout` of the differentiated leaves.
      proj_dim: effective k.
      proj_key: uint32 key of R (None for identity).
      blocks: R materialized per leaf, or None to generate it chunk by chunk.
      aux: the task's auxiliary state for this checkpoint.
      micro_batch: examples per jitted step (a multiple of the mesh size).
      devices: number of devices the steps shard examples over.
      spec: the :class:`FeatureSpec`.
      train_step: the jitted step ``(diff, fixed, batch, aux, indices, split_key, proj_key,
        blocks) -> (features, outputs, out_to_loss)``.
      target_step: the same without the out-to-loss term (its q is zeros).
    """

    model_id: int
    seed: int
    params: Any
    mask: tuple[bool, ...]
    diff: list
    fixed: list
    layout: projection_lib.ParameterLayout
    proj_dim: int
    proj_key: Any
    blocks: list | None
    aux: Any
    micro_batch: int
    devices: int
    spec: FeatureSpec
    train_step: Callable
    target_step: Callable


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

    def step(diff, fixed, batch, aux, indices, split_key, proj_key, blocks):
        state = TaskState(aux, example_keys(task, split_key, indices))
        features, outputs = per_example_features(task, spec, diff, fixed, batch, state, proj_key, blocks)
        params = merge_parameters(spec.treedef, spec.mask, diff, fixed)
        curvature_from_outputs = None
        if with_out_to_loss and task.from_outputs is not None:  # one model pass per batch
            q, curvature_from_outputs = task.from_outputs(outputs, batch, state)
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

    if sharding_lib.mesh_size(mesh) == 1:
        return jax.jit(step)
    rows, same = jax.sharding.PartitionSpec(sharding_lib.DATA_AXIS), jax.sharding.PartitionSpec()
    return jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(same, same, rows, same, rows, same, same, same),
            out_specs=(rows,) * 5, check_vma=False,
        )
    )


@functools.lru_cache(maxsize=16)
def _make_blocks_fn(layout: projection_lib.ParameterLayout, kind: str, proj_dim: int):
    return jax.jit(lambda key: projection_lib.projection_blocks(layout, kind, proj_dim, key))


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
    ``jax.ShapeDtypeStruct`` leaves without the example axis: what the factorization traces."""
    batch = data if not callable(data) else next(iter(data()))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], np.asarray(x[:1]).dtype), batch)


class _Projection(NamedTuple):
    """One checkpoint's projection: the final k, the dense R's key and materialized blocks (or
    the factorized family's Factors in ``blocks``), the plan, and the per-example bytes."""

    proj_dim: int
    key: Any
    blocks: Any
    plan: Any
    example_bytes: int


def _dense_projection(config: Config, layout, model_id: int, backend: str, share: int, diff) -> _Projection:
    result = config.result
    proj_dim = result.projection_dim(layout.total)
    key = blocks = None
    if result.projection != "identity":
        key = jnp.uint32(randomness.stream_key(result.seed, model_id, result.projection))
        if backend == "xla" and layout.total * proj_dim * 4 * share <= config.run.matrix_cache_bytes:
            blocks = _make_blocks_fn(layout, result.projection, proj_dim)(key)
    grad_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in diff)
    return _Projection(proj_dim, key, blocks, None, grad_bytes)


def _factorized_projection(task, params, mask, diff, fixed, aux, config: Config, model_id: int,
                           example, share: int) -> _Projection:
    """Plan the factorization from one example's trace, then the checkpoint's factor matrices."""
    result = config.result
    if example is None:
        raise InvalidArgumentError(
            "projection='factorized' traces the model on one example to find its layers: pass the "
            "training data (init_data) or an example"
        )
    output = output_fn(task, jax.tree_util.tree_structure(params), mask, fixed, aux)
    key = jax.random.key(0) if task.uses_key else None
    paths = [p for p, m in zip(factorized.canonical_paths(params), mask, strict=True) if m]
    plan = factorized.plan_factorization(output, diff, example, key, paths=paths,
                                         factor_dims=result.factor_dims, proj_dim=result.requested_dim)
    if not plan.second_stage and result.proj_dim != "all":
        logger.info("projection='factorized': proj_dim=%s ≥ K_fac=%d, so all %d factorized features "
                    "are kept (no second projection)", result.requested_dim, plan.k_fac, plan.k_fac)
    factors = factorized.factor_matrices(plan, seed=result.seed, model_id=model_id, kind=result.factor_kind,
                                         matrix_cache_bytes=config.run.matrix_cache_bytes // share,
                                         second_stage=result.resolved_second_stage,
                                         sparsity=result.resolved_sparsity)
    example_bytes = factorized.activation_bytes_per_example(output, diff, example, key, plan=plan)
    return _Projection(plan.final_dim, None, factors, plan, example_bytes)


def prepare_checkpoint(
    task: Task,
    params,
    config: Config,
    model_id: int = 0,
    init_data: Any = None,
    example: Any = None,
) -> Checkpoint:
    """Do the per-checkpoint work once: split parameters, task state, projection key and matrix.

    Args:
      task: the :class:`~trakjax.tasks.Task`.
      params: the checkpoint's parameter pytree.
      config: the run's :class:`~trakjax.Config`.
      model_id: the checkpoint's id in [0, 2³²); it selects the projection matrix.
      init_data: the training data (pytree with a leading example axis) handed to
        ``task.init`` when the task has one; its first example also serves ``example``.
      example: one example (no example axis; arrays or ``jax.ShapeDtypeStruct``) for the
        factorized family to trace the model on (default: ``init_data``'s first).

    Returns:
      A :class:`Checkpoint` for :func:`featurize_batch`.
    """
    result, run = config.result, config.run
    randomness.check_seed_and_model_id(result.seed, model_id)
    mask = tuple(select_parameters(params, result.grad_wrt))
    diff, fixed = split_parameters(params, mask)
    diff = [jnp.asarray(x) for x in diff]
    fixed = [jnp.asarray(x) if hasattr(x, "shape") else x for x in fixed]
    layout = projection_lib.parameter_layout(diff)
    backend = backends.resolve(run.backend)
    mesh = run.mesh
    devices = sharding_lib.mesh_size(mesh)
    # Simulated CPU devices of one process share host memory: split the budgets between them.
    share = devices if sharding_lib.cpu_devices_share_memory(mesh) else 1
    aux = _task_state(task, params, init_data)
    if result.projection in ("factorized", "auto"):
        example = example if example is not None or init_data is None else one_example(init_data)
    if result.projection == "auto":  # callers resolve once per run; this resolves a direct call
        config = resolve_auto_projection(task, params, config, example, aux)
        result = config.result
    if result.projection == "factorized":
        projected = _factorized_projection(task, params, mask, diff, fixed, aux, config, model_id, example, share)
    else:
        projected = _dense_projection(config, layout, model_id, backend, share, diff)
    micro_batch = _micro_batch(config, projected.example_bytes, devices, share)
    blocks = projected.blocks
    if devices > 1:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        diff, fixed, blocks, aux = jax.device_put((diff, fixed, blocks, aux), replicated)
    spec = FeatureSpec(jax.tree_util.tree_structure(params), mask, result.factor_kind if projected.plan
                       else result.projection, projected.proj_dim, run.chunk_rows, result.precision,
                       backend, projected.plan)
    step_mesh = mesh if devices > 1 else None
    return Checkpoint(
        model_id=int(model_id), seed=result.seed, params=params, mask=mask, diff=diff, fixed=fixed,
        layout=layout, proj_dim=projected.proj_dim, proj_key=projected.key, blocks=blocks, aux=aux,
        micro_batch=micro_batch, devices=devices, spec=spec,
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
        out = step(
            checkpoint.diff, checkpoint.fixed, part, checkpoint.aux, part_indices, split_key,
            checkpoint.proj_key, checkpoint.blocks,
        )
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
