"""Token orders (analysis/orders.py) and how layouts are chosen (analysis/layout.py).

Orders are permutations with the structure their names promise (boxes are boxes, Hilbert steps
are unit steps, dilation groups are contiguous); every named layout leaves results unchanged
against the float64 reference; the cost model never picks something costlier than row-major by
its own figures; names force layouts, and unknown names are refused with the names listed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.analysis import layout as L
from attnc.analysis import orders as O
from attnc.analysis.tiles import FULL, analyse
from attnc.ir.bind import bind
from attnc.pipeline import parse
from tests import oracles
from tests.test_specs import SPECS, _qkv

dims_st = st.lists(st.integers(1, 13), min_size=1, max_size=3).map(tuple)


def _coords(perm: np.ndarray, dims) -> np.ndarray:
    """[N, ndim] coordinates of the tokens in kernel order."""
    return np.stack(np.unravel_index(perm, dims), axis=1)


@settings(max_examples=60, deadline=None)
@given(dims=dims_st, data=st.data())
def test_every_order_is_a_permutation(dims, data):
    n, nd = math.prod(dims), len(dims)
    box = tuple(data.draw(st.integers(1, 9), label="box") for _ in range(nd))
    offset = tuple(data.draw(st.integers(0, b - 1), label="offset") for b in box)
    dil = tuple(data.draw(st.integers(1, 4), label="dilation") for _ in range(nd))
    perms = {
        "row_major": O.row_major(dims), "boxes": O.boxes(dims, box), "boxes_offset": O.boxes(dims, box, offset),
        "morton": O.morton(dims), "hilbert": O.hilbert(dims), "morton_boxes": O.morton(dims, box),
        "hilbert_boxes": O.hilbert(dims, box), "dilation": O.dilation_groups(dims, dil),
        "dilation_boxes": O.dilation_groups(dims, dil, "boxes", box),
        "dilation_hilbert": O.dilation_groups(dims, dil, "hilbert"),
    }
    for name, perm in perms.items():
        assert perm.dtype == np.int64, name
        assert O.is_permutation(perm, n), (name, dims, box, dil)
    np.testing.assert_array_equal(perms["row_major"], np.arange(n))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_box_tiling_makes_each_aligned_run_a_box(data):
    nd = data.draw(st.integers(1, 3))
    box = tuple(data.draw(st.sampled_from([1, 2, 4, 8])) for _ in range(nd))
    dims = tuple(b * data.draw(st.integers(1, 4)) for b in box)
    perm = O.boxes(dims, box)
    vol = math.prod(box)
    c = _coords(perm, dims)
    for start in range(0, len(perm), vol):
        run = c[start:start + vol]
        lo = run.min(axis=0)
        assert (lo % box == 0).all() and (run.max(axis=0) - lo + 1 == box).all()
        # row-major inside the box
        assert (np.diff(np.ravel_multi_index((run - lo).T, box)) == 1).all()


@settings(max_examples=40, deadline=None)
@given(dims=dims_st, data=st.data())
def test_ragged_boxes_are_contiguous_and_row_major_inside(dims, data):
    box = tuple(data.draw(st.integers(1, 6)) for _ in dims)
    offset = tuple(data.draw(st.integers(0, b - 1)) for b in box)
    perm = O.boxes(dims, box, offset)
    c = _coords(perm, dims)
    which = (c + np.array(offset)) // np.array(box)
    ids = np.ravel_multi_index(which.T, [-(-(d + o) // b) for d, o, b in zip(dims, offset, box)])
    assert (np.diff(ids) >= 0).all()  # each box contiguous, boxes in row-major order
    same = np.diff(ids) == 0
    assert (np.diff(perm)[same] > 0).all()  # row-major inside


@pytest.mark.parametrize("dims", [(2, 2), (8, 8), (32, 32), (4, 4, 4), (8, 8, 8), (16,)])
def test_hilbert_steps_are_unit_steps_on_power_of_two_grids(dims):
    c = _coords(O.hilbert(dims), dims)
    assert (np.abs(np.diff(c, axis=0)).sum(axis=1) == 1).all()


@pytest.mark.parametrize("dims,run", [((16, 16), 4), ((16, 16), 64), ((8, 8, 8), 8), ((8, 8, 8), 64)])
def test_curves_cut_power_of_two_grids_into_cubes(dims, run):
    side = round(run ** (1 / len(dims)))
    for perm in (O.morton(dims), O.hilbert(dims)):
        c = _coords(perm, dims)
        for start in range(0, len(perm), run):
            block = c[start:start + run]
            lo = block.min(axis=0)
            assert (lo % side == 0).all() and (block.max(axis=0) - lo + 1 == side).all()


@settings(max_examples=30, deadline=None)
@given(dims=st.lists(st.integers(1, 17), min_size=2, max_size=3).map(tuple), data=st.data())
def test_non_power_of_two_curves_keep_the_bounding_grid_order(dims, data):
    """Out-of-range points dropped: the order is the bounding power-of-two grid's, restricted."""
    big = tuple(1 << max(1, (max(dims) - 1).bit_length()) for _ in dims)
    for fn in (O.morton, O.hilbert):
        full = _coords(fn(big), big)
        inside = full[(full < np.array(dims)).all(axis=1)]
        np.testing.assert_array_equal(_coords(fn(dims), dims), inside)


@settings(max_examples=40, deadline=None)
@given(dims=dims_st, data=st.data())
def test_dilation_groups_are_contiguous_and_row_major_inside(dims, data):
    dil = tuple(data.draw(st.integers(1, 4)) for _ in dims)
    perm = O.dilation_groups(dims, dil)
    c = _coords(perm, dims)
    group = np.ravel_multi_index((c % np.array(dil)).T, dil)
    assert (np.diff(group) >= 0).all()
    same = np.diff(group) == 0
    assert (np.diff(perm)[same] > 0).all()


def test_bad_order_arguments_are_refused():
    with pytest.raises(ValueError):
        O.boxes((4, 4), (2,))
    with pytest.raises(ValueError):
        O.boxes((4, 4), (0, 2))
    with pytest.raises(ValueError):
        O.dilation_groups((4, 4), 0)
    with pytest.raises(ValueError):
        O.row_major((0, 3))


# -- layouts of specs ----------------------------------------------------------------------------
def _bound(spec: str, **params):
    return bind(parse(SPECS / f"{spec}.attn").ir, params)


# (spec, params, oracle mask); sizes small enough for the interpreter, 16-token tiles.
RUNS = [
    ("natten2d", dict(H=9, W=11, kernel=3, dilation=2), lambda: oracles.natten2d_mask(9, 11, 3, 2)),
    ("gna3d_video", dict(T=3, H=8, W=9),
     lambda: oracles.gna_mask((3, 8, 9), (3, 7, 7), (1, 1, 1), (1, 2, 2), (True, False, False))),
    ("scale_dit", dict(H=12, W=8), lambda: oracles.scale_dit_mask(12, 8)),
    ("maxvit_grid", dict(H=8, W=12, G=2), lambda: oracles.maxvit_grid_mask(8, 12, 2)),
    ("swin_shifted", dict(H=14, W=14), lambda: oracles.swin_shifted_mask(14, 14, 7, 3)),
]


def _names(spec, params):
    cands = L.candidates(_bound(spec, **params), 16, 16)
    families = sorted({c.family for c in cands} - {L.ROW_MAJOR})
    return [c.name for c in cands] + families


@pytest.mark.parametrize("spec,params,oracle", RUNS, ids=[r[0] for r in RUNS])
def test_results_unchanged_under_every_named_layout(spec, params, oracle, device):
    path = SPECS / f"{spec}.attn"
    ref = attnc.compile(path, backend="reference", **params)
    nq, nk = ref.compiled.bound.nq, ref.compiled.bound.nk
    q, k, v = _qkv(nq, nk, heads=1, d=16)
    expect = ref(q.double(), k.double(), v.double())
    dense = oracle()
    names = _names(spec, params)
    assert len(names) > 3
    seen = set()
    for name in names:
        fn = attnc.compile(path, layout=name, tiles=(16, 16), **params)
        assert fn.layout.name == name or fn.layout.name.split("_")[0] == name
        orders = (fn.layout.q_perm.tobytes(), fn.layout.kv_perm.tobytes())
        if orders in seen:  # a family name resolves to one of its members: run each order once
            continue
        seen.add(orders)
        with torch.no_grad():
            out = fn(q.to(device), k.to(device), v.to(device))
        torch.testing.assert_close(out.cpu().double(), expect, atol=2e-5, rtol=2e-5, msg=name)
        # Tile classes are sound in kernel positions.
        perm = dense[fn.layout.q_perm][:, fn.layout.kv_perm]
        classes = fn.tile_map().numpy()
        for a, b in zip(*np.nonzero(classes != 1)):
            block = perm[a * 16:(a + 1) * 16, b * 16:(b + 1) * 16]
            assert block.all() if classes[a, b] == FULL else not block.any(), (name, a, b)


def test_forcing_each_name_gives_that_layout():
    b = _bound("natten2d", H=40, W=40, kernel=7, dilation=2)
    cands = L.candidates(b, 64, 64)
    families = {c.family for c in cands}
    assert {"row_major", "boxes", "morton", "hilbert", "dilation"} <= families
    for c in cands:
        lay = L.choose(b, c.name, 64, 64, analyse)
        assert lay.name == c.name
        assert O.is_permutation(lay.q_perm, b.nq) and O.is_permutation(lay.kv_perm, b.nk)
    for fam in families - {"row_major"}:
        lay = L.choose(b, fam, 64, 64, analyse)
        assert lay.name.split("_")[0] == fam
        members = [f for f in lay.candidates if not f["skipped"]]
        if len(members) > 1:  # a family with several members gives its cheapest
            assert lay.name == min(members, key=lambda f: f["cost"])["name"]
    fn = attnc.compile(SPECS / "natten2d.attn", layout="hilbert", H=40, W=40, kernel=7, dilation=2)
    np.testing.assert_array_equal(fn.layout.q_order.numpy(), O.hilbert((40, 40)))
    assert fn.layout.q_order.dtype == torch.int64


def test_unknown_and_inapplicable_names_are_refused_with_the_names():
    with pytest.raises(AttncError, match="unknown layout 'zorder'.*row_major.*boxes.*morton.*hilbert.*dilation"):
        attnc.compile(SPECS / "natten2d.attn", layout="zorder", H=16, W=16, kernel=3)
    with pytest.raises(AttncError, match="'dilation' does not apply.*candidates are: row_major"):
        attnc.compile(SPECS / "natten2d.attn", layout="dilation", H=16, W=16, kernel=3)
    with pytest.raises(AttncError, match="unknown layout"):
        attnc.compile(SPECS / "causal.attn", layout=3, N=64)


AUTO = [
    ("natten2d", dict(H=48, W=48, kernel=7, dilation=1), (16, 16)),
    ("natten2d", dict(H=64, W=64, kernel=13, dilation=1), (64, 64)),  # permuting does not pay here
    ("natten2d", dict(H=128, W=128, kernel=13, dilation=1), (64, 64)),
    ("natten2d", dict(H=40, W=56, kernel=5, dilation=2), (32, 32)),
    ("gna3d_video", dict(T=8, H=24, W=24), (64, 64)),
    ("scale_dit", dict(H=64, W=64), (64, 64)),
    ("maxvit_grid", dict(H=64, W=64, G=8), (64, 64)),
    ("swin_shifted", dict(H=112, W=112), (64, 64)),
]


@pytest.mark.parametrize("spec,params,tiles", AUTO, ids=[a[0] for a in AUTO])
def test_auto_never_picks_something_costlier_than_row_major(spec, params, tiles):
    b = _bound(spec, **params)
    lay = L.choose(b, "auto", *tiles, analyse)
    figs = {f["name"]: f for f in lay.figures()}
    assert figs, "these sizes are large enough to weigh candidates"
    rm = figs["row_major"]
    chosen = figs[lay.name]
    assert chosen["chosen"] and sum(f["chosen"] for f in figs.values()) == 1
    assert chosen["cost"] <= rm["cost"]
    assert all(f["skipped"] or f["cost"] >= chosen["cost"] for f in figs.values())
    if lay.name != L.ROW_MAJOR:
        assert chosen["cost"] < rm["cost"]
    # The figures are the model's own: recomputed from a fresh analysis of the chosen order.
    s = analyse(b, *tiles, lay)
    full, partial = L.tile_counts(s)
    assert (chosen["full"], chosen["partial"]) == (full, partial)
    assert chosen["cost"] == round(L.cost(full, partial, *tiles, lay), 2)
    assert chosen["efficiency"] == pytest.approx(s.stats()["tile_efficiency"])


def test_auto_prefers_boxes_for_neighbourhoods_and_reuses_the_analysis():
    fn = attnc.compile(SPECS / "natten2d.attn", H=128, W=128, kernel=13, dilation=1)
    assert fn.layout.name != "row_major"
    figs = {f["name"]: f for f in fn.layout.figures()}
    assert figs[fn.layout.name]["efficiency"] > 2 * figs["row_major"]["efficiency"]
    assert fn.compiled.schedule is fn.layout.analysed(fn.compiled.bound, 64, 64)
    # The reference backend has no kernels to weigh orders for.
    assert attnc.compile(SPECS / "natten2d.attn", backend="reference", H=128, W=128, kernel=13).layout.name == "row_major"


@pytest.mark.parametrize("spec,params", [
    ("causal", dict(N=4096)),  # 1-D, no dilation or blocks: row-major is the best 1-D order
    ("sliding_window", dict(N=4096, W=256)),
    ("natten2d", dict(H=13, W=17, kernel=5, dilation=2)),  # too small for a permutation to pay
])
def test_auto_keeps_row_major_without_weighing_when_nothing_can_win(spec, params):
    lay = L.choose(_bound(spec, **params), "auto", 64, 64, analyse)
    assert lay.name == "row_major" and lay.identity and lay.candidates == []


def test_candidates_follow_the_mask():
    names = lambda spec, **p: [c.name for c in L.candidates(_bound(spec, **p), 64, 64)]
    assert "dilation" in names("natten2d", H=32, W=32, kernel=5, dilation=2)
    assert "dilation" not in names("natten2d", H=32, W=32, kernel=5, dilation=1)
    assert "dilation" in names("maxvit_grid", H=32, W=32, G=4)  # same y mod (H / G): groups
    assert "boxes_7x7_shift4x4" in names("swin_shifted", H=28, W=28)  # windows at (c + 4) // 7
    # NATTEN's q 4x16 / kv 8x8 (or its transpose) ranks first for a 7x7 window.
    assert names("natten2d", H=128, W=128, kernel=7, dilation=1)[1] in ("boxes_8x8_4x16", "boxes_4x16_8x8")
    assert names("causal", N=100) == ["row_major"]
    # Segmented keys: each segment ordered alone, segments kept contiguous.
    b = _bound("scale_dit", H=16, W=16)
    lay = L.choose(b, "hilbert", 64, 64)
    hi, lo = b.kv_parts
    assert set(lay.kv_perm[:hi.size]) == set(range(hi.size))
    np.testing.assert_array_equal(lay.kv_perm[hi.size:], lo.offset + O.hilbert(lo.dims))
