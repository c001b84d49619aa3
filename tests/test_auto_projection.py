"""projection="auto" (the default): the factorized family when factorizable leaves hold most
parameters, dense Rademacher otherwise; reference_compat resolves to Rademacher; resolved once
and recorded resolved; existing stores keep their recorded family and second stage."""

import json

import _store_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np

import trakjax
from trakjax import featurize, tasks


def _elementwise_task():
    """A model whose parameters are mostly an element-wise scale (not factorizable)."""

    def apply_fn(params, x):  # x (B, 64): 4096 scales used element-wise, a 192-entry head
        wide = jnp.tile(x, (1, 64)) * params["scale"]
        return wide.reshape(x.shape[0], 64, 64).sum(1) @ params["head"]

    params = {"scale": jnp.ones((4096,)), "head": jnp.ones((64, 3)) * 0.01}
    return tasks.image_classification(apply_fn), params


def test_choose_projection_by_share_of_factorizable_parameters():
    train, _ = helpers.digits()
    example = jax.tree_util.tree_map(lambda a: a[0], train)
    params = helpers.model().init(jax.random.key(0), train[0][:1])
    family, share = featurize.choose_projection(helpers.task(), params, example)
    assert family == "factorized" and share == 1.0  # kernels factorized, biases folded in

    task, params = _elementwise_task()
    x = np.ones((2, 64), np.float32)
    family, share = featurize.choose_projection(task, params, (x[0], np.int32(0)))
    assert family == "rademacher" and share < 0.5


def test_settings():
    assert trakjax.Config().result.projection == "auto"
    assert trakjax.Config.create(reference_compat=True).result.projection == "rademacher"
    resolved = trakjax.Config.create(factor_dims=16).result.resolve_projection("rademacher")
    assert (resolved.projection, resolved.factor_dims) == ("rademacher", None)
    assert trakjax.Config.create(factor_dims=16).result.resolve_projection("factorized").factor_dims == (16, 16)


def test_default_attribute_equals_the_resolved_family():
    train, targets = helpers.digits()
    checkpoints = helpers.train_checkpoints(1, steps=5)
    common = dict(proj_dim=64, batch_size=64, backend="xla")
    default = trakjax.attribute(helpers.task(), checkpoints, train, targets, **common)
    explicit = trakjax.attribute(helpers.task(), checkpoints, train, targets, projection="factorized", **common)
    np.testing.assert_array_equal(default, explicit)


def test_store_records_the_resolved_family_and_old_stores_keep_theirs(tmp_path):
    checkpoints = helpers.train_checkpoints(1, steps=5)
    helpers.run_session(tmp_path / "auto", checkpoints, phases=("featurize",), projection="auto")
    record = json.loads((tmp_path / "auto" / "trakjax_store.json").read_text())["config"]
    assert record["projection"] == "factorized"
    # a dense store (as trakjax wrote by default before "auto") reopened with default settings
    helpers.run_session(tmp_path / "dense", checkpoints, phases=("featurize",), projection="rademacher")
    helpers.run_session(tmp_path / "dense", checkpoints, phases=("finalize",), projection="auto")
    # a factorized store without the second_stage key (the dense second stage) likewise
    helpers.run_session(tmp_path / "fact", checkpoints, phases=("featurize",), projection="factorized",
                        second_stage="dense")
    assert "second_stage" not in json.loads((tmp_path / "fact" / "trakjax_store.json").read_text())["config"]
    helpers.run_session(tmp_path / "fact", checkpoints, phases=("finalize",), projection="auto")


