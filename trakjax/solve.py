"""The kernel solve: Gram ΦᵀΦ, the regularized inverse (ΦᵀΦ + λI)⁻¹ and the features F = Φ A⁻¹.

Per checkpoint m (Park et al., 2023, eq. 16)::

    A_m = Φ_mᵀ Φ_m + λ I        (k, k)
    F_m = Φ_m A_m⁻¹             (N, k)

The Gram is accumulated block by block: each block's ΦᵦᵀΦᵦ in float32 at full precision on
device, the blocks summed in float64 on the host. The solve is in float64: a Cholesky
factorization where λ is well above the Gram's rounding noise, else an eigendecomposition that
gives the rank (a float32 Cholesky does not fail reliably on a numerically singular matrix, and
``jnp.linalg`` returns NaN rather than raising); see :func:`solve`.

Scale of λ: the non-zero eigenvalues of ΦᵀΦ are about (k/P)·eig(GGᵀ), so a fixed λ means
something different at each k and P. A float ``lambda_reg`` is absolute (the reference's
meaning, for parity). ``"auto"`` (also what ``None`` means) chooses λ per checkpoint without
retraining (:func:`choose_lambda`): the implied-ridge rule of :mod:`trakjax.regularization`,
λ = ρ̂/(α·h̄), the ridge the checkpoint's own gradients say it was trained under, from statistics
of the same pass that builds the Gram; tasks without ``ridge_terms`` (and stores of trakjax 0.1)
use the former rule, :data:`AUTO_LAMBDA_FRACTION` · trace(ΦᵀΦ)/N. Both scale with the
eigenvalues of ΦᵀΦ at every k and P, and both are floored at ten times the Gram's noise, so
k ≥ N never collapses. The evidence (LDS in ten settings against the best λ of a grid) is in
``benchmarks/README.md``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import lapack

from trakjax import regularization
from trakjax import sharding as sharding_lib
from trakjax.config import AUTO, check_lambda
from trakjax.errors import InvalidArgumentError, NumericalError

DEFAULT_RELATIVE_LAMBDA = 1e-2
"""The former default (before ``"auto"``): λ = DEFAULT_RELATIVE_LAMBDA · trace(ΦᵀΦ) / k
(:func:`relative_lambda`). Kept for comparisons; measured worse by LDS at k ≥ 512."""

AUTO_LAMBDA_FRACTION = 0.3
"""``lambda_reg="auto"`` (and ``None``) means λ = AUTO_LAMBDA_FRACTION · trace(ΦᵀΦ) / N."""


GRAM_BLOCK_ROWS = 4096
_EPS32 = float(np.finfo(np.float32).eps)


def _block_gram(block: jax.Array) -> jax.Array:
    block = block.astype(jnp.float32)
    return jnp.matmul(block.T, block, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def _gram_fn(mesh):
    return sharding_lib.shard_map_rows(_block_gram, mesh, 1, 0, reduce=True)


def _block_weighted_gram(block: jax.Array, weights: jax.Array) -> jax.Array:
    block = block.astype(jnp.float32)
    return jnp.matmul((block * weights[:, None]).T, block, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def _weighted_gram_fn(mesh):
    return sharding_lib.shard_map_rows(_block_weighted_gram, mesh, 2, 0, reduce=True)


def row_blocks(array, block_rows: int, devices: int = 1):
    """Yield ``(start, rows, block)``: float32 blocks of ``block_rows`` rows of ``array``.

    A block shorter than ``block_rows`` is zero-padded to ``block_rows`` (one compiled shape for
    every block) when ``array`` has more rows than that, and to a multiple of ``devices``
    otherwise; ``rows`` is the number of real rows.
    """
    n = array.shape[0]
    full = sharding_lib.round_up(block_rows, devices)
    for start in range(0, n, full):
        block = np.asarray(array[start : start + full], dtype=np.float32)
        rows = block.shape[0]
        target = full if n > full else sharding_lib.round_up(rows, devices)
        if rows < target:
            block = np.concatenate([block, np.zeros((target - rows, *block.shape[1:]), np.float32)])
        yield start, rows, block


def gram(features, *, block_rows: int = GRAM_BLOCK_ROWS, mesh=None, weights=None) -> np.ndarray:
    """ΦᵀΦ of (N, k) features (any float dtype, numpy, memmap or jax): (k, k) float64; with
    ``weights`` w (N,), the weighted Gram ΦᵀWΦ = Σ_i w_i φ_i φ_iᵀ (the Gauss–Newton kernel's
    ΦᵀHΦ, :mod:`trakjax.curvature`; each block's rows are weighted in float32, then reduced like
    ΦᵀΦ: a weighted ``psum`` over the mesh).

    Each block of ``block_rows`` rows is multiplied in float32 at full precision (split over the
    mesh's devices and reduced with ``psum`` when ``mesh`` has several); blocks are summed in
    float64 on the host. Zero padding rows add nothing. Across processes, combine the per-process
    Grams with :func:`trakjax.sharding.process_sum`.

    Raises:
      NumericalError: if the features are not finite, or are finite but so large that their
        float32 Gram overflows (naming the largest magnitude and what to do).
    """
    n, k = features.shape
    devices = sharding_lib.mesh_size(mesh)
    if weights is not None:
        weights = np.asarray(weights, np.float32).reshape(-1)
        if weights.shape != (n,):
            raise InvalidArgumentError(f"weights need {n} entries (the rows of features), got {weights.shape[0]}")
        padded_weights = {start: block[:, 0] for start, _, block in row_blocks(weights[:, None], block_rows, devices)}
        fn = _weighted_gram_fn(mesh if devices > 1 else None)
    else:
        fn = _gram_fn(mesh if devices > 1 else None)
    total = np.zeros((k, k), np.float64)
    largest = 0.0
    for start, _, block in row_blocks(features, block_rows, devices):
        if not np.isfinite(block).all():
            raise NumericalError("the features are not finite (NaN or Inf); their Gram cannot be formed")
        largest = max(largest, float(np.abs(block).max(initial=0.0)))
        part = fn(block) if weights is None else fn(block, padded_weights[start])
        total += np.asarray(part, np.float64)
    if not np.isfinite(total).all():
        raise NumericalError(
            f"the Gram ΦᵀΦ overflowed float32: the features are finite but reach |φ| = {largest:.3g}, "
            f"and sums of their squares pass float32's largest value ({float(np.finfo(np.float32).max):.3g}). "
            "The per-example gradients are that large: rescale the model's inputs or outputs "
            "(e.g. normalize the inputs)"
        )
    return total


class Spectrum(NamedTuple):
    """Eigendecomposition of a Gram ΦᵀΦ in float64.

    Attributes:
      eigenvalues: (k,) ascending.
      eigenvectors: (k, k), columns are eigenvectors.
      tolerance: eigenvalues at or below it count as zero (rounding noise of Φ and its Gram).
      rank: number of eigenvalues above ``tolerance``.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    tolerance: float
    rank: int


def rounding_noise(storage_dtype=np.float32) -> float:
    """Relative size, against the largest eigenvalue, of rounding noise in a Gram of features.

    float32 features: the float32 accumulation of the Gram, ``eps(float32)``. Low-precision
    features (bfloat16, float16): their rounding puts eigenvalues of order ``eps(dtype)²`` (relative)
    where the exact Gram has zeros; the larger of the two.
    """
    eps = float(jnp.finfo(storage_dtype).eps)
    return max(_EPS32, eps * eps)


def spectrum(gram_matrix: np.ndarray, noise: float = _EPS32) -> Spectrum:
    """Eigendecomposition and numerical rank of a symmetric (k, k) Gram, in float64.

    The rank tolerance is the larger of ``noise · max_eigenvalue`` and four times the magnitude
    of the most negative computed eigenvalue (a Gram is positive semi-definite, so negative
    eigenvalues measure the rounding noise directly). Measured on a digits MLP (N = 1000,
    k = 128 … 2048): the float32 Gram's eigenvalues match float64 ones to about 1e-8·max, genuine
    eigenvalues reach down to about 3e-6·max, and the null space of a k ≥ N Gram sits at 1e-8·max;
    a tolerance scaled by k or by the trace (numpy's ``matrix_rank`` convention) would call
    hundreds of genuine eigenvalues zero.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(_symmetric(gram_matrix))
    top = max(float(eigenvalues[-1]), 0.0)
    tolerance = max(noise * top, 4.0 * max(0.0, -float(eigenvalues[0])))
    rank = int((eigenvalues > tolerance).sum())
    return Spectrum(eigenvalues, eigenvectors, tolerance, rank)


def relative_lambda(spec: Spectrum, relative: float = DEFAULT_RELATIVE_LAMBDA) -> float:
    """λ = ``relative`` · trace(ΦᵀΦ) / k, the mean eigenvalue scaled."""
    mean = float(np.clip(spec.eigenvalues, 0.0, None).mean())
    return relative * mean


def auto_lambda(spec: Spectrum, num_examples: int, fraction: float = AUTO_LAMBDA_FRACTION) -> float:
    """The retraining-free λ of ``lambda_reg="auto"`` from a spectrum: ``fraction · trace(ΦᵀΦ) / N``,
    never below ten times the spectrum's rank tolerance (:func:`auto_lambda_from`)."""
    trace = float(np.clip(spec.eigenvalues, 0.0, None).sum())
    return auto_lambda_from(trace, num_examples, 10.0 * spec.tolerance, fraction)


def auto_lambda_from(trace: float, num_examples: int, floor: float,
                     fraction: float = AUTO_LAMBDA_FRACTION) -> float:
    """The retraining-free λ of ``lambda_reg="auto"``: ``max(fraction · trace(ΦᵀΦ) / N, floor)``.

    trace(ΦᵀΦ)/N = mean_i ‖φ_i‖² is the mean contribution of one training example to the Gram,
    so λ adds a ``fraction`` of an average example in every direction. ``floor`` is ten times the
    Gram's noise level, so ΦᵀΦ + λI stays invertible (k ≥ N included).

    Measured on digits MLPs (``benchmarks/README.md``): equal to the best λ of a hand-tuned grid
    (picked by LDS on held-out targets) at k = 512 … 2048 for trained checkpoints, across N, width
    and training length; checkpoints stopped early (training 1 − p ≈ 0.08) wanted about 3× more
    and lost 0.015–0.03 LDS with it.

    Args:
      trace: trace(ΦᵀΦ).
      num_examples: N, the number of training rows of Φ.
      floor: the smallest λ allowed.
      fraction: the multiple of mean_i ‖φ_i‖² (default :data:`AUTO_LAMBDA_FRACTION`).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 1:
        raise InvalidArgumentError(
            f"lambda_reg='auto' needs num_examples (N, the rows of Φ) as an int >= 1, got {num_examples!r}"
        )
    if not (isinstance(fraction, int | float | np.floating) and np.isfinite(fraction) and fraction > 0):
        raise InvalidArgumentError(f"fraction must be a finite float > 0, got {fraction!r}")
    return max(fraction * trace / int(num_examples), floor)


def largest_eigenvalue(gram_matrix: np.ndarray, iterations: int = 30) -> float:
    """λ̂_max of a symmetric PSD (k, k) matrix by power iteration (a Rayleigh quotient, a lower
    bound that converges from below): ``iterations`` matrix-vector products, O(k²) each, from a
    fixed start vector (deterministic)."""
    vector = np.random.default_rng(0).standard_normal(gram_matrix.shape[0])
    estimate = 0.0
    for _ in range(iterations):
        product = gram_matrix @ vector
        norm = float(np.linalg.norm(product))
        if norm == 0.0:
            return 0.0
        estimate = float(vector @ product) / float(vector @ vector)
        vector = product / norm
    return max(estimate, 0.0)


CHOLESKY_NOISE_MARGIN = 10.0
"""The Cholesky path runs when λ ≥ CHOLESKY_NOISE_MARGIN · noise · λ̂_max (else the
eigendecomposition, with rank detection)."""


class KernelSolve(NamedTuple):
    """The regularized inverse of one checkpoint's Gram.

    Attributes:
      inverse: (k, k) float64, (ΦᵀΦ + λI)⁻¹, divided by ``scale``.
      lambda_reg: the λ used (absolute).
      rank: numerical rank of ΦᵀΦ from the eigendecomposition, or ``None`` on the Cholesky path
        (no eigendecomposition ran; ΦᵀΦ + λI was positive definite).
      condition: condition number of ΦᵀΦ + λI: exact from the eigendecomposition, or on the
        Cholesky path the estimate (λ̂_max + λ)/λ, an upper bound up to λ̂_max's power-iteration error.
      scale: 1, or mean|A⁻¹| under ``reference_compat`` (the reference's rescaling).
      spectrum: the :class:`Spectrum` of ΦᵀΦ, or ``None`` on the Cholesky path.
      method: ``"cholesky"`` or ``"eigh"``.
      lambda_rule: how λ was chosen: ``"implied ridge"`` (``"auto"`` with the checkpoint's
        statistics, :mod:`trakjax.regularization`), ``"0.3·trace/N"`` (``"auto"`` without them),
        or ``"absolute"``.
      kernel: ``"trak"`` (ΦᵀΦ + λI) or ``"gauss-newton"`` (ΦᵀHΦ + λI, :mod:`trakjax.curvature`).
      clipped_curvature: how many h < 0 were clipped to 0 (Gauss–Newton kernel).
    """

    inverse: np.ndarray
    lambda_reg: float
    rank: int | None
    condition: float
    scale: float
    spectrum: Spectrum | None
    method: str = "eigh"
    lambda_rule: str = "absolute"
    kernel: str = "trak"
    clipped_curvature: int = 0


def _cholesky_inverse(gram_matrix: np.ndarray, lam: float) -> np.ndarray | None:
    """(G + λI)⁻¹ = L⁻ᵀ L⁻¹ from the float64 Cholesky factor G + λI = L Lᵀ (LAPACK's ``potrf``,
    then ``potri``, which forms L⁻ᵀ L⁻¹ from L using its triangular structure: about k³/3 flops
    each, against 2k³ for inverting L and multiplying out); None if G + λI is not numerically
    positive definite. (k, k) float64, symmetric."""
    k = gram_matrix.shape[0]
    shifted = np.array(gram_matrix, dtype=np.float64, order="F")
    shifted.flat[:: k + 1] += lam
    lower, info = lapack.dpotrf(shifted, lower=True, clean=False, overwrite_a=True)
    if info == 0:
        inverse, info = lapack.dpotri(lower, lower=True, overwrite_c=True)
    if info < 0:  # an argument LAPACK rejects: a bug here, not a property of G
        raise RuntimeError(f"LAPACK rejected argument {-info} of the Cholesky inverse of a {k}×{k} matrix")
    if info > 0:  # not positive definite (potrf), or a zero pivot (potri)
        return None
    inverse = np.tril(inverse)  # potri fills the lower triangle only
    inverse += np.tril(inverse, -1).T
    return inverse


def _rank_bounds(k: int, num_examples, num_params, num_features, num_curved=None) -> dict[str, int]:
    """What bounds the rank of ΦᵀΦ (or ΦᵀHΦ): k, N, P, (factorized family) K_fac and
    (Gauss–Newton kernel) #{h > 0}, where known."""
    named = (("k", k), ("N", num_examples), ("P", num_params), ("K_fac", num_features), ("#{h>0}", num_curved))
    return {name: int(value) for name, value in named if value is not None}


def _singular_error(spec: Spectrum, lambda_reg, bounds: dict[str, int], num_examples,
                    kernel: str = "trak") -> NumericalError:
    k = spec.eigenvalues.shape[0]
    structural = min(bounds.values())
    auto = (f"λ = {AUTO_LAMBDA_FRACTION:g}·trace/N = {auto_lambda(spec, num_examples):.4g}"
            if num_examples is not None else f"λ = {AUTO_LAMBDA_FRACTION:g}·trace/N")
    name = "ΦᵀHΦ" if kernel == "gauss-newton" else "ΦᵀΦ"
    return NumericalError(
        f"lambda_reg={lambda_reg} leaves {name} + λI singular: {name} ({k}×{k}) has numerical rank "
        f"{min(spec.rank, structural)} < k (its rank is at most "
        f"min({', '.join(f'{n}={v}' for n, v in bounds.items())})). "
        f"Use lambda_reg=None or 'auto' ({auto}) or a lambda_reg well above "
        f"{spec.tolerance:.3g}, or a smaller proj_dim"
    )


def choose_lambda(gram_matrix, lambda_reg, num_examples, tolerance: float, ridge=None,
                  kernel: str = "trak") -> tuple[float, str]:
    """(λ, the rule that chose it) for ``lambda_reg``, never below 10·``tolerance`` for ``"auto"``.

    ``"auto"`` with ``ridge`` (:class:`~trakjax.regularization.RidgeStatistics`) is the
    implied-ridge rule, :func:`trakjax.regularization.auto_lambda`; without it,
    :data:`AUTO_LAMBDA_FRACTION` · trace(G)/N (:func:`auto_lambda_from`), G the ``gram_matrix``
    (ΦᵀΦ, or ΦᵀHΦ for the Gauss–Newton ``kernel``).
    """
    if lambda_reg != AUTO:
        return float(lambda_reg), "absolute"
    if ridge is not None:
        lam = regularization.auto_lambda(gram_matrix, ridge, tolerance=tolerance, kernel=kernel)
        return lam, "implied ridge"
    rule = f"{AUTO_LAMBDA_FRACTION:g}·trace/N"
    return auto_lambda_from(float(np.trace(gram_matrix)), num_examples, 10.0 * tolerance), rule


def _eigh_solve(gram_matrix, lambda_reg, noise, num_examples, bounds: dict[str, int], ridge=None,
                kernel: str = "trak") -> KernelSolve:
    """The eigendecomposition path: exact rank detection, λ = 0 allowed on a full-rank Gram."""
    spec = spectrum(gram_matrix, noise)
    k = spec.eigenvalues.shape[0]
    lam, rule = choose_lambda(gram_matrix, lambda_reg, num_examples, spec.tolerance, ridge, kernel)
    if (spec.rank < k or min(bounds.values()) < k) and lam <= spec.tolerance:
        raise _singular_error(spec, lambda_reg, bounds, num_examples, kernel)
    shifted = np.clip(spec.eigenvalues, 0.0, None) + lam
    inverse = (spec.eigenvectors / shifted) @ spec.eigenvectors.T
    condition = float(shifted[-1] / shifted[0]) if shifted[0] > 0 else float("inf")
    return KernelSolve(inverse, lam, spec.rank, condition, 1.0, spec, "eigh", rule)


def solve(
    gram_matrix: np.ndarray,
    lambda_reg: float | str | None = None,
    *,
    reference_compat: bool = False,
    num_examples: int | None = None,
    num_params: int | None = None,
    storage_dtype=np.float32,
    method: str = "auto",
    num_features: int | None = None,
    ridge: regularization.RidgeStatistics | None = None,
    kernel: str = "trak",
    num_curved: int | None = None,
) -> KernelSolve:
    """(ΦᵀΦ + λI)⁻¹ in float64: a Cholesky factorization where λ is well above the Gram's noise,
    else an eigendecomposition with rank detection.

    With λ ≥ :data:`CHOLESKY_NOISE_MARGIN` · noise · λ̂_max (noise: the Gram's relative rounding
    noise, :func:`rounding_noise`; λ̂_max by power iteration, :func:`largest_eigenvalue`),
    ΦᵀΦ + λI is positive definite beyond doubt and a float64 Cholesky with the explicit inverse
    (LAPACK ``potrf`` and ``potri``) is exact to float64 rounding at about a third of an
    eigendecomposition's time. Below that (λ = 0 among others), or when the Cholesky fails, the
    eigendecomposition path detects the rank and raises on a singular system. The scores do not
    depend on which path ran beyond float32 rounding; :attr:`KernelSolve.method` says which.

    Args:
      gram_matrix: (k, k) ΦᵀΦ, e.g. from :func:`gram`.
      lambda_reg: ``"auto"`` or ``None`` (the same) for λ = :data:`AUTO_LAMBDA_FRACTION` ·
        trace(ΦᵀΦ)/N, floored at ten times the noise (:func:`auto_lambda_from`, needs
        ``num_examples``); a float ≥ 0 for an absolute λ (``0.0`` means exactly zero).
      reference_compat: divide A⁻¹ by mean|A⁻¹|, as the reference library (trak 0.3.2) does; this
        reweights checkpoints in the ensemble average.
      num_examples: N, the rows of Φ: required by ``"auto"``/``None``, and named in error
        messages (the rank of ΦᵀΦ is at most min(N, P, K_fac, k)).
      num_params: P (differentiated parameters), likewise.
      storage_dtype: dtype the features were stored in (sets the noise level).
      method: ``"auto"`` (as above) or ``"eigh"`` (always the eigendecomposition, e.g. for rules
        that need the spectrum).
      num_features: K_fac for the factorized family (features are a linear map of K_fac
        numbers, which also bounds the rank), likewise.
      ridge: the checkpoint's :class:`~trakjax.regularization.RidgeStatistics`: with them
        ``"auto"`` is the implied-ridge rule (:func:`choose_lambda`).
      kernel: ``"trak"`` (``gram_matrix`` is ΦᵀΦ) or ``"gauss-newton"`` (it is ΦᵀHΦ,
        :mod:`trakjax.curvature`; ``ridge`` then from ``ridge_statistics(kernel="gauss-newton")``):
        sets the implied-ridge rule's form (λ = ρ̂/α, no h̄) and the wording of errors; an
        absolute λ is added to ΦᵀHΦ, a matrix about h̄ times smaller than ΦᵀΦ.
      num_curved: #{h > 0} (Gauss–Newton kernel), a bound on the rank named in errors.

    Returns:
      :class:`KernelSolve`.

    Raises:
      NumericalError: if ΦᵀΦ is zero or not finite, or ΦᵀΦ + λI is numerically singular (λ
        below the rank tolerance while ΦᵀΦ is rank deficient), giving the rank found and a λ
        relative to the spectrum that would work.
    """
    gram_matrix = _checked_gram(gram_matrix)
    lambda_reg = check_lambda(lambda_reg)
    if method not in ("auto", "eigh"):
        raise InvalidArgumentError(f"method must be 'auto' or 'eigh', got {method!r}")
    noise = rounding_noise(storage_dtype)
    if kernel not in ("trak", "gauss-newton"):
        raise InvalidArgumentError(f"kernel must be 'trak' or 'gauss-newton', got {kernel!r}")
    solved = None
    if method == "auto" and lambda_reg != 0.0:
        top = largest_eigenvalue(gram_matrix)
        lam, rule = choose_lambda(gram_matrix, lambda_reg, num_examples, noise * top, ridge, kernel)
        inverse = _cholesky_inverse(gram_matrix, lam) if lam >= CHOLESKY_NOISE_MARGIN * noise * top else None
        if inverse is not None:
            solved = KernelSolve(inverse, lam, None, (top + lam) / lam, 1.0, None, "cholesky", rule, kernel)
    if solved is None:
        bounds = _rank_bounds(gram_matrix.shape[0], num_examples, num_params, num_features, num_curved)
        solved = _eigh_solve(gram_matrix, lambda_reg, noise, num_examples, bounds, ridge, kernel)
        solved = solved._replace(kernel=kernel)
    if reference_compat:
        scale = float(np.abs(solved.inverse).mean())
        solved = solved._replace(inverse=solved.inverse / scale, scale=scale)
    return solved


def _symmetric(gram_matrix) -> np.ndarray:
    """The symmetric part of a finite square matrix, in float64."""
    gram_matrix = np.asarray(gram_matrix, np.float64)
    if gram_matrix.ndim != 2 or gram_matrix.shape[0] != gram_matrix.shape[1]:
        raise InvalidArgumentError(f"gram must be a square (k, k) matrix, got shape {gram_matrix.shape}")
    if not np.isfinite(gram_matrix).all():
        raise NumericalError("gram has NaN or Inf entries; solve needs a finite ΦᵀΦ")
    return 0.5 * (gram_matrix + gram_matrix.T)


def _checked_gram(gram_matrix) -> np.ndarray:
    """:func:`_symmetric`, and not zero."""
    gram_matrix = _symmetric(gram_matrix)
    if np.trace(gram_matrix) <= 0:
        raise NumericalError(
            "the Gram ΦᵀΦ is zero: every projected gradient is zero (check the task's output "
            "function and grad_wrt)"
        )
    return gram_matrix


def _times(block, matrix):
    return jnp.matmul(block.astype(jnp.float32), matrix, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def _times_fn(mesh):
    return sharding_lib.shard_map_rows(_times, mesh, 1, 1)


def apply_inverse(
    features,
    kernel: KernelSolve | np.ndarray,
    *,
    block_rows: int = GRAM_BLOCK_ROWS,
    out: np.ndarray | None = None,
    mesh=None,
) -> np.ndarray:
    """F = Φ A⁻¹: (N, k) float32, computed block by block at full float32 precision.

    Args:
      features: Φ (N, k), any float dtype (numpy, memory map or jax).
      kernel: a :class:`KernelSolve` or the (k, k) inverse itself.
      block_rows: rows per block (a fixed compiled shape).
      out: optional (N, k) array to write F into block by block, e.g. a memory map, so that F
        is never held in memory whole; each block is cast to ``out``'s dtype on assignment.
      mesh: split each block's rows over this mesh's devices.

    Returns:
      ``out``, or a new (N, k) float32 array.
    """
    inverse = kernel.inverse if isinstance(kernel, KernelSolve) else np.asarray(kernel)
    matrix = jnp.asarray(inverse, jnp.float32)
    n, _ = features.shape
    if out is None:
        out = np.empty((n, matrix.shape[1]), np.float32)
    elif tuple(out.shape) != (n, matrix.shape[1]):
        raise InvalidArgumentError(f"out has shape {tuple(out.shape)}, expected {(n, matrix.shape[1])}")
    fn = _times_fn(mesh if sharding_lib.mesh_size(mesh) > 1 else None)
    for start, rows, block in row_blocks(features, block_rows, sharding_lib.mesh_size(mesh)):
        out[start : start + rows] = np.asarray(fn(block, matrix))[:rows]
    return out

