"""The Pallas projection kernel (interpret mode on CPU) against the contract and the XLA path.

Entries of R are revealed exactly by one-hot and all-ones inputs and checked against an
independent pure-Python implementation of the contract (tests/test_randomness.py) and its frozen
golden values; projections of random inputs are checked against the plain-jnp reference, the
XLA path and JL statistics. Row offsets beyond 2³² are synthetic: a small G placed at a huge
row index. Shapes stay small: interpret mode is slow.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_randomness import py_entry
from trakjax.kernels import projection as kernel

import trakjax
from trakjax import backends, randomness, tasks
from trakjax import projection as xla_projection

SEED, MODEL_ID = 7, 3


def key_of(kind, seed=SEED, model_id=MODEL_ID):
    return randomness.stream_key(seed, model_id, kind)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


# --------------------------------------------------------------------------- exact entries


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_hot_rows_reveal_golden_entries(dtype):
    # G = I reveals R's first rows; contract v1 golden values (seed 0, model 0).
    golden = np.array(
        [
            [-1, 1, -1, 1, -1, 1, -1, 1],
            [-1, -1, -1, -1, -1, 1, -1, 1],
            [-1, -1, 1, -1, -1, 1, -1, 1],
            [-1, 1, -1, -1, -1, 1, 1, -1],
        ],
        np.float32,
    )
    got = kernel.project(
        jnp.eye(4, dtype=dtype), kind="rademacher", proj_dim=8, key=key_of("rademacher", 0, 0)
    )
    np.testing.assert_array_equal(np.asarray(got), golden)


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_entries_match_pure_python_contract_beyond_2_32(kind):
    # One-hot rows at parameter indices up to ~2**53 (block index beyond 2**32).
    rows = [0, 2047, 2048 + 64 * 7 + 3, 10_000_019, 2**32 + 2048 * 3 + 100, 2**43 * 1024 + 9]
    k = 20
    key = key_of(kind, 2**40 + 7, 2**31 + 5)
    for row in rows:
        got = np.asarray(
            kernel.project(jnp.ones((1, 1), jnp.float32), kind=kind, proj_dim=k, key=key, row_start=row)
        )[0]
        want = np.array([py_entry(kind, 2**40 + 7, 2**31 + 5, row, c) for c in range(k)])
        if kind == "rademacher":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_identity_input_reveals_exact_pm_one_rows_across_block_lo_wrap():
    # 3000 rows starting 100 rows into block 2**32 - 1: the kernel's block_lo wraps to 0 and
    # carries into block_hi inside one kernel call. G = I (B = 3000) reveals every entry.
    row_start = (2**32 - 1) * 2048 + 100
    n, k = 3000, 24
    key = key_of("rademacher")
    got = np.asarray(
        kernel.project(jnp.eye(n, dtype=jnp.bfloat16), kind="rademacher", proj_dim=k, key=key,
                       row_start=row_start, block_b=128, block_k=32)
    )
    want = np.asarray(randomness.projection_matrix("rademacher", SEED, MODEL_ID, row_start, n, k))
    assert set(np.unique(got)) == {-1.0, 1.0}
    np.testing.assert_array_equal(got, want)
    spot = [py_entry("rademacher", SEED, MODEL_ID, row_start + i, c) for i, c in [(0, 0), (1947, 5), (1948, 5), (2999, 23)]]
    assert [got[0, 0], got[1947, 5], got[1948, 5], got[2999, 23]] == spot


@pytest.mark.parametrize("num_rows", [4999, 5000])
def test_all_ones_sums_have_the_parity_of_p(num_rows):
    # Σ of P entries ±1 is an integer with the parity of P and |Σ| ≤ P; exact in float32.
    key = key_of("rademacher")
    got = np.asarray(
        kernel.project(jnp.ones((1, num_rows), jnp.float32), kind="rademacher", proj_dim=40,
                       key=key, row_start=2**32 + 12345)
    )[0]
    assert np.all(got == np.round(got))
    assert np.all(np.abs(got) <= num_rows)
    assert np.all(np.mod(got, 2) == num_rows % 2)
    want = np.asarray(randomness.projection_matrix("rademacher", SEED, MODEL_ID, 2**32 + 12345, num_rows, 40)).sum(0)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- random inputs


@pytest.mark.parametrize(
    "kind,batch,num_rows,k,row_start,dtype",
    [
        ("rademacher", 3, 4093, 37, 0, jnp.float32),  # P prime, k not a multiple of any tile
        ("rademacher", 1, 2503, 1, 2**32 + 17, jnp.float32),  # B = 1, k = 1, offset > 2**32
        ("rademacher", 20, 3001, 130, 5, jnp.bfloat16),  # bfloat16, k > one column tile
        ("normal", 5, 2111, 19, 2**33 + 2040, jnp.float32),  # normal, straddles a block edge
        ("normal", 2, 1500, 16, 0, jnp.float16),
    ],
)
def test_project_matches_jnp_reference(kind, batch, num_rows, k, row_start, dtype):
    rng = np.random.default_rng(num_rows)
    g = jnp.asarray(rng.standard_normal((batch, num_rows)), dtype)
    key = key_of(kind)
    got = kernel.project(g, kind=kind, proj_dim=k, key=key, row_start=row_start)
    want = kernel.reference_project(g, kind=kind, proj_dim=k, key=key, row_start=row_start)
    assert got.shape == (batch, k) and got.dtype == jnp.float32
    assert rel_err(got, want) < 2e-6
    # and the reference itself is G·R with R from the contract's public generator
    rows = randomness.projection_matrix(kind, SEED, MODEL_ID, row_start, num_rows, k)
    np.testing.assert_allclose(
        np.asarray(want), np.asarray(g, np.float64) @ np.asarray(rows, np.float64), rtol=1e-5, atol=1e-4
    )


def test_results_do_not_depend_on_tile_sizes_or_chunks():
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal((33, 4500)), jnp.float32)
    key = key_of("rademacher")
    args = dict(kind="rademacher", proj_dim=70, key=key, row_start=2**32 - 1000)
    base = np.asarray(kernel.project(g, **args, block_b=16, block_k=16))
    for block_b, block_k in [(32, 64), (64, 128)]:
        np.testing.assert_array_equal(np.asarray(kernel.project(g, **args, block_b=block_b, block_k=block_k)), base)
    # Chunking changes only the float32 summation order (1.2e-6 compiled on an H200).
    chunked = kernel.project(g, **args, chunk_columns=2048)
    assert rel_err(chunked, base) < 5e-6


def test_several_segments_along_p_with_block_lo_wrap():
    # 33 blocks + 5 rows: two grid segments of up to 32 blocks along P, partial sums added; the
    # first block is 2**32 - 40, so block_lo wraps inside the second segment.
    num_rows = 33 * 2048 + 5
    assert num_rows > kernel.SEGMENT_BLOCKS * 2048
    row_start = (2**32 - 40) * 2048 + 3
    g = jnp.asarray(np.random.default_rng(9).standard_normal((2, num_rows)), jnp.float32)
    key = key_of("rademacher")
    got = kernel.project(g, kind="rademacher", proj_dim=16, key=key, row_start=row_start)
    want = kernel.reference_project(g, kind="rademacher", proj_dim=16, key=key, row_start=row_start)
    assert rel_err(got, want) < 1e-5  # the kernel's float32 target (4.6e-6 compiled on an H200)


def test_precision_policies():
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.standard_normal((4, 3000)), jnp.float32)
    key = key_of("rademacher")
    want = kernel.reference_project(g, kind="rademacher", proj_dim=16, key=key)
    for precision in ("highest", "high", "default"):
        got = kernel.project(g, kind="rademacher", proj_dim=16, key=key, precision=precision)
        # "default" is TF32 on a GPU (10 mantissa bits: 2.3e-4 measured on an H200), exact when interpreted
        tf32 = precision == "default" and jax.default_backend() == "gpu"
        assert rel_err(got, want) < (1e-3 if tf32 else 2e-5), precision


def test_jl_statistics():
    # For R with iid ±1 entries, ‖Rᵀx‖²/k has mean ‖x‖² and variance 2‖x‖⁴(1 − Σx⁴/‖x‖⁴)/k;
    # inner products are preserved in expectation.
    n, k, trials = 3000, 256, 24
    rng = np.random.default_rng(5)
    x = rng.standard_normal((trials, n)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = kernel.project(jnp.asarray(x), kind="rademacher", proj_dim=k, key=key_of("rademacher"))
    y = np.asarray(y, np.float64)
    ratios = (y**2).sum(1) / k
    assert abs(ratios.mean() - 1.0) < 4 * math.sqrt(2 / k / trials)
    assert 0.5 * 2 / k < ratios.var() < 2.0 * 2 / k
    inner = (y[0::2] * y[1::2]).sum(1) / k
    exact = (x[0::2].astype(np.float64) * x[1::2]).sum(1)
    assert np.abs(inner - exact).max() < 5 * math.sqrt(1 / k)
    # columns are uncorrelated: the k×k correlation of φ over many inputs is near I.
    normal = kernel.project(jnp.asarray(x), kind="normal", proj_dim=k, key=key_of("normal"))
    ratios_n = (np.asarray(normal, np.float64) ** 2).sum(1) / k
    assert abs(ratios_n.mean() - 1.0) < 4 * math.sqrt(2 / k / trials)


# --------------------------------------------------------------------------- pytree path


def _grads(rng, batch, shapes, dtype=jnp.float32):
    return {f"p{i}": jnp.asarray(rng.standard_normal((batch, *s)), dtype) for i, s in enumerate(shapes)}


@pytest.mark.parametrize(
    "kind,batch,shapes,k,dtype",
    [
        # P = 4099 (prime); leaves straddle the 2048-row blocks; chunk of 2048 rows forces a
        # fori_loop over whole chunks inside the large leaf plus straddling chunks.
        ("rademacher", 3, [(7,), (4000,), (3, 4), (80,)], 37, jnp.float32),
        ("rademacher", 1, [(4097,), (1,)], 1, jnp.bfloat16),
        ("normal", 4, [(10, 201), (3,)], 20, jnp.float32),
    ],
)
def test_project_pytree_matches_xla_path(kind, batch, shapes, k, dtype):
    rng = np.random.default_rng(len(shapes))
    grads = _grads(rng, batch, shapes, dtype)
    key = jnp.uint32(key_of(kind))
    xla = xla_projection.project(grads, kind=kind, proj_dim=k, key=key, chunk_rows=2048)
    # chunk_bytes so small that every chunk is one 2048-row block
    run = jax.jit(lambda g, key: kernel.project_pytree(g, kind=kind, proj_dim=k, key=key, chunk_bytes=1))
    got = run(grads, key)
    assert got.shape == (batch, k)
    assert rel_err(got, xla) < 2e-6
    default_chunks = kernel.project_pytree(grads, kind=kind, proj_dim=k, key=key)
    assert rel_err(default_chunks, xla) < 2e-6


def test_backend_seam_and_auto_fallback(caplog):
    grads = _grads(np.random.default_rng(2), 2, [(300,), (5, 7)])
    key = jnp.uint32(key_of("rademacher"))
    via_seam = backends.project(grads, kind="rademacher", proj_dim=24, key=key, backend="pallas")
    via_xla = backends.project(grads, kind="rademacher", proj_dim=24, key=key, backend="xla")
    assert rel_err(via_seam, via_xla) < 2e-6
    available, reason = kernel.gpu_lowering_available()
    if jax.default_backend() != "gpu":
        assert not available and "not 'gpu'" in reason
        with caplog.at_level(logging.INFO, logger="trakjax"):
            assert backends.resolve("auto") == "xla"
        assert "using the XLA projection" in caplog.text


def test_attribute_pallas_backend_gives_xla_scores():
    # A linear softmax classifier: P = 6·4 + 4 = 28 parameters, k = 16.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=24).astype(np.int32)
    params = [
        {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
        for _ in range(2)
    ]
    task = tasks.image_classification(lambda p, xb: xb @ p["w"] + p["b"])
    common = dict(proj_dim=16, seed=11, batch_size=8)
    xla = trakjax.attribute(task, params, (x[:20], y[:20]), (x[20:], y[20:]), backend="xla", **common)
    pallas = trakjax.attribute(task, params, (x[:20], y[:20]), (x[20:], y[20:]), backend="pallas", **common)
    assert pallas.shape == (20, 4)
    assert rel_err(pallas, xla) <= 1e-5


# --------------------------------------------------------------------------- lowering and errors


def test_kernel_lowers_to_triton_ir():
    # Lowers the compiled (non-interpret) kernel for CUDA on this machine: Pallas's Triton
    # lowering runs and emits the Triton custom call. (Compiling the Triton IR to PTX needs a GPU
    # toolchain; benchmarks/gpu_projection.py runs it on a GPU.)
    def f(g, key):
        return kernel.project(g, kind="rademacher", proj_dim=48, key=key, row_start=2**33 + 1,
                              interpret=False)

    args = (jax.ShapeDtypeStruct((20, 3000), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.uint32))
    try:
        lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    except RuntimeError as err:
        if "No supported GPU devices" not in str(err):
            raise
        # JAX >= 0.11 picks the GPU architecture from a device: lower for an abstract H100.
        abstract_device = getattr(jax.sharding, "AbstractDevice", None)
        if abstract_device is None:
            pytest.skip(f"this JAX needs a GPU (or jax.sharding.AbstractDevice) to lower Pallas Triton: {err}")
        h100 = abstract_device(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


def test_errors_name_the_bad_argument():
    g = jnp.ones((2, 10))
    key = key_of("rademacher")
    with pytest.raises(ValueError, match="block_b must be a power of two"):
        kernel.project(g, kind="rademacher", proj_dim=4, key=key, block_b=24)
    with pytest.raises(ValueError, match="kind must be 'rademacher' or 'normal'"):
        kernel.project(g, kind="identity", proj_dim=4, key=key)
    with pytest.raises(TypeError, match="floating point"):
        kernel.project(jnp.ones((2, 10), jnp.int32), kind="rademacher", proj_dim=4, key=key)
    with pytest.raises(ValueError, match="row_start"):
        kernel.project(g, kind="rademacher", proj_dim=4, key=key, row_start=2**64 - 5)
    with pytest.raises(ValueError, match="proj_dim must be >= 1"):
        kernel.project_pytree({"a": g}, kind="rademacher", proj_dim=0, key=key)


@pytest.mark.skipif(not kernel.gpu_lowering_available()[0], reason="needs a GPU where Pallas Triton compiles")
@pytest.mark.parametrize("kind,dtype", [("rademacher", jnp.float32), ("rademacher", jnp.bfloat16), ("normal", jnp.float32)])
def test_compiled_kernel_on_gpu(kind, dtype):
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.standard_normal((40, 9001)), dtype)
    key = key_of(kind)
    got = kernel.project(g, kind=kind, proj_dim=300, key=key, row_start=2**32 - 3000, interpret=False)
    with jax.default_matmul_precision("highest"):
        want = kernel.reference_project(g, kind=kind, proj_dim=300, key=key, row_start=2**32 - 3000)
    assert rel_err(got, want) < 1e-5
