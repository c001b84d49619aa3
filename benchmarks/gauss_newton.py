"""TRAK's kernel against the curvature-weighted (Gauss–Newton) kernel: LDS, paired, with auto λ.

What it measures: for each lambda_rules setting (``benchmarks/lambda_rules.py``: the same data,
models, training recipes, checkpoints and retrained ground truth) and each projection (dense
Rademacher at k = 128, 512, 2048; the identity, k = P; factorized at k = 128, 512, 2048 with
factor_dims 64), the LDS on the report targets of

* ``trak``: TRAK's kernel (ΦᵀΦ + λI)⁻¹, λ by the implied-ridge rule λ = ρ̂/(α h̄);
* ``gauss-newton``: (ΦᵀHΦ + λI)⁻¹, H = diag(h_i) from the task's ``ridge_terms``, λ = ρ̂/α with
  ρ̂ from the h-weighted fit (what ``kernel="gauss-newton"``, ``lambda_reg="auto"`` runs:
  :func:`trakjax.pipeline.checkpoint_kernel`);
* variants of the Gauss–Newton kernel: ρ̂ from the unweighted fit (TRAK's ρ̂, so both Grams),
  and the ensemble with each checkpoint's scores multiplied by h̄_m = tr(ΦᵀHΦ)/tr(ΦᵀΦ) (which
  undoes the 1/h̄_m scale of each checkpoint's inverse) instead of the plain average;
* the best λ = c · tr(ΦᵀHΦ)/N of a log grid for the Gauss–Newton kernel (c picked on the
  selection targets; rows with k ≤ 2048), to check the rule against it.

Paired differences are per target (report targets), with 95% bootstrap intervals over targets.
Targets split as lds_digits.py (even: selection, odd: report). Ground truth: ``--subsets``
retrained half-subsets, cached by lambda_rules.ground_truth in ``--cache``.

Run:  python benchmarks/gauss_newton.py [--settings mlp64 logreg-bc ...] [--projections r128 id f2048]
      [--subsets 100] [--cache out/gn_cache]
Results: benchmarks/README.md ("gauss_newton.py").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lambda_rules as lr  # noqa: E402

import trakjax  # noqa: E402
from trakjax import evaluation, featurize, pipeline, regularization, solve  # noqa: E402

PROJECTIONS = {
    "r128": ("rademacher", 128), "r512": ("rademacher", 512), "r2048": ("rademacher", 2048),
    "id": ("identity", None),
    "f128": ("factorized", 128), "f512": ("factorized", 512), "f2048": ("factorized", 2048),
}
GRID = tuple(10.0 ** np.arange(-3.0, 2.01, 0.5))
"""λ / (tr(ΦᵀHΦ)/N) for the Gauss–Newton kernel's grid."""
VARIANTS = ("trak", "gauss-newton", "gn: unweighted ρ̂", "gn: h̄-scaled ensemble")


def checkpoint_parts(setting, config, params, model_id):
    """Per-checkpoint score matrices (N, T) float64 of every variant, grid material, statistics."""
    task = setting.task
    checkpoint = featurize.prepare_checkpoint(task, params, config, model_id, init_data=setting.train)
    tr = featurize.featurize(task, checkpoint, setting.train, batch_size=256)
    tg = featurize.featurize(task, checkpoint, setting.targets, batch_size=256, split=featurize.TARGET_SPLIT,
                             with_out_to_loss=False)
    phi, psi = np.asarray(tr.features, np.float32), np.asarray(tg.features, np.float64)
    n, k = phi.shape
    ridge = pipeline.RidgeInputs(tr.out_to_loss, tr.outputs - tr.output_offset, tr.curvature)
    common = dict(proj_dim=k, num_examples=n, num_params=checkpoint.layout.total, ridge=ridge,
                  num_features=checkpoint.record.get("k_fac"))
    parts, lambdas, seconds = {}, {}, {}
    for kernel in ("trak", "gauss-newton"):
        start = time.perf_counter()
        solved = pipeline.checkpoint_kernel(phi, config.result, kernel=kernel, **common)
        seconds[kernel] = time.perf_counter() - start
        parts[kernel] = (phi.astype(np.float64) @ solved.inverse) @ psi.T
        lambdas[kernel] = solved.lambda_reg
    h = np.maximum(np.asarray(tr.curvature, np.float64), 0.0)
    row_sq = (phi.astype(np.float64) ** 2).sum(1)
    h_bar = float(row_sq @ h / row_sq.sum())
    # ρ̂ from the unweighted fit (TRAK's statistics), λ = ρ̂/α on ΦᵀHΦ.
    gram, weighted = solve.gram(phi), solve.gram(phi, weights=h)
    stats = regularization.ridge_statistics(phi, ridge.out_to_loss, ridge.output_shift, curvature=h)
    rho = regularization.implied_ridge(gram, stats, regularization.START_FRACTION * stats.trace / n)
    lam = rho / regularization.SUBSET_FRACTION if np.isfinite(rho) else lambdas["gauss-newton"]
    unweighted = solve.solve(weighted, max(lam, 1e-12), kernel="gauss-newton", num_examples=n)
    parts["gn: unweighted ρ̂"] = (phi.astype(np.float64) @ unweighted.inverse) @ psi.T
    parts["gn: h̄-scaled ensemble"] = parts["gauss-newton"] * h_bar
    grid = None
    if k <= 2048:
        s, v = np.linalg.eigh(weighted)
        s = np.clip(s, 0.0, None)
        grid = (s, (phi.astype(np.float64) @ v).astype(np.float32), (psi @ v).astype(np.float32),
                float(np.trace(weighted)) / n)
    info = dict(h_bar=h_bar, lambda_trak=lambdas["trak"], lambda_gn=lambdas["gauss-newton"],
                lambda_gn_unweighted=float(lam), c_gn=lambdas["gauss-newton"] / (float(np.trace(weighted)) / n),
                seconds_trak=seconds["trak"], seconds_gn=seconds["gauss-newton"], k=k)
    return parts, np.asarray(tr.out_to_loss, np.float64), grid, info


def lds(predicted, margins):
    return evaluation.spearman_columns(predicted, margins)


def evaluate(setting, checkpoints, masks, margins, projection, k):
    kwargs = dict(projection=projection, batch_size=256, backend="xla")
    if k is not None:
        kwargs["proj_dim"] = k
    if projection == "factorized":
        kwargs["factor_dims"] = 64
    config = trakjax.Config.create(**kwargs)
    sums = {name: 0.0 for name in VARIANTS}
    q_sum, grids, infos = 0.0, [], []
    ids = range(len(checkpoints))
    if projection == "identity" and setting.convex and not setting.bootstrap:
        ids = [0]  # one optimum, R = I: every checkpoint is the same
    for m in ids:
        parts, q, grid, info = checkpoint_parts(setting, config, checkpoints[m], m)
        for name in VARIANTS:
            sums[name] = sums[name] + parts[name]
        q_sum = q_sum + q
        grids.append(grid)
        infos.append(info)
    count = len(infos)
    q_bar = q_sum / count
    weighted_masks = masks.astype(np.float64) * q_bar[None, :]
    per_target = {name: lds(weighted_masks @ (sums[name] / count), margins) for name in VARIANTS}
    t = margins.shape[1]
    select, report = np.arange(0, t, 2), np.arange(1, t, 2)
    best_c = None
    if all(g is not None for g in grids):
        projected = [(weighted_masks @ a, b, s, unit) for s, a, b, unit in grids]
        scores_c = {}
        for c in GRID:
            total = sum((ma / (s + c * unit)) @ b.T for ma, b, s, unit in projected) / count
            scores_c[c] = lds(total, margins)
        best_c = max(GRID, key=lambda c: np.nanmean(scores_c[c][select]))
        per_target["gn: best grid λ"] = scores_c[best_c]
    return dict(per_target=per_target, report=report, best_c=best_c, infos=infos, k=infos[0]["k"])


def paired(a, b):
    return lr.paired_ci(a - b)


def summarize(name, label, result):
    rep = result["report"]
    pt = result["per_target"]
    trak = pt["trak"][rep]
    row = {"setting": name, "projection": label, "k": result["k"], "best_c": result["best_c"],
           "c_gn_rule": float(np.median([i["c_gn"] for i in result["infos"]])),
           "h_bar": float(np.median([i["h_bar"] for i in result["infos"]])),
           "seconds_trak": float(np.mean([i["seconds_trak"] for i in result["infos"]])),
           "seconds_gn": float(np.mean([i["seconds_gn"] for i in result["infos"]])),
           "lds_all": {v: float(np.nanmean(pt[v])) for v in pt}}
    for variant, values in pt.items():
        row[variant] = float(np.nanmean(values[rep]))
        if variant != "trak":
            row[variant + " − trak"] = paired(values[rep], trak)
    if "gn: best grid λ" in pt:
        row["gn − gn grid"] = paired(pt["gauss-newton"][rep], pt["gn: best grid λ"][rep])
    return row


def fmt(ci):
    return f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]"


def print_row(row):
    grid = (f"{row['gn: best grid λ']:.3f} (c {row['best_c']:.3g}; rule c {row['c_gn_rule']:.3g}; "
            f"rule − grid {fmt(row['gn − gn grid'])})") if "gn: best grid λ" in row else "–"
    print(f"| {row['setting']} | {row['projection']} | {row['k']} | {row['trak']:.3f} | {row['gauss-newton']:.3f} | "
          f"{fmt(row['gauss-newton − trak'])} | {fmt(row['gn: unweighted ρ̂ − trak'])} | "
          f"{fmt(row['gn: h̄-scaled ensemble − trak'])} | {grid} | {row['h_bar']:.3g} |", flush=True)


def mislabel_detection(steps=200, proj_dim=2048, fraction=0.08, seed=0):
    """lds_digits.py's mislabel check (8% of labels flipped, 10 checkpoints of the MLP 64-64-10)
    with each kernel: AUC of ranking the flipped examples first by self-influence."""
    import lds_digits

    train, _ = lds_digits.digits(1000)
    rng = np.random.default_rng(seed)
    n = train[1].shape[0]
    flipped = rng.choice(n, int(round(fraction * n)), replace=False)
    noisy = train[1].copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, flipped.size)) % 10
    positive = np.zeros(n, bool)
    positive[flipped] = True
    model = lds_digits.MLP(64)
    checkpoints = lds_digits.train_checkpoints(model, (train[0], noisy), steps, seed=2000)
    task = trakjax.tasks.image_classification(model.apply)
    out = {}
    for kernel in ("trak", "gauss-newton"):
        start = time.perf_counter()
        values = trakjax.self_influence(task, checkpoints, (train[0], noisy), proj_dim=proj_dim, batch_size=256,
                                        kernel=kernel)
        out[kernel] = (lds_digits.auc(values, positive), time.perf_counter() - start)
        print(f"mislabel detection (k = {proj_dim}, auto λ), kernel {kernel}: AUC {out[kernel][0]:.3f} "
              f"({out[kernel][1]:.1f} s)", flush=True)
    return out


def default_targets(subsets=200, cache=None):
    """The issue's targets with no kernel or λ argument (the defaults): digits MLP 64-64-10 at
    k = 2048, ``projection="rademacher"`` and ``"factorized"`` (factor_dims 64, as
    benchmarks/factorized.py), and the breast-cancer logistic regression with the identity
    projection. LDS over all targets and over the report half, both kernels for comparison."""
    out = {}
    runs = (("mlp64", dict(projection="rademacher", proj_dim=2048)),
            ("mlp64", dict(projection="factorized", proj_dim=2048, factor_dims=64)),
            ("logreg-bc", dict(projection="identity")))
    for name, kwargs in runs:
        setting = lr.SETTINGS[name]
        masks, margins, _ = lr.ground_truth(setting, subsets, cache)
        checkpoints = lr.train_checkpoints(setting)
        for kernel in (None, "trak"):
            extra = {} if kernel is None else {"kernel": kernel}
            start = time.perf_counter()
            scores = trakjax.attribute(setting.task, checkpoints, setting.train, setting.targets, batch_size=256,
                                       backend="xla", **kwargs, **extra)
            seconds = time.perf_counter() - start
            per_target = lds(masks.astype(np.float64) @ np.asarray(scores, np.float64), margins)
            label = f"{name} {kwargs['projection']} {'default' if kernel is None else 'kernel=trak'}"
            out[label] = (float(np.nanmean(per_target)), float(np.nanmean(per_target[1::2])), seconds)
            print(f"{label}: LDS {out[label][0]:.4f} (all {per_target.size} targets), {out[label][1]:.4f} "
                  f"(report half); attribute {seconds:.1f} s", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=[s for s in lr.SETTINGS], choices=list(lr.SETTINGS))
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=list(PROJECTIONS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                        "out", "gn_cache"))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--mislabel", action="store_true", help="only the self-influence mislabel check")
    parser.add_argument("--targets", action="store_true",
                        help="only the issue's targets: trakjax.attribute with its defaults")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    if args.mislabel:
        return mislabel_detection()
    if args.targets:
        return default_targets(args.subsets, args.cache)
    os.makedirs(args.cache, exist_ok=True)
    print(f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), "
          f"{args.subsets} retrained half-subsets per setting")
    print("\n| setting | projection | k | LDS trak | LDS gauss-newton | GN − TRAK | GN (unweighted ρ̂) − TRAK | "
          "GN (h̄-scaled ensemble) − TRAK | GN best grid λ | median h̄ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.settings:
        setting = lr.SETTINGS[name]
        masks, margins, _ = lr.ground_truth(setting, args.subsets, args.cache)
        checkpoints = lr.train_checkpoints(setting)
        for label in args.projections:
            projection, k = PROJECTIONS[label]
            if projection == "factorized" and name == "cnn":
                continue  # the patch-matmul convolution is not a layer the factorized family reaches
            start = time.perf_counter()
            row = summarize(name, label, evaluate(setting, checkpoints, masks, margins, projection, k))
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print_row(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
