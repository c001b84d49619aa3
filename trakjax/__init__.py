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
"""

from trakjax import data, evaluation, featurize, projection, randomness, scores, solve, tasks
from trakjax.attribution import attribute, self_influence
from trakjax.featurize import per_example_grads
from trakjax.projection import project
from trakjax.randomness import CONTRACT_VERSION
from trakjax.solve import gram

__version__ = "0.1.0"

__all__ = [
    "CONTRACT_VERSION",
    "attribute",
    "data",
    "evaluation",
    "featurize",
    "gram",
    "per_example_grads",
    "project",
    "projection",
    "randomness",
    "scores",
    "self_influence",
    "solve",
    "tasks",
]
