"""Language additions around segmented spaces (docs/language.md, "Segments"): segmented query
spaces (`q = a: grid(H, W), b: seq(M)`), `causal` on segmented key spaces, and the refusal of
`window` with kernel 1. Masks against a brute-force numpy oracle written here from the docs,
tile classes against brute force, generated kernels (Triton interpreter) and the FlexAttention
export against the float64 reference."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis.tiles import EMPTY, FULL, PARTIAL
from tests.conftest import DEVICE
from tests.test_properties import _CMP, int_exprs
from tests.test_specs import _qkv

_LOGIC = {"and": np.logical_and, "or": np.logical_or}


# -- a random spec with a segmented query space -----------------------------------------------------
@dataclass(frozen=True)
class Seg:
    name: str
    kind: str  # 'seq' or 'grid'
    dims: tuple[int, ...]
    space: str

    @property
    def size(self) -> int:
        return int(np.prod(self.dims))

    def coords(self, side: str, shape) -> dict:
        """Local coordinates of this segment's tokens, shaped [size, 1] (q) or [1, size] (k)."""
        i = np.arange(self.size, dtype=np.int64).reshape(shape)
        env = {(side, "i"): i}
        if self.kind == "grid":
            env[(side, "y")], env[(side, "x")] = np.divmod(i, self.dims[1])
        return env


@dataclass(frozen=True)
class Case:
    q: tuple[Seg, ...]
    kv: tuple[Seg, ...]  # one nameless-looking segment when kv is unsegmented
    kv_segmented: bool
    clauses: tuple  # (q segment, k segment or None, text, evaluator)
    params: dict

    def source(self, bias: str | None = None) -> str:
        q = ", ".join(f"{s.name}: {s.space}" for s in self.q)
        kv = ", ".join(f"{s.name}: {s.space}" for s in self.kv) if self.kv_segmented else self.kv[0].space
        text = " or ".join(f"(q in {qs} and {f'k in {ks} and ' if ks else ''}({pred}))" for qs, ks, pred, _ in self.clauses)
        lines = [f"attention s({', '.join(self.params)}) {{", f"    q  = {q}", f"    kv = {kv}", f"    mask = {text}"]
        lines += [f"    bias = {bias}"] if bias else []
        return "\n".join(lines + ["}", ""])

    @property
    def shape(self) -> tuple[int, int]:
        return sum(s.size for s in self.q), sum(s.size for s in self.kv)

    def oracle(self) -> np.ndarray:
        """The mask by the docs: per (query segment, key segment) block, coordinates local to each."""
        rows = []
        for qs in self.q:
            blocks = []
            for ks in self.kv:
                env = {"P": self.params["P"], **qs.coords("q", (-1, 1)), **ks.coords("k", (1, -1))}
                block = np.zeros((qs.size, ks.size), dtype=bool)
                for cq, ck, _, fn in self.clauses:
                    if cq == qs.name and (ck is None or ck == ks.name):
                        block |= np.broadcast_to(np.asarray(fn(env), dtype=bool), block.shape)
                blocks.append(block)
            rows.append(np.concatenate(blocks, axis=1))
        return np.concatenate(rows, axis=0)


def _preds(axes_q, axes_k):
    leaves = [(f"{s}.{a}", (lambda s, a: lambda env: env[(s, a)])(s, a))
              for s, axes in (("q", axes_q), ("k", axes_k)) for a in axes]
    consts = st.integers(-4, 12).map(lambda c: (str(c) if c >= 0 else f"({c})", lambda env, c=c: c))
    ints = int_exprs((), leaves=st.one_of(st.sampled_from(leaves), consts, st.just(("P", lambda env: env["P"]))),
                     max_leaves=4, negation=False)
    cmp = st.tuples(st.sampled_from(sorted(_CMP)), ints, ints).map(
        lambda t: (f"{t[1][0]} {t[0]} {t[2][0]}", lambda env, t=t: _CMP[t[0]](t[1][1](env), t[2][1](env))))

    def extend(children):
        return st.tuples(st.sampled_from(["and", "or"]), children, children).map(
            lambda t: (f"({t[1][0]} {t[0]} {t[2][0]})", lambda env, t=t: _LOGIC[t[0]](t[1][1](env), t[2][1](env))))
    return st.recursive(cmp, extend, max_leaves=2)


def _axes(seg: Seg) -> tuple[str, ...]:
    return ("i", "y", "x") if seg.kind == "grid" else ("i",)


@st.composite
def segment(draw, name: str, params: dict, max_seq=20, max_h=4, max_w=5) -> Seg:
    big = name.upper()
    if draw(st.booleans()):
        params[big] = draw(st.integers(1, max_seq))
        return Seg(name, "seq", (params[big],), f"seq({big})")
    h, w = draw(st.integers(1, max_h)), draw(st.integers(1, max_w))
    params[big + "H"], params[big + "W"] = h, w
    return Seg(name, "grid", (h, w), f"grid({big}H, {big}W)")


@st.composite
def cases(draw, max_seq=20):
    params: dict = {}
    q = tuple(draw(segment(n, params, max_seq)) for n in ("a", "b")[:draw(st.integers(1, 2))] + ("c",))
    kv_segmented = draw(st.booleans())
    kv = tuple(draw(segment(n, params, max_seq)) for n in (("d", "e") if kv_segmented else ("f",)))
    params["P"] = draw(st.integers(-5, 20))
    clauses = []
    for _ in range(draw(st.integers(1, 3))):
        qs, ks = draw(st.sampled_from(q)), draw(st.sampled_from(kv))
        text, fn = draw(_preds(_axes(qs), _axes(ks)))
        clauses.append((qs.name, ks.name if kv_segmented else None, text, fn))
    return Case(q, kv, kv_segmented, tuple(clauses), params)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_segmented_query_mask_matches_brute_force(case):
    fn = attnc.compile(case.source(), backend="reference", **case.params)
    np.testing.assert_array_equal(fn.mask().numpy(), case.oracle(), err_msg=case.source())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_seq=40), st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32])))
def test_segmented_query_tile_classes_are_sound(case, tile):
    bm, bn = tile
    s = attnc.compile(case.source(), tiles=tile, **case.params).schedule
    mask = case.oracle()
    nk = mask.shape[1]
    for t in range(s.classes.shape[0]):
        for u in range(s.classes.shape[1]):
            block = mask[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            if s.classes[t, u] == EMPTY:
                assert not block.any(), (t, u, case.source())
            elif s.classes[t, u] == FULL:
                assert block.all() and (u + 1) * bn <= nk, (t, u, case.source())
            else:
                assert s.classes[t, u] == PARTIAL
    np.testing.assert_array_equal(s.row_counts, mask.sum(axis=1))


def _run(fn, q, k, v):
    with torch.no_grad():
        return fn(*(x.to(DEVICE) for x in (q, k, v))).cpu().double()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_seq=24), st.integers(0, 2**16))
def test_segmented_query_kernel_matches_reference(case, seed):
    bias = "0.25 * q.i - 0.125 * k.i"
    source = case.source(bias)
    fn = attnc.compile(source, tiles=(16, 16), **case.params)
    ref = attnc.compile(source, backend="reference", **case.params)
    nq, nk = case.shape
    q, k, v = _qkv(nq, nk, heads=2, d=16, seed=seed)
    expect = ref(q.double(), k.double(), v.double())
    assert (_run(fn, q, k, v) - expect).abs().max().item() < 1e-4, source


IMAGE_TEXT = """attention image_text(H, W, M) {
    q    = img: grid(H, W), txt: seq(M)
    kv   = img: grid(H, W), txt: seq(M)
    mask = (q in img and k in img and abs(q.y - k.y) <= 1 and abs(q.x - k.x) <= 2)
        or (q in txt and (k in img or k.i <= q.i))
        or (q in img and k in txt and k.i < 2)
    bias = rel[q.i % 3, k.i % 2]
}"""


def _image_text_oracle(H, W, M) -> np.ndarray:
    n = H * W
    out = np.zeros((n + M, n + M), dtype=bool)
    for i in range(n + M):
        for j in range(n + M):
            if i < n and j < n:
                out[i, j] = abs(i // W - j // W) <= 1 and abs(i % W - j % W) <= 2
            elif i >= n:
                out[i, j] = j < n or j - n <= i - n
            else:
                out[i, j] = j - n < 2
    return out


def test_image_text_example_on_every_path():
    """The documented example: mask, kernels with a bias table (forward and gradients), the
    FlexAttention export."""
    H, W, M = 4, 5, 7
    fn = attnc.compile(IMAGE_TEXT, tiles=(16, 16), H=H, W=W, M=M)
    ref = attnc.compile(IMAGE_TEXT, backend="reference", H=H, W=W, M=M)
    expect = _image_text_oracle(H, W, M)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    np.testing.assert_array_equal(ref.mask().numpy(), expect)
    q, k, v = _qkv(H * W + M, H * W + M, heads=2, d=16, seed=3)
    rel = torch.randn(3, 2, dtype=torch.float64)
    want = ref(q.double(), k.double(), v.double(), rel=rel)
    with torch.no_grad():
        got = fn(*(x.to(DEVICE) for x in (q, k, v)), rel=rel.float().to(DEVICE)).cpu().double()
    assert (got - want).abs().max().item() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = fn.to_flex(block_size=16, rel=rel.float()).run(q, k, v)
    assert (flex.double() - want).abs().max().item() < 1e-4
    # Gradients through the generated backward kernels, the bias table's included.
    inputs = [x.clone().requires_grad_() for x in (q, k, v, rel.float())]
    fn(*(x.to(DEVICE) for x in inputs[:3]), rel=inputs[3].to(DEVICE)).sum().backward()
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref(*ref_in[:3], rel=ref_in[3]).sum().backward()
    for got_x, want_x in zip(inputs, ref_in):
        assert (got_x.grad.double() - want_x.grad).abs().max().item() < 1e-3


# -- causal on segmented key spaces ------------------------------------------------------------------
def test_causal_on_context_then_sequence():
    """`causal` on `kv = ctx: seq(C), x: seq(N)` with `q = seq(N)`: every context key, then
    k.i <= q.i on the sequence itself (bottom-right alignment on the concatenation)."""
    spec = "attention c(N, C) { q = seq(N)\n kv = ctx: seq(C), x: seq(N)\n mask = causal }"
    N, C = 19, 6
    expect = np.concatenate([np.ones((N, C), bool), np.tril(np.ones((N, N), bool))], axis=1)
    flat = np.arange(C + N)[None, :] <= np.arange(N)[:, None] + C  # bottom-right, FlashAttention's
    np.testing.assert_array_equal(expect, flat)
    fn = attnc.compile(spec, tiles=(16, 16), N=N, C=C)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    q, k, v = _qkv(N, C + N, heads=2, d=16, seed=1)
    ref = attnc.compile(spec, backend="reference", N=N, C=C)
    assert (_run(fn, q, k, v) - ref(q.double(), k.double(), v.double())).abs().max().item() < 1e-4


@pytest.mark.parametrize("head,body,phrase", [
    ("s(N, C)", "q = seq(N)\n kv = x: seq(N), ctx: seq(C)\n mask = causal",
     "causal on a segmented key space needs the last segment to be the query space"),
    ("s(N)", "q = a: seq(N), b: seq(N)\n kv = seq(N)\n mask = causal", "causal needs an unsegmented query space"),
    ("s(N)", "q = a: seq(N), b: grid(N, N)\n kv = seq(N)\n mask = q.y < 3", "q.y is read for queries of segment 'a'"),
    ("s(N)", "q = a: seq(N), b: seq(N)\n kv = seq(N)\n mask = q in c", "the query space has no segment 'c'"),
    ("s(N)", "q = a: seq(N), b: seq(N)\n kv = seq(N)\n mask = window(3)", "needs an unsegmented query space"),
    ("s(N)", "q, kv = a: seq(N), b: seq(N)", "segmented spaces are assigned one at a time"),
    ("s(N)", "q, kv = seq(N)\n mask = window(1)", "window kernel size 1"),
    ("s(H, W)", "q, kv = grid(H, W)\n mask = window(7, 1)", "window kernel size 1"),
])
def test_errors_are_located(head, body, phrase):
    with pytest.raises(AttncError) as info:
        attnc.parse(f"attention {head} {{\n {body}\n}}\n")
    assert phrase in info.value.message, str(info.value)
    assert info.value.line is not None and info.value.col is not None


def test_window_kernel_one_explains_itself():
    with pytest.raises(AttncError) as info:
        attnc.parse("attention s(N) {\n q, kv = seq(N)\n mask = window(1)\n}\n")
    err = info.value
    assert (err.line, err.col) == (3, 16)  # the kernel argument
    assert "k.i == q.i" in err.hint
    with pytest.raises(AttncError) as info:
        attnc.compile("attention s(N, K = 2) {\n q, kv = seq(N)\n mask = window(K)\n}\n", backend="reference",
                      N=8, K=1)
    assert "kernel 1 (K) must be at least 2" in info.value.message and "k.i == q.i" in info.value.hint


# -- window on key segments ----------------------------------------------------------------------------
SCALE_WINDOW = """attention sd(H, W) {
    q    = grid(H, W)
    kv   = hi: grid(H, W), lo: grid(H / 2, W / 2)
    mask = (k in hi and window(3, 5, dilation = (1, 2))) or (k in lo and k.x <= q.x // 2)
}"""


def test_window_on_a_key_segment():
    """A window between q and the key segment with q's space: NATTEN's mask on that segment (the
    unsegmented spec's), tile classes sound, kernels and the Flex export against the reference."""
    H, W = 6, 10
    natten = attnc.compile("attention n(H, W) { q, kv = grid(H, W)\n mask = window(3, 5, dilation = (1, 2)) }",
                           backend="reference", H=H, W=W).mask().numpy()
    lo = np.arange(W // 2)[None, :].repeat(H // 2, 0).reshape(1, -1) <= (np.arange(H * W) % W // 2)[:, None]
    expect = np.concatenate([natten, lo], axis=1)
    fn = attnc.compile(SCALE_WINDOW, tiles=(16, 16), H=H, W=W)
    ref = attnc.compile(SCALE_WINDOW, backend="reference", H=H, W=W)
    np.testing.assert_array_equal(ref.mask().numpy(), expect)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    s = fn.schedule
    for t in range(s.classes.shape[0]):
        for u in range(s.classes.shape[1]):
            block = expect[t * 16:(t + 1) * 16, u * 16:(u + 1) * 16]
            assert s.classes[t, u] != EMPTY or not block.any()
            assert s.classes[t, u] != FULL or (block.all() and (u + 1) * 16 <= expect.shape[1])
    q, k, v = _qkv(H * W, expect.shape[1], heads=2, d=16, seed=5)
    want = ref(q.double(), k.double(), v.double())
    assert (_run(fn, q, k, v) - want).abs().max().item() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (fn.to_flex(block_size=16).run(q, k, v).double() - want).abs().max().item() < 1e-4


def test_window_read_for_another_segment_is_located():
    with pytest.raises(AttncError) as info:
        attnc.parse(SCALE_WINDOW.replace("(k in hi and window(3, 5, dilation = (1, 2)))", "window(3, 5)"))
    err = info.value
    assert "a window is read for keys of segment 'lo'" in err.message and err.line == 4
