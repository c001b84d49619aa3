"""trakjax: TRAK data attribution (Park et al., 2023) for JAX and Flax.

The functional core, one module per stage:

* :mod:`trakjax.tasks`: model output functions and out-to-loss terms.
* :mod:`trakjax.featurize`: per-example gradients, projected (:mod:`trakjax.projection`, with R
  from the counter-based contract in :mod:`trakjax.randomness`).
* :mod:`trakjax.solve`: Gram, regularized inverse with rank detection, features F = Φ A⁻¹.
* :mod:`trakjax.scores`: the checkpoint ensemble, the out-to-loss weighting, soft-thresholding.
* :mod:`trakjax.pipeline`: the per-checkpoint loop (featurize, Gram, solve, F = Φ A⁻¹) that
  :func:`attribute` (scores of every training example on every target), :func:`self_influence`
  (each training example's score on itself) and :func:`train_features` run.
* :class:`Config` (:mod:`trakjax.config`): every setting, validated once, in two halves: the
  result settings stores record, and the run settings that only change how the work runs.
* :mod:`trakjax.errors`: what trakjax raises on purpose, one hierarchy under
  :class:`~trakjax.errors.TrakjaxError`.
* :mod:`trakjax.evaluation`: retraining-based evaluation (subsets, retrained margins, LDS,
  brittleness).
* :mod:`trakjax.scoring_fn`: :func:`train_features` and :func:`scorer`, scores as a pure function
  of (params, batch) that runs inside a user's ``jax.jit``.
* :mod:`trakjax.sharding`: data parallelism over devices (a ``"data"`` mesh) and processes.
* :mod:`trakjax.flax`: adapters from Flax NNX modules and linen ``apply`` (imported on first use).

The shell: :class:`TRAKer` (:mod:`trakjax.session`), a resumable session with the reference
library's method names and one driver (:meth:`TRAKer.run`), over an on-disk :mod:`trakjax.store`
(written through :mod:`trakjax.files`, fingerprinted by :mod:`trakjax.trees`, orbax checkpoints
read by :mod:`trakjax.checkpoints`); the ``trakjax`` command line
(:mod:`trakjax.cli`: the digits :mod:`trakjax.demo`, runs from a TOML
:mod:`trakjax.run_config`, pictures and top-k tables from :mod:`trakjax.report`).
"""

from trakjax import (
    checkpoints,
    data,
    errors,
    evaluation,
    factorized,
    featurize,
    pipeline,
    projection,
    randomness,
    scores,
    scoring_fn,
    sharding,
    solve,
    store,
    tasks,
    trees,
)
from trakjax.attribution import attribute, self_influence
from trakjax.config import Config, ResultSettings, RunSettings
from trakjax.errors import TrakjaxError
from trakjax.featurize import describe_factorization, per_example_features, per_example_grads
from trakjax.projection import project
from trakjax.randomness import CONTRACT_VERSION
from trakjax.scoring_fn import TrainFeatures, scorer, train_features
from trakjax.session import TRAKer
from trakjax.solve import gram
from trakjax.version import __version__

__all__ = [
    "CONTRACT_VERSION",
    "Config",
    "ResultSettings",
    "RunSettings",
    "TRAKer",
    "TrainFeatures",
    "TrakjaxError",
    "__version__",
    "attribute",
    "checkpoints",
    "data",
    "describe_factorization",
    "errors",
    "factorized",
    "evaluation",
    "featurize",
    "gram",
    "per_example_features",
    "per_example_grads",
    "pipeline",
    "project",
    "projection",
    "randomness",
    "scorer",
    "scores",
    "scoring_fn",
    "self_influence",
    "sharding",
    "solve",
    "store",
    "tasks",
    "train_features",
    "trees",
]


def __getattr__(name: str):
    # trakjax.flax imports flax, which takes a while: load it on first use.
    if name == "flax":
        import importlib

        return importlib.import_module("trakjax.flax")
    raise AttributeError(f"module 'trakjax' has no attribute {name!r}")
