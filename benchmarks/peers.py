"""The PyTorch side of issue 20's table: HF GPT2LMHeadModel, its training step, dattri and Bergson.

Run with a SEPARATE virtual environment holding the peers (never trakjax's)::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install bergson==2.5.1 dattri==0.3.0
    /work/peers-venv/bin/python benchmarks/peers.py [small|large|all]

(bergson 2.5.1 needs transformers ≥ 5, so this side runs transformers 5.x, the Flax side 4.57.6.)

Shapes (random init from a config built here, dropout 0, no download):

* ``small``: 2 layers, d 256, 4 heads, vocab 8192, 64 positions; 32 → 128 sequences.
* ``large``: 4 layers, d 768, 12 heads, vocab 50257, 128 positions; 16 → 64 sequences.

Batch 8 throughout. Each variant runs in its own process (its own peak RSS, VmHWM):

* ``train``: ``torch.optim.AdamW`` step on the mean next-token cross-entropy; tokens/s.
* ``dattri``: ``dattri.algorithm.LoGraAttributor(task, hessian="Identity", proj_dim=144)``:
  a 12 × 12 Kronecker projection per ``nn.Linear`` (HF's ``Conv1D`` layers are converted to
  equivalent ``nn.Linear`` first, since dattri hooks only ``nn.Linear``; the tied ``lm_head`` is
  one of them), identity second stage; ``attributor.cache(loader)`` featurizes the training set.
  The per-example function is the summed next-token margin log p/(1 − p) of each sequence.
* ``bergson``: ``bergson.InMemoryCollector`` + ``CollectorComputer`` with
  ``IndexConfig(projection_dim=p, loss_fn="log_odds", loss_reduction="sum")`` (the summed
  next-token log-odds, the same margin), per-module two-sided projection of every Linear/Conv1D
  gradient to p × p, p chosen so the total is ≈ 2k features.

The featurization rate of each peer is marginal: ``(n_large − n_small) · L / (t_large − t_small)``
over two training-set sizes, after a warm-up call, the fastest of ``--repeats`` calls per size
(issue 20's definition; setup and anything per-call cancel). Output: the same table as
benchmarks/hf_models.py and benchmarks/factorized.py print, in tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_common import peak_rss_gib

SHAPES = {
    "small": dict(layers=2, d=256, heads=4, vocab=8192, positions=64, sizes=[32, 128]),
    "large": dict(layers=4, d=768, heads=12, vocab=50257, positions=128, sizes=[16, 64]),
}


def gpt2(shape: dict, linear: bool = False):
    """HF GPT2LMHeadModel, random init (seed 0), dropout 0; ``linear``: Conv1D → nn.Linear."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = GPT2Config(n_layer=shape["layers"], n_embd=shape["d"], n_head=shape["heads"],
                        vocab_size=shape["vocab"], n_positions=shape["positions"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    if linear:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):  # y = x W + b with W (in, out): nn.Linear's W is Wᵀ
                    layer = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                    with torch.no_grad():
                        layer.weight.copy_(child.weight.T)
                        layer.bias.copy_(child.bias)
                    setattr(parent, name, layer)
    return model


def token_ids(shape: dict, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, shape["vocab"], (n, shape["positions"])).astype(np.int64)


def summed_margins(model, ids):
    """Σ over sequences and positions of m_t = logit_y − log Σ_{j≠y} exp logit_j (the log-odds)."""
    import torch

    logits = model(ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    correct = logits.gather(-1, targets[..., None])[..., 0]
    rest = logits.scatter(-1, targets[..., None], float("-inf"))
    return (correct - torch.logsumexp(rest, dim=-1)).sum()


def marginal(featurize, sizes, tokens_per_example: int, repeats: int) -> tuple[float, dict]:
    """Marginal tokens/s of ``featurize(n)`` between the two sizes, after a warm-up call."""
    small, large = sizes
    featurize(small)
    times = {small: [], large: []}
    for _ in range(repeats):
        for n in (small, large):
            start = time.perf_counter()
            featurize(n)
            times[n].append(time.perf_counter() - start)
    best = {n: min(t) for n, t in times.items()}
    return (large - small) * tokens_per_example / (best[large] - best[small]), {str(n): t for n, t in best.items()}


# --------------------------------------------------------------------------- children


def train_child(shape: dict, spec: dict) -> dict:
    import torch

    model = gpt2(shape)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.from_numpy(token_ids(shape, spec["batch"]))

    def step():
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()  # mean next-token cross-entropy
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    seconds = (time.perf_counter() - start) / spec["steps"]
    return {"rate": ids.numel() / seconds, "peak_gib": peak_rss_gib(),
            "num_params": sum(p.numel() for p in model.parameters())}


def dattri_child(shape: dict, spec: dict) -> dict:
    import torch
    from dattri.algorithm import LoGraAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    model = gpt2(shape, linear=True)
    model.eval()
    ids = torch.from_numpy(token_ids(shape, shape["sizes"][1]))

    def loss(model, batch, device):
        return summed_margins(model, batch["input_ids"].to(device))

    dims = {}

    def featurize(n):
        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        attributor = LoGraAttributor(task, hessian="Identity", proj_dim=144, device="cpu", offload="none",
                                     cache_dir=tempfile.mkdtemp(prefix="dattri-"))  # its metadata file
        examples = [{"input_ids": row} for row in ids[:n]]  # dicts: dattri calls model(**batch)
        attributor.cache(DataLoader(examples, batch_size=spec["batch"]))
        dims.update(layers=len(attributor.layer_names), features=attributor.total_proj_dim)

    rate, seconds = marginal(featurize, shape["sizes"], shape["positions"], spec["repeats"])
    return {"rate": rate, "seconds": seconds, "peak_gib": peak_rss_gib(), **dims}


def bergson_child(shape: dict, spec: dict) -> dict:
    from bergson import CollectorComputer, GradientProcessor, IndexConfig, InMemoryCollector
    from datasets import Dataset

    model = gpt2(shape)
    model.eval()
    side = spec["bergson_side"][shape["name"]]
    data = Dataset.from_dict({"input_ids": token_ids(shape, shape["sizes"][1]).tolist()})
    run_path = os.path.join(tempfile.mkdtemp(prefix="bergson-"), "index")
    os.makedirs(run_path + ".part")  # the processor is saved there, as bergson's build does
    cfg = IndexConfig(run_path=run_path, projection_dim=side, loss_fn="log_odds", loss_reduction="sum")
    dims = {}

    def featurize(n):
        subset = data.select(range(n))
        processor = GradientProcessor(projection_dim=side)
        collector = InMemoryCollector(model=model.base_model, cfg=cfg, processor=processor, data=subset)
        batches = [list(range(i, min(i + spec["batch"], n))) for i in range(0, n, spec["batch"])]
        CollectorComputer(model=model, data=subset, collector=collector, batches=batches, cfg=cfg
                          ).run_with_collector_hooks(desc="bergson")
        dims.update(modules=len(collector.gradients),
                    features=int(sum(g.shape[1] for g in collector.gradients.values())))

    rate, seconds = marginal(featurize, shape["sizes"], shape["positions"], spec["repeats"])
    return {"rate": rate, "seconds": seconds, "peak_gib": peak_rss_gib(), **dims}


CHILDREN = {"train": train_child, "dattri": dattri_child, "bergson": bergson_child}


def run_child(shape_name: str, variant: str, spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "child", shape_name, variant, json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{shape_name} {variant} failed:\n{done.stderr[-3000:]}", flush=True)
        return {"rate": float("nan"), "peak_gib": float("nan"), "error": done.stderr[-300:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{shape_name} {variant}: {json.dumps(result)}", flush=True)
    return result


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        name, variant, spec = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        import torch

        torch.set_num_threads(spec["threads"])
        shape = {**SHAPES[name], "name": name, **({"sizes": spec["sizes"]} if spec["sizes"] else {})}
        print(json.dumps(CHILDREN[variant](shape, spec)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", default="all", choices=["small", "large", "all"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=1, help="featurization calls per size")
    parser.add_argument("--sizes", type=int, nargs=2, help="override the two training-set sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", nargs="+", default=list(CHILDREN), choices=list(CHILDREN))
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    spec = dict(batch=args.batch, steps=args.steps, repeats=args.repeats, threads=args.threads, sizes=args.sizes,
                bergson_side={"small": 16, "large": 12})
    print(f"load average at the start {os.getloadavg()[0]:.1f}", flush=True)
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    results = {name: {v: run_child(name, v, spec) for v in args.variants} for name in names}
    import torch

    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch "
          f"{torch.__version__} ({args.threads} threads); load average {os.getloadavg()[0]:.1f} at the end")
    labels = {"train": "PyTorch AdamW training step",
              "dattri": "dattri 0.3 LoGra featurization (12×12 per Linear, identity second stage), marginal",
              "bergson": "Bergson 2.5.1 featurization (p×p per module), marginal"}
    for name in names:
        shape, rows = SHAPES[name], results[name]
        print(f"\n{name}: {shape['layers']} layers, d {shape['d']}, vocab {shape['vocab']}, seq "
              f"{shape['positions']}; batch {args.batch}; marginal {(args.sizes or shape['sizes'])[0]} → "
              f"{(args.sizes or shape['sizes'])[1]} sequences\n")
        print("| step | tokens/s | peak RSS GiB | features |")
        print("|---|---|---|---|")
        for variant, r in rows.items():
            print(f"| {labels[variant]} | {r['rate']:.0f} | {r['peak_gib']:.2f} | {r.get('features', '')} |")
        train = rows.get("train", {}).get("rate")
        if train:
            print("\n" + "; ".join(f"{v} / training step {r['rate'] / train:.2f}×" for v, r in rows.items()
                                   if v != "train"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
