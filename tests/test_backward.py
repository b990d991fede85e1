"""The backward pass: `out = fn(q, k, v, **tensors); out.backward(g)` gives gradients to q, k, v and
to the float runtime tensors the spec reads (bias tables, ALiBi slopes, sink logits); integer
tensors (document ids) get none.

Every gradient is checked the FlexAttention way (DESIGN.md section 6), per tensor, with max-abs
errors against the float64 reference run on the *same rounded inputs*:

    err(kernel, f64) <= 2 * err(eager reference in the kernel's dtype, f64) + EPS[dtype] * max|f64|

The eager same-dtype reference (`backend="reference"` fed float32 or float16 tensors) says how much
error that dtype costs by itself; a kernel may be at most twice as far from the truth. EPS only
absorbs the case where the eager reference happens to land unusually close; it is scaled by the
tensor's magnitude (max |f64|), so it means the same for a dq of size 1 and a slope gradient of
size 1000. Measured on the cases below (max-abs error over max |f64|, outputs and all gradients):
eager float32 is 8e-8 .. 6e-7 from float64 and eager float16 3e-4 .. 3e-3, and the forward kernels
land at 1e-7 .. 5e-7 (float32) and 2e-4 .. 5e-4 (float16). EPS = 1e-6 (float32) and 5e-4 (float16)
are the size of one typical eager error of their dtype, so the bound is some 2-6x the eager error
(float32) and 2.5-4x (float16), never a blanket tolerance: the float32 check holds gradients to
about 1e-6 relative, far tighter than the 1e-5 one might pick by habit. A wrong gradient (a missed
tile, a table entry summed into the wrong cell, a missing head reduction, a dropped softcap or sink
term) is off by O(max |f64|) and fails by orders of magnitude.

KERNEL selects the backend under test. It is "triton", the contract; `ATTNC_TEST_BACKWARD=reference`
runs the same checks with the reference standing in for the kernels (how this file was debugged
before the triton backward existed): the error bounds then hold trivially, and the tests that only
mean something for kernels (double backward refused, torch.compile) skip.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from tests.conftest import DEVICE  # the `device` fixture, for the Hypothesis test
from tests.test_properties import specs as random_specs
from tests.test_specs import SPECS

KERNEL = os.environ.get("ATTNC_TEST_BACKWARD", "triton")
kernels_only = pytest.mark.skipif(KERNEL != "triton", reason="checks the triton backend itself")

EPS = {torch.float32: 1e-6, torch.float16: 5e-4}
DTYPES = [torch.float32, torch.float16]  # the CPU interpreter has no bfloat16
QKV = ("q", "k", "v")


# -- helpers ----------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(nq, nk, b=1, hq=2, hkv=2, d=16, dv=None, tables=None, seed=0) -> dict[str, torch.Tensor]:
    """float32 CPU q, k, v and float tables (a function of (hq, generator) -> dict), seeded."""
    g = _gen(seed)
    x = {"q": torch.randn(b, hq, nq, d, generator=g), "k": torch.randn(b, hkv, nk, d, generator=g),
         "v": torch.randn(b, hkv, nk, dv or d, generator=g)}
    if tables is not None:
        x.update(tables(hq, g))
    return x


def _run(fn, x: dict, g: torch.Tensor, ints: dict | None = None, **kw) -> dict[str, torch.Tensor]:
    """out and the gradient of every tensor in x (q, k, v, float tables), from out.backward(g)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    tables = {n: t for n, t in leaves.items() if n not in QKV}
    out = fn(leaves["q"], leaves["k"], leaves["v"], **tables, **(ints or {}), **kw)
    out.backward(g)
    res = {"out": out.detach()}
    for n, t in leaves.items():
        assert t.grad is not None, f"{fn!r}: no gradient reached '{n}'"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, (n, t.grad.dtype, t.grad.shape)
        res["d" + n] = t.grad
    return res


def _errors(kern: dict, low: dict, gold: dict, dtype) -> list[str]:
    """The discipline for each tensor; the failures, with their figures (empty when all pass)."""
    bad = []
    for name, want in gold.items():
        if want.numel() == 0:
            continue
        got = kern[name].detach().cpu().double()
        e_kern = (got - want).abs().max().item()
        e_low = (low[name].detach().cpu().double() - want).abs().max().item()
        # The epsilon scales with the gradient, floored at the inputs' scale (randn, about 1): a
        # gradient that is exactly 0 in float64 (one visible key) leaves only rounding noise.
        mag = max(want.abs().max().item(), 1.0)
        bound = 2 * e_low + EPS[dtype] * mag
        if not torch.isfinite(got).all() or not e_kern <= bound:
            bad.append(f"{name}: err(kernel, f64) = {e_kern:.3g} > bound {bound:.3g} = 2 * err(eager "
                       f"{str(dtype)[6:]}, f64) {e_low:.3g} + {EPS[dtype]:g} * max|f64| {mag:.3g}"
                       f" (ratio {e_kern / max(e_low, 1e-300):.3g}x eager)")
    return bad


def _check(spec, params: dict, dtype, device, *, tiles=(32, 32), layout="auto", b=1, hq=2, hkv=2, d=16,
           dv=None, tables=None, ints=None, seed=0, what=""):
    """Kernel vs float64 reference vs eager reference in `dtype`, output and every gradient.
    Returns the kernel's results (on the device) for further checks."""
    fn = attnc.compile(spec, backend=KERNEL, tiles=tiles, layout=layout, **params)
    ref = attnc.compile(spec, backend="reference", **params)
    bound = ref.compiled.bound
    x32 = _inputs(bound.nq, bound.nk, b, hq, hkv, d, dv, tables, seed)
    x = {n: t.to(device, dtype) for n, t in x32.items()}  # rounded once: every run sees these values
    g = torch.randn(b, hq, bound.nq, dv or d, generator=_gen(seed + 1)).to(device, dtype)
    ints = ints or {}
    kern = _run(fn, x, g, {n: t.to(device) for n, t in ints.items()})
    low = _run(ref, x, g, {n: t.to(device) for n, t in ints.items()})
    gold = _run(ref, {n: t.cpu().double() for n, t in x.items()}, g.cpu().double(), ints)
    bad = _errors(kern, low, gold, dtype)
    assert not bad, f"{what or spec} {params} {str(dtype)[6:]} tiles={tiles} layout={layout}:\n  " + "\n  ".join(bad)
    return kern, gold


def _rel_bias(per_head: bool):
    return lambda hq, g: {"rel_bias": torch.randn(*((hq,) if per_head else ()), 13, 13, generator=g)}


def _slopes(hq, g):
    return {"slopes": 0.05 + 0.3 * torch.rand(hq, generator=g)}


def _sinks(hq, g):
    return {"sinks": torch.randn(hq, generator=g)}


def _doc(lengths):
    return {"doc": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))}


# -- 1. every spec file with kernels ---------------------------------------------------------------
# (id, spec, parameters, keyword arguments of _check). Sizes are not multiples of the tile where the
# spec allows it; swin needs multiples of 7.
CASES = [
    ("causal", "causal", dict(N=77), dict(b=2)),
    ("cross_causal-M40-N72", "cross_causal", dict(M=40, N=72), dict(d=32)),
    ("cross_causal-M75-N50", "cross_causal", dict(M=75, N=50), dict()),  # 25 queries see no key
    ("sliding_window", "sliding_window", dict(N=70, W=9), dict(tiles=(16, 16))),
    ("natten2d", "natten2d", dict(H=10, W=11, kernel=5, dilation=2), dict()),
    ("longformer", "longformer", dict(N=70, W=6, G=3), dict(b=2)),
    ("gna3d_video", "gna3d_video", dict(T=3, H=8, W=8), dict()),
    ("streaming_sink", "streaming_sink", dict(N=77, W=10, S=3), dict(tiles=(16, 16))),
    ("swin_shifted", "swin_shifted", dict(H=7, W=14), dict()),
    ("maxvit_grid", "maxvit_grid", dict(H=12, W=9, G=3), dict()),
    ("sigmoid_causal", "sigmoid_causal", dict(N=70), dict(d=32)),
    ("softplus", "softplus", dict(N=45), dict(tiles=(16, 16))),
    ("scale_dit", "scale_dit", dict(H=12, W=8), dict()),
    ("document_causal", "document_causal", dict(N=70), dict(ints=_doc([20, 1, 30, 19]), tiles=(16, 16))),
    ("swin_bias-shared", "swin_bias", dict(H=7, W=14), dict(tables=_rel_bias(False), b=2)),
    ("swin_bias-per_head", "swin_bias", dict(H=14, W=14), dict(tables=_rel_bias(True))),
    ("alibi_causal", "alibi_causal", dict(N=70), dict(tables=_slopes, tiles=(16, 16))),
    ("softcap_sink", "softcap_sink", dict(N=70, W=20, cap=3.0), dict(tables=_sinks, b=2)),
    ("power_attention", "power_attention", dict(N=77, W=5), dict(tiles=(16, 16))),
    ("biformer", "biformer", dict(H=9, W=10, R=4, K=2), dict()),  # partial regions at the edges
    ("moba-gqa", "moba", dict(N=70, B=16, K=2), dict(hq=4, hkv=2, tiles=(16, 16))),
]


def test_every_spec_with_kernels_is_covered():
    assert {p.stem for p in SPECS.glob("*.attn")} == {spec for _, spec, _, _ in CASES}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("spec,params,kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_spec_gradients(spec, params, kw, dtype, device):
    _check(SPECS / f"{spec}.attn", params, dtype, device, **kw)


# -- 2. grouped-query attention, MQA, Dv != D, ragged sizes -----------------------------------------
SHAPES = [  # (id, spec, parameters, _check keywords)
    ("gqa-causal", "causal", dict(N=77), dict(hq=4, hkv=2, tiles=(16, 16))),
    ("mqa-causal-dv32", "causal", dict(N=50), dict(hq=4, hkv=1, d=16, dv=32)),
    ("gqa-cross_causal-dv16", "cross_causal", dict(M=33, N=61), dict(hq=4, hkv=2, d=32, dv=16, b=2)),
    ("gqa-alibi", "alibi_causal", dict(N=45), dict(hq=4, hkv=2, b=2, tables=_slopes, tiles=(16, 16))),
    ("mqa-softcap_sink-dv32", "softcap_sink", dict(N=53, W=17, cap=3.0), dict(hq=4, hkv=1, dv=32, tables=_sinks)),
    ("gqa-swin_bias-per_head", "swin_bias", dict(H=7, W=14), dict(hq=4, hkv=2, tables=_rel_bias(True))),
    ("mqa-swin_bias-shared-dv8", "swin_bias", dict(H=7, W=7), dict(hq=4, hkv=1, dv=8, tables=_rel_bias(False))),
    ("gqa-sigmoid", "sigmoid_causal", dict(N=37), dict(hq=4, hkv=2, tiles=(16, 16))),
    ("mqa-softplus-dv32", "softplus", dict(N=29), dict(hq=2, hkv=1, dv=32, tiles=(16, 16))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("spec,params,kw", [c[1:] for c in SHAPES], ids=[c[0] for c in SHAPES])
def test_head_groups_and_value_dims(spec, params, kw, dtype, device):
    _check(SPECS / f"{spec}.attn", params, dtype, device, **kw)


# -- 3. queries that see no key, keys no query sees -------------------------------------------------
# N = 45, tiles 16: queries 0..19 see nothing (q tile 0 wholly, tile 1 partly); keys 25..44 are seen
# by no query (kv tile 2 wholly, tile 1 partly). Their gradients must be exactly 0, never NaN, even
# where the schedule skips the whole tile (a dq / dk / dv left uninitialised would show here).
_EMPTY_MASK = "mask = q.i >= 20 and k.i <= q.i and k.i < N - 20"
EMPTY = {
    "softmax": ("", None),
    "sink": ("score = softmax(sink = sinks[head])", _sinks),
    "alibi_softcap": ("bias = -slopes[head] * (q.i - k.i)\n score = softmax(softcap = 2.0)", _slopes),
    "sigmoid": ("score = sigmoid(scale = 1 / sqrt(head_dim), bias = -log(N))", None),
    "softplus": ("score = softplus", None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("kind", sorted(EMPTY))
def test_rows_that_see_nothing_get_zero_gradients(kind, dtype, device):
    body, tables = EMPTY[kind]
    spec = f"attention t(N) {{\n q, kv = seq(N)\n {_EMPTY_MASK}\n {body}\n}}\n"
    kern, _ = _check(spec, dict(N=45), dtype, device, tiles=(16, 16), hq=2, hkv=1, tables=tables, what=kind)
    for name, t in kern.items():
        assert torch.isfinite(t).all(), f"{kind}: {name} has NaN or inf"
    assert (kern["out"][:, :, :20] == 0).all()
    assert (kern["dq"][:, :, :20] == 0).all(), kern["dq"][:, :, :20].abs().max()
    assert (kern["dk"][:, :, 25:] == 0).all() and (kern["dv"][:, :, 25:] == 0).all()
    assert kern["dq"][:, :, 20:].abs().sum() > 0 and kern["dk"][:, :, :25].abs().sum() > 0


def test_nothing_visible_at_all(device):
    """mask = false: out and every gradient are exactly 0 (the sink's too: out is 0 whatever it is)."""
    spec = "attention t(N) { q, kv = seq(N)  mask = false  score = softmax(sink = sinks[head]) }"
    fn = attnc.compile(spec, backend=KERNEL, tiles=(16, 16), N=20)
    x = {n: t.to(device) for n, t in _inputs(20, 20, tables=_sinks).items()}
    res = _run(fn, x, torch.ones(1, 2, 20, 16, device=device))
    for name, t in res.items():
        assert (t == 0).all(), name


# -- 4. layouts do not change results ---------------------------------------------------------------
_ROW_MAJOR: dict = {}  # dilation -> the row-major kernel's results, computed once


@pytest.mark.parametrize("dilation,layout", [(1, "row_major"), (1, "auto"), (1, "boxes"), (1, "hilbert"),
                                             (2, "row_major"), (2, "auto"), (2, "dilation")])
def test_layout_does_not_change_gradients(dilation, layout, device):
    params = dict(H=12, W=12, kernel=5, dilation=dilation)
    spec, tiles = SPECS / "natten2d.attn", (32, 32)
    if layout not in ("auto", "row_major"):  # the layout asked for is the one used
        assert attnc.compile(spec, tiles=tiles, layout=layout, **params).layout.name != "row_major"
    kern, gold = _check(spec, params, torch.float32, device, tiles=tiles, layout=layout, hq=2, hkv=1, seed=11)
    if layout == "row_major":
        _ROW_MAJOR[dilation] = kern
    row = _ROW_MAJOR.get(dilation) or _check(spec, params, torch.float32, device, tiles=tiles,
                                              layout="row_major", hq=2, hkv=1, seed=11)[0]
    for name in gold:  # and every layout agrees with row-major to float32 rounding
        scale = gold[name].abs().max().item()
        assert (kern[name].cpu().double() - row[name].cpu().double()).abs().max().item() <= 1e-5 * scale, name


def test_kernel_order_gradients(device):
    """fn(..., kernel_order=True) takes and returns tokens in the layout's order: its gradients are
    the row-major ones, permuted the same way."""
    params = dict(H=10, W=10, kernel=5)
    fn = attnc.compile(SPECS / "natten2d.attn", backend=KERNEL, tiles=(32, 32), layout="boxes", **params)
    qo, kvo = fn.layout.q_order.to(device), fn.layout.kv_order.to(device)
    assert not torch.equal(qo.cpu(), torch.arange(len(qo)))
    perm = {"q": qo, "k": kvo, "v": kvo, "out": qo, "dq": qo, "dk": kvo, "dv": kvo}
    x = {n: t.to(device) for n, t in _inputs(100, 100, seed=14).items()}
    g = torch.randn(1, 2, 100, 16, generator=_gen(15)).to(device)
    row = _run(fn, x, g)
    res = _run(fn, {n: t[:, :, perm[n]] for n, t in x.items()}, g[:, :, qo], kernel_order=True)
    for name, t in res.items():
        want = row[name][:, :, perm[name]]
        assert (t - want).abs().max().item() <= 1e-6 * want.abs().max().item(), name


def test_strided_inputs_and_upstream_gradients(device):
    """q, k, v as transposed [B, N, H, D] views (how models hold them) and upstream gradients that
    are not contiguous: transposed, or the stride-0 expansion out.sum() sends."""
    fn = attnc.compile(SPECS / "alibi_causal.attn", backend=KERNEL, tiles=(16, 16), N=45)
    ref = attnc.compile(SPECS / "alibi_causal.attn", backend="reference", N=45)
    x = _inputs(45, 45, b=2, hq=2, hkv=1, tables=_slopes, seed=16)
    for upstream in ("transposed", "sum"):
        leaves = {n: (t.transpose(1, 2).contiguous().to(device).transpose(1, 2) if n in QKV else t.to(device))
                  .detach().requires_grad_() for n, t in x.items()}
        assert not leaves["q"].is_contiguous()
        out = fn(leaves["q"], leaves["k"], leaves["v"], slopes=leaves["slopes"])
        if upstream == "sum":
            out.sum().backward()
            g = torch.ones(2, 2, 45, 16, dtype=torch.float64)
        else:
            g = torch.randn(2, 45, 2, 16, generator=_gen(17)).to(device).transpose(1, 2)
            out.backward(g)
        kern = {"out": out.detach(), **{"d" + n: t.grad for n, t in leaves.items()}}
        low = _run(ref, {n: t.detach() for n, t in leaves.items()}, g.to(device, torch.float32))
        gold = _run(ref, {n: t.detach().cpu().double() for n, t in leaves.items()}, g.cpu().double())
        bad = _errors(kern, low, gold, torch.float32)
        assert not bad, f"{upstream}: {bad}"


# -- 5. determinism ---------------------------------------------------------------------------------
DETERMINISM = [
    ("swin_bias-per_head", "swin_bias", dict(H=7, W=7), dict(tables=_rel_bias(True)), (16, 16)),
    ("alibi_causal", "alibi_causal", dict(N=77), dict(tables=_slopes), (16, 16)),
    ("softcap_sink", "softcap_sink", dict(N=77, W=30, cap=3.0), dict(tables=_sinks), (16, 16)),
]


@pytest.mark.parametrize("spec,params,kw,tiles", [c[1:] for c in DETERMINISM], ids=[c[0] for c in DETERMINISM])
def test_backward_is_deterministic(spec, params, kw, tiles, device):
    """Two backward passes give bitwise-equal gradients: tables, sinks, and dk / dv summed over the
    query heads of a group (DESIGN.md section 5: no floating-point atomics by default)."""
    fn = attnc.compile(SPECS / f"{spec}.attn", backend=KERNEL, tiles=tiles, **params)
    b = fn.compiled.bound
    x = {n: t.to(device) for n, t in _inputs(b.nq, b.nk, b=1, hq=4, hkv=2, seed=5, **kw).items()}
    g = torch.randn(1, 4, b.nq, 16, generator=_gen(6)).to(device)
    first, second = _run(fn, x, g), _run(fn, x, g)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{spec}: {name} differs between two runs"


# -- 6. integer tensors ------------------------------------------------------------------------------
_DOCS_ALIBI = """attention docs_alibi(N) {
    q, kv = seq(N)
    mask  = causal and doc[q.i] == doc[k.i]
    bias  = -slopes[head] * (q.i - k.i)
}"""


def test_document_ids_with_a_float_table(device):
    """Document ids (any integer dtype, or bool) drive the mask, per call, while gradients flow to
    q, k, v and the slopes: one compiled function, two partitions, each against the reference."""
    for lengths in ([5, 30, 10], [40, 5]):
        ids = _doc(lengths)
        _check(_DOCS_ALIBI, dict(N=45), torch.float32, device, tiles=(16, 16), tables=_slopes, ints=ids,
               what=f"docs_alibi {lengths}")
        results = []
        fn = attnc.compile(_DOCS_ALIBI, backend=KERNEL, tiles=(16, 16), N=45)
        x = {n: t.to(device) for n, t in _inputs(45, 45, tables=_slopes).items()}
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            doc = ids["doc"].to(device, dtype)
            results.append(_run(fn, x, torch.ones(1, 2, 45, 16, device=device), {"doc": doc}))
            assert doc.grad is None and not doc.requires_grad
        for other in results[1:]:
            for name in other:
                assert torch.equal(other[name], results[0][name]), name
    with pytest.raises(RuntimeError):  # torch itself: integer tensors cannot ask for gradients
        torch.zeros(3, dtype=torch.int64).requires_grad_()


def test_bool_ids(device):
    spec = "attention b(N) { q, kv = seq(N)  mask = causal and keep[k.i] == 1  bias = -slopes[head] * (q.i - k.i) }"
    keep = {"keep": torch.arange(40) % 3 != 1}
    _check(spec, dict(N=40), torch.float32, device, tiles=(16, 16), tables=_slopes, ints=keep)


def test_tables_keep_their_dtype(device):
    """float16 q, k, v with float32 tables (mixed precision: the table is a float32 parameter): the
    table's gradient is float32 and passes the float16 discipline."""
    for spec, params, tables in (("swin_bias", dict(H=7, W=7), _rel_bias(True)),
                                 ("alibi_causal", dict(N=45), _slopes)):
        fn = attnc.compile(SPECS / f"{spec}.attn", backend=KERNEL, tiles=(16, 16), **params)
        ref = attnc.compile(SPECS / f"{spec}.attn", backend="reference", **params)
        b = ref.compiled.bound
        x = _inputs(b.nq, b.nk, tables=tables, seed=2)
        x = {n: t.to(device, torch.float16 if n in QKV else torch.float32) for n, t in x.items()}
        g = torch.randn(1, 2, b.nq, 16, generator=_gen(3)).to(device, torch.float16)
        kern, low = _run(fn, x, g), _run(ref, x, g)
        gold = _run(ref, {n: t.cpu().double() for n, t in x.items()}, g.cpu().double())
        table = next(n for n in x if n not in QKV)
        assert kern["d" + table].dtype == torch.float32
        bad = _errors({"d" + table: kern["d" + table]}, low, {"d" + table: gold["d" + table]}, torch.float16)
        assert not bad, f"{spec}: {bad}"


def test_gradients_only_where_asked(device):
    """Only some inputs require grad: those get the same gradients as in the full run, the others none."""
    fn = attnc.compile(SPECS / "alibi_causal.attn", backend=KERNEL, tiles=(16, 16), N=45)
    x = {n: t.to(device) for n, t in _inputs(45, 45, hq=4, hkv=2, tables=_slopes, seed=9).items()}
    g = torch.randn(1, 4, 45, 16, generator=_gen(10)).to(device)
    full = _run(fn, x, g)
    for wanted in (["slopes"], ["v"], ["q", "k"]):
        leaves = {n: t.detach().clone().requires_grad_(n in wanted) for n, t in x.items()}
        out = fn(leaves["q"], leaves["k"], leaves["v"], slopes=leaves["slopes"])
        out.backward(g)
        for n, t in leaves.items():
            if n in wanted:
                assert torch.equal(t.grad, full["d" + n]), (wanted, n)
            else:
                assert t.grad is None, (wanted, n)


@pytest.mark.parametrize("spec,params,tables", [("causal", dict(N=45), None),
                                                ("softcap_sink", dict(N=45, W=12, cap=3.0), _sinks),
                                                ("alibi_causal", dict(N=45), _slopes)])
@pytest.mark.parametrize("through", ["lse", "out_and_lse"])
def test_gradients_through_the_logsumexp(spec, params, tables, through, device):
    """out, lse = fn(..., return_lse=True): a loss that reads lse (alone, or with out) gets its
    gradients, sinks and tables included, as the reference computes them."""
    fn = attnc.compile(SPECS / f"{spec}.attn", backend=KERNEL, tiles=(16, 16), **params)
    ref = attnc.compile(SPECS / f"{spec}.attn", backend="reference", **params)
    x32 = _inputs(45, 45, hq=4, hkv=2, tables=tables, seed=18)
    gen = _gen(19)
    w_out, w_lse = torch.randn(1, 4, 45, 16, generator=gen), torch.randn(1, 4, 45, generator=gen)

    def run(f, x, dtype):
        leaves = {n: t.to(dtype).detach().clone().requires_grad_() for n, t in x.items()}
        out, lse = f(leaves["q"], leaves["k"], leaves["v"], return_lse=True,
                     **{n: t for n, t in leaves.items() if n not in QKV})
        loss = (lse * w_lse.to(lse.device, lse.dtype)).sum()
        if through == "out_and_lse":
            loss = loss + (out * w_out.to(out.device, out.dtype)).sum()
        loss.backward()
        # lse does not read v: its gradient is None (the reference) or zeros; compare as zeros.
        return {"out": out.detach(), "lse": lse.detach(),
                **{"d" + n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}}

    x = {n: t.to(device) for n, t in x32.items()}
    kern, low = run(fn, x, torch.float32), run(ref, x, torch.float32)
    gold = run(ref, {n: t.cpu() for n, t in x.items()}, torch.float64)
    bad = _errors(kern, low, gold, torch.float32)
    assert not bad, f"{spec} through {through}: {bad}"


def test_backward_outlives_the_callable(device):
    """The autograd graph holds what backward needs: `attnc.compile(...)(q, k, v)` with no
    reference kept to the callable (a one-off call, a model rebuilt between steps) still backprops."""
    import gc

    x = {n: t.to(device) for n, t in _inputs(40, 40, tables=_slopes, seed=12).items()}
    g = torch.randn(1, 2, 40, 16, generator=_gen(13)).to(device)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    out = attnc.compile(SPECS / "alibi_causal.attn", backend=KERNEL, tiles=(16, 16), N=40)(
        leaves["q"], leaves["k"], leaves["v"], slopes=leaves["slopes"])
    gc.collect()
    out.backward(g)
    keep = attnc.compile(SPECS / "alibi_causal.attn", backend=KERNEL, tiles=(16, 16), N=40)
    want = _run(keep, x, g)
    for n, t in leaves.items():
        assert torch.equal(t.grad, want["d" + n]), n


# -- 7. double backward ------------------------------------------------------------------------------
@kernels_only
@pytest.mark.parametrize("spec,params,tables", [("causal", dict(N=40), None),
                                                ("swin_bias", dict(H=7, W=7), _rel_bias(False))])
def test_double_backward_is_refused(spec, params, tables, device):
    fn = attnc.compile(SPECS / f"{spec}.attn", tiles=(16, 16), **params)
    b = fn.compiled.bound
    x = {n: t.to(device).requires_grad_() for n, t in _inputs(b.nq, b.nk, tables=tables).items()}
    out = fn(x["q"], x["k"], x["v"], **{n: t for n, t in x.items() if n not in QKV})
    with pytest.raises(AttncError):
        dq, = torch.autograd.grad(out, x["q"], torch.ones_like(out), create_graph=True)
        dq.square().sum().backward()


# -- 8. random specs --------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(random_specs(), st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32])),
       st.sampled_from([(2, 2, 16, 16), (2, 1, 16, 32)]), st.integers(0, 2**16))
def test_random_spec_gradients(case, tiles, heads, seed):
    source, params, _ = case
    schedule = attnc.compile(source, tiles=tiles, **params).schedule
    assume(schedule.q_tiles * schedule.kv_tiles <= 16)  # keep the interpreter fast
    hq, hkv, d, dv = heads
    _check(source, params, torch.float32, DEVICE, tiles=tiles, hq=hq, hkv=hkv, d=d, dv=dv, seed=seed,
           what=source)


# -- 9. torch.compile ---------------------------------------------------------------------------------
# The callable must trace into one graph (fullgraph=True raises at a graph break) forward and
# backward, under AOTAutograd (backend "aot_eager": the joint graph, no inductor codegen). dynamic=True
# marks sizes symbolic from the first compile, so a new batch size must reuse the graph: a guard on
# the batch (a size read as a Python int, a host sync) would recompile and show in frame_count.
# Batch sizes 3 and 5 differ from every other size, so duck sizing adds no guard of its own.
def _compiled_vs_eager(spec, params, tables, device):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    fn = attnc.compile(SPECS / f"{spec}.attn", tiles=(16, 16), **params)
    b = fn.compiled.bound

    def f(q, k, v, tables):
        return fn(q, k, v, **tables) * 2.0

    counter = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, fullgraph=True, backend=counter, dynamic=True)
    for batch in (3, 5):
        x = {n: t.to(device) for n, t in _inputs(b.nq, b.nk, b=batch, hq=2, hkv=2, tables=tables, seed=batch).items()}
        g = torch.randn(batch, 2, b.nq, 16, generator=_gen(batch)).to(device)
        results = []
        for call in (cf, f):
            leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
            out = call(leaves["q"], leaves["k"], leaves["v"], {n: t for n, t in leaves.items() if n not in QKV})
            out.backward(g)
            results.append({"out": out.detach(), **{"d" + n: t.grad for n, t in leaves.items()}})
        for name, want in results[1].items():
            got = results[0][name]
            assert got is not None, name
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{spec} batch {batch}: {name}")
    assert counter.frame_count == 1, f"{spec}: compiled {counter.frame_count} times for batch sizes 3 and 5"


@kernels_only
def test_torch_compile_causal(device):
    _compiled_vs_eager("causal", dict(N=40), None, device)


@kernels_only
def test_torch_compile_alibi_with_a_table(device):
    _compiled_vs_eager("alibi_causal", dict(N=40), _slopes, device)


# -- regressions from review ------------------------------------------------------------------------
NAN_AT_HIDDEN = """attention nan_at_hidden(N) {
    q, kv = seq(N)
    mask  = causal
    bias  = log(q.i - k.i + 1)
    score = SCORE
}"""


@pytest.mark.parametrize("score", ["softmax(softcap = 5.0)", "sigmoid(bias = -3.0)"])
def test_a_bias_that_is_nan_where_hidden_leaves_gradients_finite(score, device):
    """log(q.i - k.i + 1) is nan at hidden pairs (k after q): the soft-cap's and sigmoid's
    derivatives there must not turn zero gradients into nan, on either backend."""
    _check(NAN_AT_HIDDEN.replace("SCORE", score), dict(N=40), torch.float32, device, tiles=(16, 16))


def test_padding_rows_of_full_tiles_add_nothing_to_dk_dv(device):
    """The bias is nan on the padding rows past N of the last q tile (log of a negative), and that
    tile is FULL: dK/dV sums over rows, so the padding must contribute exact zeros."""
    spec = "attention pad(N) {\n    q, kv = seq(N)\n    bias = log(N - q.i)\n}"
    kern, _ = _check(spec, dict(N=40), torch.float32, device, tiles=(32, 32))
    assert all(torch.isfinite(t).all() for t in kern.values())


def test_gradients_at_zero_follow_torch_conventions(device):
    """abs'(0) = 0 and max splits a tie evenly, as torch does: zero-initialised tables (the
    module's default) meet both on the first step."""
    spec = """attention at_zero(N) {
        q, kv = seq(N)
        mask  = causal
        bias  = -abs(t[head]) * (q.i - k.i) + max(u[0], u[1])
    }"""
    _check(spec, dict(N=40), torch.float32, device, tiles=(16, 16),
           tables=lambda hq, g: {"t": torch.zeros(hq), "u": torch.zeros(2)})


def test_tables_that_want_no_gradient_get_none_and_cost_nothing(device):
    fn = attnc.compile(SPECS / "swin_bias.attn", tiles=(32, 32), H=7, W=7)
    q, k, v = (torch.randn(1, 2, 49, 16, generator=_gen(s)).to(device) for s in range(3))
    table = torch.randn(13, 13, generator=_gen(3)).to(device)  # frozen: no requires_grad
    leaf = q.clone().requires_grad_()
    fn(leaf, k, v, rel_bias=table).sum().backward()
    ref_q = q.cpu().double().requires_grad_()
    attnc.compile(SPECS / "swin_bias.attn", backend="reference", H=7, W=7)(
        ref_q, k.cpu().double(), v.cpu().double(), rel_bias=table.cpu().double()).sum().backward()
    assert table.grad is None
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_q.grad, rtol=0, atol=1e-5)


@kernels_only
def test_torch_compile_with_strided_inputs_and_a_permuting_layout(device):
    """Compiled graphs check the backward's output strides against its fake implementation:
    q, k, v as transposed views, a layout that permutes, and a transposed table."""
    torch._dynamo.reset()
    fn = attnc.compile(SPECS / "swin_bias.attn", tiles=(16, 16), layout="boxes", H=7, W=14)
    assert fn.layout.name != "row_major"

    def f(x, table):
        q = x.view(1, 98, 2, 16).transpose(1, 2)
        return fn(q, q, q, rel_bias=table.t()).square().sum()

    x = torch.randn(1, 98, 32, generator=_gen(0)).to(device)
    table = torch.randn(13, 13, generator=_gen(1)).to(device)
    grads = []
    for call in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        leaves = [x.clone().requires_grad_(), table.clone().requires_grad_()]
        call(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@kernels_only
@pytest.mark.parametrize("spec,params,kw", [
    ("natten2d", dict(H=10, W=11, kernel=5, dilation=2), dict()),
    ("swin_bias", dict(H=7, W=14), dict(tables=_rel_bias(True))),
    ("moba", dict(N=70, B=16, K=2), dict(hq=4, hkv=2)),
    ("softcap_sink", dict(N=70, W=20, cap=3.0), dict(tables=_sinks)),
    ("softplus", dict(N=70), dict()),
    ("sigmoid_causal", dict(N=70), dict()),
])
def test_kernels_take_tiles_in_pieces(spec, params, kw, device, monkeypatch):
    """Every kernel may take a q tile SUB_M rows and a kv tile SUB_N columns at a time (fewer
    live registers: codegen/target.sub_tiles, float32 on a GPU, and the backward at large head
    dims); forced here for all three at head dim 16: 64 x 32 tiles in 16 x 16 pieces."""
    from attnc.backends.triton import launch

    monkeypatch.setattr(launch, "sub_tiles", lambda kernel, arch, dtype, head_dim, block_m, block_n, ir:
                        (min(block_m, 16), min(block_n, 16)))
    _check(SPECS / f"{spec}.attn", params, torch.float32, device, tiles=(64, 32), **kw)


@kernels_only
@pytest.mark.parametrize("spec,params,kw", [
    ("swin_bias", dict(H=7, W=14), dict(tables=_rel_bias(True), d=48)),
    ("moba", dict(N=70, B=16, K=2), dict(hq=4, hkv=2, d=40, dv=24)),
    ("softplus", dict(N=70), dict(d=16, dv=48)),
    ("causal", dict(N=77), dict(d=48, dv=40)),
])
def test_backward_takes_the_head_dim_in_chunks(spec, params, kw, device, monkeypatch):
    """dQ and dK/dV may multiply q.k and do.v D_CHUNK head-dim columns at a time, reloading each
    chunk (codegen/target.head_chunk: float32 above head dim 64 on a GPU); forced here to 16
    columns, with head dims that are not multiples of the chunk and Dv unlike D."""
    from attnc.backends.triton import launch

    monkeypatch.setattr(launch, "head_chunk", lambda kernel, arch, dtype, head_dim: 16)
    _check(SPECS / f"{spec}.attn", params, torch.float32, device, tiles=(32, 32), **kw)
