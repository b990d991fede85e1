"""Issue 8, B5: the IR's invariants as code (attnc/ir/verify.py). Every spec and every random spec
lowers to an IR that verifies; each invariant rejects a hand-broken IR."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import attnc
from attnc import AttncError
from attnc.frontend import parse
from attnc.ir import nodes as N
from attnc.ir.lower import lower
from attnc.ir.verify import IRError, verify
from tests.test_properties import specs
from tests.test_properties_segments import SCORES, _score_text, bias_cases

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.attn"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_verifies(path):
    verify(attnc.parse(path).ir)


# -- random specs (the generators of the property tests) ------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_random_specs_verify(case):
    source, _, _ = case
    verify(lower(parse(source)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(bias_cases(), SCORES)
def test_random_segmented_specs_with_bias_and_score_verify(bias_case, score):
    case, bias, _ = bias_case
    kind, cap = score
    verify(lower(parse(case.source(bias=bias, score=_score_text(kind, cap)))))


# -- each invariant rejects an IR that breaks it ----------------------------------------------------
def ir_of(*body: str, head: str = "attention a(N, P = 2, s = 0.5) {") -> N.Attention:
    return attnc.parse(head + "\n" + "\n".join(body) + "\n}\n").ir


BASE = ir_of("q, kv = seq(N)", "mask = causal and doc[q.i] == doc[k.i]", "bias = rb[q.i - k.i + N] * s",
             "score = softmax(scale = log(n_visible) / sqrt(head_dim), softcap = 4.0, sink = sinks[head])")
SEGS = ir_of("q = grid(N, N)", "kv = hi: grid(N, N), lo: seq(P)", "mask = (k in hi and k.y < q.y) or k in lo")
GRID = ir_of("q, kv = grid(N, N)", "mask = window(3, 3)")
ROUTE = ir_of("q, kv = grid(N, N)", "route = top(2) of regions(2, 2) by mean(q) @ mean(k)")
qi, ki = N.Coord("q", "i"), N.Coord("k", "i")
DOC = N.TensorDecl("doc", 1, N.INT)


def mask(e, ir=BASE):
    return dataclasses.replace(ir, mask=e)


def score(ir=BASE, **fields):
    return dataclasses.replace(ir, score=dataclasses.replace(ir.score, **fields))


BROKEN = {
    # types
    "mask-not-a-condition": (lambda: mask(qi), "the mask is int"),
    "scale-not-a-number": (lambda: score(scale=N.Const(True)), "the score scale is bool"),
    "bias-not-a-number": (lambda: score(logit_bias=qi.lt(ki)), "the bias is bool"),
    "softcap-not-a-number": (lambda: score(softcap=N.Const(False)), "the softcap is bool"),
    "sink-not-a-number": (lambda: score(sink=N.Const(True)), "the sink logit is bool"),
    "index-not-an-integer": (lambda: mask(N.Lookup("doc", (qi.lt(ki),)).eq(N.Const(1))),
                             "lookup into 'doc'"),
    "float-in-the-mask": (lambda: mask(qi.lt(N.Const(2.5))), "the mask is integer arithmetic"),
    "floor-division-of-a-float": (lambda: score(logit_bias=N.Binary("//", N.Const(1.5), N.Const(2))),
                                  "'//' of float and int"),
    "not-of-an-integer": (lambda: mask(N.Unary("not", qi)), "'not' applied to int"),
    "unknown-operator": (lambda: mask(N.Binary("**", qi, ki).eq(qi)), "unknown operator '**'"),
    "unknown-function": (lambda: score(scale=N.Call("tanh", (N.Const(1.0),))), "tanh(float)"),
    # coordinates and segments
    "axis-not-in-q": (lambda: mask(N.Coord("q", "y").lt(ki)), "q.y in the mask"),
    "unknown-side": (lambda: mask(N.Coord("v", "i").lt(ki)), "side 'v'"),
    "key-axis-not-in-a-segment": (lambda: mask(N.Coord("k", "y").lt(N.Coord("q", "y")), SEGS),
                                  "k.y in the mask is read for keys of segment 'lo'"),
    "member-of-unknown-segment": (lambda: mask(N.Member("k", "mid"), SEGS), "`k in mid`"),
    "member-without-segments": (lambda: mask(N.Member("k", "hi")), "the key segments are none"),
    "duplicate-segments": (lambda: dataclasses.replace(SEGS, kv=N.Segments((("a", SEGS.q), ("a", SEGS.q)))),
                           "uniquely"),
    # tensors
    "undeclared-tensor": (lambda: mask(N.Lookup("ids", (qi,)).eq(N.Const(0))), "'ids' is read but not declared"),
    "rank-mismatch": (lambda: mask(N.Lookup("doc", (qi, ki)).eq(N.Const(0))), "with 2 indices as int"),
    "dtype-mismatch": (lambda: mask(N.Lookup("doc", (qi,), N.FLOAT).lt(N.Const(0.0))), "is a float"),
    "int-tensor-in-the-bias": (lambda: score(logit_bias=N.Lookup("doc", (qi,)) * N.Param("s", N.FLOAT)),
                               "reads int tensor 'doc'"),
    "tensor-declared-twice": (lambda: dataclasses.replace(BASE, tensors=BASE.tensors + (DOC,)), "declared twice"),
    "tensor-never-read": (lambda: dataclasses.replace(BASE, tensors=BASE.tensors + (N.TensorDecl("x", 1),)),
                          "never read: ['x']"),
    "integer-tensor-per-head": (lambda: dataclasses.replace(
        BASE, tensors=tuple(dataclasses.replace(t, per_head=True) if t.name == "doc" else t for t in BASE.tensors)),
        "integer tensor 'doc' is marked per head"),
    # parameters
    "undeclared-parameter": (lambda: mask(qi.lt(N.Param("M", N.INT))), "undeclared (or later) parameter 'M'"),
    "parameter-type": (lambda: mask(qi.lt(N.Param("s", N.INT))), "'s' is float but read as int"),
    "parameter-declared-twice": (lambda: dataclasses.replace(BASE, params=BASE.params + BASE.params[:1]),
                                 "'N' is declared twice"),
    "default-reads-a-later-parameter": (lambda: dataclasses.replace(
        BASE, params=(N.ParamDecl("N", N.INT, N.Param("P", N.INT)),) + BASE.params[1:]), "parameter 'P'"),
    "default-of-another-type": (lambda: dataclasses.replace(
        BASE, params=BASE.params[:1] + (N.ParamDecl("P", N.INT, N.Const(2.0)),) + BASE.params[2:]),
        "'P' is int but its default is float"),
    # what each place may read
    "n_visible-in-the-mask": (lambda: mask(qi.lt(N.NVisible())), "NVisible is not allowed in the mask"),
    "n_visible-in-the-bias": (lambda: score(logit_bias=N.NVisible() * N.Const(0.5)),
                              "NVisible is not allowed in the bias"),
    "n_visible-in-the-softcap": (lambda: score(softcap=N.NVisible() * N.Const(1.0)), "NVisible is not allowed"),
    "head-in-the-scale": (lambda: score(scale=N.Head() * N.Const(0.1)), "Head is not allowed in the score scale"),
    "head_dim-in-the-mask": (lambda: mask(qi.lt(N.HeadDim())), "HeadDim is not allowed in the mask"),
    "coordinate-in-the-sink": (lambda: score(sink=qi * N.Const(0.5)), "Coord is not allowed in the sink"),
    "coordinate-in-a-size": (lambda: dataclasses.replace(BASE, q=N.Space("seq", (qi,))), "Coord is not allowed"),
    "coordinate-in-a-precondition": (lambda: dataclasses.replace(BASE, requires=(N.Require(qi.lt(ki), "x"),)),
                                     "Coord is not allowed in the precondition"),
    "window-in-the-bias": (lambda: score(logit_bias=N.Window("i", N.Param("N", N.INT), N.Const(3), N.Const(1),
                                                             N.Const(1), False)), "Window is not allowed"),
    # windows, spaces, score, route
    "window-along-a-missing-axis": (lambda: mask(N.Window("t", GRID.q.dims[0], N.Const(3), N.Const(1), N.Const(1),
                                                          False), GRID), "malformed window"),
    "window-length-not-the-axis": (lambda: mask(N.Window("y", N.Const(7), N.Const(3), N.Const(1), N.Const(1), False),
                                                GRID), "is not the axis size"),
    "window-on-segments": (lambda: mask(N.Window("y", SEGS.q.dims[0], N.Const(3), N.Const(1), N.Const(1), False),
                                        SEGS), "whose space is not q's"),
    "grid-of-one-size": (lambda: dataclasses.replace(BASE, q=N.Space("grid", (N.Const(4),))), "grid with 1 sizes"),
    "seq-of-two-sizes": (lambda: dataclasses.replace(BASE, q=N.Space("seq", (N.Const(4), N.Const(4)))),
                         "seq with 2 sizes"),
    "sink-under-sigmoid": (lambda: score(kind="sigmoid", softcap=None), "a sink under sigmoid"),
    "bias-under-softmax": (lambda: score(bias=N.Const(1.0)), "a softmax score has a bias"),
    "unknown-score": (lambda: score(kind="relu"), "unknown score"),
    "route-sizes-not-the-rank": (lambda: dataclasses.replace(ROUTE, route=dataclasses.replace(
        ROUTE.route, sizes=ROUTE.route.sizes[:1])), "regions with 1 sizes over a grid of rank 2"),
    "blocks-on-a-grid": (lambda: dataclasses.replace(ROUTE, route=dataclasses.replace(ROUTE.route, groups="blocks")),
                         "blocks with 2 sizes"),
    "route-over-two-spaces": (lambda: dataclasses.replace(ROUTE, kv=N.Space("grid", (N.Const(4), N.Const(4)))),
                              "same unsegmented space"),
}


def test_base_irs_verify():
    for ir in (BASE, SEGS, GRID, ROUTE):
        verify(ir)
    # Guarded, k.y is read only for keys of the grid segment: fine.
    verify(mask(N.Member("k", "hi").and_(N.Coord("k", "y").lt(N.Coord("q", "y"))), SEGS))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_ir_is_rejected(name):
    build, phrase = BROKEN[name]
    with pytest.raises(IRError) as info:
        verify(build())
    assert phrase in str(info.value), str(info.value)


def test_ir_errors_are_compiler_bugs_not_user_errors(monkeypatch):
    assert issubclass(IRError, AssertionError) and not issubclass(IRError, AttncError)
    # lower() runs verify on what it builds: a lowering bug surfaces as an IRError.
    from attnc.ir import lower as lowering

    monkeypatch.setattr(lowering._Lowering, "run", lambda self: mask(qi))
    with pytest.raises(IRError, match="the mask is int"):
        lower(parse("attention a(N) { q, kv = seq(N) }"))
