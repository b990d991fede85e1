"""attnc.module.Attention: the nn.Module that owns a spec's learned float tables (bias tables,
sink logits), sized from the spec, and trains them on both backends."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import attnc
from attnc import AttncError
from attnc.module import Attention, alibi_slopes
from tests.test_specs import SPECS

SWIN = SPECS / "swin_bias.attn"
ALIBI = SPECS / "alibi_causal.attn"
SINK = SPECS / "softcap_sink.attn"
DOC = SPECS / "document_causal.attn"
TILES = (16, 16)


def _qkv(heads: int, n: int, d: int = 8, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, heads, n, d, generator=g).to(device) for _ in range(3))


# -- shapes -------------------------------------------------------------------------------------
def test_swin_bias_per_head_and_shared_tables():
    per_head = Attention(SWIN, heads=3, H=14, W=14, tiles=TILES)
    assert isinstance(per_head.rel_bias, nn.Parameter)
    assert per_head.table_shapes == {"rel_bias": (3, 13, 13)}  # Swin's (2M - 1)^2 per head
    shared = Attention(SWIN, H=14, W=14, tiles=TILES)
    assert shared.table_shapes == {"rel_bias": (13, 13)}
    assert [n for n, _ in shared.named_parameters()] == ["rel_bias"]
    assert isinstance(per_head.fn, attnc.AttentionFn)
    for m in (per_head, shared):
        assert m.rel_bias.dtype == torch.get_default_dtype()
        assert not m.rel_bias.any()  # zeros: plain windowed attention at init


def test_head_indexed_tables_take_the_head_count():
    alibi = Attention(ALIBI, heads=6, N=32, tiles=TILES)
    assert alibi.table_shapes == {"slopes": (6,)}
    sink = Attention(SINK, heads=4, N=32, W=8, tiles=TILES)
    assert sink.table_shapes == {"sinks": (4,)}
    assert not sink.sinks.any()
    # a table indexed past the head (`t[head + 2]`) is sized by what the spec reads
    wide = Attention("attention w(N) { q, kv = seq(N)  bias = t[head + 2] }", heads=3, N=16, tiles=TILES)
    assert wide.table_shapes == {"t": (5,)}


def test_integer_tensors_are_not_owned():
    m = Attention(DOC, N=32, tiles=TILES)
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    assert m.table_shapes == {}


@pytest.mark.parametrize("spec,params", [(ALIBI, dict(N=32)), (SINK, dict(N=32, W=8))])
def test_missing_heads_is_an_error_with_a_hint(spec, params):
    with pytest.raises(AttncError, match="by `head`") as err:
        Attention(spec, **params)
    assert "heads=" in err.value.hint
    with pytest.raises(AttncError, match="heads must be a positive int"):
        Attention(spec, heads=0, **params)


# -- init and frozen ----------------------------------------------------------------------------
def test_init_overrides_and_is_copied():
    slopes = alibi_slopes(4)
    m = Attention(ALIBI, heads=4, N=32, tiles=TILES, init={"slopes": slopes})
    assert torch.equal(m.slopes.detach(), slopes)
    slopes.zero_()  # a copy: the caller's tensor is not the parameter
    assert m.slopes.detach().ne(0).all()
    table = torch.randn(3, 13, 13, dtype=torch.float64)
    m = Attention(SWIN, heads=3, H=14, W=14, tiles=TILES, init={"rel_bias": table})
    assert m.rel_bias.dtype == torch.get_default_dtype()
    assert torch.allclose(m.rel_bias.detach().double(), table)


def test_init_shape_and_name_are_checked():
    with pytest.raises(AttncError, match=r"init\['slopes'\] has shape \[3\]; the table has shape \[4\]"):
        Attention(ALIBI, heads=4, N=32, init={"slopes": torch.zeros(3)})
    with pytest.raises(AttncError, match=r"has shape \[13, 13\]; the table has shape \[2, 13, 13\]"):
        Attention(SWIN, heads=2, H=14, W=14, init={"rel_bias": torch.zeros(13, 13)})
    with pytest.raises(AttncError, match="no float table 'slope'") as err:
        Attention(ALIBI, heads=4, N=32, init={"slope": torch.zeros(4)})
    assert "slopes" in err.value.hint
    with pytest.raises(AttncError, match="no float table 'doc'") as err:
        Attention(DOC, N=32, init={"doc": torch.zeros(32)})
    assert "pass it to forward" in err.value.hint
    with pytest.raises(AttncError, match="no float table 'sink'"):
        Attention(SINK, heads=2, N=32, frozen=("sink",))


def test_frozen_tables_are_buffers():
    m = Attention(ALIBI, heads=4, N=32, tiles=TILES, init={"slopes": alibi_slopes(4)}, frozen=("slopes",))
    assert list(m.parameters()) == []
    assert [n for n, _ in m.named_buffers()] == ["slopes"]
    assert "slopes" in m.state_dict()
    assert not m.slopes.requires_grad
    assert "slopes[4] frozen" in repr(m)


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    # not a power of two: the 4-head slopes, then every other slope of the 8-head ones
    assert torch.allclose(alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                         2.0 ** -1, 2.0 ** -3]))


def test_a_table_named_like_a_module_attribute_is_refused():
    for name in ("forward", "table_shapes", "training", "fn", "heads"):
        with pytest.raises(AttncError, match=f"'{name}'.*already uses") as err:
            Attention(f"attention a(N) {{ q, kv = seq(N)  bias = {name}[head] }}", heads=2, N=16)
        assert "rename" in err.value.hint


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_is_the_function_with_the_tables(backend, device):
    dev = device if backend == "triton" else "cpu"
    m = Attention(SWIN, heads=2, H=14, W=14, backend=backend, tiles=TILES, layout="boxes",
                  init={"rel_bias": torch.randn(2, 13, 13)}).to(dev)
    assert not torch.equal(m.fn.layout.q_order, torch.arange(14 * 14))
    q, k, v = _qkv(2, 14 * 14, device=dev)
    with torch.no_grad():
        out, lse = m(q, k, v, return_lse=True)
        expect, expect_lse = m.fn(q, k, v, rel_bias=m.rel_bias, return_lse=True)
        assert torch.equal(out, expect) and torch.equal(lse, expect_lse)
        # kernel_order passes through: tokens in, and out, in the layout's order
        order = m.fn.layout.q_order.to(dev)
        ko = m(q[:, :, order], k[:, :, order], v[:, :, order], kernel_order=True)
        assert torch.allclose(ko, out[:, :, order], atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_integer_tensors_pass_per_call(backend, device):
    dev = device if backend == "triton" else "cpu"
    m = Attention(DOC, N=32, backend=backend, tiles=TILES)
    q, k, v = _qkv(2, 32, device=dev)
    doc = torch.tensor([0] * 10 + [1] * 22, device=dev)
    with torch.no_grad():
        assert torch.equal(m(q, k, v, doc=doc), m.fn(q, k, v, doc=doc))
        with pytest.raises(AttncError, match="reads runtime tensor 'doc'"):
            m(q, k, v)


def test_an_owned_table_passed_at_call_is_an_error():
    m = Attention(SINK, heads=2, N=32, W=8, backend="reference")
    q, k, v = _qkv(2, 32)
    with pytest.raises(AttncError, match="'sinks' is a table this module owns"):
        m(q, k, v, sinks=torch.zeros(2))
    frozen = Attention(ALIBI, heads=2, N=32, backend="reference", frozen=("slopes",))
    with pytest.raises(AttncError, match="'slopes' is a table this module owns.*a buffer"):
        frozen(q, k, v, slopes=torch.zeros(2))
    with pytest.raises(AttncError, match="reads no runtime tensor 'doc'"):
        m(q, k, v, doc=torch.zeros(32, dtype=torch.int64))


def test_heads_must_match_q():
    m = Attention(SINK, heads=2, N=32, W=8, backend="reference")
    q, k, v = _qkv(4, 32)
    with pytest.raises(AttncError, match="q has 4 heads but this Attention was built with heads=2"):
        m(q, k, v)


def test_extra_repr_names_spec_params_backend_layout_and_tables():
    m = Attention(SWIN, heads=2, H=14, W=14, tiles=TILES, layout="row_major")
    text = repr(m)
    for part in ("swin_bias(H=14, W=14)", "backend=triton", "layout=row_major", "heads=2", "rel_bias[2, 13, 13]"):
        assert part in text, text
    assert "softcap_sink(N=32, W=8, cap=50.0)" in repr(Attention(SINK, heads=2, N=32, W=8, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_state_dict_deepcopy_and_pickle(backend, device):
    dev = device if backend == "triton" else "cpu"
    a = Attention(SINK, heads=2, N=32, W=8, backend=backend, tiles=TILES, init={"sinks": torch.randn(2)}).to(dev)
    b = Attention(SINK, heads=2, N=32, W=8, backend=backend, tiles=TILES).to(dev)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sinks, b.sinks)
    c = copy.deepcopy(a)  # as EMA and model averaging do: the tables copied, the kernels shared
    assert c.fn is a.fn and torch.equal(c.sinks, a.sinks) and c.sinks is not a.sinks
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    d = torch.load(buf, weights_only=False)  # compiles the spec again
    assert d.fn is not a.fn and repr(d) == repr(a)
    q, k, v = _qkv(2, 32, device=dev)
    with torch.no_grad():
        expect = a(q, k, v)
        del a
        assert torch.equal(c(q, k, v), expect)
        assert torch.equal(d(q, k, v), expect)


# -- training -----------------------------------------------------------------------------------
N, HEADS, D = 32, 2, 8
WIDTH = HEADS * D


class Block(nn.Module):
    """x [B, N, WIDTH] -> x + out(attention(qkv(x)))."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.attn = attn
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        y = self.attn(q.contiguous(), k.contiguous(), v.contiguous())
        return x + self.out(y.transpose(1, 2).reshape(b, N, WIDTH))


def _toy_model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, WIDTH),
        # ALiBi slopes start at the paper's values and are learned here (they are fixed there)
        Block(Attention(ALIBI, heads=HEADS, N=N, backend=backend, tiles=TILES, init={"slopes": alibi_slopes(HEADS)})),
        Block(Attention(SINK, heads=HEADS, N=N, W=8, cap=5.0, backend=backend, tiles=TILES)),
        nn.Linear(WIDTH, 1),
    )


def _train(backend: str, device: str, steps: int = 8):
    model = _toy_model(backend).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, 4, generator=g).to(device)
    target = x[..., :1].cumsum(1).div(4).to(device)  # causal: a running sum of the first feature
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, table_grads = [], {}
    for step in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        if step == 0:
            table_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                           if name.endswith(("slopes", "sinks"))}
        opt.step()
        losses.append(loss.item())
    return losses, table_grads


def _check_training(losses, table_grads):
    assert sorted(n.split(".")[-1] for n in table_grads) == ["sinks", "slopes"]
    for name, grad in table_grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, grad)
    assert losses[-1] < 0.9 * losses[0], losses


def test_toy_model_trains_on_the_reference_backend():
    _check_training(*_train("reference", "cpu"))


def test_toy_model_trains_on_the_triton_backend(device):
    """Needs the triton backend's backward kernels (DESIGN.md section 5)."""
    _check_training(*_train("triton", device))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_table_gradients_match_the_reference_and_are_deterministic(backend, device):
    dev = device if backend == "triton" else "cpu"
    m = Attention(SINK, heads=2, N=32, W=8, backend=backend, tiles=TILES,
                  init={"sinks": torch.tensor([0.5, -1.0])}).to(dev)
    ref = Attention(SINK, heads=2, N=32, W=8, backend="reference", init={"sinks": torch.tensor([0.5, -1.0])}).double()
    q, k, v = _qkv(2, 32)
    w = torch.randn(2, 2, 32, 8, generator=torch.Generator().manual_seed(3))

    def grads(mod, dev, dtype):
        qq, kk, vv = (t.to(dev, dtype).detach().clone().requires_grad_() for t in (q, k, v))
        mod.zero_grad()
        (mod(qq, kk, vv) * w.to(dev, dtype)).sum().backward()
        return [t.grad.double().cpu() for t in (qq, kk, vv, mod.sinks)]

    first, second, expect = grads(m, dev, torch.float32), grads(m, dev, torch.float32), grads(ref, "cpu", torch.float64)
    for a, b, e in zip(first, second, expect):
        assert torch.equal(a, b)  # bitwise: no floating-point atomics
        assert (a - e).abs().max().item() < 1e-4


def test_torch_compile_fullgraph(device):
    """The triton path is a custom op with its own autograd: no graph break, same results."""
    m = Attention(SINK, heads=2, N=32, W=8, tiles=TILES, init={"sinks": torch.tensor([0.5, -1.0])}).to(device)
    compiled = torch.compile(m, fullgraph=True)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 32, device=device))
    results = []
    for fn in (compiled, m):
        m.zero_grad()
        out = fn(q, k, v)
        out.square().sum().backward()
        results.append((out.detach(), m.sinks.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
