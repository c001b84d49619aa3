"""Taps: per-site gradients of the Kronecker-projected weight gradient, never forming ∇_W f.

The factorized featurizer replaces each factorized leaf W by W_eff = W + P_C Z P_Fᵀ (per slice),
with Z a zero (k_C, k_F) array, and differentiates the output with respect to Z:

    ∂f/∂Z = Σ_sites Σ_t (P_Cᵀ a_t)(P_Fᵀ δ_t)ᵀ = P_Cᵀ (∇_W f) P_F        (k_C × k_F)

where at a site a_t is the activation W is contracted with (a patch for a convolution, a one-hot
row for a gather) and δ_t the cotangent of the site's output. Because Z = 0 the extra term
changes no forward value and sends no cotangent back to the activations, so :func:`tap` is a
``jax.custom_vjp`` that returns the site's output unchanged, keeps ``u = P_Cᵀ a`` (positions × k_C,
one matmul, convolution or row gather of P_C) as its residual, and in the backward pass turns the
output cotangent δ into ``v = P_Fᵀ δ`` and returns ``uᵀ v`` as Z's cotangent. W itself is a
constant: no weight gradient is ever computed.

A bias b folded into W (W̃ = [W; b], input [a; 1]) adds a last row to P_C: a site where b is
added uses the constant 1 there (``c_on``), the kernel's other sites use 0. When the bias row
belongs to W's free side at a site (a tied embedding's bias on its vocab axis, seen from the
gather), δ is padded with 0 there. An identity side (factor size ≥ its dimension) has no matrix:
u = a (with the bias entry appended) or v = δ.

Shapes: ``z`` is (*batch, k_0, k_1) with the site's dot_general batch (slice) axes leading;
``p_c``/``p_f`` are (*batch, D, k) or None for identity sides; C is side ``c_side`` of W.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from trakjax.errors import ArgumentTypeError
from trakjax.factorized import small_convolutions
from trakjax.factorized.analysis import ConvGeometry, DotGeometry, GatherGeometry
from trakjax.projection import matmul_precision


class TapConfig(NamedTuple):
    """Static description of one site's tap.

    Attributes:
      geometry: the site's :class:`DotGeometry`, :class:`ConvGeometry` or :class:`GatherGeometry`.
      c_side: which side of W (0 or 1) the site contracts with the activations.
      c_row: the C side has a bias row (its last row).
      c_on: this site adds the folded bias (the bias row's input is 1, else 0).
      f_row: the F side has a bias row (δ is padded with 0 for it).
      precision: matmul precision policy (``"highest"``, ``"high"``, ``"default"``).
    """

    geometry: tuple
    c_side: int
    c_row: bool
    c_on: bool
    f_row: bool
    precision: str = "highest"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tap(cfg: TapConfig, y, x, z, p_c, p_f):
    """The site output ``y`` unchanged; its vjp gives ``z`` the cotangent uᵀ(P_Fᵀ δ) (see module)."""
    del cfg, x, z, p_c, p_f
    return y


def _tap_fwd(cfg, y, x, z, p_c, p_f):
    del z
    return y, (site_inputs(cfg, x, p_c), p_f)


def _tap_bwd(cfg, residuals, ct):
    u, p_f = residuals
    prec = matmul_precision(cfg.precision)
    d = site_cotangents(cfg, ct)
    d_f = cfg.geometry.d_f
    if p_f is None:
        if cfg.f_row:
            d = jnp.concatenate([d, jnp.zeros(d.shape[:-1] + (1,), d.dtype)], axis=-1)
        v = d
    else:
        v = jnp.matmul(d, p_f[..., :d_f, :], precision=prec, preferred_element_type=jnp.float32)
    g = jnp.matmul(jnp.swapaxes(u, -1, -2), v, precision=prec, preferred_element_type=jnp.float32)
    if cfg.c_side == 1:
        g = jnp.swapaxes(g, -1, -2)
    return ct, None, g, None, None


tap.defvjp(_tap_fwd, _tap_bwd)


def site_inputs(cfg: TapConfig, x, p_c) -> jax.Array:
    """u = P_Cᵀ a for every position: (*batch, positions, k_C) float32."""
    geo = cfg.geometry
    prec = matmul_precision(cfg.precision)
    if isinstance(geo, DotGeometry):
        a = jnp.transpose(x, geo.x_perm).reshape(geo.x_shape).astype(jnp.float32)
        u = a if p_c is None else jnp.matmul(
            a, p_c[..., : geo.d_c, :], precision=prec, preferred_element_type=jnp.float32)
    elif isinstance(geo, ConvGeometry):
        u = _conv_inputs(geo, x, p_c, prec)
    elif isinstance(geo, GatherGeometry):
        u = _gather_inputs(geo, x, p_c)
    else:
        raise ArgumentTypeError(f"unknown site geometry {type(geo).__name__}")
    return _bias_input(cfg, u, p_c)


def _bias_input(cfg: TapConfig, u, p_c):
    """Append the bias row's input (1 where this site adds the bias, else 0)."""
    if not cfg.c_row:
        return u
    if p_c is None:
        return jnp.concatenate([u, jnp.full(u.shape[:-1] + (1,), float(cfg.c_on), u.dtype)], axis=-1)
    if not cfg.c_on:
        return u
    return u + p_c[..., cfg.geometry.d_c, None, :]


def _conv_inputs(geo: ConvGeometry, x, p_c, prec):
    """P_Cᵀ patch_t for every output position, as one convolution with P_C as the kernel (by
    patches where its input or output is smaller than the window, as the site's own convolution);
    the patch itself, by slices, for an identity C side."""
    x = x.astype(jnp.float32)
    if p_c is None and all(int(d) == 1 for d in geo.lhs_dilation):
        return _conv_patches(geo, x)
    rows = jnp.eye(geo.d_c, dtype=jnp.float32) if p_c is None else p_c[: geo.d_c]
    kernel = jnp.transpose(rows.reshape(geo.c_shape + (rows.shape[-1],)), geo.kernel_perm)
    params = dict(window_strides=geo.window_strides, padding=geo.padding, lhs_dilation=geo.lhs_dilation,
                  rhs_dilation=geo.rhs_dilation, dimension_numbers=geo.dimension_numbers, precision=prec,
                  preferred_element_type=jnp.float32)
    u = small_convolutions.convolve_bound(x, kernel, params)
    if u is None:
        u = lax.conv_general_dilated(x, kernel, **params)
    return jnp.transpose(u, geo.y_perm).reshape(-1, rows.shape[-1])


def _conv_patches(geo: ConvGeometry, x):
    """An identity C side: u = the patch itself, in the C side's row order (slices, no products)."""
    lhs_spec, rhs_spec, out_spec = geo.dimension_numbers
    n_spatial = len(lhs_spec) - 2
    # kernel dim d holds the reshaped rows' axis kernel_perm[d]; the patches' trailing axes are
    # the kernel dims rhs_spec[2:] (window) then rhs_spec[1] (input feature).
    window = tuple(geo.c_shape[geo.kernel_perm[d]] for d in rhs_spec[2:])
    patches = small_convolutions.window_patches(
        x, window, window_strides=geo.window_strides, padding=geo.padding,
        rhs_dilation=geo.rhs_dilation, lhs_spec=lhs_spec)
    trailing = [geo.kernel_perm[d] for d in (*rhs_spec[2:], rhs_spec[1])]  # row axis of each
    order = [1 + n_spatial + trailing.index(j) for j in range(len(geo.c_shape))]
    u = jnp.transpose(patches, (0, *range(1, 1 + n_spatial), *order))
    u = u.reshape(*u.shape[: 1 + n_spatial], geo.d_c)
    # (N, spatial..., d_c) → the output's layout, then positions × d_c as for a convolution.
    u = small_convolutions.to_output_layout(u, out_spec)
    return jnp.transpose(u, geo.y_perm).reshape(-1, geo.d_c)


def _gather_inputs(geo: GatherGeometry, indices, p_c):
    """Rows of P_C at the gathered rows (zero rows where a FILL_OR_DROP gather drops)."""
    idx = indices.reshape(-1, indices.shape[-1]).astype(jnp.int32)
    sizes = jnp.asarray(geo.sizes, jnp.int32)
    valid = jnp.all((idx >= 0) & (idx < sizes), axis=-1)
    if not geo.fill:
        idx = jnp.clip(idx, 0, sizes - 1)
        valid = jnp.ones_like(valid)
    flat = jnp.sum(idx * jnp.asarray(geo.strides, jnp.int32), axis=-1)
    flat = jnp.where(valid, flat, 0)
    if p_c is None:
        rows = jax.nn.one_hot(flat, geo.d_c, dtype=jnp.float32)
    else:
        rows = jnp.take(p_c, flat, axis=0)
    return rows * valid[:, None].astype(jnp.float32)


def site_cotangents(cfg: TapConfig, ct) -> jax.Array:
    """δ of every position, W's free axes last in leaf order: (*batch, positions, d_F) float32."""
    geo = cfg.geometry
    ct = jnp.transpose(ct, geo.y_perm).astype(jnp.float32)
    if isinstance(geo, DotGeometry):
        return ct.reshape(geo.y_shape)
    return ct.reshape(-1, geo.d_f)
