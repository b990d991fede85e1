"""AST -> spec text. `parse(format_spec(parse(s)))` equals `parse(s)` (tested)."""
from __future__ import annotations

from . import syntax as A

# Binding strength, loosest first; matches grammar.lark.
PRECEDENCE = {"or": 1, "and": 2, "not": 3, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "in": 4,
              "|": 5, "^": 6, "&": 7, "<<": 8, ">>": 8,
              "+": 9, "-": 9, "*": 10, "/": 10, "//": 10, "%": 10, "neg": 11}
ATOM = 12


def format_spec(node: A.Attention) -> str:
    params = ", ".join(p.name if p.default is None else f"{p.name} = {format_expr(p.default)}"
                       for p in node.params)
    lines = [f"attention {node.name}({params}) {{"]
    for stmt in node.body:
        targets = ", ".join(t.id for t in stmt.targets)
        lines.append(f"    {targets} = {format_value(stmt.value)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_value(v: A.Value) -> str:
    if isinstance(v, A.Segments):
        return ", ".join(f"{s.name.id}: {format_expr(s.space)}" for s in v.items)
    if isinstance(v, A.Route):
        return f"{format_expr(v.top)} of {format_expr(v.groups)} by {format_expr(v.query)} @ {format_expr(v.key)}"
    return format_expr(v)


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
        return f"{_paren(_fmt(e.value), ATOM)}.{e.attr}", ATOM
    if isinstance(e, A.Tuple):
        inner = ", ".join(format_expr(i) for i in e.items)
        return f"({inner}{',' if len(e.items) == 1 else ''})", ATOM
    if isinstance(e, A.Call):
        args = [format_expr(a) for a in e.args] + [f"{k.name} = {format_expr(k.value)}" for k in e.kwargs]
        return f"{e.func.id}({', '.join(args)})", ATOM
    if isinstance(e, A.Index):
        return f"{e.base.id}[{', '.join(format_expr(i) for i in e.indices)}]", ATOM
    if isinstance(e, A.Member):
        return f"{_paren(_fmt(e.value), PRECEDENCE['in'] + 1)} in {e.segment.id}", PRECEDENCE["in"]
    if isinstance(e, A.Unary):
        return unary("not" if e.op == "not" else "neg", _fmt(e.operand))
    if isinstance(e, A.Binary):
        return infix(e.op, _fmt(e.lhs), _fmt(e.rhs))
    raise TypeError(f"not an expression: {e!r}")


# Shared with the IR printer: operands arrive as (text, precedence) pairs.
def unary(op: str, operand: tuple[str, int]) -> tuple[str, int]:
    prec = PRECEDENCE[op]
    return f"{'not ' if op == 'not' else '-'}{_paren(operand, prec)}", prec


def infix(op: str, lhs: tuple[str, int], rhs: tuple[str, int]) -> tuple[str, int]:
    prec = PRECEDENCE[op]
    # Left-associative: the right operand needs parentheses at equal precedence;
    # comparisons do not chain, so both sides need them there.
    left_min = prec + 1 if prec == PRECEDENCE["=="] else prec
    return f"{_paren(lhs, left_min)} {op} {_paren(rhs, prec + 1)}", prec


def _paren(operand: tuple[str, int], min_prec: int) -> str:
    text, prec = operand
    return text if prec >= min_prec else f"({text})"
