"""The layout seam: token orders change where tokens sit in the kernel, never the result.

Random permutation layouts (as explicit `Layout`s) stand in for the real orders the analysis
will choose: outputs and logsumexps stay equal to the float64 reference in row-major order, and
tile classes are exact in kernel positions against the brute-force mask permuted the same way.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis.layout import from_orders
from attnc.analysis.tiles import EMPTY, FULL
from tests import oracles
from tests.test_specs import SPECS, _qkv

# (spec, params, runtime tensors maker)
CASES = [
    ("causal", dict(N=77), None),
    ("natten2d", dict(H=9, W=11, kernel=3, dilation=2), None),
    ("scale_dit", dict(H=12, W=8), None),
    ("softplus", dict(N=45), None),
    ("sigmoid_causal", dict(N=50), None),
    ("cross_causal", dict(M=40, N=70), None),
    ("document_causal", dict(N=70), lambda g, heads: {"doc": torch.randint(0, 4, (70,), generator=g).sort().values}),
    ("swin_bias", dict(H=14, W=14), lambda g, heads: {"rel_bias": torch.randn(heads, 13, 13, generator=g)}),
    ("softcap_sink", dict(N=48), lambda g, heads: {"sinks": torch.randn(heads, generator=g)}),
]


def _random_layout(nq: int, nk: int, seed: int, which: str):
    rng = np.random.default_rng(seed)
    q = rng.permutation(nq) if which in ("q", "both") else np.arange(nq)
    kv = rng.permutation(nk) if which in ("kv", "both") else np.arange(nk)
    return from_orders(f"random-{which}", q, kv)


@pytest.mark.parametrize("which", ["q", "kv", "both"])
@pytest.mark.parametrize("name,params,make", CASES, ids=[c[0] for c in CASES])
def test_permuted_layouts_leave_results_unchanged(name, params, make, which, device):
    path = SPECS / f"{name}.attn"
    ref = attnc.compile(path, backend="reference", **params)
    nq, nk = ref.compiled.bound.nq, ref.compiled.bound.nk
    layout = _random_layout(nq, nk, seed=len(name) * 7 + nq, which=which)
    fn = attnc.compile(path, layout=layout, tiles=(16, 16), **params)
    assert fn.layout is layout and fn.layout.name == f"random-{which}"
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(nq, nk, heads=2)
    tensors = make(g, 2) if make else {}
    with torch.no_grad():
        out = fn(q.to(device), k.to(device), v.to(device), **{n: t.to(device) for n, t in tensors.items()})
    expect = ref(q.double(), k.double(), v.double(), **{n: (t.double() if t.is_floating_point() else t)
                                                         for n, t in tensors.items()})
    torch.testing.assert_close(out.cpu().double(), expect, atol=2e-5, rtol=2e-5)
    if fn.ir.score.kind == "softmax":
        with torch.no_grad():
            _, lse = fn(q.to(device), k.to(device), v.to(device), return_lse=True,
                        **{n: t.to(device) for n, t in tensors.items()})
        _, lse_ref = ref(q.double(), k.double(), v.double(), return_lse=True,
                         **{n: (t.double() if t.is_floating_point() else t) for n, t in tensors.items()})
        torch.testing.assert_close(lse.cpu().double(), lse_ref, atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(3, 12), W=st.integers(3, 12), kernel=st.sampled_from([3, 5]), seed=st.integers(0, 1000),
       bm=st.sampled_from([16, 32]), bn=st.sampled_from([16, 32]))
def test_tile_classes_are_exact_in_kernel_positions(H, W, kernel, seed, bm, bn):
    """Never EMPTY when a pair is visible, never FULL when one is hidden, in permuted positions."""
    assume(kernel <= min(H, W))  # the NATTEN oracle is written for odd kernels that fit
    layout = _random_layout(H * W, H * W, seed, "both")
    fn = attnc.compile(SPECS / "natten2d.attn", layout=layout, tiles=(bm, bn), H=H, W=W, kernel=kernel, dilation=1)
    dense = oracles.natten2d_mask(H, W, kernel, 1)[layout.q_perm][:, layout.kv_perm]
    classes = fn.tile_map().numpy()
    n = H * W
    for a in range(classes.shape[0]):
        for b in range(classes.shape[1]):
            block = dense[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
            if classes[a, b] == EMPTY:
                assert not block.any()
            if classes[a, b] == FULL:
                assert block.all() and (b + 1) * bn <= n
    # Row counts per kernel position are the permuted row sums.
    np.testing.assert_array_equal(fn.compiled.schedule.row_counts, dense.sum(axis=1))


def test_default_layout_is_row_major_and_public():
    fn = attnc.compile(SPECS / "causal.attn", N=100)
    assert fn.layout.name == "row_major"
    for order in (fn.layout.q_order, fn.layout.kv_order):
        assert order.dtype == torch.int64
        torch.testing.assert_close(order, torch.arange(100))
    assert attnc.compile(SPECS / "causal.attn", layout="row_major", N=100).layout.name == "row_major"
    tm = fn.tile_map()
    assert tm.dtype == torch.int8 and tm.shape == (2, 2)
    assert tm.tolist() == [[1, 0], [2, 1]]  # 0 EMPTY, 1 PARTIAL, 2 FULL


def test_bad_layouts_are_refused():
    with pytest.raises(AttncError, match="unknown layout 'hilbertish'"):
        attnc.compile(SPECS / "causal.attn", layout="hilbertish", N=64)
    with pytest.raises(AttncError, match="not a permutation"):
        from_orders("dup", [0, 0, 1], [0, 1, 2])
    with pytest.raises(AttncError, match="orders 3 queries"):
        attnc.compile(SPECS / "causal.attn", layout=from_orders("small", [0, 1, 2], [0, 1, 2]), N=64)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_kernel_order_in_and_out_pays_no_permutation(backend, device):
    """fn(..., kernel_order=True) takes and returns tokens in the layout's order: equal to the
    row-major call permuted by fn.layout.q_order / kv_order."""
    n = 60
    layout = _random_layout(n, n, seed=5, which="both")
    fn = attnc.compile(SPECS / "document_causal.attn", backend=backend, layout=layout, tiles=(16, 16), N=n)
    dev = device if backend == "triton" else "cpu"
    q, k, v = (x.to(dev) for x in _qkv(n, n, seed=8))
    doc = torch.tensor(np.sort(np.random.default_rng(1).integers(0, 3, n))).to(dev)
    qo, ko = fn.layout.q_order.to(dev), fn.layout.kv_order.to(dev)
    with torch.no_grad():
        out, lse = fn(q, k, v, doc=doc, return_lse=True)
        out_k, lse_k = fn(q[:, :, qo], k[:, :, ko], v[:, :, ko], doc=doc, return_lse=True, kernel_order=True)
    torch.testing.assert_close(out_k, out[:, :, qo])
    torch.testing.assert_close(lse_k, lse[:, :, qo])
