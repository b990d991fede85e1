"""Three-valued interval evaluation of a mask over many pairs of coordinate boxes at once.

Each coordinate (side, axis) is given as two int64 arrays (lo, hi) of the same length P, one
entry per pair of boxes (a box of query tokens against a box of key tokens). Integer
expressions evaluate to intervals (lo, hi); boolean ones to (certain, possible): `certain[p]`
means every pair of tokens in box pair p satisfies the expression, `possible[p]` that some pair
may. Both are sound: certain implies all, and none when not possible. The caller decides a tile
EMPTY when no box pair of it is possible and FULL when all are certain.

Arithmetic is exact per operator (the tightest interval over the operands' intervals; `& | ^`
are only bounded soundly, ir/bits.py), so a result is loose only where an expression reads one
coordinate twice (or uses `& | ^`); between two independent
boxes `q.i - k.i`, `abs(q.y - k.y) <= r` and NATTEN windows (monotone in the query
coordinate) classify exactly. Runtime tensor values are unknown here unless the caller passes
their ranges (`lookup`), e.g. per-call summaries of document ids.

Integers are int64. check_int64 (ir/intervals.py) refuses specs whose integers can leave ±2**62
where they are evaluated, so live values always lie within ±2**62; a sum or product whose
interval leaves that range (only possible at pairs a guard rules out) is clamped to ±2**62,
which still contains every live value, instead of wrapping.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import numpy as np

from ..ir import bits
from ..ir import nodes as N
from ..limits import MAX_BATCH as _BATCH, MAX_HEADS as _HEADS

Arrays = tuple[np.ndarray, np.ndarray]
_BIG = 2**62
_INT32 = (-(2**31), 2**31 - 1)


def _clamp(lo_f: np.ndarray, hi_f: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Arrays:
    """Replace results whose float image leaves ±2**62 by the clamp (they only occur where a
    guard rules the pair out, see the module docstring)."""
    wild = (np.abs(lo_f) >= _BIG) | (np.abs(hi_f) >= _BIG)
    if wild.any():
        lo, hi = np.where(wild, -_BIG, lo), np.where(wild, _BIG, hi)
    return lo, hi


def _uniform(a: Arrays) -> int | None:
    """The value of an interval that is one known integer everywhere (a constant), else None."""
    return int(a[0]) if np.ndim(a[0]) == 0 and np.ndim(a[1]) == 0 and a[0] == a[1] else None


def _mul(a: Arrays, b: Arrays, safe: bool) -> Arrays:
    c = _uniform(b)
    if c is not None and safe:  # the common case: a coordinate times a constant
        return (a[0] * c, a[1] * c) if c >= 0 else (a[1] * c, a[0] * c)
    corners = [x * y for x in a for y in b]
    lo, hi = functools.reduce(np.minimum, corners), functools.reduce(np.maximum, corners)
    if safe:
        return lo, hi
    corners_f = [np.asarray(x, dtype=np.float64) * np.asarray(y, dtype=np.float64) for x in a for y in b]
    return _clamp(functools.reduce(np.minimum, corners_f), functools.reduce(np.maximum, corners_f), lo, hi)


def _add(a: Arrays, b: Arrays, sign: int, safe: bool) -> Arrays:
    lo, hi = (a[0] + b[0], a[1] + b[1]) if sign > 0 else (a[0] - b[1], a[1] - b[0])
    if safe:
        return lo, hi
    f = [np.asarray(x, dtype=np.float64) for x in (*a, *b)]
    lo_f, hi_f = (f[0] + f[2], f[1] + f[3]) if sign > 0 else (f[0] - f[3], f[1] - f[2])
    return _clamp(lo_f, hi_f, lo, hi)


def _floordiv(a: Arrays, b: Arrays) -> Arrays:
    """Floor division over the nonzero part of the divisor (a division by zero is no value:
    evaluation refuses it wherever it is live). On a divisor interval of one sign, a // b is
    monotone in each operand, so the corners bound it."""
    c = _uniform(b)
    if c is not None and c != 0:
        return (a[0] // c, a[1] // c) if c > 0 else (a[1] // c, a[0] // c)
    *a, b0, b1 = np.broadcast_arrays(*a, *b)
    b = (b0, b1)
    lo = np.full(b0.shape, _BIG, dtype=np.int64)
    hi = np.full(b0.shape, -_BIG, dtype=np.int64)
    for blo, bhi, ok in ((np.maximum(b[0], 1), b[1], b[1] >= 1), (b[0], np.minimum(b[1], -1), b[0] <= -1)):
        if not ok.any():
            continue
        blo, bhi = np.where(ok, blo, 1), np.where(ok, bhi, 1)  # placeholders where this sign is absent
        corners = [x // y for x in a for y in (blo, bhi)]
        lo = np.where(ok, np.minimum(lo, functools.reduce(np.minimum, corners)), lo)
        hi = np.where(ok, np.maximum(hi, functools.reduce(np.maximum, corners)), hi)
    none = lo > hi  # the divisor is exactly 0: no value; any interval is sound
    return np.where(none, 0, lo), np.where(none, 0, hi)


def _mod(a: Arrays, b: Arrays) -> Arrays:
    """Floor modulo: the result has the divisor's sign and |r| < |b|. A single positive divisor
    over a range that does not wrap keeps the exact range."""
    c = _uniform(b)
    if c is not None and c > 0:
        same_block = a[0] // c == a[1] // c
        hi = np.where(same_block, a[1] % c, c - 1)
        return np.where(same_block, a[0] % c, 0), np.where(a[0] >= 0, np.minimum(hi, a[1]), hi)
    single = (b[0] == b[1]) & (b[0] > 0)
    m = np.where(single, b[0], 1)
    same_block = single & (a[0] // m == a[1] // m)
    lo = np.where(b[0] >= 1, 0, np.where(b[1] <= -1, b[0] + 1, np.minimum(b[0] + 1, 0)))
    hi = np.where(b[1] <= -1, 0, np.where(b[0] >= 1, b[1] - 1, np.maximum(b[1] - 1, 0)))
    # A nonnegative dividend smaller than a positive divisor is its own remainder.
    hi = np.where((b[0] >= 1) & (a[0] >= 0), np.minimum(hi, a[1]), hi)
    lo = np.where(same_block, a[0] % m, lo)
    hi = np.where(same_block, a[1] % m, hi)
    return lo, hi


def _abs(a: Arrays) -> Arrays:
    lo = np.where(a[0] >= 0, a[0], np.where(a[1] <= 0, -a[1], 0))
    return lo, np.maximum(np.abs(a[0]), np.abs(a[1]))


def _compare(op: str, a: Arrays, b: Arrays) -> Arrays:
    """(certain, possible) of `a op b` for independent values in the two intervals."""
    if op == "<":
        return a[1] < b[0], a[0] < b[1]
    if op == "<=":
        return a[1] <= b[0], a[0] <= b[1]
    if op == ">":
        return a[0] > b[1], a[1] > b[0]
    if op == ">=":
        return a[0] >= b[1], a[1] >= b[0]
    overlap = (a[0] <= b[1]) & (b[0] <= a[1])
    point = (a[0] == a[1]) & (b[0] == b[1]) & (a[0] == b[0])
    if op == "==":
        return point, overlap
    return ~overlap, ~point  # !=


Lookup = Callable[[N.Lookup, list[Arrays]], Arrays]


def evaluate_boxes(e: N.Expr, values: Mapping[str, int], coords: Mapping[tuple[str, str], Arrays],
                   size: int, lookup: Lookup | None = None, safe: bool = False,
                   track: list | None = None, mods: Mapping[tuple[str, str], Arrays] | None = None) -> Arrays:
    """(certain, possible) bool arrays for a boolean expression, or (lo, hi) int64 arrays for an
    integer one, over `size` box pairs (a uniform value may come back as scalars).
    `lookup(node, index_intervals)` gives the range of a runtime tensor's values at the given
    index intervals; without it they are any int32. `safe`: the caller knows that no
    intermediate can leave ±2**62 in these boxes, so no overflow clamping is needed. `track`
    collects the largest magnitude of every integer node (see `fits`). `mods[(side, axis)]` =
    (stride, base) says a coordinate is base plus a multiple of stride, which makes `x % d`
    exact wherever d divides the stride (tiles of one dilation group)."""
    memo: dict = {}

    def rec(x: N.Expr) -> Arrays:
        if x in memo:
            return memo[x]
        out = _rec(x)
        memo[x] = out
        if track is not None and x.type == N.INT:
            track.append(float(np.max(np.maximum(np.abs(out[0]), np.abs(out[1])))))
        return out

    def _rec(x: N.Expr) -> Arrays:
        if isinstance(x, N.Const):
            if isinstance(x.value, bool):
                v = np.full(size, x.value, dtype=bool)
                return v, v
            return np.int64(x.value), np.int64(x.value)
        if isinstance(x, N.Param):
            return np.int64(values[x.name]), np.int64(values[x.name])
        if isinstance(x, N.Coord):
            return coords[(x.side, x.axis)]
        if isinstance(x, N.Window):
            return rec(x.expand())
        if isinstance(x, N.Head):  # unknown unless given: any head (analysis/rows.py fixes it per call)
            return coords.get(("q", "head"), (np.int64(0), np.int64(_HEADS - 1)))
        if isinstance(x, N.Batch):  # likewise: any sequence of the batch
            return coords.get(("q", "batch"), (np.int64(0), np.int64(_BATCH - 1)))
        if isinstance(x, N.Lookup):
            idx = [rec(i) for i in x.indices]
            if lookup is not None:
                return lookup(x, idx)
            return np.int64(_INT32[0]), np.int64(_INT32[1])
        if isinstance(x, N.Unary):
            a = rec(x.operand)
            if x.op == "not":
                return ~np.asarray(a[1]), ~np.asarray(a[0])
            if x.op == "neg":
                return -a[1], -a[0]
            if x.op == "ilog2":
                return bits.ilog2_range_np(a)
            return _abs(a)
        if isinstance(x, N.Binary):
            if x.op in ("and", "or"):
                (ca, pa), (cb, pb) = rec(x.lhs), rec(x.rhs)
                if x.op == "and":
                    return ca & cb, pa & pb
                return ca | cb, pa | pb
            a, b = rec(x.lhs), rec(x.rhs)
            if x.op in N.COMPARISONS:
                return _compare(x.op, a, b)
            if x.op in ("+", "-"):
                return _add(a, b, 1 if x.op == "+" else -1, safe)
            if x.op == "*":
                return _mul(a, b, safe)
            if x.op == "//":
                return _floordiv(a, b)
            if x.op == "%":
                r = _mod(a, b)
                c = _uniform(b)
                if mods and isinstance(x.lhs, N.Coord) and (x.lhs.side, x.lhs.axis) in mods and c and c > 0:
                    stride, base = mods[(x.lhs.side, x.lhs.axis)]
                    known = stride % c == 0  # stride 0 (one value) included
                    r = np.where(known, base % c, r[0]), np.where(known, base % c, r[1])
                return r
            if x.op == "min":
                return np.minimum(a[0], b[0]), np.minimum(a[1], b[1])
            if x.op == "max":
                return np.maximum(a[0], b[0]), np.maximum(a[1], b[1])
            if x.op in ("&", "|", "^"):
                return bits.bitwise_np(x.op, a, b)
            if x.op in ("<<", ">>"):  # a * 2**n, a // 2**n over the counts in range (bits.py)
                scale, none = bits.count_np(b)
                lo, hi = _mul(a, scale, safe) if x.op == "<<" else _floordiv(a, scale)
                return np.where(none, 0, lo), np.where(none, 0, hi)
        raise TypeError(f"not an integer mask expression: {x!r}")  # lowering and verify exclude the rest

    return rec(e)


def fits(e: N.Expr, values: Mapping[str, int], ranges: Mapping[tuple[str, str], tuple[int, int]]) -> bool:
    """True when no integer node of `e` can leave ±2**61 anywhere in the coordinate ranges
    (evaluated once in float64, so the check itself cannot wrap): boxes inside those ranges
    then need no overflow clamping."""
    coords = {key: (np.array([float(lo)]), np.array([float(hi)])) for key, (lo, hi) in ranges.items()}
    seen: list[float] = []
    with np.errstate(all="ignore"):
        evaluate_boxes(e, values, coords, 1, track=seen)
    return all(np.isfinite(v) and v < 2.0**61 for v in seen)
