"""Regressions of the generated forward kernel's ABI, addressing and numerics (issue 8):

- B4: the kernel's arguments are described once (codegen/abi.py); the kernel text is built from
  pieces, so spec names that once were template placeholders cannot corrupt it.
- A7: 64-bit addressing, checked on the address arithmetic the kernel actually executes (the
  offsets Triton's interpreter adds to pointers), not on an 8 GB tensor.
- A9: soft-cap without cancellation: a huge cap is no cap.
- A10: softplus normalised in log space: rows whose logits are all very negative keep their
  weights, and the row statistic is log(sum softplus).
"""
from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import torch

import attnc
from attnc.backends.triton import launch
from attnc.codegen import abi
from tests import oracles
from tests.test_specs import SPECS, _qkv


def _reference(fn, q, k, v, **kw):
    ref = attnc.compile(fn.spec, backend="reference", **fn.params)
    return ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw)


# -- B4: the kernel ABI, once -----------------------------------------------------------------
# Every name the old emitter replaced with str.replace, as parameters that the mask and the
# score read (one of them a float parameter in the score text).
PLACEHOLDERS = """attention PARAMS(N, PARAMS = 3, EPILOGUE = 2, FULL_STEP = 1, PARTIAL_STEP = 0, PAIR_ARGS = 4,
                           INIT_STATE = 5, SCORE_TEXT = 2.0) {
    q, kv = seq(N)
    mask  = abs(q.i - k.i) <= PARAMS + EPILOGUE * FULL_STEP or k.i < PAIR_ARGS - INIT_STATE + 2 + PARTIAL_STEP
    score = softmax(scale = SCORE_TEXT / sqrt(head_dim), softcap = SCORE_TEXT * 10.0)
}"""


def test_parameters_named_like_placeholders_compile_and_match_reference(device):
    fn = attnc.compile(PLACEHOLDERS, tiles=(16, 16), N=40)
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    np.testing.assert_array_equal(fn.mask().numpy(), (np.abs(i - j) <= 5) | (j < 1))
    q, k, v = _qkv(40, 40, device=device)
    with torch.no_grad():
        out, lse = fn(q, k, v, return_lse=True)
    expect, expect_lse = _reference(fn, q, k, v, return_lse=True)
    assert (out.cpu().double() - expect).abs().max().item() < 1e-5
    assert (lse.cpu().double() - expect_lse).abs().max().item() < 1e-5


@pytest.mark.parametrize("spec", ["specs/swin_bias.attn", "specs/softcap_sink.attn", "specs/document_causal.attn",
                                  "specs/scale_dit.attn", PLACEHOLDERS])
def test_emitted_signatures_are_the_abi(spec):
    ir = attnc.parse(spec).ir
    from attnc.codegen import parts
    from attnc.codegen.emit import emit_forward

    tree = ast.parse(emit_forward(ir, "# test"))
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    kernel = funcs["attnc_fwd"].args.args
    described = abi.forward_args(ir)
    assert [a.arg for a in kernel] == [a.name for a in described]
    for a, d in zip(kernel, described):  # constexprs, and only they, are annotated
        assert (ast.unparse(a.annotation) if a.annotation else None) == \
            ("tl.constexpr" if d.kind == abi.CONSTEXPR else None), d.name
    pair = [a.arg for a in funcs["visible"].args.args]
    assert pair == ["q_i", "k_i"] + abi.pair_call_args(ir) + parts.names(ir)
    # Every call of a per-pair function passes exactly those arguments.
    calls = [c for c in ast.walk(funcs["attnc_fwd"]) if isinstance(c, ast.Call)
             and isinstance(c.func, ast.Name) and c.func.id in ("visible", "logit_bias")]
    assert calls and all([ast.unparse(x) for x in c.args] == pair for c in calls)


def _dummy_values(ir):
    kinds = {abi.PTR: torch.zeros(1), abi.INT: 1, abi.FLOAT: 1.0, abi.CONSTEXPR: 16}
    return {a.name: kinds[a.kind] for a in abi.forward_args(ir)}


def test_bind_names_what_is_missing_or_extra():
    ir = attnc.parse("specs/swin_bias.attn").ir
    values = _dummy_values(ir)
    assert list(abi.bind(ir, values)) == [a.name for a in abi.forward_args(ir)]
    with pytest.raises(abi.AbiError, match=r"rt0_hs \(int: runtime tensor 'rel_bias': head stride"):
        abi.bind(ir, {n: x for n, x in values.items() if n != "rt0_hs"})
    with pytest.raises(abi.AbiError, match="does not take: bogus"):
        abi.bind(ir, values | {"bogus": 1})
    with pytest.raises(abi.AbiError, match="stride_qm .* must be an int"):
        abi.bind(ir, values | {"stride_qm": 1.5})


def test_the_launcher_is_checked_against_the_abi(monkeypatch):
    """An argument the ABI gains but the launcher does not supply fails by name, before launch."""
    fn = attnc.compile("specs/causal.attn", tiles=(16, 16), N=20)
    described = abi.kernel_args
    monkeypatch.setattr(abi, "kernel_args", lambda ir, kernel="fwd": described(ir, kernel) + (abi.Arg("NEW", abi.INT, "test", "x"),))
    with pytest.raises(abi.AbiError, match="no value for kernel argument.* NEW"):
        with torch.no_grad():
            fn(*_qkv(20, 20))


# -- A7: 64-bit addressing --------------------------------------------------------------------
def _record_pointer_offsets(monkeypatch) -> list[tuple[bool, np.dtype, int]]:
    """(points at floats, offset dtype, offset rank) of every pointer addition the interpreter runs;
    rank 0 for a scalar (the interpreter holds scalars as arrays of one element)."""
    from triton.runtime import interpreter

    seen = []
    original = interpreter.InterpreterBuilder.create_addptr

    def create_addptr(self, ptr, offset):
        data = np.asarray(offset.data)
        seen.append((ptr.get_element_ty().is_floating(), data.dtype, 0 if data.size == 1 else data.ndim))
        return original(self, ptr, offset)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_addptr", create_addptr)
    return seen


# Float data (q, k, v, out, stat, a per-head float table, sinks) and an integer table.
ADDRESSED = """attention addressed(N) {
    q, kv = seq(N)
    mask  = causal and doc[q.i] == doc[k.i]
    bias  = table[q.i - k.i + N]
    score = softmax(softcap = 20.0, sink = sinks[head])
}"""


def _run_addressed(device="cpu"):
    fn = attnc.compile(ADDRESSED, tiles=(16, 16), N=40)
    g = torch.Generator().manual_seed(5)
    q, k, v = (t.repeat(2, 1, 1, 1) for t in _qkv(40, 40, heads=2, hkv=1, device=device))  # B=2, GQA
    tensors = dict(doc=torch.arange(40) // 15, table=torch.randn(2, 81, generator=g), sinks=torch.randn(2, generator=g))
    with torch.no_grad():
        out = fn(q, k, v, **{n: t.to(device) for n, t in tensors.items()})
    expect = _reference(fn, q, k, v, **{n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})
    assert (out.cpu().double() - expect).abs().max().item() < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the interpreter's pointer arithmetic")
def test_batch_and_head_bases_are_int64(monkeypatch):
    """Every (batch, head) base offset (a scalar added to a float pointer) is int64: b * stride_qb
    alone passes 2**31 with B * H * N * D >= 2**31 elements. Offsets inside a slice stay int32."""
    seen = _record_pointer_offsets(monkeypatch)
    _run_addressed()
    bases = [dt for floating, dt, rank in seen if floating and rank == 0]
    assert bases and all(dt == np.int64 for dt in bases), sorted({str(d) for d in bases})
    assert any(floating and rank == 2 and dt == np.int32 for floating, dt, rank in seen)  # the common case


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the interpreter's pointer arithmetic")
def test_huge_tensors_are_addressed_in_int64(monkeypatch):
    """As if every tensor had 2**31 elements or more: the launcher widens every offset into q, k, v,
    out, stat and the runtime tables (tile-shaped offsets include the integer table's)."""
    monkeypatch.setattr(launch, "ADDR_LIMIT", 1)
    seen = _record_pointer_offsets(monkeypatch)
    _run_addressed()
    wide = [dt for floating, dt, rank in seen if floating or rank == 2]
    assert wide and all(dt == np.int64 for dt in wide), sorted({str(d) for d in wide})


def test_launcher_widens_offsets_from_extents():
    """ADDR64 follows the largest offset inside one (batch, head) slice, strided views included
    (meta tensors: shapes and strides without memory)."""
    def slice_needs_64(t):
        return launch._extent(t, dims=(2, 3)) >= launch.ADDR_LIMIT

    assert not slice_needs_64(torch.empty(64, 32, 2**20, 2**11, device="meta"))  # 2**42 elements, slices < 2**31
    assert slice_needs_64(torch.empty(1, 1, 2**20 + 1, 2**11, device="meta"))
    # [B, N, H, D] storage seen as [B, H, N, D]: one head's rows are H * D apart.
    assert slice_needs_64(torch.empty(1, 2**17 + 1, 64, 256, device="meta").transpose(1, 2))
    assert launch._extent(torch.empty(3, 5, device="meta")) == 14


# -- A9: soft-cap ------------------------------------------------------------------------------
CAPS = [1e-3, 0.1, 1.0, 30.0, 1e4, 1e8, 1e15, 1e29]


def _capped(kind: str, cap: float | None) -> str:
    mod = "" if cap is None else f"softcap = {cap!r}"
    return f"attention capped(N) {{ q, kv = seq(N) mask = causal score = {kind}({mod}) }}"


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_softcap_matches_float64_tanh_and_huge_caps_are_no_cap(kind, cap, device):
    """float32 kernel vs float64 `cap * tanh(s / cap)`; from 1e8 on, also vs no cap at all (the
    kernel once computed tanh as (1 - e) / (1 + e), which cancels: cap >= 1e8 gave uniform weights)."""
    fn = attnc.compile(_capped(kind, cap), tiles=(16, 16), N=40)
    q, k, v = _qkv(40, 40, device=device, seed=3)
    q = q * 4  # logits up to about +-20
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    expect = _reference(fn, q, k, v)
    assert (out - expect).abs().max().item() < 2e-5
    if cap >= 1e8:
        plain = attnc.compile(_capped(kind, None), backend="reference", N=40)
        assert (out - plain(q.cpu().double(), k.cpu().double(), v.cpu().double())).abs().max().item() < 2e-5


def test_softcap_lse_is_the_capped_logsumexp(device):
    # The logsumexp sees the capped logits directly (no averaging over v): relative 1e-6.
    q, k, v = _qkv(40, 40, device=device, seed=4)
    for cap in (1e-3, 1.0, 1e8, 1e29):
        fn = attnc.compile(_capped("softmax", cap), tiles=(16, 16), N=40)
        with torch.no_grad():
            _, lse = fn(q * 4, k, v, return_lse=True)
        s = (q.cpu().double() * 4) @ k.cpu().double().transpose(-1, -2) / math.sqrt(32)
        s = (cap * torch.tanh(s / cap)).masked_fill(~torch.from_numpy(oracles.causal_mask(40, 40)), float("-inf"))
        expect = torch.logsumexp(s, -1)
        assert ((lse.cpu().double() - expect).abs() / expect.abs().clamp(min=1)).max().item() < 1e-6, cap


# -- A10: softplus underflow -------------------------------------------------------------------
SOFTPLUS = """attention sp(N) {
    q, kv = seq(N)
    mask  = k.i <= q.i and q.i != 5
    score = softplus(scale = 1.0)
}"""


@pytest.fixture(params=[0, 2], ids=["exact", "first-pass"])
def softplus_pass(request, monkeypatch):
    """FAST_SOFTPLUS of the launch: 0 exact loops only (float32 and the interpreter); 2 the first
    pass of 16-bit inputs on a GPU (codegen/emit._softplus_fast), its log2 run by the interpreter."""
    monkeypatch.setattr(launch, "fast_softplus", lambda q: request.param)
    return request.param


def _negative_logits(n: int, d: int = 16, lo: float = 50.0, hi: float = 500.0, device="cpu"):
    """q, k, v whose logits q . k lie in [-hi, -lo] per row: row i near -a_i (a_i from lo to hi),
    spread by about 2% across keys so that the weights are not one-hot."""
    g = torch.Generator().manual_seed(7)
    a = torch.from_numpy(np.geomspace(lo, hi, n)).float()
    q = (-a / d)[None, None, :, None].expand(1, 2, n, d).contiguous()
    k = 0.8 + 0.4 * torch.rand(1, 2, n, d, generator=g)
    v = torch.randn(1, 2, n, d, generator=g)
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("lo,hi", [(50.0, 500.0), (150.0, 500.0)])
def test_softplus_rows_of_very_negative_logits_match_float64(lo, hi, device, softplus_pass):
    """Softplus(s) underflows in float32 below about -104 (-87 where denormals flush): the kernel
    once returned 0 for those rows. Normalised in log space, they match the float64 reference."""
    fn = attnc.compile(SOFTPLUS, tiles=(16, 16), N=48)
    q, k, v = _negative_logits(48, lo=lo, hi=hi, device=device)
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    expect = _reference(fn, q, k, v)
    assert (out[:, :, 5] == 0).all()  # sees no key
    assert (expect.abs().amax(-1)[:, :, 6:] > 0.1).all()  # the reference's rows are far from 0
    assert (out - expect).abs().max().item() < 1e-3


def test_softplus_statistic_is_log_of_the_row_sum(device, softplus_pass):
    """Stat for softplus is log(sum over visible keys of softplus(s)): finite where the sum
    underflows float32, -inf for a row that sees no key."""
    fn = attnc.compile(SOFTPLUS, tiles=(16, 16), N=48)
    q, k, v = _negative_logits(48, lo=1.0, hi=500.0, device=device)
    with torch.no_grad():
        _, stat = launch.forward(fn.compiled, fn._host, q, k, v, {})
    s = q.cpu().double() @ k.cpu().double().transpose(-1, -2)
    mask = torch.from_numpy(fn.mask().numpy())
    expect = torch.log(torch.where(mask, torch.nn.functional.softplus(s), 0.0).sum(-1))
    stat = stat.cpu().double()
    assert torch.isneginf(stat[:, :, 5]).all() and torch.isneginf(expect[:, :, 5]).all()
    rows = torch.arange(48) != 5
    assert (stat[:, :, rows] - expect[:, :, rows]).abs().max().item() < 1e-3


@pytest.mark.parametrize("shift", [90.0, 200.0])
def test_softplus_row_whose_first_tile_hides_every_key(shift, device, softplus_pass):
    """Rows of the second q tile see nothing in the first kv tile visited (PARTIAL, before the
    FULL one): their scale must stay unset there, else a later exp(-m) overflows to inf and
    0 * inf turned them into nan (logits below -88). Found in review."""
    spec = "attention a(N) { q, kv = seq(N)  mask = causal and q.i - k.i < 13  score = softplus(scale = 1.0) }"
    fn = attnc.compile(spec, tiles=(16, 16), N=40)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 40, 16, generator=g) * 0.1, torch.randn(1, 2, 40, 16, generator=g) * 0.1
    v = torch.randn(1, 2, 40, 16, generator=g)
    q[..., 0], k[..., 0] = shift ** 0.5, -shift ** 0.5
    leaves = [x.to(device).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in leaves)
    assert (out.detach().cpu().double() - _reference(fn, q, k, v)).abs().max().item() < 1e-4


# Softplus's first pass (16-bit inputs on a GPU) against the reference and the exact loops.
FIRST_PASS = [
    ("softplus.attn", dict(N=70), None),
    ("causal_window", dict(N=70), "attention a(N) { q, kv = seq(N)  mask = causal and q.i - k.i < 20  "
                                  "score = softplus(scale = 0.5) }"),
    ("modified", dict(N=70), "attention a(N) { q, kv = seq(N)  mask = causal  bias = -slopes[head] * (q.i - k.i)  "
                             "score = softplus(scale = 0.25, softcap = 12.0) }"),
]


@pytest.mark.parametrize("name,params,text", FIRST_PASS, ids=[x[0] for x in FIRST_PASS])
def test_softplus_first_pass_matches_reference(name, params, text, device, monkeypatch):
    """The first pass (FAST_SOFTPLUS: log2(1 + 2**-|y|), no running max) serves rows of ordinary
    logits: it matches the float64 reference and differs from the exact loops by rounding only.
    A row of very negative logits in a q tile sends the whole tile to the exact loops: those
    tiles match the exact loops bit for bit."""
    spec = SPECS / name if text is None else text
    fn = attnc.compile(spec, tiles=(16, 16), **params)
    n = params["N"]
    q, k, v = _qkv(n, n, device=device)
    q[:, :, 16:32] = -q[:, :, 16:32].abs() - 4.0  # the second q tile: one row of very negative logits
    k = k.abs() + 0.5
    q[:, :, 17:32] = q[:, :, 17:32].abs()
    kw = {"slopes": torch.tensor([0.05, 0.1], device=device)} if name == "modified" else {}
    outs, stats = {}, {}
    for mode in (0, 2):
        monkeypatch.setattr(launch, "fast_softplus", lambda q, mode=mode: mode)
        with torch.no_grad():
            outs[mode] = fn(q, k, v, **kw).cpu()
            stats[mode] = launch.forward(fn.compiled, fn._host, q, k, v, kw)[1].cpu()
    expect = _reference(fn, q, k, v, **kw)
    assert (outs[2].double() - expect).abs().max().item() < 2e-5
    # The statistic (log of the row's sum of softplus; test_softplus_statistic_is_log_of_the_row_sum).
    assert (stats[2] - stats[0]).abs().max().item() < 2e-5
    assert not torch.equal(outs[0], outs[2])  # rows of ordinary logits took the first pass
    assert torch.equal(outs[0][:, :, 16:32], outs[2][:, :, 16:32])  # the tile with a negative row did not
