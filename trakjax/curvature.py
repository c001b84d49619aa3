"""The curvature-weighted (Gauss–Newton) kernel: which kernel a run uses, and its weights.

TRAK (Park et al., 2023, eq. 16) scores with A = ΦᵀΦ + λI. The influence-function reading of
TRAK (Koh & Liang, 2017, "Understanding Black-box Predictions via Influence Functions") says the
kernel is the Hessian of the training loss of the model linearized at the checkpoint,
f(z; θ) ≈ f(z; θ̂) + φ(z)ᵀ(θ − θ̂) in projected coordinates. For a loss L(f) of the output
that Hessian is the Gauss–Newton matrix::

    ∇²_θ Σ_i L(f_i) = Σ_i h_i φ_i φ_iᵀ = ΦᵀHΦ,      H = diag(h_i),  h_i = ∂²L/∂f_i²

and one Newton step of the linearized model from θ̂ when training example i is dropped (or a
subset is kept) moves a target's output by ψᵀ(ΦᵀHΦ + λI)⁻¹ φ_i q_i, q_i = −∂L/∂f_i. So the
Gauss–Newton kernel is A = ΦᵀHΦ + λI, everything else unchanged: F = Φ A⁻¹, S = F Ψᵀ ⊙ q̄.
TRAK's ΦᵀΦ replaces H by the identity (right up to a factor when every h_i is equal, as for
squared error). The tasks give h through ``Task.ridge_terms``: q(1 − q) for the logistic loss of
a margin or signed logit, q(1 − q)/T for ``language_modeling``, q(1 − q)/2 for ``clip``, 1 for
squared error, by autodiff for ``from_loss``.

h ≤ 0 (a loss not convex in f there) would make the kernel indefinite: such h are clipped to 0
(:func:`clipped_curvature`; the run's details count them). Examples with h = 0 (clipped, or
underflowed: a very confident example) add nothing to ΦᵀHΦ, so its rank is at most #{h > 0}.

Which kernel (:func:`resolve_kernel`): ``kernel="auto"`` (the default) is Gauss–Newton where the
task gives a curvature and ``reference_compat`` is off, else TRAK's; an explicit
``"gauss-newton"`` on a task without a curvature raises. The evidence for the default is in
benchmarks/README.md ("gauss_newton.py").
"""

from __future__ import annotations

import numpy as np

from trakjax.config import AUTO, GAUSS_NEWTON_KERNEL, TRAK_KERNEL
from trakjax.errors import InvalidArgumentError

DEFAULT_KERNEL = GAUSS_NEWTON_KERNEL
"""What ``kernel="auto"`` means on a task with a curvature (without ``reference_compat``)."""


def resolve_kernel(requested: str, *, has_curvature: bool, reference_compat: bool = False,
                   task_name: str = "task") -> str:
    """The kernel a run uses: ``"trak"`` or ``"gauss-newton"``.

    Args:
      requested: the ``kernel`` setting, ``"auto"``, ``"trak"`` or ``"gauss-newton"``.
      has_curvature: whether the task gives h (``task.ridge_terms is not None``).
      reference_compat: the setting of that name (with ``"auto"``: TRAK's kernel).
      task_name: named in the error.

    Raises:
      InvalidArgumentError: ``"gauss-newton"`` on a task without a curvature.
    """
    if requested == AUTO:
        return DEFAULT_KERNEL if has_curvature and not reference_compat else TRAK_KERNEL
    if requested == GAUSS_NEWTON_KERNEL and not has_curvature:
        raise InvalidArgumentError(
            f"kernel='gauss-newton' needs the loss curvature h = ∂²L/∂f², and the task {task_name!r} "
            "gives none (no ridge_terms): use a ready-made task, trakjax.tasks.from_loss (curvature "
            "by autodiff), a Task with ridge_terms, or kernel='trak'"
        )
    return requested


def clipped_curvature(curvature) -> tuple[np.ndarray, int]:
    """(max(h, 0) as float64 (n,), how many h were below 0). NaN raises: it is not a curvature.

    Raises:
      InvalidArgumentError: if any h is NaN or infinite (naming how many).
    """
    h = np.asarray(curvature, np.float64).reshape(-1)
    bad = int((~np.isfinite(h)).sum())
    if bad:
        raise InvalidArgumentError(
            f"the task's curvature h = ∂²L/∂f² is NaN or infinite for {bad} of {h.size} training "
            "examples; the Gauss–Newton kernel needs finite h (check the task's ridge_terms or loss)"
        )
    negative = int((h < 0).sum())
    return np.maximum(h, 0.0), negative
