"""The per-checkpoint pipeline below the one-call API: featurize, Gram, reduce, solve, F = Φ A⁻¹.

For each checkpoint m (docs/design.md, "The math")::

    Φ_m = featurize(train)            (N, k)   this process's rows, stored in the feature dtype
    A_m = Φ_mᵀ Φ_m + λ I              (k, k)   the Gram summed over devices and processes
    F_m = Φ_m A_m⁻¹                   (N, k)

* :func:`checkpoint_kernel` is the Gram → cross-process sum → solve step, shared by
  :func:`solved_checkpoints` and the :class:`~trakjax.TRAKer` session.
* :func:`solved_checkpoints` yields one :class:`Solved` per checkpoint; :func:`trakjax.attribute`,
  :func:`trakjax.self_influence` and :func:`trakjax.train_features` consume it and combine the
  checkpoints with :func:`trakjax.scores.ensemble`.

Under ``jax.distributed`` each process featurizes its own contiguous slice of the training set
(:func:`trakjax.sharding.process_slice`) and only the Gram crosses processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from trakjax import curvature as curvature_lib
from trakjax import data as data_lib
from trakjax import families, memory_limits, regularization
from trakjax import featurize as featurize_lib
from trakjax import sharding as sharding_lib
from trakjax import solve as solve_lib
from trakjax.config import GAUSS_NEWTON_KERNEL, TRAK_KERNEL, Config, ResultSettings
from trakjax.errors import ArgumentTypeError, InvalidArgumentError
from trakjax.progress import progress_bar
from trakjax.tasks import Task, TaskState


class CheckpointDetails(NamedTuple):
    """What the solve found at one checkpoint (``attribute(..., return_details=True)``).

    ``rank`` and ``condition`` are those of :class:`trakjax.solve.KernelSolve`: from the
    eigendecomposition when it ran (λ near the noise, λ = 0), else ``rank`` is ``None`` and
    ``condition`` the estimate (λ̂_max + λ)/λ. The scores never depend on which ran.
    ``lambda_rule`` says how λ was chosen (:attr:`trakjax.solve.KernelSolve.lambda_rule`),
    ``kernel`` which kernel ran (``"trak"`` or ``"gauss-newton"``, :mod:`trakjax.curvature`) and
    ``clipped_curvature`` how many h < 0 it clipped to 0.
    """

    model_id: int
    lambda_reg: float
    rank: int | None
    condition: float
    num_params: int
    proj_dim: int
    lambda_rule: str = "absolute"
    kernel: str = "trak"
    clipped_curvature: int = 0


class Solved(NamedTuple):
    """One checkpoint after featurizing (this process's slice of) train and solving."""

    checkpoint: featurize_lib.Checkpoint
    storage: np.dtype
    mesh: Any
    phi: np.ndarray  # (N_local, k) Φ as stored
    features: np.ndarray  # (N_local, k) F = Φ A⁻¹ as stored
    out_to_loss: np.ndarray  # (N_local,) q
    details: CheckpointDetails


def round_to(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` rounded to ``dtype`` storage and read back as float32."""
    if dtype == np.float32:
        return np.asarray(array, np.float32)
    return np.asarray(array).astype(dtype).astype(np.float32)


def check_checkpoints(checkpoints: Sequence[Any]) -> None:
    """Raise unless ``checkpoints`` is a non-empty list of pytrees with one structure and shapes."""
    if callable(checkpoints) or isinstance(checkpoints, dict) or not isinstance(checkpoints, Sequence):
        raise ArgumentTypeError(
            f"checkpoints must be a list of parameter pytrees, got {type(checkpoints).__name__}"
        )
    if len(checkpoints) == 0:
        raise InvalidArgumentError("checkpoints is empty; at least one checkpoint is needed")
    reference = jax.tree_util.tree_structure(checkpoints[0])
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(checkpoints[0])]
    for m, params in enumerate(checkpoints[1:], start=1):
        structure = jax.tree_util.tree_structure(params)
        if structure != reference:
            raise InvalidArgumentError(
                f"checkpoints[{m}] has pytree structure {structure}, but checkpoints[0] has "
                f"{reference}; every checkpoint must have the same structure"
            )
        other = [np.shape(x) for x in jax.tree_util.tree_leaves(params)]
        if other != shapes:
            raise InvalidArgumentError(
                f"checkpoints[{m}] has leaf shapes {other}, but checkpoints[0] has {shapes}"
            )


def check_model_ids(model_ids: Sequence[int] | None, count: int) -> list[int]:
    """``model_ids`` as a list of ``count`` distinct ints (default ``0 .. count − 1``)."""
    if model_ids is None:
        return list(range(count))
    ids = list(model_ids)
    if (len(ids) != count or len(set(ids)) != len(ids)
            or any(isinstance(m, bool) or not isinstance(m, int | np.integer) for m in ids)):
        raise InvalidArgumentError(
            f"model_ids must hold {count} distinct ints, one per checkpoint; got {ids}"
        )
    return [int(m) for m in ids]


def _example_shapes(data) -> str:
    """Per-example shapes of a data set's leaves: ``(64,)`` or ``{[0]: (64,), [1]: ()}``."""
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if len(leaves) == 1 and not leaves[0][0]:
        return str(tuple(np.shape(leaves[0][1])[1:]))
    return "{" + ", ".join(f"{jax.tree_util.keystr(p)}: {tuple(np.shape(x)[1:])}" for p, x in leaves) + "}"


VALIDATE_ROWS = 256
"""Training rows :func:`check_targets_fit` runs the task's own ``validate`` on before any work."""


def check_targets_fit(task: Task, params, train, targets) -> None:
    """Raise before any work if the training examples do not fit the model (the task's own
    ``validate`` on the first rows, then ``task.output`` traced on one example), or the targets'
    examples do not fit it as the training examples do.

    Targets whose pytree structure or per-example shapes differ from the training examples' are
    traced through ``task.output`` once (``jax.eval_shape``, nothing computed); if the model
    rejects them, the error names both shapes (instead of a shape error from deep inside the
    model during featurization). Shapes that differ but fit (sequences of another length, say)
    pass. Callables (streamed data), and tasks with per-checkpoint state, are not checked.
    """
    if callable(train) or callable(targets) or task.init is not None:
        return
    key = jax.random.key(0) if task.uses_key else None
    train_example = featurize_lib.one_example(train)
    try:
        if task.validate is not None:  # the task's own checks first (on a first batch's rows)
            task.validate(params, data_lib.take(train, 0, min(VALIDATE_ROWS, data_lib.num_examples(train))))
        jax.eval_shape(lambda p, z: task.output(p, z, TaskState(None, key)), params, train_example)
    except ValueError:  # the task's own check (a TrakjaxError or a custom task's ValueError): clear
        raise
    except Exception as err:  # noqa: BLE001  (any failure to trace is the inputs' misfit)
        lines = str(err).strip().splitlines()
        raise InvalidArgumentError(
            f"train does not fit the model: one training example has shapes {_example_shapes(train)}, "
            f"which task {task.name!r}'s output rejects with these parameters ({type(err).__name__}: "
            f"{lines[0] if lines else ''}); nothing was computed"
        ) from err
    same_structure = jax.tree_util.tree_structure(train) == jax.tree_util.tree_structure(targets)
    if same_structure and all(
        np.shape(a)[1:] == np.shape(b)[1:]
        for a, b in zip(jax.tree_util.tree_leaves(train), jax.tree_util.tree_leaves(targets), strict=True)
    ):
        return
    example = featurize_lib.one_example(targets)
    try:
        key = jax.random.key(0) if task.uses_key else None
        jax.eval_shape(lambda p, z: task.output(p, z, TaskState(None, key)), params, example)
    except Exception as err:  # noqa: BLE001  (any failure to trace is the targets' misfit)
        lines = str(err).strip().splitlines()
        raise InvalidArgumentError(
            f"targets do not fit the model: one target example has shapes {_example_shapes(targets)}, "
            f"one training example has {_example_shapes(train)} ({type(err).__name__}: "
            f"{lines[0] if lines else ''})"
        ) from err


class RidgeInputs(NamedTuple):
    """This process's rows of what ``lambda_reg="auto"``'s implied-ridge rule reads besides Φ:
    q (n,), the outputs' shift from an untrained model's f − f₀ (n,) and the curvature h (n,)."""

    out_to_loss: np.ndarray
    output_shift: np.ndarray
    curvature: np.ndarray


def checkpoint_kernel(local_phi, settings: ResultSettings, *, proj_dim: int, num_examples: int,
                      num_params: int, num_features: int | None = None, mesh=None,
                      ridge: RidgeInputs | None = None, kernel: str = TRAK_KERNEL) -> solve_lib.KernelSolve:
    """Solve one checkpoint's kernel from this process's rows of Φ.

    The Gram of ``local_phi`` ((n_local, k), any float dtype, possibly no rows) is summed over
    the mesh's devices, then over processes in float64 (:func:`trakjax.sharding.process_sum`),
    and solved with ``settings``' λ (:func:`trakjax.solve.solve`). With ``ridge`` (the task's
    ``ridge_terms`` at these rows), the implied-ridge statistics are summed the same way and
    ``"auto"`` uses them (:mod:`trakjax.regularization`); rows whose f₀ is unknown (NaN) leave
    ``"auto"`` at 0.3·trace/N. ``kernel="gauss-newton"`` (a resolved kernel,
    :func:`trakjax.curvature.resolve_kernel`; needs ``ridge``) weights the Gram by the clipped
    curvature, ΦᵀHΦ, a weighted sum over devices and processes like ΦᵀΦ.
    """
    weights = None
    clipped = curved = 0
    if kernel == GAUSS_NEWTON_KERNEL:
        if ridge is None:
            raise InvalidArgumentError("kernel='gauss-newton' needs the task's curvature (ridge_terms)")
        weights, clipped = curvature_lib.clipped_curvature(ridge.curvature)
        counts = sharding_lib.process_sum(np.array([clipped, (weights > 0).sum()], np.float64))
        clipped, curved = int(round(counts[0])), int(round(counts[1]))
    if local_phi.shape[0]:
        local = solve_lib.gram(local_phi, mesh=mesh, weights=weights)
    else:
        local = np.zeros((proj_dim, proj_dim))
    statistics = None
    use_statistics = ridge is not None and settings.lambda_reg == "auto"
    if use_statistics:  # every process's f₀ known (a NaN f₀ means unknown: from_loss without it)
        unknown_offsets = float((~np.isfinite(np.asarray(ridge.output_shift))).sum())
        use_statistics = sharding_lib.process_sum(np.array([unknown_offsets]))[0] == 0
    if use_statistics:
        local_statistics = regularization.ridge_statistics(
            local_phi, ridge.out_to_loss, ridge.output_shift,
            curvature=ridge.curvature if weights is None else weights, kernel=kernel)
        statistics = regularization.unpack(sharding_lib.process_sum(regularization.pack(local_statistics)))
    solved = solve_lib.solve(
        sharding_lib.process_sum(local), settings.lambda_reg,
        reference_compat=settings.reference_compat, num_examples=num_examples,
        num_params=num_params, storage_dtype=settings.storage_dtype, num_features=num_features,
        ridge=statistics, kernel=kernel, num_curved=curved if weights is not None else None,
    )
    return solved._replace(clipped_curvature=clipped)


def run_kernel(task: Task, settings: ResultSettings) -> str:
    """The kernel a run of ``task`` with ``settings`` uses (:func:`trakjax.curvature.resolve_kernel`)."""
    return curvature_lib.resolve_kernel(settings.kernel, has_curvature=task.ridge_terms is not None,
                                        reference_compat=settings.reference_compat, task_name=task.name)


def _process_share(train) -> tuple[Any, int, int | None]:
    """(this process's slice of train or None if it has none, its first index, N or None)."""
    if callable(train):
        if jax.process_count() > 1:
            raise InvalidArgumentError(
                "under jax.distributed each process featurizes its own slice of train, so train "
                "must be a pytree of arrays, not a callable; for streamed data use the TRAKer "
                "session with per-process indices"
            )
        return train, 0, None
    num_train = data_lib.num_examples(train, "train")
    if jax.process_count() == 1:
        return train, 0, num_train
    start, stop = sharding_lib.process_slice(num_train)
    return (data_lib.take(train, start, stop) if stop > start else None), start, num_train


def _featurize_share(task, checkpoint, share, start: int, batch_size: int) -> featurize_lib.Features:
    if share is None:  # more processes than examples: this one has none
        empty = np.zeros(0, np.float32)
        return featurize_lib.Features(np.zeros((0, checkpoint.proj_dim), np.float32), empty, empty, empty, empty)
    return featurize_lib.featurize(
        task, checkpoint, share, batch_size=batch_size, split=featurize_lib.TRAIN_SPLIT,
        index_offset=start,
    )


def solved_checkpoints(
    task: Task,
    checkpoints: Sequence[Any],
    train: Any,
    config: Config,
    model_ids: Sequence[int] | None = None,
) -> Iterator[Solved]:
    """Yield a :class:`Solved` per checkpoint: featurize train, Gram, solve, F = Φ A⁻¹.

    Args:
      task: the :class:`~trakjax.tasks.Task`.
      checkpoints: M parameter pytrees of one structure.
      train: a pytree of arrays with a leading example axis, or a zero-argument callable
        returning an iterator of batches (one process only).
      config: the run's :class:`~trakjax.Config`; its mesh ``None`` means all local devices.
      model_ids: one id per checkpoint (default ``0 .. M − 1``).
    """
    if not isinstance(task, Task):
        raise ArgumentTypeError(f"task must be a trakjax.tasks.Task, got {type(task).__name__}")
    check_checkpoints(checkpoints)
    model_ids = check_model_ids(model_ids, len(checkpoints))
    config = config.replace(mesh=sharding_lib.check_mesh(config.run.mesh))
    kernel_name = run_kernel(task, config.result)
    share, start, num_train = _process_share(train)
    storage = config.result.storage_dtype
    # projection="auto": resolved once, on the first checkpoint (the choice depends on structure only)
    config = featurize_lib.resolve_auto_projection(task, checkpoints[0], config, init_data=train)
    example = featurize_lib.one_example(train) if families.needs_example(config.result.projection) else None
    spec = None  # planned at the first checkpoint, reused by the others (one trace per run)
    bar = progress_bar(len(checkpoints), "checkpoints", "checkpoint", config.run.progress)
    for params, model_id in zip(checkpoints, model_ids, strict=True):
        checkpoint = featurize_lib.prepare_checkpoint(task, params, config, model_id, init_data=train,
                                                      example=example, spec=spec)
        spec = checkpoint.spec
        k_fac = checkpoint.record.get("k_fac")
        memory_limits.check_solve_memory(checkpoint.proj_dim, k_fac=k_fac)
        train_features = _featurize_share(task, checkpoint, share, start, config.run.batch_size)
        phi = round_to(train_features.features, storage)
        num_params = checkpoint.layout.total
        ridge = None
        if task.ridge_terms is not None:
            ridge = RidgeInputs(train_features.out_to_loss, train_features.outputs - train_features.output_offset,
                                train_features.curvature)
        kernel = checkpoint_kernel(
            phi, config.result, proj_dim=checkpoint.proj_dim, mesh=config.run.mesh,
            num_examples=num_train if num_train is not None else phi.shape[0], num_params=num_params,
            num_features=k_fac, ridge=ridge,
            kernel=kernel_name,
        )
        features = round_to(solve_lib.apply_inverse(phi, kernel, mesh=config.run.mesh), storage)
        details = CheckpointDetails(model_id, kernel.lambda_reg, kernel.rank, kernel.condition,
                                    num_params, checkpoint.proj_dim, kernel.lambda_rule, kernel.kernel,
                                    kernel.clipped_curvature)
        yield Solved(checkpoint, storage, config.run.mesh, phi, features, train_features.out_to_loss, details)
        bar.update(1)
    bar.close()
