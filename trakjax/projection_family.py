"""The interface of a projection family: four pure functions, in the style of optax's
``GradientTransformation``, that separate the per-run analysis from the per-checkpoint work.

A family turns per-example gradients of the task's output into k features with
E[φᵀφ′] = (k/P)·gᵀg′ (so λ means the same in every family). It is a :class:`ProjectionFamily`:

* ``plan(request, config) -> FeatureSpec``: everything that depends on the model's structure,
  not its weights (the parameter mask and layout, the factorized family's jaxpr analysis, k,
  the per-example memory). Hashable; computed once per run (:func:`trakjax.featurize.plan_features`).
* ``instantiate(spec, seed, model_id, matrix_cache_bytes) -> arrays``: one checkpoint's
  randomness (R's key and materialized blocks, or factor matrices), a pytree of arrays, as the
  randomness contract fixes it for ``(seed, model_id)``.
* ``features(task, spec, arrays, diff, fixed, batch, state) -> (φ (B, k), f (B,), extras)``: the
  per-example step, pure and jit-compatible; ``extras`` is a dict with room for more of the same
  pass (empty today).
* ``record(spec) -> dict``: what the store records of the featurization (``num_params``,
  ``proj_dim`` and the family's own, e.g. ``k_fac``).
* ``scoring_arrays(spec, arrays) -> arrays``: the part of ``arrays`` a scorer keeps per
  checkpoint (caches that can be regenerated are dropped).
* ``needs_example``: whether ``plan`` traces the model on one example (then callers read the
  data's first example once per run; otherwise they need not).

Families are registered by projection name in :mod:`trakjax.families`; nothing outside a family's
module branches on which family runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from trakjax.projection import ParameterLayout


class PlanRequest(NamedTuple):
    """What a family's ``plan`` sees: structure only (no weights).

    Attributes:
      treedef: the parameters' pytree structure.
      mask: per-leaf differentiation flags.
      diff: ``jax.ShapeDtypeStruct`` of each differentiated leaf.
      fixed: the fixed leaves (values: the output closes over them; only their structure is planned).
      paths: canonical path of each differentiated leaf (the factor matrices' keys).
      example: ONE example's ``jax.ShapeDtypeStruct`` leaves, or None when none is known.
      key: one example's PRNG key struct, or None.
      aux: the task's per-checkpoint state (values), or None.
      backend: the resolved backend, ``"xla"`` or ``"pallas"``.
    """

    treedef: Any
    mask: tuple[bool, ...]
    diff: tuple
    fixed: tuple
    paths: tuple[str, ...]
    example: Any
    key: Any
    aux: Any
    backend: str


class FeatureSpec(NamedTuple):
    """The static description of how examples become features (hashable; shared by checkpoints).

    Attributes:
      family: the family's name in :data:`trakjax.families.FAMILIES`' values (``"dense"`` or
        ``"factorized"``).
      kind: the random entries' kind (``"rademacher"``, ``"normal"``, or ``"identity"`` for R = I).
      treedef: pytree structure of the parameters.
      mask: which leaves are differentiated.
      layout: :class:`~trakjax.projection.ParameterLayout` of the differentiated leaves (P = ``layout.total``).
      proj_dim: the final k.
      example_bytes: memory one example takes in a step (gradients, or activations and taps).
      chunk_rows: rows of R per generated chunk (``None``: the default).
      precision: matmul precision policy.
      backend: ``"xla"`` or ``"pallas"``.
      detail: the family's own static part (the factorized family's plan and second stage;
        None for the dense family).
      structure: what the spec was planned for (:func:`trakjax.featurize.structure_key`): a
        checkpoint with another structure is planned anew.
    """

    family: str
    kind: str
    treedef: Any
    mask: tuple[bool, ...]
    layout: ParameterLayout
    proj_dim: int
    example_bytes: int
    chunk_rows: int | None
    precision: str
    backend: str
    detail: Any = None
    structure: Any = None


class ProjectionFamily(NamedTuple):
    """A projection family as pure functions (see the module docstring for each one's contract)."""

    plan: Callable[..., FeatureSpec]
    instantiate: Callable[..., Any]
    features: Callable[..., tuple]
    record: Callable[[FeatureSpec], dict]
    scoring_arrays: Callable[[FeatureSpec, Any], Any]
    needs_example: bool = False


__all__ = ["FeatureSpec", "PlanRequest", "ProjectionFamily"]
