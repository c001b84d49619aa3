"""Retraining-free λ rules for TRAK across model families: LDS against the best grid λ.

What it measures: for each setting (data set × model × training recipe) and each projection
dimension k (and the identity projection, k = P), the linear datamodeling score (LDS) of TRAK
scores at

* every λ of a log grid λ = c · trace(Φ_mᵀΦ_m)/N (per checkpoint m), c = 10^-3 … 10^2 in steps
  of 10^0.25;
* today's ``lambda_reg="auto"`` (λ = 0.3 · trace/N, :func:`trakjax.solve.auto_lambda`);
* each retraining-free candidate rule (:func:`build_rules`): the implied-ridge rule chosen for
  :func:`trakjax.regularization.auto_lambda` and its ablations, rules in the mean out-to-loss
  term q̄, effective degrees of freedom, λ_max and ‖ΦᵀΦ‖_F²/trace multiples, and a per-target
  surrogate indicator ξ;

plus two diagnostics that are not λ rules: a per-target oracle c (the headroom of any per-target
rule) and the h-weighted kernel (α Σ h φφᵀ + ρ̂I)⁻¹ in place of TRAK's (ΦᵀΦ + λI)⁻¹.

How: targets are split as in ``benchmarks/lds_digits.py`` (even-indexed targets pick the best
grid c, odd-indexed targets report). Each row of the tables gives, on the report targets, the LDS
of the best grid c, of today's auto and of each rule, and the paired difference rule − best grid
(mean over report targets, with a 95% paired bootstrap interval over targets).

* settings (``--settings``, all data ship with scikit-learn):
  ``mlp64`` digits MLP 64-64-10, 200 full-batch Adam steps (exactly ``lds_digits.py``'s run);
  ``mlp32`` 64-32-10; ``mlp64-sgd`` 64-64-10 trained with minibatches (1000 Adam steps of 64
  examples drawn with replacement); ``mlp64-early`` / ``mlp32-early`` stopped after 50 steps;
  ``cnn`` 3×3 conv (8) → 2×2 avg pool → 3×3 conv (16) → 2×2 avg pool → dense, 200 full-batch
  Adam steps (convolutions written as patch matmuls, which vmapped retraining runs fast on CPU);
  ``lr-digits`` / ``lr-wine`` multinomial logistic regression (softmax, L2 penalty (1/2N)‖W‖²,
  sklearn's C = 1) on digits and on wine (standardized); ``logreg-bc`` binary logistic
  regression (``trakjax.tasks.binary_classification``) on breast_cancer (standardized).
* checkpoints: neural nets differ by seed (10 seeds, as lds_digits.py). The convex models have one
  optimum (zero init, trained to convergence): their 8 checkpoints are that model 8 times, which
  differ only by their projection matrices (with the identity projection, one model).
  ``logreg-bc-boot`` instead trains its 8 checkpoints on bootstrap resamples (multinomial example
  weights, seed m), a stress test of the statistics the implied-ridge rule reads.
* ground truth: ``--subsets`` random half-subsets (:func:`trakjax.evaluation.subset_masks`, seed
  0), one model retrained per subset with the setting's recipe on the full (unweighted) subset
  (:func:`trakjax.evaluation.retrain_margins`, vmapped; seed 1), target margins recorded.
* features: trakjax's public API (``featurize.prepare_checkpoint`` / ``featurize.featurize`` with
  ``FeaturizeConfig(projection="normal")`` as lds_digits.py, or ``"identity"``), once per
  (setting, k, checkpoint); the λ grid and every rule are evaluated from one float64
  eigendecomposition per checkpoint (of ΦᵀΦ, or of ΦΦᵀ when k > N: same non-zero spectrum and
  the same scores), mathematically the scores of :func:`trakjax.attribute` with a float
  ``lambda_reg`` (checked against it once per run, printed).

Caching: retrained margins and per-checkpoint spectra go to ``--cache`` (default ``out/lambda_cache``,
git-ignored), so a rerun only evaluates rules. ``--leave-one-out`` adds, for each one-constant
family, the constant fit on the other settings (selection targets) and reported on the held-out one.

``--defaults`` instead measures the defaults (no projection setting: ``projection="auto"``, factor
sizes from proj_dim, the sparse second stage) against ``projection="rademacher"``, paired per
report target through ``trakjax.attribute`` with ``--seeds`` projection draws each (issue 20).

Run:  python benchmarks/lambda_rules.py [--settings mlp64 cnn ...] [--proj-dims 128 512 2048 id]
      [--subsets 200] [--quick] [--cache out/lambda_cache] [--leave-one-out] [--no-xi]
      [--defaults [--seeds 2]]

Time (2-core x86_64 CPU shared with other jobs): about 25 minutes from an empty cache (the
ground truth about 11 minutes, 9 of them the CNN's 200 retrained models; featurization and
eigendecompositions about 5), about 8 minutes from a warm cache plus 2 for ``--leave-one-out``;
``--quick`` (lr-wine and logreg-bc, k = 128 and identity, 60 subsets) about 15 seconds.
Results are in benchmarks/README.md ("lambda_rules.py").
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TQDM_DISABLE", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trakjax  # noqa: E402
from trakjax import Config, evaluation, featurize, regularization, solve, tasks  # noqa: E402

GRID = tuple(float(c) for c in np.round(10.0 ** np.arange(-3.0, 2.01, 0.25), 6))
"""λ / (trace(ΦᵀΦ)/N), per checkpoint: 10^-3 … 10^2 in steps of 10^0.25."""
SUBSET_FRACTION = 0.5
EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- data and models


def digits_data(n_train=1000, target_start=1000):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return (x[:n_train], y[:n_train]), (x[target_start:], y[target_start:])


def standardized(loader, n_train, seed=0):
    """A shuffled (the sklearn files are sorted by class) train/target split, standardized on train."""
    x, y = loader(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float64), y[order].astype(np.int32)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-12
    x = ((x - mean) / std).astype(np.float32)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class MLP(nn.Module):
    hidden: int
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(self.hidden, name="Dense_0")(x))
        return nn.Dense(self.classes, name="Dense_1")(hidden)


def patches3x3(x):
    """(B, H, W, C) -> (B, H, W, 9C): the 3×3 neighbourhoods ('SAME' zero padding)."""
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)


class Conv3x3(nn.Module):
    """A 3×3 'SAME' convolution written as patches × kernel: the same layer as ``nn.Conv(features,
    (3, 3))`` (kernel (3, 3, C_in, C_out), bias), computed as a matmul, which XLA's CPU backend runs
    much faster than a convolution once retraining vmaps it over hundreds of models."""

    features: int

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return patches3x3(x) @ kernel.reshape(9 * c_in, self.features) + bias


class CNN(nn.Module):
    """3×3 convolution (8 channels, ReLU), 2×2 average pool, 3×3 convolution (16, ReLU), 2×2
    average pool, dense: 1,898 parameters."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], 8, 8, 1))
        x = nn.avg_pool(nn.relu(Conv3x3(8)(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(Conv3x3(16)(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class Linear(nn.Module):
    """Logistic regression: softmax over ``classes`` logits, or one logit (``classes=1``)."""

    classes: int

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(self.classes, kernel_init=nn.initializers.zeros)(x)
        return z[:, 0] if self.classes == 1 else z


@dataclass
class Setting:
    name: str
    description: str
    model: nn.Module
    data: Callable
    steps: int
    lr: float
    checkpoints: int
    convex: bool = False     # one optimum (zero init, trained to convergence), used M times
    bootstrap: bool = False  # checkpoints trained on bootstrap resamples of the training set
    binary: bool = False
    l2: float = 0.0          # penalty (l2/2)·‖kernel‖² added to the mean loss
    classes: int = 10
    batch: int | None = None  # minibatch size (examples drawn with replacement); None: full batch

    @property
    def output_offset(self):
        """f₀: the margin of the untrained model (uniform probabilities), −log(C − 1); 0 for one logit."""
        return 0.0 if self.binary else regularization.margin_offset(self.classes)

    @functools.cached_property
    def splits(self):
        return self.data()

    @property
    def train(self):
        return self.splits[0]

    @property
    def targets(self):
        return self.splits[1]

    @property
    def n(self):
        return int(self.train[1].shape[0])

    def init(self, key):
        return self.model.init(key, jnp.zeros((1, self.train[0].shape[1]), jnp.float32))

    @property
    def task(self):
        if self.binary:
            return tasks.binary_classification(self.model.apply)
        return tasks.image_classification(self.model.apply)

    def per_example_loss(self):
        apply_fn, l2, binary = self.model.apply, self.l2, self.binary

        def loss(params, batch):
            x, y = batch
            logits = apply_fn(params, x)
            if binary:
                sign = 2.0 * y.astype(jnp.float32) - 1.0
                out = jax.nn.softplus(-sign * logits)
            else:
                out = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            if l2:
                kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(params)
                           if "kernel" in jax.tree_util.keystr(path)]
                out = out + 0.5 * l2 * sum(jnp.sum(k * k) for k in kernels)
            return out

        return loss

    def target_output(self):
        apply_fn = self.model.apply
        if self.binary:
            return lambda params, t: (2.0 * t[1].astype(jnp.float32) - 1.0) * apply_fn(params, t[0])
        return evaluation.classification_margins(apply_fn)

    def num_params(self):
        return int(sum(x.size for x in jax.tree_util.tree_leaves(self.init(jax.random.key(0)))))


def _settings():
    n_wine, n_bc = 100, 400
    return {
        "mlp64": Setting("mlp64", "digits MLP 64-64-10, 200 Adam steps", MLP(64), digits_data, 200, 1e-2, 10),
        "mlp32": Setting("mlp32", "digits MLP 64-32-10, 200 Adam steps", MLP(32), digits_data, 200, 1e-2, 10),
        "mlp64-sgd": Setting("mlp64-sgd", "digits MLP 64-64-10, 1000 minibatch Adam steps (batch 64)",
                             MLP(64), digits_data, 1000, 1e-2, 10, batch=64),
        "mlp64-early": Setting("mlp64-early", "digits MLP 64-64-10, early-stopped (50 steps)", MLP(64),
                               digits_data, 50, 1e-2, 10),
        "mlp32-early": Setting("mlp32-early", "digits MLP 64-32-10, early-stopped (50 steps)", MLP(32),
                               digits_data, 50, 1e-2, 10),
        "cnn": Setting("cnn", "digits CNN conv8-pool-conv16-pool-dense, 200 Adam steps", CNN(), digits_data, 200,
                       1e-2, 10),
        "lr-digits": Setting("lr-digits", "digits multinomial logistic regression, L2 1/N", Linear(10),
                             digits_data, 500, 5e-2, 8, convex=True, l2=1e-3),
        "lr-wine": Setting("lr-wine", "wine multinomial logistic regression, L2 1/N",
                           Linear(3), lambda: standardized(load_wine, n_wine), 500, 5e-2, 8, convex=True,
                           l2=1.0 / n_wine, classes=3),
        "logreg-bc": Setting("logreg-bc", "breast_cancer binary logistic regression, L2 1/N",
                             Linear(1), lambda: standardized(load_breast_cancer, n_bc), 500, 5e-2, 8,
                             convex=True, binary=True, l2=1.0 / n_bc, classes=2),
        "logreg-bc-boot": Setting("logreg-bc-boot", "breast_cancer binary logistic regression, L2 1/N, "
                                  "checkpoints on bootstrap resamples", Linear(1),
                                  lambda: standardized(load_breast_cancer, n_bc), 500, 5e-2, 8, convex=True,
                                  bootstrap=True, binary=True, l2=1.0 / n_bc, classes=2),
    }


SETTINGS = _settings()


# --------------------------------------------------------------------------- training


def train_checkpoints(setting: Setting, seed=1000):
    """M checkpoints: by seed (neural nets); for convex models the one optimum M times (they differ
    only by their projection matrices), or M bootstrap resamples (``bootstrap``)."""
    optimizer = optax.adam(setting.lr)
    loss_fn = setting.per_example_loss()
    data = jax.tree_util.tree_map(jnp.asarray, setting.train)
    n = setting.n

    @jax.jit
    def fit(key, weights):
        # Full batch: init from ``key`` itself (lds_digits.py's checkpoints); minibatch: split it.
        init_key, sample_key = (key, key) if setting.batch is None else jax.random.split(key)
        params = setting.init(init_key)
        state = optimizer.init(params)
        probs = weights / jnp.sum(weights)

        def objective(p, step_key):
            if setting.batch is None:
                return jnp.sum(loss_fn(p, data) * probs)
            idx = jax.random.choice(step_key, n, (setting.batch,), replace=True, p=probs)
            return jnp.mean(loss_fn(p, jax.tree_util.tree_map(lambda x: x[idx], data)))

        def step(carry, step_key):
            p, s = carry
            grads = jax.grad(objective)(p, step_key)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, state), jax.random.split(sample_key, setting.steps))
        return params

    if setting.convex and not setting.bootstrap:
        return [fit(jax.random.key(seed), jnp.ones(n, jnp.float32))] * setting.checkpoints
    out = []
    for m in range(setting.checkpoints):
        if setting.bootstrap:
            counts = np.random.default_rng(seed + m).multinomial(n, np.full(n, 1.0 / n))
            weights = jnp.asarray(counts, jnp.float32)
        else:
            weights = jnp.ones(n, jnp.float32)
        out.append(fit(jax.random.fold_in(jax.random.key(seed), m), weights))
    return out


def ground_truth(setting: Setting, subsets: int, cache: str):
    path = os.path.join(cache, f"truth_{setting.name}_S{subsets}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return z["masks"], z["margins"], float(z["seconds"])
    masks = evaluation.subset_masks(setting.n, subsets, SUBSET_FRACTION, seed=0)
    start = time.perf_counter()
    margins = evaluation.retrain_margins(
        setting.init, setting.model.apply, optax.adam(setting.lr), setting.steps, setting.train,
        setting.targets, masks, seed=1, per_example_loss=setting.per_example_loss(),
        target_output=setting.target_output(), batch_size=setting.batch, chunk_size=50,
    )
    seconds = time.perf_counter() - start
    np.savez(path, masks=masks, margins=margins, seconds=seconds)
    return masks, margins, seconds


# --------------------------------------------------------------------------- spectra


@dataclass
class Spectral:
    """One checkpoint's features in the eigenbasis of ΦᵀΦ (float64 eigendecomposition).

    Scores at λ: Σ_j a_j b_jᵀ / (s_j + λ) with a_j = Φ v_j (N,), b_j = Ψ v_j (T,), over the
    positive eigenvalues s_j (directions with s_j = 0 contribute nothing to Φ A⁻¹ Ψᵀ).
    """

    s: np.ndarray          # (r,) positive eigenvalues of ΦᵀΦ, ascending
    a: np.ndarray          # (N, r)
    b: np.ndarray          # (T, r)
    q: np.ndarray          # (N,) out-to-loss terms of this checkpoint
    f: np.ndarray          # (N,) train outputs (margins)
    row_sq: np.ndarray     # (N,) ‖φ_i‖²
    target_sq: np.ndarray  # (T,) ‖ψ_j‖²
    k: int
    p: int
    gram_top: float        # largest eigenvalue of ΦᵀΦ
    gram_negative: float   # |most negative| computed eigenvalue of the k×k Gram (0 if not computed)
    frob_sq: float         # ‖ΦᵀΦ‖_F² = Σ s²
    seconds: float         # eigendecomposition time

    @property
    def n(self):
        return self.a.shape[0]

    @property
    def trace(self):
        return float(self.row_sq.sum())

    @property
    def tolerance(self):
        """solve.spectrum's rank tolerance (float32 features)."""
        return max(EPS32 * self.gram_top, 4.0 * self.gram_negative)


def spectral(phi, psi, q, f):
    phi = np.asarray(phi, np.float64)
    psi = np.asarray(psi, np.float64)
    n, k = phi.shape
    start = time.perf_counter()
    negative = 0.0
    if k <= n:
        s, v = np.linalg.eigh(phi.T @ phi)
        negative = max(0.0, -float(s[0]))
        top = float(s[-1])
        keep = s > 1e-13 * top
        s, v = s[keep], v[:, keep]
        a, b = phi @ v, psi @ v
    else:  # the N×N kernel ΦΦᵀ = U S Uᵀ: Φ v_j = √s_j u_j, Ψ v_j = Ψ Φᵀ u_j / √s_j
        s, u = np.linalg.eigh(phi @ phi.T)
        top = float(s[-1])
        keep = s > 1e-13 * top
        s, u = s[keep], u[:, keep]
        root = np.sqrt(s)
        a = u * root
        b = (psi @ (phi.T @ u)) / root
    seconds = time.perf_counter() - start
    row_sq = (phi * phi).sum(1)
    return Spectral(s, a, b, np.asarray(q, np.float64), np.asarray(f, np.float64), row_sq,
                    (psi * psi).sum(1), k, 0, top, negative, float((s * s).sum()), seconds)


def featurized(setting: Setting, checkpoints, k, cache, model_ids=None):
    """Spectral data of every checkpoint at projection k (``"id"``: identity), cached."""
    tag = "id" if k == "id" else str(k)
    path = os.path.join(cache, f"spec_{setting.name}_k{tag}.npz")
    m = len(checkpoints)
    if os.path.exists(path):
        z = np.load(path)
        if int(z["m"]) == m:
            out = []
            for i in range(m):
                fields = {name: z[f"{i}_{name}"] for name in ("s", "a", "b", "q", "f", "row_sq", "target_sq")}
                scalars = {name: float(z[f"{i}_{name}"]) for name in ("gram_top", "gram_negative", "frob_sq",
                                                                        "seconds")}
                out.append(Spectral(**{key: np.asarray(val, np.float64) for key, val in fields.items()},
                                    k=int(z[f"{i}_k"]), p=int(z[f"{i}_p"]), **scalars))
            return out, float(z["featurize_seconds"])
    task = setting.task
    if k == "id":
        config = Config.create(projection="identity", proj_dim=None, batch_size=256, backend="xla")
    else:
        config = Config.create(projection="normal", proj_dim=int(k), batch_size=256, backend="xla")
    out, featurize_seconds = [], 0.0
    for model_id, params in enumerate(checkpoints):
        start = time.perf_counter()
        checkpoint = featurize.prepare_checkpoint(task, params, config, model_id, setting.train)
        tr = featurize.featurize(task, checkpoint, setting.train, batch_size=256)
        tg = featurize.featurize(task, checkpoint, setting.targets, batch_size=256,
                                 split=featurize.TARGET_SPLIT, with_out_to_loss=False)
        featurize_seconds += time.perf_counter() - start
        spec = spectral(tr.features, tg.features, tr.out_to_loss, tr.outputs)
        spec.k = int(checkpoint.proj_dim)
        spec.p = int(checkpoint.layout.total)
        out.append(spec)
    arrays = {"m": m, "featurize_seconds": featurize_seconds}
    for i, spec in enumerate(out):
        for name in ("s", "a", "b", "q", "f", "row_sq", "target_sq"):
            arrays[f"{i}_{name}"] = getattr(spec, name).astype(np.float32 if name in ("a", "b") else np.float64)
        for name in ("k", "p", "gram_top", "gram_negative", "frob_sq", "seconds"):
            arrays[f"{i}_{name}"] = getattr(spec, name)
    np.savez(path, **arrays)
    return out, featurize_seconds


# --------------------------------------------------------------------------- LDS evaluation


class Evaluator:
    """Per-target LDS of TRAK scores at per-checkpoint (or per-checkpoint-and-target) λ."""

    def __init__(self, specs, masks, margins):
        self.specs = specs
        self.m = len(specs)
        self.q_bar = np.mean([sp.q for sp in specs], axis=0)
        weighted = masks.astype(np.float64) * self.q_bar[None, :]
        self.ma = [weighted @ sp.a for sp in specs]  # (S, r): masks @ (q̄ ⊙ a)
        self.margins = margins
        t = margins.shape[1]
        self.select = np.arange(0, t, 2)
        self.report = np.arange(1, t, 2)

    def predicted(self, lambdas):
        """masks @ S: (S, T). ``lambdas``: M floats, or M arrays of T (one λ per target)."""
        total = 0.0
        for ma, sp, lam in zip(self.ma, self.specs, lambdas, strict=True):
            lam = np.asarray(lam, np.float64)
            if lam.ndim == 0:
                total = total + (ma / (sp.s + lam)) @ sp.b.T
            else:
                total = total + ma @ (sp.b / (sp.s[None, :] + lam[:, None])).T
        return total / self.m

    def per_target(self, lambdas):
        """(T,) Spearman correlation of predicted and retrained margins over subsets."""
        return evaluation.spearman_columns(self.predicted(lambdas), self.margins)

    def per_target_coefficients(self, coefficients):
        """LDS per target of scores Σ_m (q̄ ⊙ a_m) C_m / M for (r, T) coefficient matrices C_m."""
        total = sum(ma @ c for ma, c in zip(self.ma, coefficients, strict=True)) / self.m
        return evaluation.spearman_columns(total, self.margins)

    def scores(self, lambdas):
        """The (N, T) score matrix (for the consistency check)."""
        total = 0.0
        for sp, lam in zip(self.specs, lambdas, strict=True):
            total = total + (sp.a / (sp.s + lam)) @ sp.b.T
        return total / self.m * self.q_bar[:, None]


def paired_ci(diff, n_boot=2000, seed=0):
    diff = diff[np.isfinite(diff)]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, (n_boot, diff.size))
    means = diff[idx].mean(1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


# --------------------------------------------------------------------------- candidate rules


def floor(sp):
    """Today's floor: 10× solve.spectrum's rank tolerance."""
    return 10.0 * sp.tolerance


def ridge_stats(sp, output_offset):
    """:class:`trakjax.regularization.RidgeStatistics` in ΦᵀΦ's eigenbasis (g = aᵀq, Φᵀ(f − f₀) =
    aᵀ(f − f₀) as coordinates on the v_j; the Gram there is diag(s))."""
    h = sp.q * (1.0 - sp.q)
    return regularization.RidgeStatistics(sp.n, sp.trace, float(sp.row_sq @ h), sp.a.T @ sp.q,
                                          sp.a.T @ (sp.f - output_offset))


def chosen_lambda(sp, output_offset):
    """The shipped rule, :func:`trakjax.regularization.auto_lambda`, on the eigenbasis Gram diag(s)."""
    return regularization.auto_lambda(np.diag(sp.s), ridge_stats(sp, output_offset), tolerance=sp.tolerance)


def implied_rho(sp, output_offset):
    start = regularization.START_FRACTION * sp.trace / sp.n
    return regularization.implied_ridge(np.diag(sp.s), ridge_stats(sp, output_offset), start)


def norm_form_lambda(sp, output_offset):
    """The ablation ρ̂ = ‖Φᵀq‖² / qᵀ(f − f₀) (equal in exact arithmetic, squares gradient noise)."""
    g = sp.a.T @ sp.q
    rho = float(g @ g) / float(sp.q @ (sp.f - output_offset))
    h_bar = float(sp.row_sq @ (sp.q * (1 - sp.q))) / sp.trace
    lam = rho / (regularization.SUBSET_FRACTION * h_bar)
    return max(lam, floor(sp)) if np.isfinite(lam) and lam > 0 else max(0.3 * sp.trace / sp.n, floor(sp))


def lambda_for_dof(s, target):
    """λ with Σ s/(s+λ) = target (bisection in log λ)."""
    lo, hi = 1e-14 * s[-1], 1e8 * s[-1]
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        if (s / (s + mid)).sum() > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def xi_per_target(sp, lam0, rho, alpha=regularization.SUBSET_FRACTION, subsets=100, seed=7,
                  span=np.arange(-1.0, 1.01, 0.25)):
    """Per-target λ by a retraining-free surrogate indicator ξ_j(λ) (derived here; see the md).

    ξ_j(λ) = Pearson correlation, over random half-subsets (drawn here, never retrained), between
    TRAK's predicted effect Σ_{i∈S} q_i φ_iᵀ(ΦᵀΦ + λI)⁻¹ψ_j and the one-step-Newton effect of the
    linearized model under the implied ridge, Σ_{i∈S} q_i φ_iᵀ(α Σ_l h_l φ_l φ_lᵀ + ρ̂ I)⁻¹ψ_j.
    λ_j maximizes ξ_j over lam0 · 10^span. Cost: a second (h-weighted) Gram and one solve per
    target on top of an eigendecomposition.
    """
    masks = evaluation.subset_masks(sp.n, subsets, 0.5, seed=seed).astype(np.float64)
    ma = (masks * sp.q[None, :]) @ sp.a                      # (S', r)
    hv = sp.a.T @ (sp.a * (sp.q * (1 - sp.q))[:, None])       # V ᵀ(Σ h φφᵀ)V in the eigenbasis
    newton = ma @ np.linalg.solve(alpha * hv + rho * np.eye(hv.shape[0]), sp.b.T)   # (S', T)
    newton = newton - newton.mean(0)
    best, best_value = np.full(sp.b.shape[0], lam0), np.full(sp.b.shape[0], -np.inf)
    for e in span:
        lam = lam0 * 10.0 ** e
        pred = (ma / (sp.s + lam)) @ sp.b.T
        pred = pred - pred.mean(0)
        xi = (pred * newton).sum(0) / np.sqrt((pred * pred).sum(0) * (newton * newton).sum(0))
        better = xi > best_value
        best[better], best_value[better] = lam, xi[better]
    return best


def gn_coefficients(sp, rho, alpha=regularization.SUBSET_FRACTION):
    """(r, T): the h-weighted kernel (α Σ h φφᵀ + ρ̂ I)⁻¹ in the eigenbasis (a diagnostic estimator)."""
    hv = sp.a.T @ (sp.a * (sp.q * (1 - sp.q))[:, None])
    return np.linalg.solve(alpha * hv + rho * np.eye(hv.shape[0]), sp.b.T)


CHOSEN = "implied ridge ρ̂/(αh̄) (chosen)"


def build_rules(setting):
    """name -> rule(Spectral) -> λ (a float, or (T,) for per-target rules)."""
    f0 = setting.output_offset
    rules = {}
    rules["auto 0.3·tr/N (today)"] = lambda sp: max(solve.AUTO_LAMBDA_FRACTION * sp.trace / sp.n, floor(sp))
    # The chosen rule, as shipped: λ = ρ̂ / (α h̄), ρ̂ = gᵀd/dᵀd.
    rules[CHOSEN] = lambda sp: chosen_lambda(sp, f0)
    # Its ablations: f₀ = 0; the gradient-norm form of ρ̂; no curvature correction (λ = ρ̂/α).
    rules["implied ridge, f₀ = 0"] = lambda sp: chosen_lambda(sp, 0.0)
    rules["ρ̂ = ‖g‖²/qᵀ(f−f₀) form"] = lambda sp: norm_form_lambda(sp, f0)
    rules["ρ̂/α (no h̄)"] = lambda sp: max(np.nan_to_num(implied_rho(sp, f0) / 0.5, nan=0.0), floor(sp))
    # q̄ family (c grows with the mean out-to-loss term), constant from the digits MLPs.
    rules["q̄: c = 3·√q̄"] = lambda sp: max(3.0 * np.sqrt(sp.q.mean()) * sp.trace / sp.n, floor(sp))
    rules["q̄: c = 0.2 + 10·q̄"] = lambda sp: max((0.2 + 10.0 * sp.q.mean()) * sp.trace / sp.n, floor(sp))
    # Effective degrees of freedom (need the spectrum).
    rules["df = 0.2·rank"] = lambda sp: max(lambda_for_dof(sp.s, 0.2 * sp.s.size), floor(sp))
    rules["df = N/8"] = lambda sp: max(lambda_for_dof(sp.s, sp.n / 8), floor(sp))
    # Spectrum summaries without an eigendecomposition (power iteration / Frobenius norm),
    # constants from the digits MLP 64-64-10.
    rules["0.002·λ_max"] = lambda sp: max(0.002 * sp.s[-1], floor(sp))
    rules["0.0035·‖G‖_F²/tr"] = lambda sp: max(0.0035 * sp.frob_sq / sp.trace, floor(sp))

    # Per target: the surrogate indicator ξ around the implied-ridge λ.
    def xi(sp):
        lam0 = chosen_lambda(sp, f0)
        rho = implied_rho(sp, f0)
        if not np.isfinite(rho):
            return lam0
        return np.maximum(xi_per_target(sp, lam0, rho), floor(sp))
    rules["ξ per target (surrogate)"] = xi
    return rules


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--proj-dims", nargs="+", default=["128", "512", "1024", "2048", "id"],
                        help="ints, or 'id' for the identity projection (k = P)")
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                        "out", "lambda_cache"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: lr-wine and logreg-bc, k = 128 and identity, 60 subsets")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also fit each one-constant family on the other settings")
    parser.add_argument("--no-xi", action="store_true", help="skip the per-target ξ rule (the slowest)")
    parser.add_argument("--no-check", action="store_true", help="skip the check against trakjax.attribute")
    parser.add_argument("--defaults", action="store_true",
                        help="instead: paired LDS of the defaults against projection='rademacher' (issue 20)")
    parser.add_argument("--seeds", type=int, default=2, help="--defaults: projection draws per variant")
    args = parser.parse_args(argv)
    if args.quick:
        args.settings = ["lr-wine", "logreg-bc"]
        args.proj_dims = ["128", "id"]
        args.subsets = 60
    args.proj_dims = [k if k == "id" else int(k) for k in args.proj_dims]
    return args


def consistency_check(setting, checkpoints, evaluator, specs, k):
    """Spectral scores against trakjax.attribute at the same absolute λ per checkpoint."""
    lam = float(np.median([solve.AUTO_LAMBDA_FRACTION * sp.trace / sp.n for sp in specs]))
    kwargs = dict(projection="identity") if k == "id" else dict(projection="normal", proj_dim=k)
    reference = trakjax.attribute(setting.task, checkpoints, setting.train, setting.targets,
                                  lambda_reg=lam, batch_size=256, backend="xla", **kwargs)
    mine = evaluator.scores([lam] * len(specs))
    return float(np.linalg.norm(mine - reference) / np.linalg.norm(mine))


def per_target_headroom(ev, specs, best_c):
    """Per-target oracle: each target's grid c picked on one half of the subsets and scored on the
    other (both ways), against the global best c scored the same way. An upper bound on what a
    per-target rule could gain."""
    s = ev.margins.shape[0]
    halves = (np.arange(0, s, 2), np.arange(1, s, 2))
    preds = {c: ev.predicted([max(c * sp.trace / sp.n, floor(sp)) for sp in specs]) for c in GRID}
    rho = {c: [evaluation.spearman_columns(preds[c][h], ev.margins[h]) for h in halves] for c in GRID}
    oracle, glob = [], []
    for fit, score in ((0, 1), (1, 0)):
        table = np.stack([rho[c][fit] for c in GRID])          # (grid, T)
        choice = np.argmax(np.nan_to_num(table, nan=-2), axis=0)
        scored = np.stack([rho[c][score] for c in GRID])
        oracle.append(scored[choice, np.arange(choice.size)])
        glob.append(rho[best_c][score])
    return np.mean(oracle, 0), np.mean(glob, 0)


def evaluate_setting(setting, checkpoints, masks, margins, k, cache, rules):
    specs, feat_seconds = featurized(setting, checkpoints, k, cache)
    ev = Evaluator(specs, masks, margins)
    grid = {c: ev.per_target([max(c * sp.trace / sp.n, floor(sp)) for sp in specs]) for c in GRID}
    best_c = max(GRID, key=lambda c: np.nanmean(grid[c][ev.select]))
    rule_lds, rule_c, rule_seconds = {}, {}, {}
    for name, rule in rules.items():
        start = time.perf_counter()
        lams = [rule(sp) for sp in specs]
        rule_seconds[name] = (time.perf_counter() - start) / len(specs)
        rule_lds[name] = ev.per_target(lams)
        rule_c[name] = float(np.median([np.median(np.asarray(x) / (sp.trace / sp.n))
                                        for x, sp in zip(lams, specs, strict=True)]))
    diagnostics = {}
    f0 = setting.output_offset
    rhos = [implied_rho(sp, f0) for sp in specs]
    if all(np.isfinite(rhos)):
        diagnostics["h-weighted kernel at ρ̂"] = ev.per_target_coefficients(
            [gn_coefficients(sp, rho) for sp, rho in zip(specs, rhos, strict=True)])
    oracle, glob = per_target_headroom(ev, specs, best_c)
    stats = dict(
        q_bar=float(ev.q_bar.mean()),
        rank=int(np.median([sp.s.size for sp in specs])),
        k=specs[0].k, p=specs[0].p, n=specs[0].n,
        eig_seconds=float(np.mean([sp.seconds for sp in specs])),
        featurize_seconds=feat_seconds,
    )
    return dict(k=k, ev=ev, specs=specs, grid=grid, best_c=best_c, rules=rule_lds, rule_c=rule_c,
                rule_seconds=rule_seconds, diagnostics=diagnostics, oracle=oracle, oracle_global=glob,
                stats=stats)


def fmt_diff(diff):
    mean, low, high = paired_ci(diff)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def print_setting(setting, rows, rule_names):
    first = rows[0]["stats"]
    print(f"\n### {setting.name}: {setting.description}\n")
    print(f"N = {first['n']}, P = {first['p']}, {len(rows[0]['specs'])} checkpoints, "
          f"q̄ = {first['q_bar']:.4f}, {rows[0]['ev'].report.size} report targets, "
          f"{rows[0]['ev'].margins.shape[0]} retrained subsets. Cells: LDS (paired difference to the best grid "
          "λ [95% bootstrap CI]; median c = λ/(tr/N) the rule chose).")
    print("\n| k | rank | best grid c | LDS best grid | " + " | ".join(rule_names) + " |")
    print("|---|---|---|---|" + "---|" * len(rule_names))
    for row in rows:
        rep = row["ev"].report
        best = row["grid"][row["best_c"]][rep]
        cells = []
        for name in rule_names:
            lds = row["rules"][name][rep]
            cells.append(f"{np.nanmean(lds):.3f} ({fmt_diff(lds - best)}; c {row['rule_c'][name]:.3g})")
        print(f"| {row['k']} ({row['stats']['k']}) | {row['stats']['rank']} | {row['best_c']:g} | "
              f"{np.nanmean(best):.3f} | " + " | ".join(cells) + " |")
    print("\nLDS (report targets) at every grid c:\n")
    print("| k | " + " | ".join(f"{c:g}" for c in GRID) + " |")
    print("|---|" + "---|" * len(GRID))
    for row in rows:
        rep = row["ev"].report
        print(f"| {row['k']} | " + " | ".join(f"{np.nanmean(row['grid'][c][rep]):.3f}" for c in GRID) + " |")
    print("\nDiagnostics (report targets): per-target oracle c (picked on half the subsets, scored on the "
          "other, both ways) vs the global best c scored the same way; the h-weighted kernel "
          "(α Σ h φφᵀ + ρ̂ I)⁻¹ in place of TRAK's (ΦᵀΦ + λI)⁻¹:")
    for row in rows:
        rep = row["ev"].report
        gain = row["oracle"][rep] - row["oracle_global"][rep]
        line = (f"  k={row['k']}: per-target oracle {np.nanmean(row['oracle'][rep]):.3f} vs global "
                f"{np.nanmean(row['oracle_global'][rep]):.3f} ({fmt_diff(gain)})")
        for name, lds in row["diagnostics"].items():
            best = row["grid"][row["best_c"]][rep]
            line += f"; {name} {np.nanmean(lds[rep]):.3f} ({fmt_diff(lds[rep] - best)})"
        print(line)


DEFAULT_VARIANTS = {"rademacher (former default)": dict(projection="rademacher"), "defaults (no setting)": {}}
"""``--defaults``: the library's defaults (``projection="auto"``, factor sizes from proj_dim, the
sparse second stage, λ and kernel auto) against the former default projection."""


def defaults_against_rademacher(args) -> None:
    """Paired LDS of the defaults against ``projection="rademacher"`` on each setting, through
    ``trakjax.attribute`` itself, ``--seeds`` projection draws per variant (the per-target
    Spearman averaged over the draws before pairing), report targets only."""
    lines = []
    for name in args.settings:
        setting = SETTINGS[name]
        checkpoints = train_checkpoints(setting)
        masks, margins, _ = ground_truth(setting, args.subsets, args.cache)
        report = np.arange(1, margins.shape[1], 2)
        example = jax.tree_util.tree_map(lambda a: a[0], setting.train)
        for k in [k for k in args.proj_dims if k != "id"]:
            per_target, resolved = {}, {}
            for variant, given in DEFAULT_VARIANTS.items():
                runs = []
                for seed in range(args.seeds):
                    config = Config.create(proj_dim=k, seed=seed, batch_size=256, backend="xla", **given)
                    scores = np.asarray(trakjax.attribute(setting.task, checkpoints, setting.train,
                                                          setting.targets, config), np.float64)
                    runs.append(evaluation.spearman_columns(masks.astype(np.float64) @ scores[:, report],
                                                            margins[:, report]))
                per_target[variant] = np.mean(runs, axis=0)
                result = featurize.resolve_auto_projection(setting.task, checkpoints[0], config, example=example).result
                resolved[variant] = result.projection + (
                    f" {result.factor_dims[0]}×{result.factor_dims[1]}" if result.projection == "factorized" else "")
            (a, b) = DEFAULT_VARIANTS
            mean, low, high = paired_ci(per_target[b] - per_target[a])
            lines.append(f"| {name} | {k} | {resolved[b]} | {np.nanmean(per_target[b]):.4f} | "
                         f"{np.nanmean(per_target[a]):.4f} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
            print(lines[-1], flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, jax "
          f"{jax.__version__}; {args.subsets} subsets; {args.seeds} projection seeds per variant; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| setting | k | defaults resolve to | LDS defaults | LDS rademacher | defaults − rademacher (paired, 95% CI) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    if args.defaults:
        defaults_against_rademacher(args)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"jax {jax.__version__} ({jax.default_backend()}); subsets {args.subsets}; grid c = "
          f"{GRID[0]:g} … {GRID[-1]:g} (×10^0.25)")
    summary, all_rows = [], {}
    wall = time.perf_counter()
    checked = args.no_check
    names = None
    for name in args.settings:
        setting = SETTINGS[name]
        rules = build_rules(setting)
        if args.no_xi:
            rules = {r: f for r, f in rules.items() if not r.startswith("ξ")}
        names = list(rules)
        start = time.perf_counter()
        checkpoints = train_checkpoints(setting)
        trained = time.perf_counter() - start
        masks, margins, truth_seconds = ground_truth(setting, args.subsets, args.cache)
        print(f"\n[{name}] checkpoints trained in {trained:.1f} s; ground truth {truth_seconds:.1f} s "
              "(when computed; cached)", flush=True)
        rows = []
        for k in args.proj_dims:
            start = time.perf_counter()
            row = evaluate_setting(setting, checkpoints, masks, margins, k, args.cache, rules)
            if not checked:
                row["consistency"] = consistency_check(setting, checkpoints, row["ev"], row["specs"], k)
                print(f"  consistency with trakjax.attribute (k={k}): relative error {row['consistency']:.1e}")
                checked = True
            rows.append(row)
            print(f"  k={k}: best c {row['best_c']:g}; featurize {row['stats']['featurize_seconds']:.1f} s, "
                  f"eigh {row['stats']['eig_seconds']:.2f} s per checkpoint; {time.perf_counter() - start:.1f} s",
                  flush=True)
        all_rows[name] = rows
        print_setting(setting, rows, names)
        for row in rows:
            rep = row["ev"].report
            best = row["grid"][row["best_c"]][rep]
            summary.append((name, row["k"], row["best_c"], float(np.nanmean(best)),
                            {r: float(np.nanmean(row["rules"][r][rep])) for r in names},
                            {r: paired_ci(row["rules"][r][rep] - best) for r in names}, row["stats"],
                            {r: row["rules"][r][rep] for r in names}))

    print("\n### Summary: LDS (report targets) and paired difference to the best grid λ\n")
    print("| setting | k | q̄ | best c | best grid | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for name, k, best_c, best, lds, diff, stats, _ in summary:
        print(f"| {name} | {k} | {stats['q_bar']:.3f} | {best_c:g} | {best:.3f} | "
              + " | ".join(f"{lds[r]:.3f} ({diff[r][0]:+.3f})" for r in names) + " |")
    chosen, today = CHOSEN, "auto 0.3·tr/N (today)"
    if chosen in names and today in names:
        print("\nThe chosen rule against today's auto, paired on the same report targets "
              "(mean [95% bootstrap CI]):\n")
        print("| setting | k | today's auto | chosen | chosen − today |")
        print("|---|---|---|---|---|")
        for name, k, _, _, _, _, _, rows_by_rule in summary:
            diff = rows_by_rule[chosen] - rows_by_rule[today]
            print(f"| {name} | {k} | {np.nanmean(rows_by_rule[today]):.3f} | "
                  f"{np.nanmean(rows_by_rule[chosen]):.3f} | {fmt_diff(diff)} |")
    print("\nWorst paired difference to the best grid per rule (rows within 0.01 of it):\n")
    for r in names:
        worst = min(summary, key=lambda row: row[5][r][0])
        within = sum(row[5][r][0] >= -0.01 for row in summary)
        print(f"  {r:34} worst {worst[5][r][0]:+.3f} ({worst[0]}, k={worst[1]}); within 0.01: "
              f"{within}/{len(summary)}")
    if args.leave_one_out:
        leave_one_out(all_rows)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")
    return all_rows


# --------------------------------------------------------------------------- leave one setting out

FAMILIES = {
    "c·tr/N": lambda sp, c, f0: c * sp.trace / sp.n,
    "c·√q̄·tr/N": lambda sp, c, f0: c * np.sqrt(sp.q.mean()) * sp.trace / sp.n,
    "c·q̄·tr/N": lambda sp, c, f0: c * sp.q.mean() * sp.trace / sp.n,
    "c·λ_max": lambda sp, c, f0: c * sp.s[-1],
    "c·‖G‖_F²/tr": lambda sp, c, f0: c * sp.frob_sq / sp.trace,
    "c·ρ̂/h̄": lambda sp, c, f0: c * chosen_lambda(sp, f0) * regularization.SUBSET_FRACTION,
}
FAMILY_GRID = tuple(float(c) for c in 10.0 ** np.arange(-4.0, 2.01, 0.25))
LOO_DIMS = (128, 2048, "id")


def leave_one_out(all_rows):
    """For each family: its constant chosen on the other settings' selection targets (best worst-case
    regret against each row's best grid λ), reported on the held-out setting's report targets;
    rows k = 128, 2048 and identity (:data:`LOO_DIMS`)."""
    print("\n### Leave one setting out: each family's constant fit on the other settings\n")
    cache = {}
    for fam, rule in FAMILIES.items():
        for name, rows in all_rows.items():
            f0 = SETTINGS[name].output_offset
            for row in rows:
                if row["k"] not in LOO_DIMS:
                    continue
                ev = row["ev"]
                best_sel = np.nanmean(row["grid"][row["best_c"]][ev.select])
                sel, rep = [], []
                for c in FAMILY_GRID:
                    lds = ev.per_target([max(rule(sp, c, f0), floor(sp)) for sp in row["specs"]])
                    sel.append(np.nanmean(lds[ev.select]) - best_sel)
                    rep.append(lds[ev.report])
                cache[fam, name, row["k"]] = (np.array(sel), rep)
    names = list(all_rows)
    print("| family | " + " | ".join(names) + " | worst |")
    print("|---|" + "---|" * (len(names) + 1))
    for fam in FAMILIES:
        cells, worst = [], 0.0
        for held in names:
            regrets = np.array([cache[fam, n, row["k"]][0] for n in names if n != held
                                for row in all_rows[n] if row["k"] in LOO_DIMS])
            c_index = int(np.argmax(regrets.min(axis=0)))
            diffs = []
            for row in all_rows[held]:
                if row["k"] not in LOO_DIMS:
                    continue
                rep = row["ev"].report
                best = row["grid"][row["best_c"]][rep]
                diffs.append(np.nanmean(cache[fam, held, row["k"]][1][c_index] - best))
            cells.append(f"c={FAMILY_GRID[c_index]:.3g}: worst {min(diffs):+.3f}")
            worst = min(worst, min(diffs))
        print(f"| {fam} | " + " | ".join(cells) + f" | {worst:+.3f} |")


if __name__ == "__main__":
    main()
