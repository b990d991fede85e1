"""attnc.natten: NATTEN-compatible na1d / na2d / na3d, checked against an independent brute-force
implementation of NATTEN's definition (tests/oracles.py: gna_mask + attention, in float64) and
against attnc's reference backend, on random sizes, kernels, strides, dilations and causal flags;
plus NATTEN's argument errors and gradients (the Triton path runs in its interpreter on CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
import attnc.natten as natten
from attnc import AttncError
from tests import oracles

FNS = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}
TOL = dict(atol=1e-4, rtol=1e-4)


def _per_axis(value, nd):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd


def brute_force(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                additional_keys=None, additional_values=None):
    """NATTEN's definition, NATTEN's layout: the GNA mask of oracles.gna_mask over row-major
    tokens (plus every additional key), masked softmax attention in float64. Returns the output
    and the logsumexp, both in NATTEN's layout."""
    nd = q.dim() - 3
    dims = tuple(q.shape[1:1 + nd])
    mask = oracles.gna_mask(dims, _per_axis(kernel_size, nd), _per_axis(dilation, nd), _per_axis(stride, nd),
                            _per_axis(is_causal, nd))
    qf, kf, vf = (x.flatten(1, nd).transpose(1, 2) for x in (q, k, v))
    if additional_keys is not None:
        kf = torch.cat([kf, additional_keys.transpose(1, 2)], 2)
        vf = torch.cat([vf, additional_values.transpose(1, 2)], 2)
        mask = np.concatenate([mask, np.ones((mask.shape[0], additional_keys.shape[1]), dtype=bool)], 1)
    out = oracles.attention(qf, kf, vf, mask, scale=scale)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    rep = qf.shape[1] // kf.shape[1]
    logits = torch.einsum("bhnd,bhmd->bhnm", qf.double(), kf.double().repeat_interleave(rep, 1)) * sc
    lse = logits.masked_fill(~torch.from_numpy(mask), -math.inf).logsumexp(-1)
    B, heads = q.shape[0], q.shape[-2]
    return (out.transpose(1, 2).reshape(B, *dims, heads, v.shape[-1]),
            lse.transpose(1, 2).reshape(B, *dims, heads))


def _qkv(dims, hq=2, hkv=1, d=16, dv=16, device="cpu", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, *dims, hq, d, generator=g, dtype=dtype)
    k = torch.randn(1, *dims, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(1, *dims, hkv, dv, generator=g, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


@st.composite
def problems(draw, nd):
    """A valid NATTEN problem: per axis a length, kernel >= 2 with kernel * dilation <= length,
    stride in [1, kernel], causal or not; each argument as an int or a per-axis tuple."""
    longest = {1: 24, 2: 10, 3: 4}[nd]
    dims, kernel, dilation, stride, causal = [], [], [], [], []
    for _ in range(nd):
        n = draw(st.integers(2, longest))
        kk = draw(st.integers(2, n))
        d = draw(st.integers(1, n // kk))
        dims.append(n)
        kernel.append(kk)
        dilation.append(d)
        stride.append(draw(st.integers(1, kk)))
        causal.append(draw(st.booleans()))

    def arg(values):  # an int / bool for all axes when they agree, sometimes
        return values[0] if len(set(values)) == 1 and draw(st.booleans()) else tuple(values)

    heads = draw(st.sampled_from([(1, 1), (2, 1), (2, 2)]))
    scale = draw(st.sampled_from([None, 0.3]))
    return tuple(dims), dict(kernel_size=arg(kernel), stride=arg(stride), dilation=arg(dilation),
                             is_causal=arg(causal), scale=scale), heads


def _check_against_oracles(nd, problem, seed, device):
    dims, kw, (hq, hkv) = problem
    q, k, v = _qkv(dims, hq, hkv, device=device, seed=seed)
    want, want_lse = brute_force(q.cpu(), k.cpu(), v.cpu(), **kw)
    got, lse = FNS[nd](q, k, v, **kw, return_lse=True)
    ref = FNS[nd](q.cpu(), k.cpu(), v.cpu(), **kw, backend="reference")
    assert got.shape == (1, *dims, hq, 16) and lse.shape == (1, *dims, hq)
    torch.testing.assert_close(ref.double(), want, **TOL)
    torch.testing.assert_close(got.cpu().double(), want, **TOL)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **TOL)


_HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=25, **_HYP)
@given(problems(1), st.integers(0, 2**16))
def test_na1d_matches_natten_definition(device, problem, seed):
    _check_against_oracles(1, problem, seed, device)


@settings(max_examples=22, **_HYP)
@given(problems(2), st.integers(0, 2**16))
def test_na2d_matches_natten_definition(device, problem, seed):
    _check_against_oracles(2, problem, seed, device)


@settings(max_examples=10, **_HYP)
@given(problems(3), st.integers(0, 2**16))
def test_na3d_matches_natten_definition(device, problem, seed):
    _check_against_oracles(3, problem, seed, device)


def test_dinat_layer(device):
    """A DiNAT-style call: 5x5 kernel, dilation 2 on a 12 x 12 map, GQA, a distinct value head dim."""
    q, k, v = _qkv((12, 12), hq=4, hkv=2, dv=8, device=device, seed=1)
    got = natten.na2d(q, k, v, kernel_size=5, dilation=2)
    assert got.shape == (1, 12, 12, 4, 8) and got.is_contiguous()
    torch.testing.assert_close(got.cpu().double(), brute_force(q.cpu(), k.cpu(), v.cpu(), 5, dilation=2)[0], **TOL)


def test_float16(device):
    q, k, v = _qkv((11,), dtype=torch.float16, device=device, seed=8)
    got, lse = natten.na1d(q, k, v, 4, stride=2, dilation=2, is_causal=True, return_lse=True)
    want, want_lse = brute_force(q.cpu(), k.cpu(), v.cpu(), 4, stride=2, dilation=2, is_causal=True)
    assert got.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=2e-3, rtol=2e-3)


def test_natten_argument_forms(device):
    """Positional order is NATTEN's (kernel_size, stride, dilation, is_causal, scale); lists work
    like tuples; NATTEN's backend names and tuning options are accepted and change nothing."""
    q, k, v = _qkv((6, 8), device=device, seed=2)
    want = brute_force(q.cpu(), k.cpu(), v.cpu(), (3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True),
                       scale=0.5)[0]
    got = natten.na2d(q, k, v, (3, 4), (1, 2), (2, 1), (False, True), 0.5)
    torch.testing.assert_close(got.cpu().double(), want, **TOL)
    again = natten.na2d(q, k, v, [3, 4], [1, 2], [2, 1], [False, True], 0.5, backend="cutlass-fna",
                        q_tile_shape=(8, 8), kv_tile_shape=(8, 8), torch_compile=False)
    assert torch.equal(again, got)
    nones = natten.na2d(q, k, v, (3, 4), stride=None, dilation=None, is_causal=None)  # NATTEN's "default"
    torch.testing.assert_close(nones.cpu().double(), brute_force(q.cpu(), k.cpu(), v.cpu(), (3, 4))[0], **TOL)


def test_full_window_is_self_attention(device):
    """kernel_size == the input size sees everything (NATTEN's self-attention fast path); 1-D and
    causal it is plain causal attention."""
    q, k, v = _qkv((9,), device=device, seed=3)
    qf, kf, vf = (x.transpose(1, 2) for x in (q, k, v))
    full = oracles.attention(qf, kf, vf, np.ones((9, 9), dtype=bool)).transpose(1, 2)
    causal = oracles.attention(qf, kf, vf, oracles.causal_mask(9, 9)).transpose(1, 2)
    torch.testing.assert_close(natten.na1d(q, k, v, 9).cpu().double(), full, **TOL)
    torch.testing.assert_close(natten.na1d(q, k, v, 9, stride=4, is_causal=True).cpu().double(), causal, **TOL)


def test_additional_keys_values(device):
    """Neighborhood cross-attention: every query also sees the additional tokens (non-causally)."""
    q, k, v = _qkv((5, 6), hq=2, hkv=1, device=device, seed=4)
    g = torch.Generator().manual_seed(5)
    ak, av = torch.randn(1, 3, 1, 16, generator=g).to(device), torch.randn(1, 3, 1, 16, generator=g).to(device)
    kw = dict(kernel_size=(2, 3), stride=(2, 1), is_causal=(True, False), scale=0.4)
    want, want_lse = brute_force(q.cpu(), k.cpu(), v.cpu(), **kw, additional_keys=ak.cpu(), additional_values=av.cpu())
    got, lse = natten.na2d(q, k, v, **kw, additional_keys=ak, additional_values=av, return_lse=True)
    torch.testing.assert_close(got.cpu().double(), want, **TOL)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **TOL)


def test_gradients(device):
    """Gradients reach q, k, v through the custom op, and through the logsumexp merge of
    additional keys/values, matching the float64 brute force."""
    q, k, v = _qkv((5, 7), hq=2, hkv=1, device=device, seed=6)
    g = torch.Generator().manual_seed(7)
    ak, av = torch.randn(1, 2, 1, 16, generator=g).to(device), torch.randn(1, 2, 1, 16, generator=g).to(device)
    kw = dict(kernel_size=(3, 4), stride=(1, 2), dilation=(1, 1), is_causal=(False, True))
    dout = torch.randn(1, 5, 7, 2, 16, generator=g)
    for extra in ({}, dict(additional_keys=ak, additional_values=av)):
        xs = [t.clone().requires_grad_() for t in (q, k, v, ak, av)]
        got = natten.na2d(*xs[:3], **kw, **({} if not extra else dict(additional_keys=xs[3], additional_values=xs[4])))
        got.backward(dout.to(device))
        ys = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, ak, av)]
        want = brute_force(*ys[:3], **kw, **({} if not extra else dict(additional_keys=ys[3], additional_values=ys[4])))[0]
        want.backward(dout.double())
        for x, y in zip(xs if extra else xs[:3], ys):
            torch.testing.assert_close(x.grad.cpu().double(), y.grad, atol=2e-4, rtol=2e-4)


def test_compiled_spec_is_cached_and_built_from_window(device):
    natten._neighborhood.cache_clear()
    q, k, v = _qkv((4, 5), device=device)
    natten.na2d(q, k, v, 2, is_causal=(True, False))
    natten.na2d(q * 2, k, v, 2, is_causal=(True, False))
    info = natten._neighborhood.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    fn = natten._neighborhood((4, 5), (2, 2), (1, 1), (1, 1), (True, False), None, "triton")
    assert "window(K1, K2, dilation = (D1, D2), stride = (S1, S2), causal = (true, false))" in fn.spec.text
    assert isinstance(fn, attnc.AttentionFn)


# -- errors: NATTEN's conditions, as AttncError -----------------------------------------------------
def _bad(**over):
    q, k, v = _qkv((6, 8))
    args = dict(query=q, key=k, value=v, kernel_size=3)
    args.update(over)
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(query=torch.randn(1, 48, 2, 16)), "query must be 5-D"),
    (_bad(value=torch.randn(1, 6, 8, 1)), "value must be 5-D"),
    (_bad(key=[1, 2]), "key must be a torch.Tensor"),
    (_bad(key=torch.randn(1, 6, 7, 1, 16)), "same spatial shape"),
    (_bad(key=torch.randn(2, 6, 8, 1, 16), value=torch.randn(2, 6, 8, 1, 16)), "batch size"),
    (_bad(key=torch.randn(1, 6, 8, 1, 8)), "head dims must match"),
    (_bad(key=torch.randn(1, 6, 8, 2, 16)), "same number of heads"),
    (_bad(key=torch.randn(1, 6, 8, 3, 16), value=torch.randn(1, 6, 8, 3, 16)), "evenly divide"),
    (_bad(value=torch.randn(1, 6, 8, 1, 16, dtype=torch.float64)), "share a dtype"),
    (_bad(kernel_size=1), "kernel_size must be >= 2"),
    (_bad(kernel_size=(3, 0)), "kernel_size must be >= 2"),
    (_bad(kernel_size=7), "kernel_size 7 \\* dilation 1 = 7"),
    (_bad(kernel_size=3, dilation=(2, 3)), "axis 1 has size 8 but kernel_size 3 \\* dilation 3 = 9"),
    (_bad(stride=4), "stride cannot be larger than kernel_size"),
    (_bad(stride=0), "stride must be >= 1"),
    (_bad(dilation=(1, 0)), "dilation must be >= 1"),
    (_bad(kernel_size=3.0), "invalid kernel_size"),
    (_bad(kernel_size="3"), "invalid kernel_size"),
    (_bad(kernel_size="3) or true; mask = (1"), "invalid kernel_size"),
    (_bad(kernel_size=True), "invalid kernel_size"),
    (_bad(kernel_size=(3, 3, 3)), "kernel_size has 3 values for 2 spatial axes"),
    (_bad(dilation=(1.5, 1)), "invalid dilation"),
    (_bad(is_causal=1), "invalid is_causal"),
    (_bad(is_causal="true"), "invalid is_causal"),
    (_bad(is_causal=(True,)), "is_causal has 1 values"),
    (_bad(scale=float("nan")), "scale must be a finite number"),
    (_bad(scale="0.5"), "scale must be a finite number"),
    (_bad(backend="cuda"), "unknown backend"),
    (_bad(tile_size=64), "unexpected keyword argument 'tile_size'"),
    (_bad(additional_keys=torch.randn(1, 3, 1, 16)), "both be tensors or both be None"),
    (_bad(additional_keys=torch.randn(1, 3, 1, 16), additional_values=torch.randn(1, 4, 1, 16)), "token count"),
    (_bad(additional_keys=torch.randn(1, 3, 2, 16), additional_values=torch.randn(1, 3, 2, 16)), "heads and head dim"),
])
def test_errors(args, match):
    with pytest.raises(AttncError, match=match):
        natten.na2d(**args)


def test_rank_per_function():
    q, k, v = _qkv((6, 8))
    with pytest.raises(AttncError, match="na1d: query must be 4-D"):
        natten.na1d(q, k, v, 3)
    with pytest.raises(AttncError, match="na3d: query must be 6-D"):
        natten.na3d(q, k, v, 3)
    q1, k1, v1 = _qkv((5,))
    with pytest.raises(AttncError, match="kernel_size must be >= 2"):
        natten.na1d(q1, k1, v1, 1)  # NATTEN refuses kernel_size 1 as well ("all >= 2")
    with pytest.raises(AttncError, match="axis 0 has size 5 but kernel_size 3 \\* dilation 2 = 6"):
        natten.na1d(q1, k1, v1, 3, dilation=2)
