"""Per-call schedules for masks that read runtime tensors (issue 9, item 3): tiles classified
with the call's data are sound against brute force for any ids, exact for packed documents
(every tile inside one document and under the diagonal is FULL), and the kernel that runs
them matches the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.analysis.data import RangeTable
from attnc.analysis.tiles import EMPTY, FULL, PARTIAL
from tests import oracles
from tests.test_specs import SPECS, _qkv


def _truth(dense: np.ndarray, bm: int, bn: int):
    """Brute-force classes per tile: EMPTY, FULL (all visible, not ragged) or PARTIAL."""
    nq, nk = dense.shape
    out = np.zeros((-(-nq // bm), -(-nk // bn)), dtype=np.int8)
    for t in range(out.shape[0]):
        for u in range(out.shape[1]):
            block = dense[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            out[t, u] = EMPTY if not block.any() else FULL if block.all() and (u + 1) * bn <= nk else PARTIAL
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 160), ids=st.lists(st.integers(0, 5), min_size=160, max_size=160),
       tiles=st.sampled_from([(16, 16), (16, 32), (32, 16)]), sort=st.booleans())
def test_per_call_classes_are_sound(n, ids, tiles, sort):
    doc = np.array(ids[:n])
    doc = np.sort(doc) if sort else doc
    fn = attnc.compile(SPECS / "document_causal.attn", tiles=tiles, N=n)
    got = fn.tile_map(doc=torch.from_numpy(doc)).numpy()
    truth = _truth(oracles.document_causal_mask(doc), *tiles)
    assert not ((got == EMPTY) & (truth != EMPTY)).any()
    assert not ((got == FULL) & (truth != FULL)).any()
    if sort:  # packed documents: every truly FULL tile is found (ids fill their ranges)
        contiguous = np.all(np.diff(np.unique(doc)) == 1)
        if contiguous:
            assert ((got == FULL) == (truth == FULL)).all()


def test_packed_documents_get_full_tiles():
    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 900, size=40)
    doc = np.repeat(np.arange(len(lengths)), lengths)[:8192]
    fn = attnc.compile(SPECS / "document_causal.attn", N=len(doc))
    got = fn.tile_map(doc=torch.from_numpy(doc)).numpy()
    truth = _truth(oracles.document_causal_mask(doc), 64, 64)
    assert ((got == FULL) == (truth == FULL)).all()
    assert (got == FULL).sum() > 0.5 * (got != EMPTY).sum()  # most computed tiles need no mask
    assert ((got == EMPTY) == (truth == EMPTY)).all()


@pytest.mark.parametrize("n", [70, 200])
def test_kernel_runs_the_per_call_schedule(n, device):
    rng = np.random.default_rng(n)
    doc = np.sort(rng.integers(0, 4, size=n))
    fn = attnc.compile(SPECS / "document_causal.attn", tiles=(16, 16), N=n)
    q, k, v = _qkv(n, n, device=device, seed=n)
    with torch.no_grad():
        out = fn(q, k, v, doc=torch.from_numpy(doc).to(device)).cpu().double()
    expect = oracles.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), oracles.document_causal_mask(doc))
    assert (out - expect).abs().max().item() < 1e-4


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-50, 50), min_size=1, max_size=70), data=st.data())
def test_range_table_matches_brute_force(values, data):
    table = RangeTable(np.array(values))
    n = len(values)
    lo = np.array(data.draw(st.lists(st.integers(-3, n + 3), min_size=1, max_size=20)))
    hi = np.array(data.draw(st.lists(st.integers(-3, n + 3), min_size=len(lo), max_size=len(lo))))
    got_lo, got_hi = table.query(lo, hi)
    for a, b, x, y in zip(lo, hi, got_lo, got_hi):
        a, b = sorted((min(max(a, 0), n - 1), min(max(b, 0), n - 1)))
        assert (x, y) == (min(values[a:b + 1]), max(values[a:b + 1]))
