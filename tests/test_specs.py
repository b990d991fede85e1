"""Every file in specs/ compiled, run and checked against its independent oracle and the float64
reference, at sizes that are and are not multiples of the tile."""
from pathlib import Path

import numpy as np
import pytest
import torch

import attnc
from tests import oracles

SPECS = Path(__file__).resolve().parent.parent / "specs"

def _power_mask(N: int, W: int) -> np.ndarray:
    """PowerAttention (Chen et al., 2025): causal, the W latest keys, and power-of-two distances."""
    d = np.arange(N)[:, None] - np.arange(N)[None, :]
    return (d >= 0) & ((d < W) | ((d > 0) & (np.bitwise_and(d, d - 1) == 0)))


# (spec file, parameters, oracle mask)
CASES = [
    ("causal", dict(N=64), lambda p: oracles.causal_mask(p["N"], p["N"])),
    ("causal", dict(N=77), lambda p: oracles.causal_mask(p["N"], p["N"])),
    ("sliding_window", dict(N=96, W=20), lambda p: oracles.sliding_window_mask(p["N"], p["W"])),
    ("sliding_window", dict(N=83, W=7), lambda p: oracles.sliding_window_mask(p["N"], p["W"])),
    ("natten2d", dict(H=13, W=17, kernel=5, dilation=2),
     lambda p: oracles.natten2d_mask(p["H"], p["W"], p["kernel"], p["dilation"])),
    ("natten2d", dict(H=8, W=8, kernel=3, dilation=1),
     lambda p: oracles.natten2d_mask(p["H"], p["W"], p["kernel"], p["dilation"])),
    ("longformer", dict(N=64, W=5, G=3), lambda p: oracles.longformer_mask(p["N"], p["W"], p["G"])),
    ("longformer", dict(N=90, W=9, G=2), lambda p: oracles.longformer_mask(p["N"], p["W"], p["G"])),
    ("gna3d_video", dict(T=4, H=8, W=8),
     lambda p: oracles.gna_mask((p["T"], p["H"], p["W"]), (3, 7, 7), (1, 1, 1), (1, 2, 2), (True, False, False))),
    ("gna3d_video", dict(T=3, H=9, W=11),
     lambda p: oracles.gna_mask((p["T"], p["H"], p["W"]), (3, 7, 7), (1, 1, 1), (1, 2, 2), (True, False, False))),
    ("cross_causal", dict(M=40, N=96), lambda p: oracles.causal_mask(p["M"], p["N"])),
    ("cross_causal", dict(M=75, N=50), lambda p: oracles.causal_mask(p["M"], p["N"])),
    ("streaming_sink", dict(N=96, W=16, S=4), lambda p: oracles.streaming_sink_mask(p["N"], p["W"], p["S"])),
    ("streaming_sink", dict(N=77, W=10, S=3), lambda p: oracles.streaming_sink_mask(p["N"], p["W"], p["S"])),
    ("swin_shifted", dict(H=14, W=14), lambda p: oracles.swin_shifted_mask(p["H"], p["W"], 7, 3)),
    ("swin_shifted", dict(H=7, W=21), lambda p: oracles.swin_shifted_mask(p["H"], p["W"], 7, 3)),
    ("maxvit_grid", dict(H=8, W=8, G=2), lambda p: oracles.maxvit_grid_mask(p["H"], p["W"], p["G"])),
    ("maxvit_grid", dict(H=12, W=9, G=3), lambda p: oracles.maxvit_grid_mask(p["H"], p["W"], p["G"])),
    ("sigmoid_causal", dict(N=64), lambda p: oracles.causal_mask(p["N"], p["N"])),
    ("sigmoid_causal", dict(N=90), lambda p: oracles.causal_mask(p["N"], p["N"])),
    ("softplus", dict(N=64), lambda p: np.ones((p["N"], p["N"]), dtype=bool)),
    ("softplus", dict(N=45), lambda p: np.ones((p["N"], p["N"]), dtype=bool)),
    ("scale_dit", dict(H=12, W=8), lambda p: oracles.scale_dit_mask(p["H"], p["W"])),
    ("scale_dit", dict(H=20, W=16), lambda p: oracles.scale_dit_mask(p["H"], p["W"])),
    ("power_attention", dict(N=90, W=5), lambda p: _power_mask(p["N"], p["W"])),
    ("power_attention", dict(N=150, W=1), lambda p: _power_mask(p["N"], p["W"])),
]
# Specs checked in tests/test_language.py: runtime tensors, score modifiers, routing.
ELSEWHERE = {"document_causal", "swin_bias", "alibi_causal", "softcap_sink", "biformer", "moba"}
# The attention each spec computes, from its paper's formula (softmax unless listed).
FORMULAS = {
    "sigmoid_causal": lambda q, k, v, mask, p: oracles.sigmoid_attention(q, k, v, mask, -np.log(p["N"])),
    "softplus": lambda q, k, v, mask, p: oracles.softplus_attention(q, k, v, mask),
}
IDS = [f"{name}-" + "-".join(f"{k}{v}" for k, v in p.items()) for name, p, _ in CASES]


def _qkv(nq, nk, heads=2, hkv=None, d=32, dv=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or heads
    q = torch.randn(1, heads, nq, d, generator=g)
    k = torch.randn(1, hkv, nk, d, generator=g)
    v = torch.randn(1, hkv, nk, dv or d, generator=g)
    return (t.to(device, dtype) for t in (q, k, v))


def test_every_spec_file_is_covered():
    assert {p.stem for p in SPECS.glob("*.attn")} <= {name for name, _, _ in CASES} | ELSEWHERE


@pytest.mark.parametrize("name,params,oracle", CASES, ids=IDS)
def test_mask_matches_oracle(name, params, oracle):
    fn = attnc.compile(SPECS / f"{name}.attn", backend="reference", **params)
    np.testing.assert_array_equal(fn.mask().numpy(), oracle(params))


@pytest.mark.parametrize("name,params,oracle", CASES, ids=IDS)
def test_triton_matches_reference_and_oracle(name, params, oracle, device):
    fn = attnc.compile(SPECS / f"{name}.attn", tiles=(32, 32), **params)
    ref = attnc.compile(SPECS / f"{name}.attn", backend="reference", **params)
    nq, nk = fn.mask().shape
    q, k, v = _qkv(nq, nk, device=device)
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    expect = ref(q.cpu().double(), k.cpu().double(), v.cpu().double())
    assert (out - expect).abs().max().item() < 1e-4
    formula = FORMULAS.get(name, lambda q, k, v, mask, p: oracles.attention(q, k, v, mask))
    independent = formula(q.cpu(), k.cpu(), v.cpu(), oracle(params), params)
    assert (expect - independent).abs().max().item() < 1e-10


def test_done_when_natten2d(device):
    """The issue's acceptance example, verbatim."""
    fn = attnc.compile("specs/natten2d.attn", backend="triton", H=13, W=17, kernel=5, dilation=2)
    np.testing.assert_array_equal(fn.mask().numpy(), oracles.natten2d_mask(13, 17, 5, 2))
    q, k, v = _qkv(13 * 17, 13 * 17, device=device, seed=3)
    with torch.no_grad():
        out = fn(q, k, v)
    expect = oracles.attention(q.cpu(), k.cpu(), v.cpu(), oracles.natten2d_mask(13, 17, 5, 2))
    assert (out.cpu().double() - expect).abs().max().item() < 1e-4


# NATTEN's definition at borders, with dilation, stride and causal flags, on 1-D axes.
@pytest.mark.parametrize("n,k,d,s,causal", [
    (9, 3, 1, 1, False), (10, 4, 1, 1, False), (13, 3, 2, 1, False), (17, 5, 3, 1, False), (12, 4, 1, 4, False),
    (15, 5, 1, 2, False), (16, 4, 2, 3, False), (11, 3, 1, 1, True), (14, 4, 2, 2, True), (12, 6, 1, 6, True),
])
def test_window_matches_gna_definition(n, k, d, s, causal):
    spec = f"attention w(N) {{ q, kv = seq(N) mask = window({k}, dilation = {d}, stride = {s}, causal = {str(causal).lower()}) }}"
    fn = attnc.compile(spec, backend="reference", N=n)
    np.testing.assert_array_equal(fn.mask().numpy(), oracles.gna_mask((n,), (k,), (d,), (s,), (causal,)))


@pytest.mark.parametrize("n,lengths", [(64, [10, 30, 24]), (83, [1, 40, 2, 40]), (50, [50])])
def test_document_causal(n, lengths, device):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    fn = attnc.compile(SPECS / "document_causal.attn", tiles=(16, 32), N=n)
    expect_mask = oracles.document_causal_mask(doc.numpy())
    np.testing.assert_array_equal(fn.mask(doc=doc).numpy(), expect_mask)
    # Without the ids the analysis still proves the causal part: tiles above the diagonal are EMPTY.
    assert not fn.schedule.exact and (fn.schedule.classes[0, 1:] == 0).all()
    q, k, v = _qkv(n, n, device=device, seed=n)
    with torch.no_grad():
        out = fn(q, k, v, doc=doc.to(device)).cpu().double()
    independent = oracles.attention(q.cpu(), k.cpu(), v.cpu(), expect_mask)
    assert (out - independent).abs().max().item() < 1e-4


def test_n_visible_under_a_mask_that_reads_runtime_data(device):
    # n_visible depends on the document ids, so it must be counted per call: one compiled
    # function, two partitions, each against the LSSA formula on its own mask.
    spec = """attention docs_softplus(N) {
        q, kv = seq(N)
        mask  = causal and doc[q.i] == doc[k.i]
        score = softplus(scale = log(n_visible) / sqrt(head_dim))
    }"""
    fn = attnc.compile(spec, tiles=(16, 16), N=48)
    q, k, v = _qkv(48, 48, device=device, seed=7)
    for lengths in ([5, 30, 13], [40, 8]):
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        with torch.no_grad():
            out = fn(q, k, v, doc=doc.to(device)).cpu().double()
        expect = oracles.softplus_attention(q.cpu(), k.cpu(), v.cpu(), oracles.document_causal_mask(doc.numpy()))
        assert (out - expect).abs().max().item() < 1e-4
