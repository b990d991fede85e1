"""Guards: `a and b` reads b only where a holds, `a or b` only where a fails (docs/language.md,
"Runtime tensors"). Specs whose right sides would index out of range or divide by zero where
the left side rules the pair out run on the reference and on the Triton kernels (interpreter on
CPU), and both match an independent numpy oracle written here. A runtime tensor used as a
divisor is refused at call time when it can be 0 where the mask reads it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnc
from attnc import AttncError
from attnc.ir.evaluate import mask_block


def _i_j(n_q: int, n_k: int):
    return np.arange(n_q)[:, None], np.arange(n_k)[None, :]


def _rand01(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g)


# (name, spec body, params, tensor maker(g, params), oracle(params, tensors as numpy) -> bool [Nq, Nk])
CASES = [
    ("bigbird_blocks", "q, kv = seq(N)\n mask = r[q.i // B, k.i // B] == 1", dict(N=48, B=8),
     lambda g, p: {"r": _rand01(g, 6, 6)},
     lambda p, t: t["r"][_i_j(48, 48)[0] // 8, _i_j(48, 48)[1] // 8] == 1),
    ("ancestors", "q, kv = seq(N)\n mask = k.i >= P and anc[q.i, k.i - P] == 1", dict(N=40, P=5),
     lambda g, p: {"anc": _rand01(g, 40, 35)},
     lambda p, t: _guarded(40, 40, lambda i, j: j >= 5, lambda i, j: t["anc"][i, j - 5] == 1)),
    ("or_guard", "q, kv = seq(N)\n mask = k.i < P or t[k.i - P] == 1", dict(N=40, P=6),
     lambda g, p: {"t": _rand01(g, 34)},
     lambda p, t: _guarded(40, 40, lambda i, j: j >= 6, lambda i, j: t["t"][j - 6] == 1, default=True)),
    ("flamingo_media", "q, kv = seq(N)\n mask = k.i <= q.i and iv[k.i // L, 0] == 1", dict(N=40, L=8),
     lambda g, p: {"iv": _rand01(g, 5, 1)},
     lambda p, t: (_i_j(40, 40)[1] <= _i_j(40, 40)[0]) & (t["iv"][_i_j(40, 40)[1] // 8, 0] == 1)),
    ("relative_distance", "q, kv = seq(N)\n mask = causal and d[q.i - k.i] == 1", dict(N=40),
     lambda g, p: {"d": _rand01(g, 40)},
     lambda p, t: _guarded(40, 40, lambda i, j: j <= i, lambda i, j: t["d"][i - j] == 1)),
    ("tensor_divisor_guarded", "q, kv = seq(N)\n mask = len[k.i] > 0 and q.i % len[k.i] == 0", dict(N=40),
     lambda g, p: {"len": torch.randint(0, 4, (40,), generator=g)},
     lambda p, t: _guarded(40, 40, lambda i, j: t["len"][j] > 0, lambda i, j: i % t["len"][j] == 0)),
    ("coordinate_divisor_guarded", "q, kv = seq(N)\n mask = k.i > 0 and q.i % k.i == 0", dict(N=40),
     lambda g, p: {},
     lambda p, t: _guarded(40, 40, lambda i, j: j > 0, lambda i, j: i % j == 0)),
    ("floor_of_negatives", "q, kv = seq(N)\n mask = (k.i - q.i) // M == -1 or (q.i - k.i) % M == 0", dict(N=40, M=6),
     lambda g, p: {},
     lambda p, t: ((_i_j(40, 40)[1] - _i_j(40, 40)[0]) // 6 == -1) | ((_i_j(40, 40)[0] - _i_j(40, 40)[1]) % 6 == 0)),
    ("video_clips", "q, kv = grid(T, H, W)\n mask = clip[q.t // F] == clip[k.t // F]", dict(T=6, H=2, W=3, F=2),
     lambda g, p: {"clip": torch.tensor([0, 0, 1])},
     lambda p, t: _clip_oracle(t["clip"])),
]


def _guarded(nq, nk, guard, then, default=False):
    out = np.full((nq, nk), default)
    for i in range(nq):
        for j in range(nk):
            g = guard(i, j)
            if g:
                out[i, j] = bool(then(i, j))
    return out


def _clip_oracle(clip):
    t = np.arange(6 * 2 * 3) // (2 * 3)
    return clip[t[:, None] // 2] == clip[t[None, :] // 2]


def _oracle_attention(mask, q, k, v):
    """float64 softmax attention over visible keys; rows that see nothing output 0."""
    s = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mask, np.exp(s - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    return (p @ v) / np.where(denom == 0, 1.0, denom)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter divides by zero where a guard rules out
@pytest.mark.parametrize("name,body,params,make,oracle", CASES, ids=[c[0] for c in CASES])
def test_guarded_specs_match_the_oracle_on_both_backends(name, body, params, make, oracle, device):
    src = f"attention {name}({', '.join(params)}) {{\n {body}\n}}"
    g = torch.Generator().manual_seed(len(name))
    tensors = make(g, params)
    expect_mask = oracle(params, {n: t.numpy() for n, t in tensors.items()})
    ref = attnc.compile(src, backend="reference", **params)
    fn = attnc.compile(src, tiles=(16, 16), **params)
    nq, nk = expect_mask.shape
    for f in (ref, fn):
        np.testing.assert_array_equal(f.mask(**tensors).numpy(), expect_mask)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    expect = _oracle_attention(expect_mask, q.numpy(), k.numpy(), v.numpy())
    np.testing.assert_allclose(ref(q, k, v, **tensors).numpy(), expect, atol=1e-10)
    with torch.no_grad():
        out = fn(q.float().to(device), k.float().to(device), v.float().to(device),
                 **{n: t.to(device) for n, t in tensors.items()})
    np.testing.assert_allclose(out.cpu().double().numpy(), expect, atol=2e-5)


def test_a_bias_table_read_only_where_visible():
    """The mask guards the bias: a table that covers only the visible pairs is enough."""
    src = "attention a(N, P) { q, kv = seq(N)\n mask = k.i >= P\n bias = tab[k.i - P] }"
    g = torch.Generator().manual_seed(3)
    tab = torch.randn(35, generator=g, dtype=torch.float64)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = np.broadcast_to(np.arange(40)[None, :] >= 5, (40, 40))
    s = (q.numpy() @ k.numpy().transpose(0, 1, 3, 2)) / 4.0 + np.concatenate([np.zeros(5), tab.numpy()])[None, :]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    expect = (p / p.sum(axis=-1, keepdims=True)) @ v.numpy()
    ref = attnc.compile(src, backend="reference", N=40, P=5)
    np.testing.assert_allclose(ref(q, k, v, tab=tab).numpy(), expect, atol=1e-10)
    fn = attnc.compile(src, tiles=(16, 16), N=40, P=5)
    with torch.no_grad():
        out = fn(q.float(), k.float(), v.float(), tab=tab.float())
    np.testing.assert_allclose(out.double().numpy(), expect, atol=2e-5)


# -- the evaluator: errors only where the right side is live ----------------------------------------
def _bound(src, **params):
    return attnc.compile(src, backend="reference", **params).compiled.bound


def test_out_of_range_and_division_by_zero_only_where_live():
    b = _bound("attention a(N) { q, kv = seq(N)\n mask = k.i >= 2 and t[k.i - 2] == q.i // (k.i - 1) }", N=6)
    t = {"t": np.arange(4)}
    got = mask_block(b, np.arange(6), np.arange(6), t)
    i, j = _i_j(6, 6)
    expect = (j >= 2) & (np.arange(4)[np.clip(j - 2, 0, 3)] == i // np.maximum(j - 1, 1))
    np.testing.assert_array_equal(got, expect)
    # Without the guard the same reads are errors.
    b = _bound("attention a(N) { q, kv = seq(N)\n mask = k.i >= 0 and q.i // (k.i - 1) == 0 }", N=6)
    with pytest.raises(AttncError, match="division by zero"):
        mask_block(b, np.arange(6), np.arange(6))


def test_an_index_out_of_range_where_live_names_the_index():
    b = _bound("attention a(N) { q, kv = seq(N)\n mask = k.i > 2 or t[k.i + 2] == 1 }", N=6)
    # k.i <= 2 reads t[k.i + 2] up to t[4]: fine for 5 entries, an error for 4.
    mask_block(b, np.arange(6), np.arange(6), {"t": np.ones(5, dtype=np.int64)})
    with pytest.raises(AttncError, match=r"index 4 is out of range for dimension 0 of 't' \(size 4\)"):
        mask_block(b, np.arange(6), np.arange(6), {"t": np.ones(4, dtype=np.int64)})


def test_mask_block_in_chunks_equals_one_block(monkeypatch):
    from attnc import limits

    b = _bound("attention a(N) { q, kv = seq(N)\n mask = k.i >= 3 and (q.i * 7 + k.i) % 5 < 2 }", N=50)
    whole = mask_block(b, np.arange(50), np.arange(50))
    monkeypatch.setattr(limits, "EVAL_CHUNK_PAIRS", 64)
    np.testing.assert_array_equal(mask_block(b, np.arange(50), np.arange(50)), whole)


# -- runtime tensors as divisors (A11) ------------------------------------------------------------------
DIV = "attention a(N) {\n    q, kv = seq(N)\n    mask = q.i // len[k.i] == 1\n}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_zero_divisor_from_a_tensor_is_refused_before_launch(backend):
    fn = attnc.compile(DIV, backend=backend, N=8)
    bad = torch.tensor([1, 2, 0, 3, 1, 1, 2, 2])
    x = torch.randn(1, 1, 8, 16)
    for call in (lambda: fn.mask(len=bad), lambda: fn(x, x, x, len=bad)):
        with pytest.raises(AttncError) as info:
            with torch.no_grad():
                call()
        err = info.value
        assert "the divisor `len[k.i]` in `q.i // len[k.i]` can be 0" in err.message
        assert "'len'" in err.message and (err.line, err.col) == (3, 19)
        assert "mask = q.i // len[k.i] == 1" in str(err)  # the spec line is quoted
    good = torch.tensor([1, 2, 5, 3, 1, 1, 2, 2])
    i, j = _i_j(8, 8)
    np.testing.assert_array_equal(fn.mask(len=good).numpy(), i // good.numpy()[j] == 1)


@pytest.mark.parametrize("mask,data", [
    ("k.i < 4 and q.i // len[k.i] == 1", [1, 2, 3, 4, 0, 0, 0, 0]),  # zeros never read
    ("len[k.i] != 0 and q.i // len[k.i] == 1", [0, 2, 3, 4, 0, 1, 0, 2]),
    ("len[k.i] > 0 and q.i % len[k.i] == 1", [0, 2, 3, 4, 0, 1, 0, 2]),
    ("k.i >= 4 or q.i // len[k.i] == 1", [1, 2, 3, 4, 0, 0, 0, 0]),
])
def test_divisors_that_are_never_zero_where_read_pass(mask, data):
    src = f"attention a(N) {{ q, kv = seq(N)\n mask = {mask} }}"
    tensors = {"len": torch.tensor(data)}
    ref = attnc.compile(src, backend="reference", N=8)
    fn = attnc.compile(src, tiles=(16, 16), N=8)
    np.testing.assert_array_equal(ref.mask(**tensors).numpy(), fn.mask(**tensors).numpy())


def test_the_divisor_check_is_conservative():
    """It ranges a lookup over the entries it can read, not pair by pair: here len[k.i] - 2 is 0
    only where the guard rules it out, but the check cannot see that and refuses."""
    src = "attention a(N) { q, kv = seq(N)\n mask = len[k.i] != 2 and q.i // (len[k.i] - 2) == 1 }"
    fn = attnc.compile(src, backend="reference", N=4)
    with pytest.raises(AttncError, match=r"can be 0 for this call"):
        fn.mask(len=torch.tensor([1, 2, 3, 4]))
