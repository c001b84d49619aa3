"""Parameter views: how a value in a jaxpr is laid out in terms of one parameter leaf's axes.

The factorized family's interpreter follows each differentiated leaf W through layout-only
operations (reshape, transpose, dtype casts, squeeze, broadcasts that add size-1 axes, slicing
out a slice index) to the contractions that consume it. A :class:`View` records, for each axis
of such a value, which leaf axes it holds:

* ``dims[i]`` is a tuple of leaf axes, a contiguous increasing run (a reshape may merge
  neighbouring leaf axes, row-major, and split them again at leaf-axis boundaries), or ``()`` for
  an axis that holds no leaf axis (size 1, or broadcast: the same entries repeated);
* ``fixed`` lists the leaf axes that are no longer axes of the value, each with a token:
  ``("index", i)`` for a static index (``W[i]``), ``("scan", uid)`` for the axis a ``lax.scan``
  iterates over (uid names the scan equation).

:func:`propagate` applies one layout equation to a view; it returns the new view, or a string
saying why the operation is not a layout-only view of the leaf (the leaf then goes dense).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trakjax.factorized.compat import Literal

CAST_PRIMITIVES = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint"})


class View(NamedTuple):
    """A value's layout in terms of leaf ``leaf``'s axes (see the module docstring)."""

    leaf: int
    dims: tuple[tuple[int, ...], ...]
    fixed: tuple[tuple[int, tuple], ...] = ()


def leaf_view(leaf: int, ndim: int) -> View:
    """The view of the leaf itself: value axis i is leaf axis i."""
    return View(leaf, tuple((a,) for a in range(ndim)))


def propagate(eqn, view: View, in_shape: tuple, out_shape: tuple, leaf_shape: tuple) -> View | str:
    """The view of ``eqn``'s output given the view of its (first) operand.

    ``in_shape``/``out_shape`` are the operand's and result's shapes, ``leaf_shape`` the leaf's.
    """
    name = eqn.primitive.name
    params = eqn.params
    if name in CAST_PRIMITIVES:
        return view
    if name == "transpose":
        return view._replace(dims=tuple(view.dims[p] for p in params["permutation"]))
    if name == "squeeze":
        return _squeeze(view, in_shape, params["dimensions"])
    if name == "reshape":
        if params.get("dimensions") is not None:
            return "reshape with a dimension permutation"
        return _reshape(view, in_shape, out_shape, leaf_shape)
    if name == "broadcast_in_dim":
        return _broadcast(view, in_shape, out_shape, params["broadcast_dimensions"])
    if name == "slice":
        if params.get("strides") not in (None, (1,) * len(in_shape)):
            return "strided slice"
        return _slice(view, in_shape, params["start_indices"], params["limit_indices"])
    if name == "dynamic_slice":
        starts = eqn.invars[1:]
        if not all(isinstance(s, Literal) for s in starts):
            return "indexed with a traced index (dynamic_slice)"
        sizes = params["slice_sizes"]
        begin = [min(max(int(np.asarray(s.val)), 0), d - z)
                 for s, d, z in zip(starts, in_shape, sizes, strict=True)]
        return _slice(view, in_shape, begin, [b + z for b, z in zip(begin, sizes, strict=True)])
    return f"{name} is not a layout operation"


def _pin(view: View, axes) -> View:
    """Drop size-1 leaf ``axes`` from the value: they become static index 0."""
    fixed = view.fixed
    for a in axes:
        fixed = tuple(sorted(fixed + ((a, ("index", 0)),)))
    return view._replace(fixed=fixed)


def _squeeze(view: View, shape: tuple, dimensions) -> View:
    drop = {d % len(shape) for d in dimensions}
    pinned = [a for i, run in enumerate(view.dims) if i in drop for a in run]
    dims = tuple(run for i, run in enumerate(view.dims) if i not in drop)
    return _pin(view, pinned)._replace(dims=dims)


def _slice(view: View, shape: tuple, start, limit) -> View | str:
    dims = list(view.dims)
    fixed = view.fixed
    for i, (b, e, size) in enumerate(zip(start, limit, shape, strict=True)):
        b, e = int(b), int(e)
        if (b, e) == (0, size):
            continue
        run = view.dims[i]
        if e - b == 1 and len(run) == 1:
            dims[i] = ()
            fixed = tuple(sorted(fixed + ((run[0], ("index", b)),)))
        else:
            return f"partial slice [{b}:{e}] of an axis of size {size}"
    return view._replace(dims=tuple(dims), fixed=fixed)


def _broadcast(view: View, in_shape, out_shape, bdims) -> View | str:
    dims: list[tuple[int, ...]] = [()] * len(out_shape)
    for i, j in enumerate(bdims):
        if in_shape[i] == out_shape[j]:
            dims[j] = view.dims[i]
        elif view.dims[i]:
            return "broadcast of a leaf axis of size 1"
    return view._replace(dims=tuple(dims))


def _is_run(axes) -> bool:
    return all(b == a + 1 for a, b in zip(axes, axes[1:], strict=False))


def _reshape(view: View, in_shape, out_shape, leaf_shape) -> View | str:
    """Reshape as merges and splits of neighbouring axes, at leaf-axis boundaries.

    The operand is cut into atoms (one per leaf axis, one per axis holding no leaf axis); each
    result axis of size > 1 must take a whole number of consecutive atoms, leaf atoms in
    increasing contiguous order and never mixed with broadcast atoms.
    """
    atoms = []
    for size, run in zip(in_shape, view.dims, strict=True):
        if run:
            atoms.extend((leaf_shape[a], a) for a in run)
        elif size != 1:
            atoms.append((size, None))
    dims: list[tuple[int, ...]] = [()] * len(out_shape)
    k = 0
    last = None
    for j, size in enumerate(out_shape):
        if size == 1:
            continue
        part, prod = [], 1
        while prod < size and k < len(atoms):
            part.append(atoms[k])
            prod *= atoms[k][0]
            k += 1
        if prod != size:
            return "reshape that splits a leaf axis"
        axes = tuple(a for _, a in part if a is not None)
        if axes and any(a is None for _, a in part):
            return "reshape that mixes a leaf axis with a broadcast axis"
        if not _is_run(axes):
            return "reshape that merges leaf axes out of order"
        dims[j] = axes
        if axes:
            last = j
    rest = [a for _, a in atoms[k:]]
    if any(a is None for a in rest):
        return "reshape that is not a merge or split of axes"
    out = view._replace(dims=tuple(dims))
    if rest and last is not None and _is_run(dims[last] + tuple(rest)):
        dims[last] = dims[last] + tuple(rest)
        return out._replace(dims=tuple(dims))
    return _pin(out, rest)
