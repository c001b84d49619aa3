"""Data parallelism over examples: a ``data`` mesh axis on one host, ``jax.distributed`` across hosts.

On one host, featurization, the Gram, the features F = Φ A⁻¹ and score rows are sharded by
examples over a 1-D mesh whose axis is named ``"data"`` (``jax.shard_map``): each device computes
per-example gradients and projections for its share of a batch, and the Gram ΦᵀΦ is a ``psum``
of per-device partial Grams. The k×k solve is small and replicated.

Across processes (``jax.distributed.initialize``), each process featurizes its own contiguous
slice of the training set on its local devices; the only cross-process communication is the
reduction of the per-checkpoint Gram and the final gathering of score rows
(:func:`process_sum`, :func:`process_concat`). Every process makes the same sequence of these
collective calls whatever its slice size, so uneven slices never deadlock.

The mesh is built with ``AxisType.Auto`` on purpose: all sharded computation goes through
``shard_map`` with explicit ``in_specs``/``out_specs``, and host arrays handed to it are placed to
match those specs; explicit-axis typing would add nothing but constraints on the caller's arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from trakjax.errors import ArgumentTypeError, InvalidArgumentError

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise InvalidArgumentError("devices is empty; a mesh needs at least one device")
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def check_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh`` (or the default :func:`data_mesh`), checked to have a ``"data"`` axis of local devices."""
    if mesh is None:
        return data_mesh()
    if not isinstance(mesh, Mesh):
        raise ArgumentTypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if mesh.axis_names != (DATA_AXIS,):
        raise InvalidArgumentError(
            f"mesh must have exactly one axis named {DATA_AXIS!r}, got axis names {mesh.axis_names}"
        )
    local = set(jax.local_devices())
    foreign = [d for d in mesh.devices.flat if d not in local]
    if foreign:
        raise InvalidArgumentError(
            "mesh must hold only this process's local devices (each process featurizes its own "
            f"slice on its own devices); it holds non-local devices {foreign[:3]}"
        )
    return mesh


def mesh_size(mesh: Mesh | None) -> int:
    """Number of devices on the ``data`` axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.devices.size)


def mesh_platform(mesh: Mesh | None) -> str:
    """The platform ("cpu", "gpu", "tpu") a step over ``mesh`` runs on: its devices', else the
    default backend's."""
    if mesh is None:
        return jax.default_backend()
    return mesh.devices.flat[0].platform


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ≥ ``n``."""
    return -(-n // multiple) * multiple


def shard_map_rows(fn, mesh: Mesh | None, num_row_args: int, num_replicated_args: int, reduce: bool = False):
    """jit of ``fn`` with its first ``num_row_args`` arguments sharded by rows over ``mesh``.

    The remaining ``num_replicated_args`` arguments are replicated. Outputs are sharded by rows,
    or, with ``reduce``, summed over devices (``psum``) and replicated. Without a mesh (or with
    one device) this is plain ``jax.jit(fn)`` (with the sum being the identity).
    """
    if mesh_size(mesh) == 1:
        return jax.jit(fn)
    rows = PartitionSpec(DATA_AXIS)
    in_specs = (rows,) * num_row_args + (PartitionSpec(),) * num_replicated_args

    if reduce:
        def local(*args):
            return jax.lax.psum(fn(*args), DATA_AXIS)

        out_specs = PartitionSpec()
    else:
        local = fn
        out_specs = rows
    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    )


# --------------------------------------------------------------------------- across processes


def process_slice(n: int) -> tuple[int, int]:
    """This process's contiguous share ``[start, stop)`` of ``n`` examples (sizes differ by ≤ 1)."""
    count, index = jax.process_count(), jax.process_index()
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def process_sum(local: np.ndarray) -> np.ndarray:
    """Σ over processes of a float64 array, in float64, identical on every process.

    Collectives run in float32 here, so each value travels as two float32 words (hi + lo, about
    48 bits of mantissa) and the sum is formed in float64 on every host, in process order.
    """
    local = np.asarray(local, np.float64)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    hi = local.astype(np.float32)
    lo = (local - hi.astype(np.float64)).astype(np.float32)
    gathered = multihost_utils.process_allgather(np.stack([hi, lo]), tiled=False)
    gathered = np.asarray(gathered, np.float64)  # (processes, 2, ...)
    return (gathered[:, 0] + gathered[:, 1]).sum(axis=0)


def process_concat(local_rows: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (float32, any row counts) in process order, on every process."""
    local_rows = np.asarray(local_rows, np.float32)
    if jax.process_count() == 1:
        return local_rows
    from jax.experimental import multihost_utils

    counts = np.asarray(
        multihost_utils.process_allgather(np.array([local_rows.shape[0]], np.int32), tiled=False)
    ).reshape(-1)
    width = int(counts.max())
    padded = np.zeros((width, *local_rows.shape[1:]), np.float32)
    padded[: local_rows.shape[0]] = local_rows
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
    return np.concatenate([gathered[i, : counts[i]] for i in range(len(counts))])


@functools.cache
def cpu_devices_share_memory(mesh: Mesh | None) -> bool:
    """Whether the mesh's devices are CPU devices of one process (which share host memory)."""
    return mesh is not None and all(d.platform == "cpu" for d in mesh.devices.flat)
