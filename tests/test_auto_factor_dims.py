"""factor_dims=None: factor sizes chosen from proj_dim (K_factor ≈ 32·proj_dim, one power of two in
[8, 128] for both sides), resolved once per run, recorded resolved in stores; an explicit value
keeps its meaning and an older store keeps its recorded sizes."""

import json

import _store_helpers as helpers
import jax
import pytest

import trakjax
from trakjax import featurize
from trakjax.factorized import plan as factorized_plan

# The digits MLP 64-64-10 with biases folded in: sides (65, 64) and (65, 10).
DIGITS_MLP = [(1, 65, 64), (1, 65, 10)]


def k_factor(blocks, k):
    return sum(s * min(k, a) * min(k, b) for s, a, b in blocks)


@pytest.mark.parametrize("proj_dim,expected", [
    (2, 8),      # target 64: 8 gives 128 (the smallest size)
    (8, 16),     # target 256: 16 gives 416, 8 gives 128
    (64, 32),    # target 2048: 32 gives 1344, 64 gives 4736
    (128, 64),   # target 4096: 64 gives 4736
    (512, 128),  # target 16384: 128 makes every side the identity (4810, P itself)
])
def test_digits_mlp_sizes(proj_dim, expected):
    assert factorized_plan.auto_factor_size(DIGITS_MLP, proj_dim) == expected


def test_k_factor_follows_proj_dim_on_wide_layers():
    # 16 layers 1024 × 1024, 2 slices each: k_factor(k) = 32·k², so 32·proj_dim is met exactly
    blocks = [(2, 1024, 1024)] * 16
    for proj_dim, k in ((64, 8), (256, 16), (1024, 32), (4096, 64), (16384, 128)):
        assert factorized_plan.auto_factor_size(blocks, proj_dim) == k
        assert k_factor(blocks, k) == factorized_plan.AUTO_FEATURES_PER_OUTPUT * proj_dim
    assert factorized_plan.auto_factor_size(blocks, 1) == 8  # clamped below
    assert factorized_plan.auto_factor_size(blocks, 10**7) == 128  # and above


def test_closest_in_ratio_ties_to_the_larger_and_identity_sides_to_the_smallest():
    # k_factor: 8 → 64, 16 → 256; target 128 = 32·4 is a factor 2 from both: the larger wins
    assert factorized_plan.auto_factor_size([(1, 16, 16)], 4) == 16
    # every side already the identity at 8: larger sizes give the same plan, 8 is kept
    assert factorized_plan.auto_factor_size([(3, 5, 7)], 4096) == 8
    assert factorized_plan.auto_factor_size([], 512) == 8
    assert factorized_plan.auto_factor_size(DIGITS_MLP, "all") == factorized_plan.ALL_FEATURES_FACTOR_SIZE


def _digits_mlp():
    train, _ = helpers.digits()
    params = helpers.model().init(jax.random.key(0), train[0][:1])
    return helpers.task(), params, jax.tree_util.tree_map(lambda a: a[0], train)


def test_the_plan_of_none_is_the_plan_of_the_chosen_pair():
    task, params, example = _digits_mlp()  # 64 → 16 → 10: sides (65, 16) and (17, 10)
    # k_factor: 8 → 144, 16 → 416, 32 → 682, 64 → 1194, 128 → 1210 (P)
    for proj_dim, expected in ((8, (16, 16)), (32, (64, 64)), (256, (128, 128)), ("all", (64, 64))):
        auto = featurize.describe_factorization(task, params, example, proj_dim=proj_dim).plan
        explicit = featurize.describe_factorization(task, params, example, factor_dims=expected,
                                                    proj_dim=proj_dim).plan
        assert auto == explicit and auto.factor_dims == expected


def test_config_keeps_none_and_resolution_fixes_the_pair():
    assert trakjax.Config.create(projection="factorized").result.factor_dims is None
    assert trakjax.Config.create(projection="factorized", factor_dims=64).result.factor_dims == (64, 64)
    task, params, example = _digits_mlp()
    for projection in ("auto", "factorized"):
        config = trakjax.Config.create(projection=projection, proj_dim=8)
        resolved = featurize.resolve_auto_projection(task, params, config, example=example)
        assert (resolved.result.projection, resolved.result.factor_dims) == ("factorized", (16, 16))
        assert "factor_dims" not in resolved.given_settings()  # still unset: a store's value is adopted
    explicit = trakjax.Config.create(projection="factorized", proj_dim=8, factor_dims=4)
    assert featurize.resolve_auto_projection(task, params, explicit, example=example).result.factor_dims == (4, 4)


def test_store_records_the_resolved_sizes_and_an_old_store_keeps_its_own(tmp_path):
    checkpoints = helpers.train_checkpoints(1, steps=5)
    helpers.run_session(tmp_path / "auto", checkpoints, phases=("featurize",), projection="factorized",
                        proj_dim=8)
    record = json.loads((tmp_path / "auto" / "trakjax_store.json").read_text())["config"]
    assert record["factor_dims"] == [16, 16]  # proj_dim 8: target 256, 16 gives 416, 8 gives 144
    # a store written with the former default factor_dims=64, reopened with factor_dims unset
    helpers.run_session(tmp_path / "old", checkpoints, phases=("featurize",), projection="factorized",
                        proj_dim=8, factor_dims=64)
    helpers.run_session(tmp_path / "old", checkpoints, phases=("finalize",), projection="factorized", proj_dim=8)
    assert json.loads((tmp_path / "old" / "trakjax_store.json").read_text())["config"]["factor_dims"] == [64, 64]
