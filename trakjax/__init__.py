"""trakjax: TRAK data attribution (Park et al., 2023) for JAX and Flax.

The functional core, one module per stage:

* :mod:`trakjax.tasks`: model output functions and out-to-loss terms.
* :mod:`trakjax.featurize`: per-example gradients, projected (:mod:`trakjax.projection`, with R
  from the counter-based contract in :mod:`trakjax.randomness`).
* :mod:`trakjax.solve`: Gram, regularized inverse with rank detection, features F = Φ A⁻¹.
* :mod:`trakjax.scores`: the checkpoint ensemble, the out-to-loss weighting, soft-thresholding.
* :func:`attribute` composes them; :func:`self_influence` gives each training example's score on
  itself.
* :mod:`trakjax.evaluation`: retraining-based evaluation (subsets, retrained margins, LDS,
  brittleness).
* :mod:`trakjax.scoring_fn`: :func:`train_features` and :func:`scorer`, scores as a pure function
  of (params, batch) that runs inside a user's ``jax.jit``.
* :mod:`trakjax.sharding`: data parallelism over devices (a ``"data"`` mesh) and processes.
* :mod:`trakjax.flax`: adapters from Flax NNX modules and linen ``apply`` (imported on first use).

The shell: :class:`TRAKer` (:mod:`trakjax.session`), a resumable session with the reference
library's method names, over an on-disk :mod:`trakjax.store`; the ``trakjax`` command line
(:mod:`trakjax.cli`: the digits :mod:`trakjax.demo`, runs from a TOML
:mod:`trakjax.run_config`, pictures and top-k tables from :mod:`trakjax.report`).
"""

from trakjax import (
    data,
    evaluation,
    featurize,
    projection,
    randomness,
    scores,
    scoring_fn,
    sharding,
    solve,
    store,
    tasks,
)
from trakjax.attribution import attribute, self_influence
from trakjax.featurize import per_example_grads
from trakjax.projection import project
from trakjax.randomness import CONTRACT_VERSION
from trakjax.scoring_fn import TrainFeatures, scorer, train_features
from trakjax.session import TRAKer
from trakjax.solve import gram

__version__ = "0.1.0"

__all__ = [
    "CONTRACT_VERSION",
    "TRAKer",
    "TrainFeatures",
    "attribute",
    "data",
    "evaluation",
    "featurize",
    "gram",
    "per_example_grads",
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
]


def __getattr__(name: str):
    # trakjax.flax imports flax, which takes a while: load it on first use.
    if name == "flax":
        import importlib

        return importlib.import_module("trakjax.flax")
    raise AttributeError(f"module 'trakjax' has no attribute {name!r}")
