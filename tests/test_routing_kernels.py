"""Routing on the Triton backend (backends/triton/routing.py and the routed kernels): outputs and
gradients against the reference backend (the float64 definition) and against BiFormer's and
MoBA's own algorithms (tests/oracles.py), on random sizes, group sizes, top-k, grouped-query
heads, token orders and score kinds; under torch.compile; and a tie rule that a float64
reference would resolve the same way."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnc
from tests import oracles
from tests.conftest import DEVICE
from tests.test_specs import SPECS


def _qkv(nq, nk, hq=2, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, nq, d, generator=g), torch.randn(2, hkv, nk, d, generator=g),
            torch.randn(2, hkv, nk, d, generator=g))


def _check(fn, q, k, v, grads=True, tol=2e-5):
    """fn (triton) against its reference twin in float64: output and, optionally, q/k/v grads."""
    ref = attnc.compile(fn.spec, backend="reference", **fn.params)
    leaves = [x.to(DEVICE).requires_grad_(grads) for x in (q, k, v)]
    out = fn(*leaves)
    dleaves = [x.detach().double().requires_grad_(grads) for x in (q, k, v)]
    expect = ref(*dleaves)
    assert (out.detach().cpu().double() - expect).abs().max().item() < tol
    if grads:
        g = torch.randn_like(expect)
        out.backward(g.to(out.dtype).to(DEVICE))
        expect.backward(g)
        for a, b in zip(leaves, dleaves):
            assert (a.grad.cpu().double() - b.grad).abs().max().item() < 10 * tol


@settings(max_examples=6, deadline=None)
@given(n=st.integers(20, 90), block=st.sampled_from([8, 16, 24, 32]), top=st.integers(1, 4),
       gqa=st.booleans(), seed=st.integers(0, 99))
def test_moba_kernels_match_the_reference(n, block, top, gqa, seed):
    """Blocks of the tile (FULL tiles of one group: the routing per row), of a multiple of it, and
    not (FULL tiles of several groups: per element, the MIXED lists)."""
    fn = attnc.compile(SPECS / "moba.attn", tiles=(16, 16), N=n, B=block, K=top)
    _check(fn, *_qkv(n, n, hq=4 if gqa else 2, seed=seed))


@settings(max_examples=5, deadline=None)
@given(h=st.integers(6, 13), w=st.integers(6, 13), r=st.integers(2, 5), top=st.integers(1, 4),
       layout=st.sampled_from(["row_major", "auto"]), seed=st.integers(0, 99))
def test_biformer_kernels_match_the_reference(h, w, r, top, layout, seed):
    """Regions need not divide the grid (partial regions at the edges); permuting layouts too."""
    fn = attnc.compile(SPECS / "biformer.attn", tiles=(16, 16), layout=layout, H=h, W=w, R=r, K=top)
    _check(fn, *_qkv(h * w, h * w, seed=seed))


@pytest.mark.parametrize("H,W,R,K", [(12, 12, 4, 2), (8, 12, 4, 3)])
def test_biformer_kernels_match_biformers_algorithm(H, W, R, K):
    fn = attnc.compile(SPECS / "biformer.attn", tiles=(16, 16), H=H, W=W, R=R, K=K)
    q, k, v = _qkv(H * W, H * W, seed=H + W)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu().double()
    assert (out - oracles.biformer_attention(q, k, v, H, W, R, K)).abs().max().item() < 2e-5


@pytest.mark.parametrize("N,B,K", [(50, 8, 3), (64, 16, 2)])
def test_moba_kernels_match_mobas_algorithm(N, B, K):
    fn = attnc.compile(SPECS / "moba.attn", tiles=(16, 16), N=N, B=B, K=K)
    q, k, v = _qkv(N, N, seed=N)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu().double()
    assert (out - oracles.moba_attention(q, k, v, B, K)).abs().max().item() < 2e-5


@pytest.mark.parametrize("score", ["sigmoid(bias = -2.0)", "softplus", "softmax(softcap = 2.0)"])
def test_routing_under_other_scores_and_a_window_mask(score):
    spec = f"""attention r(N) {{
        q, kv = seq(N)
        mask  = causal and q.i - k.i < 40
        score = {score}
        route = top(2) of blocks(8) by q @ mean(k)
    }}"""
    fn = attnc.compile(spec, tiles=(16, 16), N=61)
    _check(fn, *_qkv(61, 61, seed=5))


@pytest.mark.parametrize("score,block", [("softplus(scale = log(n_visible) / sqrt(head_dim))", 32),
                                         ("softmax(scale = log(n_visible) / sqrt(head_dim))", 8),
                                         ("sigmoid(bias = -log(n_visible))", 16)])
def test_n_visible_counts_the_chosen_keys(score, block):
    """Under routing, n_visible counts the keys of the chosen groups the mask shows (docs/
    language.md): a count per batch, head and query, from this call's selection. The Triton
    backend once used the mask's counts (errors of 0.06-0.4 against the reference; found in
    review)."""
    spec = f"""attention r(N) {{
        q, kv = seq(N)
        mask  = causal and q.i - k.i < 70
        score = {score}
        route = top(2, own = true) of blocks({block}) by q @ mean(k)
    }}"""
    fn = attnc.compile(spec, tiles=(16, 16), N=100)
    _check(fn, *_qkv(100, 100, hq=4, hkv=2, seed=3))


def test_reference_n_visible_counts_each_heads_chosen_keys():
    """The oracle itself: softmax(scale = log(n_visible)) from the routed visibility by hand, with
    n_visible per (batch, head, query). It once took the first head's counts for every head."""
    spec = """attention r(N) { q, kv = seq(N)  mask = causal and q.i - k.i < 13  # earlier blocks partly seen
        score = softmax(scale = log(n_visible))  route = top(3, own = true) of blocks(4) by q @ mean(k) }"""
    ref = attnc.compile(spec, backend="reference", N=40)
    q, k, v = (x.double() for x in _qkv(40, 40, hq=4, hkv=2, seed=4))
    seen = ref.routed_mask(q, k)  # [B, Hq, Nq, Nk]
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) * torch.log(seen.sum(-1, keepdim=True).double())
    expect = torch.softmax(s.masked_fill(~seen, float("-inf")), -1) @ vv
    assert (ref(q, k, v) - expect).abs().max().item() < 1e-12


def test_n_visible_under_routing_and_runtime_data():
    spec = """attention r(N) {
        q, kv = seq(N)
        mask  = doc[q.i] == doc[k.i] and k.i <= q.i
        score = softplus(scale = log(n_visible) + 0.5)
        route = top(2, own = true) of blocks(8) by q @ mean(k)
    }"""
    fn = attnc.compile(spec, tiles=(16, 16), N=48)
    ref = attnc.compile(spec, backend="reference", N=48)
    doc = torch.tensor([0] * 20 + [1] * 13 + [2] * 15)
    q, k, v = _qkv(48, 48, seed=2)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), doc=doc.to(DEVICE)).cpu().double()
    assert (out - ref(q.double(), k.double(), v.double(), doc=doc)).abs().max().item() < 2e-5


def test_routing_with_a_mask_that_reads_runtime_data():
    spec = """attention r(N) {
        q, kv = seq(N)
        mask  = doc[q.i] == doc[k.i]
        route = top(2, own = true) of blocks(8) by q @ mean(k)
    }"""
    fn = attnc.compile(spec, tiles=(16, 16), N=48)
    ref = attnc.compile(spec, backend="reference", N=48)
    doc = torch.tensor([0] * 20 + [1] * 13 + [2] * 15)
    q, k, v = _qkv(48, 48, seed=2)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), doc=doc.to(DEVICE)).cpu().double()
    assert (out - ref(q.double(), k.double(), v.double(), doc=doc)).abs().max().item() < 2e-5


def test_ties_go_to_the_lower_group_as_in_the_reference():
    fn = attnc.compile(SPECS / "moba.attn", tiles=(16, 16), N=32, B=8, K=2)
    q, k, v = torch.ones(1, 1, 32, 4), torch.ones(1, 1, 32, 4), torch.randn(1, 1, 32, 4)
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu()
    # Query 31 keeps block 0 (lowest of the tied) and its own block 3: equal weights over 16 keys.
    expect = torch.cat([v[0, 0, :8], v[0, 0, 24:]]).mean(0)
    assert torch.allclose(out[0, 0, 31], expect, atol=1e-6)


def test_routing_under_torch_compile():
    fn = attnc.compile(SPECS / "moba.attn", tiles=(16, 16), N=40, B=8, K=2)
    q, k, v = (x.to(DEVICE) for x in _qkv(40, 40, seed=9))
    compiled = torch.compile(lambda a, b, c: fn(a, b, c) * 2.0, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(q, k, v), 2.0 * fn(q, k, v))
