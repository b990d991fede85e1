"""Integer bit operations (`& | ^ << >>`) and `ilog2`: where they are defined, their exact value
(numpy, for evaluate.py) and sound interval bounds (for intervals.py and analysis/symbolic.py).

Semantics (docs/language.md, "Expressions"): `& | ^` are Python's, on two's-complement integers
of unbounded width (so a negative operand has infinitely many leading ones); `a << n` is a * 2**n
and `a >> n` is floor(a / 2**n) (arithmetic shift, as Python), for a count 0 <= n <= 31;
`ilog2(x)` is floor(log2(x)) for x >= 1. A count outside [0, 31] or an ilog2 of x <= 0 is an
error wherever it is evaluated, like a division by zero: located when the spec is parsed (a
constant), when parameters are bound (no token involved), else when the mask is evaluated there.
31 is the widest shift of an int32 value that kernels can compute without undefined behaviour.

Bit-operation intervals are coarse but sound: both operands lie in [-2**k, 2**k - 1] for some k,
and so does the result; signs and `a & b <= a` (for a >= 0 or b < 0) tighten that. Shifts and
ilog2 are monotone, so their corners bound them exactly.
"""
from __future__ import annotations

import numpy as np

from . import nodes as N

Interval = tuple[int, int]
SHIFT_LO, SHIFT_HI = N.SHIFT_LIMITS


def undefined(x: N.Expr) -> tuple[N.Expr, N.Expr, str] | None:
    """(operand, condition on it where x is an error, what) for a partial operation, else None."""
    if isinstance(x, N.Binary) and x.op in ("//", "%"):
        return x.rhs, N.Binary("==", x.rhs, N.Const(0)), "division by zero"
    if isinstance(x, N.Binary) and x.op in ("<<", ">>"):
        n = x.rhs
        return n, N.Binary("or", N.Binary("<", n, N.Const(SHIFT_LO)), N.Binary(">", n, N.Const(SHIFT_HI))), \
            f"shift count outside [{SHIFT_LO}, {SHIFT_HI}]"
    if isinstance(x, N.Unary) and x.op == "ilog2":
        return x.operand, N.Binary("<=", x.operand, N.Const(0)), "ilog2 of a number below 1"
    return None


# -- values -------------------------------------------------------------------------------------
def ilog2_np(x) -> np.ndarray:
    """floor(log2(x)) of positive int64 values, exactly (no float rounding); 0 where x <= 0."""
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = x >= (np.int64(1) << np.int64(s))
        out += np.where(big, s, 0)
        x = np.where(big, x >> np.int64(s), x)
    return out


_BITWISE = {"&": np.bitwise_and, "|": np.bitwise_or, "^": np.bitwise_xor}


def apply(op: str, a, b):
    """a op b in int64 for a bit operation; shift counts must already be within range."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if op in _BITWISE:
        out = _BITWISE[op](a, b)
    else:
        out = np.left_shift(a, b) if op == "<<" else np.right_shift(a, b)
    return out[()] if out.ndim == 0 else out


def ilog2_code(x: str, tmp, where: str) -> str:
    """floor(log2(x)) as straight-line code, for the Triton kernels (`where` = "tl.where") and the
    Flex export ("torch.where"); tmp(code) assigns code to a fresh name and returns it. Binary
    search on the bit length: exact for int32 and int64, loop-free, no float rounding; 0 where
    x <= 0 (an error where live, so never used). 2**32 is no int32 literal: x >> 32 is tested in
    two legal steps."""
    r = None
    for s in (32, 16, 8, 4, 2, 1):
        step = tmp(f"{where}({f'(({x} >> 16) >> 16) > 0' if s == 32 else f'{x} >= {1 << s}'}, {s}, 0)")
        x = tmp(f"{x} >> {step}") if s > 1 else x
        r = step if r is None else tmp(f"{r} + {step}")
    return r


# -- exact-integer intervals (intervals.py) -----------------------------------------------------
def _width(a: Interval) -> int:
    """The least k with a within [-2**k, 2**k - 1]."""
    return max(a[1].bit_length() if a[1] > 0 else 0, (-a[0] - 1).bit_length() if a[0] < 0 else 0)


def bitwise(op: str, a: Interval, b: Interval) -> Interval:
    k = max(_width(a), _width(b))
    lo, hi = -(1 << k), (1 << k) - 1
    a_pos, b_pos, a_neg, b_neg = a[0] >= 0, b[0] >= 0, a[1] < 0, b[1] < 0
    if op == "&":
        # Clearing bits lowers a value unless it clears the sign: a & b <= a if a >= 0 or b < 0.
        ups = [x[1] for x, ok in ((a, a_pos or b_neg), (b, b_pos or a_neg)) if ok]
        return (0 if a_pos or b_pos else lo), min(ups, default=max(a[1], b[1]))
    if op == "|":
        # Setting bits raises a value unless it sets the sign: a | b >= a if a < 0 or b >= 0.
        downs = [x[0] for x, ok in ((a, a_neg or b_pos), (b, b_neg or a_pos)) if ok]
        top = -1 if a_neg or b_neg else min(hi, a[1] + b[1]) if a_pos and b_pos else hi
        return max(downs, default=lo), top
    if (a_pos and b_pos) or (a_neg and b_neg):  # ^: equal signs give a nonnegative result
        return 0, hi
    if (a_pos and b_neg) or (a_neg and b_pos):
        return lo, -1
    return lo, hi


def _counts(n: Interval) -> Interval | None:
    lo, hi = max(n[0], SHIFT_LO), min(n[1], SHIFT_HI)
    return (lo, hi) if lo <= hi else None


def shift(op: str, a: Interval, n: Interval) -> Interval:
    """a << n = a * 2**n and a >> n = a // 2**n: monotone in a and in n, so the corners bound
    them. Counts out of range are errors, not values; none in range gives no value (0, 0)."""
    n = _counts(n)
    if n is None:
        return 0, 0
    vals = [(x << c) if op == "<<" else (x >> c) for x in a for c in n]
    return min(vals), max(vals)


def ilog2(a: Interval) -> Interval:
    if a[1] < 1:
        return 0, 0  # only errors: no value
    return max(a[0], 1).bit_length() - 1, a[1].bit_length() - 1


# -- int64 array intervals (analysis/symbolic.py; live values lie within ±2**62) -----------------
_BIG = 2**62


def _bitlen_np(x):
    return np.where(x > 0, ilog2_np(np.maximum(x, 1)) + 1, 0)


def _width_np(lo, hi):
    return np.maximum(_bitlen_np(hi), np.where(lo < 0, _bitlen_np(-lo - 1), 0))


def bitwise_np(op: str, a, b):
    """bitwise() over arrays of intervals; bounds are clipped to ±2**62, which holds every live
    value (ir/intervals.check_int64)."""
    a0, a1, b0, b1 = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (*a, *b)))
    k = np.minimum(np.maximum(_width_np(a0, a1), _width_np(b0, b1)), 62)
    lo = -(np.int64(1) << k)
    hi = np.where(k >= 62, _BIG, (np.int64(1) << k) - 1)
    a_pos, b_pos, a_neg, b_neg = a0 >= 0, b0 >= 0, a1 < 0, b1 < 0
    if op == "&":
        up_a, up_b = a_pos | b_neg, b_pos | a_neg
        top = np.where(up_a & up_b, np.minimum(a1, b1), np.where(up_a, a1, np.where(up_b, b1, np.maximum(a1, b1))))
        return np.where(a_pos | b_pos, 0, lo), top
    if op == "|":
        dn_a, dn_b = a_neg | b_pos, b_neg | a_pos
        bottom = np.where(dn_a & dn_b, np.maximum(a0, b0), np.where(dn_a, a0, np.where(dn_b, b0, lo)))
        both = a_pos & b_pos
        with np.errstate(over="ignore"):  # a1 + b1 is only used where it stays below hi
            top = np.where(both & (a1 <= hi - b1), a1 + b1, hi)
        top = np.where(a_neg | b_neg, -1, top)
        return bottom, top
    same = (a_pos & b_pos) | (a_neg & b_neg)
    differ = (a_pos & b_neg) | (a_neg & b_pos)
    return np.where(same, 0, lo), np.where(differ, -1, hi)


def count_np(n):
    """Shift counts clipped to [0, 31] (an out-of-range count is an error, not a value), as the
    interval of 2**n; `none` marks boxes with no count in range."""
    lo, hi = np.maximum(n[0], SHIFT_LO), np.minimum(n[1], SHIFT_HI)
    none = lo > hi
    lo, hi = (np.where(none, 0, x).astype(np.int64) for x in (lo, hi))
    return (np.int64(1) << lo, np.int64(1) << hi), none


def ilog2_range_np(a):
    none = np.asarray(a[1]) < 1
    lo = ilog2_np(np.maximum(a[0], 1))
    hi = ilog2_np(np.maximum(a[1], 1))
    return np.where(none, 0, lo), np.where(none, 0, hi)
