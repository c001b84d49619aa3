"""The ready-made tasks: analytic Q against autodiff of the training loss, and end to end.

For every task: (1) its analytic out-to-loss term equals ``tasks.from_loss`` with the training
loss written as a function of the output (an independent formulation of the loss, e.g. optax's
cross-entropies); (2) ``trakjax.attribute`` on a tiny model equals the float64 closed form of
``task_helpers`` built from batched Jacobians. CLIP also gets its sampling, batch-size and
per-checkpoint-bank properties checked, and every task its bad-input errors.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from task_helpers import (
    clip_data,
    clip_fns,
    clip_params,
    closed_form_scores,
    kernel_scores,
    projected,
    relative_error,
    relative_lambda,
    train_and_target_grads,
)

import trakjax
from trakjax import featurize, tasks
from trakjax.tasks import TaskState

SEED = 3
K = 32


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def q_of(task, params, batch, state=TaskState()):
    """task.out_to_loss under one jit (compiling op by op costs more than the test)."""
    return np.asarray(jax.jit(task.out_to_loss)(params, batch, state))


def outputs_of(task, params, batch, state=TaskState()):
    """f of every example of a batch: task.output vmapped, under one jit."""

    def run(p, b, s):
        key_axis = None if s.key is None else 0
        return jax.vmap(lambda ex, k: task.output(p, ex, TaskState(s.aux, k)), in_axes=(0, key_axis))(b, s.key)

    return np.asarray(jax.jit(run)(params, batch, state))


# --------------------------------------------------------------------------- text classification

VOCAB, LENGTH, WIDTH, HEADS, CLASSES = 20, 8, 8, 2, 3


class TinyTextClassifier(nn.Module):
    """A one-block transformer encoder that, like Hugging Face models, reads the batch dimension."""

    @nn.compact
    def __call__(self, inputs):
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        batch, length = ids.shape  # fails on an example without its batch axis
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x = nn.Embed(VOCAB, WIDTH)(ids) + nn.Embed(2, WIDTH)(types) + nn.Embed(LENGTH, WIDTH)(positions)
        head = WIDTH // HEADS
        q, k, v = (nn.Dense(WIDTH)(x).reshape(batch, length, HEADS, head) for _ in range(3))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head)
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e9)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
        x = nn.LayerNorm()(x + nn.Dense(WIDTH)(attended.reshape(batch, length, WIDTH)))
        weights = mask[..., None].astype(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1)
        return nn.Dense(CLASSES)(pooled)


def text_data(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, LENGTH + 1, size=n)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, VOCAB, size=(n, LENGTH)).astype(np.int32) * mask
    types = ((np.arange(LENGTH)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    labels = rng.integers(0, CLASSES, size=n).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, labels


@pytest.fixture(scope="module")
def text_setup():
    model = TinyTextClassifier()
    train, targets = text_data(24, 0), text_data(4, 1)
    params = jax.jit(model.init)(jax.random.key(0), train[0])
    return model, params, train, targets


def test_text_classification_q_matches_autodiff_of_cross_entropy(text_setup):
    model, params, train, _ = text_setup
    one_example = jax.tree_util.tree_map(lambda x: x[0], train[0])
    with pytest.raises(ValueError, match="not enough values to unpack"):
        model.apply(params, one_example)  # the model needs its batch axis, as HF models do
    task = tasks.text_classification(model.apply)
    auto = tasks.from_loss(
        task.output,
        lambda f, ex, s: optax.sigmoid_binary_cross_entropy(f, 1.0),  # −log σ(f) = −log p
    )
    got = q_of(task, params, train, TaskState())
    expected = q_of(auto, params, train, TaskState())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    logits = np.asarray(jax.jit(model.apply)(params, train[0]), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got, 1 - p[np.arange(24), train[1]], rtol=1e-5, atol=1e-6)


def test_text_classification_end_to_end_and_jitted_scorer(text_setup):
    model, params, train, targets = text_setup
    task = tasks.text_classification(model.apply)

    def margins(p, batch):
        logits = model.apply(p, batch[0])  # the whole batch at once
        return jax.vmap(tasks.classification_margin)(logits, batch[1])

    g_train, g_targets = train_and_target_grads(margins, params, train, targets)
    q = np.asarray(q_of(task, params, train, TaskState()), np.float64)
    expected, lam = closed_form_scores(g_train, g_targets, q, proj_dim=K, seed=SEED, model_id=0)
    got = trakjax.attribute(
        task, [params], train, targets, projection="rademacher", proj_dim=K, seed=SEED, lambda_reg=lam, batch_size=32,
        backend="xla", kernel="trak",
    )
    assert relative_error(got, expected) < 1e-4
    # The same scores from the pure function inside jit, with dict inputs.
    features = trakjax.train_features(
        task, [params], train, projection="rademacher", proj_dim=K, seed=SEED, lambda_reg=lam, batch_size=32, backend="xla", kernel="trak"
    )
    jitted = jax.jit(lambda score_fn, p, b: score_fn(p, b))(
        trakjax.scorer(task, features), params, targets
    )
    assert relative_error(jitted, got.astype(np.float64)) < 1e-5


# --------------------------------------------------------------------------- binary classification


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_params(seed, d_in, hidden, d_out):
    rng = np.random.default_rng(seed)
    return {
        "b1": (0.1 * rng.normal(size=hidden)).astype(np.float32),
        "b2": (0.1 * rng.normal(size=d_out)).astype(np.float32),
        "w1": rng.normal(size=(d_in, hidden)).astype(np.float32) / np.sqrt(d_in),
        "w2": rng.normal(size=(hidden, d_out)).astype(np.float32) / np.sqrt(hidden),
    }


def binary_data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 2, size=n).astype(np.int32)


@pytest.mark.parametrize("squeeze", [False, True])
def test_binary_classification_q_matches_autodiff_of_bce(squeeze):
    params = mlp_params(0, 6, 5, 1)
    apply_fn = (lambda p, x: mlp(p, x)[:, 0]) if squeeze else mlp
    task = tasks.binary_classification(apply_fn)
    x, y = binary_data(10, 0)
    # BCE of the raw logit z = f·(2y − 1), as a function of the output f.
    auto = tasks.from_loss(
        task.output, lambda f, ex, s: optax.sigmoid_binary_cross_entropy(f * (2.0 * ex[1] - 1), ex[1])
    )
    got = q_of(task, params, (x, y), TaskState())
    np.testing.assert_allclose(got, q_of(auto, params, (x, y), TaskState()), rtol=1e-5, atol=1e-6)
    z = np.asarray(mlp(params, x), np.float64)[:, 0]
    p_true = np.where(y == 1, sigmoid(z), 1 - sigmoid(z))
    np.testing.assert_allclose(got, 1 - p_true, rtol=1e-5, atol=1e-6)
    outputs = outputs_of(task, params, (x, y))
    np.testing.assert_allclose(outputs, np.log(p_true / (1 - p_true)), rtol=1e-4, atol=1e-5)


def test_binary_classification_end_to_end():
    params = mlp_params(1, 6, 5, 1)
    task = tasks.binary_classification(mlp)
    train, targets = binary_data(30, 1), binary_data(5, 2)

    def signed(p, batch):
        return mlp(p, batch[0])[:, 0] * (2.0 * batch[1] - 1)

    g_train, g_targets = train_and_target_grads(signed, params, train, targets)
    q = 1 - sigmoid(np.asarray(signed(params, train), np.float64))
    expected, lam = closed_form_scores(g_train, g_targets, q, proj_dim=16, seed=SEED, model_id=0)
    got = trakjax.attribute(
        task, [params], train, targets, projection="rademacher", proj_dim=16, seed=SEED, lambda_reg=lam, backend="xla", kernel="trak"
    )
    assert relative_error(got, expected) < 1e-4


def test_binary_classification_rejects_bad_logits_and_labels():
    params = mlp_params(0, 6, 5, 2)
    task = tasks.binary_classification(mlp)  # two logits per example
    x, y = binary_data(4, 0)
    with pytest.raises(ValueError, match=r"binary_classification: apply_fn\(params, x\) must return one scalar per example.*\(4, 2\)"):
        trakjax.attribute(task, [params], (x, y), (x, y), projection="rademacher", proj_dim=8, backend="xla", kernel="trak")
    ok = tasks.binary_classification(mlp)
    with pytest.raises(ValueError, match=r"labels must be 0 or 1.*\[2\] at batch positions \[1\]"):
        ok.validate(mlp_params(0, 6, 5, 1), (x, np.array([0, 2, 1, 0])))


# --------------------------------------------------------------------------- CLIP

TAU, NEG = 0.5, 8


def example_keys(model_id, split, n):
    """The keys featurization gives examples 0 .. n − 1 of a split."""
    base = featurize.task_key(SEED, model_id, split)
    return jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))(base, jnp.arange(n))


@jax.jit
def clip_closed_form_margins(params, batch, bank, keys):
    """(m₁, m₂) of a batch in matrix form: all B examples' embeddings at once."""
    image_fn, text_fn = clip_fns()
    u, v = image_fn(params, batch[0]), text_fn(params, batch[1])
    idx = jax.vmap(lambda k: tasks.sample_negatives(k, NEG, bank.image.shape[0]))(keys)  # (B, n)
    positive = jnp.sum(u * v, -1) / TAU
    to_texts = jnp.einsum("bd,bnd->bn", u, bank.text[idx]) / TAU
    to_images = jnp.einsum("bd,bnd->bn", v, bank.image[idx]) / TAU
    return (positive - jax.nn.logsumexp(to_texts, -1), positive - jax.nn.logsumexp(to_images, -1))


def test_clip_q_matches_autodiff_of_contrastive_loss_with_its_temperature():
    image_fn, text_fn = clip_fns()
    task = tasks.clip(image_fn, text_fn, temperature=TAU, n_negatives=NEG)
    params = clip_params(0)
    train = clip_data(12, 0)
    bank = task.init(params, train)
    keys = example_keys(0, featurize.TRAIN_SPLIT, 12)

    def loss(f, example, state):
        # Softmax cross-entropy over [positive, n negatives] in both directions, with the
        # positive logit raised by (f − f*)/2 (which raises f by f − f*).
        u, v = image_fn(params, example[0][None])[0], text_fn(params, example[1][None])[0]
        f_star = jax.lax.stop_gradient(task.output(params, example, state))
        idx = tasks.sample_negatives(state.key, NEG, state.aux.image.shape[0])
        positive = jnp.dot(u, v) / TAU + (f - f_star) / 2
        rows = jnp.concatenate([positive[None], state.aux.text[idx] @ u / TAU])
        cols = jnp.concatenate([positive[None], state.aux.image[idx] @ v / TAU])
        zero = jnp.zeros((), jnp.int32)
        return (optax.softmax_cross_entropy_with_integer_labels(rows, zero)
                + optax.softmax_cross_entropy_with_integer_labels(cols, zero))

    auto = tasks.from_loss(task.output, loss, uses_key=True)
    state = TaskState(bank, keys)
    got = q_of(task, params, train, state)
    np.testing.assert_allclose(got, q_of(auto, params, train, state), rtol=1e-5, atol=1e-6)
    # Q at batch size 1 is the same number, and not the reference's 0.
    single = q_of(task, params, (train[0][3:4], train[1][3:4]), TaskState(bank, keys[3:4]))
    np.testing.assert_allclose(single, got[3:4], rtol=1e-6)
    assert float(single[0]) > 1e-3
    # The temperature enters the output too: f at τ equals the closed form at τ, not at 1.
    m1, m2 = clip_closed_form_margins(params, train, bank, keys)
    outputs = outputs_of(task, params, train, TaskState(bank, keys))
    np.testing.assert_allclose(outputs, m1 + m2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, 1 - (sigmoid(np.asarray(m1)) + sigmoid(np.asarray(m2))) / 2, rtol=1e-5)


def test_clip_samples_negatives_uniformly_including_index_zero():
    draws = jax.jit(jax.vmap(lambda k: tasks.sample_negatives(k, 50, 7)))(
        jax.random.split(jax.random.key(0), 400)
    )
    counts = np.bincount(np.asarray(draws).ravel(), minlength=7)
    expected = draws.size / 7
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.min() > 0 and counts[0] > 0.9 * expected
    assert chi2 < 22.5, (chi2, counts)  # χ²(6) 99.9th percentile


def test_clip_end_to_end_with_a_bank_per_checkpoint_and_jitted_scorer():
    image_fn, text_fn = clip_fns()
    task = tasks.clip(image_fn, text_fn, temperature=TAU, n_negatives=NEG)
    checkpoints = [clip_params(1), clip_params(2)]
    train, targets = clip_data(20, 1), clip_data(3, 2)
    k = 16

    def closed_form(model_id, params):
        bank = task.init(params, train)
        np.testing.assert_allclose(bank.image, image_fn(params, train[0]), rtol=1e-5, atol=1e-6)  # its own θ_m
        train_keys = example_keys(model_id, featurize.TRAIN_SPLIT, 20)
        target_keys = example_keys(model_id, featurize.TARGET_SPLIT, 3)

        def outputs(p, batch, bank, keys):
            m1, m2 = clip_closed_form_margins(p, batch, bank, keys)
            return m1 + m2

        m1, m2 = clip_closed_form_margins(params, train, bank, train_keys)
        q = 1 - (sigmoid(np.asarray(m1, np.float64)) + sigmoid(np.asarray(m2, np.float64))) / 2
        g_train, g_targets = train_and_target_grads(
            outputs, params, train, targets, bank, jnp.concatenate([train_keys, target_keys])
        )
        phi, psi = projected(g_train, k, SEED, model_id), projected(g_targets, k, SEED, model_id)
        return phi, psi, q

    parts = [closed_form(m, params) for m, params in enumerate(checkpoints)]
    lam = relative_lambda([phi for phi, _, _ in parts], k)
    kernel = np.mean([kernel_scores(phi, psi, lam) for phi, psi, _ in parts], axis=0)
    expected = kernel * np.mean([q for _, _, q in parts], axis=0)[:, None]
    got = trakjax.attribute(
        task, checkpoints, train, targets, projection="rademacher", proj_dim=k, seed=SEED, lambda_reg=lam, batch_size=32,
        backend="xla", kernel="trak",
    )
    assert relative_error(got, expected) < 1e-4
    features = trakjax.train_features(
        task, checkpoints, train, projection="rademacher", proj_dim=k, seed=SEED, lambda_reg=lam, batch_size=32,
        backend="xla", kernel="trak",
    )
    for m, params in enumerate(checkpoints):  # the bank of θ_m travels with F_m
        np.testing.assert_allclose(features.aux[m].text, text_fn(params, train[1]), rtol=1e-5, atol=1e-6)
    jitted = jax.jit(lambda score_fn, p, b: score_fn(p, b))(
        trakjax.scorer(task, features), checkpoints, targets
    )
    assert relative_error(jitted, got.astype(np.float64)) < 1e-5


def test_clip_rejects_embeddings_of_the_wrong_shape():
    image_fn, _ = clip_fns()
    params = clip_params(0)
    data = clip_data(4, 0)

    def short_text_fn(p, texts):  # D = 3 where images have D = 4
        return texts @ p["txt"][:, :3]

    task = tasks.clip(image_fn, short_text_fn, temperature=TAU, n_negatives=NEG)
    with pytest.raises(ValueError, match=r"clip: image_fn.*text_fn.*got \(4, 4\) and \(4, 3\) for images \(4, 5\)"):
        trakjax.attribute(task, [params], data, data, projection="rademacher", proj_dim=8, backend="xla", kernel="trak")
    flat = tasks.clip(lambda p, x: image_fn(p, x).sum(-1), short_text_fn, temperature=TAU)
    with pytest.raises(ValueError, match=r"\(B, D\) embeddings.*\(4,\)"):
        flat.validate(params, data)
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        tasks.clip(image_fn, short_text_fn, temperature=0.0)


# --------------------------------------------------------------------------- language modeling

LM_VOCAB, LM_LENGTH, LM_WIDTH = 11, 7, 6


class TinyCausalLM(nn.Module):
    """Next-token logits from each token and the mean of its prefix (causal)."""

    @nn.compact
    def __call__(self, inputs):
        ids = inputs["input_ids"]
        h = nn.Embed(LM_VOCAB, LM_WIDTH)(ids)
        prefix = jnp.cumsum(h, axis=1) / jnp.arange(1, ids.shape[1] + 1)[None, :, None]
        return nn.Dense(LM_VOCAB)(jnp.tanh(nn.Dense(LM_WIDTH)(h) + prefix))


def lm_data(n, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, LM_VOCAB, size=(n, LM_LENGTH)).astype(np.int32)
    mask = np.ones((n, LM_LENGTH), np.int32)
    for i in range(n):  # right padding on even rows, left padding on odd rows
        pad = int(rng.integers(0, 4))
        if pad:
            sl = slice(LM_LENGTH - pad, None) if i % 2 == 0 else slice(0, pad)
            mask[i, sl] = 0
            ids[i, sl] = 0
    return {"input_ids": ids, "attention_mask": mask}


def lm_closed_form(logits, ids, mask):
    """Per-sequence (summed margin, mean 1 − p over counted tokens), float64 numpy."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    targets = ids[:, 1:]
    weights = (mask[:, 1:] * mask[:, :-1]).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_true = np.take_along_axis(p, targets[..., None], -1)[..., 0]
    counted = weights > 0  # select, not multiply: an uncounted margin may be infinite
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(counted, weights * np.log(p_true / (1 - p_true)), 0.0).sum(1)
    q = np.where(counted, weights * (1 - p_true), 0.0).sum(1) / np.maximum(weights.sum(1), 1)
    return f, q


def test_language_modeling_q_matches_autodiff_of_token_cross_entropy():
    model = TinyCausalLM()
    batch = lm_data(8, 0)
    params = jax.jit(model.init)(jax.random.key(1), batch)
    task = tasks.language_modeling(model.apply)

    def loss(f, example, state):
        # Summed token cross-entropy with every counted target logit raised by (f − f*)/T.
        inputs = jax.tree_util.tree_map(lambda x: x[None], example)
        logits = model.apply(params, inputs)[0, :-1]
        targets = example["input_ids"][1:]
        w = (example["attention_mask"][1:] * example["attention_mask"][:-1]).astype(jnp.float32)
        f_star = jax.lax.stop_gradient(task.output(params, example, state))
        shift = (f - f_star) / jnp.maximum(w.sum(), 1.0)
        logits = logits + shift * jax.nn.one_hot(targets, LM_VOCAB) * w[:, None]
        return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    auto = tasks.from_loss(task.output, loss)
    got = q_of(task, params, batch, TaskState())
    np.testing.assert_allclose(got, q_of(auto, params, batch, TaskState()), rtol=1e-5, atol=1e-6)
    f, q = lm_closed_form(jax.jit(model.apply)(params, batch), batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(got, q, rtol=1e-5, atol=1e-6)
    outputs = outputs_of(task, params, batch)
    np.testing.assert_allclose(outputs, f, rtol=1e-4, atol=1e-4)
    # Padding is masked: on right-padded rows (even), which this causal model reads only after
    # the counted tokens, changing the padding token changes nothing.
    noisy = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"], 5))
    right = np.arange(8) % 2 == 0
    noisy_out = outputs_of(task, params, noisy)
    np.testing.assert_allclose(np.asarray(noisy_out)[right], np.asarray(outputs)[right], rtol=1e-6)


def test_language_modeling_uncounted_positions_never_enter():
    """A model that never predicts the padding token 0 (its logit is −inf) has infinite margins
    at padded positions and at the last position, whose placeholder target is the sequence's
    first token: none of them may reach f, q or the per-example gradient."""
    model = TinyCausalLM()
    batch = lm_data(8, 3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == 0).any() and (mask[:, 1:] == 0).any()  # both kinds of position occur
    params = jax.jit(model.init)(jax.random.key(4), batch)
    never_padding = jnp.where(jnp.arange(LM_VOCAB) == 0, -jnp.inf, 0.0)

    def apply(p, inputs):
        return model.apply(p, inputs) + never_padding

    task = tasks.language_modeling(apply)
    f, q = lm_closed_form(jax.jit(apply)(params, batch), ids, mask)
    assert np.isfinite(f).all()
    np.testing.assert_allclose(outputs_of(task, params, batch), f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q_of(task, params, batch, TaskState()), q, rtol=1e-5, atol=1e-6)

    def reference_output(p, example):  # counted positions only, sliced (no placeholder)
        logits = apply(p, jax.tree_util.tree_map(lambda x: x[None], example))[0, :-1]
        targets = example["input_ids"][1:]
        counted = (example["attention_mask"][1:] * example["attention_mask"][:-1]) > 0
        safe = jnp.where(counted, targets, 1)  # a finite target where nothing is counted
        correct = jnp.take_along_axis(logits, safe[:, None], -1)[:, 0]
        others = jax.nn.logsumexp(jnp.where(jnp.arange(LM_VOCAB) == safe[:, None], -jnp.inf, logits), -1)
        return jnp.sum(jnp.where(counted, correct - others, 0.0))

    expected = jax.vmap(jax.grad(reference_output), in_axes=(None, 0))(params, batch)
    grads, _ = featurize.per_example_grads(task, params, batch)
    for got_leaf, expected_leaf in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected), strict=True):
        assert np.isfinite(np.asarray(got_leaf)).all()
        np.testing.assert_allclose(got_leaf, expected_leaf, rtol=1e-4, atol=1e-5)


def test_language_modeling_margins_far_from_the_shift_and_nan():
    """Margins against float64 where the target's logit is 200 above the rest and the others
    spread over 150 (the logsumexp shift must be the largest counted logit, not the target's), and
    a NaN logit at a counted position makes f NaN (never dropped by the shift's reduction)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, LM_VOCAB, size=(2, LM_LENGTH)).astype(np.int32)
    logits = rng.normal(size=(2, LM_LENGTH, LM_VOCAB)).astype(np.float32)
    logits[0, :, :] *= 50.0 * np.linspace(0.0, 1.0, LM_VOCAB)  # others spread over about 150
    targets = ids[:, 1:]
    logits[0, np.arange(LM_LENGTH - 1), targets[0]] = logits[0, :-1].max(-1) + 200.0
    logits[1, 2, (targets[1, 2] + 1) % LM_VOCAB] = np.nan  # a non-target logit of a counted position
    task = tasks.language_modeling(lambda p, inputs: jnp.asarray(logits)[inputs["row"]] + p)
    f = outputs_of(task, jnp.float32(0.0), {"input_ids": ids, "row": np.arange(2)})
    wide = logits[0, :-1].astype(np.float64)
    correct = wide[np.arange(LM_LENGTH - 1), targets[0]]
    others = np.where(np.arange(LM_VOCAB) == targets[0][:, None], -np.inf, wide)
    top = others.max(-1)
    expected = np.sum(correct - (top + np.log(np.exp(others - top[:, None]).sum(-1))))
    np.testing.assert_allclose(f[0], expected, rtol=1e-6)
    assert np.isnan(f[1])


def test_language_modeling_end_to_end_and_bad_token_ids():
    model = TinyCausalLM()
    train, targets = lm_data(16, 1), lm_data(3, 2)
    params = jax.jit(model.init)(jax.random.key(2), train)
    task = tasks.language_modeling(model.apply)

    def outputs(p, batch):
        logits = model.apply(p, batch)[:, :-1]
        targets_ = batch["input_ids"][:, 1:]
        w = batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]
        correct = jnp.take_along_axis(logits, targets_[..., None], -1)[..., 0]
        others = jax.nn.logsumexp(jnp.where(jax.nn.one_hot(targets_, LM_VOCAB) > 0, -jnp.inf, logits), -1)
        return jnp.sum(w * (correct - others), axis=1)

    _, q = lm_closed_form(jax.jit(model.apply)(params, train), train["input_ids"], train["attention_mask"])
    expected, lam = closed_form_scores(
        *train_and_target_grads(outputs, params, train, targets),
        q, proj_dim=K, seed=SEED, model_id=0,
    )
    got = trakjax.attribute(
        task, [params], train, targets, projection="rademacher", proj_dim=K, seed=SEED, lambda_reg=lam, backend="xla", kernel="trak"
    )
    assert relative_error(got, expected) < 1e-4
    bad = dict(targets, input_ids=np.where(np.arange(LM_LENGTH) == 2, LM_VOCAB, targets["input_ids"]))
    with pytest.raises(ValueError, match=r"language_modeling: token ids must be in \[0, 11\).*\(3, 7, 11\)"):
        trakjax.attribute(task, [params], train, bad, projection="rademacher", proj_dim=K, backend="xla", kernel="trak")


# --------------------------------------------------------------------------- regression


def regression_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (np.sin(x[:, 0]) + 0.1 * rng.normal(size=n)).astype(np.float32)


def test_regression_q_matches_autodiff_and_end_to_end():
    params = mlp_params(2, 4, 5, 1)
    task = tasks.regression(mlp)
    train, targets = regression_data(30, 0), regression_data(4, 1)
    auto = tasks.from_loss(task.output, lambda f, ex, s: 0.5 * (f - ex[1]) ** 2)
    got_q = q_of(task, params, train, TaskState())
    np.testing.assert_allclose(got_q, q_of(auto, params, train, TaskState()), rtol=1e-5, atol=1e-6)
    residual = train[1].astype(np.float64) - np.asarray(mlp(params, train[0]), np.float64)[:, 0]
    np.testing.assert_allclose(got_q, residual, rtol=1e-5, atol=1e-6)

    expected, lam = closed_form_scores(
        *train_and_target_grads(lambda p, b: mlp(p, b[0])[:, 0], params, train, targets),
        residual, proj_dim=16, seed=SEED, model_id=0,
    )
    got = trakjax.attribute(
        task, [params], train, targets, projection="rademacher", proj_dim=16, seed=SEED, lambda_reg=lam, backend="xla", kernel="trak"
    )
    assert relative_error(got, expected) < 1e-4

    wide = tasks.regression(lambda p, x: jnp.tile(mlp(p, x), (1, 3)))
    with pytest.raises(ValueError, match=r"regression: apply_fn\(params, x\) must return one scalar per example.*\(4, 3\)"):
        trakjax.attribute(wide, [params], targets, targets, projection="rademacher", proj_dim=8, backend="xla", kernel="trak")


# --------------------------------------------------------------------------- the general featurize path


def test_featurize_rejects_a_task_whose_output_is_not_a_scalar():
    params = mlp_params(3, 6, 5, 3)
    x, y = binary_data(4, 0)
    vector = tasks.from_loss(lambda p, ex, s: mlp(p, ex[0][None])[0], lambda f, ex, s: jnp.sum(f))
    with pytest.raises(ValueError, match=r"output\(params, example, state\) must return one scalar per example; got shape \(3,\)"):
        trakjax.attribute(vector, [params], (x, y), (x, y), projection="rademacher", proj_dim=8, backend="xla", kernel="trak")
    column_q = tasks.Task(
        output=lambda p, ex, s: mlp(p, ex[0][None])[0, 0],
        out_to_loss=lambda p, b, s: jnp.ones((b[0].shape[0], 1)),  # (B, 1) like the reference
        name="column_q",
    )
    with pytest.raises(ValueError, match=r"task 'column_q': out_to_loss must return a \(B,\) array; got out_to_loss shape \(4, 1\) for a batch of 4"):
        trakjax.attribute(column_q, [params], (x, y), (x, y), projection="rademacher", proj_dim=8, backend="xla", kernel="trak")


def test_text_classification_rejects_labels_outside_the_logits():
    model = TinyTextClassifier()
    inputs, labels = text_data(4, 3)
    params = jax.jit(model.init)(jax.random.key(0), inputs)
    task = tasks.text_classification(model.apply)
    labels[2] = CLASSES
    with pytest.raises(ValueError, match=r"text_classification: labels must be in \[0, 3\) for logits of shape \(4, 3\); got \[3\]"):
        trakjax.attribute(task, [params], (inputs, labels), (inputs, labels), projection="rademacher", proj_dim=8, backend="xla", kernel="trak")
