"""A small language-modeling setting: a byte-level causal LM trained on Python's own source code.

Used by ``trakjax demo --task lm`` and by benchmarks that need LDS evidence on a language model.
Nothing is downloaded: the corpus is a fixed list of the Python standard library's source files,
read from the running interpreter's library directory (``os.__file__``'s directory).

* :func:`load_corpus`: the files' bytes cut into non-overlapping windows of ``sequence_length``
  bytes, as token ids 0..255 (vocabulary 256), with the SHA-256 of the file list and of the
  content, and the Python version (each version's standard library differs, so do not compare
  LDS figures across Python versions). :func:`split_corpus` draws disjoint training and
  held-out sequences by seed.
* :class:`CausalLM`: a Flax NNX decoder-only transformer (pre-LayerNorm blocks of causal
  multi-head self-attention and a ReLU MLP, learned positions); :func:`model` adapts it to
  trakjax (``trakjax.flax.from_nnx``).
* :func:`make_trainer`: Adam on the mean token cross-entropy, minibatches drawn with replacement,
  ``jax.lax.scan``-ed and jitted; ``jax.vmap``-ed over seeds to train an ensemble at once. It is
  exactly :func:`trakjax.evaluation.retrain_margins`'s recipe with every weight 1.
* :func:`task`: :func:`trakjax.tasks.language_modeling` on the model; :func:`target_outputs`
  evaluates that task's output f (the summed next-token log-odds of a sequence) on held-out
  sequences, the quantity the attributions predict.
* :func:`retrain_outputs`: the LDS ground truth: models retrained on subsets (e.g. random halves,
  :func:`trakjax.evaluation.subset_masks`) with the same recipe, ``jax.vmap``-ed over subsets;
  pass them with the masks to :func:`trakjax.evaluation.lds`.

Example (a script measuring the LDS of some attribution)::

    corpus = text_lm.load_corpus()
    train, targets = text_lm.split_corpus(corpus, 1000, 50, seed=0)
    config = text_lm.LMConfig()
    params = text_lm.train_models(config, train.ids, num_models=4, steps=300, seed=0)
    scores = trakjax.attribute(text_lm.task(config), params, train.ids, targets.ids,
                               grad_wrt=text_lm.GRAD_WRT, projection="factorized")
    masks = trakjax.evaluation.subset_masks(1000, 60, 0.5, seed=1)
    outputs = text_lm.retrain_outputs(config, train.ids, targets.ids, masks, steps=300, seed=2)
    print(trakjax.evaluation.lds(scores, masks, outputs).mean)
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trakjax import evaluation, tasks
from trakjax import flax as trakjax_flax
from trakjax.errors import InvalidArgumentError

VOCABULARY = 256
"""Byte-level vocabulary: token id = byte value."""

CORPUS_FILES: tuple[str, ...] = (
    "textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "shlex.py", "colorsys.py", "queue.py",
    "json/decoder.py", "json/encoder.py", "string.py", "copy.py", "glob.py", "base64.py",
    "calendar.py",
)
"""The fixed list of standard-library files (relative to the library directory) of the corpus."""

GRAD_WRT = [trakjax_flax.PARAMS]
"""``grad_wrt`` of the model's parameter pytree (``{"params": …, "state": …}``)."""

DECODER = "bytes"
"""The explorer's decoder of this setting's token ids (:func:`trakjax.explorer.decode_tokens`)."""


# --------------------------------------------------------------------------- corpus


class Corpus(NamedTuple):
    """Byte sequences of standard-library source files.

    Attributes:
      ids: (S, L) int32 token ids (bytes), one row per window.
      file_index: (S,) int32: the window's file, an index into ``files``.
      offset: (S,) int32: the window's first byte in its file.
      files: the relative file names read, in order.
      list_hash: SHA-256 (hex) of the file list.
      content_hash: SHA-256 (hex) of every file's name, length and bytes, in order.
      python_version: the interpreter's version, e.g. "3.11.7" (its library is the corpus).
      directory: the library directory the files were read from.
    """

    ids: np.ndarray
    file_index: np.ndarray
    offset: np.ndarray
    files: tuple[str, ...]
    list_hash: str
    content_hash: str
    python_version: str
    directory: str

    def describe(self) -> dict:
        """The corpus's provenance as JSON-ready values (for run records)."""
        return {"files": list(self.files), "list_hash": self.list_hash,
                "content_hash": self.content_hash, "python_version": self.python_version,
                "sequences": int(self.ids.shape[0]), "sequence_length": int(self.ids.shape[1]),
                "directory": self.directory}


class Sequences(NamedTuple):
    """A selection of corpus windows: ``ids`` (n, L) int32 and their rows ``index`` (n,) in the corpus."""

    ids: np.ndarray
    index: np.ndarray


def stdlib_directory() -> Path:
    """The running interpreter's standard-library directory (where ``os.py`` lives)."""
    return Path(os.path.dirname(os.path.abspath(os.__file__)))


def list_hash(files: Sequence[str]) -> str:
    """SHA-256 (hex) of the file names joined by newlines."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def load_corpus(sequence_length: int = 64, files: Sequence[str] = CORPUS_FILES,
                directory: str | os.PathLike | None = None) -> Corpus:
    """Read ``files`` and cut each into non-overlapping windows of ``sequence_length`` bytes.

    Each file contributes ``len(file) // sequence_length`` windows from its start (its tail is
    dropped), so windows never span two files. Deterministic: the same files give the same
    corpus and hashes.

    Raises:
      InvalidArgumentError: on a bad ``sequence_length`` or an empty file list, or when a file
        is missing (naming it and the directory).
    """
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 2:
        raise InvalidArgumentError(f"sequence_length must be an int >= 2, got {sequence_length!r}")
    files = tuple(files)
    if not files:
        raise InvalidArgumentError("files must name at least one file")
    root = stdlib_directory() if directory is None else Path(directory)
    content = hashlib.sha256()
    windows, file_index, offsets = [], [], []
    for number, name in enumerate(files):
        path = root / name
        if not path.is_file():
            raise InvalidArgumentError(
                f"corpus file {name!r} is not in {root}; pass files= naming files of this Python's library"
            )
        data = path.read_bytes()
        content.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
        count = len(data) // sequence_length
        array = np.frombuffer(data[: count * sequence_length], np.uint8).reshape(count, sequence_length)
        windows.append(array.astype(np.int32))
        file_index.append(np.full(count, number, np.int32))
        offsets.append(np.arange(count, dtype=np.int32) * sequence_length)
    return Corpus(np.concatenate(windows), np.concatenate(file_index), np.concatenate(offsets), files,
                  list_hash(files), content.hexdigest(), platform.python_version(), str(root))


def split_corpus(corpus: Corpus, train_size: int, num_targets: int, seed: int = 0) -> tuple[Sequences, Sequences]:
    """Disjoint random training and held-out windows: ``(train, targets)``, (N, L) and (T, L).

    Rows are drawn from one permutation of the corpus by numpy's PCG64 with ``seed``.
    """
    total = corpus.ids.shape[0]
    for name, value in (("train_size", train_size), ("num_targets", num_targets)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    if train_size + num_targets > total:
        raise InvalidArgumentError(
            f"train_size + num_targets must be at most the corpus's {total} sequences, got "
            f"{train_size} + {num_targets}"
        )
    order = np.random.Generator(np.random.PCG64(seed)).permutation(total)
    train, held_out = np.sort(order[:train_size]), np.sort(order[train_size : train_size + num_targets])
    return Sequences(corpus.ids[train], train), Sequences(corpus.ids[held_out], held_out)


def decode(ids: Any) -> str:
    """Token ids (bytes 0..255) as text: UTF-8 with ``errors="replace"``."""
    return bytes(np.asarray(ids, np.uint8).reshape(-1).tolist()).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- model


class LMConfig(NamedTuple):
    """Shape of :class:`CausalLM`.

    Attributes:
      sequence_length: L, the positions of the learned position embedding.
      width: d, the residual width.
      depth: transformer blocks.
      heads: attention heads (``width`` must be a multiple).
      mlp_ratio: the MLP's hidden width over ``width``.
    """

    sequence_length: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: LMConfig, rngs: nnx.Rngs):
        d = config.width
        self.heads = config.heads
        self.attention_norm = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.attention_out = nnx.Linear(d, d, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, config.mlp_ratio * d, rngs=rngs)
        self.mlp_out = nnx.Linear(config.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, d) → (B, L, d), causal: position t attends to positions ≤ t."""
        batch, length, width = x.shape
        head = width // self.heads
        qkv = self.qkv(self.attention_norm(x)).reshape(batch, length, 3, self.heads, head)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(head))
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        attended = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, width)
        x = x + self.attention_out(attended)
        return x + self.mlp_out(jax.nn.relu(self.mlp_in(self.mlp_norm(x))))


class CausalLM(nnx.Module):
    """Byte-level decoder-only transformer: ``(B, L) int ids → (B, L, 256)`` next-token logits."""

    def __init__(self, config: LMConfig, rngs: nnx.Rngs):
        if config.width % config.heads:
            raise InvalidArgumentError(f"width={config.width} must be a multiple of heads={config.heads}")
        self.token_embedding = nnx.Embed(VOCABULARY, config.width, rngs=rngs)
        self.position_embedding = nnx.Embed(config.sequence_length, config.width, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.depth)]) \
            if hasattr(nnx, "List") else [Block(config, rngs) for _ in range(config.depth)]
        self.final_norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.head = nnx.Linear(config.width, VOCABULARY, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """(B, L) int → (B, L, 256) float32; ``logits[:, t]`` predicts ``ids[:, t + 1]``."""
        positions = jnp.arange(ids.shape[-1])
        x = self.token_embedding(ids) + self.position_embedding(positions)[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


@functools.lru_cache(maxsize=8)
def model(config: LMConfig = LMConfig()) -> trakjax_flax.FlaxModel:
    """The model adapted to trakjax (:func:`trakjax.flax.from_nnx`), initialized from key 0.

    Its ``apply_fn(params, ids)`` serves every parameter pytree of this ``config`` (from
    :func:`init_params` or :func:`train_models`); cached per config so that jitted programs
    built on it compile once.
    """
    return trakjax_flax.from_nnx(CausalLM(config, nnx.Rngs(0)))


def init_params(config: LMConfig, key: jax.Array) -> dict:
    """Fresh parameters ``{"params": …, "state": …}`` from ``key`` (traceable: works under vmap)."""
    return trakjax_flax.nnx_params(CausalLM(config, nnx.Rngs(params=key)))


@functools.lru_cache(maxsize=8)
def _initializer(config: LMConfig) -> Callable[[jax.Array], dict]:
    return functools.partial(init_params, config)


def task(config: LMConfig = LMConfig()) -> tasks.Task:
    """:func:`trakjax.tasks.language_modeling` on :func:`model`'s ``apply_fn``."""
    return _task(config)


@functools.lru_cache(maxsize=8)
def _task(config: LMConfig) -> tasks.Task:
    return tasks.language_modeling(model(config).apply_fn)


# --------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=8)
def sequence_loss(config: LMConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """Per-example loss ``(params, ids (B, L)) -> (B,)``: mean next-token cross-entropy per sequence."""
    apply_fn = model(config).apply_fn

    def loss(params, ids):
        logits = apply_fn(params, ids)[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(axis=1)

    return loss


@functools.lru_cache(maxsize=8)
def target_outputs(config: LMConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """``(params, ids (T, L)) -> (T,)``: :func:`task`'s output f per sequence, the summed
    next-token log-odds Σ_t log p_t/(1 − p_t) (what TRAK's scores predict)."""
    output = task(config).output

    def outputs(params, ids):
        return jax.vmap(lambda example: output(params, example, None))(ids)

    return outputs


@functools.lru_cache(maxsize=8)
def optimizer(learning_rate: float = 3e-3) -> optax.GradientTransformation:
    """The setting's optimizer: Adam (cached per rate, so jitted programs built on it compile once)."""
    return optax.adam(learning_rate)


def train_models(config: LMConfig, train_ids: np.ndarray, num_models: int, steps: int, seed: int = 0, *,
                 batch_size: int = 32, learning_rate: float = 3e-3, first_model: int = 0) -> list[dict]:
    """Train ``num_models`` models on all of ``train_ids`` (N, L): a list of parameter pytrees.

    Model m uses key ``fold_in(key(seed), first_model + m)``: the recipe of
    :func:`retrain_outputs` with every weight 1 (Adam, ``steps`` minibatches of ``batch_size``
    drawn with replacement). Training models one call at a time with ``first_model`` uses the
    keys of one call for all.
    """
    _check_training(num_models, steps, batch_size, learning_rate)
    train = _make_trainer(config, int(steps), int(batch_size), float(learning_rate))
    base = jax.random.key(int(seed))
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
        jnp.arange(first_model, first_model + num_models, dtype=jnp.uint32))
    weights = jnp.ones((num_models, train_ids.shape[0]), jnp.float32)
    stacked = train(keys, weights, jnp.asarray(train_ids, jnp.int32))
    return [jax.tree_util.tree_map(lambda leaf, m=m: np.asarray(leaf[m]), stacked) for m in range(num_models)]


def _check_training(num_models, steps, batch_size, learning_rate) -> None:
    for name, value in (("num_models", num_models), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    if not learning_rate > 0:
        raise InvalidArgumentError(f"learning_rate must be > 0, got {learning_rate!r}")


@functools.lru_cache(maxsize=8)
def _make_trainer(config: LMConfig, steps: int, batch_size: int, learning_rate: float):
    """Jitted ``(keys (M,), weights (M, N), ids (N, L)) -> M stacked parameter pytrees``:
    the sampling scheme of :func:`trakjax.evaluation.retrain_margins` (minibatch indices drawn
    with probability weights / Σ weights)."""
    loss_fn = sequence_loss(config)
    opt = optimizer(learning_rate)

    def train_one(key, weights, ids):
        init_key, sample_key = jax.random.split(key)
        params = init_params(config, init_key)
        opt_state = opt.init(params)
        probs = weights / weights.sum()

        def step(carry, step_key):
            p, s = carry
            idx = jax.random.choice(step_key, ids.shape[0], (batch_size,), replace=True, p=probs)
            grads = jax.grad(lambda q: jnp.mean(loss_fn(q, ids[idx])))(p)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(sample_key, steps))
        return params

    return jax.jit(jax.vmap(train_one, in_axes=(0, 0, None)))


def retrain_outputs(config: LMConfig, train_ids: np.ndarray, target_ids: np.ndarray, masks: np.ndarray, *,
                    steps: int, seed: int = 0, batch_size: int = 32, learning_rate: float = 3e-3,
                    chunk_size: int | None = None) -> np.ndarray:
    """The LDS ground truth: (S, T) float32 outputs f of ``target_ids`` under models retrained on
    each subset ``masks[s]`` (S, N) with :func:`train_models`'s recipe.

    :func:`trakjax.evaluation.retrain_margins` with this setting's loss, output and Adam;
    ``jax.vmap``-ed over ``chunk_size`` subsets at a time. Model s starts from
    ``fold_in(key(seed), s)``.
    """
    _check_training(1, steps, batch_size, learning_rate)
    apply_fn = model(config).apply_fn
    return evaluation.retrain_margins(
        _initializer(config), apply_fn, optimizer(float(learning_rate)), int(steps),
        jnp.asarray(train_ids, jnp.int32), jnp.asarray(target_ids, jnp.int32), masks, seed,
        per_example_loss=sequence_loss(config), target_output=target_outputs(config),
        batch_size=int(batch_size), chunk_size=chunk_size,
    )
