"""Convolutions over maps (in or out) smaller than their window, evaluated as matmuls of patches.

XLA's CPU backend swaps the operands of a convolution whose input has fewer spatial positions
than its window (ResNet's last stages at 32×32 images: 3×3 kernels over 2×2 and 1×1 maps), and of
the activation backward of one whose output has (a strided 3×3 convolution from 4×4 to 2×2). The
swapped convolution materializes a reversed copy of the kernel and runs at a few GFLOP/s, in the
forward pass and again in the activation backward: measured, 89 → 22 ms per batch of the HF
ResNet-18 featurize step (benchmarks/README.md).

For such a convolution the patches are few, so the factorized evaluator computes it as

    y[n, o, :] = Σ_{w ∈ window} x[n, s·o + d·w − lo, :] · W[w]

one matmul per window offset w, of the strided slice of x that w reads inside the map (positions
in the padding are left out, so the multiply-adds are the convolution's own). The result is the
convolution's up to the order of float32 summation; its autodiff is matmuls, slices and pads, with
no reversed kernel.

:mod:`~trakjax.factorized.evaluation` takes the patch route for a convolution equation only where
:func:`is_small` holds (one feature group, one batch group, no input dilation, fewer input or
output positions than window positions), and so does a tap's P_Cᵀ·patch convolution
(:mod:`~trakjax.factorized.taps`); every other convolution is XLA's. :func:`window_patches` gives
a tap with an identity C side the patches themselves, by slices (no multiply-adds).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax


def is_small(lhs_shape, rhs_shape, params: dict) -> bool:
    """Whether a convolution with these shapes and bind parameters takes the patch route.

    True when it has one feature group and one batch group, no input (lhs) dilation, and its
    input's or its output's spatial positions are fewer than its window's. XLA swaps the first
    kind; the second's activation backward, a convolution over the output's cotangent, is swapped
    in turn (ResNet's strided 3×3 convolution from a 4×4 map to 2×2).
    """
    if params.get("feature_group_count", 1) != 1 or params.get("batch_group_count", 1) != 1:
        return False
    lhs_dilation = params.get("lhs_dilation") or ()
    if any(int(d) != 1 for d in lhs_dilation):
        return False
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    sizes = [int(lhs_shape[a]) for a in lhs_spec[2:]]
    window = [int(rhs_shape[a]) for a in rhs_spec[2:]]
    dilation = params.get("rhs_dilation") or (1,) * len(window)
    outputs = output_sizes(sizes, window, params["padding"], dilation, params["window_strides"])
    return min(math.prod(sizes), math.prod(outputs)) < math.prod(window)


def output_sizes(sizes, window, padding, rhs_dilation, window_strides) -> tuple[int, ...]:
    """A convolution's output spatial sizes (no input dilation): (size + lo + hi − d·(k − 1) − 1) // s + 1."""
    return tuple(
        (int(n) + int(lo) + int(hi) - (int(k) - 1) * int(d) - 1) // int(s) + 1
        for n, k, (lo, hi), d, s in zip(sizes, window, padding, rhs_dilation, window_strides, strict=True)
    )


def to_output_layout(y, out_spec) -> jax.Array:
    """(N, spatial..., features) → the layout ``out_spec`` (batch, feature, spatial...) names."""
    n_spatial = y.ndim - 2
    source = {out_spec[0]: 0, out_spec[1]: n_spatial + 1}
    source.update({out_spec[2 + i]: 1 + i for i in range(n_spatial)})
    return jnp.transpose(y, [source[axis] for axis in range(n_spatial + 2)])


def convolve_by_patches(x, w, *, window_strides, padding, rhs_dilation, dimension_numbers,
                        precision=None, preferred_element_type=None) -> jax.Array:
    """``lax.conv_general_dilated`` (no input dilation, one group) as Σ_w patch_w · W[w].

    For each window offset w, the output positions whose input position under w lies inside the
    (unpadded) map form a box; that box's inputs, one strided slice of x, are multiplied by
    W[w] (C_in, C_out) and padded out to the whole output. Offsets that only ever read padding
    are skipped, so the products are the convolution's own multiply-adds, no more (XLA's cost
    analysis counts the same FLOPs as for the convolution).

    Args:
      x: the input, laid out as ``dimension_numbers.lhs_spec`` says (batch, feature, spatial...).
      w: the kernel, laid out as ``rhs_spec`` (out feature, in feature, spatial...).
      window_strides, padding ((lo, hi) per spatial dim, negative allowed), rhs_dilation,
      precision, preferred_element_type: as ``lax.conv_general_dilated``.
      dimension_numbers: a ``ConvDimensionNumbers`` (lhs_spec, rhs_spec, out_spec).

    Returns:
      The convolution, laid out as ``out_spec``.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    n_spatial = len(lhs_spec) - 2
    # x as (N, spatial..., C_in); W as (window..., C_in, C_out).
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = jnp.transpose(w, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    sizes, window = x.shape[1:-1], w.shape[:n_spatial]
    dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation else (1,) * n_spatial
    strides = tuple(int(s) for s in window_strides)
    lows = tuple(int(lo) for lo, _ in padding)
    outputs = output_sizes(sizes, window, padding, dilation, strides)
    dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
    y = None
    for offset in itertools.product(*(range(k) for k in window)):
        # output n reads input s·n + d·w − lo along each spatial dim: the valid n are a range.
        first, last = [], []
        for i in range(n_spatial):
            shift = dilation[i] * offset[i] - lows[i]
            first.append(max(0, -(shift // strides[i])))  # ceil(−shift / s)
            last.append(min(outputs[i] - 1, (sizes[i] - 1 - shift) // strides[i]))
        if any(lo > hi for lo, hi in zip(first, last, strict=True)):
            continue  # this offset only ever reads padding
        start = [strides[i] * first[i] + dilation[i] * offset[i] - lows[i] for i in range(n_spatial)]
        limit = [strides[i] * last[i] + dilation[i] * offset[i] - lows[i] + 1 for i in range(n_spatial)]
        patch = lax.slice(x, [0, *start, 0], [x.shape[0], *limit, x.shape[-1]], (1, *strides, 1))
        part = lax.dot_general(patch, w[offset], (((n_spatial + 1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=preferred_element_type)
        pads = [(0, 0, 0)] + [(first[i], outputs[i] - 1 - last[i], 0) for i in range(n_spatial)] + [(0, 0, 0)]
        part = lax.pad(part, jnp.zeros((), part.dtype), pads)
        y = part if y is None else y + part
    if y is None:  # every offset reads padding only
        y = jnp.zeros((x.shape[0], *outputs, w.shape[-1]), dtype)
    return to_output_layout(y, out_spec)


def convolve_bound(x, w, params: dict) -> jax.Array | None:
    """A ``conv_general_dilated`` equation's result by patches, given its bind ``params``, where
    :func:`is_small` holds; None where XLA's convolution should run instead."""
    if not is_small(x.shape, w.shape, params):
        return None
    return convolve_by_patches(
        x, w, window_strides=params["window_strides"], padding=params["padding"],
        rhs_dilation=params.get("rhs_dilation"), dimension_numbers=params["dimension_numbers"],
        precision=params.get("precision"), preferred_element_type=params.get("preferred_element_type"),
    )


def window_patches(x, window: tuple, *, window_strides, padding, rhs_dilation, lhs_spec) -> jax.Array:
    """Every window of x: (N, outputs..., *window, C_in), no arithmetic (slices of the padded x).

    ``patches[n, o, w, c] = x_pad[n, s·o + d·w, c]``, the inputs a convolution with this
    geometry (no input dilation) multiplies by ``W[w, c, :]``; zero where the window reads padding.
    ``window`` is the kernel's spatial shape in ``lhs_spec``'s spatial order.
    """
    n_spatial = len(lhs_spec) - 2
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation else (1,) * n_spatial
    strides = tuple(int(s) for s in window_strides)
    outputs = output_sizes(x.shape[1:-1], window, padding, dilation, strides)
    pads = [(0, 0, 0)] + [(int(lo), int(hi), 0) for lo, hi in padding] + [(0, 0, 0)]
    x = lax.pad(x, jnp.zeros((), x.dtype), pads)
    slices = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = [0] + [o * d for o, d in zip(offset, dilation, strict=True)] + [0]
        limit = ([x.shape[0]]
                 + [o * d + (n - 1) * s + 1 for o, d, n, s in zip(offset, dilation, outputs, strides, strict=True)]
                 + [x.shape[-1]])
        slices.append(lax.slice(x, start, limit, (1, *strides, 1)))
    stacked = jnp.stack(slices, axis=n_spatial + 1)  # (N, outputs..., window positions, C_in)
    return stacked.reshape(x.shape[0], *outputs, *window, x.shape[-1])
