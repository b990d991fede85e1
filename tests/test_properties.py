"""Property tests over random specs: masks against an independent evaluator, tile classification
against brute force, parse/print round-trips, and generated kernels against the reference."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc
from attnc.frontend import format_spec, parse
from attnc.ir.printer import digest
from attnc.analysis.tiles import EMPTY, FULL, PARTIAL, dense_from_schedule, tile_picture
from tests.test_specs import _qkv

# A random expression is (spec text, evaluator over a dict of int64 coordinate arrays).
_INT_BINOPS = {
    "+": np.add, "-": np.subtract, "*": np.multiply,
}
_CMP = {"<": np.less, "<=": np.less_equal, "==": np.equal, "!=": np.not_equal, ">": np.greater,
        ">=": np.greater_equal}


def _leaves(axes):
    coords = [(f"{side}.{a}", (lambda s, a: lambda env: env[(s, a)])(side, a)) for side in "qk" for a in axes]
    consts = st.integers(-6, 20).map(lambda c: (str(c) if c >= 0 else f"({c})", lambda env, c=c: c))
    param = st.just(("P", lambda env: env["P"]))
    return st.one_of(st.sampled_from(coords), consts, param)


def int_exprs(axes, leaves=None, max_leaves=6, negation=True):
    """Integer expressions over `leaves` (default: q and k coordinates on `axes`, constants, P)."""
    def extend(children):
        binop = st.tuples(st.sampled_from(sorted(_INT_BINOPS)), children, children).map(
            lambda t: (f"({t[1][0]} {t[0]} {t[2][0]})", lambda env, t=t: _INT_BINOPS[t[0]](t[1][1](env), t[2][1](env))))
        divisor = st.integers(-5, 7).filter(lambda d: d != 0)
        div = st.tuples(st.sampled_from(["//", "%"]), children, divisor).map(
            lambda t: (f"({t[1][0]} {t[0]} {t[2] if t[2] > 0 else f'({t[2]})'})",
                       lambda env, t=t: (np.floor_divide if t[0] == "//" else np.remainder)(t[1][1](env), t[2])))
        fn = st.tuples(st.sampled_from(["min", "max"]), children, children).map(
            lambda t: (f"{t[0]}({t[1][0]}, {t[2][0]})",
                       lambda env, t=t: (np.minimum if t[0] == "min" else np.maximum)(t[1][1](env), t[2][1](env))))
        ab = children.map(lambda c: (f"abs({c[0]})", lambda env, c=c: np.abs(c[1](env))))
        neg = children.map(lambda c: (f"-{c[0]}", lambda env, c=c: np.negative(c[1](env))))
        return st.one_of(binop, div, fn, ab, *([neg] if negation else []))
    return st.recursive(_leaves(axes) if leaves is None else leaves, extend, max_leaves=max_leaves)


def bool_exprs(axes):
    ints = int_exprs(axes)
    cmp = st.tuples(st.sampled_from(sorted(_CMP)), ints, ints).map(
        lambda t: (f"{t[1][0]} {t[0]} {t[2][0]}", lambda env, t=t: _CMP[t[0]](t[1][1](env), t[2][1](env))))
    causal = st.just(("causal", lambda env: env[("k", "i")] <= env[("q", "i")]))
    const = st.sampled_from([("true", lambda env: True), ("false", lambda env: False)])

    def extend(children):
        conj = st.tuples(st.sampled_from(["and", "or"]), children, children).map(
            lambda t: (f"({t[1][0]} {t[0]} {t[2][0]})",
                       lambda env, t=t: (np.logical_and if t[0] == "and" else np.logical_or)(t[1][1](env), t[2][1](env))))
        neg = children.map(lambda c: (f"(not {c[0]})", lambda env, c=c: np.logical_not(c[1](env))))
        return st.one_of(conj, neg)
    return st.recursive(st.one_of(cmp, cmp, causal, const), extend, max_leaves=4)


@st.composite
def specs(draw):
    """A random spec with its size parameters and an independent mask oracle."""
    if draw(st.booleans()):
        axes, dims = ("i",), {"N": draw(st.integers(1, 90))}
        space = "seq(N)"
    else:
        axes, dims = ("y", "x", "i"), {"H": draw(st.integers(1, 9)), "W": draw(st.integers(1, 11))}
        space = "grid(H, W)"
    text, fn = draw(bool_exprs(axes))
    params = dict(dims, P=draw(st.integers(-10, 40)))
    names = ", ".join(params)
    source = f"attention rnd({names}) {{\n    q, kv = {space}\n    mask = {text}\n}}\n"

    def oracle() -> np.ndarray:
        n = params.get("N") or params["H"] * params["W"]
        i = np.arange(n, dtype=np.int64)
        env = {"P": params["P"], ("q", "i"): i[:, None], ("k", "i"): i[None, :]}
        if "W" in params:
            for side, idx in (("q", i[:, None]), ("k", i[None, :])):
                env[(side, "y")], env[(side, "x")] = np.divmod(idx, params["W"])
        return np.broadcast_to(np.asarray(fn(env), dtype=bool), (n, n))

    return source, params, oracle


tiles = st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_mask_matches_independent_evaluator(case):
    source, params, oracle = case
    fn = attnc.compile(source, backend="reference", **params)
    np.testing.assert_array_equal(fn.mask().numpy(), oracle())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), tiles)
def test_tile_classes_are_exact(case, tile):
    """Never EMPTY when a pair is visible, never FULL when one is hidden or out of bounds."""
    source, params, oracle = case
    fn = attnc.compile(source, backend="reference", **params)
    from attnc.analysis.tiles import analyse

    s = analyse(fn.compiled.bound, *tile)
    mask = oracle()
    bm, bn = tile
    for t in range(s.q_tiles):
        for u in range(s.kv_tiles):
            block = mask[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            ragged = (u + 1) * bn > s.nk
            if s.classes[t, u] == EMPTY:
                assert not block.any()
            elif s.classes[t, u] == FULL:
                assert block.all() and not ragged
            else:  # PARTIAL may be conservative (e.g. `q.i != q.i` reads one coordinate twice)
                assert s.classes[t, u] == PARTIAL
    np.testing.assert_array_equal(dense_from_schedule(s), s.classes)
    np.testing.assert_array_equal(s.row_counts, mask.sum(axis=1))
    picture = tile_picture(s).splitlines()
    assert len(picture) == s.q_tiles and all(len(row) == s.kv_tiles for row in picture)


@settings(max_examples=100, deadline=None)
@given(specs())
def test_parse_print_parse_round_trip(case):
    source, _, _ = case
    ast = parse(source)
    printed = format_spec(ast)
    assert parse(printed) == ast
    assert digest(attnc.parse(printed).ir) == digest(attnc.parse(source).ir)


def test_spec_files_round_trip():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("specs").glob("*.attn")):
        ast = parse(path.read_text())
        assert parse(format_spec(ast)) == ast, path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), tiles, st.integers(0, 2**16))
def test_generated_kernel_matches_reference(case, tile, seed):
    source, params, oracle = case
    fn = attnc.compile(source, tiles=tile, **params)
    n = fn.compiled.bound.nq
    assume(fn.schedule.q_tiles * fn.schedule.kv_tiles <= 64)  # keep the interpreter fast
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(n, n, heads=1, d=16, device=dev, seed=seed)
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    ref = attnc.compile(source, backend="reference", **params)(q.cpu().double(), k.cpu().double(), v.cpu().double())
    assert (out - ref).abs().max().item() < 1e-4
