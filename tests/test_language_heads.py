"""Masks that read `head` (issue 12, item 2): DuoAttention's retrieval and streaming heads.

The compiled schedule treats the head as unknown (sound); per call the host classifies the
mask per head (analysis/rows.py) and the kernels run one schedule per (batch * head). Checked:
per-head tile classes against brute force (never a wrong EMPTY or FULL), forward and gradients
against the float64 reference (GQA included), fn.mask(head=h), the Flex export, and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis.rows import head_classes
from attnc.analysis.tiles import EMPTY, FULL
from tests.conftest import DEVICE
from tests.test_data_schedules import _truth
from tests.test_specs import _qkv

DUO = """attention duo(N, S = 4, W = 16) {
    q, kv = seq(N)
    mask  = causal and (retrieval[head] == 1 or k.i < S or q.i - k.i < W)
}
"""
FIRST = """attention first_heads(N, R = 1, W = 8) {
    q, kv = seq(N)
    mask  = causal and (head < R or q.i - k.i < W)
}
"""


def _spec(tmp_path, text, name):
    path = tmp_path / f"{name}.attn"
    path.write_text(text)
    return path


def _check(path, params, heads, hkv, tensors, tiles=(16, 16), seed=0, tol=1e-4):
    fn = attnc.compile(path, tiles=tiles, **params)
    ref = attnc.compile(path, backend="reference", **params)
    n = fn.compiled.bound.nq
    q, k, v = (t.requires_grad_() for t in _qkv(n, n, heads=heads, hkv=hkv, device=DEVICE, seed=seed))
    out = fn(q, k, v, **{a: t.to(DEVICE) for a, t in tensors.items()})
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expect = ref(qd, kd, vd, **tensors)
    assert (out.detach().cpu().double() - expect).abs().max().item() < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(g.to(out.device, out.dtype))
    expect.backward(g.double())
    for a, b in ((q, qd), (k, kd), (v, vd)):
        assert (a.grad.cpu().double() - b.grad).abs().max().item() < tol
    return fn


def test_duo_attention_forward_and_gradients_gqa(tmp_path):
    path = _spec(tmp_path, DUO, "duo")
    ret = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    fn = _check(path, {"N": 100}, heads=4, hkv=2, tensors={"retrieval": ret})
    # Per head, the reference mask: retrieval heads see the causal past, the others sinks and a window.
    full, streaming = fn.mask(head=0, retrieval=ret), fn.mask(head=1, retrieval=ret)
    assert torch.equal(full, torch.ones(100, 100, dtype=torch.bool).tril())
    assert streaming.sum() < full.sum() and torch.equal(fn.mask(head=2, retrieval=ret), streaming)


def test_head_against_a_parameter(tmp_path):
    path = _spec(tmp_path, FIRST, "first_heads")
    _check(path, {"N": 70, "R": 2}, heads=3, hkv=3, tensors={}, tiles=(16, 32), seed=3)


def test_per_head_schedule_skips_tiles(tmp_path):
    fn = attnc.compile(_spec(tmp_path, FIRST, "first_heads"), tiles=(16, 16), N=128, R=1)
    assert not fn.compiled.schedule.exact  # compiled: the head is unknown, the window tiles PARTIAL
    cls = head_classes(fn.compiled.schedule, {}, 2)
    assert (cls[0] == FULL).sum() > 0 and (cls[1] != EMPTY).sum() < (cls[0] != EMPTY).sum()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 80), ret=st.lists(st.integers(0, 1), min_size=3, max_size=3),
       s=st.integers(0, 20), w=st.integers(1, 40), tiles=st.sampled_from([(16, 16), (16, 32), (32, 16)]))
def test_per_head_classes_are_sound(tmp_path_factory, n, ret, s, w, tiles):
    path = _spec(tmp_path_factory.mktemp("duo"), DUO, "duo")
    fn = attnc.compile(path, tiles=tiles, N=n, S=s, W=w)
    table = np.array(ret)
    cls = head_classes(fn.compiled.schedule, {"retrieval": table}, 3)
    static = fn.compiled.schedule.classes
    for h in range(3):
        truth = _truth(fn.mask(head=h, retrieval=torch.from_numpy(table)).numpy(), *tiles)
        for got in (cls[h], static):
            assert not ((got == EMPTY) & (truth != EMPTY)).any()
            assert not ((got == FULL) & (truth != FULL)).any()


def test_flex_mask_mod_reads_the_head(tmp_path):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention import flex_attention as fa

    fn = attnc.compile(_spec(tmp_path, DUO, "duo"), N=40, W=5)
    ret = torch.tensor([0, 1], dtype=torch.int32)
    export = fn.to_flex(block_size=16, retrieval=ret)
    dense = fa.create_mask(export.mask_mod, 1, 2, 40, 40, device="cpu")[0]
    for h in range(2):
        assert torch.equal(dense[h], fn.mask(head=h, retrieval=ret))


def test_head_mask_errors(tmp_path):
    fn = attnc.compile(_spec(tmp_path, FIRST, "first_heads"), backend="reference", N=16)
    with pytest.raises(AttncError, match="head"):
        fn.mask()
    routed = FIRST.replace("    mask", "    route = top(1) of blocks(4) by q @ mean(k)\n    mask")
    with pytest.raises(AttncError, match="routed"):
        attnc.compile(_spec(tmp_path, routed, "routed"), N=16)
    counted = FIRST.replace("    mask", "    score = softmax(scale = 1.0 / n_visible)\n    mask")
    with pytest.raises(AttncError, match="n_visible"):
        attnc.compile(_spec(tmp_path, counted, "counted"), N=16)
    sized = "attention bad(N) {\n    q, kv = seq(N + head)\n}\n"
    with pytest.raises(AttncError):
        attnc.compile(_spec(tmp_path, sized, "bad"), N=16)
