"""Integer ranges of IR expressions over coordinate boxes (interval arithmetic): kernel integer
width, and the extents of the runtime tensors a mask indexes."""
from __future__ import annotations

from typing import Mapping

from . import nodes as N
from .bind import MAX_HEADS, Bound, KeyPart
from .evaluate import modifier_exprs, part_expr

INT32 = (-(2**31), 2**31 - 1)


def int_range(e: N.Expr, values, ranges: Mapping[tuple[str, str], tuple[int, int]], out: list | None = None):
    """Interval [lo, hi] of an integer expression over coordinate ranges (sound, maybe loose).

    Every intermediate interval is appended to `out`, so callers can check that a kernel's
    int32 arithmetic cannot overflow anywhere in the expression.
    """
    def rec(x: N.Expr) -> tuple[int, int]:
        if isinstance(x, N.Const):
            r = (int(x.value), int(x.value))
        elif isinstance(x, N.Param):
            r = (int(values[x.name]), int(values[x.name]))
        elif isinstance(x, N.HeadDim):
            r = (1, 1024)
        elif isinstance(x, N.Head):
            r = ranges.get(("q", "head"), (0, MAX_HEADS - 1))
        elif isinstance(x, N.Coord):
            r = ranges[(x.side, x.axis)]
        elif isinstance(x, N.Window):
            rec(x.expand())
            r = (0, 1)
        elif isinstance(x, N.Lookup):
            for i in x.indices:
                rec(i)
            r = INT32  # runtime tensors reach the kernel as int32
        elif isinstance(x, N.Unary):
            a = rec(x.operand)
            if x.op == "not":
                r = (0, 1)
            elif x.op == "neg":
                r = (-a[1], -a[0])
            else:
                r = (0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1])), max(abs(a[0]), abs(a[1])))
        elif isinstance(x, N.Binary):
            a, b = rec(x.lhs), rec(x.rhs)
            if x.op in ("and", "or") or x.op in N.COMPARISONS:
                r = (0, 1)
            elif x.op == "+":
                r = (a[0] + b[0], a[1] + b[1])
            elif x.op == "-":
                r = (a[0] - b[1], a[1] - b[0])
            elif x.op == "*":
                p = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
                r = (min(p), max(p))
            elif x.op == "min":
                r = (min(a[0], b[0]), min(a[1], b[1]))
            elif x.op == "max":
                r = (max(a[0], b[0]), max(a[1], b[1]))
            elif x.op == "%":
                m = max(abs(b[0]), abs(b[1]))
                r = (-m, m)
            elif x.op == "//":
                m = max(abs(a[0]), abs(a[1]))
                r = (-m, m)
            else:
                r = (0, 1)
        else:
            r = (0, 1)  # float subexpressions never reach integer kernels
        if out is not None:
            out.append(r)
        return r

    return rec(e)


def coord_ranges(bound: Bound, part: KeyPart, heads: int = MAX_HEADS) -> dict[tuple[str, str], tuple[int, int]]:
    ranges = {("q", "i"): (0, bound.nq - 1), ("k", "i"): (0, part.size - 1), ("q", "head"): (0, heads - 1)}
    for axis, size in zip(bound.ir.q.axes, bound.q_dims):
        ranges[("q", axis)] = (0, size - 1)
    for axis, size in zip(part.space.axes, part.dims):
        ranges[("k", axis)] = (0, size - 1)
    return ranges


def needs_int64(bound: Bound) -> bool:
    """True when some integer intermediate of the mask or the score modifiers may leave int32
    over this binding's coordinates."""
    seen: list[tuple[int, int]] = []
    for part in bound.kv_parts:
        ranges = coord_ranges(bound, part)
        int_range(part_expr(bound.ir.mask, part.name), bound.env, ranges, seen)
        for e in modifier_exprs(bound.ir):
            for x in _int_subtrees(part_expr(e, part.name)):
                int_range(x, bound.env, ranges, seen)
    lo, hi = INT32
    return any(r[0] < lo or r[1] > hi for r in seen)


def _int_subtrees(e: N.Expr):
    """The maximal integer-typed subexpressions of a float expression (indices, distances)."""
    stack = [e]
    while stack:
        x = stack.pop()
        if x.type == N.INT:
            yield x
        else:
            stack.extend(N.children(x))

