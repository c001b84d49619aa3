"""The registry of projection families: a ``projection`` setting's name to its
:class:`~trakjax.projection_family.ProjectionFamily`.

A new family is one module implementing the interface and one line here.
"""

from __future__ import annotations

from trakjax import dense_family
from trakjax.factorized import family as factorized_family
from trakjax.projection_family import ProjectionFamily

FAMILIES: dict[str, ProjectionFamily] = {
    "rademacher": dense_family.FAMILY,
    "normal": dense_family.FAMILY,
    "identity": dense_family.FAMILY,
    "factorized": factorized_family.FAMILY,
}
"""Each concrete ``projection`` name and the family that runs it (``"auto"`` resolves to one of these)."""

BY_NAME: dict[str, ProjectionFamily] = {dense_family.NAME: dense_family.FAMILY,
                                        factorized_family.NAME: factorized_family.FAMILY}
"""Each family by its :attr:`~trakjax.projection_family.FeatureSpec.family` name."""


def family_of(spec) -> ProjectionFamily:
    """The family that planned ``spec`` (a :class:`~trakjax.projection_family.FeatureSpec`)."""
    return BY_NAME[spec.family]


def family_for(projection: str) -> ProjectionFamily:
    """The family running ``projection`` (a resolved projection name, not ``"auto"``)."""
    return FAMILIES[projection]


def needs_example(projection: str) -> bool:
    """Whether featurizing with ``projection`` traces the model on one example (``"auto"`` does,
    to choose its family)."""
    return projection not in FAMILIES or FAMILIES[projection].needs_example


__all__ = ["BY_NAME", "FAMILIES", "family_for", "family_of", "needs_example"]
