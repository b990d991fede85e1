"""Masks that read `batch` (issue 12): packed sequences with a different packing per sequence
of the batch, `doc[batch, q.i] == doc[batch, k.i]`.

The compiled schedule treats the batch index as unknown (sound); per call the host classifies
the mask per (sequence, head) (analysis/rows.py) and the kernels run one schedule per
(batch * head). Checked: per-row tile classes against brute force (never a wrong EMPTY or
FULL), forward and gradients against the float64 reference with B = 2 (GQA and `head`
included), fn.mask(batch=b), the Flex mask_mod, extents and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis.rows import row_classes
from attnc.analysis.tiles import EMPTY, FULL
from tests.conftest import DEVICE
from tests.test_data_schedules import _truth

DOCS = """attention docs(N) {
    q, kv = seq(N)
    mask  = causal and doc[batch, q.i] == doc[batch, k.i]
}
"""
MIXED = """attention mixed(N, W = 6) {
    q, kv = seq(N)
    mask  = causal and (doc[batch, q.i] == doc[batch, k.i] or head < batch and q.i - k.i < W)
}
"""


def _spec(tmp_path, text, name):
    path = tmp_path / f"{name}.attn"
    path.write_text(text)
    return path


def _packed(n, lengths):
    """Document ids of one packed sequence: runs of the given lengths (the last one fills up)."""
    ids = np.repeat(np.arange(len(lengths)), lengths)[:n]
    return np.concatenate([ids, np.full(n - len(ids), len(lengths))])


def _check(path, n, heads, hkv, doc, tiles=(16, 16), seed=0, tol=1e-4):
    fn = attnc.compile(path, tiles=tiles, N=n)
    ref = attnc.compile(path, backend="reference", N=n)
    g = torch.Generator().manual_seed(seed)
    b = doc.shape[0]
    q, k, v = (torch.randn(b, h, n, 32, generator=g) for h in (heads, hkv, hkv))
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, doc=doc.to(DEVICE))
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expect = ref(qd, kd, vd, doc=doc)
    assert (out.detach().cpu().double() - expect).abs().max().item() < tol
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(out.device, out.dtype))
    expect.backward(grad.double())
    for a, e in ((q, qd), (k, kd), (v, vd)):
        assert (a.grad.cpu().double() - e.grad).abs().max().item() < tol
    return fn


def test_per_sequence_documents_forward_and_gradients(tmp_path):
    n = 80
    doc = torch.from_numpy(np.stack([_packed(n, [10, 40, 5]), _packed(n, [33, 17])])).to(torch.int32)
    fn = _check(_spec(tmp_path, DOCS, "docs"), n, heads=2, hkv=1, doc=doc)
    for b in range(2):  # each sequence its own packing
        d = doc[b].numpy()
        truth = np.tril(d[:, None] == d[None, :])
        assert np.array_equal(fn.mask(batch=b, doc=doc).numpy(), truth)
    assert not torch.equal(fn.mask(batch=0, doc=doc), fn.mask(batch=1, doc=doc))


def test_batch_with_head_and_arithmetic(tmp_path):
    n = 48
    doc = torch.from_numpy(np.stack([_packed(n, [12, 20]), _packed(n, [7, 7, 7])])).to(torch.int32)
    _check(_spec(tmp_path, MIXED, "mixed"), n, heads=2, hkv=2, doc=doc, tiles=(16, 32), seed=2)


def test_per_sequence_schedules_skip_tiles(tmp_path):
    fn = attnc.compile(_spec(tmp_path, DOCS, "docs"), tiles=(16, 16), N=128)
    assert not fn.compiled.schedule.exact
    doc = np.stack([_packed(128, [64, 64]), _packed(128, [32] * 4)])
    cls = row_classes(fn.compiled.schedule, {"doc": doc}, 1, 2)
    assert (cls[0, 0] != EMPTY).sum() > (cls[1, 0] != EMPTY).sum() > 0
    assert (cls[0, 0] == FULL).sum() > 0 and (cls[1, 0] == FULL).sum() > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 80), ids=st.lists(st.integers(0, 4), min_size=160, max_size=160),
       sort=st.booleans(), tiles=st.sampled_from([(16, 16), (16, 32), (32, 16)]))
def test_per_row_classes_are_sound(tmp_path_factory, n, ids, sort, tiles):
    path = _spec(tmp_path_factory.mktemp("mixed"), MIXED, "mixed")
    fn = attnc.compile(path, tiles=tiles, N=n)
    doc = np.array(ids).reshape(2, 80)[:, :n]
    doc = np.sort(doc, axis=1) if sort else doc
    cls = row_classes(fn.compiled.schedule, {"doc": doc}, 2, 2)
    static = fn.compiled.schedule.classes
    for b in range(2):
        for h in range(2):
            truth = _truth(fn.mask(batch=b, head=h, doc=torch.from_numpy(doc)).numpy(), *tiles)
            for got in (cls[b, h], static):
                assert not ((got == EMPTY) & (truth != EMPTY)).any()
                assert not ((got == FULL) & (truth != FULL)).any()


def test_flex_mask_mod_reads_the_batch(tmp_path):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention import flex_attention as fa

    fn = attnc.compile(_spec(tmp_path, DOCS, "docs"), N=40)
    doc = torch.from_numpy(np.stack([_packed(40, [10, 30]), _packed(40, [25])])).to(torch.int32)
    export = fn.to_flex(block_size=16, doc=doc)
    dense = fa.create_mask(export.mask_mod, 2, 1, 40, 40, device="cpu")
    for b in range(2):
        assert torch.equal(dense[b, 0], fn.mask(batch=b, doc=doc))


def test_batch_errors(tmp_path):
    path = _spec(tmp_path, DOCS, "docs")
    fn = attnc.compile(path, backend="reference", N=16)
    doc = torch.zeros(2, 16, dtype=torch.int32)
    with pytest.raises(AttncError, match="batch"):
        fn.mask(doc=doc)
    with pytest.raises(AttncError, match="batch index"):
        fn.mask(batch=-1, doc=doc)
    with pytest.raises(AttncError, match="shape"):  # one row per sequence of the call
        fn(*(torch.randn(3, 1, 16, 8) for _ in range(3)), doc=doc)
    with pytest.raises(AttncError, match="shape"):
        fn.mask(batch=2, doc=doc)
    for text, match in (
            ("attention p(N, batch = 2) {\n    q, kv = seq(N)\n}\n", "reserved"),
            ("attention p(N) {\n    q, kv = seq(N)\n    bias = 1.0 * batch\n}\n", "only defined in the mask"),
            (DOCS.replace("    mask", "    route = top(1) of blocks(4) by q @ mean(k)\n    mask"), "routed"),
            (DOCS.replace("    mask", "    score = softmax(scale = 1.0 / n_visible)\n    mask"), "n_visible"),
            ("attention p(N) {\n    q, kv = seq(N)\n    mask = batch[q.i] == 0\n}\n", "batch")):
        with pytest.raises(AttncError, match=match):
            attnc.compile(_spec(tmp_path, text, "p"), N=16)
