"""Tasks: the model output function f(z; θ) and the output-to-loss term Q = −∂L/∂f.

A :class:`Task` is a NamedTuple of pure functions, in the spirit of optax's
``GradientTransformation``. Applying TRAK to a new task means writing these two functions
(Park et al., 2023, §3; the reference library's ``AbstractModelOutput``):

* ``output(params, example, state) -> scalar``: f for ONE example (no batch axis). trakjax
  differentiates it with ``jax.vmap(jax.grad(output))``.
* ``out_to_loss(params, batch, state) -> (B,)``: Q for a batch, with the reference's sign
  convention (classification gives 1 − p). Derive it analytically where you can; otherwise
  :func:`from_loss` derives it by autodiff of the loss written as a function of the output scalar.

Ready-made tasks: :func:`image_classification`, :func:`text_classification`,
:func:`binary_classification`, :func:`clip` (contrastive, with sampled negatives and a
per-checkpoint embedding bank), :func:`language_modeling` and :func:`regression`.

``state`` is a :class:`TaskState`: ``aux`` is per-checkpoint auxiliary state that ``init(params,
data)`` computes once per checkpoint (an embedding bank, for example), and ``key`` is a PRNG key
for tasks that sample (one key per example, derived from the example's index, so results do not
depend on batch boundaries; a (B,) batch of keys in ``out_to_loss``). Collections held fixed, such
as flax's ``batch_stats``, stay inside ``params`` and are left out of ``grad_wrt``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import data as data_lib
from trakjax.errors import ArgumentTypeError, InvalidArgumentError


class TaskState(NamedTuple):
    """What a task sees besides parameters and data: per-checkpoint ``aux`` and a PRNG ``key``."""

    aux: Any = None
    key: Any = None


class Task(NamedTuple):
    """A TRAK task: the model output function and its output-to-loss term.

    Attributes:
      output: ``(params, example, state) -> ()`` the model output f(z; θ) of one example.
      out_to_loss: ``(params, batch, state) -> (B,)`` Q = −∂L/∂f for each example of a batch.
      init: optional ``(params, data) -> aux``, run once per checkpoint on the training data
        (a pytree of arrays with a leading example axis) before featurizing or scoring.
      uses_key: whether ``output``/``out_to_loss`` read ``state.key``.
      validate: optional ``(params, batch) -> None`` host-side check of one batch (shapes, label
        ranges); raises ``ValueError`` with the function, shapes and valid range.
      name: a short name for messages.
      ridge_terms: optional ``(params, batch, state, q) -> (f₀ (B,), h (B,))``: the output an
        untrained model gives each example (for a margin, its value at uniform probabilities)
        and the loss curvature h = ∂²L/∂f² at the checkpoint, what ``lambda_reg="auto"``'s
        implied-ridge rule reads (:mod:`trakjax.regularization`), and h what the Gauss–Newton
        kernel weights by (:mod:`trakjax.curvature`). Computed from shapes and q (no extra
        model pass) by the ready-made tasks. f₀ = NaN means unknown (``"auto"`` then uses
        0.3·trace(ΦᵀΦ)/N, h still serves the kernel); ``None``: no curvature either (TRAK's
        kernel, and 0.3·trace(ΦᵀΦ)/N).
      from_outputs: optional ``(outputs (B,), batch, state) -> (q (B,), h (B,))``: Q and the
        curvature h = ∂²L/∂f² from the outputs f that the featurization's forward pass already
        computed, so a featurize step runs the model once per batch instead of twice (one pass
        for the features, one more for ``out_to_loss``). Ready-made tasks whose Q is a function of
        f alone have it (margins at temperature 1: Q = σ(−f); the binary signed logit; regression:
        Q = y − f; :func:`from_loss`: Q = −L′(f), h = L″(f)). ``None`` (a custom task with only
        ``out_to_loss``): the extra pass runs. A task whose Q needs more than f gives
        ``output_with_aux`` too; its ``from_outputs`` is then ``(outputs, batch, state, aux)``.
      output_with_aux: optional ``(params, example, state) -> (f (), aux)``: the same f as
        ``output`` and, from the same forward pass, what ``from_outputs`` needs beyond f (the
        language model's per-token terms, CLIP's two margins), as a pytree of arrays for ONE
        example (``has_aux`` in JAX's sense: not differentiated). Featurization then traces this
        function instead of ``output``; unused aux is removed by XLA where only f is needed.
    """

    output: Callable[..., jax.Array]
    out_to_loss: Callable[..., jax.Array]
    init: Callable[..., Any] | None = None
    uses_key: bool = False
    validate: Callable[..., None] | None = None
    name: str = "custom"
    ridge_terms: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    from_outputs: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    output_with_aux: Callable[..., tuple[jax.Array, Any]] | None = None


def describe_shapes(tree) -> str:
    """Shapes of a pytree's leaves for error messages: ``(4, 8)`` or ``{'ids': (4, 8), ...}``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if len(leaves) == 1 and not leaves[0][0]:
        return str(tuple(np.shape(leaves[0][1])))
    return "{" + ", ".join(
        f"{jax.tree_util.keystr(path)}: {tuple(np.shape(leaf))}" for path, leaf in leaves
    ) + "}"


def add_batch_axis(tree):
    """Give every leaf of one example a leading batch axis of 1: (…) -> (1, …).

    Tasks call ``apply_fn`` on ``add_batch_axis(example)`` inside ``jax.vmap``, so the model sees
    a batch of one with its usual rank: code that reads the batch dimension (``b, l =
    ids.shape``, reshapes to (b, l, heads, d)) keeps working under per-example vmapping.
    """
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)


_SHAPE_CACHE: dict = {}


def output_shape(fn, params, inputs) -> jax.ShapeDtypeStruct:
    """``jax.eval_shape(fn, params, inputs)``, memoized on ``fn`` and the argument shapes.

    Tasks validate every batch; tracing a large model for each one would cost more than the
    check, so the shape is traced once per (function, parameter and input shapes and dtypes).
    """
    leaves, treedef = jax.tree_util.tree_flatten((params, inputs))
    signature = tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)
    try:
        key = (fn, treedef, signature)
        hash(key)
    except TypeError:  # an unhashable callable: trace every time
        return jax.eval_shape(fn, params, inputs)
    if key not in _SHAPE_CACHE:
        if len(_SHAPE_CACHE) > 256:
            _SHAPE_CACHE.clear()
        _SHAPE_CACHE[key] = jax.eval_shape(fn, params, inputs)
    return _SHAPE_CACHE[key]


def _label_range_check(name: str, apply_fn, params, inputs, labels, what: str = "images") -> None:
    """Check logits are (B, C) and labels are integers in [0, C), using only shapes where possible."""
    logits = output_shape(apply_fn, params, inputs)
    batch = np.shape(labels)[0] if np.ndim(labels) else None
    if len(logits.shape) != 2 or logits.shape[0] != batch:
        raise InvalidArgumentError(
            f"{name}: apply_fn(params, {what}) must return logits of shape (B, num_classes) = "
            f"({batch}, C); got {tuple(logits.shape)} for {what} of shape {describe_shapes(inputs)}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(
            f"{name}: labels must be a (B,) integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    num_classes = logits.shape[1]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise InvalidArgumentError(
            f"{name}: labels must be in [0, {num_classes}) for logits of shape "
            f"{tuple(logits.shape)}; got {labels[bad][:5].tolist()} at batch positions "
            f"{np.flatnonzero(bad)[:5].tolist()}"
        )


def _check_pair(name: str, batch, first: str, second: str) -> None:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise InvalidArgumentError(
            f"{name}: each batch must be a pair ({first}, {second}), got {type(batch).__name__}"
        )


def q_and_h_from_aux(outputs, batch, state, aux):
    """``from_outputs`` of a task whose ``output_with_aux`` returns ``(f, (q, h))``: Q and the
    curvature already computed per example in the features' pass (``language_modeling``, ``clip``)."""
    del outputs, batch, state
    return aux


def logistic_curvature(q: jax.Array) -> jax.Array:
    """h = q(1 − q): ∂²L/∂f² of the logistic loss L = log(1 + e^{−f}) at Q = −∂L/∂f = 1 − p."""
    return q * (1.0 - q)


def margin_ridge_terms(apply_fn: Callable, inputs_of: Callable = lambda batch: batch[0]) -> Callable:
    """``ridge_terms`` of a C-class margin task: f₀ = −log(C − 1), the margin at uniform
    probabilities (C read from the logits' shape, no model pass), and h = q(1 − q)."""

    def ridge_terms(params, batch, state, q):
        del state
        num_classes = jax.eval_shape(apply_fn, params, inputs_of(batch)).shape[-1]
        offset = -jnp.log(jnp.float32(max(num_classes - 1, 1)))
        return jnp.full(q.shape, offset, jnp.float32), logistic_curvature(q)

    return ridge_terms


def logistic_from_outputs(outputs, batch, state):
    """``from_outputs`` of a log-odds output f = log p/(1 − p) with L = log(1 + e^{−f}):
    Q = σ(−f) = 1 − p and h = Q(1 − Q), with no model pass."""
    del batch, state
    q = jax.nn.sigmoid(-outputs.astype(jnp.float32))
    return q, logistic_curvature(q)


def classification_margin(logits: jax.Array, label) -> jax.Array:
    """logit[y] − logsumexp(logits without y) = log p/(1 − p), for one (C,) logit vector."""
    others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
    return logits[label] - jax.nn.logsumexp(others)


def one_minus_p(logits, labels, temperature: float = 1.0) -> jax.Array:
    """Q = 1 − p_y for (B, C) logits and (B,) labels, p = softmax(logits / temperature): (B,)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return 1.0 - jnp.take_along_axis(probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]


def image_classification(
    apply_fn: Callable[[Any, jax.Array], jax.Array], temperature: float = 1.0
) -> Task:
    """Multiclass classification, as in the TRAK paper and the reference library.

    Examples are ``(image, label)``; ``apply_fn(params, images) -> (B, C) logits`` on a batch.

    * output: the margin f = logit_y − log Σ_{j≠y} exp(logit_j) = log p/(1 − p).
    * out_to_loss: Q = 1 − p_y with p = softmax(logits / temperature). For temperature 1 this is
      exactly −∂L/∂f of the cross-entropy L = log(1 + e^{−f}). As in the reference, the
      temperature enters Q only.
    """
    if not temperature > 0:
        raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")

    def output(params, example, state):
        del state
        image, label = example
        logits = apply_fn(params, image[None])[0]
        return classification_margin(logits.astype(jnp.float32), label)

    def out_to_loss(params, batch, state):
        del state
        return one_minus_p(apply_fn(params, batch[0]), batch[1], temperature)

    def validate(params, batch):
        _check_pair("image_classification", batch, "images", "labels")
        _label_range_check("image_classification", apply_fn, params, batch[0], batch[1])

    return Task(output, out_to_loss, validate=validate, name="image_classification",
                ridge_terms=margin_ridge_terms(apply_fn),
                from_outputs=logistic_from_outputs if temperature == 1.0 else None)


def _check_logits_rank(name: str, logits, expected: str, ok: bool, inputs) -> None:
    """Trace-time check of the logits ``apply_fn`` returned for one example (batch axis of 1)."""
    if not ok:
        raise InvalidArgumentError(
            f"{name}: apply_fn(params, inputs) must return {expected} for inputs with a batch "
            f"axis of 1; got shape {tuple(logits.shape)} for inputs of shape "
            f"{describe_shapes(inputs)}"
        )


def text_classification(
    apply_fn: Callable[[Any, Any], jax.Array], temperature: float = 1.0
) -> Task:
    """Sequence classification (BERT-style), the reference's ``TextClassificationModelOutput``.

    Examples are ``(inputs, label)``: ``inputs`` is a pytree of token arrays, typically
    ``{"input_ids": (L,), "attention_mask": (L,), "token_type_ids": (L,)}``, and
    ``apply_fn(params, inputs) -> (B, C)`` logits on a batch whose leaves are (B, L). (The
    reference's batches ``(input_ids, token_type_ids, attention_mask, labels)`` become
    ``({"input_ids": …, "token_type_ids": …, "attention_mask": …}, labels)``.)

    Per-example gradients ``vmap`` the output over the batch. The output hands ``apply_fn`` its
    one example with a batch axis of 1 (leaves (1, L)), so models that read the batch dimension
    (``b, l = ids.shape``) work unchanged; the reference's users hit exactly this with Hugging
    Face models under ``torch.func.vmap``.

    * output: the margin f = logit_y − log Σ_{j≠y} exp(logit_j) = log p/(1 − p).
    * out_to_loss: Q = 1 − p_y, p = softmax(logits / temperature); for temperature 1 this is
      −∂L/∂f of the cross-entropy L = log(1 + e^{−f}). As in the reference and
      :func:`image_classification`, the temperature enters Q only.
    """
    if not temperature > 0:
        raise InvalidArgumentError(f"text_classification: temperature must be > 0, got {temperature}")
    name = "text_classification"

    def output(params, example, state):
        del state
        inputs, label = example
        logits = apply_fn(params, add_batch_axis(inputs))
        _check_logits_rank(name, logits, "(1, num_classes) logits",
                           logits.ndim == 2 and logits.shape[0] == 1, inputs)
        return classification_margin(logits[0].astype(jnp.float32), label)

    def out_to_loss(params, batch, state):
        del state
        return one_minus_p(apply_fn(params, batch[0]), batch[1], temperature)

    def validate(params, batch):
        _check_pair(name, batch, "inputs", "labels")
        _label_range_check(name, apply_fn, params, batch[0], batch[1], what="inputs")

    return Task(output, out_to_loss, validate=validate, name=name, ridge_terms=margin_ridge_terms(apply_fn),
                from_outputs=logistic_from_outputs if temperature == 1.0 else None)


# --------------------------------------------------------------------------- binary classification


def _binary_labels(name: str, labels, batch: int) -> None:
    labels = np.asarray(labels)
    if labels.shape not in ((batch,), (batch, 1)):
        raise InvalidArgumentError(
            f"{name}: labels must have shape ({batch},) or ({batch}, 1), got {labels.shape}"
        )
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        raise InvalidArgumentError(
            f"{name}: labels must be 0 or 1 for one logit per example; got "
            f"{labels[bad][:5].tolist()} at batch positions {np.flatnonzero(bad)[:5].tolist()} "
            "(for C > 2 classes use image_classification or text_classification)"
        )


def _scalar_per_example(name: str, fn_desc: str, shape, batch: int, inputs, what: str) -> None:
    if tuple(shape) not in ((batch,), (batch, 1)):
        raise InvalidArgumentError(
            f"{name}: {fn_desc} must return one scalar per example, shape ({batch},) or "
            f"({batch}, 1); got {tuple(shape)} for {what} of shape {describe_shapes(inputs)}"
        )


def binary_classification(apply_fn: Callable[[Any, Any], jax.Array]) -> Task:
    """Binary classification with one logit per example (logistic regression's link).

    Examples are ``(x, label)`` with label in {0, 1}; ``apply_fn(params, x) -> (B,)`` or
    ``(B, 1)`` logits z, with p(label = 1) = σ(z).

    * output: the label-signed logit f = (2y − 1)·z = log p/(1 − p), p = σ(f) the probability of
      the true class (the two-class case of the multiclass margin).
    * out_to_loss: the binary cross-entropy is L = log(1 + e^{−f}), so
      Q = −∂L/∂f = σ(−f) = 1 − p.
    """
    name = "binary_classification"

    def signed_logits(params, x, labels):
        logits = apply_fn(params, x).astype(jnp.float32)
        batch = labels.shape[0]
        if logits.shape not in ((batch,), (batch, 1)):
            raise InvalidArgumentError(
                f"{name}: apply_fn(params, x) must return one logit per example, shape "
                f"({batch},) or ({batch}, 1); got {tuple(logits.shape)} for x of shape "
                f"{describe_shapes(x)}"
            )
        sign = 2.0 * labels.reshape(batch).astype(jnp.float32) - 1.0
        return sign * logits.reshape(batch)

    def output(params, example, state):
        del state
        x, label = example
        return signed_logits(params, add_batch_axis(x), jnp.reshape(label, (1,)))[0]

    def out_to_loss(params, batch, state):
        del state
        x, labels = batch
        return jax.nn.sigmoid(-signed_logits(params, x, labels))

    def validate(params, batch):
        _check_pair(name, batch, "x", "labels")
        x, labels = batch
        size = np.shape(labels)[0] if np.ndim(labels) else None
        logits = output_shape(apply_fn, params, x)
        _scalar_per_example(name, "apply_fn(params, x)", logits.shape, size, x, "x")
        _binary_labels(name, labels, size)

    def ridge_terms(params, batch, state, q):  # the signed logit of an untrained model: 0
        del params, batch, state
        return jnp.zeros(q.shape, jnp.float32), logistic_curvature(q)

    return Task(output, out_to_loss, validate=validate, name=name, ridge_terms=ridge_terms,
                from_outputs=logistic_from_outputs)


# --------------------------------------------------------------------------- CLIP


class ClipBank(NamedTuple):
    """One checkpoint's embeddings of the training set: ``image`` and ``text``, (N_bank, D) float32."""

    image: jax.Array
    text: jax.Array


def sample_negatives(key, n_negatives: int, bank_size: int) -> jax.Array:
    """(n,) int32 bank rows drawn uniformly with replacement: each row has probability 1/bank_size."""
    return jax.random.randint(key, (n_negatives,), 0, bank_size, dtype=jnp.int32)


def clip_margins(u, v, bank: ClipBank, key, temperature: float, n_negatives: int):
    """The two contrastive margins (m₁, m₂) of one pair of embeddings u, v (D,) against n
    negatives drawn with :func:`sample_negatives` from ``bank`` with ``key``; see :func:`clip`."""
    idx = sample_negatives(key, n_negatives, bank.image.shape[0])
    hi = jax.lax.Precision.HIGHEST
    positive = jnp.dot(u, v, precision=hi) / temperature
    to_texts = jnp.matmul(bank.text[idx], u, precision=hi) / temperature
    to_images = jnp.matmul(bank.image[idx], v, precision=hi) / temperature
    return (positive - jax.nn.logsumexp(to_texts), positive - jax.nn.logsumexp(to_images))


def clip(
    image_fn: Callable[[Any, Any], jax.Array],
    text_fn: Callable[[Any, Any], jax.Array],
    temperature: float,
    n_negatives: int = 300,
    *,
    bank_size: int | None = None,
    bank_seed: int = 0,
    bank_batch_size: int = 256,
) -> Task:
    """CLIP's contrastive task, with negatives sampled from a per-checkpoint embedding bank.

    Examples are ``(image, text)`` pairs; ``image_fn(params, images) -> (B, D)`` and
    ``text_fn(params, texts) -> (B, D)`` embed a batch (normalized if the model normalizes: the
    task uses them as given). Logits are s(a, b) = ⟨a, b⟩ / temperature; CLIP's learned
    ``logit_scale.exp()`` is 1 / temperature (the reference library's ``temperature`` argument
    multiplies, so it is this function's 1 / temperature).

    For one example with embeddings (u, v) and n negatives (u_j, v_j) drawn from the bank:

    * output (Park et al., 2023, §5.1): f = m₁ + m₂, with the margins
      m₁ = s(u, v) − log Σ_j exp s(u, v_j)   (image to texts) and
      m₂ = s(u, v) − log Σ_j exp s(u_j, v)   (text to images).
    * out_to_loss: CLIP's loss over the positive and the n negatives is
      L = log(1 + e^{−m₁}) + log(1 + e^{−m₂}), with −∂L/∂m_i = 1 − p_i, p_i = σ(m_i) the
      softmax probability of the positive. Raising the positive logit s(u, v) by δ moves both
      margins by δ and f by 2δ, so along that direction Q = −dL/df = 1 − (p₁ + p₂)/2.

    Output and Q use the same temperature and the same negatives (drawn with the example's key,
    which featurization derives from the example's index), and Q reads no other example of the
    batch, so it is the same at any batch size, 1 included. This fixes three faults of the
    reference's ``CLIPModelOutput``: negatives drawn with weights proportional to their index
    (index 0 never), the temperature in Q only, and one global bank shared by all checkpoints
    with Q taken from the batch's own similarity matrix (zero at batch size 1).

    The bank: ``init(params, train)`` embeds the training set at the checkpoint's own parameters
    (one :class:`ClipBank` per checkpoint, held in ``TaskState.aux``). Each negative is a bank row
    drawn uniformly with replacement, every row (index 0 included) with probability 1/N_bank. A
    draw may hit the example itself (probability n/N_bank), as in a batch drawn with replacement.

    Args:
      image_fn, text_fn: batched embedding functions, ``(params, batch) -> (B, D)``.
      temperature: τ > 0.
      n_negatives: n ≥ 1 (the reference's simulated batch size).
      bank_size: keep a uniform random subset of this many training examples in the bank
        (chosen with ``numpy.random.default_rng(bank_seed)``); ``None`` keeps all of them.
      bank_seed: seed of that subset.
      bank_batch_size: examples per embedding step in ``init``.
    """
    name = "clip"
    _check_clip_settings(temperature, n_negatives, bank_size, bank_batch_size)
    temperature, n_negatives = float(temperature), int(n_negatives)
    embed = jax.jit(lambda params, images, texts: (image_fn(params, images), text_fn(params, texts)))

    def init(params, data):
        return _clip_bank(image_fn, text_fn, embed, params, data, bank_size, bank_seed, bank_batch_size)

    def output_with_aux(params, example, state):
        image, text = example
        image_emb, text_emb = _clip_embeddings(image_fn, text_fn, params, add_batch_axis(image),
                                               add_batch_axis(text), state, batch=1)
        m1, m2 = clip_margins(image_emb[0], text_emb[0], state.aux, state.key, temperature, n_negatives)
        q = _clip_q(m1, m2)  # out_to_loss's Q from this pass's margins
        return m1 + m2, (q, logistic_curvature(q) / 2.0)

    def output(params, example, state):
        return output_with_aux(params, example, state)[0]

    def out_to_loss(params, batch, state):
        image_emb, text_emb = _clip_embeddings(image_fn, text_fn, params, *batch, state)

        def one(u, v, key):
            return _clip_q(*clip_margins(u, v, state.aux, key, temperature, n_negatives))

        return jax.vmap(one)(image_emb, text_emb, state.key)

    def validate(params, batch):
        _check_pair(name, batch, "images", "texts")
        _clip_check_shapes(batch[0], batch[1], output_shape(image_fn, params, batch[0]).shape,
                           output_shape(text_fn, params, batch[1]).shape, _batch_size(batch))

    def ridge_terms(params, batch, state, q):
        # f₀: both margins at uniform scores, −log n each; h: moving f by δ moves each margin by
        # δ/2, so d²L/df² = (p₁(1 − p₁) + p₂(1 − p₂))/4 ≈ q(1 − q)/2.
        del params, batch, state
        offset = jnp.float32(-2.0 * np.log(n_negatives))
        return jnp.full(q.shape, offset, jnp.float32), logistic_curvature(q) / 2.0

    return Task(output, out_to_loss, init=init, uses_key=True, validate=validate, name=name,
                ridge_terms=ridge_terms, from_outputs=q_and_h_from_aux, output_with_aux=output_with_aux)


def _clip_q(m1, m2):
    """CLIP's Q = 1 − (σ(m₁) + σ(m₂))/2 from its two margins."""
    return 1.0 - 0.5 * (jax.nn.sigmoid(m1) + jax.nn.sigmoid(m2))


def _check_clip_settings(temperature, n_negatives, bank_size, bank_batch_size) -> None:
    """Raise naming the bad :func:`clip` setting and what would be valid."""
    if not (isinstance(temperature, int | float | np.floating) and temperature > 0):
        raise InvalidArgumentError(f"clip: temperature must be a float > 0, got {temperature!r}")
    for arg, value in (("n_negatives", n_negatives), ("bank_batch_size", bank_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InvalidArgumentError(f"clip: {arg} must be an int >= 1, got {value!r}")
    if bank_size is not None and (
        isinstance(bank_size, bool) or not isinstance(bank_size, int | np.integer) or bank_size < 1
    ):
        raise InvalidArgumentError(f"clip: bank_size must be None or an int >= 1, got {bank_size!r}")


def _batch_size(batch) -> int:
    return data_lib.num_examples(batch, "batch")


def _clip_check_shapes(images, texts, image_emb, text_emb, batch: int) -> None:
    """Both embeddings are (B, D) with one D (shapes only; works at trace time)."""
    if (len(image_emb) != 2 or len(text_emb) != 2 or image_emb[0] != batch
            or text_emb[0] != batch or image_emb[1] != text_emb[1]):
        raise InvalidArgumentError(
            f"clip: image_fn(params, images) and text_fn(params, texts) must both return "
            f"(B, D) embeddings with one D; got {tuple(image_emb)} and {tuple(text_emb)} for "
            f"images {describe_shapes(images)} and texts {describe_shapes(texts)} (B = {batch})"
        )


def _clip_embeddings(image_fn, text_fn, params, images, texts, state: TaskState, batch=None):
    """Checked float32 embeddings of a batch, and a check of the task state (bank and key)."""
    if not isinstance(state.aux, ClipBank):
        raise InvalidArgumentError(
            f"clip: the task state holds no embedding bank (aux={type(state.aux).__name__}); "
            "run task.init(params, train) for each checkpoint (prepare_checkpoint and attribute do)"
        )
    if state.key is None:
        raise InvalidArgumentError("clip: negatives are sampled, so the task state needs a key")
    image_emb = image_fn(params, images).astype(jnp.float32)
    text_emb = text_fn(params, texts).astype(jnp.float32)
    if batch is not None:
        _clip_check_shapes(images, texts, image_emb.shape, text_emb.shape, batch)
    if image_emb.shape[-1] != state.aux.image.shape[-1]:
        raise InvalidArgumentError(
            f"clip: embeddings have D = {image_emb.shape[-1]} but the checkpoint's bank "
            f"holds D = {state.aux.image.shape[-1]} ({tuple(state.aux.image.shape)})"
        )
    return image_emb, text_emb


def _clip_bank(image_fn, text_fn, embed, params, data, bank_size, bank_seed, bank_batch_size) -> ClipBank:
    """Embed the training set at ``params`` in padded batches (few compiled shapes); keep a
    seeded random subset of ``bank_size`` rows if asked."""
    image_parts, text_parts = [], []
    for start, batch in data_lib.iterate_batches(data, bank_batch_size, "train"):
        _check_pair("clip", batch, "images", "texts")
        n = data_lib.num_examples(batch, "a batch of train")
        if start == 0:
            _clip_check_shapes(batch[0], batch[1], output_shape(image_fn, params, batch[0]).shape,
                               output_shape(text_fn, params, batch[1]).shape, n)
        size = 1
        while size < n:
            size *= 2
        padded = data_lib.pad_batch(batch, min(max(size, n), max(bank_batch_size, n)))
        image_emb, text_emb = embed(params, *padded)
        image_parts.append(np.asarray(image_emb, np.float32)[:n])
        text_parts.append(np.asarray(text_emb, np.float32)[:n])
    images, texts = np.concatenate(image_parts), np.concatenate(text_parts)
    if bank_size is not None and bank_size < images.shape[0]:
        keep = np.sort(np.random.default_rng(bank_seed).choice(images.shape[0], bank_size, replace=False))
        images, texts = images[keep], texts[keep]
    return ClipBank(jnp.asarray(images), jnp.asarray(texts))


# --------------------------------------------------------------------------- language modeling


def language_modeling(
    apply_fn: Callable[[Any, Any], jax.Array],
    *,
    ids_key: str = "input_ids",
    mask_key: str = "attention_mask",
) -> Task:
    """Causal language modeling: the log-odds of every next token of a sequence, summed.

    Examples are sequences: an (L,) integer array of token ids, or a dict with ``ids_key`` (L,)
    and optionally ``mask_key`` (L,) (1 for tokens, 0 for padding) and whatever else
    ``apply_fn`` reads. ``apply_fn(params, inputs) -> (B, L, V)`` next-token logits on a batch,
    ``logits[:, t]`` predicting token t + 1.

    * output: the summed per-token margin f = Σ_t w_t m_t, where y_t = ids[t + 1],
      m_t = logit_{t, y_t} − log Σ_{j≠y_t} exp logit_{t, j} = log p_t/(1 − p_t), and
      w_t = mask[t]·mask[t + 1]: a prediction counts when it reads a token and its target is a
      token, so padding is masked on either side.
    * out_to_loss: the training loss is the summed token cross-entropy
      L = Σ_t w_t log(1 + e^{−m_t}), a function of the T = Σ_t w_t counted margins, not of f
      alone, with −∂L/∂m_t = 1 − p_t. Moving f by δ along the direction that moves each counted
      margin by δ/T (raising each target token's logit by δ/T does exactly that) changes L at
      the rate −(1/T) Σ_t w_t (1 − p_t), so Q = −dL/df = (1/T) Σ_t w_t (1 − p_t), the mean over
      counted tokens of 1 − p_t. It is also the scalar Q that best fits
      Σ_t w_t (1 − p_t) ∇m_t ≈ Q·∇f when the ∇m_t are orthogonal with equal norms. A sequence
      with no counted token has f = 0 and Q = 0. For a loss averaged over each sequence's own
      tokens instead of summed, divide Q by T.
    """
    name = "language_modeling"

    def output_with_aux(params, example, state):
        del state
        margins, weights = _token_margins(apply_fn, params, add_batch_axis(example), ids_key, mask_key)
        # Q and h of the docstring from this pass's margins: no second forward pass.
        q = _mean_counted(jax.nn.sigmoid(-margins[0]), weights[0])
        counted = jnp.maximum(jnp.sum(weights[0]), 1.0)
        return _counted_sum(margins[0], weights[0]), (q, logistic_curvature(q) / counted)

    def output(params, example, state):
        return output_with_aux(params, example, state)[0]

    def out_to_loss(params, batch, state):
        del state
        margins, weights = _token_margins(apply_fn, params, batch, ids_key, mask_key)
        return jax.vmap(_mean_counted)(jax.nn.sigmoid(-margins), weights)

    def validate(params, batch):
        _check_token_batch(apply_fn, params, batch, ids_key, mask_key)

    def ridge_terms(params, batch, state, q):
        del state
        vocab = jax.eval_shape(apply_fn, params, batch).shape[-1]
        _, mask = _ids_and_mask(batch, ids_key, mask_key)
        counted = jnp.sum(mask[:, 1:] * mask[:, :-1], axis=1)
        # f₀: each counted margin at uniform probabilities, −log(V − 1); h = d²L/df² along the
        # direction that moves every counted margin by δ/T: mean_t p_t(1 − p_t)/T ≈ q(1 − q)/T.
        offset = -counted * jnp.log(jnp.float32(max(vocab - 1, 1)))
        return offset.astype(jnp.float32), logistic_curvature(q) / jnp.maximum(counted, 1.0)

    return Task(output, out_to_loss, validate=validate, name=name, ridge_terms=ridge_terms,
                from_outputs=q_and_h_from_aux, output_with_aux=output_with_aux)


def _mean_counted(values, weights):
    """Σ_t w_t v_t / max(Σ_t w_t, 1): the mean over counted tokens (0 when none is counted)."""
    return _counted_sum(values, weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _ids_and_mask(inputs, ids_key: str, mask_key: str):
    """(ids, float32 mask) of a sequence batch: an array of ids, or a dict with ``ids_key`` and
    optionally ``mask_key`` (all ones without it)."""
    if isinstance(inputs, Mapping):
        if ids_key not in inputs:
            raise InvalidArgumentError(
                f"language_modeling: inputs have no {ids_key!r} entry (ids_key); keys are {sorted(inputs)}"
            )
        ids, mask = inputs[ids_key], inputs.get(mask_key)
    else:
        ids, mask = inputs, None
    if mask is None:
        mask = jnp.ones(jnp.shape(ids), jnp.float32)
    return ids, jnp.asarray(mask).astype(jnp.float32)


def _token_margins(apply_fn, params, inputs, ids_key: str, mask_key: str):
    """(B, L) next-token margins m_t and weights w_t = mask[t]·mask[t + 1] of a batch.

    The last position predicts no token: its weight is 0 and its margin is taken against a
    placeholder target (the sequence's first token), so the (B, L, V) logits are used whole,
    never sliced and padded back in the backward pass (two passes over the largest array of an
    LM step). Sums over positions must select, not multiply, by w_t (:func:`_counted_sum`): a
    placeholder or padded position's margin may be infinite."""
    ids, mask = _ids_and_mask(inputs, ids_key, mask_key)
    logits = apply_fn(params, inputs)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise InvalidArgumentError(
            f"language_modeling: apply_fn(params, inputs) must return (B, L, V) logits for token "
            f"ids of shape (B, L) = {tuple(ids.shape)}; got {tuple(logits.shape)} for inputs of "
            f"shape {describe_shapes(inputs)}"
        )
    logits = logits.astype(jnp.float32)
    targets = jnp.roll(ids, -1, axis=1).astype(jnp.int32)
    correct = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    others = _logsumexp_of_others(logits, is_target)
    weights = jnp.concatenate([mask[:, 1:] * mask[:, :-1], jnp.zeros_like(mask[:, :1])], axis=1)
    return correct - others, weights


def _logsumexp_of_others(logits, is_target):
    """log Σ_{j: not is_target} e^{logit_j} over the last axis: (...,) float32.

    As ``jax.nn.logsumexp`` of the masked logits, with the shift (the largest logit counted)
    found by a comparison-and-select reduction instead of ``max``: XLA's CPU backend vectorizes
    it, while its NaN-propagating ``max`` read the (B, L, V) logits of the 4-layer GPT-2 step 3×
    slower (53 against 18 ms). The shift only keeps the exponentials in range and gets no
    gradient; a NaN logit still makes the sum, and so the result, NaN."""
    masked = jnp.where(is_target, -jnp.inf, logits)
    top = jax.lax.reduce(jax.lax.stop_gradient(masked), np.float32(-np.inf),
                         lambda a, b: jnp.where(a > b, a, b), (masked.ndim - 1,))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.log(jnp.sum(jnp.exp(masked - top[..., None]), axis=-1)) + top


def _counted_sum(values, weights):
    """Σ_t w_t v_t over counted positions (w_t > 0) only: an uncounted v_t never enters, even
    when it is infinite."""
    return jnp.sum(jnp.where(weights > 0, weights * values, 0.0))


def _check_token_batch(apply_fn, params, batch, ids_key: str, mask_key: str) -> None:
    """Host-side check of a token batch: (B, L) integer ids, a mask of their shape, (B, L, V)
    logits, ids in [0, V)."""
    name = "language_modeling"
    ids, mask = (batch.get(ids_key), batch.get(mask_key)) if isinstance(batch, Mapping) else (batch, None)
    if ids is None:
        raise InvalidArgumentError(f"{name}: inputs have no {ids_key!r} entry (ids_key); keys are {sorted(batch)}")
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(
            f"{name}: token ids must be a (B, L) integer array, got shape {ids.shape} dtype {ids.dtype}"
        )
    if mask is not None and np.shape(mask) != ids.shape:
        raise InvalidArgumentError(
            f"{name}: {mask_key!r} must have the token ids' shape {ids.shape}, got {np.shape(mask)}"
        )
    logits = output_shape(apply_fn, params, batch)
    if len(logits.shape) != 3 or tuple(logits.shape[:2]) != ids.shape:
        raise InvalidArgumentError(
            f"{name}: apply_fn(params, inputs) must return (B, L, V) logits for token ids "
            f"of shape {ids.shape}; got {tuple(logits.shape)}"
        )
    bad = (ids < 0) | (ids >= logits.shape[2])
    if bad.any():
        raise InvalidArgumentError(
            f"{name}: token ids must be in [0, {logits.shape[2]}) for logits of shape "
            f"{tuple(logits.shape)}; got {ids[bad][:5].tolist()} at (example, position) "
            f"{np.argwhere(bad)[:5].tolist()}"
        )


# --------------------------------------------------------------------------- regression


def regression(apply_fn: Callable[[Any, Any], jax.Array]) -> Task:
    """Squared-error regression with one prediction per example.

    Examples are ``(x, y)`` with a scalar target y (shape () or (1,)); ``apply_fn(params, x) ->
    (B,)`` or ``(B, 1)`` predictions ŷ.

    Derivation. The training loss is L = ½(ŷ − y)². TRAK wants an output f of which the loss
    is a convex function, so that, linearized in θ, training is a generalized linear model in
    the features ∇_θ f (Park et al., 2023, §3). The prediction is such an output, least
    squares' identity link:

    * output: f = ŷ.
    * out_to_loss: Q = −∂L/∂f = y − ŷ, the residual.

    The curvature ∂²L/∂f² = 1 is the same for every example, so TRAK's unweighted ΦᵀΦ is the
    exact Gauss–Newton matrix here (for classification it drops the weights p(1 − p)). One
    Newton step on the linearized model, Δθ = (ΦᵀΦ)⁻¹ Σ_i φ_i Q_i, says that training on
    example i moves a target's output ŷ_t by φ_tᵀ(ΦᵀΦ + λI)⁻¹φ_i Q_i = S[i, t], the
    leave-one-out change without the leverage factor 1/(1 − h_i). A score is thus the change of
    the target's *prediction* (positive: training on i pulls ŷ_t up); to read it as "helped fit
    the target", multiply by sign(y_t − ŷ_t). With L = (ŷ − y)² (no ½) every Q doubles, which
    scales all scores by 2.
    """
    name = "regression"

    def predictions(params, x, batch):
        pred = apply_fn(params, x)
        if pred.shape not in ((batch,), (batch, 1)):
            raise InvalidArgumentError(
                f"{name}: apply_fn(params, x) must return one prediction per example, shape "
                f"({batch},) or ({batch}, 1); got {tuple(pred.shape)} for x of shape "
                f"{describe_shapes(x)}"
            )
        return pred.reshape(batch).astype(jnp.float32)

    def output(params, example, state):
        del state
        x, _ = example
        return predictions(params, add_batch_axis(x), 1)[0]

    def out_to_loss(params, batch, state):
        del state
        x, y = batch
        size = jnp.shape(y)[0]
        return jnp.reshape(y, (size,)).astype(jnp.float32) - predictions(params, x, size)

    def validate(params, batch):
        _check_pair(name, batch, "x", "y")
        x, y = batch
        size = np.shape(y)[0] if np.ndim(y) else None
        if np.shape(y) not in ((size,), (size, 1)):
            raise InvalidArgumentError(f"{name}: targets y must have shape (B,) or (B, 1), got {np.shape(y)}")
        pred = output_shape(apply_fn, params, x)
        _scalar_per_example(name, "apply_fn(params, x)", pred.shape, size, x, "x")

    def ridge_terms(params, batch, state, q):  # squared error: h = 1; an untrained model predicts about 0
        del params, batch, state
        return jnp.zeros(q.shape, jnp.float32), jnp.ones(q.shape, jnp.float32)

    def from_outputs(outputs, batch, state):  # the residual y − ŷ, with f = ŷ from the features' pass
        del state
        y = batch[1]
        size = outputs.shape[0]
        q = jnp.reshape(y, (size,)).astype(jnp.float32) - outputs.astype(jnp.float32)
        return q, jnp.ones(q.shape, jnp.float32)

    return Task(output, out_to_loss, validate=validate, name=name, ridge_terms=ridge_terms,
                from_outputs=from_outputs)


def from_loss(
    output: Callable[..., jax.Array],
    loss: Callable[..., jax.Array],
    *,
    init: Callable[..., Any] | None = None,
    uses_key: bool = False,
    validate: Callable[..., None] | None = None,
    name: str = "from_loss",
    output_offset: float | None = None,
    curvature: bool = True,
) -> Task:
    """A task whose Q is derived by autodiff: Q = −∂L/∂f, with L written as a function of f.

    This is the fallback of the reference's documentation for tasks with no analytic Q.

    Args:
      output: ``(params, example, state) -> ()``, the model output f of one example.
      loss: ``(f, example, state) -> ()``, the training loss of one example as a function of
        the output scalar f (e.g. ``lambda f, ex, s: jnp.log1p(jnp.exp(-f))`` for
        classification with the margin output).
      init, uses_key, validate, name: as in :class:`Task`.
      output_offset: f₀, the output an untrained model gives (e.g. −log(C − 1) for a C-class
        margin), for ``lambda_reg="auto"``'s implied-ridge rule; without it ``"auto"`` uses
        0.3·trace(ΦᵀΦ)/N (the task's ``ridge_terms`` then give f₀ = NaN, "unknown").
      curvature: give the curvature h = ∂²L/∂f² by autodiff (which evaluates the output once
        more per training example), for the Gauss–Newton kernel and the implied-ridge rule;
        ``False`` (with no ``output_offset``): no ``ridge_terms``, TRAK's kernel.
    """

    def per_example(params, batch, state, fn):
        def one(example, key):
            example_state = TaskState(state.aux, key)
            return fn(output(params, example, example_state), example, example_state)

        if state.key is None:
            return jax.vmap(lambda ex: one(ex, None))(batch)
        return jax.vmap(one)(batch, state.key)

    def out_to_loss(params, batch, state):
        return per_example(params, batch, state, lambda f, ex, st: -jax.grad(loss)(f, ex, st))

    if not isinstance(curvature, bool):
        raise ArgumentTypeError(f"curvature must be a bool, got {curvature!r}")
    if not curvature and output_offset is not None:
        raise InvalidArgumentError(
            f"output_offset={output_offset!r} with curvature=False: the implied-ridge rule that reads "
            "f₀ also needs the curvature h; pass curvature=True or drop output_offset"
        )
    ridge_terms = None
    if curvature:
        offset = jnp.float32(float("nan") if output_offset is None else float(output_offset))

        def ridge_terms(params, batch, state, q):
            second = per_example(params, batch, state, jax.grad(jax.grad(loss)))
            return jnp.full(q.shape, offset, jnp.float32), second.astype(jnp.float32)

    def from_outputs(outputs, batch, state):  # Q = −L′(f), h = L″(f) at the features' f: no model call
        def one(f, example, key):
            example_state = TaskState(state.aux, key)
            return -jax.grad(loss)(f, example, example_state), jax.grad(jax.grad(loss))(f, example, example_state)

        keys = state.key
        q, h = jax.vmap(one, in_axes=(0, 0, None if keys is None else 0))(outputs, batch, keys)
        return q.astype(jnp.float32), h.astype(jnp.float32)

    return Task(output, out_to_loss, init=init, uses_key=uses_key, validate=validate, name=name,
                ridge_terms=ridge_terms, from_outputs=from_outputs)
