"""Interval reasoning (attnc/ir/intervals.py): sound for every operator, exact for `//` and `%`
on simple cases, narrowed by guards; int64 overflow and float32 range refused at compile time.

The oracle here is plain Python integer arithmetic on the IR, written independently of attnc's
evaluator: `//` and `%` floor as in Python, a division by zero is no value.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.ir import nodes as N
from attnc.ir.intervals import floordiv, int_range, mod, needs_int64


class _NoValue(Exception):
    pass


def _value(e: N.Expr, point: dict) -> int | bool:
    """Python's meaning of an integer / boolean IR expression at one point."""
    if isinstance(e, N.Const):
        return e.value
    if isinstance(e, N.Coord):
        return point[(e.side, e.axis)]
    if isinstance(e, N.Unary):
        x = _value(e.operand, point)
        return (not x) if e.op == "not" else -x if e.op == "neg" else abs(x)
    if isinstance(e, N.Binary):
        a = _value(e.lhs, point)
        if e.op == "and":
            return a and _value(e.rhs, point)
        if e.op == "or":
            return a or _value(e.rhs, point)
        b = _value(e.rhs, point)
        if e.op in ("//", "%") and b == 0:
            raise _NoValue
        return {"+": a + b, "-": a - b, "*": a * b, "min": min(a, b), "max": max(a, b),
                "//": a // b if b else 0, "%": a % b if b else 0,
                "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[e.op]
    raise TypeError(e)


COORDS = [N.Coord("q", "i"), N.Coord("k", "i"), N.Coord("q", "y")]


def _coords():
    # A fresh object per use: intervals are recorded per node object, and one object evaluated
    # both in a guard (everywhere) and behind it (narrowed) would mix the two contexts.
    return st.sampled_from(COORDS).map(lambda c: N.Coord(c.side, c.axis))


def int_exprs(depth: int = 4):
    leaves = st.one_of(_coords(), st.integers(-20, 20).map(N.Const))

    def extend(children):
        binary = st.tuples(st.sampled_from(["+", "-", "*", "//", "%", "min", "max"]), children, children)
        unary = st.tuples(st.sampled_from(["neg", "abs"]), children)
        return st.one_of(binary.map(lambda t: N.Binary(*t)), unary.map(lambda t: N.Unary(*t)))

    return st.recursive(leaves, extend, max_leaves=2 ** depth)


def ranges_strategy():
    def one():
        return st.tuples(st.integers(-30, 30), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1]))
    return st.tuples(one(), one(), one()).map(lambda r: dict(zip([("q", "i"), ("k", "i"), ("q", "y")], r)))


def _points(ranges, limit=400):
    keys = list(ranges)
    grids = [range(lo, hi + 1) for lo, hi in ranges.values()]
    pts = list(itertools.product(*grids))
    if len(pts) > limit:
        rng = np.random.default_rng(0)
        pts = [pts[i] for i in rng.choice(len(pts), limit, replace=False)]
    return [dict(zip(keys, p)) for p in pts]


def _collect(e, ranges):
    """int_range of e, and every node's interval (several when a node is reached more than once)."""
    seen: dict[int, list] = {}

    def visit(x, r, stack):
        seen.setdefault(id(x), []).append(r)

    top = int_range(e, {}, ranges, visit=visit)
    return top, seen


def _check_all_nodes(e, point, seen):
    """Every evaluated node's value lies in each interval recorded for it."""
    v = _value(e, point)
    for r in seen.get(id(e), []):
        assert r[0] <= int(v) <= r[1], (e, point, v, r)
    for c in N.children(e):
        if isinstance(e, N.Binary) and e.op == "and" and c is e.rhs and not _value(e.lhs, point):
            continue
        if isinstance(e, N.Binary) and e.op == "or" and c is e.rhs and _value(e.lhs, point):
            continue
        _check_all_nodes(c, point, seen)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(e=int_exprs(), ranges=ranges_strategy())
def test_every_value_lies_in_its_interval(e, ranges):
    _, seen = _collect(e, ranges)
    for point in _points(ranges):
        try:
            _value(e, point)
        except _NoValue:
            continue  # a division by zero is an error wherever it is evaluated, never a value
        _check_all_nodes(e, point, seen)


def comparisons():
    ops = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    side = st.one_of(_coords(), st.integers(-20, 20).map(N.Const),
                     st.tuples(_coords(), st.sampled_from(["+", "-", "//", "*"]),
                               st.integers(-5, 5).filter(bool)).map(lambda t: N.Binary(t[1], t[0], N.Const(t[2]))))
    return st.tuples(ops, side, side).map(lambda t: N.Binary(*t))


def guards():
    return st.recursive(comparisons(), lambda c: st.one_of(
        st.tuples(st.sampled_from(["and", "or"]), c, c).map(lambda t: N.Binary(*t)),
        c.map(lambda x: N.Unary("not", x))), max_leaves=4)


def _check_guarded(whole, ranges):
    """Every node's interval holds at every point where the node is evaluated."""
    _, seen = _collect(whole, ranges)
    for point in _points(ranges):
        try:
            _value(whole, point)
        except _NoValue:
            continue
        _check_all_nodes(whole, point, seen)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=guards(), e=int_exprs(3), op=st.sampled_from(["and", "or"]), ranges=ranges_strategy())
def test_guards_narrow_soundly(g, e, op, ranges):
    """In `g and e < 0` (`g or e < 0`), e is evaluated only where g holds (fails); its nodes'
    intervals, taken under the narrowed box, hold at every such point."""
    _check_guarded(N.Binary(op, g, N.Binary("<", e, N.Const(0))), ranges)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=comparisons(), a=_coords(), b=_coords(), c=st.integers(-6, 6), op=st.sampled_from(["and", "or"]),
       ranges=ranges_strategy())
def test_relations_narrow_soundly(g, a, b, c, op, ranges):
    """A comparison of two coordinates bounds their difference (`k.i <= q.i` gives q.i - k.i >= 0),
    which a guarded `a - b + c` then reads: sound at every point where it is evaluated."""
    e = N.Binary("+", N.Binary("-", a, b), N.Const(c))
    _check_guarded(N.Binary(op, g, N.Binary("<", e, N.Const(0))), ranges)


def _brute(f, xs):
    vals = [f(x) for x in xs]
    return min(vals), max(vals)


@settings(max_examples=400, deadline=None)
@given(lo=st.integers(-60, 60), width=st.integers(0, 40), d=st.integers(-13, 13).filter(bool))
def test_floordiv_and_mod_by_a_constant_are_tight(lo, width, d):
    xs = range(lo, lo + width + 1)
    ranges = {("q", "i"): (lo, lo + width)}
    c = N.Coord("q", "i")
    assert int_range(N.Binary("//", c, N.Const(d)), {}, ranges) == _brute(lambda x: x // d, xs)
    assert int_range(N.Binary("%", c, N.Const(d)), {}, ranges) == _brute(lambda x: x % d, xs)
    # The constant divided by a coordinate range that holds no zero, and a shifted numerator.
    if not lo <= 0 <= lo + width:
        assert int_range(N.Binary("//", N.Const(d * 7), c), {}, ranges) == _brute(lambda x: (d * 7) // x, xs)
    assert int_range(N.Binary("//", N.Binary("-", c, N.Const(5)), N.Const(d)), {}, ranges) == \
        _brute(lambda x: (x - 5) // d, xs)


@settings(max_examples=200, deadline=None)
@given(a=st.tuples(st.integers(-40, 40), st.integers(0, 15)), b=st.tuples(st.integers(-12, 12), st.integers(0, 8)))
def test_floordiv_of_two_ranges_is_exact(a, b):
    """For independent operands (a box), a // b is exact; a % b is sound."""
    A = range(a[0], a[0] + a[1] + 1)
    B = [y for y in range(b[0], b[0] + b[1] + 1) if y]
    assume(B)
    pairs = [(x, y) for x in A for y in B]
    ia, ib = (a[0], a[0] + a[1]), (b[0], b[0] + b[1])
    assert floordiv(ia, ib) == _brute(lambda p: p[0] // p[1], pairs)
    lo, hi = mod(ia, ib)
    true = _brute(lambda p: p[0] % p[1], pairs)
    assert lo <= true[0] and true[1] <= hi


@pytest.mark.parametrize("expr,ranges,expect", [
    ("abs", (-7, 3), (0, 7)), ("abs", (2, 9), (2, 9)), ("abs", (-9, -2), (2, 9)),
    ("min5", (-7, 9), (-7, 5)), ("max5", (-7, 9), (5, 9)),
    ("mul-3", (-4, 6), (-18, 12)), ("sq", (-4, 6), (-24, 36)),
])
def test_simple_operators(expr, ranges, expect):
    c = N.Coord("q", "i")
    e = {"abs": N.Unary("abs", c), "min5": N.Binary("min", c, N.Const(5)), "max5": N.Binary("max", c, N.Const(5)),
         "mul-3": N.Binary("*", c, N.Const(-3)), "sq": N.Binary("*", c, c)}[expr]
    assert int_range(e, {}, {("q", "i"): ranges}) == expect


# -- guards narrow index ranges -----------------------------------------------------------------------
def _extents(src, **params):
    return attnc.compile(src, backend="reference", **params).compiled.tensor_extents


@pytest.mark.parametrize("mask,params,expect", [
    # BigBird random blocks, Flamingo media index, a clip id per frame group: // gives tight ranges.
    ("r[q.i // B, k.i // B] == 1", dict(N=64, B=16), {"r": (4, 4)}),
    ("iv[k.i // L, 0] == 1", dict(N=64, L=16), {"iv": (4, 1)}),
    ("iv[k.i % L, q.i % 3] == 1", dict(N=64, L=16), {"iv": (16, 3)}),
    # Guards: the right side is evaluated only where the left side holds (and) / fails (or).
    ("k.i >= P and anc[q.i, k.i - P] == 1", dict(N=40, P=8), {"anc": (40, 32)}),
    ("k.i - P >= 0 and anc[q.i, k.i - P] == 1", dict(N=40, P=8), {"anc": (40, 32)}),
    ("k.i < P or t[k.i - P] == 1", dict(N=40, P=8), {"t": (32,)}),
    ("not (k.i < P) and t[k.i - P] == 1", dict(N=40, P=8), {"t": (32,)}),
    ("q.i >= k.i and d[q.i - k.i] == 1", dict(N=40, P=0), {"d": (40,)}),
    ("q.i // B < P and r[q.i // B] == 1", dict(N=40, B=4, P=3), {"r": (3,)}),
    ("k.i < P and q.i < P and r[P - 1 - k.i, q.i] == 1", dict(N=40, P=5), {"r": (5, 5)}),
    ("(k.i < 4 or k.i >= 10) and t[k.i] == 1", dict(N=40, P=0), {"t": (40,)}),
    ("k.i >= P and k.i < 2 * P and t[k.i - P] == 1", dict(N=40, P=8), {"t": (8,)}),
    ("min(k.i, P) >= 3 and t[k.i - 3] == 1", dict(N=40, P=8), {"t": (37,)}),
    ("abs(q.i - k.i) <= P and t[q.i - k.i + P] == 1", dict(N=40, P=3), {"t": (7,)}),
    ("false and t[k.i - 100] == 1", dict(N=40, P=0), {}),
])
def test_guards_narrow_what_they_guard(mask, params, expect):
    names = [n for n in params if n != "N"]
    src = f"attention a(N, {', '.join(names)}) {{ q, kv = seq(N)\n mask = {mask} }}"
    assert _extents(src, **params) == expect


def test_a_negative_index_outside_any_guard_is_still_refused():
    src = "attention a(N, P) { q, kv = seq(N)\n mask = k.i >= P or t[k.i - P] == 1 }"
    with pytest.raises(AttncError, match="can be negative"):
        attnc.compile(src, backend="reference", N=40, P=8)


def test_a_grid_clip_index_after_floor_division():
    src = """attention a(T, H, W, F = 2) { q, kv = grid(T, H, W)
             mask = clip[q.t // F] == clip[k.t // F] }"""
    assert _extents(src, T=6, H=2, W=3) == {"clip": (3,)}


def test_guard_reasoning_stays_cheap_on_deep_guards():
    """Nested and/or guards explore a bounded amount of work (sound past the budget)."""
    cond = "k.i >= 1"
    for n in range(60):
        cond = f"({cond} {'and' if n % 2 else 'or'} k.i != {n})"
    src = f"attention a(N) {{ q, kv = seq(N)\n mask = {cond} and t[k.i] == 1 }}"
    assert _extents(src, N=100) == {"t": (100,)}


# -- kernel width and overflow ---------------------------------------------------------------------
def test_tight_division_ranges_keep_kernels_in_int32():
    # Before: `//` was ranged as [-|a|, |a|], so (q.i + P) // 2 * 3 looked like +-3e9 and the
    # kernel went to int64; it is [5e8, 5e8 + 31] * 3, well inside int32.
    src = "attention a(N, P) { q, kv = seq(N)\n mask = (q.i + P) // 2 * 3 > k.i }"
    assert not attnc.compile(src, N=64, P=10**9).compiled.int64
    src = "attention a(N, P) { q, kv = seq(N)\n mask = (q.i + P) % 7 * P > k.i }"
    assert not attnc.compile(src, N=64, P=300_000_000).compiled.int64  # [0, 6] * 3e8, not 3e8 * 3e8
    fn = attnc.compile("attention a(N, B) { q, kv = seq(N)\n mask = (q.i * 65536) // B + 2147483647 > k.i }",
                       N=64, B=1)
    assert fn.compiled.int64 and needs_int64(fn.compiled.bound)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_integer_overflow_beyond_int64_is_refused(backend):
    src = "attention ovf(N, P) {\n    q, kv = seq(N)\n    mask = (q.i + 1) * P * P * P * P > k.i\n}"
    with pytest.raises(AttncError, match=r"integer overflow in the mask: `\(q.i \+ 1\) \* P \* P \* P \* P` "
                                         r"can reach .* beyond \[-2\*\*62, 2\*\*62\]") as info:
        attnc.compile(src, backend=backend, N=8, P=65536)
    assert (info.value.line, info.value.col) == (3, 12)
    assert attnc.compile(src, backend=backend, N=8, P=1000).mask().shape == (8, 8)  # 8e12: int64 is enough


def test_overflow_inside_an_index_is_located():
    src = "attention ovf(N, P) {\n    q, kv = seq(N)\n    mask = t[(q.i + 1) * P * P * P * P] == 1\n}"
    with pytest.raises(AttncError) as info:
        attnc.compile(src, backend="reference", N=8, P=65536)
    assert (info.value.line, info.value.col) == (3, 14)  # the product inside the index
    assert "integer overflow" in info.value.message


def test_overflow_under_a_guard_that_rules_it_out_is_no_error():
    src = "attention ovf(N, P) { q, kv = seq(N)\n mask = q.i < 0 and q.i * P * P * P * P == k.i }"
    assert not attnc.compile(src, backend="reference", N=8, P=65536).mask().any()


def test_overflow_from_runtime_tensor_values():
    src = "attention a(N) { q, kv = seq(N)\n mask = d[q.i] * d[k.i] * d[q.i] == 1 }"
    with pytest.raises(AttncError, match="runtime tensor values count as int32"):
        attnc.compile(src, backend="reference", N=8)


# -- float range ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,params,match", [
    ("bias = 1e39 * 0.0 + (q.i - k.i)", {}, r"the bias \(line 2\): `1e\+39` is 1e39 .* float32"),
    ("bias = s * (q.i - k.i)", dict(s=1e39), r"the bias \(line 2\): `s` is 1e39"),
    ("bias = 1e20 * 1e20 * 0.0", {}, r"`1e\+20 \* 1e\+20` is 1e40"),
    ("score = softmax(scale = 1e39)", {}, r"the softmax scale( \(line 2\))?: `1e\+39` is 1e39"),
    ("score = sigmoid(bias = -2e38 * 2.0)", {}, r"the sigmoid bias.* is -4e38"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_floats_beyond_float32_are_refused_at_compile_time(body, params, match, backend):
    head = "attention a(N, s = 1.0) {" if "s *" in body else "attention a(N) {"
    with pytest.raises(AttncError, match=match):
        attnc.compile(f"{head} q, kv = seq(N)\n {body} }}", backend=backend, N=8, **params)


def test_large_float_intermediates_on_the_host_are_fine():
    # The scale is computed in float64 on the host; only its value reaches the kernel.
    fn = attnc.compile("attention a(N) { q, kv = seq(N)\n score = softmax(scale = 1e200 / 1e200) }", N=8)
    assert fn.compiled.bound is not None


def test_bias_integers_are_ranged_where_the_mask_holds():
    # The bias is used only at visible pairs: q.i < 2 keeps q.i * P * P * P within int64.
    src = "attention a(N, P) { q, kv = seq(N)\n mask = q.i < 2\n bias = (q.i * P * P * P) * 1.0 }"
    attnc.compile(src, backend="reference", N=64, P=2**20)
    src = "attention a(N, P) { q, kv = seq(N)\n mask = q.i < 9\n bias = (q.i * P * P * P) * 1.0 }"
    with pytest.raises(AttncError, match=r"integer overflow in the bias: `q.i \* P \* P \* P`") as info:
        attnc.compile(src, backend="reference", N=64, P=2**20)
    assert (info.value.line, info.value.col) == (3, 10)
