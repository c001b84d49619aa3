"""Convolutions over maps smaller than their window, by patches: values and gradients against
``lax.conv_general_dilated`` in float64, the route taken, and the factorized features of a
model whose last convolutions see 2×2 and 1×1 maps (exact against the explicit reference, and no
convolution left in the compiled step)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _factor_helpers import check_exact
from jax import lax

from trakjax import factorized, featurize, tasks
from trakjax.factorized.small_convolutions import convolve_by_patches, is_small

CASES = [
    # (x shape, w shape, strides, padding, rhs dilation, layouts)
    ((2, 2, 2, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 1, 1, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 2, 2, 5), (3, 3, 5, 4), (2, 2), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 5, 3, 2), (4, 5, 3, 3), (1, 2), ((2, 1), (0, 2)), (1, 1), ("NCHW", "OIHW", "NCHW")),
    ((2, 5, 3, 2), (4, 5, 3, 3), (1, 1), ((3, -1), (1, 2)), (2, 1), ("NCHW", "OIHW", "NHWC")),
    ((3, 2, 5), (4, 5, 7), (1,), ((3, 3),), (2,), ("NWC", "WIO", "NWC")),
    ((1, 2, 2, 1, 3), (3, 3, 3, 3, 2), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), ("NHWDC", "HWDIO", "NHWDC")),
    # the only output reads padding only: zeros
    ((2, 1, 4), (1, 4, 3), (3,), ((2, 0),), (1,), ("NWC", "WIO", "NWC")),
]


def _params(x_shape, w_shape, layouts, **overrides):
    dn = lax.conv_dimension_numbers(x_shape, w_shape, layouts)
    n = len(x_shape) - 2
    return {"feature_group_count": 1, "batch_group_count": 1, "lhs_dilation": (1,) * n, "rhs_dilation": (1,) * n,
            "window_strides": (1,) * n, "padding": ((1, 1),) * n, "dimension_numbers": dn, **overrides}


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation,layouts", CASES)
def test_patches_equal_the_convolution_and_its_gradients(x_shape, w_shape, strides, padding, dilation, layouts):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    dn = lax.conv_dimension_numbers(x_shape, w_shape, layouts)
    with jax.enable_x64(True):
        def reference(x, w):
            return lax.conv_general_dilated(x, w, strides, padding, None, dilation, dn, precision="highest")

        def patches(x, w):
            return convolve_by_patches(x, w, window_strides=strides, padding=padding, rhs_dilation=dilation,
                                       dimension_numbers=dn)

        expected = reference(x, w)
        assert expected.size > 0
        got = patches(x, w)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        cotangent = rng.normal(size=expected.shape)
        grads_ref = jax.vjp(reference, x, w)[1](cotangent)
        grads_got = jax.vjp(patches, x, w)[1](cotangent)
        for a, b in zip(grads_got, grads_ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_the_patch_route_is_for_small_maps_with_one_group_and_no_input_dilation():
    nhwc = ("NHWC", "HWIO", "NHWC")
    assert is_small((8, 2, 2, 64), (3, 3, 64, 64), _params((8, 2, 2, 64), (3, 3, 64, 64), nhwc))
    assert is_small((8, 1, 1, 64), (3, 3, 64, 64), _params((8, 1, 1, 64), (3, 3, 64, 64), nhwc))
    # 3×3 = 9 positions in and out against a 3×3 window: not fewer, XLA's convolution
    assert not is_small((8, 3, 3, 64), (3, 3, 64, 64), _params((8, 3, 3, 64), (3, 3, 64, 64), nhwc))
    # 4×4 in, but 2×2 out (stride 2): its activation backward would be swapped
    assert is_small((8, 4, 4, 64), (3, 3, 64, 64), _params((8, 4, 4, 64), (3, 3, 64, 64), nhwc, window_strides=(2, 2)))
    assert not is_small((8, 4, 4, 64), (3, 3, 64, 64), _params((8, 4, 4, 64), (3, 3, 64, 64), nhwc))
    assert not is_small((8, 2, 2, 64), (1, 1, 64, 64), _params((8, 2, 2, 64), (1, 1, 64, 64), nhwc))
    assert not is_small((8, 2, 2, 64), (3, 3, 32, 64),
                        _params((8, 2, 2, 64), (3, 3, 32, 64), nhwc, feature_group_count=2))
    assert not is_small((8, 2, 2, 64), (3, 3, 64, 64),
                        _params((8, 2, 2, 64), (3, 3, 64, 64), nhwc, lhs_dilation=(2, 2)))
    # NCHW: the spatial axes are read from the dimension numbers, not from the shape's positions
    nchw = ("NCHW", "OIHW", "NCHW")
    assert is_small((8, 64, 2, 2), (64, 64, 3, 3), _params((8, 64, 2, 2), (64, 64, 3, 3), nchw))
    assert not is_small((2, 2, 8, 8), (2, 2, 3, 3), _params((2, 2, 8, 8), (2, 2, 3, 3), nchw))


class SmallMapsCNN(nn.Module):
    """8×8 → (3×3, stride 2: XLA's) 4×4 → (3×3, stride 2: 2×2 out, small) → (3×3 on 2×2, small)
    → (3×3, stride 2 on 2×2, small) 1×1."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(7, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding="SAME")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _small_maps_setup():
    model = SmallMapsCNN()
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 2))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(lambda p, im: model.apply(p, im))
    mask = featurize.select_parameters(params, None)
    output_fn, diff = featurize.task_output_fn(task, params, mask)
    paths = [p for p, m in zip(factorized.canonical_paths(params), mask, strict=True) if m]
    return output_fn, diff, paths, (x, jnp.array([0, 1, 2]))


def test_small_map_convolutions_factorize_exactly():
    output_fn, diff, paths, batch = _small_maps_setup()
    for factor_dims, proj_dim in ((4, 30), (64, "all")):  # projected sides, then identity sides
        plan = check_exact(output_fn, diff, batch, paths, factor_dims=factor_dims, proj_dim=proj_dim)
    for name in ("Conv_1", "Conv_2", "Conv_3"):
        assert plan.leaves[paths.index(f"params/{name}/kernel")].sites == ("conv_general_dilated×1",)


def test_the_compiled_step_runs_small_map_convolutions_as_matmuls():
    output_fn, diff, paths, batch = _small_maps_setup()
    example = jax.tree_util.tree_map(lambda a: a[0], batch)
    plan = factorized.plan_factorization(output_fn, diff, example, None, paths=paths, factor_dims=4, proj_dim=30)
    factors = factorized.factor_matrices(plan, seed=0, model_id=0, kind="rademacher")

    def step(leaves, batch, factors):
        return factorized.factorized_features(output_fn, leaves, batch, None, plan, factors, kind="rademacher")

    hlo = jax.jit(step).lower(list(diff), batch, factors).compile().as_text()
    # Conv_0 (8×8 → 4×4) stays one convolution forward and one for its tap; its activation
    # backward is not needed (the input is data). Conv_1 to Conv_3 (2×2 outputs or inputs) add
    # none, forward or backward.
    assert hlo.count("convolution(") == 2, hlo.count("convolution(")


def _torch_layout_output(leaves, example, key):
    """A plain-JAX model with NCHW/OIHW convolutions (dilated, strided, asymmetric padding)."""
    del key
    w0, b0, w1, dense = leaves
    x = example[0][None]
    dn = ("NCHW", "OIHW", "NCHW")
    x = jnp.tanh(lax.conv_general_dilated(x, w0, (1, 2), ((1, 0), (2, 1)), rhs_dilation=(2, 1),
                                          dimension_numbers=dn) + b0[None, :, None, None])
    x = jnp.tanh(lax.conv_general_dilated(x, w1, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))
    return (x.reshape(-1) @ dense)[example[1]]


def test_identity_sided_convolution_taps_are_the_patches_in_any_layout():
    """An identity C side takes the patch by slices: exact for torch-layout kernels (C rows in
    leaf order: in-feature, then kernel height, then width), dilation, strides, padding."""
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(size=s), jnp.float32) * 0.3
              for s in [(4, 3, 2, 3), (4,), (5, 4, 3, 2), (5 * 5 * 4, 3)]]
    x = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
    batch = (x, jnp.array([0, 2, 1]))
    paths = ["w0", "b0", "w1", "dense"]
    for factor_dims, proj_dim in ((64, "all"), (64, 40)):  # identity sides; then a second stage
        plan = check_exact(_torch_layout_output, leaves, batch, paths, factor_dims=factor_dims, proj_dim=proj_dim)
    assert all(side.identity for side in plan.leaves[0].sides)
    assert plan.leaves[0].sites == ("conv_general_dilated×1",)
