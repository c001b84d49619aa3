"""Evaluating attributions against retraining: subsets, retrained margins, LDS and brittleness.

The linear datamodeling score (LDS, Park et al., 2023, §2.2): draw S random subsets of the
training set (masks M, (S, N), half the examples each), retrain a model on each, and record the
target outputs m_s(z_j) (S, T). An attribution S (N, T) predicts the output of the model trained on
subset s as Σ_{i∈s} S[i, j], i.e. ``masks @ scores``; the LDS of target j is the Spearman rank
correlation, over subsets, between predicted and actual outputs. The LDS is its mean over targets.

* :func:`subset_masks`: the random subsets, deterministic by seed.
* :func:`retrain_margins`: trains one model per subset with optax, ``jax.vmap``-ed over subsets.
  The subset enters as per-example loss weights (mask / subset size), so every subset shares one
  shape and one compiled program; a small model's hundreds of retrains take seconds on a CPU.
* :func:`lds`: the score, per target, with a bootstrap confidence interval over targets.
* :func:`brittleness`: the counterfactual check: remove each target's k top-scored training
  examples, retrain, and count how often the target's prediction flips, against removing k
  random examples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trakjax import data as data_lib
from trakjax.errors import InvalidArgumentError
from trakjax.tasks import classification_margin

# --------------------------------------------------------------------------- subsets


def subset_masks(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random training subsets of equal size: (n_subsets, n_train) bool.

    Each row holds exactly ``round(fraction · n_train)`` True entries, drawn without replacement,
    rows independent. Deterministic in ``seed`` (numpy's PCG64): the same arguments give the same
    masks on every machine.
    """
    for name, value in (("n_train", n_train), ("n_subsets", n_subsets)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(fraction, int | float | np.floating) and 0.0 < fraction < 1.0):
        raise InvalidArgumentError(f"fraction must be a float in (0, 1), got {fraction!r}")
    size = int(round(fraction * n_train))
    if not 1 <= size < n_train:
        raise InvalidArgumentError(
            f"fraction={fraction} of n_train={n_train} gives subsets of {size} examples; "
            f"need between 1 and {n_train - 1}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    masks = np.zeros((n_subsets, n_train), bool)
    for s in range(n_subsets):
        masks[s, rng.permutation(n_train)[:size]] = True
    return masks


# --------------------------------------------------------------------------- retraining


@functools.lru_cache(maxsize=32)
def softmax_cross_entropy(apply_fn: Callable) -> Callable:
    """Per-example loss ``(params, (inputs, labels)) -> (B,)``: cross-entropy of ``apply_fn``'s logits."""

    def loss(params, batch):
        inputs, labels = batch
        logits = apply_fn(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    return loss


@functools.lru_cache(maxsize=32)
def classification_margins(apply_fn: Callable) -> Callable:
    """Target outputs ``(params, (inputs, labels)) -> (T,)``: the margin logit_y − logsumexp(others)."""

    def margins(params, targets):
        inputs, labels = targets
        logits = apply_fn(params, inputs).astype(jnp.float32)
        return jax.vmap(classification_margin)(logits, labels)

    return margins


def _check_masks(masks, n_train: int, name: str = "masks") -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != n_train:
        raise InvalidArgumentError(f"{name} must be (n_subsets, n_train={n_train}), got shape {masks.shape}")
    weights = masks.astype(np.float32)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise InvalidArgumentError(f"{name} must hold booleans or non-negative finite weights")
    empty = np.flatnonzero(weights.sum(axis=1) <= 0)
    if empty.size:
        raise InvalidArgumentError(f"{name} rows {empty[:10].tolist()} select no training example")
    return weights


def retrain_margins(
    init_fn: Callable[[jax.Array], Any],
    apply_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    steps: int,
    data: Any,
    targets: Any,
    masks,
    seed: int = 0,
    *,
    per_example_loss: Callable[[Any, Any], jax.Array] | None = None,
    target_output: Callable[[Any, Any], jax.Array] | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    same_init: bool = False,
) -> np.ndarray:
    """Train one model per subset and return the target outputs: (n_subsets, n_targets) float32.

    For subset s with weights w_s = masks[s] (bool or non-negative), the model starts from
    ``init_fn(key_s)`` and takes ``steps`` optimizer steps on

        L_s(θ) = Σ_i w_si ℓ_i(θ) / Σ_i w_si           (full batch, ``batch_size=None``), or
        L_s(θ) = mean of ℓ over ``batch_size`` examples drawn with probability w_s / Σ w_s.

    All subsets share one shape, so the training loop (a ``lax.scan``) is ``jax.vmap``-ed over
    subsets and jitted once; ``chunk_size`` subsets run at a time (the last chunk is padded).

    Args:
      init_fn: ``key -> params``, e.g. ``lambda key: model.init(key, x[:1])``.
      apply_fn: ``(params, inputs) -> outputs`` on a batch (logits for the default loss).
      optimizer: an optax ``GradientTransformation``.
      steps: optimizer steps per model.
      data: training data: a pytree of arrays with a leading axis N (``(inputs, labels)`` for
        the defaults).
      targets: target data, likewise with T examples.
      masks: (n_subsets, N) bool or non-negative weights, e.g. from :func:`subset_masks`.
      seed: model s is initialized (and, with ``batch_size``, sampled) with
        ``jax.random.fold_in(jax.random.key(seed), s)``, so results do not depend on
        ``chunk_size``.
      per_example_loss: ``(params, batch) -> (B,)``; default: softmax cross-entropy of
        ``apply_fn``'s logits against integer labels (:func:`softmax_cross_entropy`).
      target_output: ``(params, targets) -> (T,)``; default: the classification margin
        (:func:`classification_margins`), the TRAK paper's model output.
      batch_size: ``None`` for full-batch training, else minibatch size.
      chunk_size: subsets trained at once (default: all).
      same_init: start every model from the same key (``seed``'s, subset 0), so that subsets
        differ only in their data (used by :func:`brittleness`).

    Returns:
      ``np.ndarray`` (n_subsets, T) float32: target outputs of each retrained model.
    """
    n = data_lib.num_examples(data, "data")
    data_lib.num_examples(targets, "targets")
    weights = _check_masks(masks, n)
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise InvalidArgumentError(f"steps must be an int >= 1, got {steps!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1
    ):
        raise InvalidArgumentError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    n_subsets = weights.shape[0]
    if chunk_size is None:
        chunk_size = n_subsets
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    chunk_size = int(min(chunk_size, n_subsets))
    loss_fn = per_example_loss if per_example_loss is not None else softmax_cross_entropy(apply_fn)
    output_fn = target_output if target_output is not None else classification_margins(apply_fn)
    train_chunk = _make_trainer(init_fn, loss_fn, output_fn, optimizer, int(steps), batch_size)
    base = jax.random.key(int(seed))
    data = jax.tree_util.tree_map(jnp.asarray, data)
    targets = jax.tree_util.tree_map(jnp.asarray, targets)
    out = []
    for start in range(0, n_subsets, chunk_size):
        stop = min(start + chunk_size, n_subsets)
        index = np.arange(start, start + chunk_size)
        index[stop - start :] = stop - 1  # pad the last chunk with repeats of its last subset
        if same_init:
            index_keys = np.zeros_like(index)
        else:
            index_keys = index
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(index_keys, jnp.uint32))
        chunk = train_chunk(keys, jnp.asarray(weights[index]), data, targets)
        out.append(np.asarray(chunk, np.float32)[: stop - start])
    return np.concatenate(out)


@functools.lru_cache(maxsize=32)
def _make_trainer(init_fn, loss_fn, output_fn, optimizer, steps, batch_size):
    """The jitted, subset-vmapped training program (cached, so repeated calls compile once)."""
    def train_one(key, weights, data, targets):
        init_key, sample_key = jax.random.split(key)
        params = init_fn(init_key)
        opt_state = optimizer.init(params)
        n = weights.shape[0]
        probs = weights / weights.sum()

        def objective(p, step_key):
            if batch_size is None:
                losses = loss_fn(p, data)
                return jnp.sum(losses * probs)
            idx = jax.random.choice(step_key, n, (batch_size,), replace=True, p=probs)
            batch = jax.tree_util.tree_map(lambda x: x[idx], data)
            return jnp.mean(loss_fn(p, batch))

        def step(carry, step_key):
            p, s = carry
            grads = jax.grad(objective)(p, step_key)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        step_keys = jax.random.split(sample_key, steps)
        (params, _), _ = jax.lax.scan(step, (params, opt_state), step_keys)
        return output_fn(params, targets)

    return jax.jit(jax.vmap(train_one, in_axes=(0, 0, None, None)))


# --------------------------------------------------------------------------- LDS


class LDSResult(NamedTuple):
    """The linear datamodeling score.

    Attributes:
      mean: mean over targets of the per-target Spearman correlation.
      per_target: (T,) float64 Spearman correlation of ``masks @ scores`` with the margins.
      ci_low, ci_high: bootstrap confidence interval of ``mean`` (targets resampled with
        replacement, percentile method).
      confidence: the interval's level, e.g. 0.95.
    """

    mean: float
    per_target: np.ndarray
    ci_low: float
    ci_high: float
    confidence: float


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along axis 0, ties given their average rank (as ``scipy.stats.rankdata``)."""
    values = np.asarray(values)
    n = values.shape[0]
    flat = values.reshape(n, -1)
    order = np.argsort(flat, axis=0, kind="stable")
    sorted_values = np.take_along_axis(flat, order, axis=0)
    ranks = np.empty(flat.shape, np.float64)
    columns = np.arange(flat.shape[1])
    ranks[order, columns] = np.arange(1, n + 1, dtype=np.float64)[:, None]
    tied = np.flatnonzero((sorted_values[1:] == sorted_values[:-1]).any(axis=0))
    for col in tied:
        column = sorted_values[:, col]
        starts = np.concatenate([[True], column[1:] != column[:-1]])
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        last = np.append(first[1:], n) - 1
        average = (first + last) / 2.0 + 1.0
        ranks[order[:, col], col] = average[group]
    return ranks.reshape(values.shape)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b``: (T,) float64.

    The Pearson correlation of average ranks (ties averaged). A column with constant values has
    no rank correlation: its entry is NaN.
    """
    ra = rank_average(np.asarray(a, np.float64))
    rb = rank_average(np.asarray(b, np.float64))
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denom = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


def lds(
    scores,
    masks,
    margins,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """The linear datamodeling score of attribution ``scores`` against retrained ``margins``.

    ``LDS_j = spearman_s( (masks @ scores)[s, j], margins[s, j] )``, ``LDS = mean_j LDS_j``.

    Args:
      scores: (N, T) attribution scores (train × targets).
      masks: (S, N) subsets (bool or 0/1), as passed to :func:`retrain_margins`.
      margins: (S, T) target outputs of the models retrained on each subset.
      n_bootstrap: bootstrap resamples of the targets for the confidence interval.
      confidence: level of the interval.
      seed: seed of the bootstrap resampling.

    Returns:
      :class:`LDSResult`.

    Raises:
      ValueError: on mismatched shapes, non-finite inputs, or a target whose margins or
        predictions are constant across subsets (its rank correlation is undefined).
    """
    scores = np.asarray(scores, np.float64)
    masks = np.asarray(masks)
    margins = np.asarray(margins, np.float64)
    if scores.ndim != 2:
        raise InvalidArgumentError(f"scores must be (n_train, n_targets), got shape {scores.shape}")
    n_train, n_targets = scores.shape
    if masks.ndim != 2 or masks.shape[1] != n_train:
        raise InvalidArgumentError(f"masks must be (n_subsets, n_train={n_train}), got shape {masks.shape}")
    if margins.shape != (masks.shape[0], n_targets):
        raise InvalidArgumentError(
            f"margins must be (n_subsets, n_targets) = ({masks.shape[0]}, {n_targets}), "
            f"got shape {margins.shape}"
        )
    if masks.shape[0] < 3:
        raise InvalidArgumentError(f"need at least 3 subsets for a rank correlation, got {masks.shape[0]}")
    for name, array in (("scores", scores), ("margins", margins)):
        if not np.isfinite(array).all():
            raise InvalidArgumentError(f"{name} has NaN or Inf entries")
    if not (0.0 < confidence < 1.0):
        raise InvalidArgumentError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer) or n_bootstrap < 1:
        raise InvalidArgumentError(f"n_bootstrap must be an int >= 1, got {n_bootstrap!r}")
    predicted = masks.astype(np.float64) @ scores
    per_target = spearman_columns(predicted, margins)
    undefined = np.flatnonzero(np.isnan(per_target))
    if undefined.size:
        raise InvalidArgumentError(
            f"targets {undefined[:10].tolist()} have constant margins or constant predicted "
            "outputs across subsets; their rank correlation is undefined"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    resampled = per_target[rng.integers(0, n_targets, size=(n_bootstrap, n_targets))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    return LDSResult(float(per_target.mean()), per_target, float(low), float(high), float(confidence))


# --------------------------------------------------------------------------- brittleness


class BrittlenessResult(NamedTuple):
    """How often removing k training examples flips a target's prediction.

    Attributes:
      k_values: (K,) the numbers of examples removed.
      top_flip_rate: (K,) fraction of evaluated targets whose margin turned negative after
        removing their k top-scored training examples.
      random_flip_rate: (K,) the same after removing k random training examples.
      evaluated: indices of the targets evaluated: those the full-data model predicts correctly
        (margin > 0).
      top_margins: (K, T) margins after removing the top-scored examples (all targets).
      random_margins: (K, T) margins after removing random examples.
      base_margins: (T,) margins of the model trained on all the data.
    """

    k_values: np.ndarray
    top_flip_rate: np.ndarray
    random_flip_rate: np.ndarray
    evaluated: np.ndarray
    top_margins: np.ndarray
    random_margins: np.ndarray
    base_margins: np.ndarray


def brittleness(
    scores,
    init_fn: Callable[[jax.Array], Any],
    apply_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    steps: int,
    data: Any,
    targets: Any,
    k_values: Sequence[int],
    seed: int = 0,
    **retrain_kwargs,
) -> BrittlenessResult:
    """The counterfactual check: does removing a target's top proponents flip its prediction?

    For every target j and every k: train on all data but the k training examples with the
    largest ``scores[:, j]`` (the strongest proponents) and record j's margin; likewise without
    k random examples (drawn per target from ``seed``). Every model starts from the same
    initialization as the full-data model (``same_init``), so only the removed data differ. A flip
    is a margin that was positive on the full-data model and is negative after removal.

    Args:
      scores: (N, T) attribution scores.
      init_fn, apply_fn, optimizer, steps, data, targets: as in :func:`retrain_margins`.
      k_values: numbers of examples to remove, each in [1, N).
      seed: seed of the initialization and of the random removals.
      **retrain_kwargs: further keyword arguments of :func:`retrain_margins`
        (``per_example_loss``, ``target_output``, ``batch_size``, ``chunk_size``).

    Returns:
      :class:`BrittlenessResult`.
    """
    scores = np.asarray(scores, np.float64)
    n = data_lib.num_examples(data, "data")
    t = data_lib.num_examples(targets, "targets")
    if scores.shape != (n, t):
        raise InvalidArgumentError(f"scores must be (n_train, n_targets) = ({n}, {t}), got shape {scores.shape}")
    k_values = np.asarray([int(k) for k in k_values])
    if k_values.size == 0 or (k_values < 1).any() or (k_values >= n).any():
        raise InvalidArgumentError(f"k_values must be ints in [1, {n}), got {k_values.tolist()}")
    retrain_kwargs = dict(retrain_kwargs, same_init=True)
    common = (init_fn, apply_fn, optimizer, steps, data, targets)
    base = retrain_margins(*common, np.ones((1, n), bool), seed, **retrain_kwargs)[0]
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, T): strongest proponents first
    rng = np.random.Generator(np.random.PCG64(seed))
    top_margins, random_margins = [], []
    for k in k_values:
        top = np.ones((t, n), bool)
        top[np.arange(t)[:, None], order[:k].T] = False
        rand = np.ones((t, n), bool)
        for j in range(t):
            rand[j, rng.permutation(n)[:k]] = False
        top_margins.append(np.diag(retrain_margins(*common, top, seed, **retrain_kwargs)))
        random_margins.append(np.diag(retrain_margins(*common, rand, seed, **retrain_kwargs)))
    top_margins = np.stack(top_margins)
    random_margins = np.stack(random_margins)
    evaluated = np.flatnonzero(base > 0)
    if evaluated.size == 0:
        raise InvalidArgumentError("the full-data model predicts no target correctly (no positive margin)")
    top_rate = (top_margins[:, evaluated] < 0).mean(axis=1)
    random_rate = (random_margins[:, evaluated] < 0).mean(axis=1)
    return BrittlenessResult(k_values, top_rate, random_rate, evaluated, top_margins,
                             random_margins, base)
