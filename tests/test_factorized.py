"""The factorized projection family: exactness against explicit kron(P_0, P_1) on materialized
per-example gradients, detection through jit/remat/scan/cond/custom_jvp, invariances, statistics,
and bad input. CPU, float32, tiny shapes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _factor_helpers import check_exact, per_example_grads, relative_error, run_features
from flax import nnx

from trakjax import factorized, featurize, projection, tasks
from trakjax import flax as trakjax_flax


def task_setup(task, params, grad_wrt=None):
    """(output_fn, diff leaves, canonical paths) of a task."""
    mask = featurize.select_parameters(params, grad_wrt)
    output_fn, diff = featurize.task_output_fn(task, params, mask)
    paths = [p for p, m in zip(factorized.canonical_paths(params), mask, strict=True) if m]
    return output_fn, diff, paths


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x))
        x = nn.tanh(nn.Dense(70)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(5, (2, 2), padding="VALID")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """2 layers, d = 16, 2 heads, causal + padding mask, tied embeddings, LayerNorm."""

    def __init__(self, vocab=11, d=16, heads=2, layers=2, max_len=8, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (max_len, d)) * 0.1)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, inputs):
        ids, pad = inputs["input_ids"], inputs["attention_mask"]
        x = self.embed(ids) + self.pos[...][: ids.shape[-1]]
        mask = nnx.combine_masks(nnx.make_causal_mask(ids), nnx.make_attention_mask(pad, pad))
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.ln(x))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (5, 7))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(lambda p, im: model.apply(p, im))
    return task, params, (x, jnp.array([0, 1, 2, 1, 0]))


@pytest.fixture(scope="module")
def transformer():
    model = trakjax_flax.from_nnx(Transformer(rngs=nnx.Rngs(0)))
    task = tasks.language_modeling(model.apply_fn)
    ids = jax.random.randint(jax.random.key(3), (3, 6), 1, 11)
    pad = jnp.array([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    return task, model, {"input_ids": ids, "attention_mask": pad}


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("factor_dims,proj_dim,second_stage", [
    (8, 50, True),         # a second stage
    ((5, 64), 2048, False),  # proj_dim >= K_fac: no second stage; k_out caps at identity
    (8, "all", False),
])
def test_mlp_exact(mlp, factor_dims, proj_dim, second_stage):
    task, params, batch = mlp
    output_fn, diff, paths = task_setup(task, params)
    plan = check_exact(output_fn, diff, batch, paths, factor_dims=factor_dims, proj_dim=proj_dim)
    assert plan.second_stage == second_stage
    assert [plan.leaves[i].path for i in plan.order] == [f"params/Dense_{i}/kernel" for i in range(3)]
    assert all(leaf.treatment == "bias" for leaf in plan.leaves if leaf.path.endswith("bias"))
    assert plan.num_params == sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def test_factor_dims_at_least_a_side_make_it_the_identity():
    params = {"kernel": jnp.ones((64, 10)), "bias": jnp.zeros(10)}  # a Dense(10) on 64 inputs
    task = tasks.regression(lambda p, v: (v @ p["kernel"] + p["bias"]).sum(-1))
    output_fn, diff, paths = task_setup(task, params)
    plan = factorized.plan_factorization(output_fn, diff, (jnp.ones(64), 0.0), paths=paths, factor_dims=64)
    kernel = plan.leaves[paths.index("kernel")]
    assert (kernel.sides[0].dim, kernel.sides[0].k, kernel.sides[0].identity) == (65, 64, False)
    assert (kernel.sides[1].dim, kernel.sides[1].k, kernel.sides[1].identity) == (10, 10, True)


def test_cnn_with_stride_and_padding_exact():
    model = CNN()
    x = jax.random.normal(jax.random.key(0), (3, 9, 9, 2))
    params = model.init(jax.random.key(1), x[:1])
    task = tasks.image_classification(lambda p, im: model.apply(p, im))
    output_fn, diff, paths = task_setup(task, params)
    batch = (x, jnp.array([0, 1, 2]))
    for proj_dim in (40, "all"):
        plan = check_exact(output_fn, diff, batch, paths, factor_dims=6, proj_dim=proj_dim)
    conv = plan.leaves[paths.index("params/Conv_0/kernel")]
    assert conv.sites == ("conv_general_dilated×1",)
    assert conv.sides[0].axes == (0, 1, 2) and conv.sides[0].dim == 3 * 3 * 2 + 1


def test_transformer_exact_with_tied_embeddings(transformer):
    task, model, batch = transformer
    output_fn, diff, paths = task_setup(task, model.params, model.grad_wrt)
    for proj_dim in (100, "all"):
        plan = check_exact(output_fn, diff, batch, paths, factor_dims=6, proj_dim=proj_dim)
    embed = plan.leaves[paths.index("params/embed/embedding")]
    assert embed.treatment == "factorized"
    assert embed.sites == ("dot_general×1", "gather×1")  # the gather and the tied output head
    dense = {plan.leaves[i].path for i in plan.dense}
    assert "params/pos" in dense and "params/ln/scale" in dense
    assert all("attn" not in p and "fc" not in p for p in dense)


def test_padding_tokens_change_nothing(transformer):
    """A sequence with two masked padding tokens has the features of the sequence without them."""
    task, model, batch = transformer
    output_fn, diff, paths = task_setup(task, model.params, model.grad_wrt)
    ids = jnp.array([3, 5, 2, 7])
    padded = {"input_ids": batch["input_ids"].at[1].set(jnp.concatenate([ids, jnp.array([0, 9])])),
              "attention_mask": batch["attention_mask"]}  # row 1: four tokens, two pads
    short = {"input_ids": ids[None], "attention_mask": jnp.ones((1, 4), jnp.int32)}
    _, _, out_a, phi_a = run_features(output_fn, diff, short, paths, factor_dims=6, proj_dim=100)
    _, _, out_b, phi_b = run_features(output_fn, diff, padded, paths, factor_dims=6, proj_dim=100)
    np.testing.assert_allclose(out_b[1:2], out_a, rtol=1e-5)
    assert relative_error(phi_b[1:2], phi_a) < 1e-5


# --------------------------------------------------------------------------- scans, remat, jit, cond


def _plain_params(key, layers=3, d=6, heads=2):
    k = jax.random.split(key, 10)
    n = lambda kk, s: jax.random.normal(kk, s) * 0.4  # noqa: E731
    return {"w_in": n(k[0], (5, d)), "layers": {"w": n(k[1], (layers, d, d)), "b": n(k[2], (layers, d))},
            "shared": n(k[6], (d, d)), "loop": n(k[7], (2, d, d)),
            "mid": n(k[8], (heads, d, 3)), "mid_bias": n(k[9], (heads, 3)),
            "heads": n(k[3], (heads, 3, 4)), "wc": n(k[4], (heads * 4, 3)), "head": n(k[5], (3, 3))}


def _plain_apply(params, x):
    """A plain function of a params pytree: jit, a checkpointed scan over stacked layers with
    biases and a weight shared by the iterations, a custom_jvp activation, static indexing in a
    Python loop, an Einsum kernel contracted on its middle axis, per-head weights (an einsum
    batch axis), a cond, and a kernel on the left of its contraction."""
    h = jax.jit(lambda x, w: x @ w)(x, params["w_in"])

    @jax.checkpoint
    def run(h, layers):
        def layer(h, wb):
            w, b = wb
            return jax.nn.relu(h @ w + b) + 0.1 * jnp.tanh(h @ params["shared"]), None

        return jax.lax.scan(layer, h, (layers["w"], layers["b"]))[0]

    h = run(h, params["layers"])
    for i in range(2):
        h = jnp.tanh(h @ params["loop"][i])
    m = jnp.einsum("bd,ndh->bnh", h, params["mid"]) + params["mid_bias"]  # (B, heads, 3)
    z = jnp.einsum("nbd,nde->nbe", jnp.transpose(m, (1, 0, 2)), params["heads"])
    z = jnp.transpose(z, (1, 0, 2)).reshape(h.shape[0], -1)
    z = jax.lax.cond(z.sum() > 0, lambda z: jax.nn.softplus(z @ params["wc"]) - 0.5,
                     lambda z: jnp.tanh(z) @ params["wc"], z)
    return jax.lax.dot_general(params["head"], z, (((0,), (1,)), ((), ()))).T


def test_scan_remat_jit_cond_custom_jvp_and_per_head_slices_exact():
    params = _plain_params(jax.random.key(0))
    task = tasks.image_classification(_plain_apply)
    output_fn, diff, paths = task_setup(task, params)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    plan = check_exact(output_fn, diff, (x, jnp.array([0, 1, 2, 0])), paths, factor_dims=3, proj_dim=50)
    by_path = {leaf.path: leaf for leaf in plan.leaves}
    assert by_path["layers/w"].slice_axes == (0,) and by_path["layers/w"].num_slices == 3
    assert by_path["layers/b"].treatment == "bias" and by_path["layers/w"].sides[0].dim == 7
    assert by_path["heads"].slice_axes == (0,) and by_path["heads"].num_slices == 2
    assert by_path["loop"].slice_axes == (0,) and by_path["loop"].num_slices == 2
    assert by_path["mid"].sides[0].axes == (0, 2) and by_path["mid_bias"].treatment == "bias"
    assert by_path["wc"].sites == ("dot_general×2",)  # one site per cond branch
    assert not plan.dense


class ScanLayer(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.lin(x))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(5, 6, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return ScanLayer(rngs)

        self.layers = create(rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        @nnx.remat
        def forward(layer, x):
            return layer(x)

        return self.out(forward(self.layers, self.inp(x)))


class LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(6)(x)), None


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(nn.remat(LinenLayer), variable_axes={"params": 0},
                         split_rngs={"params": True}, length=3)
        return nn.Dense(3)(layers()(nn.Dense(6)(x), None)[0])


def test_nnx_scan_and_linen_scan_factorize_per_layer_slice():
    x = jax.random.normal(jax.random.key(1), (3, 5))
    batch = (x, jnp.array([0, 1, 2]))
    model = trakjax_flax.from_nnx(NNXStack(nnx.Rngs(0)))
    output_fn, diff, paths = task_setup(tasks.image_classification(model.apply_fn), model.params, model.grad_wrt)
    plan = check_exact(output_fn, diff, batch, paths, factor_dims=3, proj_dim=2048)
    stacked = plan.leaves[paths.index("params/layers/lin/kernel")]
    assert stacked.treatment == "factorized" and stacked.num_slices == 3 and stacked.bias >= 0
    linen = LinenStack()
    params = linen.init(jax.random.key(0), x[:1])
    output_fn, diff, paths = task_setup(tasks.image_classification(lambda p, v: linen.apply(p, v)), params)
    plan = check_exact(output_fn, diff, batch, paths, factor_dims=3, proj_dim=2048)
    stacked = plan.leaves[paths.index("params/ScanCheckpointLinenLayer_0/Dense_0/kernel")]
    assert stacked.treatment == "factorized" and stacked.slice_axes == (0,)


def test_per_example_keys_reach_the_output(mlp):
    task, params, (x, y) = mlp

    def output(params, example, state):
        image, label = example
        keep = jax.random.bernoulli(state.key, 0.6, image.shape)
        return task.output(params, (image * keep, label), tasks.TaskState())

    sampled = tasks.from_loss(output, lambda f, ex, s: jnp.log1p(jnp.exp(-f)), uses_key=True)
    output_fn, diff, paths = task_setup(sampled, params)
    keys = jax.random.split(jax.random.key(5), 5)
    check_exact(output_fn, diff, (x, y), paths, keys=keys, factor_dims=8, proj_dim=50)
    _, _, _, a = run_features(output_fn, diff, (x, y), paths, keys=keys, factor_dims=8, proj_dim=50)
    _, _, _, b = run_features(output_fn, diff, (x[::-1], y[::-1]), paths, keys=keys[::-1],
                              factor_dims=8, proj_dim=50)
    _, _, _, c = run_features(output_fn, diff, (x, y), paths, keys=jax.random.split(jax.random.key(6), 5),
                              factor_dims=8, proj_dim=50)
    assert relative_error(b[::-1], a) < 1e-5 and relative_error(c, a) > 1e-2


def test_nested_scans_slice_the_outer_axis_and_share_inside():
    """An outer scan over stacked layers, each an inner scan over time reusing the layer's weight."""
    def apply(p, xs):  # xs: (B, T, 3)
        def layer(h, w):
            def step(c, xt):
                c = jnp.tanh(c @ w + xt)
                return c, c

            hs = jax.lax.scan(step, jnp.zeros((h.shape[0], h.shape[2])), jnp.swapaxes(h, 0, 1))[1]
            return jnp.swapaxes(hs, 0, 1), None

        return jax.lax.scan(layer, xs @ p["inp"], p["layers"])[0][:, -1] @ p["out"]

    k = jax.random.split(jax.random.key(2), 4)
    params = {"inp": jax.random.normal(k[0], (3, 4)) * 0.5, "layers": jax.random.normal(k[1], (2, 4, 4)) * 0.5,
              "out": jax.random.normal(k[2], (4, 3))}
    output_fn, diff, paths = task_setup(tasks.image_classification(apply), params)
    batch = (jax.random.normal(k[3], (3, 5, 3)), jnp.array([0, 1, 2]))
    plan = check_exact(output_fn, diff, batch, paths, factor_dims=3, proj_dim="all")
    assert plan.leaves[paths.index("layers")].num_slices == 2


# --------------------------------------------------------------------------- invariances


def test_features_do_not_depend_on_batching(mlp):
    task, params, (x, y) = mlp
    output_fn, diff, paths = task_setup(task, params)
    _, _, _, whole = run_features(output_fn, diff, (x, y), paths, factor_dims=8, proj_dim=50)
    _, _, _, head = run_features(output_fn, diff, (x[:2], y[:2]), paths, factor_dims=8, proj_dim=50)
    _, _, _, tail = run_features(output_fn, diff, (x[2:], y[2:]), paths, factor_dims=8, proj_dim=50)
    np.testing.assert_allclose(np.concatenate([head, tail]), whole, rtol=1e-5, atol=1e-6)


def test_all_identity_sides_are_the_gradient_itself(mlp):
    """λ = 0 equivalence: every side identity and proj_dim='all' gives vec(∇_W̃ f) per leaf."""
    task, params, batch = mlp
    output_fn, diff, paths = task_setup(task, params)
    plan, _, _, phi = run_features(output_fn, diff, batch, paths, factor_dims=1000, proj_dim="all")
    assert plan.k_fac == plan.num_params and not plan.second_stage
    grads = [np.asarray(g) for g in per_example_grads(output_fn, diff, batch)]
    b = grads[0].shape[0]
    expected = []
    for i in plan.order:  # W̃ = [W; b] row-major, leaves in sorted path order
        bias = grads[plan.leaves[i].bias][:, None, :]
        expected.append(np.concatenate([grads[i], bias], axis=1).reshape(b, -1))
    expected = np.concatenate(expected, axis=1)
    np.testing.assert_allclose(phi, expected, rtol=1e-5, atol=1e-7)  # φ = u·√(K_fac/P) = u
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(phi), unit(expected), rtol=1e-5, atol=1e-7)
    # the identity projection (g/√P in leaf order) has the same Gram up to the global scale P
    identity = np.asarray(projection.project(grads, kind="identity", proj_dim=None))
    np.testing.assert_allclose(phi @ phi.T, plan.num_params * identity @ identity.T, rtol=1e-5)


# --------------------------------------------------------------------------- statistics


def test_block_and_concatenation_statistics():
    """E[φ_Wᵀφ′_W] = ⟨∇_W f, ∇_W f′⟩ per block and E[φᵀφ′] = (k/P)·gᵀg′ overall, over seeds."""
    x = jax.random.normal(jax.random.key(0), (2, 12))
    params = {"kernel": jax.random.normal(jax.random.key(1), (12, 9)) / 3}
    task = tasks.regression(lambda p, v: jnp.tanh(v @ p["kernel"]).sum(-1))
    output_fn, diff, paths = task_setup(task, params)
    batch = (x, jnp.zeros(2))
    plan = factorized.plan_factorization(output_fn, diff, (x[0], 0.0), paths=paths, factor_dims=4, proj_dim=10)
    assert plan.k_fac == 16 and plan.second_stage and plan.final_dim == 10

    @jax.jit
    def features(factors):
        return factorized.factorized_features(output_fn, diff, batch, None, plan, factors, kind="normal")[1]

    g = np.asarray(per_example_grads(output_fn, diff, batch)[0]).reshape(2, -1)
    inner = []
    for seed in range(300):
        factors = factorized.factor_matrices(plan, seed=seed, model_id=0, kind="normal")
        phi = np.asarray(features(factors), np.float64)
        inner.append(phi[0] @ phi[1])
    k_over_p = plan.final_dim / plan.num_params
    assert np.mean(inner) == pytest.approx(k_over_p * g[0] @ g[1], rel=0.15)
    # one block alone (no second stage): φ_W = u·√(K/P) with E[u uᵀ] = g gᵀ
    plan_all = factorized.plan_factorization(output_fn, diff, (x[0], 0.0), paths=paths, factor_dims=4,
                                             proj_dim="all")
    assert not plan_all.second_stage and plan_all.k_fac == 16
    features_all = jax.jit(lambda f: factorized.factorized_features(
        output_fn, diff, batch, None, plan_all, f, kind="rademacher")[1])
    block = []
    for seed in range(300):
        phi = np.asarray(features_all(factorized.factor_matrices(plan_all, seed=seed, model_id=1,
                                                                 kind="rademacher")), np.float64)
        block.append(phi[0] @ phi[1] * plan.num_params / plan.k_fac)
    assert np.mean(block) == pytest.approx(g[0] @ g[1], rel=0.15)


# --------------------------------------------------------------------------- bad input and fallbacks


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, (1, 2, 3), "64", (4, 0)])
def test_factor_dims_must_be_positive_ints(mlp, bad):
    task, params, batch = mlp
    output_fn, diff, paths = task_setup(task, params)
    example = jax.tree_util.tree_map(lambda a: a[0], batch)
    with pytest.raises((ValueError, TypeError), match="factor_dims") as err:
        factorized.plan_factorization(output_fn, diff, example, paths=paths, factor_dims=bad)
    assert repr(bad) in str(err.value) and "positive int" in str(err.value)
    factorized.plan_factorization(output_fn, diff, example, paths=paths, factor_dims=np.int64(4))


@jax.custom_jvp
def _scaled_tanh(w, x):
    return jnp.tanh(x * w)


_scaled_tanh.defjvps(lambda t, y, w, x: t * x * (1 - y**2), lambda t, y, w, x: t * w * (1 - y**2))


def test_unclassifiable_parameters_go_dense_and_are_listed():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(k[0], (4, 6)), "gain": jnp.ones(6) * 1.5,
              "slope": jnp.full((6,), 0.7), "u": jax.random.normal(k[1], (6, 3)),
              "v": jax.random.normal(k[2], (3, 3))}

    def apply(p, x):
        h = _scaled_tanh(p["slope"], (x @ p["w"]) * p["gain"])  # custom_jvp with a parameter in it
        return h @ (p["u"] @ p["v"])  # a contraction of two parameters

    task = tasks.image_classification(apply)
    x = jax.random.normal(k[3], (3, 4))
    output_fn, diff, paths = task_setup(task, params)
    batch = (x, jnp.array([0, 1, 2]))
    plan = check_exact(output_fn, diff, batch, paths, factor_dims=3, proj_dim=20)
    assert plan.second_stage and not plan.rest_identity  # the dense remainder is projected too
    by_path = {leaf.path: leaf for leaf in plan.leaves}
    assert by_path["w"].treatment == "factorized"
    assert "mul" in by_path["gain"].reason
    assert "custom_jvp_call" in by_path["slope"].reason
    assert "two parameters" in by_path["u"].reason and "two parameters" in by_path["v"].reason
    table = str(featurize.describe_factorization(task, params, (x[0], 0), factor_dims=3, proj_dim=20,
                                                 second_stage="dense"))  # as check_exact planned
    for path in ("gain", "slope", "u ", "v "):
        assert any(line.startswith(path) and "dense" in line for line in table.splitlines())
    assert f"K_fac = {plan.k_fac}" in table
    # R2 and the dense remainder's R generated on the fly equal the materialized ones
    generated = factorized.factor_matrices(plan, seed=0, model_id=0, kind="rademacher", matrix_cache_bytes=0)
    assert generated.second.blocks is None and generated.remainder.blocks is None
    _, _, _, cached = run_features(output_fn, diff, batch, paths, factor_dims=3, proj_dim=20)
    on_the_fly = jax.jit(lambda f: factorized.factorized_features(
        output_fn, diff, batch, None, plan, f, kind="rademacher")[1])(generated)
    assert relative_error(on_the_fly, cached) < 1e-5  # float32 sums in another order


def test_grouped_convolutions_and_other_gathers_go_dense():
    conv = nn.Conv(4, (3, 3), feature_group_count=2)
    x = jnp.ones((6, 6, 2))
    params = {"conv": conv.init(jax.random.key(0), x[None]), "table": jnp.ones((5, 4)),
              "head": jnp.ones((4, 3))}

    def apply(p, images):
        h = conv.apply(p["conv"], images).mean((1, 2))  # (B, 4)
        picked = jnp.take_along_axis(p["table"], jnp.zeros((5, 1), jnp.int32), axis=1)  # (5, 1)
        return (h + picked[:4, 0]) @ p["head"]

    task = tasks.image_classification(apply)
    report = featurize.describe_factorization(task, params, (x, 0), factor_dims=3)
    by_path = {leaf.path: leaf for leaf in report.plan.leaves}
    assert "grouped or depthwise convolution (feature_group_count=2" in by_path["conv/params/kernel"].reason
    assert "gather that is not a lookup of whole rows" in by_path["table"].reason
    assert by_path["head"].treatment == "factorized"


def test_nothing_to_factorize_is_a_clear_error():
    params = {"scale": jnp.ones(3), "shift": jnp.zeros(3)}
    task = tasks.image_classification(lambda p, x: x * p["scale"] + p["shift"])
    output_fn, diff, paths = task_setup(task, params)
    example = (jnp.ones(3), 0)
    with pytest.raises(ValueError, match="no differentiated parameter can be factorized") as err:
        factorized.plan_factorization(output_fn, diff, example, paths=paths)
    assert "scale (3,): used element-wise by mul" in str(err.value) and "shift" in str(err.value)
    report = str(featurize.describe_factorization(task, params, example))
    assert "nothing can be factorized" in report


def test_canonical_paths_are_the_same_for_nnx_state_and_pure_dicts():
    module = NNXStack(nnx.Rngs(0))
    state = nnx.state(module, nnx.Param)
    pure = trakjax_flax.from_nnx(module).params["params"]
    assert factorized.canonical_paths(state) == factorized.canonical_paths(pure)
    assert "layers/lin/kernel" in factorized.canonical_paths(state)


def test_activation_bytes_per_example(mlp):
    task, params, batch = mlp
    output_fn, diff, paths = task_setup(task, params)
    example = jax.tree_util.tree_map(lambda a: a[0], batch)
    plan = factorized.plan_factorization(output_fn, diff, example, paths=paths, factor_dims=8)
    plain = factorized.activation_bytes_per_example(output_fn, diff, example)
    with_taps = factorized.activation_bytes_per_example(output_fn, diff, example, plan=plan)
    assert 4 * (12 + 70 + 3) <= plain < with_taps
    assert math.isfinite(with_taps)
