"""Per-executable XLA options for trakjax's featurize step, and the probe that checks them.

The featurize step reduces per-example arrays along a middle axis: a layer norm's gain and
bias gradients Σ_t over each sequence's positions, (B, T, d) → (B, d), and the same inside
attention and the model's own backward pass. On the CPU backend of JAX 0.10–0.12, XLA hands
such reductions to YNNPACK ("ynn fusions"); a perfetto trace of the 4-layer GPT-2 step timed
each (8, 128, 768) → (8, 768) sum there at 6.3 ms, against 0.45 ms for the same reduction
compiled alone (part of that may be the step's other work running beside it). Restricting
YNNPACK to individual matrix products for this one executable made featurization 6–20% faster
on the benchmark models on JAX 0.10 (the 373k CNN 20%, GPT-2 6–11%, ResNet-18 7%) and 3–13% on
JAX 0.12, GPT-2 there unchanged (benchmarks/README.md, "YNNPACK reductions"). The plain
``LIBRARY_FUSION_TYPE_DOT`` is not used: it let XLA fuse the dense family's six block products
into one YNNPACK graph that ran 1.9× slower on the digits MLP.

Only the featurize step gets the option (``jax.jit(..., compiler_options=...)``); the user's
own programs and XLA's process-wide flags are left alone. The option is experimental in XLA,
so it is probed once per process by compiling a tiny reduction with it: an XLA that does not
know the option (``INVALID_ARGUMENT``, "No such compile option") gets no option, and
:func:`featurize_step_options` says so in :data:`STATUS`. Other backends get none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# YNNPACK for individual matrix products only (XLA's default list also has reductions): a
# repeated enum in XLA's DebugOptions, given as one value through compile options.
CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}

STATUS: dict[str, str] = {}


def featurize_step_options(platform: str) -> dict[str, str]:
    """The compiler options of the featurize step on ``platform`` ("cpu", "gpu", "tpu"): the
    CPU options above when this XLA accepts them, else none."""
    if platform != "cpu":
        return {}
    return dict(_cpu_options_accepted())


@functools.lru_cache(maxsize=1)
def _cpu_options_accepted() -> tuple:
    probe = jax.jit(lambda x: jnp.sum(x * x, axis=1), compiler_options=CPU_STEP_OPTIONS)
    try:
        probe.lower(jax.ShapeDtypeStruct((2, 3, 4), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError as error:
        if "INVALID_ARGUMENT" not in str(error):
            raise
        STATUS["cpu"] = f"not applied: this XLA rejects {CPU_STEP_OPTIONS} ({error})"
        return ()
    STATUS["cpu"] = f"applied: {CPU_STEP_OPTIONS}"
    return tuple(CPU_STEP_OPTIONS.items())
