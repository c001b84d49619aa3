"""The factorized projection family: speed, memory and attribution quality against the dense one.

Modes (each prints a table with the machine; run one, or ``all``):

* ``gpt2``: a GPT-2-small-shaped Flax NNX transformer (12 layers, d = 768, 12 heads, vocab
  50257, 128 positions, tied embeddings, random init), ``tasks.language_modeling``. Tokens/s of
  factorized featurization (factor_dims 64, proj_dim 2048, float32) against a plain optax
  training step (``value_and_grad`` of the mean token cross-entropy + AdamW update) on the same
  batch, and each one's peak memory, each in its own process (host RSS on CPU; device
  ``peak_bytes_in_use`` with ``--gpu``). Target: ≥ 1× the training step's tokens/s with peak
  memory at most the training step's.
* ``cnn``: the 373k-parameter CNN of featurize_cpu.py (3×3 convolutions of 64/128/256 channels):
  factorized against dense examples/s at k = 2048 (the convolution kernels factorized through
  their patches, which are never built).
* ``mlp50m``: the 50M-parameter MLP of featurize_memory.py (4096 → 4096 → 4096 → 4096) at
  k = 4096: examples/s and peak RSS of factorized featurization (target ≥ 100 ex/s, ≤ 6 GiB;
  dense: 0.036 ex/s, benchmarks/README.md).
* ``lds``: attribution quality on digits, an MLP 64-64-10 and a small CNN, 10 checkpoints each,
  ``--subsets`` half-subset retrains: factorized at proj_dim 2048 against dense at 2048, paired
  per target on the report targets (the selection/report split of lds_digits.py), with a
  bootstrap interval of the mean difference. Target: within 0.01 LDS.

* ``second_stage``: factorized LDS with the sparse second stage (s = 1, 2, 4) paired against the
  dense second stage at k = 128, 512, 2048 on the same digits models (target: at most 0.005 lost).
* ``defaults``: paired LDS of the defaults (no projection setting: ``projection="auto"``, factor
  sizes from proj_dim, the sparse second stage) against the former defaults (dense Rademacher;
  factorized with factor_dims 64 and the dense second stage), and of the sparse against the dense
  second stage, at ``--defaults-dims`` (512, 2048) on the digits MLP, the 1,898-parameter conv CNN
  and the LM setting of ``trakjax demo --task lm`` (``--lm-subsets`` retrains, ``--lm-targets``);
  ``--factor-sweep`` adds factor sizes, ``--scores-out`` saves every score matrix,
  ``--defaults-variants`` picks variants and ``--seeds n`` scores each with n projection draws
  (per-target LDS averaged over the draws before pairing, so that the draw's own noise, ≈ 0.01 on
  the LM, averages out) (target: the defaults within 0.005 LDS of the former ones, paired).
* ``flops``: XLA's compiled cost analysis (FLOPs, bytes accessed) of one factorized featurization
  step against one AdamW training step of the same batch, for the digits MLP, the 373k CNN and
  the issue's two GPT-2 shapes (a while loop's body is counted once: the table counts the loops).
* ``table``: the issue's table rows measurable without the PyTorch peers: tokens/s of a JAX AdamW
  training step, of ``featurize_batch`` and the marginal tokens/s of the whole ``attribute`` call
  between two training-set sizes, at 2 layers (d 256, vocab 8192, 64 tokens, 32 → 128 sequences)
  and 4 layers (d 768, vocab 50257, 128 tokens, 16 → 64 sequences), batch 8, with peak memory.

Run:  python benchmarks/factorized.py [gpt2|cnn|mlp50m|lds|second_stage|defaults|flops|table|all] [--gpu]
      [--quick] [--second-stage dense|sparse] [--batch 8] [--layers 12]

``gpt2 --quick`` is the 2-layer shape (d 256, vocab 8192, 64 positions) for a fast check.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
from bench_common import peak_rss_gib, timed

HERE = pathlib.Path(__file__).resolve().parent


def machine(gpu: bool = False) -> str:
    import jax

    device = jax.devices()[0].device_kind if gpu else f"{os.cpu_count()} CPUs"
    return (f"{platform.machine()}, {device}, python {platform.python_version()}, jax {jax.__version__} "
            f"({jax.default_backend()}); load average {os.getloadavg()[0]:.1f}")


def peak_memory_gib(gpu: bool) -> float:
    """Peak device memory in use (GPU) or this process's peak RSS (VmHWM), GiB."""
    if gpu:
        import jax

        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30
    return peak_rss_gib()




# --------------------------------------------------------------------------- gpt2


def gpt2_model(layers: int, d: int, heads: int, vocab: int, positions: int, seed: int = 0):
    """The GPT-2-shaped NNX language model, randomly initialized from ``seed``."""
    import jax
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, d, d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
            self.proj = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x, mask):
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))

    class GPT2(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(vocab, d, rngs=rngs)
            self.wpe = nnx.Param(jax.random.normal(rngs.params(), (positions, d)) * 0.01)
            self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
            self.ln_f = nnx.LayerNorm(d, rngs=rngs)

        def __call__(self, ids):
            x = self.wte(ids) + self.wpe[...][: ids.shape[-1]]
            mask = nnx.make_causal_mask(ids)
            for block in self.blocks:
                x = block(x, mask)
            return self.wte.attend(self.ln_f(x))  # tied output head

    return GPT2(nnx.Rngs(seed))


def gpt2_child(variant: str, spec: dict) -> dict:
    """One variant ("train" or "factorized") in this process: tokens/s and peak memory."""
    import jax
    import jax.numpy as jnp
    import optax

    import trakjax
    from trakjax import featurize, tasks

    model = trakjax.flax.from_nnx(gpt2_model(spec["layers"], spec["d"], spec["heads"], spec["vocab"], spec["positions"]))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(model.params["params"]))
    ids = np.random.default_rng(0).integers(0, spec["vocab"], (spec["batch"], spec["positions"])).astype(np.int32)
    tokens = ids.size
    if variant == "train":
        optimizer = optax.adamw(1e-4)
        params, state = model.params["params"], optimizer.init(model.params["params"])
        fixed = model.params["state"]

        @jax.jit
        def step(params, state, ids):
            def loss(p):
                logits = model.apply_fn({"params": p, "state": fixed}, ids)[:, :-1]
                return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

            value, grads = jax.value_and_grad(loss)(params)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        batch = jnp.asarray(ids)
        carry = [params, state]

        def run():
            carry[0], carry[1], value = step(carry[0], carry[1], batch)
            jax.block_until_ready(value)

        seconds = timed(run, spec["repeats"])
    elif variant == "attribute":  # the whole call on n_train sequences (8 targets)
        task = tasks.language_modeling(model.apply_fn)
        train = np.random.default_rng(1).integers(0, spec["vocab"], (spec["n_train"], spec["positions"]))
        calls = []
        for _ in range(1 + spec.get("attribute_repeats", 1)):  # a warm-up call, then the fastest repeat
            start = time.perf_counter()
            trakjax.attribute(task, [model.params], train.astype(np.int32), ids[:8], projection="factorized",
                              factor_dims=64, proj_dim=2048, batch_size=spec["batch"], grad_wrt=["params"],
                              backend="xla", second_stage=spec.get("second_stage"), progress=False)
            calls.append(time.perf_counter() - start)
        seconds = min(calls[1:])
        tokens = spec["n_train"] * spec["positions"]
    else:
        task = tasks.language_modeling(model.apply_fn)
        config = trakjax.Config.create(projection="factorized", factor_dims=64, proj_dim=2048,
                                       batch_size=spec["batch"], grad_wrt=["params"], backend="xla",
                                       grad_memory_bytes=2**40, second_stage=spec.get("second_stage"))
        checkpoint = featurize.prepare_checkpoint(task, model.params, config, 0, example=ids[0])
        seconds = timed(lambda: featurize.featurize_batch(task, checkpoint, ids, with_out_to_loss=False),
                        spec["repeats"])
        plan = checkpoint.spec.detail.plan
        extra = {"k_fac": plan.k_fac, "factorized_leaves": len(plan.order), "dense_leaves": len(plan.dense)}
    return {"variant": variant, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "peak_gib": peak_memory_gib(spec["gpu"]), "num_params": int(num_params),
            **(extra if variant == "factorized" else {}),
            **({"calls": [round(c, 3) for c in calls]} if variant == "attribute" else {})}


def table(args) -> None:
    """The issue's table rows measurable without the PyTorch peers, at its two GPT-2 shapes:
    tokens/s of a JAX AdamW training step, of featurize_batch (features only) and the marginal
    tokens/s of the whole attribute call between two training-set sizes (targets and the k × k
    solve cancel; each size's time is the fastest of ``--attribute-repeats`` calls after a warm-up
    call in the same process, as benchmarks/peers.py times the peers, so compilation is out), each
    in its own process with its peak memory."""
    rows = []
    for layers, d, vocab, positions, n_small, n_large in args.table_shapes:
        spec = dict(layers=layers, d=d, heads=max(d // 64, 1), vocab=vocab, positions=positions, batch=8,
                    repeats=args.repeats, gpu=args.gpu, second_stage=args.second_stage,
                    attribute_repeats=args.attribute_repeats)
        train = run_child("gpt2", "train", spec)
        fact = run_child("gpt2", "factorized", spec)
        small = run_child("gpt2", "attribute", dict(spec, n_train=n_small))
        large = run_child("gpt2", "attribute", dict(spec, n_train=n_large))
        marginal = (n_large - n_small) * positions / (large["seconds"] - small["seconds"])
        rows.append((f"{layers} layers, d {d}, vocab {vocab}, seq {positions} ({n_small} → {n_large} sequences)",
                     train, fact, marginal, large))
    print(f"\n{machine(args.gpu)}")
    stage = args.second_stage or "the default"
    print(f"Tokens/s, batch 8, factor_dims 64, proj_dim 2048, {stage} second stage; marginal rates between "
          f"two training-set sizes, each variant in its own process\n")
    memory = "peak device memory GiB" if args.gpu else "peak RSS GiB"
    print(f"| shape | AdamW training step | featurize_batch (features only) | attribute, whole call, marginal "
          f"| featurize / train | attribute / train | {memory} (train, featurize, attribute) |")
    print("|---|---|---|---|---|---|---|")
    for name, train, fact, marginal, large in rows:
        print(f"| {name} | {train['tokens_per_s']:.0f} | {fact['tokens_per_s']:.0f} | {marginal:.0f} "
              f"| {fact['tokens_per_s'] / train['tokens_per_s']:.2f} | {marginal / train['tokens_per_s']:.2f} "
              f"| {train['peak_gib']:.2f}, {fact['peak_gib']:.2f}, {large['peak_gib']:.2f} |")


def gpt2(args) -> None:
    if args.quick:
        args.layers, args.d, args.heads, args.vocab, args.positions = 2, 256, 4, 8192, 64
    spec = dict(layers=args.layers, d=args.d, heads=args.heads, vocab=args.vocab, positions=args.positions,
                batch=args.batch, repeats=args.repeats, gpu=args.gpu, second_stage=args.second_stage)
    results = {v: run_child("gpt2", v, spec) for v in ("train", "factorized")}
    train, fact = results["train"], results["factorized"]
    print(f"\n{machine(args.gpu)}")
    print(f"GPT-2-shaped NNX transformer: {spec['layers']} layers, d = {spec['d']}, {spec['heads']} heads, "
          f"vocab {spec['vocab']}, {spec['positions']} positions, tied embeddings; {train['num_params'] / 1e6:.1f}M "
          f"parameters; batch {spec['batch']} × {spec['positions']} tokens; factor_dims 64, proj_dim 2048 "
          f"(K_fac = {fact['k_fac']}, {fact['factorized_leaves']} leaves factorized, {fact['dense_leaves']} dense)\n")
    memory = "peak device memory" if args.gpu else "peak RSS"
    print(f"| step | tokens/s | s per batch | {memory} GiB |")
    print("|---|---|---|---|")
    for name, r in (("training step (value_and_grad + AdamW)", train), ("factorized featurization", fact)):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} | {r['peak_gib']:.2f} |")
    print(f"\nfactorized / training step: {fact['tokens_per_s'] / train['tokens_per_s']:.2f}× tokens/s, "
          f"{fact['peak_gib'] / train['peak_gib']:.2f}× memory")


# --------------------------------------------------------------------------- cnn and mlp50m


def featurize_rate(task, params, x, y, batch: int, repeats: int, **settings) -> tuple[float, object]:
    import trakjax
    from trakjax import featurize

    config = trakjax.Config.create(batch_size=batch, backend="xla", **settings)
    checkpoint = featurize.prepare_checkpoint(task, params, config, 0, (x, y))
    seconds = timed(lambda: featurize.featurize_batch(task, checkpoint, (x[:batch], y[:batch])), repeats)
    return batch / seconds, checkpoint


def cnn(args) -> None:
    import jax
    import jax.numpy as jnp

    from trakjax import tasks

    sys.path.insert(0, str(HERE))
    from featurize_cpu import CNN

    model = CNN()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.cnn_batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.cnn_batch).astype(np.int32)
    task = tasks.image_classification(model.apply)
    dense, _ = featurize_rate(task, params, x, y, args.cnn_batch, args.repeats, proj_dim=2048)
    fact, checkpoint = featurize_rate(task, params, x, y, args.cnn_batch, args.repeats, proj_dim=2048,
                                      projection="factorized", factor_dims=64)
    plan = checkpoint.spec.detail.plan
    print(f"\n{machine()}")
    print(f"CNN of 373,386 parameters on 32×32×3, batch {args.cnn_batch}, k = 2048; factorized: factor_dims 64, "
          f"K_fac = {plan.k_fac}, factorized leaves {[plan.leaves[i].path for i in plan.order]}\n")
    print("| projection | examples/s |")
    print("|---|---|")
    print(f"| dense (Rademacher, R materialized) | {dense:.1f} |")
    print(f"| factorized (convolution kernels through their patches) | {fact:.1f} |")
    print(f"\nfactorized / dense: {fact / dense:.2f}×")


def mlp50m_child(spec: dict) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from trakjax import tasks

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.relu(nn.Dense(4096)(x))
            return nn.Dense(4096)(x)

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 4096)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(spec["batch"], 4096)).astype(np.float32)
    y = rng.integers(0, 4096, spec["batch"]).astype(np.int32)
    rate, checkpoint = featurize_rate(tasks.image_classification(model.apply), params, x, y, spec["batch"],
                                      spec["repeats"], proj_dim=4096, projection="factorized", factor_dims=64)
    return {"examples_per_s": rate, "peak_gib": peak_memory_gib(False), "k_fac": checkpoint.record["k_fac"],
            "num_params": int(sum(v.size for v in jax.tree_util.tree_leaves(params)))}


def mlp50m(args) -> None:
    r = run_child("mlp50m", "factorized", {"batch": args.mlp_batch, "repeats": args.repeats})
    print(f"\n{machine()}")
    print(f"MLP 4096 → 4096 → 4096 → 4096 ({r['num_params'] / 1e6:.1f}M parameters), k = 4096, batch "
          f"{args.mlp_batch}; factorized: factor_dims 64, K_fac = {r['k_fac']}\n")
    print("| projection | examples/s | peak RSS GiB |")
    print("|---|---|---|")
    print("| dense (benchmarks/README.md, featurize_memory.py) | 0.036 | 3.56 |")
    print(f"| factorized | {r['examples_per_s']:.1f} | {r['peak_gib']:.2f} |")


# --------------------------------------------------------------------------- lds


def lds_settings(args):
    """The LDS benchmark's models, trained checkpoints and ground truth:
    yields (name, task, checkpoints, train, targets, halves) for the MLP and the small CNN."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from trakjax import evaluation, tasks

    sys.path.insert(0, str(HERE))
    from lambda_rules import Conv3x3
    from lds_digits import LR, MLP, Halves, digits

    def cnn(conv):
        """conv8 → 2×2 average pool → conv16 → 2×2 average pool → dense (1,898 parameters)."""

        class SmallCNN(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = x.reshape(x.shape[0], 8, 8, 1)
                x = nn.avg_pool(nn.relu(conv(8)(x)), (2, 2), (2, 2))
                x = nn.avg_pool(nn.relu(conv(16)(x)), (2, 2), (2, 2))
                return nn.Dense(10)(x.reshape(x.shape[0], -1))

        return SmallCNN()

    class Conv(Conv3x3):
        """lambda_rules' patch-matmul 3×3 convolution, named like nn.Conv (Conv_i), so that its
        parameters are an nn.Conv's."""

    train, targets = digits(1000)
    # (trained and retrained as patch matmuls; attributed as nn.Conv, whose kernels the
    # factorized family reaches through their patches)
    for name, model, attributed in (("MLP 64-64-10", MLP(64), MLP(64)),
                                    ("CNN conv8-conv16", cnn(Conv), cnn(lambda c: nn.Conv(c, (3, 3))))):
        optimizer = optax.adam(LR)

        def init(key, model=model):
            return model.init(key, jnp.zeros((1, 64), jnp.float32))

        trainer = jax.jit(lambda key, model=model, init=init, optimizer=optimizer: _fit(
            model, init, optimizer, train, args.steps, key))
        checkpoints = [trainer(jax.random.fold_in(jax.random.key(1000), m)) for m in range(10)]
        masks = evaluation.subset_masks(1000, args.subsets, 0.5, seed=0)
        margins = evaluation.retrain_margins(init, model.apply, optimizer, args.steps, train, targets, masks,
                                             seed=1, chunk_size=50)
        yield name, tasks.image_classification(attributed.apply), checkpoints, train, targets, Halves(masks, margins)


def lds(args) -> None:
    import trakjax

    rows = []
    for name, task, checkpoints, train, targets, halves in lds_settings(args):
        common = dict(proj_dim=2048, batch_size=256, backend="xla")
        dense = trakjax.attribute(task, checkpoints, train, targets, projection="rademacher", **common)
        fact = trakjax.attribute(task, checkpoints, train, targets, projection="factorized", factor_dims=64, **common)
        a, b = halves.report_lds(dense), halves.report_lds(fact)
        diff = paired_difference(fact, dense, halves)
        rows.append((name, a, b, diff))
        print(f"{name}: dense {a.mean:.3f}, factorized {b.mean:.3f}, paired difference {diff[0]:+.4f} "
              f"[{diff[1]:+.4f}, {diff[2]:+.4f}]", flush=True)
    print(f"\n{machine()}")
    print(f"LDS on digits: N = 1000, 797 targets (report half: 398), {args.subsets} half-subset retrains, 10 "
          f"checkpoints, {args.steps} full-batch Adam steps; k = 2048, λ auto\n")
    print("| model | dense LDS | factorized LDS | factorized − dense (paired, 95% CI) |")
    print("|---|---|---|---|")
    for name, a, b, (mean, low, high) in rows:
        print(f"| {name} | {a.mean:.3f} [{a.ci_low:.3f}, {a.ci_high:.3f}] | {b.mean:.3f} [{b.ci_low:.3f}, "
              f"{b.ci_high:.3f}] | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")


def second_stage(args) -> None:
    """Factorized LDS with the sparse second stage (s = 1, 2, 4) paired against the dense one at
    k = 128, 512, 2048 (factor_dims 64), with each variant's whole-call time."""
    import jax

    import trakjax

    rows = []
    for name, task, checkpoints, train, targets, halves in lds_settings(args):
        for k in args.second_stage_dims:
            common = dict(proj_dim=k, batch_size=256, backend="xla", projection="factorized", factor_dims=64)
            example = jax.tree_util.tree_map(lambda a: a[0], train)
            plan = trakjax.describe_factorization(task, checkpoints[0], example, factor_dims=64, proj_dim=k).plan
            start = time.perf_counter()
            dense = trakjax.attribute(task, checkpoints, train, targets, second_stage="dense", **common)
            dense_s = time.perf_counter() - start
            base = halves.report_lds(dense)
            for s in args.sparsities:
                start = time.perf_counter()
                sparse = trakjax.attribute(task, checkpoints, train, targets, second_stage="sparse", sparsity=s,
                                           **common)
                seconds = time.perf_counter() - start
                diff = paired_difference(sparse, dense, halves)
                rows.append((name, k, plan.k_fac, plan.second_stage, s, base.mean, halves.report_lds(sparse).mean,
                             diff, dense_s, seconds))
                print(rows[-1], flush=True)
    print(f"\n{machine()}")
    print(f"Sparse against dense second stage, factorized (factor_dims 64), digits: N = 1000, report half 398 "
          f"targets, {args.subsets} half-subset retrains, 10 checkpoints, λ auto\n")
    print("| model | k | K_fac | s | dense-stage LDS | sparse-stage LDS | sparse − dense (paired, 95% CI) "
          "| whole call dense / sparse (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, k_fac, staged, s, a, b, (mean, low, high), ta, tb in rows:
        note = "" if staged else " (no second stage: k ≥ K_fac)"
        print(f"| {name} | {k}{note} | {k_fac} | {s} | {a:.4f} | {b:.4f} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] "
              f"| {ta:.1f} / {tb:.1f} |")


def lm_setting(args):
    """The LM setting of ``trakjax demo --task lm`` (:mod:`trakjax.demo_lm`'s default sizes: 2
    layers, d 64, byte vocabulary, N = 500 windows of 64 bytes, ``--lm-targets`` held-out targets, 4
    checkpoints), with ``--lm-subsets`` half-subset retrains as the ground truth:
    (name, task, checkpoints, train, targets, truth); the truth scores every target."""
    from lds_digits import Halves

    from trakjax import demo_lm, text_lm

    settings = demo_lm.LMDemoSettings(lds_subsets=args.lm_subsets, num_targets=args.lm_targets)
    config = demo_lm.lm_config(settings)
    corpus = text_lm.load_corpus(settings.sequence_length)
    train, targets = text_lm.split_corpus(corpus, settings.train_size, settings.num_targets, settings.seed)
    checkpoints = [text_lm.train_models(config, train.ids, 1, settings.steps, settings.seed,
                                        batch_size=settings.minibatch, learning_rate=settings.learning_rate,
                                        first_model=m)[0] for m in range(settings.checkpoints)]
    masks = demo_lm.lds_masks(settings)
    outputs = np.concatenate([text_lm.retrain_outputs(
        config, train.ids, targets.ids, masks[start:start + demo_lm.LDS_CHUNK], steps=settings.steps,
        seed=settings.seed + 10_000 + start, batch_size=settings.minibatch,
        learning_rate=settings.learning_rate, chunk_size=demo_lm.LDS_CHUNK)
        for start in range(0, settings.lds_subsets, demo_lm.LDS_CHUNK)])
    truth = Halves(masks, outputs)
    truth.report = np.arange(outputs.shape[1])  # no selection here: every target reports
    print(f"LM setting: corpus content hash {corpus.content_hash[:12]} (Python "
          f"{corpus.python_version}), N = {settings.train_size}, T = {settings.num_targets}, "
          f"{settings.lds_subsets} retrains", flush=True)
    yield ("LM 2 layers d 64 (bytes)", text_lm.task(config), checkpoints, train.ids, targets.ids, truth,
           dict(grad_wrt=text_lm.GRAD_WRT, batch_size=settings.batch_size))


DEFAULTS_VARIANTS = {
    # name: the settings that differ (everything else is the library's default)
    "rademacher (old default)": dict(projection="rademacher"),
    "factorized 64, dense stage (old factorized)": dict(projection="factorized", factor_dims=64,
                                                        second_stage="dense"),
    "factorized 64, sparse stage": dict(projection="factorized", factor_dims=64),
    "factorized auto sizes, dense stage": dict(projection="factorized", second_stage="dense"),
    "defaults (no setting)": dict(),
}


DEFAULTS_SHORT = {
    "rademacher (old default)": "rademacher",
    "factorized 64, dense stage (old factorized)": "f64-dense",
    "factorized 64, sparse stage": "f64-sparse",
    "factorized auto sizes, dense stage": "auto-dense",
    "defaults (no setting)": "defaults",
}
"""``--defaults-variants`` names of :data:`DEFAULTS_VARIANTS`."""


class SeedMeanLDS(NamedTuple):
    mean: float
    ci_low: float
    ci_high: float


def seed_mean_lds(runs, truth) -> SeedMeanLDS:
    """LDS of one or more projection draws: per-target Spearman averaged over the draws, then its
    mean over report targets with a 95% bootstrap interval over targets."""
    return SeedMeanLDS(*bootstrap_mean(seed_mean_spearman(runs, truth)))


def defaults(args) -> None:
    """Paired LDS of the defaults (``projection="auto"``, factor sizes from proj_dim, sparse
    second stage) against the previous ones (dense Rademacher; factorized with factor_dims 64
    and the dense second stage), and sparse against dense second stages, at each k of
    ``--defaults-dims``, on the digits MLP, the 1,898-parameter conv CNN and the LM setting;
    ``--factor-sweep`` adds factorized rows at those factor sizes (sparse stage)."""
    import jax

    import trakjax
    from trakjax import featurize

    variants = {name: given for name, given in DEFAULTS_VARIANTS.items()
                if not args.defaults_variants or DEFAULTS_SHORT[name] in args.defaults_variants}
    for size in args.factor_sweep:
        variants[f"factorized {size}, sparse stage"] = dict(projection="factorized", factor_dims=size)
    settings = []
    if {"mlp", "cnn"} & set(args.defaults_settings):
        for name, task, checkpoints, train, targets, halves in lds_settings(args):
            if ("MLP" in name and "mlp" in args.defaults_settings) or ("CNN" in name and "cnn" in args.defaults_settings):
                settings.append((name, task, checkpoints, train, targets, halves, dict(batch_size=256)))
    if "lm" in args.defaults_settings:
        settings += list(lm_setting(args))
    pairs = [("defaults (no setting)", "rademacher (old default)"),
             ("defaults (no setting)", "factorized 64, dense stage (old factorized)"),
             ("factorized 64, sparse stage", "factorized 64, dense stage (old factorized)"),
             ("defaults (no setting)", "factorized auto sizes, dense stage")]
    lines, saved = [], {}
    for name, task, checkpoints, train, targets, truth, extra in settings:
        example = jax.tree_util.tree_map(lambda a: a[0], train)
        for k in args.defaults_dims:
            scores = {}
            for variant, given in variants.items():
                runs, start = [], time.perf_counter()
                for seed in range(args.seeds):  # one projection draw per seed, scored alike
                    config = trakjax.Config.create(proj_dim=k, backend="xla", seed=seed, **extra, **given)
                    runs.append(np.asarray(trakjax.attribute(task, checkpoints, train, targets, config)))
                seconds = (time.perf_counter() - start) / args.seeds
                resolved = featurize.resolve_auto_projection(task, checkpoints[0], config, example=example).result
                scores[variant] = runs
                plan = None
                if resolved.projection == "factorized":
                    plan = trakjax.describe_factorization(task, checkpoints[0], example, grad_wrt=resolved.grad_wrt,
                                                          factor_dims=resolved.factor_dims, proj_dim=k,
                                                          second_stage=resolved.second_stage).plan
                lds_value = seed_mean_lds(runs, truth)
                what = resolved.projection if plan is None else (
                    f"factorized {plan.factor_dims[0]}×{plan.factor_dims[1]}, K_fac {plan.k_fac}, "
                    f"{resolved.resolved_second_stage if plan.second_stage else 'no'} second stage")
                lines.append(f"| {name} | {k} | {variant} | {what} | {lds_value.mean:.4f} "
                             f"[{lds_value.ci_low:.4f}, {lds_value.ci_high:.4f}] | {seconds:.1f} |")
                print(lines[-1], flush=True)
            sweep = [v for v in variants if v.startswith("factorized ") and v.endswith(", sparse stage")
                     and not v.startswith("factorized 64,")]
            for a, b in [(a, b) for a, b in pairs + [(v, base) for v in sweep for base in (pairs[0][1], pairs[1][1])]
                         if a in scores and b in scores]:
                mean, low, high = paired_difference(scores[a], scores[b], truth)
                lines.append(f"| {name} | {k} | {a} − {b} | paired | {mean:+.4f} [{low:+.4f}, {high:+.4f}] | |")
                print(lines[-1], flush=True)
            saved.update({f"{name} | {k} | {v} | seed {i}": value for v, runs in scores.items()
                          for i, value in enumerate(runs)})
            saved[f"{name} | masks"], saved[f"{name} | margins"] = truth.masks, truth.margins
            if args.scores_out:
                np.savez_compressed(args.scores_out, **saved)
    print(f"\n{machine()}")
    print("| setting | k | variant | resolved to | LDS (95% CI) or paired difference (95% bootstrap CI) "
          "| whole call (s) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


def _fit(model, init, optimizer, train, steps, key):
    import jax
    import optax

    params = init(key)
    state = optimizer.init(params)

    def step(carry, _):
        p, s = carry
        grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(q, train[0]), train[1]).mean())(p)
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, state), None, length=steps)
    return params


def per_target_spearman(scores, halves) -> np.ndarray:
    """Spearman, per report target, between the scores' predicted margins and the retrained ones."""
    from trakjax import evaluation

    report = halves.report
    predicted = halves.masks.astype(np.float64) @ scores[:, report]
    return evaluation.spearman_columns(predicted, halves.margins[:, report])


def seed_mean_spearman(scores, halves) -> np.ndarray:
    """Per-target Spearman of a score matrix, or of a list of them (one per projection seed)
    averaged over the seeds, so that the projection's own draw averages out."""
    runs = scores if isinstance(scores, list) else [scores]
    return np.mean([per_target_spearman(s, halves) for s in runs], axis=0)


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of per-target values: the mean and its bootstrap interval over targets."""
    rng = np.random.default_rng(seed)
    boots = [values[rng.integers(0, values.size, values.size)].mean() for _ in range(n_boot)]
    return float(values.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def paired_difference(a, b, halves) -> tuple[float, float, float]:
    """Mean over report targets of LDS(a) − LDS(b), per target, and its 95% bootstrap interval
    (``a``/``b``: a score matrix or a list of them, see :func:`seed_mean_spearman`)."""
    return bootstrap_mean(seed_mean_spearman(a, halves) - seed_mean_spearman(b, halves))


# --------------------------------------------------------------------------- flops


def cost(compiled) -> tuple[float, float, int]:
    """(FLOPs, bytes accessed, while loops) of a compiled XLA executable. XLA's cost analysis
    counts a loop body once, whatever its trip count: the loop count says where it undercounts."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    return (float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)),
            compiled.as_text().count(" while("))


def flops_models(args):
    """(name, task, params, batch, loss(params, batch), train params, grad_wrt) of every
    benchmark model: the digits MLP, the 373k CNN and the issue's two GPT-2 shapes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import trakjax
    from trakjax import tasks

    sys.path.insert(0, str(HERE))
    from featurize_cpu import CNN

    class DigitsMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(64)(nn.relu(nn.Dense(64)(x)))))

    rng = np.random.default_rng(0)
    for name, model, x, batch in (("digits MLP 64-64-10", DigitsMLP(), rng.normal(size=(256, 64)), 256),
                                  ("CNN 373k (32×32×3)", CNN(), rng.normal(size=(64, 32, 32, 3)), 64)):
        x = x.astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        params = model.init(jax.random.key(0), x[:1])

        def loss(p, b, model=model):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b[0]), b[1]).mean()

        yield name, tasks.image_classification(model.apply), params, (x, y), loss, params, None
    for layers, d, vocab, positions in args.flops_gpt2:
        model = trakjax.flax.from_nnx(gpt2_model(layers, d, max(d // 64, 1), vocab, positions))
        ids = rng.integers(0, vocab, (8, positions)).astype(np.int32)
        fixed = model.params["state"]

        def loss(p, b, model=model, fixed=fixed):
            logits = model.apply_fn({"params": p, "state": fixed}, b)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

        yield (f"GPT-2 {layers} layers, d {d}, vocab {vocab}, seq {positions}", tasks.language_modeling(model.apply_fn),
               model.params, jnp.asarray(ids), loss, model.params["params"], ["params"])


def flops(args) -> None:
    """XLA's compiled cost of one factorized featurization step against one AdamW training step
    of the same batch (a device-independent estimate)."""
    import jax
    import optax

    import trakjax
    from trakjax import featurize

    rows = []
    for name, task, params, batch, loss, train_params, grad_wrt in flops_models(args):
        if args.flops_models and not any(name.startswith(m) for m in args.flops_models):
            continue
        optimizer = optax.adamw(1e-4)

        def train_step(p, state, b, loss=loss, optimizer=optimizer):
            value, grads = jax.value_and_grad(loss)(p, b)
            updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state, value

        train = cost(jax.jit(train_step).lower(train_params, optimizer.init(train_params), batch).compile())
        size = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
        example = jax.tree_util.tree_map(lambda a: a[0], batch)
        for stage, factor_dims in [(st, fd) for st in args.flops_stages for fd in args.flops_factor_dims]:
            config = trakjax.Config.create(projection="factorized", proj_dim=2048, batch_size=size,
                                           factor_dims=None if factor_dims == "auto" else int(factor_dims),
                                           grad_wrt=grad_wrt, backend="xla", grad_memory_bytes=2**40,
                                           second_stage=stage)
            config = featurize.resolve_auto_projection(task, params, config, example=example)
            checkpoint = featurize.prepare_checkpoint(task, params, config, 0, example=example)
            key = featurize.task_key(checkpoint.seed, 0, featurize.TRAIN_SPLIT)
            lowered = checkpoint.train_step.lower(checkpoint.diff, checkpoint.fixed, batch, checkpoint.aux,
                                                  np.arange(size, dtype=np.int32), key, checkpoint.arrays)
            fact = cost(lowered.compile())
            sizes = "×".join(str(k) for k in checkpoint.spec.detail.plan.factor_dims)
            rows.append((name, f"{stage}, factors {sizes}" + (" (auto)" if factor_dims == "auto" else ""),
                         checkpoint.record["k_fac"], size, train, fact))
            print(rows[-1], flush=True)
    print(f"\n{machine()}")
    print("XLA compiled cost analysis, one step on one batch: factorized featurization (proj_dim 2048, "
          "with q) against value_and_grad of the mean loss + AdamW. A while loop's body is "
          "counted once (the loops column: 0 means nothing is undercounted)\n")
    print("| model | second stage, factor sizes | K_fac | batch | train GFLOP | featurize GFLOP | FLOP ratio (featurize/train) "
          "| train GB accessed | featurize GB accessed | loops (train, featurize) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, stage, k_fac, size, (tf, tb, tl), (ff, fb, fl) in rows:
        print(f"| {name} | {stage} | {k_fac} | {size} | {tf / 1e9:.3f} | {ff / 1e9:.3f} | {ff / tf:.2f} "
              f"| {tb / 1e9:.3f} | {fb / 1e9:.3f} | {tl}, {fl} |")


# --------------------------------------------------------------------------- processes


def run_child(mode: str, variant: str, spec: dict) -> dict:
    """Run one measurement in a fresh process (its own peak memory); returns its JSON result."""
    done = subprocess.run([sys.executable, __file__, "child", mode, variant, json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{mode} {variant}: {result}", flush=True)
    return result


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        mode, variant, spec = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        result = gpt2_child(variant, spec) if mode == "gpt2" else mlp50m_child(spec)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["gpt2", "cnn", "mlp50m", "lds", "second_stage", "defaults", "flops", "table", "all"])
    parser.add_argument("--gpu", action="store_true", help="report device memory (run on a GPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="GPT-2 sequences per batch")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--cnn-batch", type=int, default=64)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--second-stage-dims", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--sparsities", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="gpt2 at 2 layers, d 256, vocab 8192, 64 positions")
    parser.add_argument("--second-stage", choices=["dense", "sparse"], default=None,
                        help="the factorized second stage (default: the library's)")
    parser.add_argument("--table-shapes", type=lambda v: tuple(int(x) for x in v.split(",")), nargs="*",
                        default=[(2, 256, 8192, 64, 32, 128), (4, 768, 50257, 128, 16, 64)],
                        help="table shapes as layers,d,vocab,positions,n_small,n_large")
    parser.add_argument("--defaults-dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--defaults-settings", nargs="+", default=["mlp", "cnn", "lm"], choices=["mlp", "cnn", "lm"])
    parser.add_argument("--factor-sweep", type=int, nargs="*", default=[], help="defaults: extra factor sizes")
    parser.add_argument("--lm-subsets", type=int, default=64, help="defaults: LM half-subset retrains")
    parser.add_argument("--scores-out", default=None, help="defaults: save every score matrix here (.npz)")
    parser.add_argument("--lm-targets", type=int, default=200, help="defaults: LM held-out targets")
    parser.add_argument("--attribute-repeats", type=int, default=2,
                        help="table: timed attribute calls per training-set size after a warm-up call (fastest kept)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="defaults: projection seeds per variant (per-target LDS averaged over them)")
    parser.add_argument("--defaults-variants", nargs="*", default=[], choices=sorted(DEFAULTS_SHORT.values()),
                        help="defaults: only these variants (default: all)")
    parser.add_argument("--flops-stages", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--flops-factor-dims", nargs="+", default=["64", "auto"],
                        help="flops: factor sizes (an int, or auto: sized from proj_dim, the default)")
    parser.add_argument("--flops-models", nargs="*", default=[],
                        help="flops: only models whose name starts with one of these (digits, CNN, GPT-2)")
    parser.add_argument("--flops-gpt2", type=lambda v: tuple(int(x) for x in v.split(",")), nargs="*",
                        default=[(2, 256, 8192, 64), (4, 768, 50257, 128)],
                        help="GPT-2 shapes for flops as layers,d,vocab,positions")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    modes = ["gpt2", "cnn", "mlp50m", "lds"] if args.mode == "all" else [args.mode]
    for mode in modes:
        {"gpt2": gpt2, "cnn": cnn, "mlp50m": mlp50m, "lds": lds, "second_stage": second_stage,
         "defaults": defaults, "flops": flops, "table": table}[mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
