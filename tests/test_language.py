"""Key segments, float runtime tables, score modifiers and routing: each against an independent
oracle (tests/oracles.py) and, where kernels exist, generated kernels against the reference."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import attnc
from attnc import AttncError
from tests import oracles
from tests.conftest import DEVICE
from tests.test_specs import ELSEWHERE, SPECS, _qkv

HERE = Path(__file__).read_text()


def test_specs_listed_as_elsewhere_are_tested_here():
    for name in ELSEWHERE - {"document_causal"}:
        assert f'"{name}.attn"' in HERE, name


def _run(path, params, tensors, heads=2, tiles=(16, 32), device=DEVICE, seed=0):
    """(triton output, float64 reference output, q, k, v) for one spec and binding."""
    fn = attnc.compile(SPECS / path, tiles=tiles, **params)
    ref = attnc.compile(SPECS / path, backend="reference", **params)
    b = fn.compiled.bound
    q, k, v = _qkv(b.nq, b.nk, heads=heads, device=device, seed=seed)
    with torch.no_grad():
        out = fn(q, k, v, **{n: t.to(device) for n, t in tensors.items()}).cpu().double()
    expect = ref(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                 **{n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})
    return out, expect, q.cpu(), k.cpu(), v.cpu()


# -- key segments ---------------------------------------------------------------------------------
def test_scale_dit_size_must_divide():
    with pytest.raises(AttncError) as info:
        attnc.compile(SPECS / "scale_dit.attn", backend="reference", H=13, W=8)
    err = info.value
    assert "must divide exactly" in err.message and "H % 4 == 0" in err.message and "H=13" in err.message
    assert err.line == 7  # the `kv = ...` line that divides


def test_mixed_segments_seq_and_grid(device):
    """Global register tokens (a seq segment) before an image grid; k.y only under `k in img`."""
    spec = """attention reg(H, W, G) {
        q  = grid(H, W)
        kv = reg: seq(G), img: grid(H, W)
        mask = k in reg or (k in img and abs(q.y - k.y) <= 1 and abs(q.x - k.x) <= 2)
    }"""
    H, W, G = 6, 7, 3
    fn = attnc.compile(spec, tiles=(16, 16), H=H, W=W, G=G)
    expect = np.zeros((H * W, G + H * W), dtype=bool)
    for a in range(H * W):
        expect[a, :G] = True
        for b in range(H * W):
            expect[a, G + b] = abs(a // W - b // W) <= 1 and abs(a % W - b % W) <= 2
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    q, k, v = _qkv(H * W, G + H * W, device=device, seed=5)
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    assert (out - oracles.attention(q.cpu(), k.cpu(), v.cpu(), expect)).abs().max().item() < 1e-4


def test_segment_coordinates_are_local_and_lookups_work():
    # k.i is the index within the key's own segment; a runtime tensor indexed by it sees local ids.
    spec = """attention seg(N, M) {
        q  = seq(N)
        kv = a: seq(N), b: seq(M)
        mask = (k in a and k.i <= q.i) or (k in b and tag[k.i] == 1)
    }"""
    fn = attnc.compile(spec, tiles=(16, 16), N=20, M=9)
    tag = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1])
    expect = np.concatenate([oracles.causal_mask(20, 20), np.tile(tag.numpy() == 1, (20, 1))], axis=1)
    np.testing.assert_array_equal(fn.mask(tag=tag).numpy(), expect)
    q, k, v = _qkv(20, 29, seed=2)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tag=tag.to(DEVICE)).cpu().double()
    assert (out - oracles.attention(q, k, v, expect)).abs().max().item() < 1e-4


@pytest.mark.parametrize("body,phrase", [
    ("kv = a: seq(N), b: grid(N, N)\n mask = k.y < 3", "k.y is read for keys of segment 'a'"),
    ("kv = a: seq(N), b: seq(N)\n mask = k in c", "no segment 'c'"),
    ("kv = a: seq(N), a: seq(N)", "segment 'a' is defined twice"),
    ("kv = a: seq(N), b: seq(3)\n mask = causal", "causal on a segmented key space needs the last segment"),
    ("kv = seq(N)\n mask = k in a", "the key space has no segments"),
    ("kv = a: seq(N)\n mask = q in a", "the query space has no segments"),
    ("kv = a: seq(N), b: seq(2)\n mask = window(3)", "a window is read for keys of segment 'b'"),
])
def test_segment_errors_are_located(body, phrase):
    source = "attention s(N) {\n q = seq(N)\n " + body + "\n}\n"
    with pytest.raises(AttncError) as info:
        attnc.parse(source)
    assert phrase in info.value.message, str(info.value)
    assert info.value.line is not None and info.value.line >= 3


# -- float tables and score modifiers ----------------------------------------------------------------
@pytest.mark.parametrize("per_head", [False, True])
def test_swin_bias_matches_swin_code(per_head, device):
    H, W, heads = 14, 21, 2
    g = torch.Generator().manual_seed(1)
    table = torch.randn((heads, 13, 13) if per_head else (13, 13), generator=g)
    out, expect, q, k, v = _run("swin_bias.attn", dict(H=H, W=W), {"rel_bias": table}, heads=heads, device=device)
    assert (out - expect).abs().max().item() < 1e-4
    full = table if per_head else table.expand(heads, 13, 13)
    swin = oracles.swin_window_attention(q, k, v, H, W, 7, 3, full)
    assert (expect - swin).abs().max().item() < 1e-10


def test_bias_table_gradient_in_reference():
    """The reference backend differentiates through the table (the Swin code does too)."""
    H = W = 7
    g = torch.Generator().manual_seed(4)
    table = torch.randn(2, 13, 13, generator=g, dtype=torch.float64)
    q, k, v = (t.double() for t in _qkv(H * W, H * W, seed=4))
    ref = attnc.compile(SPECS / "swin_bias.attn", backend="reference", H=H, W=W)
    t1 = table.clone().requires_grad_()
    ref(q, k, v, rel_bias=t1).square().sum().backward()
    t2 = table.clone().requires_grad_()
    oracles.swin_window_attention(q, k, v, H, W, 7, 3, t2).square().sum().backward()
    assert torch.allclose(t1.grad, t2.grad, atol=1e-10)
    assert t1.grad.abs().sum() > 0


def test_alibi_matches_formula(device):
    N, heads = 45, 4
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)])
    out, expect, q, k, v = _run("alibi_causal.attn", dict(N=N), {"slopes": slopes}, heads=heads, device=device)
    assert (out - expect).abs().max().item() < 1e-4
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    bias = -slopes[:, None, None].double() * torch.from_numpy(i - j).double()
    formula = oracles.modified_attention(q, k, v, oracles.causal_mask(N, N), bias=bias)
    assert (expect - formula).abs().max().item() < 1e-10


@pytest.mark.parametrize("N,W,cap", [(40, 8, 2.0), (33, 40, 0.5)])
def test_softcap_and_sink_match_formula(N, W, cap, device):
    sinks = torch.tensor([0.7, -2.0])
    out, expect, q, k, v = _run("softcap_sink.attn", dict(N=N, W=W, cap=cap), {"sinks": sinks}, device=device)
    assert (out - expect).abs().max().item() < 1e-4
    formula = oracles.modified_attention(q, k, v, oracles.sliding_window_mask(N, W), softcap=cap, sink=sinks)
    assert (expect - formula).abs().max().item() < 1e-10


def test_sink_lse_and_rows_that_see_nothing(device):
    # Query 0 sees no key (k.i < q.i); with a sink its output is still 0 and its lse is the sink.
    spec = """attention s(N) { q, kv = seq(N)  mask = k.i < q.i  score = softmax(sink = sinks[head]) }"""
    fn = attnc.compile(spec, tiles=(16, 16), N=20)
    q, k, v = _qkv(20, 20, seed=9, device=device)
    sinks = torch.tensor([1.5, -0.5], device=device)
    with torch.no_grad():
        out, lse = fn(q, k, v, sinks=sinks, return_lse=True)
    assert (out[:, :, 0] == 0).all()
    s = (q.cpu().double() @ k.cpu().double().transpose(-1, -2)) / 32 ** 0.5
    mask = torch.from_numpy(oracles.causal_mask(20, 20)) & ~torch.eye(20, dtype=torch.bool)
    s = s.masked_fill(~mask, float("-inf"))
    full = torch.cat([s, sinks.cpu().double()[None, :, None, None].expand(1, 2, 20, 1)], dim=-1)
    assert (lse.cpu().double() - torch.logsumexp(full, -1)).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["sigmoid(bias = -2.0, softcap = 3.0)", "softplus(softcap = 4.0)", "softmax(softcap = 1.5)"])
def test_modifiers_on_every_score_kind(kind, device):
    spec = f"""attention m(N) {{
        q, kv = seq(N)
        mask  = abs(q.i - k.i) <= 5
        bias  = table[q.i - k.i + 5] * 0.5 + 0.1 * (q.i % 3)
        score = {kind}
    }}"""
    fn = attnc.compile(spec, tiles=(16, 16), N=37)
    ref = attnc.compile(spec, backend="reference", N=37)
    q, k, v = _qkv(37, 37, seed=11, device=device)
    table = torch.randn(2, 11, generator=torch.Generator().manual_seed(3))  # per head
    with torch.no_grad():
        out = fn(q, k, v, table=table.to(device)).cpu().double()
    expect = ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), table=table.double())
    assert (out - expect).abs().max().item() < 1e-4
    # The reference against the definition: logits, bias, cap, then the score function.
    i, j = np.arange(37)[:, None], np.arange(37)[None, :]
    mask = torch.from_numpy(np.abs(i - j) <= 5)
    bias = table.double()[:, np.clip(i - j + 5, 0, 10)] * 0.5 + 0.1 * torch.from_numpy(i % 3).double()
    z = q.cpu().double() @ k.cpu().double().transpose(-1, -2) / 32 ** 0.5 + bias
    cap = float(kind.split("softcap = ")[1].rstrip(")"))
    z = cap * torch.tanh(z / cap)
    if kind.startswith("sigmoid"):
        w = torch.sigmoid(z - 2.0) * mask
    elif kind.startswith("softplus"):
        w = torch.nn.functional.softplus(z) * mask
        w = w / w.sum(-1, keepdim=True)
    else:
        w = torch.softmax(z.masked_fill(~mask, float("-inf")), -1)
    assert (expect - w @ v.cpu().double()).abs().max().item() < 1e-10


@pytest.mark.parametrize("tensors,phrase", [
    ({}, "reads runtime tensor 'rel_bias'"),
    ({"rel_bias": torch.zeros(13, 13, dtype=torch.int64)}, "must be floating point"),
    # On a 7 x 7 image shifted windows hold 3 or 4 rows, so |dy| <= 3 and indices stop at 9.
    ({"rel_bias": torch.zeros(9, 13)}, "the spec indexes it up to shape [10, 10]"),
    ({"rel_bias": torch.zeros(3, 13, 13)}, "must be the 2 query heads"),
    ({"rel_bias": torch.zeros(13)}, "has shape [13]"),
    ({"rel_bias": torch.full((13, 13), float("nan"))}, "contains NaN"),
    ({"rel_bias": torch.zeros(13, 13), "relbias": torch.zeros(1)}, "reads no runtime tensor 'relbias'"),
])
def test_table_validation(tensors, phrase):
    fn = attnc.compile(SPECS / "swin_bias.attn", H=7, W=7)
    q = k = v = torch.zeros(1, 2, 49, 16)
    with pytest.raises(AttncError) as info:
        fn(q, k, v, **tensors)
    assert phrase in info.value.message, str(info.value)


def test_table_extent_covers_visible_pairs_only():
    # A 7 x 7 window reads rel_bias[q.y - k.y + 6] in [0, 12] even though q.y - k.y spans more.
    fn = attnc.compile(SPECS / "swin_bias.attn", H=14, W=14)
    assert fn.compiled.tensor_extents == {}  # float tables are checked per call, per head count
    assert fn._extents(2) == {"rel_bias": (13, 13)}


@pytest.mark.parametrize("source,phrase", [
    ("score = softmax(scale = 1.0 + head)", "head (the query head index) is only defined"),
    ("bias = q.i < k.i", "the bias must be a number"),
    ("score = sigmoid(sink = s[head])", "sigmoid has no argument 'sink'"),
    ("score = softmax(sink = s[q.i])", "one number per head"),
    ("score = softmax(scale = t[0])", "can only be read in the mask, the bias"),
    ("mask = t[q.i] == 1\n bias = t[k.i]", "use two tensors"),
    ("bias = 1.0\n route = causal", "route must be a selection"),
    ("mask = top(3) of blocks(4) by q @ mean(k)", "can only be assigned to `route`"),
    ("route = top(3) of regions(4) by q @ mean(k)", "regions(...) routes a grid space"),
    ("route = top(3) of blocks(4) by mean(k) @ mean(k)", "expected `q` or `mean(q)`"),
    ("route = top(3) of blocks(4) by q @ k", "write `@ mean(k)`"),
    ("route = top(3, always = true) of blocks(4) by q @ mean(k)", "top has no argument 'always'"),
    ("route = top(0) of blocks(4) by q @ mean(k)", "K must be at least 1"),
])
def test_modifier_and_route_errors(source, phrase):
    with pytest.raises(AttncError) as info:
        attnc.parse("attention s(N) {\n q, kv = seq(N)\n " + source + "\n}\n")
    assert phrase in info.value.message, str(info.value)
    assert info.value.line is not None


# -- routing (the reference's definition) ----------------------------------------------------------------------
@pytest.mark.parametrize("H,W,R,K", [(14, 14, 7, 2), (12, 8, 4, 3)])
def test_biformer_matches_paper_algorithm(H, W, R, K):
    fn = attnc.compile(SPECS / "biformer.attn", backend="reference", H=H, W=W, R=R, K=K)
    q, k, v = (t.double() for t in _qkv(H * W, H * W, heads=2, d=16, seed=H))
    out = fn(q, k, v)
    assert (out - oracles.biformer_attention(q, k, v, H, W, R, K)).abs().max().item() < 1e-10
    seen = fn.routed_mask(q, k)
    assert seen.shape == (1, 2, H * W, H * W)
    assert (seen.sum(-1) == K * R * R).all()  # every query sees exactly K full regions


@pytest.mark.parametrize("N,B,K", [(50, 8, 3), (64, 16, 2), (20, 32, 3)])
def test_moba_matches_paper_algorithm(N, B, K):
    fn = attnc.compile(SPECS / "moba.attn", backend="reference", N=N, B=B, K=K)
    q, k, v = (t.double() for t in _qkv(N, N, heads=2, d=16, seed=N))
    out = fn(q, k, v)
    assert (out - oracles.moba_attention(q, k, v, B, K)).abs().max().item() < 1e-10
    seen = fn.routed_mask(q, k)
    assert not (seen & ~torch.from_numpy(oracles.causal_mask(N, N))).any()  # routing never breaks the mask


@pytest.mark.parametrize("name,params", [("biformer.attn", dict(H=14, W=14)), ("moba.attn", dict(N=64))])
def test_a_routed_mask_needs_q_and_k(name, params):
    """Routing kernels exist (tests/test_routing_kernels.py); the visibility still depends on data."""
    for backend in ("triton", "reference"):
        fn = attnc.compile(SPECS / name, backend=backend, **params)
        with pytest.raises(AttncError, match="routed_mask"):
            fn.mask()


def test_routing_ties_go_to_the_lower_group():
    # All-equal keys make every block score the same: the lowest-numbered candidates win.
    fn = attnc.compile(SPECS / "moba.attn", backend="reference", N=32, B=8, K=2)
    q = torch.ones(1, 1, 32, 4, dtype=torch.float64)
    k = torch.ones(1, 1, 32, 4, dtype=torch.float64)
    seen = fn.routed_mask(q, k)[0, 0]
    assert seen[31, :8].all() and not seen[31, 8:24].any() and seen[31, 24:].all()  # block 0 + own block 3


# -- regressions found in review ---------------------------------------------------------------------
def _both(spec, params, tensors, heads=2, n=None):
    fn = attnc.compile(spec, tiles=(16, 16), **params)
    ref = attnc.compile(spec, backend="reference", **params)
    b = fn.compiled.bound
    q, k, v = _qkv(b.nq, b.nk, heads=heads, d=16, seed=1)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), **{n: t.to(DEVICE) for n, t in tensors.items()})
    out = out.cpu().double()
    expect = ref(q.double(), k.double(), v.double(), **{n: t.double() for n, t in tensors.items()})
    return out, expect


@pytest.mark.parametrize("index", ["head, q.i - k.i", "P, k.i", "k.i, P"])
def test_table_index_that_is_the_same_across_the_tile(index):
    spec = f"""attention s(N, P = 1) {{ q, kv = seq(N)  mask = causal and q.i - k.i < 4
               bias = tab[{index}] }}"""
    shape = {"head, q.i - k.i": (2, 4), "P, k.i": (2, 30), "k.i, P": (30, 2)}[index]
    out, expect = _both(spec, dict(N=30), {"tab": torch.randn(shape)})
    assert (out - expect).abs().max().item() < 1e-4


def test_int64_kernels_widen_head_and_parameters():
    spec = """attention s(N, BIG = 1000000000) { q, kv = seq(N)  mask = causal
              bias = tab[(head * BIG + k.i) % 7] }"""
    assert attnc.compile(spec, N=20).compiled.int64
    out, expect = _both(spec, dict(N=20), {"tab": torch.randn(7)}, heads=4)
    assert (out - expect).abs().max().item() < 1e-4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the hidden nan
@pytest.mark.parametrize("score", ["sigmoid", "softplus", "softmax"])
def test_bias_undefined_only_at_hidden_pairs(score):
    # sqrt of a negative number and 1 / 0 happen only above the causal diagonal.
    spec = f"""attention s(N) {{ q, kv = seq(N)  mask = causal
               bias = -sqrt(q.i - k.i) + 1.0 / (q.i - k.i + 1)  score = {score} }}"""
    out, expect = _both(spec, dict(N=20), {})
    assert torch.isfinite(expect).all() and (out - expect).abs().max().item() < 1e-4


def test_bias_undefined_at_a_visible_pair_is_an_error():
    spec = "attention s(N) { q, kv = seq(N)  bias = sqrt(q.i - k.i) }"
    ref = attnc.compile(spec, backend="reference", N=8)
    q = torch.zeros(1, 1, 8, 4, dtype=torch.float64)
    with pytest.raises(AttncError, match=r"is nan at head 0, query 0, key 1"):
        ref(q, q, q)


def test_sink_table_is_checked_for_every_head_even_when_nothing_is_visible():
    spec = "attention s(N) { q, kv = seq(N)  mask = false  score = softmax(sink = sinks[head]) }"
    for backend in ("triton", "reference"):
        fn = attnc.compile(spec, backend=backend, N=20)
        q = torch.zeros(1, 2, 20, 16)
        with pytest.raises(AttncError, match=r"up to shape \[2\]"):
            fn(q, q, q, sinks=torch.zeros(1))


def test_routed_mask_checks_its_inputs():
    fn = attnc.compile(SPECS / "moba.attn", backend="reference", N=20, B=4, K=2)
    q = torch.randn(1, 2, 20, 8)
    with pytest.raises(AttncError, match="19 tokens"):
        fn.routed_mask(q[:, :, :19], q)
    with pytest.raises(AttncError, match="expected"):
        fn.routed_mask(q, torch.randn(2, 2, 20, 8))


@pytest.mark.parametrize("sink,phrase", [("sinks[head] * 1.0e35", "e+35 for head 0; it must lie within"),
                                         ("sinks[head] + sqrt(-1.0)", "is nan for head 0")])
def test_sink_logits_out_of_range_are_errors_on_both_backends(sink, phrase):
    spec = f"attention s(N) {{ q, kv = seq(N)  mask = causal  score = softmax(sink = {sink}) }}"
    q = torch.zeros(1, 2, 8, 16, device=DEVICE)
    for backend in ("triton", "reference"):
        fn = attnc.compile(spec, backend=backend, N=8)
        with pytest.raises(AttncError, match=re.escape(phrase)):
            fn(q, q, q, sinks=torch.tensor([1.0, float("-inf")], device=DEVICE))
