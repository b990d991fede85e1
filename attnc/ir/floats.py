"""Float values that reach float32 kernels: constants, parameters and expressions of them in a
score's bias or sink must lie within ±limits.MAX_FLOAT (checked when parameters are bound, and
for those that head_dim decides, when it is known)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .. import limits
from ..errors import AttncError
from . import nodes as N
from .evaluate import evaluate, show

if TYPE_CHECKING:
    from .bind import Bound


_VARIES = (N.Coord, N.Lookup, N.Window, N.Head, N.Batch, N.NVisible, N.Member)  # per pair, row or head


def check_float_constants(bound: "Bound", head_dim: int | None = None) -> None:
    """Refuse a float value that does not vary per pair (a constant, a float parameter, an
    expression of them) inside the bias or the sink beyond ±MAX_FLOAT: kernels evaluate those
    expressions in float32, where 1e39 is inf (and inf * 0 is nan), while the float64 reference
    keeps it finite. Without head_dim (at bind), values that depend on it are checked at call time."""
    score = bound.ir.score
    # The bias and the sink are computed in float32 throughout; the score's scale and bias are
    # computed on the host in float64 and only their value per row reaches the kernel (checked
    # here when it is uniform, else per row in scores.row_scores).
    for what, e, whole in (("the bias", score.logit_bias, True), ("the sink", score.sink, True),
                           (f"the {score.kind} scale", score.scale, False),
                           (f"the {score.kind} bias", score.bias, False)):
        if e is None:
            continue
        values: dict[int, float | None] = {}
        for x in reversed(list(N.walk(e))):  # children before parents
            kids = N.children(x)
            if isinstance(x, _VARIES) or (isinstance(x, N.HeadDim) and head_dim is None) or \
                    any(values[id(c)] is None for c in kids):
                values[id(x)] = None
                continue
            small = x
            if kids:  # evaluate one operator at a time, on its children's values
                consts = tuple(N.Const(values[id(c)]) for c in kids)
                small = N.Unary(x.op, *consts) if isinstance(x, N.Unary) else \
                    N.Binary(x.op, *consts) if isinstance(x, N.Binary) else N.Call(x.fn, consts)
            try:
                v = evaluate(small, bound.env, {}, head_dim, strict=False)
            except (AttncError, ArithmeticError, ValueError):
                values[id(x)] = None  # reported by whoever evaluates it
                continue
            v = v.item() if hasattr(v, "item") else v
            values[id(x)] = v
            if (whole or x is e) and x.type == N.FLOAT and math.isfinite(v) and abs(v) > limits.MAX_FLOAT:
                line = bound.ir.line_of("bias" if what == "the bias" else "score")
                span = bound.ir.span_of(x)
                raise AttncError(f"{what}{f' (line {line})' if line and span is None else ''}: `{show(x)}` is "
                                 f"{_num(v)} for {bound.describe()}; kernels work in float32, which holds finite "
                                 f"values up to 3.4e38 (attnc takes up to ±{_num(limits.MAX_FLOAT)})", span)


def _num(v: float) -> str:
    return f"{v:.4g}".replace("e+", "e")
