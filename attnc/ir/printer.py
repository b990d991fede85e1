"""Canonical text of the IR: deterministic, so it doubles as the hash input."""
from __future__ import annotations

import hashlib

from ..frontend.printer import ATOM as _ATOM
from ..frontend.printer import PRECEDENCE as _PREC
from ..frontend.printer import infix, unary
from . import nodes as N


def format_ir(ir: N.Attention) -> str:
    params = ", ".join(
        f"{p.name}: {'bool' if p.boolean else p.type}" + ("" if p.default is None else f" = {format_expr(p.default)}")
        for p in ir.params
    )
    return "\n".join([
        f"attention {ir.name}({params})",
        *(f"  require {format_expr(r.cond)}" for r in ir.requires),
        *(f"  tensor {t.name}: {t.dtype}[{t.rank} dims{' (+ optional heads)' if t.per_head else ''}]"
          for t in ir.tensors),
        f"  q     = {format_space(ir.q)}",
        f"  kv    = {format_space(ir.kv)}",
        f"  mask  = {format_expr(ir.mask)}",
        *([f"  bias  = {format_expr(ir.score.logit_bias)}"] if ir.score.logit_bias is not None else []),
        f"  score = {format_score(ir.score)}",
        *([f"  route = {format_route(ir.route)}"] if ir.route is not None else []),
    ])


def digest(ir: N.Attention) -> str:
    """Stable content hash of the IR's canonical text (spans and source lines excluded)."""
    return hashlib.sha256(format_ir(ir).encode()).hexdigest()


def format_route(r: N.Route) -> str:
    own = ", own = true" if r.own else ""
    query = "mean(q)" if r.query == "mean" else "q"
    return (f"top({format_expr(r.top)}{own}) of {r.groups}({', '.join(format_expr(s) for s in r.sizes)}) "
            f"by {query} @ mean(k)")


def format_score(score: N.Score) -> str:
    args = f"scale = {format_expr(score.scale)}"
    if score.kind == "sigmoid":
        args += f", bias = {format_expr(score.bias)}"
    for name in ("softcap", "sink"):
        if getattr(score, name) is not None:
            args += f", {name} = {format_expr(getattr(score, name))}"
    return f"{score.kind}({args})"


def format_space(space: "N.Space | N.Segments") -> str:
    if isinstance(space, N.Segments):
        return ", ".join(f"{name}: {format_space(s)}" for name, s in space.parts)
    return f"{space.kind}({', '.join(format_expr(d) for d in space.dims)})"


def format_expr(e: N.Expr) -> str:
    return _fmt(e)[0]


def _fmt(e: N.Expr) -> tuple[str, int]:
    if isinstance(e, N.Const):
        if isinstance(e.value, bool):
            return ("true" if e.value else "false"), _ATOM
        return (repr(e.value), _ATOM) if e.value >= 0 else (repr(e.value), _PREC["neg"])
    if isinstance(e, N.Param):
        return e.name, _ATOM
    if isinstance(e, N.HeadDim):
        return "head_dim", _ATOM
    if isinstance(e, N.NVisible):
        return "n_visible", _ATOM
    if isinstance(e, N.Head):
        return "head", _ATOM
    if isinstance(e, N.Batch):
        return "batch", _ATOM
    if isinstance(e, N.Member):
        return f"{e.side} in {e.segment}", _PREC["in"]
    if isinstance(e, N.Coord):
        return f"{e.side}.{e.axis}", _ATOM
    if isinstance(e, N.Window):
        flags = f"kernel={format_expr(e.kernel)}, dilation={format_expr(e.dilation)}, " \
                f"stride={format_expr(e.stride)}, causal={'true' if e.causal else 'false'}"
        return f"window[{e.axis} < {format_expr(e.length)}]({flags})", _ATOM
    if isinstance(e, N.Lookup):
        return f"{e.tensor}[{', '.join(format_expr(i) for i in e.indices)}]", _ATOM
    if isinstance(e, N.Call):
        return f"{e.fn}({', '.join(format_expr(a) for a in e.args)})", _ATOM
    if isinstance(e, N.Unary):
        if e.op in ("abs", "ilog2"):
            return f"{e.op}({format_expr(e.operand)})", _ATOM
        return unary(e.op, _fmt(e.operand))
    if isinstance(e, N.Binary):
        if e.op in ("min", "max"):
            return f"{e.op}({format_expr(e.lhs)}, {format_expr(e.rhs)})", _ATOM
        return infix(e.op, _fmt(e.lhs), _fmt(e.rhs))
    raise TypeError(f"not an IR expression: {e!r}")
