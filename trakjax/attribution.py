"""``trakjax.attribute`` and ``trakjax.self_influence``: the one-call API.

Both run the per-checkpoint pipeline (:func:`trakjax.pipeline.solved_checkpoints`: featurize the
training set, Gram, solve, F = Φ A⁻¹) and combine the checkpoints with
:func:`trakjax.scores.ensemble`. :func:`attribute` featurizes the targets at each checkpoint
and adds F Ψᵀ; :func:`self_influence` keeps only the diagonal (targets = train).

Settings come as a :class:`trakjax.Config` or as keyword arguments that build one (every field
of :class:`~trakjax.config.ResultSettings` and :class:`~trakjax.config.RunSettings`), checked
before any work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trakjax import checkpoints as checkpoints_lib
from trakjax import data as data_lib
from trakjax import featurize as featurize_lib
from trakjax import scores as scores_lib
from trakjax import sharding as sharding_lib
from trakjax.config import Config
from trakjax.pipeline import check_targets_fit, round_to, solved_checkpoints
from trakjax.tasks import Task

__all__ = ["attribute", "self_influence"]


def restore_checkpoints(checkpoints):
    """``checkpoints`` with every orbax checkpoint path restored to a params pytree (in the
    structure of the first pytree in the list, or of the first checkpoint restored), as
    :class:`trakjax.TRAKer` takes them; anything else is passed through to be checked."""
    if isinstance(checkpoints, str | os.PathLike) or not isinstance(checkpoints, Sequence) or not any(
            isinstance(c, str | os.PathLike) for c in checkpoints):
        return checkpoints
    template = next((c for c in checkpoints if not isinstance(c, str | os.PathLike)), None)
    restored = []
    for checkpoint in checkpoints:
        if isinstance(checkpoint, str | os.PathLike):
            checkpoint = checkpoints_lib.restore(checkpoint, template)
            template = checkpoint if template is None else template
        restored.append(checkpoint)
    return restored


def attribute(
    task: Task,
    checkpoints: Sequence[Any],
    train: Any,
    targets: Any,
    config: Config | None = None,
    *,
    model_ids: Sequence[int] | None = None,
    return_details: bool = False,
    **settings,
):
    """TRAK scores of every training example on every target: (n_train, n_targets).

    ``S = ((1/M) Σ_m Φ_m (Φ_mᵀΦ_m + λI)⁻¹ Ψ_mᵀ) ⊙ q̄`` (docs/design.md, "The math").

    Args:
      task: a :class:`~trakjax.tasks.Task`, e.g. ``tasks.image_classification(apply_fn)``.
      checkpoints: list of M parameter pytrees with one structure, or paths of orbax checkpoint
        directories (restored here, as :class:`trakjax.TRAKer` does).
      train: training data: a pytree of arrays with a leading example axis, e.g. ``(x, y)``, or
        a zero-argument callable returning a fresh iterator of such batches (re-read for every
        checkpoint).
      targets: target data, in the same forms.
      config: a :class:`trakjax.Config` (default: all defaults).
      model_ids: ids selecting each checkpoint's projection matrix (default 0 .. M − 1).
      return_details: also return a list of :class:`~trakjax.pipeline.CheckpointDetails`.
      **settings: settings overriding ``config``'s (:meth:`trakjax.Config.create`), e.g.
        ``proj_dim`` (k; default 2048, P for ``"identity"``), ``lambda_reg`` (``"auto"``, the
        default, or an absolute float), ``projection``, ``grad_wrt``, ``seed``, ``dtype``,
        ``precision``, ``reference_compat``, ``batch_size``, ``backend``, ``mesh`` (examples are
        sharded over its devices; under ``jax.distributed`` each process featurizes its own
        contiguous slice of ``train``, which must then be arrays, and every process returns the
        full matrix), ``progress``.

    Returns:
      ``np.ndarray`` (n_train, n_targets) float32; with ``return_details``, ``(scores, details)``.
    """
    config = Config.create(config, **settings)
    checkpoints = restore_checkpoints(checkpoints)
    if not callable(targets):
        data_lib.num_examples(targets, "targets")
    if isinstance(checkpoints, Sequence) and checkpoints and isinstance(task, Task):
        check_targets_fit(task, checkpoints[0], train, targets)
    details = []

    def per_checkpoint():
        for solved in solved_checkpoints(task, checkpoints, train, config, model_ids):
            target_features = featurize_lib.featurize(
                task, solved.checkpoint, targets, batch_size=config.run.batch_size,
                split=featurize_lib.TARGET_SPLIT, with_out_to_loss=False,
            )
            psi = round_to(target_features.features, solved.storage)
            details.append(solved.details)
            yield scores_lib.checkpoint_scores(solved.features, psi, mesh=solved.mesh), solved.out_to_loss

    scores = sharding_lib.process_concat(scores_lib.ensemble(per_checkpoint()))
    return (scores, details) if return_details else scores


def self_influence(
    task: Task,
    checkpoints: Sequence[Any],
    train: Any,
    config: Config | None = None,
    *,
    model_ids: Sequence[int] | None = None,
    return_details: bool = False,
    **settings,
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
    config = Config.create(config, **settings)
    checkpoints = restore_checkpoints(checkpoints)
    details = []

    def per_checkpoint():
        for solved in solved_checkpoints(task, checkpoints, train, config, model_ids):
            details.append(solved.details)
            yield scores_lib.row_dots(solved.features, solved.phi)[:, None], solved.out_to_loss

    values = sharding_lib.process_concat(scores_lib.ensemble(per_checkpoint()))[:, 0]
    return (values, details) if return_details else values
