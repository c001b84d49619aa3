"""Featurization speed on CPU: trakjax against the reference (traker 0.3.2), same model and settings.

Model: a CNN of about 370k parameters (3×3 convolutions of 64/128/256 channels with max-pooling,
global average pool, linear head) on 32×32×3 inputs; k = 2048, Rademacher projection, float32,
batch sizes 64 and 256. Both libraries featurize the same batches (per-example gradients of the
margin, projection, out-to-loss term) with the same weights. Also printed: the floor, i.e. the
per-example gradients alone and the projection matmul (R materialized) alone.

Run:  python benchmarks/featurize_cpu.py [--batches 2] [--batch-sizes 64 256]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trakjax import Config, featurize, tasks

PROJ_DIM = 2048


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, channels in enumerate((64, 128, 256)):
            x = nn.relu(nn.Conv(channels, (3, 3), padding="SAME")(x))
            if i < 2:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.mean(axis=(1, 2))
        return nn.Dense(10)(x)


def torch_cnn(params):
    import torch

    layers = []
    in_channels = 3
    for i, channels in enumerate((64, 128, 256)):
        conv = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
        p = params["params"][f"Conv_{i}"]
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1)))
            conv.bias.copy_(torch.tensor(np.asarray(p["bias"])))
        layers += [conv, torch.nn.ReLU()]
        if i < 2:
            layers.append(torch.nn.MaxPool2d(2))
        in_channels = channels

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(*layers)
            self.fc = torch.nn.Linear(256, 10)

        def forward(self, x):  # x: (B, 32, 32, 3), as in JAX
            h = self.features(x.permute(0, 3, 1, 2))
            return self.fc(h.mean(dim=(2, 3)))

    model = Head()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(np.asarray(params["params"]["Dense_0"]["kernel"]).T))
        model.fc.bias.copy_(torch.tensor(np.asarray(params["params"]["Dense_0"]["bias"])))
    return model.eval()


def timed(fn, repeats):
    fn()  # warm-up (compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def trakjax_rate(task, params, x, y, batch_size, batches):
    config = Config.create(proj_dim=PROJ_DIM, batch_size=batch_size, backend="xla")
    start = time.perf_counter()
    checkpoint = featurize.prepare_checkpoint(task, params, config, model_id=0)
    jax.block_until_ready(checkpoint.blocks)
    setup = time.perf_counter() - start
    featurize.featurize_batch(task, checkpoint, (x[:batch_size], y[:batch_size]))  # compile
    start = time.perf_counter()
    for b in range(batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        featurize.featurize_batch(task, checkpoint, (x[sl], y[sl]), np.arange(sl.start, sl.stop))
    elapsed = time.perf_counter() - start
    return batch_size * batches / elapsed, setup, checkpoint


def floor_rates(task, checkpoint, x, y, batch_size):
    diff, fixed = checkpoint.diff, checkpoint.fixed
    treedef = jax.tree_util.tree_structure(checkpoint.params)
    mask = checkpoint.mask

    @jax.jit
    def grads_only(diff, batch):
        return featurize.value_and_grads(task, treedef, mask, diff, fixed, batch, tasks.TaskState())

    batch = (jnp.asarray(x[:batch_size]), jnp.asarray(y[:batch_size]))
    t_grads = timed(lambda: jax.block_until_ready(grads_only(diff, batch)), 2)
    p = checkpoint.layout.total
    g = jax.random.normal(jax.random.key(0), (batch_size, p), jnp.float32)
    matrix = jnp.concatenate(checkpoint.blocks, axis=0)
    matmul = jax.jit(lambda g, m: jnp.matmul(g, m, precision=jax.lax.Precision.HIGHEST))
    t_proj = timed(lambda: jax.block_until_ready(matmul(g, matrix)), 2)
    return t_grads, t_proj


def reference_rate(params, x, y, batch_size, batches):
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = torch_cnn(params)
    num_params = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(
        grad_dim=num_params, proj_dim=PROJ_DIM, seed=0, proj_type=ProjectionType.rademacher,
        device="cpu", dtype=torch.float32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(
            model=model, task="image_classification", train_set_size=batch_size * (batches + 1),
            save_dir=tmp, device="cpu", projector=projector, use_half_precision=False,
            logging_level=logging.ERROR,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        tx, ty = torch.tensor(x), torch.tensor(y).long()
        traker.featurize(batch=[tx[:batch_size], ty[:batch_size]], num_samples=batch_size)  # warm-up
        start = time.perf_counter()
        for b in range(1, batches + 1):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            traker.featurize(batch=[tx[sl], ty[sl]], num_samples=batch_size)
        elapsed = time.perf_counter() - start
    return batch_size * batches / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help="timed batches per setting")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.default_backend()}")
    model = CNN()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"model: CNN with {num_params} parameters; k = {PROJ_DIM}, rademacher, float32")
    task = tasks.image_classification(model.apply)
    rng = np.random.default_rng(0)
    largest = max(args.batch_sizes) * (args.batches + 1)
    x = rng.normal(size=(largest, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, largest).astype(np.int32)

    rows = []
    for batch_size in args.batch_sizes:
        ours, setup, checkpoint = trakjax_rate(task, params, x, y, batch_size, args.batches)
        t_grads, t_proj = floor_rates(task, checkpoint, x, y, batch_size)
        floor = batch_size / (t_grads + t_proj)
        ref = float("nan") if args.skip_reference else reference_rate(params, x, y, batch_size, args.batches)
        rows.append((batch_size, ours, ref, floor, t_grads, t_proj, setup))
        print(
            f"batch {batch_size}: trakjax {ours:.1f} ex/s, reference {ref:.1f} ex/s, ratio {ours / ref:.2f}x; "
            f"floor {floor:.1f} ex/s (per-example grads {t_grads:.3f} s + projection matmul {t_proj:.3f} s "
            f"per batch), trakjax/floor = {ours / floor:.2f}; R materialized once per checkpoint in {setup:.1f} s",
            flush=True,
        )
    print("\n| batch | trakjax ex/s | reference ex/s | ratio | floor ex/s | trakjax / floor |")
    print("|---|---|---|---|---|---|")
    for batch_size, ours, ref, floor, *_ in rows:
        print(f"| {batch_size} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {floor:.1f} | {ours / floor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
