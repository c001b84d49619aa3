"""Subprocess worker for the scale-out tests (not collected by pytest).

usage: python distributed_worker.py OUT.npy devices|process|session [PROCESS_ID NUM_PROCESSES PORT [STORE_DIR]]

``devices``: run on this process's (simulated) devices, all of them and one of them, and save
both score matrices. ``process``: join a ``jax.distributed`` job on 127.0.0.1 with gloo CPU
collectives and save the scores this process returns. ``session``: the same job through one
shared TRAKer store, each process featurizing and scoring its own slice.
"""

import os
import sys

import numpy as np


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(75, 6)).astype(np.float32)  # N = 75: uneven over 2, 4 and 8 devices
    y = rng.integers(0, 4, 75).astype(np.int32)
    checkpoints = []
    for seed in range(2):
        r = np.random.default_rng(10 + seed)
        checkpoints.append({"w1": r.normal(size=(6, 12)).astype(np.float32), "w2": r.normal(size=(12, 4)).astype(np.float32)})
    return (x[:67], y[:67]), (x[67:], y[67:]), checkpoints


def settings():
    """The attribution settings; TRAKJAX_TEST_PROJECTION=factorized runs the factorized family
    (factor size 4: a second stage compresses K_fac = 32 features to 24) with the default λ
    (this untrained model's kernel at λ = 0.01 has condition 1e4, which amplifies the float32
    rounding of per-device reductions to about 2e-5). TRAKJAX_TEST_KERNEL (default "trak") sets
    the kernel; "gauss-newton" uses the default λ (the weighted Gram is about h̄ times smaller)."""
    projection = os.environ.get("TRAKJAX_TEST_PROJECTION", "rademacher")
    kernel = os.environ.get("TRAKJAX_TEST_KERNEL", "trak")
    if projection == "factorized" or kernel == "gauss-newton":
        extra = dict(factor_dims=4) if projection == "factorized" else {}
        return dict(projection=projection, proj_dim=24, batch_size=16, backend="xla", kernel=kernel, **extra)
    return dict(projection=projection, proj_dim=24, lambda_reg=0.01, batch_size=16, backend="xla", kernel=kernel)


def apply_fn(params, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def run(mesh):
    import trakjax
    from trakjax import tasks

    train, targets, checkpoints = problem()
    return trakjax.attribute(tasks.image_classification(apply_fn), checkpoints, train, targets,
                             mesh=mesh, **settings())


def run_session(save_dir):
    import jax

    import trakjax
    from trakjax import sharding, tasks

    train, targets, checkpoints = problem()
    traker = trakjax.TRAKer(
        tasks.image_classification(apply_fn), train_set_size=train[0].shape[0], save_dir=save_dir,
        **settings(),
    )
    start, stop = sharding.process_slice(train[0].shape[0])
    mine = np.arange(start, stop)
    for model_id, params in enumerate(checkpoints):
        traker.load_checkpoint(params, model_id)
        for lo in range(start, stop, 16):
            inds = mine[lo - start : lo - start + 16]
            traker.featurize((train[0][inds], train[1][inds]), inds=inds)
    traker.finalize_features()
    t = targets[0].shape[0]
    t_start = jax.process_index() * t // jax.process_count()
    t_stop = (jax.process_index() + 1) * t // jax.process_count()
    for model_id, params in enumerate(checkpoints):
        traker.start_scoring_checkpoint("targets", params, model_id, t)
        inds = np.arange(t_start, t_stop)
        traker.score((targets[0][inds], targets[1][inds]), inds=inds)
    return np.array(traker.finalize_scores("targets"))


def main():
    out, mode = sys.argv[1], sys.argv[2]
    import jax

    cache = os.environ.get("TRAKJAX_TEST_JAX_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if mode == "devices":
        from trakjax import sharding

        everything = run(None)
        single = run(sharding.data_mesh(jax.local_devices()[:1]))
        np.save(out, np.stack([everything, single]))
        print(f"devices={len(jax.local_devices())}")
    else:
        process_id, num_processes, port = (int(a) for a in sys.argv[3:6])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
        )
        scores = run(None) if mode == "process" else run_session(sys.argv[6])
        np.save(out, scores)
        print(f"process {jax.process_index()} of {jax.process_count()}")
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
