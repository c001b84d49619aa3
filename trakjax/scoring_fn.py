"""Scoring as a pure, jit-compatible function, for TRAK scores inside a user's jitted step.

:func:`train_features` does the per-checkpoint work once, on the host, by composing the public
stages (:func:`~trakjax.featurize.prepare_checkpoint`, :func:`~trakjax.featurize.featurize`,
:func:`~trakjax.solve.gram`, :func:`~trakjax.solve.solve`, :func:`~trakjax.solve.apply_inverse`)
exactly as :func:`trakjax.attribute` does, and returns a :class:`TrainFeatures` pytree resident on
device: per checkpoint m the features F_m = Φ_m A_m⁻¹ (N, k) and out-to-loss terms q^m (N,), the
task's auxiliary state, and (static, in the pytree's structure) the projection contract.

:func:`scorer` turns it into ``score_fn(params, batch) -> (N, B)``::

    S = ( (1/M) Σ_m F_m Ψ_mᵀ ) ⊙ q̄[:, None],    q̄ = (1/M) Σ_m q^m

where Ψ_m (B, k) are the batch's per-example gradients at the m-th parameters, projected with
the m-th checkpoint's R. Everything in ``score_fn`` is jnp: per-example gradients by
``jax.vmap(jax.value_and_grad(output))``, R generated from the counter-based contract with its
key as a ``jnp.uint32``. So it runs inside ``jax.jit`` with no host round trip, and at the
parameters that were featurized it equals ``trakjax.attribute(task, checkpoints, train, batch)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import attribution, randomness
from trakjax import backends as backends_lib
from trakjax import data as data_lib
from trakjax import featurize as featurize_lib
from trakjax import projection as projection_lib
from trakjax.tasks import Task, TaskState


@dataclasses.dataclass(frozen=True)
class FeatureContract:
    """What a :class:`TrainFeatures` was computed with; static (part of the pytree structure).

    Scoring must project the targets' gradients exactly as the training gradients were
    projected: same parameter structure and ``grad_wrt`` mask (hence the same parameter
    layout, the rows of R), same kind, k, seed and model ids (the matrices R_m), same task.

    Attributes:
      contract_version: :data:`trakjax.randomness.CONTRACT_VERSION` of R.
      task_name: the task's name.
      kind: ``"rademacher"``, ``"normal"`` or ``"identity"``.
      proj_dim: effective k.
      seed: projection seed (also seeds task PRNG keys).
      model_ids: one id per checkpoint, in order.
      backend: the projection backend featurization used (``"xla"`` or ``"pallas"``).
      precision: matmul precision policy of the projection.
      chunk_rows: rows of R per generated chunk (``None``: the default).
      dtype: feature storage dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
      treedef: pytree structure of one checkpoint's parameters.
      leaf_shapes: shape of each parameter leaf, in flattening order.
      paths: '/'-joined path of each parameter leaf (for error messages).
      mask: which leaves are differentiated (``grad_wrt``).
      layout: :class:`~trakjax.projection.ParameterLayout` of the differentiated leaves.
      num_train: N.
    """

    contract_version: int
    task_name: str
    kind: str
    proj_dim: int
    seed: int
    model_ids: tuple[int, ...]
    backend: str
    precision: str
    chunk_rows: int | None
    dtype: str
    treedef: Any
    leaf_shapes: tuple[tuple[int, ...], ...]
    paths: tuple[str, ...]
    mask: tuple[bool, ...]
    layout: projection_lib.ParameterLayout
    num_train: int


jax.tree_util.register_static(FeatureContract)


class TrainFeatures(NamedTuple):
    """The training side of TRAK for M checkpoints, as a pytree of device arrays.

    Attributes:
      features: (M, N, k) float32, F_m = Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ (rounded through ``dtype``).
      out_to_loss: (M, N) float32, q^m.
      aux: tuple of M per-checkpoint task states (``task.init``'s output, or ``None``).
      lambda_reg: (M,) float32, the λ_m used (for the record).
      contract: the static :class:`FeatureContract`.
    """

    features: jax.Array
    out_to_loss: jax.Array
    aux: tuple
    lambda_reg: jax.Array
    contract: FeatureContract


def train_features(
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
) -> TrainFeatures:
    """Featurize and solve the training set at each checkpoint: the input of :func:`scorer`.

    Per checkpoint m, as in :func:`trakjax.attribute`: Φ_m = featurize(train), A_m = Φ_mᵀΦ_m + λI
    (float64 eigendecomposition with rank detection), F_m = Φ_m A_m⁻¹, q^m. The arguments mean
    what they mean in :func:`trakjax.attribute`; calling :func:`scorer` on the result with
    ``batch = targets`` gives ``attribute(task, checkpoints, train, targets, ...)``. ``mesh``
    shards featurization and the Gram over this process's devices, as in ``attribute``; the
    result is one array set (not split across ``jax.distributed`` processes, which this
    function refuses).

    Returns:
      :class:`TrainFeatures`, its arrays on the default device.
    """
    if jax.process_count() > 1:
        raise ValueError(
            f"train_features holds every training example's features in one process, but "
            f"jax.distributed runs {jax.process_count()} processes; use trakjax.attribute there"
        )
    features, out_to_loss, auxes, lambdas = [], [], [], []
    solved = None
    for solved in attribution.solved_checkpoints(
        task, checkpoints, train, proj_dim=proj_dim, seed=seed, lambda_reg=lambda_reg,
        projection=projection, batch_size=batch_size, grad_wrt=grad_wrt,
        reference_compat=reference_compat, dtype=dtype, precision=precision, backend=backend,
        model_ids=model_ids, chunk_rows=chunk_rows, matrix_cache_bytes=matrix_cache_bytes,
        grad_memory_bytes=grad_memory_bytes, mesh=mesh, progress=False,
    ):
        features.append(solved.features)
        out_to_loss.append(np.asarray(solved.out_to_loss, np.float32))
        auxes.append(solved.checkpoint.aux)
        lambdas.append(solved.details.lambda_reg)
    checkpoint, storage = solved.checkpoint, solved.storage
    model_ids = list(range(len(checkpoints))) if model_ids is None else [int(m) for m in model_ids]
    params = checkpoints[0]
    contract = FeatureContract(
        contract_version=randomness.CONTRACT_VERSION,
        task_name=task.name,
        kind=projection,
        proj_dim=checkpoint.proj_dim,
        seed=int(seed),
        model_ids=tuple(model_ids),
        backend=featurize_lib.resolve_backend(backend),
        precision=precision,
        chunk_rows=chunk_rows,
        dtype=storage.name if storage != np.float32 else "float32",
        treedef=jax.tree_util.tree_structure(params),
        leaf_shapes=tuple(tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params)),
        paths=tuple(featurize_lib.parameter_paths(params)),
        mask=checkpoint.mask,
        layout=checkpoint.layout,
        num_train=int(features[0].shape[0]),
    )
    return TrainFeatures(
        features=jnp.asarray(np.stack(features)),
        out_to_loss=jnp.asarray(np.stack(out_to_loss)),
        aux=tuple(auxes),
        lambda_reg=jnp.asarray(np.asarray(lambdas, np.float32)),
        contract=contract,
    )


# --------------------------------------------------------------------------- parameters


def _leaf_shapes(tree) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(tree))


def _first_difference(contract: FeatureContract, shapes, expected, where: str) -> str:
    for path, got, want in zip(contract.paths, shapes, expected, strict=True):
        if got != want:
            return f"{where} leaf {path!r} has shape {got}, the featurized checkpoints' has {want}"
    return f"{where} leaf shapes differ"


def _structure_error(contract: FeatureContract, params, where: str) -> ValueError:
    got = featurize_lib.parameter_paths(params)
    missing = [p for p in contract.paths if p not in got]
    extra = [p for p in got if p not in contract.paths]
    detail = []
    if missing:
        detail.append(f"missing {missing[:5]}")
    if extra:
        detail.append(f"unexpected {extra[:5]}")
    if not detail:
        detail.append(f"structure {jax.tree_util.tree_structure(params)}")
    return ValueError(
        f"score_fn: {where} does not match the featurized checkpoints' parameters "
        f"({len(contract.paths)} leaves, e.g. {list(contract.paths[:3])}): {'; '.join(detail)}"
    )


def checkpoint_params(params, contract: FeatureContract) -> list:
    """Split ``params`` into one parameter pytree per featurized checkpoint.

    ``params`` is one pytree (M = 1), a list of M pytrees, or one pytree whose leaves are
    stacked on a leading axis of M; each must have the featurized checkpoints' structure and
    leaf shapes.

    Raises:
      ValueError: naming the mismatching leaf, its shape and the expected one, or the count.
    """
    m = len(contract.model_ids)
    if jax.tree_util.tree_structure(params) == contract.treedef:
        shapes = _leaf_shapes(params)
        if shapes == contract.leaf_shapes:
            if m != 1:
                raise ValueError(
                    f"score_fn: params is one checkpoint, but the train features hold M = {m} "
                    f"checkpoints (model_ids {list(contract.model_ids)}); pass a list of {m} "
                    f"parameter pytrees or one pytree stacked on a leading axis of {m}"
                )
            return [params]
        stacked = tuple((m,) + s for s in contract.leaf_shapes)
        if shapes == stacked:
            return [jax.tree_util.tree_map(lambda x, i=i: x[i], params) for i in range(m)]
        raise ValueError(
            f"score_fn: {_first_difference(contract, shapes, contract.leaf_shapes, 'params')} "
            f"(or, stacked over the M = {m} checkpoints, {stacked[0] if stacked else ()}…)"
        )
    if isinstance(params, list | tuple):
        if len(params) != m:
            raise ValueError(
                f"score_fn: params is a list of {len(params)} pytrees, but the train features "
                f"hold M = {m} checkpoints (model_ids {list(contract.model_ids)})"
            )
        for i, one in enumerate(params):
            if jax.tree_util.tree_structure(one) != contract.treedef:
                raise _structure_error(contract, one, f"params[{i}]")
            shapes = _leaf_shapes(one)
            if shapes != contract.leaf_shapes:
                raise ValueError(
                    "score_fn: "
                    + _first_difference(contract, shapes, contract.leaf_shapes, f"params[{i}]")
                )
        return list(params)
    raise _structure_error(contract, params, "params")


# --------------------------------------------------------------------------- scoring


def target_features(
    task: Task,
    contract: FeatureContract,
    params,
    batch,
    indices,
    *,
    aux: Any = None,
    model_id: int = 0,
) -> jax.Array:
    """Ψ (B, k) float32 of a batch at one checkpoint's parameters; pure and jit-compatible.

    φ_j = R_mᵀ ∇_θ f(z_j; θ) / √P, with the mask, layout and R_m of ``contract``; task keys are
    those featurization gives targets (``featurize.task_key(seed, model_id, TARGET_SPLIT)``
    folded with each example's index in ``indices``, a (B,) int array).
    """
    leaves = jax.tree_util.tree_leaves(params)
    diff = [x for x, m in zip(leaves, contract.mask, strict=True) if m]
    fixed = [x for x, m in zip(leaves, contract.mask, strict=True) if not m]
    keys = None
    if task.uses_key:
        split_key = featurize_lib.task_key(contract.seed, model_id, featurize_lib.TARGET_SPLIT)
        keys = jax.vmap(lambda i: jax.random.fold_in(split_key, i))(indices)
    _, grads = featurize_lib._value_and_grads(
        task, contract.treedef, contract.mask, diff, fixed, batch, TaskState(aux, keys)
    )
    key = None
    if contract.kind != "identity":
        key = jnp.uint32(randomness.stream_key(contract.seed, model_id, contract.kind))
    psi = backends_lib.project(
        grads, kind=contract.kind, proj_dim=contract.proj_dim, key=key,
        chunk_rows=contract.chunk_rows, precision=contract.precision, backend=contract.backend,
    )
    if contract.dtype != "float32":
        psi = psi.astype(jnp.dtype(contract.dtype)).astype(jnp.float32)
    return psi


_TRACER = getattr(jax.core, "Tracer", None)


def _is_concrete(tree) -> bool:
    if _TRACER is None:
        return False
    return not any(isinstance(x, _TRACER) for x in jax.tree_util.tree_leaves(tree))


def scores(task: Task, train_features: TrainFeatures, params, batch, indices=None) -> jax.Array:
    """S (N, B) float32 of a batch: ((1/M) Σ_m F_m Ψ_mᵀ) ⊙ q̄[:, None]. Pure, jit-compatible.

    Args:
      task: the task ``train_features`` was computed with.
      train_features: from :func:`train_features`.
      params: the parameters of the M featurized checkpoints: one pytree (M = 1), a list of M,
        or one pytree stacked on a leading axis of M (see :func:`checkpoint_params`).
      batch: pytree of arrays with a leading example axis B, as the task expects.
      indices: (B,) example indices for the task's PRNG keys (default 0 .. B − 1, as
        ``attribute`` numbers targets).

    Returns:
      (N, B) float32. NaN where a gradient is NaN (no check under jit; :func:`trakjax.attribute`
      raises instead).
    """
    if not isinstance(train_features, TrainFeatures):
        raise TypeError(
            f"train_features must be a TrainFeatures (from trakjax.train_features), got "
            f"{type(train_features).__name__}"
        )
    contract = train_features.contract
    if task.name != contract.task_name:
        raise ValueError(
            f"score_fn: task {task.name!r} differs from the task {contract.task_name!r} the train "
            "features were computed with"
        )
    per_checkpoint = checkpoint_params(params, contract)
    n = data_lib.num_examples(batch, "batch")
    if indices is None:
        indices = jnp.arange(n, dtype=jnp.int32)
    else:
        indices = jnp.asarray(indices, jnp.int32)
        if indices.shape != (n,):
            raise ValueError(f"score_fn: indices must have shape ({n},), got {indices.shape}")
    if task.validate is not None and _is_concrete(batch) and _is_concrete(per_checkpoint[0]):
        task.validate(per_checkpoint[0], batch)
    total = None
    for m, (one, model_id) in enumerate(zip(per_checkpoint, contract.model_ids, strict=True)):
        psi = target_features(
            task, contract, one, batch, indices, aux=train_features.aux[m], model_id=model_id
        )
        part = jnp.matmul(
            train_features.features[m], psi.T, precision=jax.lax.Precision.HIGHEST
        )
        total = part if total is None else total + part
    count = len(per_checkpoint)
    q_mean = jnp.mean(train_features.out_to_loss, axis=0)
    return (total / count) * q_mean[:, None]


@functools.lru_cache(maxsize=64)
def _score_fn_for(task: Task):
    """One function object per task, so that score_fns of one task share a pytree structure."""

    def score_fn(train_features, params, batch, indices=None):
        return scores(task, train_features, params, batch, indices)

    return score_fn


def scorer(task: Task, train_features: TrainFeatures) -> jax.tree_util.Partial:
    """``score_fn(params, batch, indices=None) -> (N, B)``: TRAK scores as a pure function.

    ``score_fn`` is :func:`scores` with ``task`` and ``train_features`` bound, as a
    ``jax.tree_util.Partial``: a pytree whose leaves are the train features' arrays. Pass it
    (or ``train_features``) as an argument of your jitted step::

        @jax.jit
        def step(state, score_fn, probe):
            ...
            probe_scores = score_fn(state.params, probe)     # (N, B), no host round trip

    so that refreshing the features (a new ``scorer(task, train_features(...))`` with the same
    shapes) reuses the compiled step; a ``jax.jit`` closing over ``score_fn`` instead would
    embed the (M, N, k) features in the program as constants.

    Raises:
      TypeError: if ``train_features`` is not a :class:`TrainFeatures`.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a trakjax.tasks.Task, got {type(task).__name__}")
    if not isinstance(train_features, TrainFeatures):
        raise TypeError(
            f"train_features must be a TrainFeatures (from trakjax.train_features), got "
            f"{type(train_features).__name__}"
        )
    return jax.tree_util.Partial(_score_fn_for(task), train_features)
