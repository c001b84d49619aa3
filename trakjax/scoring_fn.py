"""Scoring as a pure, jit-compatible function, for TRAK scores inside a user's jitted step.

:func:`train_features` does the per-checkpoint work once, on the host, through the pipeline
:func:`trakjax.attribute` runs (:func:`trakjax.pipeline.solved_checkpoints`), and returns a :class:`TrainFeatures` pytree resident on
device: per checkpoint m the features F_m = Φ_m A_m⁻¹ (N, k) and out-to-loss terms q^m (N,), the
task's auxiliary state, and (static, in the pytree's structure) the projection contract.

:func:`scorer` turns it into ``score_fn(params, batch) -> (N, B)``::

    S = ( (1/M) Σ_m F_m Ψ_mᵀ ) ⊙ q̄[:, None],    q̄ = (1/M) Σ_m q^m

where Ψ_m (B, k) are the batch's per-example gradients at the m-th parameters, projected with
the m-th checkpoint's R by the featurization step itself
(:func:`trakjax.featurize.per_example_features`). Everything in ``score_fn`` is jnp: R generated from the counter-based contract with its
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

from trakjax import data as data_lib
from trakjax import families, randomness
from trakjax import featurize as featurize_lib
from trakjax import projection as projection_lib
from trakjax import scores as scores_lib
from trakjax.config import Config
from trakjax.errors import ArgumentTypeError, InvalidArgumentError
from trakjax.pipeline import solved_checkpoints
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
      spec: the :class:`~trakjax.featurize.FeatureSpec` (parameter structure and mask,
        projection kind, k, chunking, precision, backend); its fields read as attributes here.
      seed: projection seed (also seeds task PRNG keys).
      model_ids: one id per checkpoint, in order.
      dtype: feature storage dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
      leaf_shapes: shape of each parameter leaf, in flattening order.
      paths: '/'-joined path of each parameter leaf (for error messages).
      layout: :class:`~trakjax.projection.ParameterLayout` of the differentiated leaves.
      num_train: N.
    """

    contract_version: int
    task_name: str
    spec: featurize_lib.FeatureSpec
    seed: int
    model_ids: tuple[int, ...]
    dtype: str
    leaf_shapes: tuple[tuple[int, ...], ...]
    paths: tuple[str, ...]
    layout: projection_lib.ParameterLayout
    num_train: int

    def __getattr__(self, name):
        # kind, proj_dim, treedef, mask, chunk_rows, precision, backend: the spec's fields.
        if name in featurize_lib.FeatureSpec._fields:
            return getattr(self.spec, name)
        raise AttributeError(f"FeatureContract has no attribute {name!r}")


jax.tree_util.register_static(FeatureContract)


class TrainFeatures(NamedTuple):
    """The training side of TRAK for M checkpoints, as a pytree of device arrays.

    Attributes:
      features: (M, N, k) float32, F_m = Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ (rounded through ``dtype``).
      out_to_loss: (M, N) float32, q^m.
      aux: tuple of M per-checkpoint task states (``task.init``'s output, or ``None``).
      lambda_reg: (M,) float32, the λ_m used (for the record).
      contract: the static :class:`FeatureContract`.
      projections: each checkpoint's randomness as a scorer keeps it (the family's
        ``scoring_arrays``: R's key for the dense family, the factor matrices for the
        factorized one).
    """

    features: jax.Array
    out_to_loss: jax.Array
    aux: tuple
    lambda_reg: jax.Array
    contract: FeatureContract
    projections: tuple = ()


def train_features(
    task: Task,
    checkpoints: Sequence[Any],
    train: Any,
    config: Config | None = None,
    *,
    model_ids: Sequence[int] | None = None,
    **settings,
) -> TrainFeatures:
    """Featurize and solve the training set at each checkpoint: the input of :func:`scorer`.

    Per checkpoint m, as in :func:`trakjax.attribute` (the same pipeline,
    :func:`trakjax.pipeline.solved_checkpoints`): Φ_m = featurize(train), A_m = Φ_mᵀΦ_m + λI,
    F_m = Φ_m A_m⁻¹, q^m. The arguments mean what they mean in :func:`trakjax.attribute`;
    calling :func:`scorer` on the result with ``batch = targets`` gives
    ``attribute(task, checkpoints, train, targets, ...)``. ``mesh`` shards featurization and
    the Gram over this process's devices; the result is one array set (not split across
    ``jax.distributed`` processes, which this function refuses).

    Returns:
      :class:`TrainFeatures`, its arrays on the default device.
    """
    config = Config.create(config, **settings)
    if jax.process_count() > 1:
        raise InvalidArgumentError(
            f"train_features holds every training example's features in one process, but "
            f"jax.distributed runs {jax.process_count()} processes; use trakjax.attribute there"
        )
    kept = []  # per checkpoint: (F_m, q^m, aux_m, λ_m, model_id, randomness); Φ_m is dropped at once
    first = None
    for solved in solved_checkpoints(task, checkpoints, train, config, model_ids):
        first = first or solved.checkpoint
        checkpoint = solved.checkpoint
        projection = families.family_of(checkpoint.spec).scoring_arrays(checkpoint.spec, checkpoint.arrays)
        kept.append((solved.features, np.asarray(solved.out_to_loss, np.float32), checkpoint.aux,
                     solved.details.lambda_reg, solved.details.model_id, projection))
    features, out_to_loss, auxes, lambdas, ids, projections = zip(*kept, strict=True)
    params = checkpoints[0]
    contract = FeatureContract(
        contract_version=randomness.CONTRACT_VERSION,
        task_name=task.name,
        spec=first.spec,
        seed=config.result.seed,
        model_ids=tuple(ids),
        dtype=config.result.dtype,
        leaf_shapes=tuple(tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params)),
        paths=tuple(featurize_lib.parameter_paths(params)),
        layout=first.layout,
        num_train=int(features[0].shape[0]),
    )
    return TrainFeatures(
        features=jnp.asarray(np.stack(features)),
        out_to_loss=jnp.asarray(np.stack(out_to_loss)),
        aux=tuple(auxes),
        lambda_reg=jnp.asarray(np.asarray(lambdas, np.float32)),
        contract=contract,
        projections=tuple(projections),
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
                raise InvalidArgumentError(
                    f"score_fn: params is one checkpoint, but the train features hold M = {m} "
                    f"checkpoints (model_ids {list(contract.model_ids)}); pass a list of {m} "
                    f"parameter pytrees or one pytree stacked on a leading axis of {m}"
                )
            return [params]
        stacked = tuple((m,) + s for s in contract.leaf_shapes)
        if shapes == stacked:
            return [jax.tree_util.tree_map(lambda x, i=i: x[i], params) for i in range(m)]
        raise InvalidArgumentError(
            f"score_fn: {_first_difference(contract, shapes, contract.leaf_shapes, 'params')} "
            f"(or, stacked over the M = {m} checkpoints, {stacked[0] if stacked else ()}…)"
        )
    if isinstance(params, list | tuple):
        if len(params) != m:
            raise InvalidArgumentError(
                f"score_fn: params is a list of {len(params)} pytrees, but the train features "
                f"hold M = {m} checkpoints (model_ids {list(contract.model_ids)})"
            )
        for i, one in enumerate(params):
            if jax.tree_util.tree_structure(one) != contract.treedef:
                raise _structure_error(contract, one, f"params[{i}]")
            shapes = _leaf_shapes(one)
            if shapes != contract.leaf_shapes:
                raise InvalidArgumentError(
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
    arrays: Any = None,
) -> jax.Array:
    """Ψ (B, k) float32 of a batch at one checkpoint's parameters; pure and jit-compatible.

    φ_j = R_mᵀ ∇_θ f(z_j; θ) / √P (or the factorized features), with the spec of ``contract``
    and the checkpoint's randomness ``arrays`` (:attr:`TrainFeatures.projections`; default: the
    family's ``instantiate`` for ``model_id``, nothing materialized); task keys are those
    featurization gives targets (``featurize.task_key(seed, model_id, TARGET_SPLIT)`` folded
    with each example's index in ``indices``, a (B,) int array).
    """
    diff, fixed = featurize_lib.split_parameters(params, contract.mask)
    split_key = featurize_lib.task_key(contract.seed, model_id, featurize_lib.TARGET_SPLIT)
    state = TaskState(aux, featurize_lib.example_keys(task, split_key, indices))
    if arrays is None:
        arrays = families.family_of(contract.spec).instantiate(contract.spec, contract.seed, model_id, 0)
    psi, _, _ = featurize_lib.per_example_features(task, contract.spec, arrays, diff, fixed, batch, state)
    if contract.dtype != "float32":
        psi = psi.astype(jnp.dtype(contract.dtype)).astype(jnp.float32)
    return psi


_TRACER = getattr(jax.core, "Tracer", None)


def _is_concrete(tree) -> bool:
    if _TRACER is None:
        return False
    return not any(isinstance(x, _TRACER) for x in jax.tree_util.tree_leaves(tree))


def score(task: Task, train_features: TrainFeatures, params, batch, indices=None) -> jax.Array:
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
        raise ArgumentTypeError(
            f"train_features must be a TrainFeatures (from trakjax.train_features), got "
            f"{type(train_features).__name__}"
        )
    contract = train_features.contract
    if task.name != contract.task_name:
        raise InvalidArgumentError(
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
            raise InvalidArgumentError(f"score_fn: indices must have shape ({n},), got {indices.shape}")
    if task.validate is not None and _is_concrete(batch) and _is_concrete(per_checkpoint[0]):
        task.validate(per_checkpoint[0], batch)

    def parts():
        for m, (one, model_id) in enumerate(zip(per_checkpoint, contract.model_ids, strict=True)):
            arrays = train_features.projections[m] if train_features.projections else None
            psi = target_features(task, contract, one, batch, indices, aux=train_features.aux[m],
                                  model_id=model_id, arrays=arrays)
            part = jnp.matmul(train_features.features[m], psi.T, precision=jax.lax.Precision.HIGHEST)
            yield part, train_features.out_to_loss[m]

    return scores_lib.ensemble(parts())


@functools.lru_cache(maxsize=64)
def _score_fn_for(task: Task):
    """One function object per task, so that score_fns of one task share a pytree structure."""

    def score_fn(train_features, params, batch, indices=None):
        return score(task, train_features, params, batch, indices)

    return score_fn


def scorer(task: Task, train_features: TrainFeatures) -> jax.tree_util.Partial:
    """``score_fn(params, batch, indices=None) -> (N, B)``: TRAK scores as a pure function.

    ``score_fn`` is :func:`score` with ``task`` and ``train_features`` bound, as a
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
        raise ArgumentTypeError(f"task must be a trakjax.tasks.Task, got {type(task).__name__}")
    if not isinstance(train_features, TrainFeatures):
        raise ArgumentTypeError(
            f"train_features must be a TrainFeatures (from trakjax.train_features), got "
            f"{type(train_features).__name__}"
        )
    return jax.tree_util.Partial(_score_fn_for(task), train_features)
