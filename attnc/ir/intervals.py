"""Integer ranges of IR expressions over coordinate boxes (interval arithmetic): kernel integer
width, int64 overflow, the extents of the runtime tensors a mask indexes, divisors that can be 0.
(Float constants beyond float32 are checked in floats.py.)

Ranges are exact Python integers. Each operator's range is the tightest interval over the
operands' intervals (`//` and `%` floor, for operands and divisors of either sign; `%` by a
range of divisors is sound but may be loose), so a range is otherwise loose only where an
expression uses one variable twice (`q.i - q.i`), and for `& | ^`, whose bounds are coarse
(ir/bits.py). A division by zero is no value (it is an error wherever it is evaluated), so a
divisor's 0 does not widen a range; nor do shift counts outside [0, 31] or ilog2 of x < 1.

Guards: `a and b` evaluates b only where a holds, `a or b` only where a fails
(docs/language.md, "Runtime tensors"). So the ranges inside b are taken under a narrowed box:
a comparison on the left side narrows the coordinates it constrains (`k.i >= P` gives
k.i in [P, ...] for the right side; `k.i - P >= 0`, `k.i // B < 3` alike), and an expression
it compares that cannot be narrowed through (a lookup, `len[k.i] > 0`) keeps its narrowed range
by identity. This is sound and cheap; complex guards may leave ranges wider than they could be.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from .. import limits
from ..errors import AttncError
from . import bits
from . import nodes as N
from .evaluate import modifier_exprs, part_expr, show

if TYPE_CHECKING:
    from .bind import Bound, KeyPart

Interval = tuple[int, int]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# Integers the language computes with: within ±2**62, so that tile analysis (analysis/symbolic.py)
# has headroom to clamp intervals of pairs that a guard rules out without losing live values.
INT_LIMIT = (-(2**62), 2**62)
BOOL = (0, 1)
HEAD_DIM = (1, 1024)  # head_dim in an integer expression: kernels take at most 256


# -- interval arithmetic ----------------------------------------------------------------------
def add(a: Interval, b: Interval) -> Interval:
    return a[0] + b[0], a[1] + b[1]


def sub(a: Interval, b: Interval) -> Interval:
    return a[0] - b[1], a[1] - b[0]


def mul(a: Interval, b: Interval) -> Interval:
    p = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    return min(p), max(p)


def _nonzero_parts(b: Interval) -> list[Interval]:
    """The divisor's interval without 0: a division by zero is never a value (it is an error
    wherever it is evaluated, see evaluate.py), so it contributes nothing to a range."""
    out = []
    if b[0] <= -1:
        out.append((b[0], min(b[1], -1)))
    if b[1] >= 1:
        out.append((max(b[0], 1), b[1]))
    return out


def floordiv(a: Interval, b: Interval) -> Interval:
    """Exact range of a // b (floor). For a divisor of one sign, a // b is monotone in a and in
    b separately, so the extremes lie at the corners of the box."""
    parts = _nonzero_parts(b)
    if not parts:
        return 0, 0  # only a division by zero: no value
    vals = [x // y for p in parts for x in a for y in p]
    return min(vals), max(vals)


def _mod_positive(a: Interval, b: Interval) -> Interval:
    """Range of a % b (floor) for 1 <= b[0] <= b[1]: within [0, b[1] - 1]."""
    b0, b1 = b
    if b0 == b1:
        if a[0] // b0 == a[1] // b0:  # one period: a % b grows with a
            return a[0] % b0, a[1] % b0
        return 0, b0 - 1
    if 0 <= a[0] and a[1] < b0:  # a % b = a for every divisor
        return a
    if -b0 <= a[0] and a[1] < 0:  # a % b = a + b for every divisor
        return a[0] + b0, a[1] + b1
    hi = b1 - 1
    if a[0] >= 0:
        hi = min(hi, a[1])  # a % b <= a
    return 0, hi


def mod(a: Interval, b: Interval) -> Interval:
    """Range of a % b (floor: the result has the divisor's sign); exact for one divisor."""
    parts = _nonzero_parts(b)
    if not parts:
        return 0, 0
    out = []
    for p in parts:
        if p[0] > 0:
            out.append(_mod_positive(a, p))
        else:  # a % b == -((-a) % (-b))
            lo, hi = _mod_positive((-a[1], -a[0]), (-p[1], -p[0]))
            out.append((-hi, -lo))
    return min(r[0] for r in out), max(r[1] for r in out)


def absolute(a: Interval) -> Interval:
    if a[0] >= 0:
        return a
    if a[1] <= 0:
        return -a[1], -a[0]
    return 0, max(-a[0], a[1])


_BINARY = {"+": add, "-": sub, "*": mul, "//": floordiv, "%": mod,
           "min": lambda a, b: (min(a[0], b[0]), min(a[1], b[1])),
           "max": lambda a, b: (max(a[0], b[0]), max(a[1], b[1])),
           **{op: (lambda a, b, op=op: bits.bitwise(op, a, b)) for op in ("&", "|", "^")},
           **{op: (lambda a, b, op=op: bits.shift(op, a, b)) for op in ("<<", ">>")}}
_NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_SWAP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
# Narrowing work per analysis; past it guards are not used (still sound, only looser).
_NARROW_BUDGET = 20_000

Env = dict  # IR node (a Coord, Head, or a narrowed expression) -> Interval


class Ranges:
    """Interval evaluation of integer IR expressions with guard narrowing.

    values: parameter values. lookup(node, index intervals) gives a Lookup's value range
    (default: int32, the range kernels read runtime tensors in). Hooks, called only for what is
    evaluated (not for what a guard rules out): visit(node, interval, ancestors) for every
    integer node, on_lookup(node, index intervals), on_divide(node, divisor interval).
    """

    def __init__(self, values: Mapping, lookup: Callable | None = None, visit: Callable | None = None,
                 on_lookup: Callable | None = None, on_divide: Callable | None = None,
                 head_dim: Interval = HEAD_DIM):
        self.values = values
        self.lookup = lookup
        self.visit = visit
        self.on_lookup = on_lookup
        self.on_divide = on_divide
        self.head_dim = head_dim
        self.budget = _NARROW_BUDGET
        self.stack: list[N.Expr] = []
        self.base = 0  # keys of the starting box: more means a guard narrowed an expression

    def run(self, e: N.Expr, env: Env, given: N.Expr | None = None) -> Interval | None:
        """The range of e over the box; with `given`, only where that condition holds (None
        when it never does: e is then never evaluated)."""
        self.base = len(env)
        if given is not None:
            env = self.assume(given, True, env)
            if env is None:
                return None
        return self.range(e, env)

    # -- values -------------------------------------------------------------------------------
    def range(self, x: N.Expr, env: Env, hooks: bool = True) -> Interval:
        """The interval of x over the box `env`; hooks fire only when `hooks` (the main walk)."""
        if hooks:
            self.stack.append(x)
        try:
            r = self._range(x, env, hooks)
        finally:
            if hooks:
                self.stack.pop()
        if len(env) > self.base and _narrowable_key(x):
            narrowed = env.get(x)
            if narrowed is not None:
                r = (max(r[0], narrowed[0]), min(r[1], narrowed[1]))
                if r[0] > r[1]:  # ruled out by a guard; any value is sound
                    r = (narrowed[0], narrowed[0])
        if hooks and self.visit is not None and x.type != N.FLOAT:
            self.visit(x, r, self.stack)
        return r

    def _range(self, x: N.Expr, env: Env, hooks: bool) -> Interval:
        if isinstance(x, N.Const):
            return int(x.value), int(x.value)
        if isinstance(x, N.Param):
            v = self.values[x.name]
            return int(v), int(v)
        if isinstance(x, N.HeadDim):
            return self.head_dim
        if isinstance(x, (N.Coord, N.Head, N.Batch)):
            return env[x]
        if isinstance(x, N.Window):
            return self.boolean(x.expand(), env, hooks)
        if isinstance(x, N.Lookup):
            idx = tuple(self.range(i, env, hooks) for i in x.indices)
            if hooks and self.on_lookup is not None:
                self.on_lookup(x, idx)
            r = self.lookup(x, idx) if self.lookup is not None else None
            return INT32 if r is None else r
        if isinstance(x, N.Unary):
            if x.op == "not":
                self.range(x.operand, env, hooks)
                return BOOL
            a = self.range(x.operand, env, hooks)
            if x.op == "ilog2":
                return bits.ilog2(a)
            return (-a[1], -a[0]) if x.op == "neg" else absolute(a)
        if isinstance(x, N.Binary):
            if x.op in ("and", "or"):
                return self.boolean(x, env, hooks)
            a, b = self.range(x.lhs, env, hooks), self.range(x.rhs, env, hooks)
            if x.op in N.COMPARISONS or x.op not in _BINARY:
                return BOOL
            if hooks and self.on_divide is not None and x.op in ("//", "%"):
                self.on_divide(x, b)
            return _BINARY[x.op](a, b)
        return BOOL  # Member (specialised away before analysis), float nodes

    def boolean(self, x: N.Expr, env: Env, hooks: bool) -> Interval:
        if isinstance(x, N.Binary) and x.op in ("and", "or"):
            self.range(x.lhs, env, hooks)
            inner = self.assume(x.lhs, x.op == "and", env)
            if inner is not None:  # else the right side is never evaluated
                self.range(x.rhs, inner, hooks)
            return BOOL
        return self.range(x, env, hooks)

    # -- guards -------------------------------------------------------------------------------
    def assume(self, cond: N.Expr, truth: bool, env: Env) -> Env | None:
        """The box where `cond` has value `truth` (a sound over-approximation), None if empty."""
        self.budget -= 1
        if self.budget < 0:
            return env
        if isinstance(cond, N.Const):
            return env if bool(cond.value) == truth else None
        if isinstance(cond, N.Window):
            return self.assume(cond.expand(), truth, env)
        if isinstance(cond, N.Unary) and cond.op == "not":
            return self.assume(cond.operand, not truth, env)
        if isinstance(cond, N.Binary) and cond.op in ("and", "or"):
            both = (cond.op == "and") == truth  # a and b true / a or b false: both sides have it
            if both:
                first = self.assume(cond.lhs, truth, env)
                return None if first is None else self.assume(cond.rhs, truth, first)
            # (a and b) false = a false, or a true and b false; (a or b) true alike.
            left = self.assume(cond.lhs, truth, env)
            held = self.assume(cond.lhs, not truth, env)
            right = None if held is None else self.assume(cond.rhs, truth, held)
            return _join(left, right)
        if isinstance(cond, N.Binary) and cond.op in N.COMPARISONS:
            op = cond.op if truth else _NEGATE[cond.op]
            return self.compare(cond.lhs, op, cond.rhs, env)
        return env

    def compare(self, l: N.Expr, op: str, r: N.Expr, env: Env) -> Env | None:
        if op in (">", ">="):
            l, r, op = r, l, _SWAP[op]
        env = self.relate(l, op, r, env)
        if env is None:
            return None
        a, b = self.range(l, env, False), self.range(r, env, False)
        if op == "<":
            env = self.narrow(l, a[0], b[1] - 1, env)
            return None if env is None else self.narrow(r, self.range(l, env, False)[0] + 1, b[1], env)
        if op == "<=":
            env = self.narrow(l, a[0], b[1], env)
            return None if env is None else self.narrow(r, self.range(l, env, False)[0], b[1], env)
        if op == "==":
            lo, hi = max(a[0], b[0]), min(a[1], b[1])
            env = self.narrow(l, lo, hi, env)
            return None if env is None else self.narrow(r, lo, hi, env)
        # !=: only a point at an end of the other side's interval can be cut off.
        for x, rx, other in ((l, a, b), (r, b, a)):
            if other[0] == other[1] and env is not None:
                c = other[0]
                if rx == (c, c):
                    return None
                if rx[0] == c:
                    env = self.narrow(x, c + 1, rx[1], env)
                elif rx[1] == c:
                    env = self.narrow(x, rx[0], c - 1, env)
        return env

    def relate(self, l: N.Expr, op: str, r: N.Expr, env: Env) -> Env | None:
        """`l op r` for two varying sides also bounds their difference, kept by identity:
        `k.i <= q.i` (causal) gives q.i - k.i >= 0, so `d[q.i - k.i]` never reads below 0."""
        (l, cl), (r, cr) = _offset(l), _offset(r)
        # Small sides only, so that the difference is small enough to be kept by identity.
        if isinstance(l, N.Const) or isinstance(r, N.Const) or not (_small(l, 5) and _small(r, 5)):
            return env
        # l + cl op r + cr  <=>  r - l op' cl - cr, with op' mirrored
        c = cl - cr
        diff = {"<": (c + 1, None), "<=": (c, None), "==": (c, c), "!=": None}[op]
        if diff is None:
            return env
        lo, hi = diff
        d = N.Binary("-", r, l)
        cur = self.range(d, env, False)
        hi = cur[1] if hi is None else hi
        return self.narrow(d, lo, hi, env)

    def narrow(self, x: N.Expr, lo: int, hi: int, env: Env) -> Env | None:
        """The box where lo <= x <= hi, by pushing the bounds down to coordinates."""
        self.budget -= 1
        cur = self.range(x, env, False)
        lo, hi = max(lo, cur[0]), min(hi, cur[1])
        if lo > hi:
            return None
        if (lo, hi) == cur or self.budget < 0:
            return env
        if isinstance(x, (N.Coord, N.Head, N.Batch)):
            return {**env, x: (lo, hi)}
        if _narrowable_key(x):  # keep the node's own range too: a box loses relations
            env = {**env, x: (lo, hi)}
        if isinstance(x, N.Unary) and x.op == "neg":
            return self.narrow(x.operand, -hi, -lo, env)
        if isinstance(x, N.Unary) and x.op == "abs":
            a = self.range(x.operand, env, False)
            if a[0] >= 0:
                return self.narrow(x.operand, lo, hi, env)
            if a[1] <= 0:
                return self.narrow(x.operand, -hi, -lo, env)
            return self.narrow(x.operand, -hi, hi, env)
        if isinstance(x, N.Binary) and x.op in ("+", "-"):
            a, b = self.range(x.lhs, env, False), self.range(x.rhs, env, False)
            if x.op == "+":
                env = self.narrow(x.lhs, lo - b[1], hi - b[0], env)
                if env is None:
                    return None
                a = self.range(x.lhs, env, False)
                return self.narrow(x.rhs, lo - a[1], hi - a[0], env)
            env = self.narrow(x.lhs, lo + b[0], hi + b[1], env)
            if env is None:
                return None
            a = self.range(x.lhs, env, False)
            return self.narrow(x.rhs, a[0] - hi, a[1] - lo, env)
        if isinstance(x, N.Binary) and x.op in ("*", "//"):
            a, b = self.range(x.lhs, env, False), self.range(x.rhs, env, False)
            for inner, c in ((x.lhs, b), (x.rhs, a)):
                if c[0] != c[1] or c[0] == 0 or (x.op == "//" and inner is x.rhs):
                    continue
                c = c[0]
                if x.op == "*":  # inner * c in [lo, hi]
                    lo_i, hi_i = (_ceil_div(lo, c), hi // c) if c > 0 else (_ceil_div(hi, c), lo // c)
                elif c > 0:  # inner // c in [lo, hi]
                    lo_i, hi_i = lo * c, hi * c + c - 1
                else:
                    lo_i, hi_i = (hi + 1) * c + 1, lo * c
                return self.narrow(inner, lo_i, hi_i, env)
        if isinstance(x, N.Binary) and x.op in ("min", "max"):
            a, b = self.range(x.lhs, env, False), self.range(x.rhs, env, False)
            if x.op == "min":  # both >= lo; the one that can be the minimum <= hi
                env = self.narrow(x.lhs, lo, a[1], env)
                env = env and self.narrow(x.rhs, lo, b[1], env)
                if env is not None and b[0] > hi:
                    env = self.narrow(x.lhs, lo, hi, env)
                if env is not None and a[0] > hi:
                    env = self.narrow(x.rhs, lo, hi, env)
            else:
                env = self.narrow(x.lhs, a[0], hi, env)
                env = env and self.narrow(x.rhs, b[0], hi, env)
                if env is not None and b[1] < lo:
                    env = self.narrow(x.lhs, lo, hi, env)
                if env is not None and a[1] < lo:
                    env = self.narrow(x.rhs, lo, hi, env)
            return env
        return env  # a lookup, `x % 4`, ...: its own range is kept above


def _narrowable_key(x: N.Expr) -> bool:
    # Small nodes only: a frozen dataclass hashes its whole subtree on every lookup.
    return isinstance(x, (N.Lookup, N.Binary, N.Unary)) and x.type == N.INT and _small(x)


def _small(x: N.Expr, budget: int = 12) -> bool:
    stack = [x]
    while stack:
        budget -= 1
        if budget < 0:
            return False
        stack.extend(N.children(stack.pop()))
    return True


def _offset(x: N.Expr) -> tuple[N.Expr, int]:
    """x as (y, c) with x = y + c for an integer constant c (0 when there is none)."""
    if isinstance(x, N.Binary) and x.op in ("+", "-") and isinstance(x.rhs, N.Const) \
            and type(x.rhs.value) is int:
        return x.lhs, x.rhs.value if x.op == "+" else -x.rhs.value
    return x, 0


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _join(a: Env | None, b: Env | None) -> Env | None:
    """The smallest box holding both boxes (None is empty)."""
    if a is None or b is None:
        return b if a is None else a
    return {k: (min(a[k][0], b[k][0]), max(a[k][1], b[k][1])) for k in a.keys() & b.keys()}


def box(ranges: Mapping[tuple[str, str], Interval]) -> Env:
    """An environment from coordinate ranges keyed (side, axis); ('q', 'head') is the head."""
    special = {("q", "head"): N.Head(), ("q", "batch"): N.Batch()}
    return {special.get(key, N.Coord(*key)): r for key, r in ranges.items()}


def int_range(e: N.Expr, values, ranges: Mapping[tuple[str, str], Interval], out: list | None = None,
              given: N.Expr | None = None, **hooks) -> Interval | None:
    """Interval [lo, hi] of an integer expression over coordinate ranges (sound; exact per
    operator). Every intermediate interval that is evaluated (not ruled out by a guard) is
    appended to `out`, so callers can check that kernel arithmetic cannot overflow anywhere.
    With `given` (a condition: the mask, for a score modifier), only where it holds; None if
    it never does."""
    visit = hooks.pop("visit", None)
    if out is not None:
        inner = visit

        def visit(x, r, stack):
            out.append(r)
            if inner is not None:
                inner(x, r, stack)
    env = box(ranges)
    env.setdefault(N.Head(), (0, limits.MAX_HEADS - 1))
    env.setdefault(N.Batch(), (0, limits.MAX_BATCH - 1))
    return Ranges(values, visit=visit, **hooks).run(e, env, given)


# -- ranges under a binding ---------------------------------------------------------------------
def coord_ranges(bound: "Bound", part: "KeyPart", heads: int | None = None,
                 q_part: "KeyPart | None" = None, batch: int | None = None) -> dict[tuple[str, str], Interval]:
    """Coordinate ranges of the keys of one segment and the queries of one query segment (the
    only one when q is unsegmented)."""
    heads = limits.MAX_HEADS if heads is None else heads
    q_part = q_part or bound.q_parts[0]
    batch = limits.MAX_BATCH if batch is None else batch
    ranges = {("q", "i"): (0, q_part.size - 1), ("k", "i"): (0, part.size - 1), ("q", "head"): (0, heads - 1),
              ("q", "batch"): (0, batch - 1)}
    for axis, size in zip(q_part.space.axes, q_part.dims):
        ranges[("q", axis)] = (0, size - 1)
    for axis, size in zip(part.space.axes, part.dims):
        ranges[("k", axis)] = (0, size - 1)
    return ranges


def integer_exprs(bound: "Bound", part: "KeyPart", q_part: "KeyPart | None" = None):
    """(what, expression, where) for what kernels and the evaluator compute in integers for keys
    of one segment (and queries of one query segment): the mask, and the integer parts (indices,
    distances) of the score modifiers. `where` is the condition under which the value is used:
    the bias only where the mask holds (values at hidden pairs are never used), the rest always."""
    q_name = q_part.name if q_part is not None else None
    mask = part_expr(bound.ir.mask, part.name, q_name)
    yield "the mask", mask, None
    for e in modifier_exprs(bound.ir):
        bias = e is bound.ir.score.logit_bias
        for x in _int_subtrees(part_expr(e, part.name, q_name)):
            yield ("the bias" if bias else "the sink"), x, (mask if bias else None)


def needs_int64(bound: "Bound") -> bool:
    """True when some integer intermediate of the mask or the score modifiers may leave int32
    over this binding's coordinates. Only values that are evaluated count: a kernel computes
    what a guard rules out too, but a wrapped value there is never used."""
    seen: list[Interval] = []
    for q_part, part in bound.pairs:
        ranges = coord_ranges(bound, part, q_part=q_part)
        for _, e, where in integer_exprs(bound, part, q_part):
            int_range(e, bound.env, ranges, seen, given=where)
    lo, hi = INT32
    return any(r[0] < lo or r[1] > hi for r in seen)


def check_int64(bound: "Bound") -> None:
    """Refuse a binding under which an integer intermediate can leave ±2**62 where it is
    evaluated: kernels (INT64) and the numpy evaluator compute in int64 and would wrap silently,
    and tile analysis clamps at ±2**62 (INT_LIMIT)."""
    lo, hi = INT_LIMIT
    for q_part, part in bound.pairs:
        ranges = coord_ranges(bound, part, q_part=q_part)

        for what, e, where in integer_exprs(bound, part, q_part):
            def visit(x, r, stack, what=what):
                if r[0] < lo or r[1] > hi:
                    _overflow(bound, what, x, r, stack)

            int_range(e, bound.env, ranges, visit=visit, given=where)


def _overflow(bound: "Bound", what: str, x: N.Expr, r: Interval, stack) -> None:
    span = None
    for node in [x, *reversed(stack)]:  # the node itself, else the nearest enclosing one with a place
        span = bound.ir.span_of(node)
        if span is not None:
            break
    part = "mask" if what == "the mask" else "bias"
    line = bound.ir.line_of(part)
    where = f" (line {line})" if span is None and line else ""
    reach = r[1] if r[1] > INT_LIMIT[1] else r[0]
    raise AttncError(f"integer overflow in {what}{where}: `{show(x)}` can reach {reach} for {bound.describe()}, "
                     f"beyond [-2**62, 2**62], the integers attnc computes with (int64, with headroom)", span,
                     hint="runtime tensor values count as int32"
                     if any(isinstance(n, N.Lookup) for n in N.walk(x)) else
                     "reorder or bound the expression")


def _int_subtrees(e: N.Expr):
    """The maximal integer-typed subexpressions of a float expression (indices, distances)."""
    stack = [e]
    while stack:
        x = stack.pop()
        if x.type == N.INT:
            yield x
        else:
            stack.extend(N.children(x))
