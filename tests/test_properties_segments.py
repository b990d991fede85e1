"""Property tests for segmented key spaces, float bias tables and score modifiers.

Random key spaces made of 2-3 named segments (`kv = a: seq(A), b: grid(BH, BW), ...`) with a mask
that is an `or` of per-segment clauses `(k in s and <predicate over q.i and s's key coordinates>)`:
masks against an independent numpy evaluator that builds the concatenated mask segment by segment,
tile classes against brute force, and generated kernels against the float64 reference, also with
random `bias` expressions (float table lookups, integer coordinate terms, `head`) under every score
kind, with and without softcap. Reference outputs with a bias are also checked against the formula
in Score's docstring (attnc/ir/nodes.py), written here from scratch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis.tiles import EMPTY, FULL, PARTIAL
from tests.test_properties import _CMP, bool_exprs, int_exprs
from tests.conftest import DEVICE
from tests.test_specs import _qkv

SEGMENT_NAMES = ("a", "b", "c")
_LOGIC = {"and": np.logical_and, "or": np.logical_or}
TILES = st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32]))


@dataclass(frozen=True)
class Segment:
    name: str
    kind: str  # 'seq' or 'grid'
    dims: tuple[int, ...]
    space: str  # spec text, e.g. "grid(BH, BW)"

    @property
    def size(self) -> int:
        return int(np.prod(self.dims))

    def coords(self) -> dict:
        """Local key coordinates of this segment, as [1, size] int64 arrays."""
        i = np.arange(self.size, dtype=np.int64)[None, :]
        env = {("k", "i"): i}
        if self.kind == "grid":
            env[("k", "y")], env[("k", "x")] = np.divmod(i, self.dims[1])
        return env


# -- predicates ------------------------------------------------------------------------------------
def _causal_free(expr):
    """tests.test_properties' `causal` leaf means bottom-right alignment on the concatenation on
    segmented key spaces (tests/test_language_segments.py); inside a clause here it stands for
    `k.i <= q.i` over local indices, which is exactly what its evaluator computes."""
    text, fn = expr
    return text.replace("causal", "(k.i <= q.i)"), fn


def seq_preds():
    """Predicates over q.i, k.i and P (tests/test_properties.py's strategy, reused)."""
    return bool_exprs(("i",)).map(_causal_free)


def _grid_leaves():
    coords = [(f"{s}.{a}", (lambda s, a: lambda env: env[(s, a)])(s, a))
              for s, a in (("q", "i"), ("k", "y"), ("k", "x"), ("k", "i"))]
    consts = st.integers(-6, 20).map(lambda c: (str(c) if c >= 0 else f"({c})", lambda env, c=c: c))
    return st.one_of(st.sampled_from(coords), consts, st.just(("P", lambda env: env["P"])))


def _grid_ints():
    return int_exprs((), leaves=_grid_leaves(), max_leaves=5, negation=False)


def grid_preds():
    """Predicates over q.i (queries are a seq) and a grid segment's k.y, k.x, k.i, and P."""
    ints = _grid_ints()
    cmp = st.tuples(st.sampled_from(sorted(_CMP)), ints, ints).map(
        lambda t: (f"{t[1][0]} {t[0]} {t[2][0]}", lambda env, t=t: _CMP[t[0]](t[1][1](env), t[2][1](env))))

    def extend(children):
        conj = st.tuples(st.sampled_from(["and", "or"]), children, children).map(
            lambda t: (f"({t[1][0]} {t[0]} {t[2][0]})",
                       lambda env, t=t: _LOGIC[t[0]](t[1][1](env), t[2][1](env))))
        neg = children.map(lambda c: (f"(not {c[0]})", lambda env, c=c: np.logical_not(c[1](env))))
        return st.one_of(conj, neg)
    return st.recursive(st.one_of(cmp, st.just(("true", lambda env: True))), extend, max_leaves=3)


@dataclass(frozen=True)
class Case:
    """A random segmented spec: its mask text, parameters and an independent mask oracle."""

    nq: int
    segments: tuple[Segment, ...]
    clauses: tuple[tuple[str, str, object], ...]  # (segment name, predicate text, evaluator)
    common: tuple[str, object] | None  # a conjunct over q.i, k.i, P read by every segment
    params: dict

    @property
    def nk(self) -> int:
        return sum(s.size for s in self.segments)

    def header(self) -> str:
        return ", ".join(self.params)

    def mask_text(self) -> str:
        text = " or ".join(f"(k in {name} and ({pred}))" for name, pred, _ in self.clauses)
        if self.common is not None:
            text = f"({text}) and {self.common[0]}"
        return text

    def source(self, bias: str | None = None, score: str | None = None) -> str:
        kv = ", ".join(f"{s.name}: {s.space}" for s in self.segments)
        lines = [f"attention seg({self.header()}) {{", "    q  = seq(N)", f"    kv = {kv}",
                 f"    mask = {self.mask_text()}"]
        if bias is not None:
            lines.append(f"    bias = {bias}")
        if score is not None:
            lines.append(f"    score = {score}")
        return "\n".join(lines + ["}", ""])

    def segment_envs(self):
        """(segment, its flat key offset, coordinates [N, size] of its pairs with every query)."""
        q = np.arange(self.nq, dtype=np.int64)[:, None]
        offset = 0
        for seg in self.segments:
            yield seg, offset, {"P": self.params["P"], ("q", "i"): q, **seg.coords()}
            offset += seg.size

    def oracle(self) -> np.ndarray:
        """The mask, built segment by segment and concatenated in segment order."""
        clauses = {name: fn for name, _, fn in self.clauses}
        blocks = []
        for seg, _, env in self.segment_envs():
            shape = (self.nq, seg.size)
            block = np.zeros(shape, dtype=bool)
            if seg.name in clauses:
                block = np.broadcast_to(np.asarray(clauses[seg.name](env), dtype=bool), shape).copy()
            if self.common is not None:
                block &= np.broadcast_to(np.asarray(self.common[1](env), dtype=bool), shape)
            blocks.append(block)
        return np.concatenate(blocks, axis=1)


@st.composite
def segmented(draw, max_q=60, max_seq=40, max_h=5, max_w=7):
    n_seg = draw(st.integers(2, 3))
    params = {"N": draw(st.integers(1, max_q))}
    segments = []
    for name in SEGMENT_NAMES[:n_seg]:
        big = name.upper()
        if draw(st.booleans()):
            params[big] = draw(st.integers(1, max_seq))
            segments.append(Segment(name, "seq", (params[big],), f"seq({big})"))
        else:
            h, w = draw(st.integers(1, max_h)), draw(st.integers(1, max_w))
            params[big + "H"], params[big + "W"] = h, w
            segments.append(Segment(name, "grid", (h, w), f"grid({big}H, {big}W)"))
    params["P"] = draw(st.integers(-10, 40))
    # Clauses for a random, randomly ordered, non-empty subset of the segments.
    order = draw(st.lists(st.sampled_from(range(n_seg)), min_size=1, max_size=n_seg, unique=True))
    clauses = []
    for idx in order:
        seg = segments[idx]
        text, fn = draw(seq_preds() if seg.kind == "seq" else grid_preds())
        clauses.append((seg.name, text, fn))
    common = draw(st.none() | seq_preds())  # k.i unguarded: every segment's local index
    return Case(params["N"], tuple(segments), tuple(clauses), common, params)


# -- 1. masks ----------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented())
def test_segmented_mask_matches_independent_evaluator(case):
    fn = attnc.compile(case.source(), backend="reference", **case.params)
    mask = fn.mask().numpy()
    assert mask.shape == (case.nq, case.nk)
    np.testing.assert_array_equal(mask, case.oracle())


def test_oracle_on_the_documented_example():
    """The oracle itself, on the example of the language docs: k.i is local to each segment."""
    seg = (Segment("a", "seq", (5,), "seq(N)"), Segment("b", "seq", (4,), "seq(M)"))
    case = Case(5, seg, (("a", "k.i <= q.i", lambda env: env[("k", "i")] <= env[("q", "i")]),
                         ("b", "k.i % 2 == 0", lambda env: env[("k", "i")] % 2 == 0)), None, dict(N=5, M=4, P=0))
    expect = np.concatenate([np.tril(np.ones((5, 5), dtype=bool)), np.tile([True, False, True, False], (5, 1))], 1)
    np.testing.assert_array_equal(case.oracle(), expect)
    fn = attnc.compile(case.source(), backend="reference", **case.params)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)


# -- 2. tile classification ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented(), TILES)
def test_segmented_tile_classes_are_exact(case, tile):
    """Never EMPTY when a pair is visible; never FULL when one is hidden or the tile runs past the
    last key; PARTIAL may be conservative."""
    bm, bn = tile
    fn = attnc.compile(case.source(), tiles=tile, **case.params)
    s = fn.schedule
    classes = s.classes
    mask = case.oracle()
    nq, nk = mask.shape
    assert classes.shape == (-(-nq // bm), -(-nk // bn))
    for t in range(classes.shape[0]):
        for u in range(classes.shape[1]):
            block = mask[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            ragged = (u + 1) * bn > nk
            if classes[t, u] == EMPTY:
                assert not block.any(), (t, u)
            elif classes[t, u] == FULL:
                assert block.all() and not ragged, (t, u)
            else:
                assert classes[t, u] == PARTIAL, (t, u)  # may be conservative
    np.testing.assert_array_equal(s.row_counts, mask.sum(axis=1))


# -- 3. kernels against the reference -------------------------------------------------------------------
def _outputs(fn, ref, q, k, v, tables=None):
    tables = tables or {}
    with torch.no_grad():
        out = fn(*(x.to(DEVICE) for x in (q, k, v)), **{n: t.to(DEVICE) for n, t in tables.items()}).cpu().double()
    expect = ref(q.double(), k.double(), v.double(), **{n: t.double() for n, t in tables.items()})
    return out, expect


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented(max_q=48, max_seq=32), TILES, st.integers(0, 2**16))
def test_segmented_kernel_matches_reference(case, tile, seed):
    source = case.source()
    fn = attnc.compile(source, tiles=tile, **case.params)
    ref = attnc.compile(source, backend="reference", **case.params)
    q, k, v = _qkv(case.nq, case.nk, heads=2, d=16, seed=seed)
    out, expect = _outputs(fn, ref, q, k, v)
    assert (out - expect).abs().max().item() < 1e-4, source


# -- 3b. bias expressions and score modifiers ----------------------------------------------------------
# A bias term is (text, evaluator(env) -> float array broadcasting to [heads, N, keys of one segment]);
# env holds the coordinates, ("q", "head") and "tables": name -> numpy table (per head or shared).
def _lookup(name, idx_fn):
    def fn(env):
        table = env["tables"][name]
        idx = [np.asarray(i) for i in idx_fn(env)]
        if table.ndim == len(idx) + 1:  # a per-head table
            idx = [env[("q", "head")]] + idx
        idx = [np.clip(i, 0, n - 1) for i, n in zip(idx, table.shape)]  # hidden pairs: any value will do
        return table[tuple(np.broadcast_arrays(*idx))]
    return fn


# Integer coordinate terms, kept small (|term| <= 6) so that no logit gets near the range where
# the softplus kernel loses precision (see test_softplus_kernel_with_very_negative_logits).
_INT_TERMS = [
    ("(q.i % 3)", lambda env: env[("q", "i")] % 3),
    ("(k.i % 4)", lambda env: env[("k", "i")] % 4),
    ("((q.i - k.i) // 8)", lambda env: (env[("q", "i")] - env[("k", "i")]) // 8),
    ("(abs(q.i - k.i) % 5)", lambda env: np.abs(env[("q", "i")] - env[("k", "i")]) % 5),
    ("(min(q.i, k.i) % 6)", lambda env: np.minimum(env[("q", "i")], env[("k", "i")]) % 6),
    ("head", lambda env: env[("q", "head")]),
]
# Float constants that are not integers: an integral one (2.0) trips the emitter bug of
# test_integral_float_constants_in_bias.
_COEFS = ("0.5", "(-0.25)", "0.1", "0.3", "(-0.4)", "0.03")
_INTEGRAL_COEFS = ("1.0", "2.0", "(-2.0)", "3.0", "4.0")


@st.composite
def biases(draw, case: Case, coefs=_COEFS):
    """A random float bias: a sum of 1-3 terms over table lookups (t[k.i], t[q.i - k.i + C],
    u[q.i % 3, k.i // 2]), float constants and integer coordinate terms."""
    max_local = max(s.size for s in case.segments)
    c = draw(st.integers(0, max_local + 2))  # may be too small: then some index can be negative
    lookups = [
        ("t[k.i]", _lookup("t", lambda env: [env[("k", "i")]])),
        (f"t[q.i - k.i + {c}]", _lookup("t", lambda env: [env[("q", "i")] - env[("k", "i")] + c])),
        ("u[q.i % 3, k.i // 2]", _lookup("u", lambda env: [env[("q", "i")] % 3, env[("k", "i")] // 2])),
    ]
    coef = st.sampled_from(coefs).map(lambda s: (s, float(s.strip("()"))))
    look = st.sampled_from(lookups)
    intt = st.sampled_from(_INT_TERMS)
    term = st.one_of(
        look,
        st.tuples(coef, look).map(lambda t: (f"{t[0][0]} * {t[1][0]}", lambda env, t=t: t[0][1] * t[1][1](env))),
        st.tuples(look, intt).map(lambda t: (f"{t[0][0]} * {t[1][0]}", lambda env, t=t: t[0][1](env) * t[1][1](env))),
        st.tuples(coef, intt).map(lambda t: (f"{t[0][0]} * {t[1][0]}", lambda env, t=t: t[0][1] * t[1][1](env))),
        coef,
    )
    terms = draw(st.lists(term, min_size=1, max_size=3))
    assume(any("[" in text for text, _ in terms))  # at least one table lookup
    text = " + ".join(t for t, _ in terms)
    return text, (lambda env, terms=terms: sum(np.asarray(fn(env), dtype=np.float64) if callable(fn) else fn
                                               for _, fn in terms))


@st.composite
def bias_cases(draw, coefs=_COEFS):
    case = draw(segmented(max_q=40, max_seq=24))
    return (case, *draw(biases(case, coefs)))


SCORES = st.tuples(st.sampled_from(["softmax", "sigmoid", "softplus"]),
                   st.sampled_from([None, 0.5, 1.5, 4.0, 20.0]))


def _score_text(kind, cap):
    return f"{kind}(softcap = {cap})" if cap is not None else f"{kind}()"


def _formula(case: Case, bias_fn, tables, kind, cap, q, k, v):
    """Score's docstring, from scratch: z = q.k / sqrt(D) + bias, capped, then the score function."""
    heads, d = q.shape[1], q.shape[-1]
    mask = torch.from_numpy(case.oracle())
    host = {n: t.double().numpy() for n, t in tables.items()}
    cols = []
    for seg, _, env in case.segment_envs():
        env = {key: (val[None] if isinstance(val, np.ndarray) else val) for key, val in env.items()}
        env |= {("q", "head"): np.arange(heads)[:, None, None], "tables": host}
        cols.append(np.broadcast_to(np.asarray(bias_fn(env), dtype=np.float64), (heads, case.nq, seg.size)))
    bias = torch.from_numpy(np.concatenate(cols, axis=-1))
    z = q.double() @ k.double().transpose(-1, -2) / d ** 0.5 + bias
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    if kind == "sigmoid":
        w = torch.sigmoid(z) * mask
    elif kind == "softplus":
        w = torch.nn.functional.softplus(z) * mask
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        w = torch.softmax(z.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return w @ v.double()


def _check_bias_case(bias_case, tile, score, per_head, seed):
    case, bias, bias_fn = bias_case
    kind, cap = score
    source = case.source(bias=bias, score=_score_text(kind, cap))
    heads = 2
    fn = attnc.compile(source, tiles=tile, **case.params)
    ref = attnc.compile(source, backend="reference", **case.params)
    try:
        extents = fn._extents(heads)
    except AttncError as err:
        # Tables need to cover visible pairs only: a negative index is an error only if a visible
        # pair forms one (t[q.i - k.i + C] with C too small).
        assert "can be negative" in str(err), str(err)
        c = int(bias.split("k.i + ")[1].split("]")[0])
        local_k = np.concatenate([np.arange(s.size) for s in case.segments])[None, :]
        assert (case.oracle() & (np.arange(case.nq)[:, None] + c < local_k)).any(), source
        assume(False)
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for t in fn.ir.tensors:
        shape = tuple(max(1, n) for n in extents.get(t.name, (1,) * t.rank))
        tables[t.name] = 0.5 * torch.randn(((heads,) if per_head else ()) + shape, generator=g)
    q, k, v = _qkv(case.nq, case.nk, heads=heads, d=16, seed=seed)
    out, expect = _outputs(fn, ref, q, k, v, tables)
    assert (out - expect).abs().max().item() < 1e-4, source
    formula = _formula(case, bias_fn, tables, kind, cap, q, k, v)
    assert (expect - formula).abs().max().item() < 1e-9, source


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bias_cases(), TILES, SCORES, st.booleans(), st.integers(0, 2**16))
def test_bias_and_score_kernel_matches_reference(bias_case, tile, score, per_head, seed):
    """Kernel (float32) against the float64 reference, and the reference against the formula."""
    _check_bias_case(bias_case, tile, score, per_head, seed)


# -- known attnc bugs (each with its minimal failing example) --------------------------------------------
def _two_seq_segments(bias_text, bias_fn, n=1, a=2, b=1):
    """N queries; kv = a: seq(A), b: seq(B); every key of segment a visible, none of b."""
    seg = (Segment("a", "seq", (a,), "seq(A)"), Segment("b", "seq", (b,), "seq(B)"))
    case = Case(n, seg, (("a", "true", lambda env: True),), None, dict(N=n, A=a, B=b, P=0))
    return case, bias_text, bias_fn


_MIN_INTEGRAL = _two_seq_segments(
    "2.0 * t[k.i] + t[k.i // 2]",
    lambda env: 2.0 * _lookup("t", lambda e: [e[("k", "i")]])(env)
    + _lookup("t", lambda e: [e[("k", "i")] // 2])(env))


@example(bias_case=_MIN_INTEGRAL, tile=(16, 16), score=("softmax", None), per_head=False, seed=0)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bias_cases(coefs=_INTEGRAL_COEFS), TILES, SCORES, st.booleans(), st.integers(0, 2**16))
def test_integral_float_constants_in_bias(bias_case, tile, score, per_head, seed):
    """The bias property again, with float constants that happen to be whole numbers (2.0).
    Regression: Const(2) == Const(2.0) once let the emitter's memo write `k_i // 2.0`."""
    _check_bias_case(bias_case, tile, score, per_head, seed)


_OFFSETS = ("(-12.5)", "(-17.5)", "(-25.5)")
_MIN_SOFTPLUS = _two_seq_segments("(-20.5) + 0.5 * t[k.i]",
                                  lambda env: -20.5 + 0.5 * _lookup("t", lambda e: [e[("k", "i")]])(env))


@st.composite
def offset_bias_cases(draw):
    case, text, fn = draw(bias_cases())
    offset = draw(st.sampled_from(_OFFSETS))
    return case, f"{offset} + {text}", (lambda env: float(offset.strip("()")) + fn(env))


@example(bias_case=_MIN_SOFTPLUS, tile=(16, 16), score=("softplus", None), per_head=False, seed=0)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset_bias_cases(), TILES, st.just(("softplus", None)), st.booleans(), st.integers(0, 2**16))
def test_softplus_kernel_with_very_negative_logits(bias_case, tile, score, per_head, seed):
    """The bias property for uncapped softplus when every logit is very negative (the row
    normalisation makes the weights well defined: they are close to a softmax). Regression: the
    kernel once computed log(1 + exp(-|s|)) without log1p's precision and output 0."""
    _check_bias_case(bias_case, tile, score, per_head, seed)


def test_visible_is_boolean_when_a_segment_is_never_visible():
    # Regression: Const(False) == Const(0) once made `visible` return an int32 tile.
    source = """attention s(N, M) {
        q  = seq(N)
        kv = a: seq(N), b: seq(M)
        mask = k in a and k.i <= q.i
    }"""
    fn = attnc.compile(source, tiles=(16, 16), N=4, M=3)
    q, k, v = _qkv(4, 7, heads=1, d=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu()
    ref = attnc.compile(source, backend="reference", N=4, M=3)(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 1e-4
