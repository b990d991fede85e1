"""`fn.to_flex()`: FlexAttention's mask_mod, score_mod and BlockMask for a compiled spec.

Checked against attnc itself: the mask_mod evaluated densely equals `fn.mask()`; the BlockMask
(built from attnc's tile analysis) equals Flex's own `create_block_mask` class by class (up to
conservative PARTIAL tiles where the analysis is documented conservative); and
`flex_attention` with the export equals attnc's attention (the float64 reference, and the Triton
backend for a few specs). Eager flex_attention on CPU runs Flex's unfused reference path."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnc
from attnc import AttncError
from tests.test_specs import SPECS

fa = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

HQ, HKV = 4, 2  # grouped-query heads in every output test


def _doc(n, lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n]


def tensors_for(name: str, params: dict, heads: int = HQ) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "document_causal":
        return {"doc": _doc(params["N"], [params["N"] // 5, params["N"] // 2, params["N"]])}
    if name == "alibi_causal":
        return {"slopes": 2.0 ** (-8 * (torch.arange(heads) + 1) / heads)}
    if name == "swin_bias":
        return {"rel_bias": torch.randn(heads, 13, 13, generator=g)}
    if name == "softcap_sink":
        return {"sinks": torch.randn(heads, generator=g)}
    return {}


# Every spec but the routed ones (biformer, moba), at sizes with ragged last tiles.
CASES = [
    ("causal", dict(N=77)), ("cross_causal", dict(M=40, N=96)), ("cross_causal", dict(M=75, N=50)),
    ("sliding_window", dict(N=83, W=7)), ("natten2d", dict(H=13, W=17, kernel=5, dilation=2)),
    ("longformer", dict(N=90, W=9, G=2)), ("gna3d_video", dict(T=3, H=9, W=11)),
    ("streaming_sink", dict(N=77, W=10, S=3)), ("swin_shifted", dict(H=14, W=14)),
    ("maxvit_grid", dict(H=12, W=9, G=3)), ("scale_dit", dict(H=12, W=8)),
    ("document_causal", dict(N=100)), ("alibi_causal", dict(N=70)), ("swin_bias", dict(H=14, W=14)),
    ("softcap_sink", dict(N=70, W=16)), ("sigmoid_causal", dict(N=70)), ("softplus", dict(N=45)),
    ("power_attention", dict(N=77, W=5)),
]
IDS = [f"{n}-" + "-".join(map(str, p.values())) for n, p in CASES]
_FNS: dict = {}


def test_every_spec_file_is_covered():
    assert {p.stem for p in SPECS.glob("*.attn")} == {n for n, _ in CASES} | {"biformer", "moba"}  # routed


def ref_fn(name: str, params: dict):
    key = (name, tuple(params.items()))
    if key not in _FNS:
        _FNS[key] = attnc.compile(SPECS / f"{name}.attn", backend="reference", **params)
    return _FNS[key]


def ints(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not v.dtype.is_floating_point}


def classes(bm) -> np.ndarray:
    """A BlockMask's tiles as int8 [q tiles, kv tiles]: 0 EMPTY, 1 PARTIAL, 2 FULL."""
    def dense(num, idx):
        return fa._ordered_to_dense(num, idx, idx.shape[-1])[0, 0].numpy().astype(np.int8)

    part, full = dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (part & full).any()
    return part + 2 * full


def implied_mask(bm, dense: torch.Tensor) -> torch.Tensor:
    """What a block-sparse Flex kernel computes: FULL tiles all visible, PARTIAL tiles through
    mask_mod (here its dense values), EMPTY tiles skipped."""
    bq, bk = bm.BLOCK_SIZE
    cls = torch.from_numpy(classes(bm)).repeat_interleave(bq, 0).repeat_interleave(bk, 1)
    cls = cls[:dense.shape[0], :dense.shape[1]]
    return (cls == 2) | ((cls == 1) & dense)


def qkv(nq, nk, d=16, dtype=torch.float64, seed=0, hq=HQ, hkv=HKV, dv=24):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, nq, d, generator=g).to(dtype), torch.randn(2, hkv, nk, d, generator=g).to(dtype),
            torch.randn(2, hkv, nk, dv, generator=g).to(dtype))


def check_mask(fn, export, tensors, block_size, exact=True):
    """mask_mod == fn.mask(); the BlockMask, applied as a block-sparse kernel applies it, gives
    fn.mask() again, and equals Flex's create_block_mask: class by class where attnc's analysis
    is exact (row-major, no dilation), else up to conservative PARTIAL tiles (docs/analysis.md)."""
    b = fn.compiled.bound
    want = fn.mask(**ints(tensors))
    dense = fa.create_mask(export.mask_mod, 1, 1, b.nq, b.nk, device="cpu")[0, 0]
    assert dense.dtype == torch.bool
    assert torch.equal(dense, want)
    assert torch.equal(implied_mask(export.block_mask, dense), want)
    theirs = fa.create_block_mask(export.mask_mod, None, None, b.nq, b.nk, device="cpu", BLOCK_SIZE=block_size)
    ours, theirs = classes(export.block_mask), classes(theirs)
    if exact:
        np.testing.assert_array_equal(ours, theirs)
    else:
        assert (ours[ours != theirs] == 1).all()
    assert export.block_mask.seq_lengths == (b.nq, b.nk)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_mask_mod_and_block_mask_match_attnc_and_flex(name, params):
    fn = ref_fn(name, params)
    tensors = tensors_for(name, params)
    for block_size in (16, (16, 32)):
        check_mask(fn, fn.to_flex(block_size=block_size, **tensors), tensors, block_size)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_flex_attention_matches_attnc(name, params):
    fn = ref_fn(name, params)
    tensors = tensors_for(name, params)
    b = fn.compiled.bound
    export = fn.to_flex(block_size=32, **tensors)
    q, k, v = qkv(b.nq, b.nk)
    want = fn(q, k, v, **tensors)
    torch.testing.assert_close(export.run(q, k, v), want, rtol=1e-9, atol=1e-9)
    if export.score_mod is not None or export.score_note is None:
        # The export's own fields, handed to flex_attention as a Flex user would.
        out = fa.flex_attention(q, k, v, score_mod=export.score_mod, block_mask=export.block_mask,
                                scale=export.scale, enable_gqa=export.enable_gqa)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    if fn.ir.score.kind == "softmax":
        out, lse = export.run(q, k, v, return_lse=True)
        want_out, want_lse = fn(q, k, v, return_lse=True, **tensors)
        torch.testing.assert_close(lse, want_lse, rtol=1e-9, atol=1e-9)


def test_which_scores_have_a_score_mod():
    fn = ref_fn("causal", dict(N=77))
    plain = fn.to_flex()
    assert plain.score_mod is None and plain.score_note is None and plain.scale is None
    for name, params in [("alibi_causal", dict(N=70)), ("swin_bias", dict(H=14, W=14))]:
        e = ref_fn(name, params).to_flex(**tensors_for(name, params))
        assert e.score_mod is not None and e.score_note is None and e.scale is None
    sink = ref_fn("softcap_sink", dict(N=70, W=16)).to_flex(sinks=torch.zeros(HQ))
    assert sink.score_mod is None and "sink" in sink.score_note
    sig = ref_fn("sigmoid_causal", dict(N=70)).to_flex()
    assert sig.score_mod is None and "not normalised" in sig.score_note
    soft = ref_fn("softplus", dict(N=45))
    assert soft.to_flex().score_mod is None and "head_dim=D" in soft.to_flex().score_note
    with_d = soft.to_flex(head_dim=16)
    assert with_d.score_mod is not None and with_d.scale == 1.0 and with_d.head_dim == 16
    q, k, v = qkv(45, 45)
    torch.testing.assert_close(fa.flex_attention(q, k, v, score_mod=with_d.score_mod, block_mask=with_d.block_mask,
                                                 scale=with_d.scale, enable_gqa=True), soft(q, k, v))
    with pytest.raises(AttncError, match="head_dim=16"):
        with_d.run(*qkv(45, 45, d=8))


@pytest.mark.parametrize("name,params", [("natten2d", dict(H=9, W=11, kernel=3, dilation=2)),
                                         ("document_causal", dict(N=50)), ("swin_bias", dict(H=7, W=14)),
                                         ("softcap_sink", dict(N=40, W=9))])
def test_flex_attention_matches_the_triton_backend(name, params, device):
    fn = attnc.compile(SPECS / f"{name}.attn", tiles=(16, 16), **params)
    tensors = {k: v.to(device) for k, v in tensors_for(name, params).items()}
    export = fn.to_flex(block_size=16, **tensors)
    b = fn.compiled.bound
    q, k, v = (t.to(device) for t in qkv(b.nq, b.nk, dtype=torch.float32))
    torch.testing.assert_close(export.run(q, k, v), fn(q, k, v, **tensors), rtol=1e-4, atol=1e-4)


# -- the arithmetic, guards and spaces the mask_mod generates -----------------------------------
ARITH = """
attention arith(N, P = 3, R = 2) {
    q, kv = seq(N)
    m    = (q.i - k.i) // P == (k.i - q.i) % (P + 1) - 2 or (k.i - q.i) // -R == min(q.i % 5, abs(k.i - 7), 3)
    div  = k.i > 0 and q.i % k.i == 0 and not max(q.i, k.i) > 3 * k.i
    seen = k.i >= P and anc[q.i, k.i - P] == 1
    mask = m or div or seen or (q.i >= N and q.i // (P - 3) == 0)
}
"""
SEGMENTS = """
attention segs(T, H, W, M) {
    q     = grid(T, H, W)
    kv    = vid: grid(T, H, W), txt: seq(M), img: grid(H, W)
    mask  = (k in vid and abs(q.t - k.t) + abs(q.y - k.y) <= 2 and q.x // 2 == k.x // 2)
            or (k in txt and k.i % 3 != q.t) or (k in img and k.y == q.y and k.x >= q.x)
    bias  = 0.25 * k.i - 0.5 * head + sqrt(q.t + 1.0) / 3    # k.i: the index within the key's segment
}
"""


def test_integer_semantics_and_guards():
    fn = attnc.compile(ARITH, backend="reference", N=37)
    anc = (torch.arange(37 * 34).reshape(37, 34) % 3 == 0).to(torch.int8)
    check_mask(fn, fn.to_flex(block_size=16, anc=anc), {"anc": anc}, 16)
    assert "if " not in fn.to_flex(anc=anc).source  # straight-line: vmap and compile see every branch


def test_int64_only_where_int32_could_wrap():
    small = ref_fn("natten2d", dict(H=13, W=17, kernel=5, dilation=2)).to_flex()
    assert small.mask_mod.__globals__["I"] is torch.int32
    spec = "attention big(M, N) {\n q = seq(M)\n kv = seq(N)\n mask = (q.i * 100003) % 7 == k.i % 7\n}"
    fn = attnc.compile(spec, backend="reference", M=30000, N=9)  # q.i * 100003 reaches 3e9
    export = fn.to_flex(block_size=16)
    assert export.mask_mod.__globals__["I"] is torch.int64
    check_mask(fn, export, {}, 16)


def test_segmented_key_spaces():
    fn = attnc.compile(SEGMENTS, backend="reference", T=3, H=4, W=5, M=7)
    check_mask(fn, fn.to_flex(block_size=16), {}, 16)


@pytest.mark.parametrize("score", [
    "bias = -slopes[head] * (q.i - k.i) / N + 0.25 * sqrt(abs(q.i - k.i) + 1.0)",
    "bias = tab[q.i // 4, k.i % 5] - head / 2\n score = softmax(softcap = 0.5 * sqrt(head_dim))",
    "score = softmax(scale = log(n_visible + 1.0) / sqrt(head_dim))",
    "score = sigmoid(scale = 0.3, bias = -log(n_visible + 1.0))",
    "score = softplus(scale = 0.5, softcap = 3.0)",
    "bias = tab[q.i // 4, k.i % 5]\n score = softmax(sink = sinks[head] * 2.0 - head_dim / 8)",
    "bias = 0.5 * shared[q.i // 4, k.i % 5] + shared[k.i // 4, 2]",
])
def test_score_modifiers(score):
    spec = f"attention s(N, W = 9) {{\n q, kv = seq(N)\n mask = causal and q.i - k.i < W or k.i == 2\n {score}\n}}"
    fn = attnc.compile(spec, backend="reference", N=41)
    g = torch.Generator().manual_seed(0)
    pool = {"slopes": torch.rand(HQ, generator=g), "tab": torch.randn(HQ, 11, 5, generator=g),
            "sinks": torch.randn(HQ, generator=g), "shared": torch.randn(11, 5, generator=g)}
    tensors = {t.name: pool[t.name] for t in fn.ir.tensors}
    q, k, v = qkv(41, 41)
    torch.testing.assert_close(fn.to_flex(block_size=16, **tensors).run(q, k, v), fn(q, k, v, **tensors),
                               rtol=1e-9, atol=1e-9)


def test_bias_on_segmented_keys():
    fn = attnc.compile(SEGMENTS, backend="reference", T=3, H=4, W=5, M=7)
    export = fn.to_flex(block_size=16)
    b = fn.compiled.bound
    q, k, v = qkv(b.nq, b.nk)
    torch.testing.assert_close(export.run(q, k, v), fn(q, k, v), rtol=1e-9, atol=1e-9)


# -- random sizes --------------------------------------------------------------------------------
_HYP = dict(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(**_HYP)
@given(h=st.integers(4, 14), w=st.integers(4, 14), kernel=st.integers(2, 5), dilation=st.integers(1, 3),
       bs=st.sampled_from([16, 32, (16, 32)]), data=st.data())
def test_random_natten(h, w, kernel, dilation, bs, data):
    dilation = min(dilation, h // kernel, w // kernel) or 1
    if kernel * dilation > min(h, w):
        kernel = 2
    fn = attnc.compile(SPECS / "natten2d.attn", backend="reference", H=h, W=w, kernel=kernel, dilation=dilation)
    check_mask(fn, fn.to_flex(block_size=bs), {}, bs, exact=dilation == 1)


@settings(**_HYP)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), bs=st.sampled_from([16, 32]))
def test_random_documents(lengths, bs):
    n = sum(lengths)
    fn = ref_fn("document_causal", dict(N=n))
    doc = _doc(n, lengths)
    check_mask(fn, fn.to_flex(block_size=bs, doc=doc), {"doc": doc}, bs)


@settings(**_HYP)
@given(m=st.integers(1, 70), n=st.integers(1, 70), bs=st.sampled_from([16, (32, 16)]))
def test_random_cross_causal(m, n, bs):
    fn = attnc.compile(SPECS / "cross_causal.attn", backend="reference", M=m, N=n)
    check_mask(fn, fn.to_flex(block_size=bs), {}, bs)


# -- scale and errors ----------------------------------------------------------------------------
def test_a_long_sequence_exports_without_evaluating_pairs():
    n = 1 << 17  # 1.7e10 pairs: only the tiles are classified
    fn = attnc.compile(SPECS / "sliding_window.attn", backend="reference", N=n, W=1000)
    start = time.perf_counter()
    export = fn.to_flex(block_size=128)
    assert time.perf_counter() - start < 10
    bm = export.block_mask
    assert bm.kv_num_blocks.shape == (1, 1, n // 128) and int(bm.full_kv_num_blocks.sum()) > 0
    visible = int(bm.full_kv_num_blocks.sum() + bm.kv_num_blocks.sum())
    assert visible <= 10 * (n // 128)  # a band of tiles, not the square


def test_to_device_and_repr():
    fn = ref_fn("document_causal", dict(N=100))
    export = fn.to_flex(doc=_doc(100, [30, 70]))
    moved = export.to("cpu")
    assert moved.device == torch.device("cpu") and moved.mask_mod is not export.mask_mod
    assert "document_causal" in repr(export) and "def mask_mod" in export.source


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "power of two"), (dict(block_size=24), "power of two"), (dict(block_size=8), "power of two"),
    (dict(block_size=True), "power of two"), (dict(block_size=(16, 16, 16)), "power of two"),
    (dict(block_size="128"), "power of two"), (dict(head_dim=0), "head_dim"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(AttncError, match=match):
        ref_fn("causal", dict(N=77)).to_flex(**kwargs)


def test_runtime_tensor_errors_name_them():
    fn = ref_fn("document_causal", dict(N=100))
    with pytest.raises(AttncError, match="'doc'") as err:
        fn.to_flex()
    assert "doc=tensor" in str(err.value)
    with pytest.raises(AttncError, match="'docs', 'extra'") as err:
        fn.to_flex(doc=_doc(100, [100]), docs=torch.zeros(100), extra=torch.zeros(1))
    assert "did you mean 'doc'" in str(err.value)
    with pytest.raises(AttncError, match="integer dtype"):
        fn.to_flex(doc=torch.zeros(100))
    with pytest.raises(AttncError, match="shape"):
        fn.to_flex(doc=torch.zeros(50, dtype=torch.long))
    swin = ref_fn("swin_bias", dict(H=14, W=14))
    with pytest.raises(AttncError, match="float table of rank 2"):
        swin.to_flex(rel_bias=torch.zeros(13, dtype=torch.float32))
    with pytest.raises(AttncError, match="NaN"):
        swin.to_flex(rel_bias=torch.full((13, 13), math.nan))
    two = ref_fn("softcap_sink", dict(N=70, W=16)).to_flex(sinks=torch.zeros(2))  # checked per head in run
    with pytest.raises(AttncError, match="sinks"):
        two.run(*qkv(70, 70))


@pytest.mark.parametrize("name,params", [("moba", dict(N=64, B=16, K=2)), ("biformer", dict(H=14, W=14))])
def test_routed_specs_do_not_export(name, params):
    with pytest.raises(AttncError, match="routes keys by data"):
        ref_fn(name, params).to_flex()


def test_run_checks_its_inputs():
    export = ref_fn("sigmoid_causal", dict(N=70)).to_flex()
    with pytest.raises(AttncError, match="70 queries"):
        export.run(*qkv(69, 70))
    with pytest.raises(AttncError, match="multiple of the kv heads"):
        export.run(*qkv(70, 70, hq=3, hkv=2))
    with pytest.raises(AttncError, match="return_lse needs softmax"):
        export.run(*qkv(70, 70), return_lse=True)


# -- compiled Flex kernels (block-sparse: the BlockMask decides what they skip) -------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name,params", [("natten2d", dict(H=40, W=37, kernel=7, dilation=2)),
                                         ("document_causal", dict(N=1500)), ("scale_dit", dict(H=40, W=32)),
                                         ("swin_bias", dict(H=28, W=35)), ("alibi_causal", dict(N=1000))])
def test_compiled_flex_on_gpu(name, params):
    fn = ref_fn(name, params)
    tensors = {k: v.cuda() for k, v in tensors_for(name, params).items()}
    export = fn.to_flex(block_size=128, **tensors)
    b = fn.compiled.bound
    q, k, v = (t.cuda() for t in qkv(b.nq, b.nk, d=64, dv=64, dtype=torch.float16))
    flex = torch.compile(fa.flex_attention)
    out = flex(q, k, v, score_mod=export.score_mod, block_mask=export.block_mask, scale=export.scale,
               enable_gqa=export.enable_gqa)
    want = fn(q.double(), k.double(), v.double(), **tensors)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
