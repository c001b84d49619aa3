"""Hugging Face Flax models: factorized attribution against the model's own training step.

Issue 20's HF measurement, on transformers 4.57.6 (the last release with Flax classes; the
``bench`` extra, never a runtime dependency). Each model is randomly initialized from a config
built here (no download):

* ``gpt2``: ``FlaxGPT2LMHeadModel``, 2 layers, d 256, 4 heads, vocab 8192, 64 positions (tied
  embeddings, dropout 0), ``tasks.language_modeling``; rates in tokens/s; 32 → 128 sequences.
* ``gpt2-large``: the same at issue 20's larger shape, 4 layers, d 768, 12 heads, vocab 50257,
  128 positions; 16 → 64 sequences (the architecture of benchmarks/peers.py's PyTorch side).
* ``resnet18``: ``FlaxResNetForImageClassification`` (basic blocks, depths 2-2-2-2, widths
  64-128-256-512, 10 classes) on 32×32×3 images, batch statistics held fixed,
  ``tasks.image_classification``; rates in examples/s; 64 → 256 images.
* ``vit``: ``FlaxViTForImageClassification``, 4 layers, d 192, 3 heads, 4×4 patches of 32×32×3
  images (64 patches + CLS), 10 classes, ``tasks.image_classification``; 64 → 256 images.
* ``bert``: ``FlaxBertForSequenceClassification``, 4 layers, d 256, 4 heads, vocab 8192, 128
  tokens, 4 classes, ``tasks.text_classification``; examples/s; 32 → 128 sequences.

For each model, in its own process (so each has its own peak RSS, VmHWM):

* training step: ``value_and_grad`` of the mean cross-entropy + ``optax.adamw``, jitted (the
  ResNet's in train mode, updating its batch statistics); steps/s on one batch. The ResNet's
  step is timed a second time with its convolutions over maps smaller than their 3×3 window (the
  last stage's 2×2 and 1×1 maps) computed by patches, as trakjax's factorized step computes them
  (XLA's CPU backend swaps such convolutions and runs them slowly): the ratio against that step
  is the one a user who applied the same workaround to training would see.
* featurization: ``featurize.featurize_batch`` (factorized, factor_dims 64, proj_dim 2048), features
  only (no q), as benchmarks/factorized.py times it.
* ``attribute``: the whole call (factorized, same sizes) at two training-set sizes with the same
  targets; the marginal rate ``(n_large − n_small) / (t_large − t_small)`` cancels compilation,
  target featurization and the k × k solve (issue 20's definition). Each size is timed
  ``--attribute-repeats`` times, alternating, after one warm-up call (the first call also compiles
  what later calls find cached), and the fastest kept.
* XLA's compiled cost analysis (``jit(f).lower(*args).compile().cost_analysis()``: flops, bytes
  accessed) of one featurization step (the one ``attribute`` runs on training batches: features
  and q) and of one training step, on the same batch. XLA counts a loop body once: the number of
  ``while`` loops in each compiled module is printed so an undercount can be seen.

Run:  python benchmarks/hf_models.py [gpt2|gpt2-large|resnet18|vit|bert|all] [--sizes 32 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
from bench_common import peak_rss_gib, timed

FACTORIZED = dict(projection="factorized", factor_dims=64, proj_dim=2048)
GPT2_SHAPES = {  # issue 20's two shapes: layers, d, heads, vocab, positions; training-set sizes
    "gpt2": dict(layers=2, d=256, heads=4, vocab=8192, positions=64, sizes=[32, 128]),
    "gpt2-large": dict(layers=4, d=768, heads=12, vocab=50257, positions=128, sizes=[16, 64]),
}
SIZES = {"resnet18": [64, 256], "vit": [64, 256], "bert": [32, 128],  # ≥ about a second of work apart
         **{name: shape["sizes"] for name, shape in GPT2_SHAPES.items()}}
UNITS = {"gpt2": "tokens", "gpt2-large": "tokens", "resnet18": "examples", "vit": "examples", "bert": "examples"}
CONVOLUTIONAL = {"resnet18"}  # also timed with its small-map convolutions by patches


def machine() -> str:
    import jax

    import trakjax

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, jax "
            f"{jax.__version__} ({jax.default_backend()}), trakjax from {os.path.dirname(trakjax.__file__)}; "
            f"load average {os.getloadavg()[0]:.1f} at the end")




def cost(jitted, *args) -> dict:
    """XLA's compiled cost analysis of ``jitted(*args)``: flops, bytes accessed, while loops."""
    compiled = jitted.lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    loops = len(re.findall(r"\bwhile\(", compiled.as_text()))
    return {"flops": float(analysis.get("flops", 0.0)),
            "bytes": float(analysis.get("bytes accessed", 0.0)), "while_loops": loops}


# --------------------------------------------------------------------------- models


def build(name: str, n: int, seed: int = 0):
    """(FlaxModel, task, data of n examples, loss(variables, batch) -> (loss, new batch_stats),
    units per example) for one model; data is a pytree with a leading example axis."""
    import jax.numpy as jnp
    import optax

    import trakjax.flax
    from trakjax import tasks

    rng = np.random.default_rng(seed)
    if name in GPT2_SHAPES:
        from transformers import FlaxGPT2LMHeadModel, GPT2Config

        shape = GPT2_SHAPES[name]
        config = GPT2Config(n_layer=shape["layers"], n_embd=shape["d"], n_head=shape["heads"],
                            vocab_size=shape["vocab"], n_positions=shape["positions"], bos_token_id=0,
                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = FlaxGPT2LMHeadModel(config, seed=0)

        def logits(module, ids):
            positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
            return module(ids, jnp.ones_like(ids), positions, deterministic=True).logits

        model = trakjax.flax.from_linen(hf.module, {"params": hf.params}, method=logits)
        data = rng.integers(0, config.vocab_size, (n, shape["positions"])).astype(np.int32)

        def loss(variables, ids):
            out = model.apply_fn(variables, ids)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean(), None

        return model, tasks.language_modeling(model.apply_fn), data, loss, shape["positions"]
    if name == "resnet18":
        from transformers import FlaxResNetForImageClassification, ResNetConfig

        config = ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                              depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
        hf = FlaxResNetForImageClassification(config, seed=0, input_shape=(1, 32, 32, 3))
        model = trakjax.flax.from_linen(  # the module takes NHWC (the HF wrapper transposes NCHW)
            hf.module, dict(hf.params), method=lambda module, x: module(x, deterministic=True).logits)
        data = (rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, n).astype(np.int32))

        def loss(variables, batch):
            out, updates = hf.module.apply(variables, batch[0], deterministic=False, mutable=["batch_stats"])
            value = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch[1]).mean()
            return value, updates["batch_stats"]

        return model, tasks.image_classification(model.apply_fn), data, loss, 1
    if name == "vit":
        from transformers import FlaxViTForImageClassification, ViTConfig

        config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=4,
                           num_attention_heads=3, intermediate_size=768, num_labels=10,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        hf = FlaxViTForImageClassification(config, seed=0, input_shape=(1, 32, 32, 3))
        model = trakjax.flax.from_linen(  # the module takes NHWC (the HF wrapper transposes NCHW)
            hf.module, {"params": hf.params}, method=lambda module, x: module(x, deterministic=True).logits)
        data = (rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, n).astype(np.int32))

        def loss(variables, batch):
            out = model.apply_fn(variables, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(out, batch[1]).mean(), None

        return model, tasks.image_classification(model.apply_fn), data, loss, 1
    if name == "bert":
        from transformers import BertConfig, FlaxBertForSequenceClassification

        config = BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, max_position_embeddings=128, num_labels=4,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        hf = FlaxBertForSequenceClassification(config, seed=0)

        def logits(module, inputs):
            ids = inputs["input_ids"]
            positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
            return module(ids, inputs["attention_mask"], jnp.zeros_like(ids), positions, None,
                          deterministic=True).logits

        model = trakjax.flax.from_linen(hf.module, {"params": hf.params}, method=logits)
        data = ({"input_ids": rng.integers(0, config.vocab_size, (n, 128)).astype(np.int32),
                 "attention_mask": np.ones((n, 128), np.int32)},
                rng.integers(0, 4, n).astype(np.int32))

        def loss(variables, batch):
            out = model.apply_fn(variables, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(out, batch[1]).mean(), None

        return model, tasks.text_classification(model.apply_fn), data, loss, 1
    raise ValueError(f"unknown model {name!r}: expected one of {sorted(UNITS)}")


# --------------------------------------------------------------------------- children


def with_small_convolutions_by_patches(fn):
    """``fn`` evaluated from its jaxpr with every convolution over a map smaller than its window
    computed as trakjax's factorized step computes it (``trakjax.factorized.small_convolutions``),
    so that a training step can be timed with the same workaround for XLA CPU's swapped
    convolutions. Differentiable; nested jit calls are evaluated inline."""
    import jax

    from trakjax.factorized import compat, small_convolutions

    def evaluate(jaxpr, consts, args):
        env = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        for eqn in jaxpr.eqns:
            invals = [compat.read(env, v) for v in eqn.invars]
            name = eqn.primitive.name
            y = (small_convolutions.convolve_bound(*invals, compat.bind_params(eqn))
                 if name == "conv_general_dilated" else None)
            if y is not None:
                outs = [y]
            elif name in compat.JIT_PRIMITIVES:
                outs = evaluate(*compat.open_jaxpr(compat.call_jaxpr(eqn)), invals)
            else:
                outs = compat.bind(eqn, invals)
            env.update(zip(eqn.outvars, outs, strict=True))
        return [compat.read(env, v) for v in jaxpr.outvars]

    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat = evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), flat)

    return wrapped


def train_child(name: str, spec: dict, patches: bool = False) -> dict:
    """Training-step rate (units/s), its compiled cost and this process's peak RSS; with
    ``patches``, the loss's small-map convolutions by patches (:func:`with_small_convolutions_by_patches`)."""
    import jax
    import optax

    model, _, data, loss, units = build(name, spec["batch"])
    if patches:
        loss = with_small_convolutions_by_patches(loss)
    variables = model.params
    optimizer = optax.adamw(1e-4)
    params, state = variables["params"], optimizer.init(variables["params"])
    fixed = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, state, fixed, batch):
        def objective(p):
            return loss({"params": p, **fixed}, batch)

        (value, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        fixed = fixed if stats is None else {**fixed, "batch_stats": stats}
        return optax.apply_updates(params, updates), state, fixed, value

    carry = [params, state, fixed]

    def run():
        carry[0], carry[1], carry[2], value = step(*carry, data)
        jax.block_until_ready(value)

    seconds = timed(run, spec["repeats"])
    return {"rate": spec["batch"] * units / seconds, "cost": cost(step, params, state, fixed, data),
            "peak_gib": peak_rss_gib(), "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params)))}


def factorized_child(name: str, spec: dict) -> dict:
    """Features-only featurization rate, the featurize step's cost, attribute's marginal rate."""
    import jax

    import trakjax
    from trakjax import featurize

    batch, (small, large) = spec["batch"], spec["sizes"]
    model, task, data, _, units = build(name, large + spec["targets"])
    take = lambda tree, a, b: jax.tree_util.tree_map(lambda x: x[a:b], tree)  # noqa: E731
    settings = dict(FACTORIZED, batch_size=batch, grad_wrt=model.grad_wrt, backend="xla")
    config = trakjax.Config.create(grad_memory_bytes=2**40, **settings)
    first = take(data, 0, batch)
    checkpoint = featurize.prepare_checkpoint(task, model.params, config, 0, example=jax.tree_util.tree_map(lambda x: x[0], data))
    seconds = timed(lambda: featurize.featurize_batch(task, checkpoint, first, with_out_to_loss=False),
                    spec["repeats"])
    indices = np.arange(batch, dtype=np.int32)
    split_key = featurize.task_key(checkpoint.seed, checkpoint.model_id, featurize.TRAIN_SPLIT)
    step_args = (checkpoint.diff, checkpoint.fixed, first, checkpoint.aux, indices, split_key,
                 checkpoint.arrays)
    step_cost = cost(checkpoint.train_step, *step_args)
    features_cost = cost(checkpoint.target_step, *step_args)  # without q (what targets run)
    plan = checkpoint.spec.detail.plan
    targets = take(data, large, large + spec["targets"])
    times = {small: [], large: []}

    def attribute(n):
        start = time.perf_counter()
        trakjax.attribute(task, [model.params], take(data, 0, n), targets, grad_memory_bytes=2**40,
                          **settings)
        return time.perf_counter() - start

    attribute(small)  # warm-up: the first call also compiles what later calls find cached
    for _ in range(spec["attribute_repeats"]):
        for n in (small, large):
            times[n].append(attribute(n))
    times = {n: min(runs) for n, runs in times.items()}
    marginal = (large - small) * units / (times[large] - times[small])
    return {"featurize_rate": batch * units / seconds, "attribute_rate": marginal,
            "attribute_seconds": {str(n): t for n, t in times.items()}, "cost": step_cost,
            "cost_features_only": features_cost,
            "peak_gib": peak_rss_gib(), "k_fac": plan.k_fac, "factorized_leaves": len(plan.order),
            "dense_leaves": len(plan.dense)}


def run_child(name: str, variant: str, spec: dict) -> dict:
    """One measurement in a fresh process (its own peak RSS); returns its JSON result."""
    done = subprocess.run([sys.executable, __file__, "child", name, variant, json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name} {variant}: {json.dumps(result)}", flush=True)
    return result


# --------------------------------------------------------------------------- report


def report(name: str, spec: dict, train: dict, fact: dict, patched: dict | None = None) -> None:
    unit = UNITS[name]
    per = spec["batch"] * (GPT2_SHAPES[name]["positions"] if name in GPT2_SHAPES else 1)
    small, large = spec["sizes"]
    print(f"\n{name}: {train['num_params'] / 1e6:.2f}M parameters; batch {spec['batch']}; factor_dims 64, "
          f"proj_dim 2048 (K_fac = {fact['k_fac']}, {fact['factorized_leaves']} leaves factorized, "
          f"{fact['dense_leaves']} dense); attribute marginal between {small} and {large} training "
          f"examples, {spec['targets']} targets (seconds {fact['attribute_seconds']})\n")
    print(f"| step | {unit}/s | peak RSS GiB | XLA GFLOP per batch | XLA GB accessed per batch | while loops |")
    print("|---|---|---|---|---|---|")
    t, f = train["cost"], fact["cost"]
    print(f"| training step (value_and_grad + AdamW) | {train['rate']:.0f} | {train['peak_gib']:.2f} | "
          f"{t['flops'] / 1e9:.2f} | {t['bytes'] / 1e9:.2f} | {t['while_loops']} |")
    if patched:
        p = patched["cost"]
        print(f"| training step, small-map convolutions by patches | {patched['rate']:.0f} | "
              f"{patched['peak_gib']:.2f} | {p['flops'] / 1e9:.2f} | {p['bytes'] / 1e9:.2f} | {p['while_loops']} |")
    print(f"| factorized featurization, features only | {fact['featurize_rate']:.0f} | | "
          f"{f['flops'] / 1e9:.2f} (features + q) | {f['bytes'] / 1e9:.2f} | {f['while_loops']} |")
    g = fact.get("cost_features_only")
    if g:
        print(f"| (the same step without q) | | | {g['flops'] / 1e9:.2f} | {g['bytes'] / 1e9:.2f} | "
              f"{g['while_loops']} |")
    print(f"| factorized `attribute`, whole call, marginal | {fact['attribute_rate']:.0f} | "
          f"{fact['peak_gib']:.2f} | | | |")
    print(f"\n{name} ratios: attribute / training step {fact['attribute_rate'] / train['rate']:.2f}×; "
          f"featurization / training step {fact['featurize_rate'] / train['rate']:.2f}×; "
          f"featurize-step FLOPs / training-step FLOPs {f['flops'] / t['flops']:.2f} "
          f"({f['flops'] / per / 1e6:.1f} vs {t['flops'] / per / 1e6:.1f} MFLOP per {unit[:-1]}); "
          f"bytes {f['bytes'] / t['bytes']:.2f}×", flush=True)
    if patched:
        print(f"{name} against the training step with small-map convolutions by patches: attribute "
              f"{fact['attribute_rate'] / patched['rate']:.2f}×; featurization "
              f"{fact['featurize_rate'] / patched['rate']:.2f}×", flush=True)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        name, variant, spec = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        if variant == "factorized":
            result = factorized_child(name, spec)
        else:
            result = train_child(name, spec, patches=variant == "train-patches")
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="all", choices=[*UNITS, "all"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs=2, help="the two training-set sizes (default: per model)")
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of a step")
    parser.add_argument("--attribute-repeats", type=int, default=2, help="attribute calls per size")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    spec = dict(batch=args.batch, targets=args.targets, repeats=args.repeats,
                attribute_repeats=args.attribute_repeats)
    print(f"load average at the start {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for name in (list(UNITS) if args.model == "all" else [args.model]):
        sized = {**spec, "sizes": args.sizes or SIZES[name]}
        train = run_child(name, "train", sized)
        patched = run_child(name, "train-patches", sized) if name in CONVOLUTIONAL else None
        results[name] = (sized, train, run_child(name, "factorized", sized), patched)
    print(f"\n{machine()}")
    for name, (sized, train, fact, patched) in results.items():
        report(name, sized, train, fact, patched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
