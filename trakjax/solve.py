"""The kernel solve: Gram ΦᵀΦ, the regularized inverse (ΦᵀΦ + λI)⁻¹ and the features F = Φ A⁻¹.

Per checkpoint m (Park et al., 2023, eq. 16)::

    A_m = Φ_mᵀ Φ_m + λ I        (k, k)
    F_m = Φ_m A_m⁻¹             (N, k)

The Gram is accumulated block by block: each block's ΦᵦᵀΦᵦ in float32 at full precision on
device, the blocks summed in float64 on the host. The solve is an eigendecomposition of the Gram
in float64, which gives the rank, the condition number and cheap λ sweeps at once: a float32
Cholesky does not fail reliably on a numerically singular matrix, and ``jnp.linalg`` returns NaN
rather than raising.

Scale of λ: the non-zero eigenvalues of ΦᵀΦ are about (k/P)·eig(GGᵀ), so a fixed λ means
something different at each k and P. A float ``lambda_reg`` is absolute (the reference's
meaning, for parity); ``None`` resolves to :data:`DEFAULT_RELATIVE_LAMBDA` times the mean
eigenvalue trace(ΦᵀΦ)/k, which keeps the solve well-posed at any k.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import sharding as sharding_lib

DEFAULT_RELATIVE_LAMBDA = 1e-2
"""``lambda_reg=None`` means λ = DEFAULT_RELATIVE_LAMBDA · trace(ΦᵀΦ) / k."""

GRAM_BLOCK_ROWS = 4096
_EPS32 = float(np.finfo(np.float32).eps)


def _block_gram(block: jax.Array) -> jax.Array:
    block = block.astype(jnp.float32)
    return jnp.matmul(block.T, block, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def _gram_fn(mesh):
    return sharding_lib.shard_map_rows(_block_gram, mesh, 1, 0, reduce=True)


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


def gram(features, *, block_rows: int = GRAM_BLOCK_ROWS, mesh=None) -> np.ndarray:
    """ΦᵀΦ of (N, k) features (any float dtype, numpy, memmap or jax): (k, k) float64.

    Each block of ``block_rows`` rows is multiplied in float32 at full precision (split over the
    mesh's devices and reduced with ``psum`` when ``mesh`` has several); blocks are summed in
    float64 on the host. Zero padding rows add nothing. Across processes, combine the per-process
    Grams with :func:`trakjax.sharding.process_sum`.
    """
    _, k = features.shape
    fn = _gram_fn(mesh if sharding_lib.mesh_size(mesh) > 1 else None)
    total = np.zeros((k, k), np.float64)
    for _, _, block in row_blocks(features, block_rows, sharding_lib.mesh_size(mesh)):
        total += np.asarray(fn(block), np.float64)
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
    gram_matrix = np.asarray(gram_matrix, np.float64)
    if gram_matrix.ndim != 2 or gram_matrix.shape[0] != gram_matrix.shape[1]:
        raise ValueError(f"gram must be a square (k, k) matrix, got shape {gram_matrix.shape}")
    if not np.isfinite(gram_matrix).all():
        raise ValueError("gram has NaN or Inf entries; the features it came from are not finite")
    symmetric = 0.5 * (gram_matrix + gram_matrix.T)
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    top = max(float(eigenvalues[-1]), 0.0)
    tolerance = max(noise * top, 4.0 * max(0.0, -float(eigenvalues[0])))
    rank = int((eigenvalues > tolerance).sum())
    return Spectrum(eigenvalues, eigenvectors, tolerance, rank)


def relative_lambda(spec: Spectrum, relative: float = DEFAULT_RELATIVE_LAMBDA) -> float:
    """λ = ``relative`` · trace(ΦᵀΦ) / k, the mean eigenvalue scaled."""
    mean = float(np.clip(spec.eigenvalues, 0.0, None).mean())
    return relative * mean


class KernelSolve(NamedTuple):
    """The regularized inverse of one checkpoint's Gram.

    Attributes:
      inverse: (k, k) float64, (ΦᵀΦ + λI)⁻¹, divided by ``scale``.
      lambda_reg: the λ used (absolute).
      rank: numerical rank of ΦᵀΦ.
      condition: condition number of ΦᵀΦ + λI.
      scale: 1, or mean|A⁻¹| under ``reference_compat`` (the reference's rescaling).
      spectrum: the :class:`Spectrum` of ΦᵀΦ.
    """

    inverse: np.ndarray
    lambda_reg: float
    rank: int
    condition: float
    scale: float
    spectrum: Spectrum


def solve(
    gram_matrix: np.ndarray,
    lambda_reg: float | None = None,
    *,
    reference_compat: bool = False,
    num_examples: int | None = None,
    num_params: int | None = None,
    storage_dtype=np.float32,
) -> KernelSolve:
    """(ΦᵀΦ + λI)⁻¹ with rank detection, from an eigendecomposition in float64.

    Args:
      gram_matrix: (k, k) ΦᵀΦ, e.g. from :func:`gram`.
      lambda_reg: ``None`` for the relative default (see the module docstring); a float ≥ 0 for
        an absolute λ (``0.0`` means exactly zero).
      reference_compat: divide A⁻¹ by mean|A⁻¹|, as the reference library (trak 0.3.2) does; this
        reweights checkpoints in the ensemble average.
      num_examples: N, for error messages (the rank of ΦᵀΦ is at most min(N, P, k)).
      num_params: P (differentiated parameters), likewise.
      storage_dtype: dtype the features were stored in (sets the rank tolerance).

    Returns:
      :class:`KernelSolve`.

    Raises:
      ValueError: if ΦᵀΦ + λI is numerically singular (λ below the rank tolerance while ΦᵀΦ is
        rank deficient), giving the rank found and a λ relative to the spectrum that would work.
    """
    spec = spectrum(gram_matrix, rounding_noise(storage_dtype))
    k = spec.eigenvalues.shape[0]
    if lambda_reg is None:
        lam = relative_lambda(spec)
    else:
        if isinstance(lambda_reg, bool) or not isinstance(lambda_reg, int | float | np.floating | np.integer):
            raise TypeError(f"lambda_reg must be None or a float >= 0, got {lambda_reg!r}")
        lam = float(lambda_reg)
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"lambda_reg must be None or a finite float >= 0, got {lambda_reg}")
    if spec.eigenvalues[-1] <= 0:
        raise ValueError(
            "the Gram ΦᵀΦ is zero: every projected gradient is zero (check the task's output "
            "function and grad_wrt)"
        )
    bounds = [f"k={k}"]
    if num_examples is not None:
        bounds.append(f"N={num_examples}")
    if num_params is not None:
        bounds.append(f"P={num_params}")
    structural = min([k] + [b for b in (num_examples, num_params) if b is not None])
    if (spec.rank < k or structural < k) and lam <= spec.tolerance:
        suggestion = relative_lambda(spec)
        raise ValueError(
            f"lambda_reg={lambda_reg} leaves ΦᵀΦ + λI singular: ΦᵀΦ ({k}×{k}) has numerical rank "
            f"{min(spec.rank, structural)} < k (its rank is at most min({', '.join(bounds)})). "
            f"Use lambda_reg=None (λ = {DEFAULT_RELATIVE_LAMBDA:g}·trace/k = {suggestion:.4g}) or "
            f"a lambda_reg well above {spec.tolerance:.3g}, or a smaller proj_dim"
        )
    shifted = np.clip(spec.eigenvalues, 0.0, None) + lam
    inverse = (spec.eigenvectors / shifted) @ spec.eigenvectors.T
    condition = float(shifted[-1] / shifted[0]) if shifted[0] > 0 else float("inf")
    scale = 1.0
    if reference_compat:
        scale = float(np.abs(inverse).mean())
        inverse = inverse / scale
    return KernelSolve(inverse, lam, spec.rank, condition, scale, spec)


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
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, matrix.shape[1])}")
    fn = _times_fn(mesh if sharding_lib.mesh_size(mesh) > 1 else None)
    for start, rows, block in row_blocks(features, block_rows, sharding_lib.mesh_size(mesh)):
        out[start : start + rows] = np.asarray(fn(block, matrix))[:rows]
    return out

