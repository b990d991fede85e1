"""Score expressions under a binding: per-row scale and bias, the soft-cap, sink logits, and
float modifier expressions evaluated with torch so that gradients reach the tables they read."""
from __future__ import annotations

import numpy as np

from .. import limits
from ..errors import AttncError
from . import nodes as N
from .bind import Bound
from .evaluate import evaluate, evaluate_uniform, modifier_exprs, show
from .floats import check_float_constants


def base2_logits(score: N.Score) -> bool:
    """The forward kernel's logits are in base 2 straight from the row scale (the host folds
    log2(e) into it): a softmax with no logit bias and no soft-cap (a sink is folded separately;
    a soft-cap folds log2(e) into its output factor instead)."""
    return score.kind == "softmax" and score.logit_bias is None and score.softcap is None


def softplus_first_pass(ir: N.Attention) -> bool:
    """The forward of a softplus spec has a first pass for 16-bit inputs on a GPU
    (codegen/emit._softplus_fast), except when routed: per-element routing tests made its loops
    longer than the exact ones and spilled 600 bytes at sm_90, D = 128."""
    return ir.score.kind == "softplus" and ir.route is None


def score_reads_n_visible(score: N.Score) -> bool:
    return any(isinstance(x, N.NVisible) for e in (score.scale, score.bias) for x in N.walk(e))


def row_scores(bound: Bound, head_dim: int, row_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query score scale and bias (float64, the shape of row_counts: [Nq], or [B, H, Nq] when
    routing makes counts depend on the data); they may depend on n_visible.

    Rows that see no key get scale 0 and bias 0: they contribute nothing either way, and
    expressions like log(n_visible) are undefined there.
    """
    coords = {("q", "n_visible"): row_counts.astype(np.float64)}
    score = bound.ir.score
    out = []
    for what, expr in (("scale", score.scale), ("bias", score.bias)):
        val = np.broadcast_to(np.asarray(evaluate(expr, bound.env, coords, head_dim), dtype=np.float64),
                              row_counts.shape).copy()
        val[row_counts == 0] = 0.0
        bad = ~np.isfinite(val)
        # Kernels hold both in float32 (softmax's scale times log2(e)): finite there too.
        big = ~bad & (np.abs(val) > limits.MAX_FLOAT)
        if bad.any() or big.any():
            # counts are [Nq], or [B, H, Nq] under routing: report the query position.
            at = np.unravel_index(int(np.argmax(bad | big)), bad.shape)
            beyond = "" if bad[at] else f", beyond the ±{limits.MAX_FLOAT:.0e} float32 kernels take"
            raise AttncError(f"the {score.kind} {what} `{show(expr)}` is {val[at]:.4g} for query {at[-1]} "
                             f"(n_visible = {row_counts[at]}, head_dim = {head_dim}){beyond}")
        out.append(val)
    if any(isinstance(x, N.HeadDim) for e in modifier_exprs(bound.ir) for x in N.walk(e)):
        check_float_constants(bound, head_dim)  # those that head_dim decides, now it is known
    return out[0], out[1]



def softcap_value(bound: Bound, head_dim: int) -> float | None:
    cap = bound.ir.score.softcap
    if cap is None:
        return None
    value = float(evaluate_uniform(cap, bound.env, head_dim))
    if not (0 < value < 1e30):  # kernels hold it in float32
        raise AttncError(f"the softcap `{show(cap)}` is {value} for {bound.describe()}; it must be positive "
                         "and below 1e30")
    return value


def _reads_float_tensor(e: N.Expr) -> bool:
    return any(isinstance(x, N.Lookup) and x.type == N.FLOAT for x in N.walk(e))


def evaluate_torch(e: N.Expr, bound: Bound, coords, tensors, head_dim: int, like):
    """Evaluate a float modifier expression with torch so that gradients reach the float runtime
    tensors it reads (bias tables, sink logits). Integer parts (indices, distances) go through
    the numpy evaluator above, so both paths share one definition of the arithmetic."""
    import torch

    def rec(x: N.Expr):
        if not _reads_float_tensor(x):
            v = np.asarray(evaluate(x, bound.env, coords, head_dim, strict=False), dtype=np.float64)
            return torch.as_tensor(v, dtype=like.dtype, device=like.device)
        if isinstance(x, N.Lookup):
            table = tensors[x.tensor]
            idx = [np.asarray(evaluate(i, bound.env, coords, head_dim)) for i in x.indices]
            if table.numel() == 0:  # only possible when no visible pair reads it
                return torch.zeros(np.broadcast_shapes(*(i.shape for i in idx)), dtype=like.dtype, device=like.device)
            if table.dim() == len(idx) + 1:  # a per-head table: its leading dimension is the head
                idx = [np.asarray(coords[("q", "head")])] + idx
            # Pairs the mask hides may index outside the table (only visible pairs are checked);
            # their logits are discarded, so any in-range value will do.
            idx = [np.clip(i, 0, n - 1) for i, n in zip(idx, table.shape)]
            idx = [torch.from_numpy(np.ascontiguousarray(i)).to(table.device) for i in np.broadcast_arrays(*idx)]
            return table.to(like.dtype)[tuple(idx)]
        if isinstance(x, N.Unary):
            v = rec(x.operand)
            return -v if x.op == "neg" else torch.abs(v)
        if isinstance(x, N.Call):
            return {"sqrt": torch.sqrt, "log": torch.log, "exp": torch.exp}[x.fn](rec(x.args[0]))
        if isinstance(x, N.Binary):
            a, b = rec(x.lhs), rec(x.rhs)
            ops = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div,
                   "min": torch.minimum, "max": torch.maximum}
            return ops[x.op](a, b)
        raise TypeError(f"not a float modifier expression: {x!r}")

    return rec(e)



def sink_logits(bound: Bound, heads: int, tensors, head_dim: int, like, check: bool = True):
    """Per-head sink logits [heads] (None when the score has no sink), differentiable with
    respect to the tables the sink reads; `check=False` leaves `check_sink` to the caller."""
    e = bound.ir.score.sink
    if e is None:
        return None
    coords = {("q", "head"): np.arange(heads)}
    sink = evaluate_torch(e, bound, coords, tensors, head_dim, like).expand(heads)
    if check:
        check_sink(bound, sink)
    return sink


def check_sink(bound: Bound, sink) -> None:
    import torch

    e = bound.ir.score.sink
    # Kernels hold sink * log2(e) in float32; -inf (no sink) is fine, nan never is.
    bad = torch.isnan(sink) | ((sink.abs() > 1e30) & (sink != float("-inf")))
    if bad.any():
        raise AttncError(f"the sink logit `{show(e)}` is {sink[bad][0].item()} for head "
                         f"{int(bad.nonzero()[0])}; it must lie within ±1e30 (or be -inf)")


