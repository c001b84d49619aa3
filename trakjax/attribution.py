"""``trakjax.attribute``: the one-call API, composing the public stages.

For each checkpoint: featurize the training set (per-example gradients, projection, out-to-loss
terms), accumulate the Gram, solve, form F = Φ A⁻¹, featurize the targets, and add F Ψᵀ to the
ensemble; finally weight by the mean out-to-loss term (:mod:`trakjax.scores`).
:func:`self_influence` shares the per-checkpoint steps and keeps only the diagonal (targets = train).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import data as data_lib
from trakjax import featurize as featurize_lib
from trakjax import scores as scores_lib
from trakjax import sharding as sharding_lib
from trakjax import solve as solve_lib
from trakjax.tasks import Task

FEATURE_DTYPES = ("float32", "bfloat16", "float16")


def feature_dtype(dtype) -> np.dtype:
    """Normalize a feature storage dtype (float32, bfloat16 or float16) to a numpy dtype."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {dtype!r}") from err
    if name not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    return np.dtype(jnp.dtype(name))


def round_to(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` rounded to ``dtype`` storage and read back as float32."""
    if dtype == np.float32:
        return np.asarray(array, np.float32)
    return np.asarray(array).astype(dtype).astype(np.float32)


def check_checkpoints(checkpoints: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``checkpoints`` is a non-empty list of same-structured pytrees."""
    if callable(checkpoints) or isinstance(checkpoints, dict) or not isinstance(checkpoints, Sequence):
        raise ValueError(
            f"checkpoints must be a list of parameter pytrees, got {type(checkpoints).__name__}"
        )
    if len(checkpoints) == 0:
        raise ValueError("checkpoints is empty; at least one checkpoint is needed")
    reference = jax.tree_util.tree_structure(checkpoints[0])
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(checkpoints[0])]
    for m, params in enumerate(checkpoints[1:], start=1):
        structure = jax.tree_util.tree_structure(params)
        if structure != reference:
            raise ValueError(
                f"checkpoints[{m}] has pytree structure {structure}, but checkpoints[0] has "
                f"{reference}; every checkpoint must have the same structure"
            )
        other = [np.shape(x) for x in jax.tree_util.tree_leaves(params)]
        if other != shapes:
            raise ValueError(
                f"checkpoints[{m}] has leaf shapes {other}, but checkpoints[0] has {shapes}"
            )


class CheckpointDetails(NamedTuple):
    """What the solve found at one checkpoint (from ``attribute(..., return_details=True)``)."""

    model_id: int
    lambda_reg: float
    rank: int
    condition: float
    num_params: int
    proj_dim: int


def attribute(
    task: Task,
    checkpoints: Sequence[Any],
    train: Any,
    targets: Any,
    *,
    proj_dim: int | None = None,
    seed: int = 0,
    lambda_reg: float | str | None = None,
    projection: str = "rademacher",
    batch_size: int = 64,
    grad_wrt: featurize_lib.GradWrt = None,
    reference_compat: bool = False,
    dtype: Any = "float32",
    precision: str = "highest",
    backend: str = "auto",
    model_ids: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    matrix_cache_bytes: int = featurize_lib.DEFAULT_MATRIX_CACHE_BYTES,
    grad_memory_bytes: int = featurize_lib.DEFAULT_GRAD_MEMORY_BYTES,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    return_details: bool = False,
):
    """TRAK scores of every training example on every target: (n_train, n_targets).

    ``S = ((1/M) Σ_m Φ_m (Φ_mᵀΦ_m + λI)⁻¹ Ψ_mᵀ) ⊙ q̄`` (see ``DESIGN.md``, "The math").

    Args:
      task: a :class:`~trakjax.tasks.Task`, e.g. ``tasks.image_classification(apply_fn)``.
      checkpoints: list of M parameter pytrees with one structure.
      train: training data: a pytree of arrays with a leading example axis, e.g. ``(x, y)``, or
        a zero-argument callable returning a fresh iterator of such batches (re-read for every
        checkpoint).
      targets: target data, in the same forms.
      proj_dim: k; ``None`` means 2048 for random projections and P for ``"identity"``.
      seed: projection seed.
      lambda_reg: ``None`` or ``"auto"`` (the same) for λ chosen per checkpoint without
        retraining, λ = 0.3·trace(Φ_mᵀΦ_m)/N (:func:`trakjax.solve.auto_lambda`; by LDS on
        digits the best retraining-free rule measured, equal to the best hand-tuned λ at every
        k ≥ 512, see ``benchmarks/README.md``); a float for an absolute λ (the reference's
        meaning); ``0.0`` is exactly zero and raises if ΦᵀΦ is singular.
      projection: ``"rademacher"``, ``"normal"`` or ``"identity"``.
      batch_size: examples per featurize step.
      grad_wrt: which parameters to differentiate (see
        :func:`trakjax.featurize.select_parameters`).
      reference_compat: rescale each A_m⁻¹ by 1/mean|A_m⁻¹| as the reference library does. Off
        by default: on digits the paper's plain average measured the same LDS (to three
        decimals, every k), and needs no extra k×k pass (see ``benchmarks/README.md``).
      dtype: storage dtype of features: float32, bfloat16 or float16 (Gram and solve stay
        float32 or better).
      precision: matmul precision policy for the projection (``"highest"`` is full float32).
      backend: projection backend, ``"xla"``, ``"pallas"`` or ``"auto"``.
      model_ids: ids selecting each checkpoint's projection matrix (default 0 .. M − 1).
      chunk_rows, matrix_cache_bytes, grad_memory_bytes: memory knobs, see
        :class:`~trakjax.featurize.FeaturizeConfig`.
      mesh: a 1-D mesh with axis ``"data"`` over this process's devices (see
        :mod:`trakjax.sharding`); ``None`` uses all local devices. Examples are sharded over it.
        Under ``jax.distributed`` (several processes), each process featurizes its own
        contiguous slice of ``train`` (which must then be arrays) and every process returns the
        full score matrix.
      progress: show tqdm progress bars.
      return_details: also return a list of :class:`CheckpointDetails`.

    Returns:
      ``np.ndarray`` (n_train, n_targets) float32; with ``return_details``, ``(scores, details)``.
    """
    if not callable(targets):
        data_lib.num_examples(targets, "targets")
    score_sum = None
    q_sum = None
    details = []
    for solved in solved_checkpoints(
        task, checkpoints, train,
        proj_dim=proj_dim, seed=seed, lambda_reg=lambda_reg, projection=projection,
        batch_size=batch_size, grad_wrt=grad_wrt, reference_compat=reference_compat, dtype=dtype,
        precision=precision, backend=backend, model_ids=model_ids, chunk_rows=chunk_rows,
        matrix_cache_bytes=matrix_cache_bytes, grad_memory_bytes=grad_memory_bytes, mesh=mesh,
        progress=progress,
    ):
        target_features = featurize_lib.featurize(
            task, solved.checkpoint, targets, batch_size=batch_size,
            split=featurize_lib.TARGET_SPLIT, with_out_to_loss=False,
        )
        psi = round_to(target_features.features, solved.storage)
        part = scores_lib.checkpoint_scores(solved.features, psi, mesh=solved.mesh).astype(np.float64)
        score_sum = part if score_sum is None else score_sum + part
        q = solved.out_to_loss.astype(np.float64)
        q_sum = q if q_sum is None else q_sum + q
        details.append(solved.details)
    scores = sharding_lib.process_concat(scores_lib.combine(score_sum, q_sum, len(details)))
    return (scores, details) if return_details else scores


def self_influence(
    task: Task,
    checkpoints: Sequence[Any],
    train: Any,
    *,
    proj_dim: int | None = None,
    seed: int = 0,
    lambda_reg: float | str | None = None,
    projection: str = "rademacher",
    batch_size: int = 64,
    grad_wrt: featurize_lib.GradWrt = None,
    reference_compat: bool = False,
    dtype: Any = "float32",
    precision: str = "highest",
    backend: str = "auto",
    model_ids: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    matrix_cache_bytes: int = featurize_lib.DEFAULT_MATRIX_CACHE_BYTES,
    grad_memory_bytes: int = featurize_lib.DEFAULT_GRAD_MEMORY_BYTES,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    return_details: bool = False,
):
    """Each training example's TRAK score on itself: (n_train,) float32.

    The diagonal of :func:`attribute` with ``targets = train``. With Ψ_m = Φ_m, the design's
    formula ``S = ((1/M) Σ_m Φ_m A_m⁻¹ Ψ_mᵀ) ⊙ q̄`` gives exactly::

        s_i = ( (1/M) Σ_m φ_iᵐᵀ A_m⁻¹ φ_iᵐ ) · q̄_i,     q̄_i = (1/M) Σ_m q_iᵐ

    i.e. the mean over checkpoints of the leverage φᵀA⁻¹φ, times the mean out-to-loss term (a
    product of means, as in the ensemble, not a mean of products). Large values flag examples the
    model fits only by memorizing them, e.g. mislabeled ones (AUC 0.99 on digits with 8% of the
    labels flipped, ``benchmarks/README.md``). Only the N diagonal entries are formed, never the
    (N, N) matrix.

    Arguments are those of :func:`attribute` (without ``targets``).

    Returns:
      ``np.ndarray`` (n_train,) float32; with ``return_details``, ``(values, details)``.
    """
    leverage_sum = None
    q_sum = None
    details = []
    for solved in solved_checkpoints(
        task, checkpoints, train,
        proj_dim=proj_dim, seed=seed, lambda_reg=lambda_reg, projection=projection,
        batch_size=batch_size, grad_wrt=grad_wrt, reference_compat=reference_compat, dtype=dtype,
        precision=precision, backend=backend, model_ids=model_ids, chunk_rows=chunk_rows,
        matrix_cache_bytes=matrix_cache_bytes, grad_memory_bytes=grad_memory_bytes, mesh=mesh,
        progress=progress,
    ):
        leverage = scores_lib.row_dots(solved.features, solved.phi)
        leverage_sum = leverage if leverage_sum is None else leverage_sum + leverage
        q = solved.out_to_loss.astype(np.float64)
        q_sum = q if q_sum is None else q_sum + q
        details.append(solved.details)
    local = scores_lib.combine(leverage_sum[:, None], q_sum, len(details))
    values = sharding_lib.process_concat(local)[:, 0]
    return (values, details) if return_details else values


class Solved(NamedTuple):
    """One checkpoint after featurizing (this process's slice of) train and solving."""

    checkpoint: featurize_lib.Checkpoint
    storage: np.dtype
    mesh: Any
    phi: np.ndarray  # (N_local, k) Φ as stored
    features: np.ndarray  # (N_local, k) F = Φ A⁻¹ as stored
    out_to_loss: np.ndarray  # (N_local,) q
    details: CheckpointDetails


def solved_checkpoints(
    task, checkpoints, train, *, proj_dim, seed, lambda_reg, projection, batch_size, grad_wrt,
    reference_compat, dtype, precision, backend, model_ids, chunk_rows, matrix_cache_bytes,
    grad_memory_bytes, mesh, progress,
):
    """Yield a :class:`Solved` per checkpoint: featurize train, Gram, solve, F = Φ A⁻¹.

    The per-checkpoint loop shared by :func:`attribute`, :func:`self_influence` and
    :func:`trakjax.scoring_fn.train_features`; the arguments mean what they mean in
    :func:`attribute`. Under ``jax.distributed`` each process featurizes its own slice of
    ``train`` and the Gram is summed across processes.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a trakjax.tasks.Task, got {type(task).__name__}")
    check_checkpoints(checkpoints)
    storage = feature_dtype(dtype)
    if model_ids is None:
        model_ids = list(range(len(checkpoints)))
    model_ids = [int(m) for m in model_ids]
    if len(model_ids) != len(checkpoints) or len(set(model_ids)) != len(model_ids):
        raise ValueError(
            f"model_ids must hold {len(checkpoints)} distinct ints, one per checkpoint; got {model_ids}"
        )
    mesh = sharding_lib.check_mesh(mesh)
    local_train, num_train = train, None
    if not callable(train):
        num_train = data_lib.num_examples(train, "train")
    if jax.process_count() > 1:
        if callable(train):
            raise ValueError(
                "under jax.distributed each process featurizes its own slice of train, so train "
                "must be a pytree of arrays, not a callable; for streamed data use the TRAKer "
                "session with per-process indices"
            )
        start, stop = sharding_lib.process_slice(num_train)
        local_train = data_lib.take(train, start, stop) if stop > start else None
    else:
        start = 0
    if projection == "identity":
        k = proj_dim
    else:
        k = 2048 if proj_dim is None else proj_dim
    config = featurize_lib.FeaturizeConfig(
        projection=projection, proj_dim=k, seed=seed, grad_wrt=grad_wrt, batch_size=batch_size,
        precision=precision, chunk_rows=chunk_rows, matrix_cache_bytes=matrix_cache_bytes,
        grad_memory_bytes=grad_memory_bytes, backend=backend, mesh=mesh,
    )
    bar = _progress_bar(progress, len(checkpoints))
    for params, model_id in zip(checkpoints, model_ids, strict=True):
        checkpoint = featurize_lib.prepare_checkpoint(task, params, config, model_id, init_data=train)
        if local_train is None:  # more processes than examples: this one has none
            k_eff = checkpoint.proj_dim
            train_features = featurize_lib.Features(
                np.zeros((0, k_eff), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
            )
        else:
            train_features = featurize_lib.featurize(
                task, checkpoint, local_train, batch_size=batch_size,
                split=featurize_lib.TRAIN_SPLIT, index_offset=start,
            )
        phi = round_to(train_features.features, storage)
        local_gram = solve_lib.gram(phi, mesh=mesh) if phi.shape[0] else np.zeros((checkpoint.proj_dim,) * 2)
        total_examples = num_train if num_train is not None else phi.shape[0]
        kernel = solve_lib.solve(
            sharding_lib.process_sum(local_gram), lambda_reg, reference_compat=reference_compat,
            num_examples=total_examples, num_params=checkpoint.layout.total,
            storage_dtype=storage,
        )
        features = round_to(solve_lib.apply_inverse(phi, kernel, mesh=mesh), storage)
        details = CheckpointDetails(model_id, kernel.lambda_reg, kernel.rank, kernel.condition,
                                    checkpoint.layout.total, checkpoint.proj_dim)
        yield Solved(checkpoint, storage, mesh, phi, features, train_features.out_to_loss, details)
        bar.update(1)
    bar.close()


class _NoBar:
    def update(self, n):
        del n

    def close(self):
        pass


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="checkpoints", unit="ckpt")
