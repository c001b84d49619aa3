"""``trakjax.TRAKer``: a resumable, stateful session with the reference library's method names.

The imperative shell over the functional core. It only sequences calls into
:mod:`trakjax.featurize` (:func:`~trakjax.featurize.prepare_checkpoint`,
:func:`~trakjax.featurize.featurize_batch`), :mod:`trakjax.solve` (:func:`~trakjax.solve.gram`,
:func:`~trakjax.solve.solve`, :func:`~trakjax.solve.apply_inverse`) and :mod:`trakjax.scores`
(:func:`~trakjax.scores.score_blocks`, :func:`~trakjax.scores.top_k`), and keeps every result in
a :class:`trakjax.store.Store` directory, so that work can be stopped, resumed and split between
processes. Its scores equal :func:`trakjax.attribute` on the same inputs.

Migrating from the reference (``trak.TRAKer``): the method names and their order are the same::

    traker = trakjax.TRAKer(task, train_set_size=N, save_dir="run", proj_dim=2048)
    for model_id, checkpoint in enumerate(checkpoints):      # params pytrees or orbax dirs
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for batch in train_batches:
            traker.featurize(batch, num_samples=len(batch[0]))
    traker.finalize_features()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.start_scoring_checkpoint("test", checkpoint, model_id, num_targets=T)
        for batch in target_batches:
            traker.score(batch, num_samples=len(batch[0]))
    scores = traker.finalize_scores("test")                 # (N, T) float32, a memory map

Differences from the reference, on purpose: ``lambda_reg=None`` (the default) is λ chosen from
the spectrum (``"auto"``); features are float32 unless ``dtype`` says otherwise; reloading a
registered model_id resumes it (its weights must match); an already featurized example is skipped, and a
partly featurized batch computes only its missing rows; errors are exceptions, not log lines.

Resume: every featurized row is written, flushed and only then marked done, so a process killed
at any moment and restarted with the same calls ends with bit-identical scores (each call pads
its missing rows to the checkpoint's micro-batch, so a row's features never depend on which
rows it was computed with).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from trakjax import attribution as attribution_lib
from trakjax import data as data_lib
from trakjax import featurize as featurize_lib
from trakjax import projection as projection_lib
from trakjax import randomness
from trakjax import scores as scores_lib
from trakjax import sharding as sharding_lib
from trakjax import solve as solve_lib
from trakjax import store as store_lib
from trakjax.tasks import Task

logger = logging.getLogger("trakjax")

MAX_LISTED = 10
"""How many indices error messages list."""


def _describe_grad_wrt(grad_wrt) -> Any:
    """A JSON-able description of ``grad_wrt`` for the store's configuration."""
    if grad_wrt is None:
        return None
    if isinstance(grad_wrt, list | tuple) and all(isinstance(s, str) for s in grad_wrt):
        return list(grad_wrt)
    if callable(grad_wrt):
        module = getattr(grad_wrt, "__module__", "?")
        name = getattr(grad_wrt, "__qualname__", type(grad_wrt).__name__)
        return f"callable {module}.{name}"
    return "mask pytree"


def _listed(indices: np.ndarray) -> str:
    shown = [int(i) for i in indices[:MAX_LISTED]]
    return f"{shown}{' ...' if indices.size > MAX_LISTED else ''}"


def _check_index_array(inds, n: int, limit: int, limit_name: str) -> np.ndarray:
    """``inds`` as a (n,) int64 array of distinct indices in [0, limit), else ValueError."""
    try:
        indices = np.asarray(inds)
    except (TypeError, ValueError) as err:
        raise ValueError(f"inds must be a 1-D array of integers, got {type(inds).__name__}") from err
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise ValueError(
            f"inds must be a 1-D array of integers, got shape {indices.shape} dtype {indices.dtype}"
        )
    if indices.shape[0] != n:
        raise ValueError(f"inds has {indices.shape[0]} entries but the batch has {n} examples")
    indices = indices.astype(np.int64)
    bad = (indices < 0) | (indices >= limit)
    if bad.any():
        raise ValueError(
            f"inds must be in [0, {limit}) ({limit_name}={limit}); got {_listed(indices[bad])} "
            f"at batch positions {_listed(np.flatnonzero(bad))}"
        )
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"inds must be distinct; repeated: {_listed(unique[counts > 1])}")
    return indices


class TRAKer:
    """A TRAK run kept in a store directory, with the reference library's methods.

    Args:
      task: a :class:`~trakjax.tasks.Task`.
      train_set_size: N, the number of training examples.
      save_dir: the store directory (created if absent; reopened and checked if present).
      proj_dim: k (``None`` for the identity projection).
      seed: projection seed (also seeds task PRNG keys).
      projection: ``"rademacher"``, ``"normal"`` or ``"identity"``.
      lambda_reg: ``None`` or ``"auto"`` (the same) for λ chosen per checkpoint without
        retraining (:func:`trakjax.solve.auto_lambda`), or an absolute float (the reference's
        meaning); see :func:`trakjax.solve.solve`.
      grad_wrt: which parameters to differentiate (:func:`trakjax.featurize.select_parameters`).
      batch_size: examples per featurize step; each call's rows are padded to the checkpoint's
        micro-batch (at most ``batch_size``).
      dtype: storage dtype of features (float32, bfloat16 or float16).
      reference_compat: rescale each A⁻¹ by 1/mean|A⁻¹| as the reference does.
      backend: projection backend (``"xla"``, ``"pallas"`` or ``"auto"``).
      precision: matmul precision of the projection.
      init_data: the training data, for tasks with an ``init`` (per-checkpoint state).
      params_template: a pytree with the checkpoints' structure (arrays or
        ``jax.ShapeDtypeStruct``), used to restore orbax checkpoints into that structure; without
        it, the first params pytree given to this session serves, else orbax's own structure.
      score_block_rows: train rows per block of the score matrix (memory about
        ``score_block_rows · T · 24`` bytes).
      chunk_rows, matrix_cache_bytes, grad_memory_bytes: memory knobs of
        :class:`~trakjax.featurize.FeaturizeConfig`.
      mesh: a 1-D mesh with axis ``"data"`` over this process's devices; featurize steps, the
        Gram, F and score blocks are sharded over it (default: all local devices).

    Several processes under ``jax.distributed`` share one store (a filesystem every host sees):
    each featurizes and scores its own indices (e.g. ``trakjax.sharding.process_slice(N)``),
    then all call :meth:`finalize_features` and :meth:`finalize_scores` together: the Gram is
    reduced across processes (each reads its own slice of Φ), process 0 writes F, and each
    process computes and writes its share of the score blocks.
    """

    def __init__(
        self,
        task: Task,
        train_set_size: int,
        save_dir: str | os.PathLike = "./trakjax_results",
        *,
        proj_dim: int | None = 2048,
        seed: int = 0,
        projection: str = "rademacher",
        lambda_reg: float | str | None = None,
        grad_wrt: featurize_lib.GradWrt = None,
        batch_size: int = 64,
        dtype: Any = "float32",
        reference_compat: bool = False,
        backend: str = "auto",
        precision: str = "highest",
        init_data: Any = None,
        params_template: Any = None,
        score_block_rows: int = scores_lib.SCORE_BLOCK_ROWS,
        chunk_rows: int | None = None,
        matrix_cache_bytes: int = featurize_lib.DEFAULT_MATRIX_CACHE_BYTES,
        grad_memory_bytes: int = featurize_lib.DEFAULT_GRAD_MEMORY_BYTES,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a trakjax.tasks.Task, got {type(task).__name__}")
        for name, value in (("train_set_size", train_set_size), ("batch_size", batch_size),
                            ("score_block_rows", score_block_rows)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if projection == "identity":
            projection_lib.check_kind_and_dim(projection, proj_dim, proj_dim or 1)
        else:
            projection_lib.check_kind_and_dim(projection, proj_dim, 1)
        if isinstance(lambda_reg, str) and lambda_reg == solve_lib.AUTO:
            lambda_reg = None
        if lambda_reg is not None and (
            isinstance(lambda_reg, bool) or not isinstance(lambda_reg, int | float | np.floating | np.integer)
            or not np.isfinite(lambda_reg) or lambda_reg < 0
        ):
            raise ValueError(f"lambda_reg must be 'auto', None or a finite float >= 0, got {lambda_reg!r}")
        randomness.check_seed_and_model_id(seed, 0)
        self.task = task
        self.train_set_size = int(train_set_size)
        self.storage = attribution_lib.feature_dtype(dtype)
        self.lambda_reg = None if lambda_reg is None else float(lambda_reg)
        self.reference_compat = bool(reference_compat)
        self.seed = int(seed)
        self.init_data = init_data
        self.score_block_rows = int(score_block_rows)
        self.mesh = sharding_lib.check_mesh(mesh)
        self.config = featurize_lib.FeaturizeConfig(
            projection=projection, proj_dim=proj_dim, seed=self.seed, grad_wrt=grad_wrt,
            batch_size=int(batch_size), precision=precision, chunk_rows=chunk_rows,
            matrix_cache_bytes=matrix_cache_bytes, grad_memory_bytes=grad_memory_bytes,
            backend=backend, mesh=self.mesh,
        )
        featurize_lib.resolve_backend(backend)
        projection_lib.matmul_precision(precision)
        self._template = None if params_template is None else self._abstract(params_template)
        self.store = store_lib.Store.open(save_dir, {
            "task": task.name,
            "train_set_size": self.train_set_size,
            "proj_dim": proj_dim,
            "seed": self.seed,
            "projection": projection,
            "contract_version": randomness.CONTRACT_VERSION,
            "grad_wrt": _describe_grad_wrt(grad_wrt),
            "lambda_reg": self.lambda_reg,
            "reference_compat": self.reference_compat,
            "dtype": self.storage.name,
            "precision": precision,
        })
        self.save_dir = self.store.root
        self._checkpoint: featurize_lib.Checkpoint | None = None
        self._train_arrays: store_lib.TrainArrays | None = None
        self._target_arrays: store_lib.TargetArrays | None = None
        self._last_ind = 0
        self._scoring: tuple[str, featurize_lib.Checkpoint] | None = None
        self._last_ind_target = 0

    # ----------------------------------------------------------------- checkpoints

    @staticmethod
    def _abstract(tree):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tree
        )

    def _resolve_checkpoint(self, checkpoint) -> Any:
        """A params pytree from ``checkpoint``: the pytree itself, or an orbax directory restored."""
        if isinstance(checkpoint, str | os.PathLike):
            params = restore_orbax(checkpoint, self._template)
        else:
            params = checkpoint
            if not jax.tree_util.tree_leaves(params):
                raise ValueError(
                    f"checkpoint must be a params pytree or a path to an orbax checkpoint, got "
                    f"{type(checkpoint).__name__} with no array leaves"
                )
        tree = store_lib.tree_record(params)
        try:
            self.store.check_parameters(tree)
        except store_lib.StoreError as err:
            where = f"the orbax checkpoint at {checkpoint}" if isinstance(checkpoint, str | os.PathLike) else "checkpoint"
            raise store_lib.StoreError(f"{where} has a different tree structure: {err}") from err
        if self._template is None:
            self._template = self._abstract(params)
        return params

    def _prepare(self, params, model_id: int) -> tuple[featurize_lib.Checkpoint, dict, dict]:
        prepared = featurize_lib.prepare_checkpoint(
            self.task, params, self.config, model_id, init_data=self.init_data
        )
        paths = featurize_lib.parameter_paths(params)
        differentiated = {
            "paths": [p for p, m in zip(paths, prepared.mask, strict=True) if m],
            "num_params": int(prepared.layout.total),
            "proj_dim": int(prepared.proj_dim),
        }
        return prepared, store_lib.tree_record(params), differentiated

    def load_checkpoint(self, checkpoint, model_id: int) -> None:
        """Load a checkpoint for featurizing, registering ``model_id`` in the store or resuming it.

        Args:
          checkpoint: a params pytree, or the path of an orbax checkpoint directory (as written by
            ``orbax.checkpoint.StandardCheckpointer().save(path, params)``).
          model_id: the checkpoint's id in [0, 2³²); it selects the projection matrix. A
            registered model_id resumes, and its weights must match the stored fingerprint.
        """
        model_id = _check_model_id(model_id)
        params = self._resolve_checkpoint(checkpoint)
        prepared, tree, differentiated = self._prepare(params, model_id)
        self.store.register_model(model_id, store_lib.fingerprint(params), tree, differentiated)
        self._checkpoint = prepared
        self._train_arrays = self.store.train_arrays(model_id)
        self._last_ind = 0

    # ----------------------------------------------------------------- featurizing

    def _batch_indices(self, batch, inds, num_samples, next_index: int, limit: int, limit_name: str):
        n = data_lib.num_examples(batch, "batch")
        if (inds is None) == (num_samples is None):
            raise ValueError("exactly one of inds and num_samples must be given")
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples != n:
                raise ValueError(f"num_samples must be the batch's size {n}, got {num_samples!r}")
            if next_index + n > limit:
                raise ValueError(
                    f"num_samples={n} after {next_index} examples overflows {limit_name}={limit}: "
                    f"it would write indices {next_index} .. {next_index + n - 1}"
                )
            return np.arange(next_index, next_index + n, dtype=np.int64)
        return _check_index_array(inds, n, limit, limit_name)

    def _featurize_rows(self, checkpoint, batch, indices, rows, split: int) -> featurize_lib.BatchFeatures:
        """Featurize the batch positions ``rows``, padded to whole micro-batches (fixed shapes)."""
        if rows.size != indices.size:
            batch = jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], batch)
        micro = checkpoint.micro_batch
        padded = -(-rows.size // micro) * micro
        batch = data_lib.pad_batch(batch, padded)
        wanted = indices[rows]
        padded_indices = np.concatenate([wanted, np.repeat(wanted[-1:], padded - rows.size)])
        out = featurize_lib.featurize_batch(
            self.task, checkpoint, batch, padded_indices, split=split,
            with_out_to_loss=split == featurize_lib.TRAIN_SPLIT,
        )
        return featurize_lib.BatchFeatures(*(x[: rows.size] for x in out))

    def featurize(self, batch, inds=None, num_samples: int | None = None) -> None:
        """Featurize training examples at the loaded checkpoint: φ and q, written to the store.

        Args:
          batch: pytree of arrays with a leading example axis B.
          inds: (B,) distinct training indices of the batch's examples; or
          num_samples: B, to take the next B indices after those of earlier ``num_samples``
            calls since :meth:`load_checkpoint`.

        Examples already featurized are skipped without computing anything; a partly featurized
        batch computes only its missing rows.
        """
        if self._checkpoint is None:
            raise ValueError("no checkpoint is loaded; call load_checkpoint(checkpoint, model_id) before featurize")
        checkpoint = self._checkpoint
        indices = self._batch_indices(batch, inds, num_samples, self._last_ind,
                                      self.train_set_size, "train_set_size")
        arrays = self._train_arrays
        rows = np.flatnonzero(np.asarray(arrays.done[indices]) == 0)
        if rows.size:
            out = self._featurize_rows(checkpoint, batch, indices, rows, featurize_lib.TRAIN_SPLIT)
            self.store.write_train_rows(arrays, indices[rows], out.features, out.out_to_loss)
        if num_samples is not None:
            self._last_ind += indices.size

    def _model_ids(self, model_ids) -> list[int]:
        if model_ids is None:
            ids = self.store.model_ids()
            if not ids:
                raise ValueError(f"the store at {self.store.root} has no checkpoint; call load_checkpoint first")
            return ids
        ids = [_check_model_id(m) for m in model_ids]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"model_ids must be a non-empty list of distinct ids, got {list(model_ids)}")
        unknown = [m for m in ids if not self.store.has_model(m)]
        if unknown:
            raise ValueError(
                f"model_ids {unknown} are not in the store at {self.store.root} (registered: "
                f"{self.store.model_ids()})"
            )
        return ids

    def finalize_features(self, model_ids: Sequence[int] | None = None) -> None:
        """Solve each checkpoint's kernel and store its features F = Φ (ΦᵀΦ + λI)⁻¹.

        Every requested checkpoint must be fully featurized (checked for all before any work).
        Finalized checkpoints are skipped; finalizing is atomic (a temporary file renamed, then
        the model marked), so a killed call is simply repeated.

        Args:
          model_ids: which checkpoints (default: all in the store).
        """
        ids = self._model_ids(model_ids)
        n = self.train_set_size
        distributed = jax.process_count() > 1
        if distributed:
            _barrier("trakjax finalize_features: every process has featurized")
        for model_id in ids:
            missing = self.store.missing_train(model_id)
            if missing.size:
                raise ValueError(
                    f"model_id {model_id} has {missing.size} of {n} training examples not "
                    f"featurized yet (first indices {_listed(missing)}); featurize them before "
                    "finalize_features"
                )
        for model_id in ids:
            if self.store.is_finalized(model_id):
                logger.info("model_id %d is already finalized; skipping it", model_id)
                continue
            if distributed:
                self._finalize_distributed(model_id)
                continue
            with self.store.lock(self.store.root / "models" / str(model_id) / ".lock"):
                if self.store.is_finalized(model_id):
                    continue
                self._finalize_one(model_id)

    def _kernel(self, model_id: int, phi) -> solve_lib.KernelSolve:
        """Solve a checkpoint's kernel; under jax.distributed each process adds its own rows'
        Gram (its :func:`~trakjax.sharding.process_slice`) to the cross-process sum."""
        start, stop = sharding_lib.process_slice(phi.shape[0])
        k = phi.shape[1]
        local = solve_lib.gram(phi[start:stop], mesh=self.mesh) if stop > start else np.zeros((k, k))
        num_params = int(self.store.parameters()["differentiated"]["num_params"])
        return solve_lib.solve(
            sharding_lib.process_sum(local), self.lambda_reg, reference_compat=self.reference_compat,
            num_examples=phi.shape[0], num_params=num_params, storage_dtype=self.storage,
        )

    def _finalize_one(self, model_id: int) -> None:
        phi = self.store.train_arrays(model_id, "r").grads
        kernel = self._kernel(model_id, phi)
        details = {
            "lambda_reg": kernel.lambda_reg, "rank": kernel.rank,
            "condition": kernel.condition, "scale": kernel.scale,
        }
        self.store.write_features(
            model_id, lambda out: solve_lib.apply_inverse(phi, kernel, out=out, mesh=self.mesh), details
        )

    def _finalize_distributed(self, model_id: int) -> None:
        """Every process reduces the Gram; process 0 writes F; all wait for it."""
        phi = self.store.train_arrays(model_id, "r").grads
        kernel = self._kernel(model_id, phi)
        if jax.process_index() == 0:
            details = {
                "lambda_reg": kernel.lambda_reg, "rank": kernel.rank,
                "condition": kernel.condition, "scale": kernel.scale,
            }
            self.store.write_features(
                model_id, lambda out: solve_lib.apply_inverse(phi, kernel, out=out, mesh=self.mesh),
                details,
            )
        _barrier(f"trakjax finalize_features: model {model_id} written")

    # ----------------------------------------------------------------- scoring

    def start_scoring_checkpoint(self, exp_name: str, checkpoint, model_id: int, num_targets: int) -> None:
        """Load a finalized checkpoint for scoring the targets of experiment ``exp_name``.

        Args:
          exp_name: the experiment (a set of targets); a directory name.
          checkpoint: the same weights that were featurized under ``model_id`` (pytree or orbax
            directory).
          model_id: a finalized checkpoint of the store.
          num_targets: T, the experiment's number of targets.
        """
        store_lib.check_experiment_name(exp_name)
        model_id = _check_model_id(model_id)
        if isinstance(num_targets, bool) or not isinstance(num_targets, int | np.integer) or num_targets < 1:
            raise ValueError(f"num_targets must be an int >= 1, got {num_targets!r}")
        if not self.store.has_model(model_id):
            raise ValueError(
                f"model_id {model_id} is not in the store at {self.store.root}; load_checkpoint, "
                "featurize and finalize_features it before scoring"
            )
        if not self.store.is_finalized(model_id):
            raise ValueError(
                f"model_id {model_id} is not finalized: call finalize_features([{model_id}]) "
                "before scoring with it"
            )
        if self.store.has_experiment(exp_name):
            stored = int(self.store.experiment_info(exp_name)["num_targets"])
            if stored != num_targets:
                raise ValueError(
                    f"experiment {exp_name!r} has num_targets={stored}, this call has "
                    f"num_targets={num_targets}; use another exp_name for other targets"
                )
        params = self._resolve_checkpoint(checkpoint)
        self.store.check_weights(model_id, store_lib.fingerprint(params))
        prepared, _, _ = self._prepare(params, model_id)
        self.store.register_target_model(exp_name, int(num_targets), model_id)
        self._scoring = (exp_name, prepared)
        self._target_arrays = self.store.target_arrays(exp_name, model_id)
        self._last_ind_target = 0

    def score(self, batch, inds=None, num_samples: int | None = None) -> None:
        """Featurize targets at the scoring checkpoint (ψ), written to the store.

        ``inds`` are target indices in [0, num_targets); ``num_samples`` takes the next ones
        since :meth:`start_scoring_checkpoint`. Done targets are skipped.
        """
        if self._scoring is None:
            raise ValueError("call start_scoring_checkpoint(exp_name, checkpoint, model_id, num_targets) before score")
        exp_name, checkpoint = self._scoring
        if not self.store.is_finalized(checkpoint.model_id):
            raise ValueError(f"model_id {checkpoint.model_id} is not finalized; call finalize_features first")
        arrays = self._target_arrays
        indices = self._batch_indices(batch, inds, num_samples, self._last_ind_target,
                                      arrays.done.shape[0], "num_targets")
        rows = np.flatnonzero(np.asarray(arrays.done)[indices] == 0)
        if rows.size:
            out = self._featurize_rows(checkpoint, batch, indices, rows, featurize_lib.TARGET_SPLIT)
            self.store.write_target_rows(arrays, indices[rows], out.features)
        if num_samples is not None:
            self._last_ind_target += indices.size

    def _score_inputs(self, exp_name: str, model_ids) -> tuple[list[int], list, list, list]:
        """The checked per-checkpoint inputs of the experiment's scores: ids, F_m, Ψ_m, q^m."""
        info = self.store.experiment_info(exp_name)
        ids = self._model_ids(model_ids)
        problems = []
        for model_id in ids:
            if not self.store.is_finalized(model_id):
                problems.append(f"model_id {model_id} is not finalized (call finalize_features)")
            elif model_id not in info["model_ids"]:
                problems.append(
                    f"model_id {model_id} has no target gradients (call start_scoring_checkpoint"
                    f"({exp_name!r}, checkpoint, {model_id}, {info['num_targets']}) and score)"
                )
            else:
                missing = self.store.missing_targets(exp_name, model_id)
                if missing.size:
                    problems.append(
                        f"model_id {model_id} has {missing.size} of {info['num_targets']} targets "
                        f"not scored yet (first indices {_listed(missing)})"
                    )
        if problems:
            raise ValueError(f"experiment {exp_name!r} is not ready for finalize_scores:\n  " + "\n  ".join(problems))
        features = [self.store.features(m) for m in ids]
        targets = [self.store.target_arrays(exp_name, m, "r").grads for m in ids]
        out_to_loss = [self.store.train_arrays(m, "r").out_to_loss for m in ids]
        return ids, features, targets, out_to_loss

    def finalize_scores(self, exp_name: str, model_ids: Sequence[int] | None = None) -> np.ndarray:
        """The experiment's scores S (N, T): ``((1/M) Σ_m F_m Ψ_mᵀ) ⊙ q̄``, written to the store.

        Computed and written block by block of ``score_block_rows`` train rows (memory bounded
        independently of N); blocks already written are kept, so a killed call resumes.

        Args:
          exp_name: the experiment.
          model_ids: checkpoints to ensemble (default: all in the store, ascending).

        Returns:
          The (N, T) float32 scores as a read-only memory map of the store's file.
        """
        store_lib.check_experiment_name(exp_name)
        distributed = jax.process_count() > 1
        if distributed:
            _barrier(f"trakjax finalize_scores {exp_name}: every process has scored")
        ids, features, targets, out_to_loss = self._score_inputs(exp_name, model_ids)
        record = self.store.experiment_info(exp_name).get("scores") or {}
        if (record.get("complete") and record.get("model_ids") == ids
                and record.get("block_rows") == self.score_block_rows):
            self._last_ind_target = 0
            return self.store.scores(exp_name)
        if distributed:
            _barrier(f"trakjax finalize_scores {exp_name}: inputs checked")
        arrays = self.store.score_arrays(exp_name, ids, self.score_block_rows)
        todo = np.flatnonzero(np.asarray(arrays.done) == 0)
        if distributed:  # each process computes every process_count-th block
            todo = todo[todo % jax.process_count() == jax.process_index()]
        blocks = scores_lib.score_blocks(
            features, targets, out_to_loss, block_rows=self.score_block_rows, blocks=todo.tolist(),
            mesh=self.mesh,
        )
        for block, (start, values) in zip(todo, blocks, strict=True):
            self.store.write_score_block(arrays, int(block), start, values)
        if distributed:
            _barrier(f"trakjax finalize_scores {exp_name}: blocks written")
            if jax.process_index() == 0:
                self.store.complete_scores(exp_name)
            _barrier(f"trakjax finalize_scores {exp_name}: complete")
        else:
            self.store.complete_scores(exp_name)
        self._last_ind_target = 0
        return self.store.scores(exp_name)

    def top_k(self, exp_name: str, k: int, model_ids: Sequence[int] | None = None) -> scores_lib.TopK:
        """The k top proponents and opponents of every target, streamed block by block.

        Reads the finalized score matrix when it exists for these checkpoints, else computes
        score blocks from the features without writing (or holding) the score matrix.
        """
        store_lib.check_experiment_name(exp_name)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self.train_set_size:
            raise ValueError(f"k must be an int in [1, train_set_size={self.train_set_size}], got {k!r}")
        ids, features, targets, out_to_loss = self._score_inputs(exp_name, model_ids)
        record = self.store.experiment_info(exp_name).get("scores") or {}
        if record.get("complete") and record.get("model_ids") == ids:
            stored = self.store.scores(exp_name)
            rows = self.score_block_rows
            blocks = ((s, stored[s : s + rows]) for s in range(0, stored.shape[0], rows))
        else:
            blocks = scores_lib.score_blocks(
                features, targets, out_to_loss, block_rows=self.score_block_rows, mesh=self.mesh
            )
        return scores_lib.top_k(blocks, int(k))


def _barrier(name: str) -> None:
    """Wait until every process of a jax.distributed job reaches the barrier ``name``."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _check_model_id(model_id) -> int:
    if isinstance(model_id, bool) or not isinstance(model_id, int | np.integer) or not 0 <= model_id < 2**32:
        raise ValueError(f"model_id must be an int in [0, 2**32), got {model_id!r}")
    return int(model_id)


def restore_orbax(path, template=None):
    """Restore a params pytree from an orbax checkpoint directory.

    The checkpoint is restored as orbax wrote it (no casting), then, with a ``template``, its
    leaves are matched to the template's by '/'-joined path and put into the template's pytree
    structure (so containers such as tuples or flax structs come back as they were).

    Args:
      path: a directory written by ``orbax.checkpoint.StandardCheckpointer().save`` (or a
        ``PyTreeCheckpointer``).
      template: optional pytree (arrays or ``jax.ShapeDtypeStruct``) whose structure, shapes and
        dtypes the checkpoint must have.

    Raises:
      ValueError: naming ``path`` when it does not exist, is not an orbax checkpoint, or holds a
        tree with other leaves, shapes or dtypes than ``template`` (each difference listed).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"orbax checkpoint path {path} does not exist or is not a directory")
    try:
        restored = ocp.StandardCheckpointer().restore(path)
    except FileNotFoundError as err:
        raise ValueError(f"{path} is not an orbax checkpoint directory ({err})") from err
    if template is None:
        return restored
    found = store_lib.tree_record(restored)
    wanted = store_lib.tree_record(template)
    lines = store_lib.tree_differences(wanted, found, check_order=False,
                                       names=("expected tree", "checkpoint"))
    if lines:
        raise ValueError(
            f"the orbax checkpoint at {path} holds a different tree structure than this run's "
            "checkpoints:\n  " + "\n  ".join(lines)
        )
    by_path = dict(zip(found["paths"], jax.tree_util.tree_leaves(restored), strict=True))
    leaves = [by_path[p] for p in wanted["paths"]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
