"""The call contract, the same on both backends: runtime id tensors of every integer dtype, and
`return_lse=True` (issue 8, items A1 and A4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnc
from attnc import AttncError
from tests import oracles
from tests.test_specs import SPECS, _qkv

INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", INT_DTYPES + [torch.bool])
def test_document_ids_of_every_integer_dtype(dtype, backend, device):
    n = 50
    ids = torch.tensor([0] * 13 + [1] * 20 + [2] * 17)
    if dtype == torch.bool:
        ids = ids == 1  # a flag: documents 0 and 2 become one id, which the oracle sees too
    doc = ids.to(dtype)
    fn = attnc.compile(SPECS / "document_causal.attn", backend=backend, tiles=(16, 16), N=n)
    q, k, v = _qkv(n, n, device=device if backend == "triton" else "cpu", seed=4)
    expect_mask = oracles.document_causal_mask(ids.to(torch.int64).numpy())
    np.testing.assert_array_equal(fn.mask(doc=doc).numpy(), expect_mask)
    with torch.no_grad():
        out = fn(q, k, v, doc=doc.to(q.device)).cpu().double()
    expect = oracles.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), expect_mask)
    assert (out - expect).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_non_integer_ids_and_ids_beyond_int32_are_refused(backend):
    fn = attnc.compile(SPECS / "document_causal.attn", backend=backend, N=8)
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(AttncError, match=r"runtime tensor 'doc' must have an integer dtype \(or bool\), got torch.float32"):
        fn(q, q, q, doc=torch.zeros(8))
    with pytest.raises(AttncError, match=r"values in \[0, 4294967296\], outside int32"):
        fn(q, q, q, doc=torch.tensor([0] * 7 + [2**32]))


def _lse_oracle(q, k, mask, scale, sink=None):
    """log(sum over visible keys of exp(scale q.k) (+ exp(sink))), written out with numpy."""
    s = (q.numpy() @ k.numpy().swapaxes(-1, -2)) * scale
    out = np.empty(s.shape[:-1])
    for idx in np.ndindex(*s.shape[:-1]):
        terms = list(s[idx][mask[idx[-1]]]) + ([] if sink is None else [sink[idx[1]]])
        out[idx] = -math.inf if not terms else np.logaddexp.reduce(np.array(terms, dtype=np.float64))
    return out


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_return_lse_on_both_backends(backend, device):
    n = 40
    spec = "attention a(N) { q, kv = seq(N)  mask = causal and q.i >= 5 }"  # rows 0..4 see nothing
    fn = attnc.compile(spec, backend=backend, tiles=(16, 16), N=n)
    q, k, v = _qkv(n, n, d=16, seed=2)
    dev = device if backend == "triton" else "cpu"
    dt = torch.float32 if backend == "triton" else torch.float64
    with torch.no_grad():
        out, lse = fn(*(x.to(dev, dt) for x in (q, k, v)), return_lse=True)
    assert lse.shape == (1, 2, n)
    mask = oracles.causal_mask(n, n) & (np.arange(n)[:, None] >= 5)
    expect = _lse_oracle(q.double(), k.double(), mask, 1 / math.sqrt(16))
    np.testing.assert_allclose(lse.cpu().double().numpy(), expect, rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[..., :5]).all() and (lse[..., :5] < 0).all()
    torch.testing.assert_close(out.cpu().double(), oracles.attention(q.double(), k.double(), v.double(), mask),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_return_lse_includes_the_sink(backend, device):
    n = 24
    spec = "attention a(N) { q, kv = seq(N)  mask = causal and q.i >= 3  score = softmax(sink = sinks[head]) }"
    fn = attnc.compile(spec, backend=backend, tiles=(16, 16), N=n)
    q, k, v = _qkv(n, n, d=16, seed=3)
    sinks = torch.tensor([0.7, -1.2])
    dev = device if backend == "triton" else "cpu"
    with torch.no_grad():
        _, lse = fn(*(x.to(dev) for x in (q, k, v)), sinks=sinks.to(dev), return_lse=True)
    mask = oracles.causal_mask(n, n) & (np.arange(n)[:, None] >= 3)  # rows 0..2: only the sink
    expect = _lse_oracle(q.double(), k.double(), mask, 1 / math.sqrt(16), sink=sinks.double().numpy())
    np.testing.assert_allclose(lse.cpu().double().numpy(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_return_lse_needs_softmax_on_both_backends(backend):
    fn = attnc.compile(SPECS / "sigmoid_causal.attn", backend=backend, N=16)
    q = torch.zeros(1, 1, 16, 16)
    with pytest.raises(AttncError, match="return_lse needs softmax scoring; this spec scores with sigmoid"):
        fn(q, q, q, return_lse=True)
