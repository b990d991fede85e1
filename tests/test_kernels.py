"""Generated forward kernels against the float64 reference: shapes, dtypes, layouts, edge rows."""
import math
import warnings

import numpy as np
import pytest
import torch

import attnc
from tests import oracles
from tests.test_specs import _qkv

CAUSAL = "attention c(N) { q, kv = seq(N) mask = causal }"


def _check(fn, q, k, v, atol=1e-4):
    ref = attnc.compile(fn.spec, backend="reference", **fn.params)
    with torch.no_grad():
        out = fn(q, k, v)
    expect = ref(q.cpu().double(), k.cpu().double(), v.cpu().double())
    assert out.dtype == q.dtype and out.shape == expect.shape
    assert (out.cpu().double() - expect).abs().max().item() < atol
    return out, expect


def test_gqa_and_odd_head_dims(device):
    fn = attnc.compile(CAUSAL, tiles=(16, 32), N=50)
    q, k, v = _qkv(50, 50, heads=4, hkv=2, d=24, dv=40, device=device)
    out, _ = _check(fn, q, k, v)
    assert out.shape == (1, 4, 50, 40)


def test_non_contiguous_inputs(device):
    fn = attnc.compile(CAUSAL, tiles=(16, 16), N=40)
    g = torch.Generator().manual_seed(1)
    # [B, N, H, D] storage viewed as [B, H, N, D], as projections usually produce.
    q, k, v = (torch.randn(2, 40, 2, 16, generator=g).to(device).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    _check(fn, q, k, v)


def test_float16_error_within_eager_error(device):
    """FlexAttention's criterion: kernel error vs float64 at most a small multiple of eager fp16 error."""
    fn = attnc.compile("specs/sliding_window.attn", tiles=(32, 32), N=70, W=9)
    ref = attnc.compile("specs/sliding_window.attn", backend="reference", N=70, W=9)
    q, k, v = _qkv(70, 70, dtype=torch.float16, device=device)
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    gold = ref(q.cpu().double(), k.cpu().double(), v.cpu().double())
    eager = ref(q.cpu().float(), k.cpu().float(), v.cpu().float()).half().double()
    assert (out - gold).abs().max() <= 3 * (eager - gold).abs().max() + 1e-3


def test_rows_that_see_nothing_output_zero_and_lse_minus_inf(device):
    spec = "attention late(N) { q, kv = seq(N) mask = causal and q.i >= 20 and k.i >= 3 }"
    fn = attnc.compile(spec, tiles=(16, 16), N=45)
    q, k, v = _qkv(45, 45, device=device)
    with torch.no_grad():
        out, lse = fn(q, k, v, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all()
    assert (out[:, :, :20] == 0).all()
    assert torch.isneginf(lse[:, :, :20]).all()
    _check(fn, q, k, v)
    # logsumexp of the visible scores, from the float64 reference definition.
    s = (q.cpu().double() @ k.cpu().double().transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(~fn.mask(), float("-inf"))
    assert torch.allclose(lse[:, :, 20:].double(), torch.logsumexp(s, -1)[:, :, 20:], atol=1e-4)


def test_mask_false_everywhere(device):
    fn = attnc.compile("attention none(N) { q, kv = seq(N) mask = false }", N=20)
    assert fn.schedule.stats()["tiles_empty"] == fn.schedule.stats()["tiles"]
    q, k, v = _qkv(20, 20, device=device)
    with torch.no_grad():
        assert (fn(q, k, v) == 0).all()


@pytest.mark.parametrize("m,n", [(30, 70), (70, 30), (33, 33)])
def test_cross_attention_bottom_right_causal(m, n, device):
    spec = "attention x(M, N) { q = seq(M) kv = seq(N) mask = causal }"
    fn = attnc.compile(spec, tiles=(16, 16), M=m, N=n)
    np.testing.assert_array_equal(fn.mask().numpy(), oracles.causal_mask(m, n))
    q, k, v = _qkv(m, n, device=device)
    out, expect = _check(fn, q, k, v)
    assert torch.allclose(expect, oracles.attention(q.cpu(), k.cpu(), v.cpu(), oracles.causal_mask(m, n)))


def test_three_d_grid_predicate(device):
    spec = """attention video(T, H, W) {
        q, kv = grid(T, H, W)
        mask = k.t <= q.t and abs(q.y - k.y) <= 1 and abs(q.x - k.x) <= 2
    }"""
    fn = attnc.compile(spec, tiles=(32, 32), T=3, H=5, W=6)
    t, y, x = np.meshgrid(np.arange(3), np.arange(5), np.arange(6), indexing="ij")
    t, y, x = t.ravel(), y.ravel(), x.ravel()
    expect = (t[None] <= t[:, None]) & (abs(y[:, None] - y[None]) <= 1) & (abs(x[:, None] - x[None]) <= 2)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    _check(fn, *_qkv(90, 90, device=device))


def test_negative_floor_division_and_modulo(device):
    # Floor semantics on negative operands, where Triton's own // and % truncate.
    spec = "attention f(N, d = -3) { q, kv = seq(N) mask = (q.i - k.i) // d == (k.i - 2 * q.i) % d + 1 or k.i == q.i }"
    fn = attnc.compile(spec, tiles=(16, 16), N=40)
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    expect = ((i - j) // -3 == (j - 2 * i) % -3 + 1) | (i == j)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    _check(fn, *_qkv(40, 40, device=device))


def test_int64_when_int32_could_overflow(device):
    spec = "attention big(N, M = 100000000) { q, kv = seq(N) mask = q.i * M - k.i * M < 3 * M }"
    fn = attnc.compile(spec, tiles=(16, 16), N=40)
    assert fn.compiled.int64
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    np.testing.assert_array_equal(fn.mask().numpy(), i - j < 3)
    _check(fn, *_qkv(40, 40, device=device))
    assert not attnc.compile(CAUSAL, N=40).compiled.int64


def test_custom_scale_expression(device):
    spec = "attention s(N, t = 0.25) { q, kv = seq(N) mask = causal score = softmax(scale = t * log(N) / sqrt(head_dim)) }"
    fn = attnc.compile(spec, tiles=(16, 16), N=33)
    q, k, v = _qkv(33, 33, device=device)
    _, expect = _check(fn, q, k, v)
    scale = 0.25 * math.log(33) / math.sqrt(32)
    assert torch.allclose(expect, oracles.attention(q.cpu(), k.cpu(), v.cpu(), oracles.causal_mask(33, 33), scale))


def test_same_block(device):
    spec = "attention blocks(H, W) { q, kv = grid(H, W) mask = same_block(3, 4) }"
    fn = attnc.compile(spec, tiles=(16, 16), H=7, W=9)
    y, x = np.divmod(np.arange(63), 9)
    expect = (y[:, None] // 3 == y[None] // 3) & (x[:, None] // 4 == x[None] // 4)
    np.testing.assert_array_equal(fn.mask().numpy(), expect)
    _check(fn, *_qkv(63, 63, device=device))


def test_one_kernel_source_serves_every_size():
    a = attnc.compile(CAUSAL, N=40)
    b = attnc.compile(CAUSAL, N=77)
    assert a.compiled.kernel_path == b.compiled.kernel_path
    assert "@triton.jit" in a.kernel_source


def test_corrupted_cache_entry_is_regenerated(device):
    fn = attnc.compile(CAUSAL, tiles=(16, 16), N=24)
    path = fn.compiled.kernel_path
    path.write_text(path.read_text()[:200] + "\n this is not python (\n")
    from attnc.codegen import cache

    cache._modules.clear()
    with pytest.warns(UserWarning, match="corrupted"):
        fn2 = attnc.compile(CAUSAL, tiles=(16, 16), N=24)
    assert fn2.kernel_source == fn.kernel_source
    _check(fn2, *_qkv(24, 24, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnc.compile(CAUSAL, N=24)  # the repaired entry is reused silently


# -- runtime input validation ---------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda q, k, v: (q[0], k, v), "q must have 4 dimensions"),
    (lambda q, k, v: (q, k[:, :, :10], v), "k has shape"),
    (lambda q, k, v: (q, k, v[:, :, :10]), "v has shape"),
    (lambda q, k, v: (q[:, :, :10], k, v), "q has 10 tokens"),
    (lambda q, k, v: (q, k.double(), v), "share a dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float16, bfloat16 and float32"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "floating point"),
    (lambda q, k, v: (q.repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)), "multiple of the kv heads"),
    (lambda q, k, v: (q.numpy(), k, v), "must be a torch.Tensor"),
])
def test_bad_inputs_raise_attnc_error(make, match, device):
    fn = attnc.compile(CAUSAL, N=24)
    q, k, v = _qkv(24, 24)
    with pytest.raises(attnc.AttncError, match=match):
        fn(*make(q, k, v))


def test_reference_backend_gradients():
    fn = attnc.compile("specs/longformer.attn", backend="reference", N=20, W=3, G=2)
    q, k, v = (t.double().requires_grad_() for t in _qkv(20, 20, d=8))
    torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c), (q, k, v))


@pytest.mark.parametrize("n", [40, 48])
def test_dense_mask_with_ragged_tiles(n, device):
    # A kv tile that runs past the last key is never FULL: the FULL loop has no bounds checks.
    fn = attnc.compile("attention dense(N) { q, kv = seq(N) }", tiles=(16, 32), N=n)
    classes = fn.schedule.classes
    assert (classes[:, :-1] == 2).all()
    assert (classes[:, -1] == (1 if n % 32 else 2)).all()
    _check(fn, *_qkv(n, n, device=device))


@pytest.mark.parametrize("score", ["sigmoid(bias = -2.0)", "softplus(scale = log(n_visible) / sqrt(head_dim))"])
def test_non_softmax_rows_that_see_nothing_output_zero(score, device):
    spec = f"attention e(N) {{ q, kv = seq(N) mask = causal and q.i >= 17 score = {score} }}"
    fn = attnc.compile(spec, tiles=(16, 16), N=40)
    q, k, v = _qkv(40, 40, device=device)
    out, _ = _check(fn, q, k, v)
    assert (out[:, :, :17] == 0).all() and (out[:, :, 17:] != 0).any()
    with pytest.raises(attnc.AttncError, match="return_lse needs softmax"):
        fn(q, k, v, return_lse=True)


@pytest.mark.parametrize("mask", ["abs(q.i - k.i) <= 5", "abs(q.i - k.i) < 1", "abs(k.i - q.i) < 0",
                                  "abs(q.i - 2 * k.i + 3) <= 0", "abs(q.i - k.i) <= 7 and abs(q.i % 5 - k.i % 5) < 3",
                                  # tests sharing a c: one unsigned maximum (codegen/pairs._joint_abs_tests)
                                  "abs(q.i // 6 - k.i // 6) <= 2 and abs(q.i % 6 - k.i % 6) < 3",
                                  "abs(q.i // 6 - k.i // 6) <= 1 and k.i != 4 and abs(q.i % 6 - k.i % 6) <= 1 "
                                  "and abs(q.i - k.i - 3) < 2 and abs(q.i - k.i) <= 9",
                                  "not (abs(q.i // 6 - k.i // 6) <= 0 and abs(q.i % 6 - k.i % 6) <= 0) or q.i == k.i + 20",
                                  "abs(q.i - k.i) < 0 and abs(q.i % 6 - k.i % 6) < 0 or q.i == k.i"])
def test_abs_bounds_against_the_reference(mask, device):
    """`abs(x) <= c` and `abs(x) < c` compile to one unsigned comparison (codegen/helpers._ABS_LE),
    and several in a conjunction sharing a c to one comparison of their unsigned maximum; x
    negative, zero and positive, c = 0, and `< 0` (never true) against the reference."""
    spec = f"attention a(N) {{ q, kv = seq(N) mask = {mask} }}"
    fn = attnc.compile(spec, tiles=(16, 16), N=37)
    ref = attnc.compile(spec, backend="reference", N=37)
    assert torch.equal(fn.mask(), ref.mask())
    _check(fn, *_qkv(37, 37, device=device))


@pytest.mark.parametrize("spec,params", [
    ("attention a(H, W) { q, kv = grid(H, W)  mask = abs(k.y // 4) <= 1 and abs(q.x - k.x) <= 2 }", dict(H=9, W=7)),
    ("attention a(N) { q = seq(N)  kv = a: grid(2, 7), b: seq(5)  mask = (k in a and abs(k.y // 4) <= 1) or k in b }",
     dict(N=20)),
])
def test_abs_bound_of_a_token_part(spec, params, device):
    """`abs(k.y // 4)` reads the key only, so it is a token part: the bound compares the part's
    value. Found by hypothesis: the peephole compared `k.y // 4` again, whose coordinate nothing
    decoded (NameError in the kernel)."""
    fn = attnc.compile(spec, tiles=(16, 16), **params)
    b = fn.compiled.bound
    _check(fn, *_qkv(b.nq, b.nk, device=device))


@pytest.mark.parametrize("mask", ["k.i + 1 == 1 << ilog2(k.i + 1)", "causal and (q.i - k.i > 0 and 1 << ilog2(q.i - k.i) == q.i - k.i)",
                                  "q.i - k.i < 3 or (q.i > k.i and (q.i - k.i) * 3 == 1 << ilog2((q.i - k.i) * 3))"])
def test_power_of_two_tests_against_the_reference(mask, device):
    """`x == 1 << ilog2(x)` compiles to `x > 0 and x & (x - 1) == 0` (codegen/pairs.power_of_two_test)."""
    spec = f"attention p(N) {{ q, kv = seq(N) mask = {mask} }}"
    _check(attnc.compile(spec, tiles=(16, 16), N=70), *_qkv(70, 70, device=device))


@pytest.mark.parametrize("scale", ["0.0", "-0.7", "log(n_visible) / 2.0 - 1.0"])
def test_softmax_scale_that_is_not_positive(scale, device):
    """A positive row scale is applied after the maximum (POS_SCALE, in exp2's FMA); a zero or
    negative one, for all rows or some, takes the plain path (the launcher checks every row)."""
    spec = f"attention s(N) {{ q, kv = seq(N) mask = causal and q.i - k.i < 20 score = softmax(scale = {scale}) }}"
    fn = attnc.compile(spec, tiles=(16, 16), N=45)
    _check(fn, *_qkv(45, 45, device=device))


def test_sigmoid_weights_are_not_normalised(device):
    # With v = 1 the output is the row's total weight: sum over visible keys of sigmoid(s + b).
    spec = "attention s(N) { q, kv = seq(N) mask = causal score = sigmoid(scale = 0.0, bias = 1.5) }"
    fn = attnc.compile(spec, tiles=(16, 16), N=30)
    q, k, _ = _qkv(30, 30, d=16, device=device)
    v = torch.ones(1, 2, 30, 16, device=device)
    with torch.no_grad():
        out = fn(q, k, v).cpu()
    expect = torch.arange(1, 31, dtype=torch.float32) / (1 + math.exp(-1.5))
    assert torch.allclose(out[0, 0, :, 0], expect, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,params", [("specs/natten2d.attn", dict(H=13, W=17, kernel=5, dilation=2)),
                                         ("specs/causal.attn", dict(N=300)),
                                         ("attention cap(N) { q, kv = seq(N) mask = causal "
                                          "score = softmax(softcap = 5.0) }", dict(N=300))])
def test_bfloat16_error_within_eager_error_on_gpu(spec, params):
    """bfloat16 exists only natively (Triton's interpreter has none): FlexAttention's criterion.
    The soft-cap runs on the GPU's tanh.approx there (its error is below an fp16 rounding)."""
    fn = attnc.compile(spec, **params)
    ref = attnc.compile(spec, backend="reference", **params)
    n = fn.compiled.bound.nq
    q, k, v = _qkv(n, n, heads=4, d=64, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        out = fn(q, k, v).cpu().double()
    gold = ref(q.cpu().double(), k.cpu().double(), v.cpu().double())
    eager = ref(q.cpu().float(), k.cpu().float(), v.cpu().float()).bfloat16().double()
    assert (out - gold).abs().max() <= 3 * (eager - gold).abs().max() + 1e-2
