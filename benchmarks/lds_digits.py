"""Attribution quality on digits: LDS of trakjax and of the reference (traker 0.3.2, CPU torch).

One run, one set of checkpoints, one ground truth:

* data: sklearn's digits, the first ``--n-train`` images (default 1000) for training, images
  1000..1796 (797) as targets. Targets are split in two halves: the best grid λ is picked on the
  even-indexed targets and every LDS in the tables is reported on the odd-indexed ones (with a 95%
  bootstrap interval over those targets), so grid and ``"auto"`` are compared fairly.
* model: an MLP 64 → ``--hidden`` (ReLU) → 10, trained full-batch with Adam (lr 1e-2) for
  ``--steps`` steps; 10 checkpoints from 10 seeds.
* ground truth: ``--subsets`` random half-subsets (:func:`trakjax.evaluation.subset_masks`), one
  model retrained per subset with the same recipe (:func:`trakjax.evaluation.retrain_margins`),
  target margins recorded.
* trakjax: ``projection="normal"`` (the reference's CPU projection) at each k; ``lambda_reg=0``
  (raises where ΦᵀΦ is singular), a grid of λ = c · mean_i‖φ_i‖² (per checkpoint), and
  ``"auto"``. The grid is evaluated from one float64 eigendecomposition per checkpoint
  (mathematically the same scores as :func:`trakjax.attribute`; the run checks this at the auto
  λ), λ = 0 and auto by :func:`trakjax.attribute` itself.
* reference: ``TRAKer`` on CPU with its defaults (BasicProjector, normal entries) and
  ``use_half_precision`` as its default (True, float16) if that runs, else False (printed); the
  same grid, c times the median over checkpoints of its own mean‖φ_i‖² (one absolute λ for all
  checkpoints, the reference's meaning); its features are finalized once per λ.
* also: the ensemble formula (paper average vs. the reference's 1/mean|A⁻¹| rescaling), other
  retraining-free λ rules, soft-thresholding, the brittleness check, and mislabel detection by
  self-influence (8% of the training labels flipped).

Wall times are for one full pipeline (featurize train and targets, solve, score) per library and k,
on this machine's CPU; for trakjax the first call (with tracing and compiling) and a second one.

Run:  python benchmarks/lds_digits.py [--subsets 200] [--proj-dims 128 512 1024 2048]
      [--skip-reference] [--skip-extras] [--n-train 1000] [--hidden 64] [--steps 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's progress bars

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import trakjax
from trakjax import Config, evaluation, featurize, scores, solve, tasks

GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
"""Grid of λ / mean_i‖φ_i‖² (trakjax: per checkpoint; reference: median over checkpoints)."""
N_CHECKPOINTS = 10
LR = 1e-2
TARGET_START = 1000


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--proj-dims", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-extras", action="store_true",
                        help="skip brittleness and mislabel detection")
    return parser.parse_args()


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(self.hidden, name="Dense_0")(x))
        return nn.Dense(10, name="Dense_1")(hidden)


def digits(n_train):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return (x[:n_train], y[:n_train]), (x[TARGET_START:], y[TARGET_START:])


def train_checkpoints(model, train, steps, seed=1000):
    optimizer = optax.adam(LR)

    @jax.jit
    def fit(key):
        params = model.init(key, jnp.zeros((1, 64), jnp.float32))
        state = optimizer.init(params)

        def step(carry, _):
            p, s = carry
            grads = jax.grad(
                lambda q: optax.softmax_cross_entropy_with_integer_labels(model.apply(q, train[0]), train[1]).mean()
            )(p)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, state), None, length=steps)
        return params

    return [fit(jax.random.fold_in(jax.random.key(seed), m)) for m in range(N_CHECKPOINTS)]


# --------------------------------------------------------------------------- LDS helpers


class Halves:
    """LDS on the selection half (even targets) and the report half (odd targets)."""

    def __init__(self, masks, margins):
        self.masks = masks
        self.margins = margins
        t = margins.shape[1]
        self.select = np.arange(0, t, 2)
        self.report = np.arange(1, t, 2)

    def select_lds(self, s):
        return evaluation.lds(s[:, self.select], self.masks, self.margins[:, self.select], n_bootstrap=10).mean

    def report_lds(self, s):
        return evaluation.lds(s[:, self.report], self.masks, self.margins[:, self.report], n_bootstrap=2000)


def fmt(result):
    if result is None:
        return "—"
    if isinstance(result, str):
        return result
    return f"{result.mean:.3f} [{result.ci_low:.3f}, {result.ci_high:.3f}]"


# --------------------------------------------------------------------------- trakjax


class Eigen:
    """One checkpoint's features in the eigenbasis of ΦᵀΦ (float64)."""

    def __init__(self, phi, psi, q, outputs):
        phi = phi.astype(np.float64)
        s, v = np.linalg.eigh(phi.T @ phi)
        self.s = np.clip(s, 0.0, None)
        self.v = v
        self.pv = phi @ v
        self.tv = psi.astype(np.float64) @ v
        self.q = q.astype(np.float64)
        self.outputs = outputs.astype(np.float64)
        self.n = phi.shape[0]
        self.mean_sq_norm = float(self.s.sum() / self.n)  # trace(ΦᵀΦ)/N = mean_i ‖φ_i‖²


def trakjax_eigen(task, checkpoints, train, targets, k):
    config = Config.create(projection="normal", proj_dim=k, batch_size=256, backend="xla")
    out = []
    for model_id, params in enumerate(checkpoints):
        checkpoint = featurize.prepare_checkpoint(task, params, config, model_id, train)
        tr = featurize.featurize(task, checkpoint, train, batch_size=256)
        tg = featurize.featurize(task, checkpoint, targets, batch_size=256,
                                 split=featurize.TARGET_SPLIT, with_out_to_loss=False)
        out.append(Eigen(tr.features, tg.features, tr.out_to_loss, tr.outputs))
    return out


def spectral_scores(eigen, lambdas, compat=False):
    """S = ((1/M) Σ_m Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ Ψ_mᵀ) ⊙ q̄, optionally with each A_m⁻¹ / mean|A_m⁻¹|."""
    total = 0.0
    for e, lam in zip(eigen, lambdas, strict=True):
        w = 1.0 / (e.s + lam)
        part = (e.pv * w) @ e.tv.T
        if compat:
            part /= np.abs((e.v * w) @ e.v.T).mean()
        total = total + part
    q_bar = np.mean([e.q for e in eigen], axis=0)
    return total / len(eigen) * q_bar[:, None]


def lambda_for_df(s, target):
    """λ with Σ s/(s+λ) = target (bisection in log λ)."""
    lo, hi = 1e-14 * s[-1], 1e8 * s[-1]
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        if (s / (s + mid)).sum() > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def lambda_by_cross_validation(e, leave_one_out, grid=np.logspace(-8, 2, 101)):
    """λ minimizing GCV (or exact leave-one-out) error of the kernel regression of the train outputs on Φ."""
    positive = e.s > 1e-10 * e.s[-1]
    u = e.pv[:, positive] / np.sqrt(e.s[positive])
    sp = e.s[positive]
    y = e.outputs
    coef = u.T @ y
    outside = y - u @ coef
    best, best_value = None, np.inf
    for c in grid:
        lam = c * e.s[-1]
        shrink = sp / (sp + lam)
        residual = outside + u @ (coef * (1 - shrink))
        if leave_one_out:
            value = np.mean((residual / (1 - (u**2) @ shrink)) ** 2)
        else:
            value = e.n * np.sum(residual**2) / (e.n - shrink.sum()) ** 2
        if value < best_value:
            best, best_value = lam, value
    return best


# --------------------------------------------------------------------------- reference


def torch_mlp(params, hidden):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    p = params["params"]
    with torch.no_grad():
        for layer, name in ((model[0], "Dense_0"), (model[2], "Dense_1")):
            layer.weight.copy_(torch.tensor(np.asarray(p[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(p[name]["bias"])))
    return model


class Reference:
    """traker 0.3.2 on CPU: featurize once per k, then finalize and score once per λ."""

    def __init__(self, checkpoints, train, targets, k, hidden, half, save_dir):
        import torch
        from trak import TRAKer

        self.torch = torch
        self.checkpoints = checkpoints
        self.hidden = hidden
        self.states = [torch_mlp(p, hidden).state_dict() for p in checkpoints]
        n = train[0].shape[0]
        self.targets = [torch.tensor(targets[0]), torch.tensor(targets[1]).long()]
        self.n_targets = targets[0].shape[0]
        start = time.perf_counter()
        self.traker = TRAKer(
            model=torch_mlp(checkpoints[0], hidden), task="image_classification", train_set_size=n,
            save_dir=save_dir, device="cpu", proj_dim=k, use_half_precision=half,
            logging_level=logging.ERROR,
        )
        x, y = torch.tensor(train[0]), torch.tensor(train[1]).long()
        for model_id, state in enumerate(self.states):
            self.traker.load_checkpoint(state, model_id=model_id)
            for b in range(0, n, 250):
                self.traker.featurize(batch=[x[b : b + 250], y[b : b + 250]], num_samples=min(250, n - b))
        self.featurize_seconds = time.perf_counter() - start
        norms = []
        for model_id in range(len(checkpoints)):
            self.traker.saver.load_current_store(model_id)
            g = np.asarray(self.traker.saver.current_store["grads"], np.float64)
            norms.append(float((g**2).sum(axis=1).mean()))
        self.mean_sq_norm = float(np.median(norms))
        self.runs = 0

    def scores(self, lam):
        """Scores at absolute λ and the seconds finalize + score took."""
        start = time.perf_counter()
        self.traker.score_computer.lambda_reg = float(lam)
        for model_id in self.traker.saver.model_ids:
            self.traker.saver.model_ids[model_id]["is_finalized"] = 0
        self.traker.finalize_features()
        name = f"run{self.runs}"
        self.runs += 1
        for model_id, state in enumerate(self.states):
            self.traker.start_scoring_checkpoint(name, state, model_id, self.n_targets)
            self.traker.score(batch=self.targets, num_samples=self.n_targets)
        out = np.array(self.traker.finalize_scores(name), np.float64)
        return out, time.perf_counter() - start


def reference_half_precision_runs(checkpoints, train, targets, hidden, tmp):
    """The reference's default use_half_precision=True if it runs on this CPU, else False."""
    try:
        ref = Reference(checkpoints, (train[0][:64], train[1][:64]), (targets[0][:8], targets[1][:8]),
                        128, hidden, True, os.path.join(tmp, "probe"))
        s, _ = ref.scores(0.0)
        return bool(np.isfinite(s).all()), ""
    except Exception as err:  # noqa: BLE001 - report why the default fails, then use float32
        return False, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


# --------------------------------------------------------------------------- extras


def auc(values, positive):
    """Area under the ROC curve of ranking ``positive`` examples first by ``values``."""
    ranks = evaluation.rank_average(np.asarray(values, np.float64))
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mislabel_detection(model, train, steps, proj_dim, fraction=0.08, seed=0):
    rng = np.random.default_rng(seed)
    n = train[1].shape[0]
    flipped = rng.choice(n, int(round(fraction * n)), replace=False)
    noisy = train[1].copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, flipped.size)) % 10
    positive = np.zeros(n, bool)
    positive[flipped] = True
    noisy_train = (train[0], noisy)
    checkpoints = train_checkpoints(model, noisy_train, steps, seed=2000)
    task = tasks.image_classification(model.apply)
    start = time.perf_counter()
    values = trakjax.self_influence(task, checkpoints, noisy_train, proj_dim=proj_dim, batch_size=256)
    seconds = time.perf_counter() - start
    logits = [np.asarray(model.apply(p, train[0]), np.float64) for p in checkpoints]
    q_bar = np.mean([1 - np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(n), noisy] for z in logits], 0)
    train_accuracy = np.mean([(z.argmax(1) == noisy).mean() for z in logits])
    fit_flipped = np.mean([(z.argmax(1)[flipped] == noisy[flipped]).mean() for z in logits])
    return dict(
        flipped=flipped.size, auc_self_influence=auc(values, positive), auc_loss=auc(q_bar, positive),
        auc_leverage=auc(values / np.maximum(q_bar, 1e-30), positive), seconds=seconds,
        train_accuracy=train_accuracy, fit_flipped=fit_flipped,
    )


# --------------------------------------------------------------------------- main


def main():
    args = parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; "
          f"python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()})")
    model = MLP(args.hidden)
    train, targets = digits(args.n_train)
    n, t = train[0].shape[0], targets[0].shape[0]
    task = tasks.image_classification(model.apply)
    start = time.perf_counter()
    checkpoints = train_checkpoints(model, train, args.steps)
    accuracy = np.mean([(np.asarray(model.apply(p, targets[0])).argmax(1) == targets[1]).mean() for p in checkpoints])
    print(f"{N_CHECKPOINTS} checkpoints: MLP 64-{args.hidden}-10, N={n}, {args.steps} full-batch Adam steps, "
          f"target accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f} s)")
    masks = evaluation.subset_masks(n, args.subsets, 0.5, seed=0)
    start = time.perf_counter()
    margins = evaluation.retrain_margins(
        lambda key: model.init(key, jnp.zeros((1, 64), jnp.float32)), model.apply, optax.adam(LR),
        args.steps, train, targets, masks, seed=1, chunk_size=50,
    )
    print(f"ground truth: {args.subsets} half-subsets retrained in {time.perf_counter() - start:.1f} s; "
          f"{t} targets ({t // 2} pick the grid λ, {t - t // 2} report)")
    halves = Halves(masks, margins)

    half = None
    if not args.skip_reference:
        tmp = tempfile.mkdtemp(prefix="trak_lds_")
        half, why = reference_half_precision_runs(checkpoints, train, targets, args.hidden, tmp)
        print(f"reference: use_half_precision={half}" + (f" (its default True fails on CPU: {why})" if why else
                                                         " (its default)"))

    rows, extras = [], {}
    for k in args.proj_dims:
        row = dict(k=k)
        start = time.perf_counter()
        auto_scores, details = trakjax.attribute(
            task, checkpoints, train, targets, proj_dim=k, projection="normal", lambda_reg="auto",
            batch_size=256, backend="xla", return_details=True,
        )
        row["tj_seconds"] = time.perf_counter() - start
        start = time.perf_counter()  # again, compiled: the cost of a run without tracing/compiling
        trakjax.attribute(task, checkpoints, train, targets, proj_dim=k, projection="normal", lambda_reg="auto",
                          batch_size=256, backend="xla")
        row["tj_warm_seconds"] = time.perf_counter() - start
        row["tj_auto"] = halves.report_lds(auto_scores)
        try:
            zero = trakjax.attribute(task, checkpoints, train, targets, proj_dim=k, projection="normal",
                                     lambda_reg=0.0, batch_size=256, backend="xla")
            row["tj_zero"] = halves.report_lds(zero)
        except ValueError as err:
            row["tj_zero"] = "raises" if "singular" in str(err) else f"error: {err}"
        eigen = trakjax_eigen(task, checkpoints, train, targets, k)
        ranks = [int((e.s > solve.rounding_noise() * e.s[-1]).sum()) for e in eigen]  # eigenvalues above the noise
        row["rank"] = (min(ranks), max(ranks))
        auto_lams = [d.lambda_reg for d in details]
        check = spectral_scores(eigen, auto_lams)
        row["consistency"] = float(np.linalg.norm(check - auto_scores) / np.linalg.norm(check))
        grid_scores = {c: spectral_scores(eigen, [c * e.mean_sq_norm for e in eigen]) for c in GRID}
        best_c = max(GRID, key=lambda c: halves.select_lds(grid_scores[c]))
        row["tj_grid"] = halves.report_lds(grid_scores[best_c])
        row["tj_best_c"] = best_c
        row["tj_grid_all"] = {c: halves.report_lds(s).mean for c, s in grid_scores.items()}
        # Ensemble formula: the reference's 1/mean|A⁻¹| rescaling against the paper's average.
        row["compat_auto"] = halves.report_lds(spectral_scores(eigen, auto_lams, compat=True))
        compat_grid = {c: spectral_scores(eigen, [c * e.mean_sq_norm for e in eigen], compat=True) for c in GRID}
        best_compat_c = max(GRID, key=lambda c: halves.select_lds(compat_grid[c]))
        row["compat_grid"] = (halves.report_lds(compat_grid[best_compat_c]), best_compat_c)
        # Other retraining-free λ rules.
        rules = {
            "1e-2·trace/k (old default)": [solve.DEFAULT_RELATIVE_LAMBDA * e.s.mean() for e in eigen],
            "df(λ) = N/8": [lambda_for_df(e.s, e.n / 8) for e in eigen],
            "GCV, outputs on Φ": [lambda_by_cross_validation(e, False) for e in eigen],
            "leave-one-out, outputs on Φ": [lambda_by_cross_validation(e, True) for e in eigen],
        }
        for c in (0.1, 0.2, solve.AUTO_LAMBDA_FRACTION, 0.5, 1.0):
            name = f"{c:g}·trace/N" + (" (auto)" if c == solve.AUTO_LAMBDA_FRACTION else "")
            rules[name] = auto_lams if c == solve.AUTO_LAMBDA_FRACTION else [c * e.mean_sq_norm for e in eigen]
        row["rules"] = {name: halves.report_lds(spectral_scores(eigen, lams)).mean for name, lams in rules.items()}
        row["soft"] = {
            keep: halves.report_lds(scores.soft_threshold(auto_scores, scores.sparsity_threshold(auto_scores, keep))).mean
            for keep in (1.0, 0.5, 0.2, 0.1, 0.05)
        }
        if not args.skip_reference:
            ref = Reference(checkpoints, train, targets, k, args.hidden, half, os.path.join(tmp, f"k{k}"))
            zero, seconds = ref.scores(0.0)
            row["ref_seconds"] = ref.featurize_seconds + seconds
            row["ref_zero"] = halves.report_lds(zero) if np.isfinite(zero).all() else "non-finite"
            ref_grid = {}
            for c in GRID:
                s, _ = ref.scores(c * ref.mean_sq_norm)
                ref_grid[c] = s
            finite = [c for c in GRID if np.isfinite(ref_grid[c]).all()]
            ref_best = max(finite, key=lambda c: halves.select_lds(ref_grid[c]))
            row["ref_grid"] = halves.report_lds(ref_grid[ref_best])
            row["ref_best_c"] = ref_best
            row["ref_grid_all"] = {c: (halves.report_lds(s).mean if np.isfinite(s).all() else float("nan"))
                                   for c, s in ref_grid.items()}
        rows.append(row)
        print(f"  k={k} done: rank {row['rank']}, trakjax auto {fmt(row['tj_auto'])}", flush=True)
        if k == max(args.proj_dims):
            extras["auto_scores"] = auto_scores

    print()
    print(f"LDS on {t - t // 2} report targets, mean [95% bootstrap interval]; grid λ = c·mean‖φ‖² picked on "
          f"the other {t // 2} targets")
    head = f"{'k':>5} | {'library':8} | {'λ = 0':24} | {'best grid λ (c)':32} | {'auto':24} | wall s (warm)"
    print(head)
    print("-" * len(head))
    for row in rows:
        rank = f"{row['rank'][0]}-{row['rank'][1]}" if row["rank"][0] != row["rank"][1] else f"{row['rank'][0]}"
        zero = row["tj_zero"] if isinstance(row["tj_zero"], str) else fmt(row["tj_zero"])
        if zero == "raises":
            zero = f"raises (rank {rank} < k)"
        grid = "{} (c={:g})".format(fmt(row["tj_grid"]), row["tj_best_c"])
        print(f"{row['k']:>5} | {'trakjax':8} | {zero:24} | {grid:32} | "
              f"{fmt(row['tj_auto']):24} | {row['tj_seconds']:.1f} ({row['tj_warm_seconds']:.1f})")
        if "ref_zero" in row:
            zero = fmt(row["ref_zero"]) + ("" if row["rank"][1] >= row["k"] else " *")
            grid = "{} (c={:g})".format(fmt(row["ref_grid"]), row["ref_best_c"])
            print(f"{row['k']:>5} | {'traker':8} | {zero:24} | {grid:32} | "
                  f"{'—':24} | {row['ref_seconds']:.1f}")
    if not args.skip_reference:
        print("* ΦᵀΦ is singular here (rank < k): λ = 0 is ill-posed; the reference returns scores anyway.")
    print()
    print("LDS (report targets) at every grid c = λ/mean‖φ‖²:")
    print(f"{'k':>5} | {'library':8} | " + " | ".join(f"{c:>6g}" for c in GRID))
    for row in rows:
        print(f"{row['k']:>5} | {'trakjax':8} | " + " | ".join(f"{row['tj_grid_all'][c]:6.3f}" for c in GRID))
        if "ref_grid_all" in row:
            print(f"{row['k']:>5} | {'traker':8} | " + " | ".join(f"{row['ref_grid_all'][c]:6.3f}" for c in GRID))
    print()
    print("Ensemble formula (trakjax features, report targets): paper average vs. reference rescaling 1/mean|A⁻¹|")
    for row in rows:
        compat_grid, compat_c = row["compat_grid"]
        print(f"  k={row['k']:>4}: auto λ: paper {fmt(row['tj_auto'])}, rescaled {fmt(row['compat_auto'])}; "
              f"best grid: paper {row['tj_grid'].mean:.3f} (c={row['tj_best_c']:g}), rescaled "
              f"{compat_grid.mean:.3f} (c={compat_c:g})")
    print()
    names = list(rows[0]["rules"])
    print("Retraining-free λ rules (per checkpoint), LDS on report targets:")
    print(f"{'rule':30} | " + " | ".join(f"k={row['k']:<5}" for row in rows))
    for name in names:
        print(f"{name:30} | " + " | ".join(f"{row['rules'][name]:7.3f}" for row in rows))
    print()
    print("Soft-thresholding of the auto scores (τ_j keeps a fraction of each target's scores), LDS on report targets:")
    keeps = list(rows[0]["soft"])
    print(f"{'kept':>6} | " + " | ".join(f"k={row['k']:<5}" for row in rows))
    for keep in keeps:
        print(f"{keep:6g} | " + " | ".join(f"{row['soft'][keep]:7.3f}" for row in rows))
    print()
    print("Consistency: spectral grid scores vs. trakjax.attribute at the auto λ, relative error: "
          + ", ".join(f"k={row['k']}: {row['consistency']:.1e}" for row in rows))
    print()
    print("Targets:")
    for row in rows:
        checks = []
        if "ref_zero" in row and not isinstance(row["tj_zero"], str) and not isinstance(row["ref_zero"], str):
            checks.append(f"λ=0 trakjax {row['tj_zero'].mean:.3f} vs traker {row['ref_zero'].mean:.3f}")
        if "ref_grid" in row:
            checks.append(f"best grid trakjax {row['tj_grid'].mean:.3f} vs traker {row['ref_grid'].mean:.3f}")
        auto = row["tj_auto"]
        grid = row["tj_grid"]
        checks.append(f"auto {auto.mean:.3f} {'>=' if auto.mean >= 0.55 else '<'} 0.55")
        inside = grid.ci_low <= auto.mean <= grid.ci_high or auto.mean >= grid.mean
        checks.append(f"auto {'within' if inside else 'OUTSIDE'} best grid's interval "
                      f"[{grid.ci_low:.3f}, {grid.ci_high:.3f}]")
        print(f"  k={row['k']:>4}: " + "; ".join(checks))

    if args.skip_extras:
        return
    print()
    k_top = max(args.proj_dims)
    evaluated = halves.report[:40]
    start = time.perf_counter()
    result = evaluation.brittleness(
        extras["auto_scores"][:, evaluated],
        lambda key: model.init(key, jnp.zeros((1, 64), jnp.float32)), model.apply, optax.adam(LR), args.steps,
        train, (targets[0][evaluated], targets[1][evaluated]), [10, 20, 40], seed=1,
    )
    print(f"Brittleness (k={k_top}, auto λ; {result.evaluated.size} of {evaluated.size} report targets "
          f"predicted correctly by the full-data model; {time.perf_counter() - start:.1f} s):")
    for kk, top, rand in zip(result.k_values, result.top_flip_rate, result.random_flip_rate, strict=True):
        print(f"  remove {kk:>3}: flips {top:.2f} after removing the top-scored examples vs "
              f"{rand:.2f} after removing random ones")
    print()
    m = mislabel_detection(model, train, args.steps, proj_dim=k_top)
    print(f"Mislabel detection ({m['flipped']} of {n} labels flipped, 10 checkpoints trained on them: train accuracy "
          f"{m['train_accuracy']:.3f}, flipped labels fit {m['fit_flipped']:.2f}; k={k_top}, auto λ, "
          f"{m['seconds']:.1f} s): AUC self-influence {m['auc_self_influence']:.3f}, "
          f"loss 1−p alone {m['auc_loss']:.3f}, leverage φᵀA⁻¹φ alone {m['auc_leverage']:.3f}")


if __name__ == "__main__":
    main()
