"""The factorized projection family (LoGra-style Kronecker projections of gradients never built).

A subpackage, one concept per module, in the order data flows:

* :mod:`~trakjax.factorized.views` and :mod:`~trakjax.factorized.analysis`: where each
  differentiated leaf meets the activations, read off the output's jaxpr;
* :mod:`~trakjax.factorized.plan`: the hashable :class:`FactorPlan` (factorized or dense, with
  which sides and sizes), which fixes the feature layout;
* :mod:`~trakjax.factorized.taps` and :mod:`~trakjax.factorized.evaluation`: the rewriting
  evaluator that takes (P_Cᵀa)(P_Fᵀδ)ᵀ at every site;
* :mod:`~trakjax.factorized.features`: factor matrices, features, the description and memory;
* :mod:`~trakjax.factorized.family`: the family as a :class:`~trakjax.projection_family.ProjectionFamily`;
* :mod:`~trakjax.factorized.compat` (every JAX-version difference) and
  :mod:`~trakjax.factorized.report` (the readable table).

The public names below are the facade; :mod:`trakjax.factorized.features`'s docstring states the math.
"""

from trakjax.factorized.features import (
    FactorizationReport,
    FactorPlan,
    Factors,
    LeafFactors,
    activation_bytes_per_example,
    block_scale,
    canonical_paths,
    describe,
    factor_matrices,
    factorized_features,
    plan_factorization,
    trace_output,
)

__all__ = [
    "FactorPlan",
    "Factors",
    "FactorizationReport",
    "LeafFactors",
    "activation_bytes_per_example",
    "block_scale",
    "canonical_paths",
    "describe",
    "factor_matrices",
    "factorized_features",
    "plan_factorization",
    "trace_output",
]
