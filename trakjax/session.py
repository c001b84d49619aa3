"""``trakjax.TRAKer``: a resumable, stateful session with the reference library's method names.

The imperative shell over the functional core. It only sequences calls into
:mod:`trakjax.featurize` (:func:`~trakjax.featurize.prepare_checkpoint`,
:func:`~trakjax.featurize.featurize_batch`), :mod:`trakjax.pipeline`
(:func:`~trakjax.pipeline.checkpoint_kernel`: Gram, cross-process sum, solve),
:mod:`trakjax.solve` (:func:`~trakjax.solve.apply_inverse`) and :mod:`trakjax.scores`
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

or all of it in one call, :meth:`TRAKer.run` (what ``trakjax demo`` and ``trakjax attribute``
use), which also refuses to return a finished result whose inputs changed.

Differences from the reference, on purpose: ``lambda_reg="auto"`` (the default) is λ chosen
from the spectrum; features are float32 unless ``dtype`` says otherwise; reloading a registered
model_id resumes it (its weights must match); an already featurized example is skipped, and a
partly featurized batch computes only its missing rows; errors are exceptions, not log lines.

Resume: every featurized row is written, flushed and only then marked done, so a process killed
at any moment and restarted with the same calls ends with bit-identical scores (each call pads
its missing rows to the checkpoint's micro-batch, so a row's features never depend on which
rows it was computed with).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from trakjax import checkpoints as checkpoints_lib
from trakjax import data as data_lib
from trakjax import families, manifest, memory_limits, store_settings, trees
from trakjax import featurize as featurize_lib
from trakjax import scores as scores_lib
from trakjax import sharding as sharding_lib
from trakjax import solve as solve_lib
from trakjax import store as store_lib
from trakjax import task_fingerprint as task_fingerprint_lib
from trakjax.config import Config, check_int
from trakjax.errors import ArgumentTypeError, InputsChangedError, InvalidArgumentError, StoreError
from trakjax.pipeline import (
    RidgeInputs,
    check_model_ids,
    check_targets_fit,
    checkpoint_kernel,
    run_kernel,
)
from trakjax.progress import progress_bar
from trakjax.tasks import Task

logger = logging.getLogger("trakjax")
MAX_LISTED = 10
"""How many indices error messages list."""



def _listed(indices: np.ndarray) -> str:
    shown = [int(i) for i in indices[:MAX_LISTED]]
    return f"{shown}{' ...' if indices.size > MAX_LISTED else ''}"


def _check_index_array(inds, n: int, limit: int, limit_name: str) -> np.ndarray:
    """``inds`` as a (n,) int64 array of distinct indices in [0, limit), else an error."""
    try:
        indices = np.asarray(inds)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"inds must be a 1-D array of integers, got {type(inds).__name__}") from err
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise InvalidArgumentError(
            f"inds must be a 1-D array of integers, got shape {indices.shape} dtype {indices.dtype}"
        )
    if indices.shape[0] != n:
        raise InvalidArgumentError(f"inds has {indices.shape[0]} entries but the batch has {n} examples")
    indices = indices.astype(np.int64)
    bad = (indices < 0) | (indices >= limit)
    if bad.any():
        raise InvalidArgumentError(
            f"inds must be in [0, {limit}) ({limit_name}={limit}); got {_listed(indices[bad])} "
            f"at batch positions {_listed(np.flatnonzero(bad))}"
        )
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise InvalidArgumentError(f"inds must be distinct; repeated: {_listed(unique[counts > 1])}")
    return indices


def _check_model_id(model_id) -> int:
    return check_int("model_id", model_id, 0, 2**32)


def _barrier(name: str) -> None:
    """Wait until every process of a jax.distributed job reaches the barrier ``name``."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tree)


class TRAKer:
    """A TRAK run kept in a store directory, with the reference library's methods.

    Args:
      task: a :class:`~trakjax.tasks.Task`.
      train_set_size: N, the number of training examples.
      save_dir: the store directory (``~`` expanded). An existing store is reopened and checked
        at once; a new one is created when the first checkpoint has been checked, so that a bad
        setting or checkpoint leaves nothing behind.
      config: a :class:`trakjax.Config` (default: all defaults).
      init_data: the training data, for tasks with an ``init`` (per-checkpoint state).
      params_template: a pytree with the checkpoints' structure (arrays or
        ``jax.ShapeDtypeStruct``), used to restore orbax checkpoints into that structure and to
        check ``grad_wrt`` before anything is written; without it, the first params pytree given
        to this session serves, else orbax's own structure.
      score_block_rows: train rows per block of the score matrix (memory about
        ``score_block_rows · T · 24`` bytes).
      store_record: more JSON-able settings that decide the scores, recorded in the store and
        compared like the result settings (the command line records its model settings).
      **settings: settings overriding ``config``'s (:meth:`trakjax.Config.create`): ``proj_dim``,
        ``seed``, ``projection``, ``lambda_reg``, ``grad_wrt``, ``dtype``, ``reference_compat``,
        ``precision`` (recorded in the store) and ``batch_size`` (each call's rows are padded to
        the checkpoint's micro-batch, at most ``batch_size``), ``backend``, memory budgets,
        ``mesh`` (featurize steps, the Gram, F and score blocks are sharded over it; default all
        local devices) and ``progress`` (for :meth:`run`).

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
        config: Config | None = None,
        *,
        init_data: Any = None,
        params_template: Any = None,
        score_block_rows: int = scores_lib.SCORE_BLOCK_ROWS,
        store_record: dict | None = None,
        **settings,
    ):
        if not isinstance(task, Task):
            raise ArgumentTypeError(f"task must be a trakjax.tasks.Task, got {type(task).__name__}")
        self.train_set_size = check_int("train_set_size", train_set_size)
        self.score_block_rows = check_int("score_block_rows", score_block_rows)
        self.config = Config.create(config, **settings)
        self.config = self.config.replace(mesh=sharding_lib.check_mesh(self.config.run.mesh))
        if not isinstance(save_dir, str | os.PathLike):
            raise ArgumentTypeError(f"save_dir must be a path, got {type(save_dir).__name__}")
        self.task = task
        self.init_data = init_data
        self.mesh = self.config.run.mesh
        self.seed = self.config.result.seed
        self.storage = self.config.result.storage_dtype
        self._template = None if params_template is None else _abstract(params_template)
        if self._template is not None:
            featurize_lib.select_parameters(self._template, self.config.result.grad_wrt)
        self.save_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(save_dir))))
        self._store = None
        self._store_record = dict(store_record or {})
        self._task_checked = False
        if (self.save_dir / store_lib.METADATA_FILE).is_file():
            stored = store_lib.read_json(self.save_dir / store_lib.METADATA_FILE)
            if isinstance(stored, dict) and isinstance(stored.get("config"), dict):
                self.config = store_settings.adopt_stored_settings(self.config, stored["config"])
                self.seed = self.config.result.seed
                self.storage = self.config.result.storage_dtype
        self._resolve_kernel()
        if (self.save_dir / store_lib.METADATA_FILE).is_file():
            self._store = store_lib.Store.open(self.save_dir, self._store_config())
        self._had_results = bool(self._store is not None and self._store.model_ids())
        self._example = None if init_data is None else featurize_lib.one_example(init_data)
        self._pending: tuple | None = None  # a load or scoring start waiting for an example
        self._checkpoint: featurize_lib.Checkpoint | None = None
        self._spec = None  # the run's plan (featurize.plan_features), from the first checkpoint
        self._train_arrays: store_lib.TrainArrays | None = None
        self._target_arrays: store_lib.TargetArrays | None = None
        self._last_ind = 0
        self._scoring: tuple[str, featurize_lib.Checkpoint] | None = None
        self._last_ind_target = 0

    def _resolve_kernel(self) -> None:
        """Fix the kernel before the store is opened. An unset kernel has already adopted an
        existing store's (a store without one ran TRAK's: :mod:`trakjax.store_settings`); what
        is still ``"auto"`` the task decides (:func:`trakjax.curvature.resolve_kernel`), and an
        explicit kernel is checked against the task."""
        resolved = run_kernel(self.task, self.config.result)
        self.config = self.config.replace(kernel=resolved).with_given(self.config.given_settings())

    def _resolve_auto(self, params) -> None:
        """Resolve ``projection="auto"`` and an unset ``factor_dims`` once, at the first checkpoint
        (before the store records them)."""
        result = self.config.result
        if result.projection == "auto" or (result.projection == "factorized" and result.factor_dims is None):
            self.config = featurize_lib.resolve_auto_projection(
                self.task, params, self.config, example=self._example, init_data=self.init_data)

    def _store_config(self) -> dict:
        return {"task": self.task.name, "train_set_size": self.train_set_size, **self.config.result.record(),
                **self._store_record}

    # ----------------------------------------------------------------- the task's fingerprint

    def _task_fingerprint(self, params, example, aux=None) -> str:
        if self.task.init is not None and aux is None:
            data = self.init_data if self.init_data is not None and not callable(self.init_data) else None
            if data is not None:
                aux = jax.eval_shape(self.task.init, _abstract(params), _abstract(data))
        return task_fingerprint_lib.task_fingerprint(self.task, params, example, aux)

    def _task_change(self, params, example, aux=None, record: bool = True) -> str | None:
        """How the task differs from the one the store's results were computed with (None if
        it does not, or cannot be compared); with ``record``, records the fingerprint where it
        is missing."""
        if self._store is None and not (self.save_dir / store_lib.METADATA_FILE).is_file() and not record:
            return None
        store = self.store
        versions = task_fingerprint_lib.versions_key()
        found = self._task_fingerprint(params, example, aux)
        stored = store.task_fingerprint(versions)
        if stored is not None:
            return None if stored == found else (
                f"the task {self.task.name!r}: what it computes changed (fingerprint {stored} in the "
                f"store, {found} now)")
        if not record:
            return None
        others = store.task_fingerprint_versions()
        if others:
            warnings.warn(
                f"the store at {store.root} records the task's fingerprint traced by {others}, this is "
                f"{versions}: the task could not be compared (jaxprs print differently across "
                "releases); recording this version's fingerprint", stacklevel=4)
        elif self._had_results:
            warnings.warn(
                f"the store at {store.root} records no fingerprint of its task (written by an "
                "earlier trakjax): the task could not be compared; recording it now", stacklevel=4)
        if store.read_only:
            return None
        store.record_task_fingerprint(versions, found)
        return None

    def _check_task(self, params, example, aux=None) -> None:
        """Raise :class:`InputsChangedError` if the task changed since the store's results."""
        self._task_checked = True
        change = self._task_change(params, example, aux)
        if change is not None:
            raise InputsChangedError(
                f"the store at {self.save_dir} holds results of another task; changed since:\n  {change}"
                "\nUse another save_dir, or TRAKer.run(..., overwrite=True) to recompute"
            )

    @property
    def store(self) -> store_lib.Store:
        """The :class:`~trakjax.store.Store` (opened, or created on first use)."""
        if self._store is None:
            self._store = store_lib.Store.open(self.save_dir, self._store_config())
        return self._store

    @property
    def lambda_reg(self) -> float | None:
        """The absolute λ, or ``None`` for ``"auto"``."""
        value = self.config.result.lambda_reg
        return None if isinstance(value, str) else value

    # ----------------------------------------------------------------- checkpoints

    def _resolve_checkpoint(self, checkpoint) -> Any:
        """A params pytree from ``checkpoint``: the pytree itself, an orbax directory restored,
        or what a zero-argument callable (a checkpoint loader) returns."""
        if isinstance(checkpoint, str | os.PathLike):
            return checkpoints_lib.restore(checkpoint, self._template)
        if callable(checkpoint):
            checkpoint = checkpoint()
        if not jax.tree_util.tree_leaves(checkpoint):
            raise InvalidArgumentError(
                f"checkpoint must be a params pytree or a path to an orbax checkpoint, got "
                f"{type(checkpoint).__name__} with no array leaves"
            )
        return checkpoint

    def _needs_example(self) -> bool:
        """The factorized family traces the model on one example, which no call has shown yet."""
        return families.needs_example(self.config.result.projection) and self._example is None

    def _prepare(self, checkpoint, model_id: int):
        """Restore and prepare ``checkpoint``, then check its tree against the store's."""
        params = self._resolve_checkpoint(checkpoint)
        self._resolve_auto(params)
        prepared = featurize_lib.prepare_checkpoint(
            self.task, params, self.config, model_id, init_data=self.init_data, example=self._example,
            spec=self._spec,
        )
        self._spec = prepared.spec  # planned once: later checkpoints of this structure reuse it
        tree = trees.tree_record(params)
        try:
            self.store.check_parameters(tree)
        except StoreError as err:
            where = f"the orbax checkpoint at {checkpoint}" if isinstance(checkpoint, str | os.PathLike) else "checkpoint"
            raise StoreError(f"{where} has a different tree structure: {err}") from err
        if self._template is None:
            self._template = _abstract(params)
        return params, prepared, tree

    def load_checkpoint(self, checkpoint, model_id: int) -> None:
        """Load a checkpoint for featurizing, registering ``model_id`` in the store or resuming it.

        Args:
          checkpoint: a params pytree, the path of an orbax checkpoint directory (as written by
            ``orbax.checkpoint.StandardCheckpointer().save(path, params)``), or a zero-argument
            callable returning params (loaded only when needed).
          model_id: the checkpoint's id in [0, 2³²); it selects the projection matrix. A
            registered model_id resumes, and its weights must match the stored fingerprint.
        """
        model_id = _check_model_id(model_id)
        self._checkpoint = self._train_arrays = None
        self._last_ind = 0
        if self._needs_example():  # registered at the first featurize call, from its batch
            self._pending = ("train", self._resolve_checkpoint(checkpoint), model_id)
            return
        self._register(checkpoint, model_id)

    def _register(self, checkpoint, model_id: int) -> None:
        params, prepared, tree = self._prepare(checkpoint, model_id)
        paths = featurize_lib.parameter_paths(params)
        differentiated = {"paths": [p for p, m in zip(paths, prepared.mask, strict=True) if m], **prepared.record}
        memory_limits.check_solve_memory(prepared.proj_dim, k_fac=differentiated.get("k_fac"))
        if self._example is not None and not self._task_checked:
            self._check_task(params, self._example, prepared.aux)
        weights = self.store.fingerprint_of(params, model_id)
        self.store.register_model(model_id, weights, tree, differentiated)
        self._checkpoint = prepared
        self._train_arrays = self.store.train_arrays(model_id)
        self._pending = None

    def _resume_pending(self, batch) -> None:
        """Finish a load_checkpoint/start_scoring_checkpoint deferred until a batch showed an
        example (the factorized family's first call)."""
        if self._pending is None:
            return
        self._example = featurize_lib.one_example(batch)
        kind, *args = self._pending
        if kind == "train":
            self._register(*args)
        else:
            self._start_scoring(*args)

    # ----------------------------------------------------------------- featurizing

    def _batch_indices(self, batch, inds, num_samples, next_index: int, limit: int, limit_name: str):
        n = data_lib.num_examples(batch, "batch")
        if (inds is None) == (num_samples is None):
            raise InvalidArgumentError("exactly one of inds and num_samples must be given")
        if num_samples is None:
            return _check_index_array(inds, n, limit, limit_name)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples != n:
            raise InvalidArgumentError(f"num_samples must be the batch's size {n}, got {num_samples!r}")
        if next_index + n > limit:
            raise InvalidArgumentError(
                f"num_samples={n} after {next_index} examples overflows {limit_name}={limit}: "
                f"it would write indices {next_index} .. {next_index + n - 1}"
            )
        return np.arange(next_index, next_index + n, dtype=np.int64)

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
        if self._pending is not None and self._pending[0] == "train":
            self._resume_pending(batch)
        if self._checkpoint is None:
            raise InvalidArgumentError(
                "no checkpoint is loaded; call load_checkpoint(checkpoint, model_id) before featurize"
            )
        if not self._task_checked:  # the dense family's first example comes with the first batch
            self._check_task(self._checkpoint.params, featurize_lib.one_example(batch), self._checkpoint.aux)
        indices = self._batch_indices(batch, inds, num_samples, self._last_ind,
                                      self.train_set_size, "train_set_size")
        arrays = self._train_arrays
        rows = np.flatnonzero(np.asarray(arrays.done[indices]) == 0)
        if rows.size:
            out = self._featurize_rows(self._checkpoint, batch, indices, rows, featurize_lib.TRAIN_SPLIT)
            self.store.write_train_rows(arrays, indices[rows], out.features, out.out_to_loss,
                                        out.outputs - out.output_offset, out.curvature)
        if num_samples is not None:
            self._last_ind += indices.size

    def _model_ids(self, model_ids) -> list[int]:
        if model_ids is None:
            ids = self.store.model_ids()
            if not ids:
                raise InvalidArgumentError(
                    f"the store at {self.store.root} has no checkpoint; call load_checkpoint first"
                )
            return ids
        ids = [_check_model_id(m) for m in model_ids]
        if not ids or len(set(ids)) != len(ids):
            raise InvalidArgumentError(f"model_ids must be a non-empty list of distinct ids, got {list(model_ids)}")
        unknown = [m for m in ids if not self.store.has_model(m)]
        if unknown:
            raise InvalidArgumentError(
                f"model_ids {unknown} are not in the store at {self.store.root} (registered: "
                f"{self.store.model_ids()})"
            )
        return ids

    # ----------------------------------------------------------------- finalizing

    def finalize_features(self, model_ids: Sequence[int] | None = None) -> None:
        """Solve each checkpoint's kernel and store its features F = Φ (ΦᵀΦ + λI)⁻¹.

        Every requested checkpoint must be fully featurized (checked for all before any work).
        Finalized checkpoints are skipped; finalizing is atomic (a temporary file renamed, then
        the model marked), so a killed call is simply repeated.

        Args:
          model_ids: which checkpoints (default: all in the store).
        """
        ids = self._model_ids(model_ids)
        distributed = jax.process_count() > 1
        if distributed:
            _barrier("trakjax finalize_features: every process has featurized")
        for model_id in ids:
            missing = self.store.missing_train(model_id)
            if missing.size:
                raise InvalidArgumentError(
                    f"model_id {model_id} has {missing.size} of {self.train_set_size} training "
                    f"examples not featurized yet (first indices {_listed(missing)}); featurize "
                    "them before finalize_features"
                )
        for model_id in ids:
            if self.store.is_finalized(model_id):
                logger.info("model_id %d is already finalized; skipping it", model_id)
                continue
            if distributed:
                self._finalize_distributed(model_id)
                continue
            with self.store.lock(self.store.root / "models" / str(model_id) / ".lock"):
                if not self.store.is_finalized(model_id):
                    self._finalize_one(model_id)

    def _kernel(self, arrays: store_lib.TrainArrays) -> solve_lib.KernelSolve:
        """Solve a checkpoint's kernel; under jax.distributed each process adds its own rows'
        Gram (its :func:`~trakjax.sharding.process_slice`) to the cross-process sum. The
        implied-ridge statistics come from the stored q, f − f₀ and h (a store of trakjax 0.1,
        without the last two, uses 0.3·trace/N)."""
        phi = arrays.grads
        start, stop = sharding_lib.process_slice(phi.shape[0])
        differentiated = self.store.parameters()["differentiated"]
        ridge = None
        if self.task.ridge_terms is not None and arrays.output_shift is not None:
            ridge = RidgeInputs(*(np.asarray(a[start:stop]) for a in
                                  (arrays.out_to_loss, arrays.output_shift, arrays.curvature)))
        return checkpoint_kernel(
            phi[start:stop], self.config.result, proj_dim=phi.shape[1], num_examples=phi.shape[0],
            num_params=int(differentiated["num_params"]), num_features=differentiated.get("k_fac"),
            mesh=self.mesh, ridge=ridge, kernel=self.config.result.kernel,
        )

    def _write_features(self, model_id: int, phi, kernel: solve_lib.KernelSolve) -> None:
        details = {"lambda_reg": kernel.lambda_reg, "rank": kernel.rank, "condition": kernel.condition,
                   "scale": kernel.scale, "method": kernel.method, "lambda_rule": kernel.lambda_rule,
                   "kernel": kernel.kernel, "clipped_curvature": kernel.clipped_curvature}
        self.store.write_features(
            model_id, lambda out: solve_lib.apply_inverse(phi, kernel, out=out, mesh=self.mesh), details
        )

    def _finalize_one(self, model_id: int) -> None:
        arrays = self.store.train_arrays(model_id, "r")
        self._write_features(model_id, arrays.grads, self._kernel(arrays))

    def _finalize_distributed(self, model_id: int) -> None:
        """Every process reduces the Gram; process 0 writes F; all wait for it."""
        arrays = self.store.train_arrays(model_id, "r")
        kernel = self._kernel(arrays)
        if jax.process_index() == 0:
            self._write_features(model_id, arrays.grads, kernel)
        _barrier(f"trakjax finalize_features: model {model_id} written")

    # ----------------------------------------------------------------- scoring

    def start_scoring_checkpoint(self, exp_name: str, checkpoint, model_id: int, num_targets: int,
                                 *, targets_fingerprint: str | None = None) -> None:
        """Load a finalized checkpoint for scoring the targets of experiment ``exp_name``.

        Args:
          exp_name: the experiment (a set of targets); a directory name.
          checkpoint: the same weights that were featurized under ``model_id`` (pytree or orbax
            directory).
          model_id: a finalized checkpoint of the store.
          num_targets: T, the experiment's number of targets.
          targets_fingerprint: optionally, :func:`trakjax.trees.fingerprint` of the whole target
            set; recorded with the experiment and checked on later calls.
        """
        store_lib.check_experiment_name(exp_name)
        model_id = _check_model_id(model_id)
        num_targets = check_int("num_targets", num_targets)
        if not self.store.has_model(model_id):
            raise InvalidArgumentError(
                f"model_id {model_id} is not in the store at {self.store.root}; load_checkpoint, "
                "featurize and finalize_features it before scoring"
            )
        if not self.store.is_finalized(model_id):
            raise InvalidArgumentError(
                f"model_id {model_id} is not finalized: call finalize_features([{model_id}]) "
                "before scoring with it"
            )
        if self.store.has_experiment(exp_name):
            stored = int(self.store.experiment_info(exp_name)["num_targets"])
            if stored != num_targets:
                raise InvalidArgumentError(
                    f"experiment {exp_name!r} has num_targets={stored}, this call has "
                    f"num_targets={num_targets}; use another exp_name for other targets"
                )
        self._scoring = self._target_arrays = None
        self._last_ind_target = 0
        job = (exp_name, self._resolve_checkpoint(checkpoint), model_id, num_targets, targets_fingerprint)
        if self._needs_example():  # prepared at the first score call, from its batch
            self._pending = ("score", *job)
            return
        self._start_scoring(*job)

    def _start_scoring(self, exp_name, params, model_id, num_targets, targets_fingerprint,
                       prepared: featurize_lib.Checkpoint | None = None) -> None:
        if prepared is None:  # else the checkpoint was just registered, its weights hashed and checked
            params, prepared, _ = self._prepare(params, model_id)
            self.store.check_weights(model_id, self.store.fingerprint_of(params, model_id))
        self.store.register_target_model(exp_name, num_targets, model_id, targets_fingerprint)
        self._scoring = (exp_name, prepared)
        self._target_arrays = self.store.target_arrays(exp_name, model_id)
        self._pending = None

    def score(self, batch, inds=None, num_samples: int | None = None) -> None:
        """Featurize targets at the scoring checkpoint (ψ), written to the store.

        ``inds`` are target indices in [0, num_targets); ``num_samples`` takes the next ones
        since :meth:`start_scoring_checkpoint`. Done targets are skipped.
        """
        if self._pending is not None and self._pending[0] == "score":
            self._resume_pending(batch)
        if self._scoring is None:
            raise InvalidArgumentError(
                "call start_scoring_checkpoint(exp_name, checkpoint, model_id, num_targets) before score"
            )
        exp_name, checkpoint = self._scoring
        if not self._task_checked:
            self._check_task(checkpoint.params, featurize_lib.one_example(batch), checkpoint.aux)
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
            elif (missing := self.store.missing_targets(exp_name, model_id)).size:
                problems.append(
                    f"model_id {model_id} has {missing.size} of {info['num_targets']} targets "
                    f"not scored yet (first indices {_listed(missing)})"
                )
        if problems:
            raise InvalidArgumentError(
                f"experiment {exp_name!r} is not ready for finalize_scores:\n  " + "\n  ".join(problems)
            )
        features = [self.store.features(m) for m in ids]
        targets = [self.store.target_arrays(exp_name, m, "r").grads for m in ids]
        out_to_loss = [self.store.train_arrays(m, "r").out_to_loss for m in ids]
        return ids, features, targets, out_to_loss

    def finalize_scores(self, exp_name: str, model_ids: Sequence[int] | None = None) -> np.ndarray:
        """The experiment's scores S (N, T): ``((1/M) Σ_m F_m Ψ_mᵀ) ⊙ q̄``, written to the store.

        Computed and written block by block of ``score_block_rows`` train rows (memory bounded
        independently of N) into a partial matrix of these model_ids; blocks already written are
        kept, so a killed call resumes. The matrix becomes the experiment's ``scores.npy`` only
        when every block is written.

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
        self._last_ind_target = 0
        finished = self.store.finished_scores(exp_name, ids, self.score_block_rows)
        if finished is not None:
            return finished
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
        if not distributed:
            return self.store.complete_scores(exp_name, arrays)
        _barrier(f"trakjax finalize_scores {exp_name}: blocks written")
        if jax.process_index() == 0:
            self.store.complete_scores(exp_name, arrays)
        _barrier(f"trakjax finalize_scores {exp_name}: complete")
        return self.store.scores(exp_name)

    def top_k(self, exp_name: str, k: int, model_ids: Sequence[int] | None = None) -> scores_lib.TopK:
        """The k top proponents and opponents of every target, streamed block by block.

        Reads the finalized score matrix when it exists for these checkpoints, else computes
        score blocks from the features without writing (or holding) the score matrix.
        """
        store_lib.check_experiment_name(exp_name)
        k = check_int("k", k, 1, self.train_set_size + 1)
        ids, features, targets, out_to_loss = self._score_inputs(exp_name, model_ids)
        stored = self.store.finished_scores(exp_name, ids)
        if stored is not None:
            rows = self.score_block_rows
            blocks = ((s, stored[s : s + rows]) for s in range(0, stored.shape[0], rows))
        else:
            blocks = scores_lib.score_blocks(
                features, targets, out_to_loss, block_rows=self.score_block_rows, mesh=self.mesh
            )
        return scores_lib.top_k(blocks, k)

    # ----------------------------------------------------------------- the whole run

    def run(self, checkpoints: Sequence[Any], train: Any, targets: Any, experiment: str = "targets",
            *, model_ids: Sequence[int] | None = None, progress: bool | None = None,
            overwrite: bool = False, on_stage: Callable[[str], None] | None = None) -> np.ndarray:
        """Featurize, finalize and score end to end; the experiment's (N, T) scores.

        The calls of the module docstring's example, with each checkpoint read and prepared once:
        at every checkpoint its training features, then its targets' (this process's shares
        under ``jax.distributed``), one checkpoint held at a time; then
        :meth:`finalize_features`, and :meth:`finalize_scores` for exactly these ``model_ids``.
        Rerunning resumes: finished checkpoints, rows, targets and score blocks are skipped, and
        a finished experiment returns at once.

        Before anything is written, the inputs are compared with what the store already holds:
        the training data's and the targets' content fingerprints, each checkpoint's weights, and
        the model_ids of the finished scores. If any changed, the call raises
        :class:`~trakjax.errors.InputsChangedError` saying what changed and leaves the store as it
        was, unless ``overwrite``, which discards the store's results (keeping its settings) and
        recomputes them: the result then equals a fresh run's.

        Args:
          checkpoints: M params pytrees or orbax checkpoint directories.
          train: the N training examples, a pytree of arrays (``train_set_size`` of them).
          targets: the T targets, a pytree of arrays.
          experiment: the scoring experiment's name.
          model_ids: one id per checkpoint (default ``0 .. M − 1``).
          progress: progress bars (default: the config's ``progress``).
          overwrite: recompute when the inputs changed, instead of raising.
          on_stage: called with ``"featurize"`` (every checkpoint's training and target
            features), ``"finalize"`` (the solves) and ``"score"`` (the score matrix) as each
            stage ends (e.g. to time them).

        Returns:
          The (N, T) float32 scores, a read-only memory map of the store's file.
        """
        store_lib.check_experiment_name(experiment)
        if isinstance(checkpoints, str | os.PathLike) or not isinstance(checkpoints, Sequence) or not checkpoints:
            raise InvalidArgumentError(
                f"checkpoints must be a non-empty list of params pytrees or orbax paths, got {checkpoints!r}"
            )
        ids = check_model_ids(model_ids, len(checkpoints))
        n = data_lib.num_examples(train, "train")
        if n != self.train_set_size:
            raise InvalidArgumentError(f"train has {n} examples but train_set_size is {self.train_set_size}")
        num_targets = data_lib.num_examples(targets, "targets")
        progress = self.config.run.progress if progress is None else bool(progress)
        if self._example is None:
            self._example = featurize_lib.one_example(train)
        first = self._resolve_checkpoint(checkpoints[0])
        check_targets_fit(self.task, first, train, targets)
        inputs = {"train": trees.fingerprint(train), "targets": trees.fingerprint(targets),
                  "first": first}
        self._refuse_changed_inputs(checkpoints, ids, experiment, num_targets, inputs, overwrite)
        self._check_task(first, self._example)
        self.store.check_train_data(inputs["train"])
        stage = on_stage or (lambda name: None)
        work = _Work(train, targets, experiment, num_targets, inputs["targets"])
        self._featurize_all(checkpoints, ids, first, work, progress)
        stage("featurize")
        bar = progress_bar(len(ids), "finalize", "checkpoint", progress)
        for model_id in ids:
            self.finalize_features([model_id])
            bar.update(1)
        bar.close()
        stage("finalize")
        scores = self.finalize_scores(experiment, ids)
        stage("score")
        return scores

    def _changed_inputs(self, checkpoints, ids, experiment: str, num_targets: int, inputs: dict) -> list[str]:
        """What differs between this run's inputs and the store's results (empty for a new store)."""
        if self._store is None:
            return []
        store = self.store
        changes = []
        task_change = self._task_change(inputs["first"], self._example, record=False)
        if task_change is not None:
            changes.append(task_change)
        changes += self._selection_change(inputs["first"])
        stored_train = store.train_fingerprint()
        if stored_train and stored_train != inputs["train"]:
            changes.append(f"the training data: fingerprint {stored_train} in the store, {inputs['train']} now")
        for checkpoint, model_id in zip(checkpoints, ids, strict=True):
            if store.has_model(model_id):
                stored = store.model_info(model_id)["fingerprint"]
                found = store.fingerprint_of(self._resolve_checkpoint(checkpoint), model_id)
                if stored != found:
                    where = f" ({checkpoint})" if isinstance(checkpoint, str | os.PathLike) else ""
                    changes.append(f"checkpoint model_id {model_id}{where}: weights {stored} in the store, {found} now")
        if store.has_experiment(experiment):
            info = store.experiment_info(experiment)
            if info["num_targets"] != num_targets:
                changes.append(f"experiment {experiment!r}: {info['num_targets']} targets in the store, {num_targets} now")
            elif info.get("targets_fingerprint") not in (None, inputs["targets"]):
                changes.append(f"experiment {experiment!r}: targets {info['targets_fingerprint']} in "
                               f"the store, {inputs['targets']} now")
            record = info.get("scores")
            if record and record["complete"] and record["model_ids"] != ids:
                changes.append(f"experiment {experiment!r}: its finished scores ensemble model_ids "
                               f"{record['model_ids']}, this run has {ids}")
        return changes

    def _selection_change(self, params) -> list[str]:
        """The differentiated leaves ``grad_wrt`` selects on ``params``, if they differ from the
        store's (a callable ``grad_wrt`` is recorded by its selection, not its name)."""
        record = self.store.parameters()
        if record is None:
            return []
        mask = featurize_lib.select_parameters(params, self.config.result.grad_wrt)
        paths = [p for p, m in zip(featurize_lib.parameter_paths(params), mask, strict=True) if m]
        stored = record["differentiated"]["paths"]
        if paths == stored:
            return []
        return [f"the differentiated parameters (grad_wrt): the store's results differentiate {stored}, "
                f"this run selects {paths}"]

    def _refuse_changed_inputs(self, checkpoints, ids, experiment, num_targets, inputs, overwrite: bool) -> None:
        changes = self._changed_inputs(checkpoints, ids, experiment, num_targets, inputs)
        if not changes:
            return
        if not overwrite:
            raise InputsChangedError(
                f"the store at {self.save_dir} holds results of other inputs; changed since:\n  "
                + "\n  ".join(changes)
                + "\nNothing was changed. Recompute with overwrite=True (trakjax attribute --overwrite), "
                "or use another save_dir"
            )
        manifest.check_not_link(self.save_dir, "save_dir")
        logger.warning("inputs changed (%s); discarding the store's results", "; ".join(changes))
        if jax.process_index() == 0:
            self.store.clear()
        self._had_results = False
        if jax.process_count() > 1:
            _barrier("trakjax run: store cleared")

    def _feed(self, data, count: int, method, bar) -> None:
        """Call ``method(batch, inds=...)`` over this process's slice of ``count`` examples."""
        start, stop = sharding_lib.process_slice(count)
        if stop == start:
            return
        for first, batch in data_lib.iterate_batches(data_lib.take(data, start, stop), self.config.run.batch_size):
            size = data_lib.num_examples(batch)
            method(_host_arrays(batch), inds=np.arange(start + first, start + first + size))
            bar.update(size)

    def _featurize_all(self, checkpoints, ids, first, work: _Work, progress: bool) -> None:
        """Each checkpoint read and prepared once (``first`` is checkpoint 0, already read): its
        training rows featurized, then its targets' features, while it is loaded; finished work
        is skipped without reading the checkpoint. One prepared checkpoint is held at a time."""
        train_start, train_stop = sharding_lib.process_slice(self.train_set_size)
        target_start, target_stop = sharding_lib.process_slice(work.num_targets)
        train_bar = progress_bar((train_stop - train_start) * len(ids), "featurize", "example", progress)
        target_bar = progress_bar((target_stop - target_start) * len(ids), "score", "target", progress)
        for index, (checkpoint, model_id) in enumerate(zip(checkpoints, ids, strict=True)):
            train_done = self.store.has_model(model_id) and self.store.is_finalized(model_id)
            targets_done = self._targets_done(work.experiment, model_id, target_start, target_stop)
            if train_done and targets_done:
                train_bar.update(train_stop - train_start)
                target_bar.update(target_stop - target_start)
                continue
            params = first if index == 0 else self._resolve_checkpoint(checkpoint)
            prepared = None
            if train_done:
                train_bar.update(train_stop - train_start)
            else:
                self.load_checkpoint(params, model_id)
                self._feed(work.train, self.train_set_size, self.featurize, train_bar)
                prepared = self._checkpoint
            if targets_done:
                target_bar.update(target_stop - target_start)
            else:
                self._scoring = self._target_arrays = None
                self._last_ind_target = 0
                self._start_scoring(work.experiment, params, model_id, work.num_targets,
                                    work.targets_fingerprint, prepared)
                self._feed(work.targets, work.num_targets, self.score, target_bar)
            self._checkpoint = self._train_arrays = self._scoring = self._target_arrays = None
        train_bar.close()
        target_bar.close()

    def _targets_done(self, experiment: str, model_id: int, start: int, stop: int) -> bool:
        if not self.store.has_experiment(experiment):
            return False
        if model_id not in self.store.experiment_info(experiment)["model_ids"]:
            return False
        missing = self.store.missing_targets(experiment, model_id)
        return not ((missing >= start) & (missing < stop)).any()


class _Work(NamedTuple):
    """What :meth:`TRAKer.run` computes at each checkpoint: the training rows and the targets."""

    train: Any
    targets: Any
    experiment: str
    num_targets: int
    targets_fingerprint: str


def _host_arrays(batch):
    """A batch's leaves as numpy arrays (memory-mapped inputs are read here)."""
    return jax.tree_util.tree_map(np.asarray, batch)
