"""Bit operations (`& | ^ << >>`), `ilog2` and bool parameters (docs/language.md).

Located errors; the evaluator against Python's own integers; interval bounds (ir/intervals.py and
analysis/symbolic.py) sound for values inside their intervals; PowerAttention and a bool-parameter
window through the Triton kernels (interpreter), the reference and brute force; Flex export.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis.symbolic import evaluate_boxes
from attnc.ir import bits
from attnc.ir import nodes as N
from attnc.ir.evaluate import evaluate
from attnc.ir.intervals import int_range
from tests import oracles
from tests.test_analysis_exactness import conservative_tiles
from tests.test_errors import assert_rendered, compile_error, parse_error, spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- errors ----------------------------------------------------------------------------------------
# (source, line, col, phrase in the message)
PINNED = {
    "float-operand": (spec("q, kv = seq(N)", "mask = (q.i & 1.5) == 0"), 3, 19, "'&' needs integers"),
    "bool-operand": (spec("q, kv = seq(N)", "mask = (causal | k.i < 3) == 0"), 3, 13, "this is a condition"),
    "count-too-big": (spec("q, kv = seq(N)", "mask = q.i << 32 == 0"), 3, 19, "a shift count must be in [0, 31]"),
    "count-negative": (spec("q, kv = seq(N)", "mask = q.i >> -1 == 0"), 3, 19, "but this is -1"),
    "ilog2-zero": (spec("q, kv = seq(N)", "mask = ilog2(0) < q.i"), 3, 18, "ilog2's argument must be at least 1"),
    "ilog2-arity": (spec("q, kv = seq(N)", "mask = ilog2(q.i, 2) > 0"), 3, 12, "ilog2() takes 1 argument"),
    "ilog2-float": (spec("q, kv = seq(N)", "bias = ilog2(q.i / 2)"), 3, 18, "ilog2() needs an integer"),
    "count-reads-tensor": (spec("q, kv = seq(N)", "mask = q.i >> sh[k.i] == 0"), 3, 19, "cannot read a runtime tensor"),
    "bool-param-as-int": (spec("q, kv = seq(N)", "mask = q.i < flag", head="attention a(N, flag = true) {"),
                          3, 18, "needs a number, but this is a condition"),
    "causal-int": (spec("q, kv = seq(N)", "mask = window(3, causal = 1)"), 3, 31, "causal must be true/false"),
    "causal-token": (spec("q, kv = seq(N)", "mask = window(3, causal = k.i < 2)"), 3, 31, "cannot depend on token"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_located_errors(name):
    source, line, col, phrase = PINNED[name]
    err = parse_error(source)
    assert (err.line, err.col) == (line, col), str(err)
    assert phrase in err.message, str(err)
    assert_rendered(err)


def test_binding_errors_name_the_parameter_or_place():
    bool_spec = spec("q, kv = seq(N)", "mask = flag and k.i <= q.i", head="attention a(N, flag = false) {")
    for bad in (1, 0, 1.0, "true"):
        assert "'flag'" in compile_error(bool_spec, N=8, flag=bad).message
    assert "'N'" in compile_error(bool_spec, N=True).message
    # A count or an ilog2 argument fixed by parameters is checked when bound, at its place.
    err = compile_error(spec("q, kv = seq(N)", "mask = q.i >> (S - 5) == 0", head="attention a(N, S = 3) {"), N=8)
    assert "shift count outside [0, 31]" in err.message and "S - 5" in err.message and err.line == 3
    assert_rendered(err)
    err = compile_error(spec("q, kv = seq(N)", "mask = ilog2(S) <= q.i", head="attention a(N, S = 1) {"), N=8, S=0)
    assert "ilog2 of a number below 1" in err.message and err.line == 3


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_live_domain_error_where_evaluated_only(backend):
    bad = spec("q, kv = seq(N)", "mask = ilog2(q.i - k.i) >= 2")
    with pytest.raises(AttncError, match="ilog2 of a number below 1") as info:
        attnc.compile(bad, backend=backend, N=40, tiles=(16, 16)).mask()
    assert info.value.line == 3
    guarded = spec("q, kv = seq(N)", "mask = k.i < q.i and ilog2(q.i - k.i) >= 2 and 1 << (q.i % 32) > 0")
    assert attnc.compile(guarded, backend=backend, N=40, tiles=(16, 16)).mask().any()


# -- evaluation: Python's integers ----------------------------------------------------------------
_Q = N.Coord("q", "i")
_K = N.Coord("k", "i")
_INTS = st.integers(-(2**40), 2**40)
_OPS = {"&": lambda a, b: a & b, "|": lambda a, b: a | b, "^": lambda a, b: a ^ b,
        "<<": lambda a, b: a << b, ">>": lambda a, b: a >> b}


@SLOW
@given(st.sampled_from(sorted(_OPS)), st.lists(st.tuples(_INTS, _INTS), min_size=1, max_size=20))
def test_evaluate_matches_python(op, pairs):
    if op in ("<<", ">>"):
        pairs = [(a % 2**31 - 2**30, abs(b) % 32) for a, b in pairs]  # results within ±2**62
    a, b = (np.array(x, dtype=np.int64) for x in zip(*pairs))
    got = evaluate(N.Binary(op, _Q, _K), {}, {("q", "i"): a, ("k", "i"): b})
    assert [int(x) for x in np.atleast_1d(got)] == [_OPS[op](x, y) for x, y in pairs]
    x, y = pairs[0]  # constant folding gives the same
    assert N.fold(N.Binary(op, N.Const(x), N.Const(y))) == N.Const(_OPS[op](x, y))


@SLOW
@given(st.lists(st.integers(1, 2**62), min_size=1, max_size=20))
def test_ilog2_is_exact(xs):
    got = evaluate(N.Unary("ilog2", _Q), {}, {("q", "i"): np.array(xs, dtype=np.int64)})
    assert [int(v) for v in np.atleast_1d(got)] == [x.bit_length() - 1 for x in xs]
    assert N.fold(N.Unary("ilog2", N.Const(xs[0]))) == N.Const(xs[0].bit_length() - 1)


# -- intervals: sound ------------------------------------------------------------------------------
def _interval(lo=-300, hi=300, width=600):
    return st.tuples(st.integers(lo, hi), st.integers(0, width)).map(lambda t: (t[0], t[0] + t[1]))


def _inside(draw_ints, r):
    return draw_ints(st.integers(*r))


@SLOW
@given(st.sampled_from(["&", "|", "^"]), _interval(), _interval(), st.data())
def test_bitwise_bounds_are_sound(op, a, b, data):
    lo, hi = bits.bitwise(op, a, b)
    vlo, vhi = (np.asarray(x) for x in bits.bitwise_np(op, (np.int64(a[0]), np.int64(a[1])),
                                                        (np.int64(b[0]), np.int64(b[1]))))
    for _ in range(30):
        x, y = _inside(data.draw, a), _inside(data.draw, b)
        v = _OPS[op](x, y)
        assert lo <= v <= hi and vlo <= v <= vhi, (a, b, x, y, v)


@SLOW
@given(st.sampled_from(["<<", ">>"]), _interval(-(2**20), 2**20, 2**21), _interval(-3, 40, 12), st.data())
def test_shift_and_ilog2_bounds_are_sound(op, a, n, data):
    lo, hi = bits.shift(op, a, n)
    ilo, ihi = bits.ilog2(a)
    for _ in range(30):
        x, c = _inside(data.draw, a), _inside(data.draw, n)
        if 0 <= c <= 31:  # other counts are errors, not values
            assert lo <= _OPS[op](x, c) <= hi
        if x >= 1:
            assert ilo <= x.bit_length() - 1 <= ihi


def _exprs():
    leaves = st.one_of(st.sampled_from([_Q, _K]), st.integers(-40, 40).map(N.Const))

    def extend(kids):
        return st.one_of(
            st.tuples(st.sampled_from(["&", "|", "^", "+", "-"]), kids, kids).map(lambda t: N.Binary(*t)),
            st.tuples(st.sampled_from(["<<", ">>"]), kids, st.integers(0, 5).map(N.Const)).map(lambda t: N.Binary(*t)),
            kids.map(lambda x: N.Unary("ilog2", N.Binary("max", x, N.Const(1)))))

    return st.recursive(leaves, extend, max_leaves=8)


@SLOW
@given(_exprs(), _interval(-50, 50, 40), _interval(-50, 50, 40))
def test_expression_ranges_are_sound(e, rq, rk):
    """int_range (binding checks) and evaluate_boxes (tile analysis) hold every value."""
    lo, hi = int_range(e, {}, {("q", "i"): rq, ("k", "i"): rk})
    box = {("q", "i"): (np.array([rq[0]]), np.array([rq[1]])), ("k", "i"): (np.array([rk[0]]), np.array([rk[1]]))}
    blo, bhi = (int(np.asarray(x).reshape(-1)[0]) for x in evaluate_boxes(e, {}, box, 1))
    qs, ks = np.meshgrid(np.arange(rq[0], rq[1] + 1), np.arange(rk[0], rk[1] + 1))
    v = np.asarray(evaluate(e, {}, {("q", "i"): qs, ("k", "i"): ks}))
    assert lo <= v.min() and v.max() <= hi and blo <= v.min() and v.max() <= bhi


# -- end to end ------------------------------------------------------------------------------------
def power_mask(N: int, W: int) -> np.ndarray:
    """PowerAttention by brute force: causal, the W latest keys and every power-of-two distance."""
    d = np.arange(N)[:, None] - np.arange(N)[None, :]
    power = (d > 0) & (np.bitwise_and(d, d - 1) == 0)
    return (d >= 0) & ((d < W) | power)


def _qkv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 16, generator=g) for _ in range(3))


def _same(fn, ref, mask, n):
    q, k, v = _qkv(n)
    assert np.array_equal(fn.mask().numpy(), mask)
    want = oracles.attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(ref(q, k, v).double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn(q, k, v).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("N,W", [(90, 5), (130, 1)])
def test_power_attention(N, W):
    path = SPECS / "power_attention.attn"
    fn = attnc.compile(path, N=N, W=W, tiles=(16, 16))
    ref = attnc.compile(path, backend="reference", N=N, W=W)
    mask = power_mask(N, W)
    _same(fn, ref, mask, N)
    conservative_tiles(fn, mask)  # sound: never EMPTY over a visible pair, never FULL over a hidden one


def test_power_attention_skips_tiles_without_a_power_of_two():
    fn = attnc.compile(SPECS / "power_attention.attn", N=2048, W=8, tiles=(64, 64))
    classes = fn.schedule.classes
    computed = int((classes != 0).sum())
    assert computed < classes.size // 4  # ilog2's exact range proves most causal tiles EMPTY


BOOL_SPEC = """attention w(N, K = 5, is_causal = false, local = true) {
    q, kv = seq(N)
    mask = window(K, causal = is_causal) and (local or k.i % 2 == 0) and (not is_causal or q.i >= 0)
}"""


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("local", [True, False])
def test_bool_parameters(is_causal, local):
    N = 37
    fn = attnc.compile(BOOL_SPEC, N=N, is_causal=is_causal, local=local, tiles=(16, 16))
    ref = attnc.compile(BOOL_SPEC, backend="reference", N=N, is_causal=is_causal, local=local)
    mask = oracles.gna_mask((N,), (5,), (1,), (1,), (is_causal,))
    if not local:
        mask = mask & (np.arange(N)[None, :] % 2 == 0)
    _same(fn, ref, mask, N)
    conservative_tiles(fn, mask)
    # One kernel serves every binding: the flag is a kernel argument, not a specialisation.
    other = attnc.compile(BOOL_SPEC, N=N, is_causal=not is_causal, local=local, tiles=(16, 16))
    assert other.compiled.kernel_source == fn.compiled.kernel_source


def test_bool_parameter_defaults_and_ir():
    s = attnc.parse(BOOL_SPEC)
    decl = {p.name: p for p in s.params}
    assert decl["is_causal"].boolean and decl["is_causal"].default == N.Const(False)
    assert not decl["K"].boolean
    fn = attnc.compile(BOOL_SPEC, backend="reference", N=12)
    assert fn.compiled.bound.env["is_causal"] is False and fn.compiled.bound.env["local"] is True


def test_to_flex_mask_matches():
    from tests.test_flex_export import check_mask  # skips without torch's flex_attention

    src = spec("q, kv = seq(N)", "d = q.i - k.i",
               "mask = k.i <= q.i and ((d & (d - 1)) == 0 or (q.i ^ k.i) >> 3 == 0 or (k.i | 1) << 1 == 6)")
    fn = attnc.compile(src, backend="reference", N=77)
    export = fn.to_flex(block_size=16)
    d = np.arange(77)[:, None] - np.arange(77)[None, :]
    q, k = np.arange(77)[:, None], np.arange(77)[None, :]
    want = (d >= 0) & (((d & (d - 1)) == 0) | (((q ^ k) >> 3) == 0) | (((k | 1) << 1) == 6))
    assert np.array_equal(fn.mask().numpy(), want)
    check_mask(fn, export, {}, 16, exact=False)
    power = attnc.compile(SPECS / "power_attention.attn", backend="reference", N=70, W=3)
    check_mask(power, power.to_flex(block_size=16), {}, 16, exact=False)


def test_int64_kernels_shift_exactly():
    """Values past int32 switch kernels to int64 (intervals.needs_int64); shifts stay exact."""
    src = spec("q, kv = seq(N)", "mask = (q.i << 30) - (k.i << 30) >= 0 and ((q.i * 1000000) >> 20) % 3 != 1")
    fn = attnc.compile(src, N=45, tiles=(16, 16))
    assert fn.compiled.int64
    q, k = np.arange(45)[:, None], np.arange(45)[None, :]
    mask = (q >= k) & (((q * 1000000) >> 20) % 3 != 1)
    _same(fn, attnc.compile(src, backend="reference", N=45), mask, 45)


def test_precedence_and_printing_round_trip():
    from attnc.frontend.parser import parse
    from attnc.frontend.printer import format_spec

    body = ["q, kv = seq(N)", "a = q.i | k.i ^ 3 & q.i << 1 + k.i", "b = ((q.i | k.i) & 3) << (1 << 2) >> 1",
            "c = -(q.i & 3) + (q.i >> 1) * 2 - ilog2(k.i + 1)", "mask = a == b | c and a & 1 != 0"]
    ast = parse(spec(*body))
    assert parse(format_spec(ast)) == ast
    e = ast.body[1].value  # | loosest, then ^, &, <<, +
    assert (e.op, e.rhs.op, e.rhs.rhs.op, e.rhs.rhs.rhs.op, e.rhs.rhs.rhs.rhs.op) == ("|", "^", "&", "<<", "+")
    assert ast.body[4].value.lhs.op == "==" and ast.body[4].value.rhs.op == "!="  # & binds tighter than ==
    fn = attnc.compile(spec(*body), backend="reference", N=20)
    q, k = np.arange(20)[:, None], np.arange(20)[None, :]
    a, b = q | k ^ 3 & q << 1 + k, ((q | k) & 3) << (1 << 2) >> 1
    c = -(q & 3) + (q >> 1) * 2 - np.floor(np.log2(k + 1)).astype(np.int64)
    assert np.array_equal(fn.mask().numpy(), (a == (b | c)) & ((a & 1) != 0))
