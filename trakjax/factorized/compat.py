"""JAX-version shims for the factorized family's jaxpr interpreter (JAX 0.10 to 0.12).

Only public APIs are used: ``jax.extend.core`` (``Literal``, ``Jaxpr``, ``ClosedJaxpr``) and each
primitive's ``get_bind_params``. What differs between versions is collected here:

* ``Primitive.get_bind_params(params)`` returns the bind parameters (JAX ≥ 0.10; older versions
  returned ``(subfuns, params)``).
* ``scan``'s parameters: JAX 0.10 has ``num_consts``/``num_carry``; JAX 0.12 has ``ft_in``, a
  FlatTree of the (consts, carry, xs) operands, instead.
* The call primitive of ``jax.jit`` is named ``jit`` (``pjit`` in older versions); remat is
  ``remat2`` (``checkpoint`` in older versions).
"""

from __future__ import annotations

import contextlib

from jax.extend import core as jex_core

Literal = jex_core.Literal
Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr

JIT_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})
REMAT_PRIMITIVES = frozenset({"remat2", "checkpoint", "remat"})
CUSTOM_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})


def bind_params(eqn) -> dict:
    """The parameters to re-bind ``eqn``'s primitive with."""
    out = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(out, tuple):  # older JAX: (subfuns, params)
        subfuns, params = out
        if subfuns:
            raise NotImplementedError(f"primitive {eqn.primitive.name} needs subfuns to bind")
        return params
    return out


def bind(eqn, invals) -> list:
    """Evaluate one equation as JAX would (``jax.core.eval_jaxpr``'s step); returns a list."""
    params = bind_params(eqn)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    with ctx if ctx is not None else contextlib.nullcontext():
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def read(env: dict, atom):
    """The value of a jaxpr atom (a ``Literal`` or a ``Var`` bound in ``env``)."""
    return atom.val if isinstance(atom, Literal) else env[atom]


def open_jaxpr(jaxpr) -> tuple:
    """``(Jaxpr, consts)`` of a ``ClosedJaxpr`` or a plain ``Jaxpr``."""
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def call_jaxpr(eqn):
    """The sub-jaxpr of a jit-like call equation."""
    params = eqn.params
    return params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"]


def scan_counts(params) -> tuple[int, int]:
    """(num_consts, num_carry) of a ``scan`` equation's parameters."""
    if "num_consts" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    # JAX 0.12: ft_in is a FlatTree of (consts, carry, xs); len() of a part counts its operands
    # (JAX's own scan lowering reads the counts this way).
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)
