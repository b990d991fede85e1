"""Symbolic tile analysis on every spec in specs/: sound against brute force (never EMPTY when a
pair is visible, never FULL when one is hidden or the tile is ragged), and, in row-major order,
rarely conservative (a PARTIAL tile that brute force would call EMPTY or FULL): none for most
specs, a few tiles for dilated windows, where `i % d` over a range of tokens loses the groups.
The property tests (test_properties*.py) cover random specs. `python -m bench.conservative`
prints the rates."""
from __future__ import annotations

import numpy as np
import pytest

import attnc
from attnc.analysis.tiles import EMPTY, FULL, PARTIAL
from tests.test_specs import CASES, SPECS

EXTRA = [
    ("swin_bias", dict(H=28, W=28)),
    ("alibi_causal", dict(N=150)),
    ("softcap_sink", dict(N=300, W=50)),
    ("natten2d", dict(H=32, W=30, kernel=7, dilation=2)),
    ("gna3d_video", dict(T=5, H=16, W=12)),
    ("longformer", dict(N=700, W=40, G=5)),
]
ALL = [(name, params) for name, params, _ in CASES] + EXTRA


def conservative_tiles(fn, dense: np.ndarray) -> tuple[int, int]:
    """(conservative PARTIAL tiles, PARTIAL tiles), asserting soundness on the way."""
    s = fn.schedule
    bm, bn = s.block_m, s.block_n
    classes = s.classes
    conservative = 0
    for t in range(s.q_tiles):
        for u in range(s.kv_tiles):
            block = dense[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            ragged = (u + 1) * bn > s.nk
            if classes[t, u] == EMPTY:
                assert not block.any(), (t, u)
            elif classes[t, u] == FULL:
                assert block.all() and not ragged, (t, u)
            else:
                conservative += int(not block.any() or (block.all() and not ragged))
    return conservative, int((classes == PARTIAL).sum())


@pytest.mark.parametrize("tiles", [(64, 64), (16, 32)])
@pytest.mark.parametrize("name,params", ALL, ids=[f"{n}-" + "-".join(map(str, p.values())) for n, p in ALL])
def test_row_major_analysis_is_exact(name, params, tiles):
    fn = attnc.compile(SPECS / f"{name}.attn", tiles=tiles, **params)
    dense = attnc.compile(SPECS / f"{name}.attn", backend="reference", **params).mask().numpy()
    conservative, partial = conservative_tiles(fn, dense)
    dilated = params.get("dilation", 1) > 1
    assert conservative <= (0.05 * partial if dilated else 0), f"{conservative} of {partial} PARTIAL tiles are conservative"
    np.testing.assert_array_equal(fn.schedule.row_counts, dense.sum(axis=1))


def test_runtime_data_tiles_are_sound():
    # Without the ids, tiles that depend on them are PARTIAL; the causal structure is still exact.
    fn = attnc.compile(SPECS / "document_causal.attn", tiles=(16, 16), N=100)
    s = fn.schedule
    assert not s.exact
    upper = np.triu(np.ones((s.q_tiles, s.kv_tiles), dtype=bool), 1)
    assert (s.classes[upper] == EMPTY).all() and (s.classes[~upper] == PARTIAL).all()


def test_huge_sizes_analyse_without_pairs():
    """A 1-D window at a million tokens: about 150 thousand tiles kept, exactly, without a dense
    tile map (16384 x 16384 int8 would be 256 MiB)."""
    src = "attention w(N, W) { q, kv = seq(N)  mask = abs(q.i - k.i) <= W }"
    fn = attnc.compile(src, N=2**20, W=256)
    s = fn.schedule
    assert s.q_tiles == 16384
    per_row = np.diff(s.full_ptr) + np.diff(s.part_ptr)
    # Tile t sees keys 64t - 256 .. 64t + 319: tiles t-3..t+3 FULL, t-4 and t+4 PARTIAL.
    assert per_row.max() == 9 and per_row.min() == 5
    assert s.tiles_full == 16384 * 7 - 2 * (3 + 2 + 1)  # rows 0..2 and the last three lose FULL tiles
    assert s.tiles_partial == 16384 * 2 - 2 * 4  # rows 0..3 and the last four have one PARTIAL tile


@pytest.mark.parametrize("mask", [
    "(q.i * P * P + q.i * P * P) // 2 >= P * P",
    "(min(q.i, 1) * P * P + min(k.i, 1) * P * P) // 2 >= P * P",
])
def test_integers_beyond_two_to_the_62_are_refused(mask):
    """Values between 2**62 and 2**63 fit int64 but not the analysis' headroom: refused, located,
    rather than classified from a clamped interval (a review found EMPTY tiles over visible pairs)."""
    src = f"attention ovf(N, P) {{\n    q, kv = seq(N)\n    mask = {mask}\n}}"
    with pytest.raises(attnc.AttncError, match=r"beyond \[-2\*\*62, 2\*\*62\]") as info:
        attnc.compile(src, N=100, P=2**31 - 1)
    assert info.value.line == 3
    # Within the bound the same masks are analysed soundly.
    fn = attnc.compile(src, tiles=(16, 32), N=100, P=2**27)
    dense = attnc.compile(src, backend="reference", N=100, P=2**27).mask().numpy()
    conservative_tiles(fn, dense)
