"""Token parts (codegen/parts.py): the one-sided sub-expressions of the mask and bias are
computed per token on the host, and the per-pair functions only combine them. Checked: no
spec's pair functions decode a coordinate any more; parts are found per key segment; and the
kernels stay exact against the float64 reference where a part divides by zero at tokens that a
guard rules out, and under permuting layouts."""
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnc
from attnc.backends.triton.host import token_part_values
from attnc.codegen.parts import token_parts, window_range
from attnc.ir import nodes as N
from attnc.ir.evaluate import evaluate
from bench.kernel_quality import PARAMS
from tests.conftest import DEVICE


def _bodies(src: str) -> dict[str, str]:
    out = {}
    for name in ("visible", "logit_bias"):
        if f"def {name}(" in src:
            body = src[src.index(f"def {name}("):]
            out[name] = body[:body.index("@triton.jit")]
    return out


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_pair_functions_decode_no_coordinates(name):
    """Grid coordinates (`q_y = q_i % W`, ...) come in as parts; a pair function computes only
    what mixes a query and a key."""
    fn = attnc.compile(f"specs/{name}.attn", **PARAMS[name])
    for what, body in _bodies(fn.kernel_source).items():
        assert not re.search(r"\b[qk]\d*_[txy] = ", body), f"{name}: {what} decodes coordinates"


def test_parts_are_found_per_key_segment():
    fn = attnc.compile("specs/scale_dit.attn", H=12, W=8)
    got = {(p.side, p.segment, str(p.expr)) for p in token_parts(fn.ir)}
    assert {p.side for p in token_parts(fn.ir)} == {"q", "k"}
    assert all(seg == "hi" for side, seg, _ in got if side == "k")  # `lo` keys read no coordinate
    rows, cols = token_part_values(fn.compiled)
    assert rows.shape == (2, 96) and cols.shape == (2, 96 + 6)
    assert (cols[:, 96:] == 0).all()  # keys outside the part's segment hold 0, never read


def _reference(fn, q, k, v):
    ref = attnc.compile(fn.spec, backend="reference", **fn.params)
    return ref(q.double(), k.double(), v.double())


@pytest.mark.parametrize("layout", ["row_major", "auto"])
def test_guarded_division_by_zero_in_a_part(layout):
    """`12 // k.x` divides by zero at keys with x = 0, where the guard `k.x > 0` rules the pair
    out: the host fills an unused value instead of failing, and the kernel matches float64."""
    spec = """attention a(H, W) {
        q, kv = grid(H, W)
        mask  = (k.x > 0 and 12 // k.x >= q.x % 3) or (q.y // 2 == k.y // 2 and k.x == 0)
    }"""
    fn = attnc.compile(spec, tiles=(16, 16), layout=layout, H=6, W=7)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 42, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu().double()
    assert torch.allclose(out, _reference(fn, q, k, v), atol=2e-5)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 40), data=st.data())
def test_window_range_test_is_the_window(n, data):
    """The kernels' one range test (parts.window_range) holds exactly where the window's
    definition (Window.expand, the reference's) does, for every query and key of an axis."""
    d = data.draw(st.integers(1, n // 2), label="dilation")
    k = data.draw(st.integers(2, n // d), label="kernel")
    s = data.draw(st.integers(1, k), label="stride")
    causal = data.draw(st.booleans(), label="causal")
    w = N.Window("i", N.Const(n), N.Const(k), N.Const(d), N.Const(s), causal)
    coords = {("q", "i"): np.arange(n)[:, None], ("k", "i"): np.arange(n)[None, :]}
    code, lo, length = (np.asarray(evaluate(x, {}, coords)) for x in window_range(w))
    inside = (code - lo >= 0) & (code - lo < length)
    assert (inside == np.asarray(evaluate(w.expand(), {}, coords))).all()
    assert code.max() < 2 * n and (np.asarray(lo) + np.asarray(length)).max() <= 2 * n  # int32 for n < 2**30


def test_a_sub_expression_that_reads_the_batch_index_is_not_a_part():
    """`q.y + batch` reads one side's coordinates but changes per sequence: the host cannot
    compute it once per token (it raised a KeyError), so the kernel computes it. Found in review."""
    spec = """attention a(H, W) {
        q, kv = grid(H, W)
        mask  = abs(q.y + batch - k.y) <= 1 and abs(q.x - k.x) <= 2
    }"""
    fn = attnc.compile(spec, tiles=(16, 16), H=6, W=7)
    assert all("batch" not in str(p.expr).lower() for p in token_parts(fn.ir))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 42, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)).cpu().double()
    assert torch.allclose(out, _reference(fn, q, k, v), atol=2e-5)
