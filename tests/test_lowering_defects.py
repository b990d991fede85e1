"""Issue 8, A3 / A5 / A11: locals that read runtime tensors, floats in masks, and errors that only
binding can find (a divisor that is 0 for the bound parameters, a negative index), each located."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from tests.conftest import DEVICE


def spec(*body: str, head: str = "attention a(N) {") -> str:
    """`head` on line 1, each body line indented by 4 (so body line n is line n + 1), then `}`."""
    return head + "\n" + "".join(f"    {line}\n" for line in body) + "}\n"


def ir(source):
    return attnc.parse(source).ir


def error(source, backend="reference", **params) -> AttncError:
    """The located error of compiling source (parse errors included)."""
    with pytest.raises(AttncError) as info:
        attnc.compile(source, backend=backend, **params)
    err = info.value
    assert err.span is not None, f"no location: {err}"
    assert str(err).startswith(f"<spec>:{err.line}:{err.col}: error: "), str(err)
    return err


# -- A3: a local is the expression it names ---------------------------------------------------------
def test_local_reading_a_mask_tensor_is_its_expression():
    local = spec("q, kv = seq(N)", "same_doc = doc[q.i] == doc[k.i]", "mask = causal and same_doc")
    inline = spec("q, kv = seq(N)", "mask = causal and doc[q.i] == doc[k.i]")
    assert ir(local) == ir(inline)
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    got = attnc.compile(local, backend="reference", N=8).mask(doc=doc)
    want = attnc.compile(inline, backend="reference", N=8).mask(doc=doc)
    assert torch.equal(got, want) and got.sum() == 6 + 3 + 6


def test_local_meaning_does_not_depend_on_where_it_is_defined():
    # Defined before the token spaces, and through another local: still the same IR.
    early = spec("ids = doc[q.i]", "q, kv = seq(N)", "same = ids == doc[k.i]", "mask = causal and same")
    assert ir(early) == ir(spec("q, kv = seq(N)", "mask = causal and doc[q.i] == doc[k.i]"))


def test_local_used_in_mask_and_bias_is_typed_by_each_use():
    # `d` serves both; `t` reads a float table where the bias reads it, `m` integer ids in the mask.
    local = spec("q, kv = seq(N)", "d = q.i - k.i", "t = rb[d + 4]", "m = ids[k.i]",
                 "mask = d >= 0 and d < 4 and m == 1", "bias = -0.5 * d + t")
    inline = spec("q, kv = seq(N)", "mask = q.i - k.i >= 0 and q.i - k.i < 4 and ids[k.i] == 1",
                  "bias = -0.5 * (q.i - k.i) + rb[q.i - k.i + 4]")
    assert ir(local) == ir(inline)
    assert sorted((t.name, t.dtype) for t in ir(local).tensors) == [("ids", "int"), ("rb", "float")]


def test_local_with_float_arithmetic_on_coordinates_serves_the_bias():
    local = spec("q, kv = seq(N)", "half = (q.i - k.i) / 2", "mask = causal", "bias = half")
    assert ir(local) == ir(spec("q, kv = seq(N)", "mask = causal", "bias = (q.i - k.i) / 2"))


def test_local_with_n_visible_serves_the_scale():
    local = spec("q, kv = seq(N)", "nv = log(n_visible)", "score = softplus(scale = nv / sqrt(head_dim))")
    assert ir(local) == ir(spec("q, kv = seq(N)", "score = softplus(scale = log(n_visible) / sqrt(head_dim))"))


def test_local_with_a_builtin_states_its_preconditions_at_each_use():
    head = "attention a(H, W, M, S) {"
    local = spec("q, kv = grid(H, W)", "win = same_window(M, M, shift = S)", "mask = win or (win and causal)",
                 head=head)
    inline = spec("q, kv = grid(H, W)", "mask = same_window(M, M, shift = S) or "
                  "(same_window(M, M, shift = S) and causal)", head=head)
    assert ir(local) == ir(inline) and len(ir(local).requires) == 2 * 3 * 2  # uses, axes, conditions


@pytest.mark.parametrize("body, line, col, phrase, hint", [
    # A tensor read in a score argument: refused at the use, pointing at it, naming the cause.
    (("same = doc[q.i] == doc[k.i]", "score = softmax(scale = 1 / (1 + same))"), 4, 38,
     "'same' cannot be used in a score's scale or bias: runtime tensors", "line 3, column 12"),
    (("t = doc[q.i]", "mask = causal", "score = softmax(softcap = t)"), 5, 31,
     "'t' cannot be used here: runtime tensors such as 'doc' can only be read", "line 3, column 9"),
    (("h = head", "score = softmax(scale = 1.0 + h)"), 4, 35,
     "'h' cannot be used in a score's scale or bias: head (the query head index)", "line 3, column 9"),
    (("x = (q.i - k.i) / 2", "mask = x < 1"), 4, 12, "must stay in integers", "line 3, column 9"),
    (("n = n_visible", "mask = k.i < n"), 4, 18, "only defined in a score's scale and bias", None),
    # One local, two uses: integer ids in the mask, float values in the bias; one tensor cannot be both.
    (("t = tab[k.i]", "mask = t == 1", "bias = t"), 3, 9, "read by the mask (integers) and by a score modifier", None),
], ids=["tensor-in-scale", "tensor-in-softcap", "head-in-scale", "float-in-mask", "n_visible-in-mask",
        "mask-and-bias"])
def test_local_used_where_its_expression_is_invalid(body, line, col, phrase, hint):
    err = error(spec("q, kv = seq(N)", *body), N=8)
    assert (err.line, err.col) == (line, col), str(err)
    assert phrase in err.message, str(err)
    if hint:
        assert hint in err.hint, str(err)


def test_local_error_that_no_context_escapes_is_reported_at_the_definition():
    err = error(spec("q, kv = seq(N)", "x = q.i + nope", "mask = x < 3"), N=8)
    assert (err.line, err.col) == (3, 15) and "unknown name 'nope'" in err.message


def test_head_dim_in_the_mask_is_located():
    # Tile analysis decides the mask before q exists: head_dim there failed, unlocated, at compile.
    for mask, col in (("q.i < head_dim", 18), ("same_block(head_dim)", 23), ("window(head_dim)", 19)):
        err = error(spec("q, kv = seq(N)", f"mask = {mask}"), N=8)
        assert (err.line, err.col) == (3, col) and "head_dim" in err.message, str(err)


# -- A5: the mask compares integers ------------------------------------------------------------------
@pytest.mark.parametrize("head, mask, col, hint", [
    ("attention a(N, r = 2.5) {", "q.i - k.i < r", 24, "'r' is a float parameter"),
    ("attention a(N, r = 2.5) {", "causal and r > 1.0", 23, "'r' is a float parameter"),
    ("attention a(N, r = 2.5) {", "doc[q.i] == doc[k.i] and doc[q.i] < r", 48, "'r'"),
    ("attention a(N) {", "q.i - k.i < 2.5", 24, "compare with integers"),
], ids=["param", "uniform-condition", "table-value", "literal"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float_in_a_mask_is_a_located_compile_error(head, mask, col, hint, backend):
    # Used to reach Triton as a NameError (p_r undefined), or to compare in float32.
    err = error(spec("q, kv = seq(N)", f"mask = {mask}", head=head), backend=backend, N=8)
    assert (err.line, err.col) == (3, col), str(err)
    assert "the mask compares integers" in err.message and hint in err.hint, str(err)


def test_float_parameter_in_a_table_index_is_a_located_compile_error():
    err = error(spec("q, kv = seq(N)", "mask = causal", "bias = tab[q.i + r]", head="attention a(N, r = 2.5) {"),
                backend="triton", N=8)
    assert (err.line, err.col) == (4, 16) and "must be an integer" in err.message


def test_integer_parameters_and_float_score_arguments_still_work():
    src = spec("q, kv = seq(N)", "mask = q.i - k.i < r", "score = softmax(softcap = cap)",
               head="attention a(N, r = 2, cap = 2.5) {")
    fn = attnc.compile(src, backend="triton", tiles=(16, 16), N=8)
    ref = attnc.compile(src, backend="reference", N=8)
    q = torch.randn(1, 1, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(fn(q, q, q), ref(q, q, q), atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("bias", ["tab[k.i] * r", "r * (q.i - k.i)", "-r * abs(q.i - k.i) + tab[q.i]"])
def test_float_parameters_in_a_bias_reach_the_kernel(bias):
    """A float parameter in a logit bias is a float32 kernel argument (it once failed in Triton
    with a NameError): triton against the float64 reference."""
    src = spec("q, kv = seq(N)", "mask = causal", f"bias = {bias}", head="attention a(N, r = 0.375) {")
    fn = attnc.compile(src, backend="triton", tiles=(16, 16), N=20, r=0.625)
    ref = attnc.compile(src, backend="reference", N=20, r=0.625)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    tab = {"tab": torch.randn(20, generator=g)} if "tab" in bias else {}
    with torch.no_grad():
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), **{n: t.to(DEVICE) for n, t in tab.items()}).cpu().double()
    tab = {n: t.double() for n, t in tab.items()}
    expect = ref(q.double(), k.double(), v.double(), **tab)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
    # the scale of the bias matters: a different r gives a different result
    other = attnc.compile(src, backend="reference", N=20, r=0.0)(q.double(), k.double(), v.double(), **tab)
    assert (other - expect).abs().max() > 1e-3

# -- A11: errors found at binding carry line:col --------------------------------------------------
@pytest.mark.parametrize("head, body, params, line, col, phrase", [
    ("attention a(N) {", ("mask = q.i // (N - N) < k.i",), {}, 3, 20, "`N - N` is 0"),
    ("attention a(N, P) {", ("mask = q.i // (P - 2) < k.i",), {"P": 2}, 3, 20, "`P - 2` is 0 for N=8, P=2"),
    ("attention a(N, P) {", ("mask = k.i % (P - 2) < 3",), {"P": 2}, 3, 19, "`P - 2` is 0"),
    ("attention a(N, d = 0) {", ("mask = q.i // d < k.i",), {}, 3, 19, "`d` is 0"),
    ("attention a(N, P = 2, Q = N // (P - 2)) {", (), {}, 1, 33, "`P - 2` is 0"),
    ("attention a(N, P) {", ("mask = same_block(P - 2)",), {"P": 2}, 3, 12, "`P - 2` is 0"),
    ("attention a(N, P) {", ("mask = window(3 // (P - 2))",), {"P": 2}, 3, 25, "`P - 2` is 0"),
    ("attention a(N, P) {", ("mask = causal", "bias = q.i // (P - 2)"), {"P": 2}, 4, 20, "`P - 2` is 0"),
    ("attention a(N, P) {", ("score = softmax(sink = s[head // (P - 2)])",), {"P": 2}, 3, 39, "`P - 2` is 0"),
    ("attention a(N, P) {", ("score = softmax(softcap = 1 // (P - 2))",), {"P": 2}, 3, 37, "`P - 2` is 0"),
    ("attention a(N, P) {", ("route = top(4 // (P - 2)) of blocks(4) by q @ mean(k)",), {"P": 2}, 3, 23,
     "`P - 2` is 0"),
    ("attention a(N) {", ("mask = doc[-1] == doc[k.i]",), {}, 3, 16, "index -1 into 'doc' is negative"),
    ("attention a(N, P) {", ("mask = doc[P - 3] == doc[k.i]",), {"P": 2}, 3, 12, "can be negative (-1)"),
    ("attention a(N) {", ("mask = doc[q.i - 1] == doc[k.i]",), {}, 3, 12, "can be negative (-1)"),
], ids=["N-N", "P-2", "mod", "default-param", "in-a-default", "same_block", "window-arg", "bias", "sink",
        "softcap", "route", "negative-literal-index", "negative-param-index", "negative-index"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_binding_errors_are_located(head, body, params, line, col, phrase, backend):
    err = error(spec("q, kv = seq(N)", *body, head=head), backend=backend, N=8, **params)
    assert (err.line, err.col) == (line, col), str(err)
    assert phrase in err.message, str(err)


def test_a_guard_that_rules_a_division_out_is_honoured():
    # `a and b` reads b only where a holds (docs/language.md): P != 2 rules the division out.
    src = spec("q, kv = seq(N)", "mask = P != 2 and q.i // (P - 2) < k.i", head="attention a(N, P) {")
    assert not attnc.compile(src, backend="reference", N=8, P=2).mask().any()
    err = error(src.replace("P != 2", "P != 3"), N=8, P=2)
    assert (err.line, err.col) == (3, 31) and "division by zero" in err.message


def test_nonzero_divisor_still_compiles():
    src = spec("q, kv = seq(N)", "mask = q.i // (P - 2) <= k.i // (P - 2)", head="attention a(N, P) {")
    assert attnc.compile(src, backend="reference", N=8, P=4).mask().sum() == 8 * 9 // 2 + 4


def test_division_by_zero_found_by_evaluation_is_located():
    # Under a guard that depends on tokens, or with a divisor that does, only evaluating the mask
    # finds the zero: tile analysis (compiling for Triton) or fn.mask() on the reference.
    guarded = spec("q, kv = seq(N)", "mask = causal and q.i // (P - 2) < k.i", head="attention a(N, P) {")
    by_token = spec("q, kv = seq(N)", "mask = q.i // (k.i - 3) < 2")
    for source, params, col in ((guarded, {"P": 2}, 31), (by_token, {}, 20)):
        err = error(source, backend="triton", N=8, **params)
        assert (err.line, err.col) == (3, col) and "division by zero" in err.message, str(err)
        with pytest.raises(AttncError) as info:
            attnc.compile(source, backend="reference", N=8, **params).mask()
        assert (info.value.line, info.value.col) == (3, col), str(info.value)


# Random masks, with guards, whose divisors are constants, parameters, differences that may be 0
# or token coordinates, and tables indexed by offsets that may be negative: compiling fails with
# line:col or succeeds, and then evaluating the mask succeeds or fails with line:col.
_UNIFORM = st.sampled_from(["0", "P", "N", "(P - 2)", "(N - N)", "(P - P)", "(2 - P)", "3", "(P * 0)", "(N - 1)",
                            "k.i", "(q.i - 3)"])
_ARITH = st.recursive(
    st.sampled_from(["q.i", "k.i", "P", "1", "(0 - 2)"]),
    lambda kids: st.one_of(
        st.tuples(kids, st.sampled_from(["//", "%"]), _UNIFORM).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(kids, st.sampled_from(["+", "-", "*"]), kids).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    ),
    max_leaves=4,
)
_INTS = st.one_of(_ARITH, _ARITH.map(lambda k: f"doc[{k}]"))
_CONDS = st.recursive(
    st.one_of(st.just("causal"), st.tuples(_INTS, st.sampled_from(["<", "<=", "==", "!="]), _INTS).map(" ".join)),
    lambda kids: st.tuples(kids, st.sampled_from(["and", "or"]), kids).map(lambda t: f"({' '.join(t)})"),
    max_leaves=3,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_CONDS, st.integers(-3, 5), st.integers(1, 12))
def test_random_divisors_and_indices_fail_located(mask, p, n):
    source = spec("q, kv = seq(N)", f"mask = {mask}", head="attention a(N, P) {")
    try:
        fn = attnc.compile(source, backend="reference", N=n, P=p)
        size = max(1, *fn.compiled.tensor_extents.get("doc", (0,)))
        fn.mask(**({"doc": torch.zeros(size, dtype=torch.int64)} if fn.compiled.bound.ir.tensors else {}))
    except AttncError as err:
        assert err.span is not None, f"unlocated: {err}\n{source}"
