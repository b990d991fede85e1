"""The @triton.jit helper functions a kernel module starts with (integer division that floors,
window and |x| <= c tests, routing's chosen groups, tanh for the soft-cap, softplus's log2 and
log1p), as lists of source lines: the forward and backward kernels call them by name."""
from __future__ import annotations

from ..ir import nodes as N

LOG2E = "1.4426950408889634"
LN2 = "0.6931471805599453"


def prelude(score: N.Score, windows: bool, routed: bool, abs_tests: bool = False) -> list[str]:
    lines = [
        "@triton.jit",
        "def _floordiv(a, b):",
        "    # Triton integer division truncates toward zero; the spec language floors.",
        "    q = a // b",
        "    return q - (((a % b) != 0) & ((a < 0) != (b < 0))).to(q.dtype)",
        "",
        "",
        "@triton.jit",
        "def _floormod(a, b):",
        "    r = a % b",
        "    return r + (((r != 0) & ((r < 0) != (b < 0))).to(r.dtype) * b)",
    ]
    if windows:
        lines += ["", "", *_IN_RANGE]
    if abs_tests:
        lines += ["", "", *_ABS_LE]
    if routed:
        lines += ["", "", *_CHOSEN, "", "", *_CHOSEN_ROW]
    if score.softcap is not None:
        lines += ["", "", *_TANH]
    if score.kind == "softplus":
        lines += ["", "", *_LOG_SOFTPLUS, "", "", *_LG2]
    return lines


_CHOSEN = [
    "@triton.jit",
    "def _chosen(sel_row, k_grp, ROUTE_K: tl.constexpr):",
    '    """The key\'s group is one of the ROUTE_K groups chosen for the row\'s unit (-1: no choice)."""',
    "    hit = k_grp < -2",
    "    for t in tl.static_range(ROUTE_K):",
    "        hit = hit | (tl.load(sel_row + t)[:, None] == k_grp)",
    "    return hit",
]


_CHOSEN_ROW = [
    "@triton.jit",
    "def _chosen_row(sel_row, grp, ROUTE_K: tl.constexpr):",
    '    """Which rows\' units chose group grp, the one group of a whole kv tile (-1: no choice)."""',
    "    hit = tl.load(sel_row) == grp",
    "    for t in tl.static_range(1, ROUTE_K):",
    "        hit = hit | (tl.load(sel_row + t) == grp)",
    "    return hit",
]


_ABS_LE = [
    "@triton.jit",
    "def _abs_le(x, c: tl.constexpr, INT64: tl.constexpr):",
    '    """|x| <= c for a constant 0 <= c < 2**30: one unsigned comparison of x + c (exact for every x',
    '    of the width, the sum taken modulo 2**32 or 2**64)."""',
    "    return _abs_off(x, c, INT64) <= 2 * c",
    "",
    "",
    "@triton.jit",
    "def _abs_off(x, c: tl.constexpr, INT64: tl.constexpr):",
    '    """x + c as an unsigned integer: |x| <= c iff it is <= 2c, and several such tests with the same c',
    '    hold together iff their unsigned maximum is <= 2c (one comparison, one predicate)."""',
    "    if INT64:",
    "        return (x + c).to(tl.uint64, bitcast=True)",
    "    return (x + c).to(tl.uint32, bitcast=True)",
]


_IN_RANGE = [
    "@triton.jit",
    "def _in_range(x, lo, n, INT64: tl.constexpr):",
    '    """lo <= x < lo + n for n >= 0 (window tests): one unsigned comparison of x - lo."""',
    "    if INT64:",
    "        return (x - lo).to(tl.uint64, bitcast=True) < n.to(tl.uint64, bitcast=True)",
    "    return (x - lo).to(tl.uint32, bitcast=True) < n.to(tl.uint32, bitcast=True)",
]


# tanh(x) / x = 1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925 + ...: for |x| < 1/4
# the next term is below 1e-9 relative to the sum.
_TANH = [
    "@triton.jit",
    "def _tanh(x, FAST: tl.constexpr):",
    '    """tanh(x) for the soft-cap, cap * tanh(s / cap). FAST (a GPU, 16-bit q and k): the GPU\'s',
    "    tanh.approx.f32, one instruction, relative error below 2**-10.9: a capped logit as accurate",
    "    as rounding it to fp16 (FlashAttention-2 and FlashInfer soft-cap the same way). Otherwise a",
    "    few ulp and no cancellation, so that a huge cap returns the logit itself.",
    '    """',
    "    if FAST:",
    '        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,',
    "                                         is_pure=True, pack=1)",
    "    ax = tl.abs(x)",
    "    # |x| < 1/4: x * tanh(x) / x, by the Taylor series of tanh(x) / x to x**10 (in a clamped",
    "    # |x|, so that the branch not taken cannot overflow).",
    "    a = tl.minimum(ax, 0.25)",
    "    y = a * a",
    "    series = 1.0 + y * (-0.3333333333333333 + y * (0.13333333333333333 + y * (-0.05396825396825397",
    "             + y * (0.021869488536155203 + y * -0.008863235529902197))))",
    "    # otherwise tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) <= exp(-1/2): no cancellation, no overflow.",
    "    e = tl.exp(-2.0 * ax)",
    "    big = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)  # the GPU's reciprocal: 2 ulp",
    "    return tl.where(ax < 0.25, x * series, tl.where(x < 0.0, -big, big))",
]


# log1p(e) / e = 1 + e * Q(e) on [0, 1]: Q of degree 9, least squares on Chebyshev nodes; relative
# error 4e-9 in exact arithmetic, 1.3e-7 (about one float32 ulp) evaluated in float32. Exactly 1 at
# e = 0, so that log softplus(s) -> s holds to the last bit where softplus underflows.
R_COEFFS = (-0.49999999587939126, 0.3333324756623421, -0.2499702423062591, 0.19959356987749888,
             -0.1637851242828527, 0.1307133733860227, -0.09202977205983144, 0.04993130856795476,
             -0.017512306580961198, 0.0028738971656582317)


def horner(x: str, coeffs) -> str:
    out = repr(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = f"({c!r} + {x} * {out})"
    return out


# Shared by the forward and backward kernels. No division and no precise log or exp: one exp2 and
# one log2 (single instructions on a GPU) around a polynomial.
_LOG_SOFTPLUS = [
    "@triton.jit",
    "def _log2_softplus(s):",
    '    """(log2 softplus(s), log1p(exp(-|s|))), exact where softplus underflows: with e = exp(-|s|)',
    "    and r = log1p(e) / e in [ln 2, 1], softplus(s) = e * r for s < 0, whose log2 is",
    "    s log2(e) + log2(r), and |s| + e * r otherwise (both arguments of log2 are positive).",
    '    """',
    "    a = tl.abs(s)",
    f"    e = tl.math.exp2(a * -{LOG2E})",
    f"    r = 1.0 + e * {horner('e', R_COEFFS)}",
    "    l1p = e * r",
    f"    return tl.math.log2(tl.where(s < 0.0, r, a + l1p)) + tl.minimum(s, 0.0) * {LOG2E}, l1p",
]


_LG2 = [
    "@triton.jit",
    "def _lg2(x, FAST: tl.constexpr):",
    '    """log2(x) for x >= 1: FAST = 1, the GPU\'s lg2.approx (one instruction, within 2**-22 near 1);',
    "    FAST = 2, tl.math.log2 (the interpreter, which runs no GPU instruction: tests of the first pass).\"\"\"",
    "    if FAST == 1:",
    '        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,',
    "                                         is_pure=True, pack=1)",
    "    return tl.math.log2(x)",
]
