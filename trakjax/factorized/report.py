"""A readable table of a :class:`~trakjax.factorized.plan.FactorPlan`, for users to print."""

from __future__ import annotations

from trakjax.factorized.plan import FactorPlan, LeafPlan


def _side(side, s: int, leaf: LeafPlan) -> str:
    dims = "×".join(str(leaf.shape[a]) for a in side.axes) or "1"
    bias = " + bias row" if leaf.bias_side == s else ""
    kind = "identity" if side.identity else f"random → {side.k}"
    return f"side {s} axes {side.axes} ({dims}{bias} = {side.dim}): {kind}"


def treatment(plan: FactorPlan, leaf: LeafPlan) -> str:
    """One line saying how ``leaf`` is featurized."""
    if leaf.treatment == "dense":
        return f"dense: {leaf.reason}"
    if leaf.treatment == "bias":
        return f"bias folded into {leaf.reason} (constant-1 input row)"
    k0, k1 = leaf.sides[0].k, leaf.sides[1].k
    text = f"factorized {k0}×{k1}"
    if leaf.slice_axes:
        text += f" per slice, {leaf.num_slices} slices (axes {leaf.slice_axes})"
    text += f" = {leaf.num_features} features; " + "; ".join(
        _side(side, s, leaf) for s, side in enumerate(leaf.sides))
    if leaf.bias >= 0:
        text += f"; bias {plan.leaves[leaf.bias].path}"
    return text + f"; sites: {', '.join(leaf.sites)}"


def format_report(plan: FactorPlan) -> str:
    """The table: path, shape, treatment per leaf; then K_fac, P, the final dimension."""
    rows = [(leaf.path, str(leaf.shape), treatment(plan, leaf)) for leaf in plan.leaves]
    width = [max(len(r[i]) for r in rows + [("path", "shape", "")]) for i in range(2)]
    lines = [f"{'path':<{width[0]}}  {'shape':<{width[1]}}  treatment"]
    lines += [f"{p:<{width[0]}}  {s:<{width[1]}}  {t}" for p, s, t in rows]
    rest = "kept whole" if plan.rest_identity else f"random projection to {plan.k_rest}"
    lines.append(
        f"factorized features: {plan.k_factor} from {len(plan.order)} leaves; dense remainder: "
        f"{plan.dense_params} parameters in {len(plan.dense)} leaves, {rest} ({plan.k_rest} features)"
    )
    lines.append(f"K_fac = {plan.k_fac}, P = {plan.num_params}, final dimension = {plan.final_dim}")
    if plan.second_stage:
        lines.append(f"second stage: a dense random projection K_fac = {plan.k_fac} → {plan.final_dim}")
    elif plan.proj_dim == "all":
        lines.append("no second stage (proj_dim='all': every K_fac feature is kept)")
    else:
        lines.append(f"no second stage: proj_dim = {plan.proj_dim} ≥ K_fac = {plan.k_fac}, "
                     f"so the {plan.k_fac} features are kept")
    if not plan.order:
        lines.append("nothing can be factorized: use a dense projection for this model")
    return "\n".join(lines)
