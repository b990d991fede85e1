"""AST -> spec text. `parse(format_spec(parse(s)))` equals `parse(s)` (tested)."""
from __future__ import annotations

from . import syntax as A

# Binding strength, loosest first; matches grammar.lark.
PRECEDENCE = {"or": 1, "and": 2, "not": 3, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4,
              "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6, "neg": 7}
ATOM = 8


def format_spec(node: A.Attention) -> str:
    params = ", ".join(p.name if p.default is None else f"{p.name} = {format_expr(p.default)}"
                       for p in node.params)
    lines = [f"attention {node.name}({params}) {{"]
    for stmt in node.body:
        targets = ", ".join(t.id for t in stmt.targets)
        lines.append(f"    {targets} = {format_expr(stmt.value)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_expr(e: A.Expr) -> str:
    return _fmt(e)[0]


def _fmt(e: A.Expr) -> tuple[str, int]:
    if isinstance(e, A.Num):
        return repr(e.value), ATOM
    if isinstance(e, A.Bool):
        return ("true" if e.value else "false"), ATOM
    if isinstance(e, A.Name):
        return e.id, ATOM
    if isinstance(e, A.Attr):
        return f"{_wrap(e.value, ATOM)}.{e.attr}", ATOM
    if isinstance(e, A.Tuple):
        inner = ", ".join(format_expr(i) for i in e.items)
        return f"({inner}{',' if len(e.items) == 1 else ''})", ATOM
    if isinstance(e, A.Call):
        args = [format_expr(a) for a in e.args] + [f"{k.name} = {format_expr(k.value)}" for k in e.kwargs]
        return f"{e.func.id}({', '.join(args)})", ATOM
    if isinstance(e, A.Unary):
        if e.op == "not":
            return f"not {_wrap(e.operand, PRECEDENCE['not'])}", PRECEDENCE["not"]
        return f"-{_wrap(e.operand, PRECEDENCE['neg'])}", PRECEDENCE["neg"]
    if isinstance(e, A.Binary):
        prec = PRECEDENCE[e.op]
        # Left-associative: the right operand needs parentheses at equal precedence;
        # comparisons do not chain, so both sides need them there.
        left_min = prec + 1 if prec == 4 else prec
        return f"{_wrap(e.lhs, left_min)} {e.op} {_wrap(e.rhs, prec + 1)}", prec
    raise TypeError(f"not an expression: {e!r}")


def _wrap(e: A.Expr, min_prec: int) -> str:
    text, prec = _fmt(e)
    return text if prec >= min_prec else f"({text})"
