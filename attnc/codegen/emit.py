"""IR -> Triton source for the forward kernel.

The source depends only on the IR (parameters stay symbolic and arrive as runtime arguments),
so one generated file serves every size. Tile sizes, head dims and integer width are constexprs.
Names in the source come from the IR's validated identifiers, never from raw spec text.

The kernel's arguments are described once, in `abi.py`; the text is assembled from functions that
return lists of lines, in the order they appear in the kernel (no template, no placeholders, so
nothing a spec names can rewrite the kernel).
"""
from __future__ import annotations

import math

from ..ir import nodes as N
from ..ir.evaluate import per_row
from ..ir.printer import format_score
from ..ir.scores import base2_logits, score_reads_n_visible, softplus_first_pass
from . import abi
from .helpers import LN2, LOG2E, R_COEFFS, horner, prelude
from .pairs import abs_bound, emit_pair_function, emit_visible, pair_call
from .parts import bounding_part, load_lines, pair_exprs


# -- the kernel -------------------------------------------------------------------------------
_STAT = {
    "softmax": ["    Stat receives the row's logsumexp (natural log, the sink included), -inf for a row that",
                "    sees no key."],
    "softplus": ["    Stat receives log(sum over visible keys of softplus(s)), the log of the row's normaliser",
                 "    (natural log; -inf for a row that sees no key): finite even where softplus underflows."],
    "sigmoid": ["    Stat receives the row sum of the (unnormalised) sigmoid weights."],
}


def _docstring(score: N.Score) -> list[str]:
    return [
        '    """Forward attention for one (query tile, batch * head).',
        "",
        "    Tokens are in kernel order: Q, K, V, Out, Stat and the row vectors are indexed by kernel",
        "    position; the mask and bias read the row-major token at a position through Q_ORDER and",
        "    KV_ORDER when the layout permutes that side.",
        "",
        f"    Score: {format_score(score)}.",
        "    Per-row scale and bias come from the host (without modifiers, softmax's scale includes log2(e)).",
        *_STAT[score.kind],
        '    """',
    ]


def _setup(ir: N.Attention) -> list[str]:
    """Program ids, base pointers and offsets."""
    return [
        "    q_tile = tl.program_id(0)",
        "    bh = tl.program_id(1)",
        "    b = bh // n_heads",
        "    h = bh % n_heads",
        "    h_kv = h // kv_group  # grouped-query attention: query head h reads kv head h // (Hq / Hkv)",
        "    # Each (batch, head) slice starts at an int64 offset: B * H * N * D may exceed 2**31. Offsets",
        "    # inside a slice stay int32 unless the launcher sees a slice that needs more (ADDR64).",
        "    b64, h64, h_kv64 = b.to(tl.int64), h.to(tl.int64), h_kv.to(tl.int64)",
        "    Q_base = Q + b64 * stride_qb + h64 * stride_qh",
        "    K_base = K + b64 * stride_kb + h_kv64 * stride_kh",
        "    V_base = V + b64 * stride_vb + h_kv64 * stride_vh",
        "    O_base = Out + b64 * stride_ob + h64 * stride_oh",
        "    offs_m0 = tl.arange(0, SUB_M)",
        "    offs_n0 = tl.arange(0, SUB_N)",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    if ADDR64:",
        "        offs_m0, offs_n0 = offs_m0.to(tl.int64), offs_n0.to(tl.int64)",
        "        offs_d, offs_dv = offs_d.to(tl.int64), offs_dv.to(tl.int64)",
    ]


def _rows(ir: N.Attention) -> list[str]:
    """The q sub-tile at offs_m: its rows, tokens, token parts and row scores."""
    score = ir.score
    return [
        "    offs_m = q_tile * BLOCK_M + sub + offs_m0",
        "    q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        "                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)",
        "    q_i = offs_m[:, None]",
        "    if Q_PERMUTED:",
        "        q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]",
        "    if INT64:",
        "        q_i = q_i.to(tl.int64)",
        *load_lines(ir, "q", "    "),
        *route_rows(ir, "    "),
        f"    row_scale = tl.load(ROW_SCALE + {row_vector_at(ir, 'bh.to(tl.int64)')}, mask=offs_m < Nq, other=0.0)",
    ] + ([  # only sigmoid adds a per-row bias after the modifiers
        f"    row_bias = tl.load(ROW_BIAS + {row_vector_at(ir, 'bh.to(tl.int64)')}, mask=offs_m < Nq, other=0.0)",
    ] if score.kind == "sigmoid" else []) + ([
        "    # Unmodified sigmoid: the exponent -(s * scale + bias) log2(e) is one FMA per element.",
        f"    row_scale = row_scale * -{LOG2E}",
        f"    row_bias = row_bias * -{LOG2E}",
    ] if score.kind == "sigmoid" and not score.modified else []) + ([
        f"    row_scale = row_scale * {LOG2E}  # logits to base 2 (the bias likewise, _logits)",
    ] if _bias_to_base2(score) else []) + ([
        "    # A positive row scale (POS_SCALE: the launcher checks every row) is applied after the row",
        "    # maximum, inside exp2's FMA, as FlashAttention-2 does; another one before (a factor 1.0 folds away).",
        "    ones = tl.full([SUB_M], 1.0, tl.float32)",
        "    scale_before = ones if POS_SCALE else row_scale",
        "    scale_after = row_scale if POS_SCALE else ones",
    ] if base2_logits(score) else []) + ([
        "    # Soft-cap: cap * tanh(s / cap), 1 / cap folded into the row scale (no bias in between) and",
        "    # the factor cap (times log2(e) for a softmax, whose logits go on in base 2) applied after.",
        "    cap_in = 1.0 / softcap",
        f"    cap_out = softcap{f' * {LOG2E}' if score.kind == 'softmax' else ''}",
        *(["    row_scale = row_scale * cap_in"] if score.logit_bias is None else []),
    ] if score.softcap is not None else [])


def _init_state(score: N.Score) -> list[str]:
    if score.sink is not None:
        # The sink is a virtual key with logit SINK[h] and value 0: it starts the running max and sum.
        state = [
            f"    m_i = tl.full([SUB_M], 1.0, tl.float32) * (tl.load(SINK + h64) * {LOG2E})",
            "    l_i = tl.full([SUB_M], 1.0, tl.float32)",
        ]
    elif score.kind == "sigmoid":  # weights are not normalised: no running maximum
        state = ["    l_i = tl.zeros([SUB_M], tl.float32)"]
    elif score.kind == "softplus":  # the running max and log2 of the scale (_softplus_accumulate)
        state = [
            '    mx_i = tl.full([SUB_M], float("-inf"), tl.float32)',
            '    m_i = tl.full([SUB_M], float("-inf"), tl.float32)',
            "    l_i = tl.zeros([SUB_M], tl.float32)",
        ]
    else:
        state = [
            '    m_i = tl.full([SUB_M], float("-inf"), tl.float32)',
            "    l_i = tl.zeros([SUB_M], tl.float32)",
        ]
    return state + ["    acc = tl.zeros([SUB_M, BLOCK_DV], tl.float32)"]


def row_vector_at(ir: N.Attention, bh: str) -> str:
    """Where the q tile's row scale and bias are: by position, or, routed with n_visible in the
    score (it counts the chosen keys: a count per batch and head), in row `bh` of [B * Hq, Nq]."""
    per_head = ir.route is not None and score_reads_n_visible(ir.score)
    return f"{bh} * Nq + offs_m" if per_head else "offs_m"


def route_rows(ir: N.Attention, indent: str) -> list[str]:
    """Routed specs: the q tile's row pointers into the selection (this head's choices for each
    row's unit), after offs_m, b64 and h64."""
    if ir.route is None:
        return []
    return [f"{indent}r_unit = tl.load(ROUTE_UNIT + offs_m, mask=offs_m < Nq, other=0)",
            f"{indent}SEL_row = ROUTE_SEL + ((b64 * n_heads + h64) * n_units + r_unit) * ROUTE_K"]


def route_cols(ir: N.Attention, indent: str, first: str | None = None) -> list[str]:
    """Routed specs: the kv tile's key groups (-2 past the last key: never a choice), or, given
    the position of the tile's `first` key, the one group of all its keys."""
    if ir.route is None:
        return []
    if first is not None:
        return [f"{indent}k_grp = tl.load(ROUTE_GROUP + {first})  # the tile's one group"]
    return [f"{indent}k_grp = tl.load(ROUTE_GROUP + offs_n, mask=offs_n < Nk, other=-2)[None, :]"]


def csr_row(ir: N.Attention, tile: str, program: str) -> str:
    """The schedule row of this program: per tile, or per (batch * head, tile) when routed or
    when the mask reads `head` or `batch` (analysis/rows.py)."""
    rows = ir.route is not None or per_row(ir.mask)
    return f"({program} * tl.num_programs(0) + {tile})" if rows else tile


def keep_expr(ir: N.Attention, masked: bool, bounds: str, one_group: bool = False) -> str:
    """Which pairs of the tile count: in bounds and visible on PARTIAL tiles, and, when routed,
    in a group chosen for the row's unit (per row on a tile of `one_group`, route_cols)."""
    parts = ([bounds] if bounds else []) + ([f"visible({pair_call(ir)})"] if masked else [])
    if ir.route is not None:
        parts.append("_chosen_row(SEL_row, k_grp, ROUTE_K)[:, None]" if one_group else "_chosen(SEL_row, k_grp, ROUTE_K)")
    return " & ".join(parts)


def tile_lists(ir: N.Attention) -> list[str]:
    """The schedule's lists of kv tiles a q tile's loops visit, in order (forward and dQ): FULL,
    for a routed spec then MIXED (FULL tiles of several routing groups; routing.one_group_tiles),
    and PART."""
    return ["FULL", *(["MIXED"] if ir.route is not None else []), "PART"]


def _tile_loops(ir: N.Attention, fast: bool = False) -> list[str]:
    """The loops over every list of tile_lists, a blank line between two."""
    lines = []
    for kind in tile_lists(ir):
        lines += [*([""] if lines else []), *_tile_loop(ir, kind, fast)]
    return lines


def _tile_loop(ir: N.Attention, kind: str, fast: bool = False) -> list[str]:
    """The loop over the kv tiles of list `kind` (tile_lists) for this q tile (`fast`: softplus's
    first pass, _softplus_fast). Routed: FULL tiles of one routing group test it per row, the
    MIXED list's per element."""
    masked = kind == "PART"
    ptr, idx = f"{kind}_PTR", f"{kind}_IDX"
    one_group = ir.route is not None and kind == "FULL"
    what = ["    # PARTIAL tiles: evaluate the mask per element. EMPTY tiles are never visited." if masked else
            "    # FULL tiles of several routing groups: the routing per element." if kind == "MIXED" else
            "    # FULL tiles: every pair is visible and in bounds; no predicate, no bounds checks."]
    if one_group:
        what.append("    # Routed: the tile's keys are of one group (routing.one_group_tiles), chosen or not per row.")
    return [
        *what,
        f"    lo = tl.load({ptr} + {csr_row(ir, 'q_tile', 'bh')})",
        f"    hi = tl.load({ptr} + {csr_row(ir, 'q_tile', 'bh')} + 1)",
        "    for t in range(lo, hi):",
        f"        kv_tile = tl.load({idx} + t)",
        "        for col in range(0, BLOCK_N, SUB_N):",
        *indent([*_load_kv(masked), *_logits(ir, masked, "fast_scale" if fast else None, one_group),
                 *(_softplus_fast_accumulate(ir, masked, one_group) if fast else _accumulate(ir, masked, one_group))]),
    ]


def _load_kv(masked: bool) -> list[str]:
    bounds = "(offs_n[:, None] < Nk) & " if masked else ""
    return [
        "        offs_n = kv_tile * BLOCK_N + col + offs_n0",
        "        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,",
        f"                    mask={bounds}(offs_d[None, :] < HEAD_DIM), other=0.0)",
        "        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"                    mask={bounds}(offs_dv[None, :] < HEAD_DIM_V), other=0.0)",
    ]


def _logits(ir: N.Attention, masked: bool, scale: str | None = None, one_group: bool = False) -> list[str]:
    """s: the tile's logits after the logit bias and the soft-cap (natural units; base 2 for a
    softmax without a bias, whose row scale or soft-cap factor includes log2(e)), the q.k
    products multiplied by the row vector `scale` when given."""
    score = ir.score
    call = pair_call(ir)
    scale = scale or ("scale_before" if base2_logits(score) else "row_scale")
    lines = [f'        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * {scale}[:, None]']
    lines += route_cols(ir, "        ", "kv_tile * BLOCK_N" if one_group else None)
    if masked or score.logit_bias is not None:
        lines += [
            "        k_i = offs_n[None, :]  # kernel position; the mask and bias read the token there",
            "        if KV_PERMUTED:",
            "            k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]",
            "        if INT64:",
            "            k_i = k_i.to(tl.int64)",
            *load_lines(ir, "k", "        "),
        ]
    if score.logit_bias is not None:
        # A softmax takes the bias to base 2 here, in the add (one FMA); its row scale includes
        # log2(e) already (_rows).
        if _bias_to_base2(score):
            lines.append(f"        s = tl.fma(logit_bias({call}), {LOG2E}, s)")
        else:
            lines.append(f"        s += logit_bias({call})")
    if score.softcap is not None:
        x = "s * cap_in" if score.logit_bias is not None else "s"
        lines.append(f"        s = _tanh({x}, FAST_TANH) * cap_out")
    return lines


def _keep(ir: N.Attention, masked: bool, one_group: bool) -> tuple[str, bool]:
    """The forward's `keep = ...` line for a kv piece, and whether the piece needs it: PARTIAL
    tiles, and every routed tile (FULL ones too keep only the chosen keys)."""
    # A window test on a key part that is SENTINEL past the last key rejects those keys itself.
    bounds = "(offs_n[None, :] < Nk)" if masked and bounding_part(ir) is None else ""
    return f"        keep = {keep_expr(ir, masked, bounds, one_group)}", masked or ir.route is not None


def _bias_to_base2(score: N.Score) -> bool:
    """A softmax with a logit bias and no soft-cap: its logits go to base 2 as the bias is added
    (row scale times log2(e), bias times log2(e)); without a bias the host folds log2(e) into
    the row scale (base2_logits), and a soft-cap into its output factor."""
    return score.kind == "softmax" and score.logit_bias is not None and score.softcap is None


def _accumulate(ir: N.Attention, masked: bool, one_group: bool = False) -> list[str]:
    """Fold the tile into the running state (`keep`: the mask, on PARTIAL tiles). Softmax and
    softplus share FlashAttention-2's online normalisation (log2 domain): softplus runs it on
    log softplus(s), so its weights are normalised in log space. Sigmoid weights are not
    normalised and need no running max."""
    score = ir.score
    keep, masked = _keep(ir, masked, one_group)
    lines = []
    if score.kind == "sigmoid":
        # 1 / (1 + 2^-x log2(e)) with the GPU's approximate reciprocal (2 ulp), not a full-precision
        # division: tl.sigmoid's costs a dozen instructions per element.
        x = "s + row_bias[:, None]" if not score.modified else f"(s + row_bias[:, None]) * -{LOG2E}"
        lines.append(f"        p = tl.fdiv(1.0, 1.0 + tl.math.exp2({x}), ieee_rounding=False)")
        if masked:
            lines += [keep, "        p = tl.where(keep, p, 0.0)"]
        return lines + [
            "        l_i += tl.sum(p, 1)",
            '        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)',
        ]
    if score.kind == "softplus":
        return lines + _softplus_accumulate(masked, keep)
    if masked:
        lines += [keep, '        s = tl.where(keep, s, float("-inf"))']
    return lines + _softmax_update(ir, masked)


def _softmax_update(ir: N.Attention, masked: bool) -> list[str]:
    """The online softmax's step for the tile's logits s (-inf where hidden when `masked`)."""
    score = ir.score
    lines = []
    if base2_logits(score):  # a positive scale keeps the maximum's place: max(s c) = max(s) c
        lines.append("        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_after)")
    else:
        lines.append("        m_new = tl.maximum(m_i, tl.max(s, 1))")
    if masked or score.modified:
        lines += [
            "        # Rows that have seen no finite logit keep m = -inf; shift them by 0 to avoid inf - inf.",
            '        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
        ]
    else:
        lines.append("        m_use = m_new")
    scaled = " * scale_after[:, None]" if base2_logits(score) else ""
    return lines + [
        "        alpha = tl.math.exp2(m_i - m_use)",
        f"        p = tl.math.exp2(s{scaled} - m_use[:, None])",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        '        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)',
        "        m_i = m_new",
    ]


def _softplus_accumulate(masked: bool, keep: str) -> list[str]:
    """Softplus weights in the linear domain, no log in the loop: with m the row's running max
    logit, acc and l are kept in units of c = exp(min(m, 0)) (m_i holds log2 c; -inf until the
    row has seen a key, so that the first key's tile rescales nothing: a row whose first tiles
    hide every key must not take a scale of 1 that a later exp(-m) overflows), so that nothing
    underflows when every logit is very negative. Per element, with u = exp(-|s|) / c and
    e = u c = exp(-|s|): softplus(s) / c = u r(e) + max(s, 0), r(e) = log1p(e) / e (for s < 0,
    c = exp(min(m, 0)) and u r(e) = exp(s - min(m, 0)) r; for s >= 0, c = 1 and u = e)."""
    lines = [keep, '        s = tl.where(keep, s, float("-inf"))'] if masked else []
    return lines + [
        "        mx_new = tl.maximum(mx_i, tl.max(s, 1))",
        f'        m_new = tl.where(mx_new == float("-inf"), 0.0, tl.minimum(mx_new, 0.0) * {LOG2E})',
        "        alpha = tl.math.exp2(m_i - m_new)",
        f"        u = tl.math.exp2(tl.abs(s) * -{LOG2E} - m_new[:, None])",
        "        e = u * tl.math.exp2(m_new)[:, None]",
        f"        p = u * (1.0 + e * {horner('e', R_COEFFS)}) + tl.maximum(s, 0.0)",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        '        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)',
        '        m_i = tl.where(mx_new == float("-inf"), float("-inf"), m_new)',
        "        mx_i = mx_new",
    ]


# Below this mean weight (log2 units) a row's first softplus pass is not trusted (_softplus_fast).
FAST_FLOOR = 2.0 ** -8


def _softplus_fast(ir: N.Attention) -> list[str]:
    """Softplus's first pass on 16-bit inputs on a GPU (FAST_SOFTPLUS; launch.fast_math): weights
    in units of 1/ln 2, max(y, 0) + log2(1 + 2**-|y|) with y = s log2(e), one exp2 and one log2
    (single GPU instructions), summed without a running max, so nothing is rescaled per tile.
    That form loses a weight's relative precision where 2**-|y| is small against 1: every weight
    is within about 2**-21.6 of its value (the GPU's log2 is within 2**-22 near 1), so with a
    mean weight of at least FAST_FLOOR per visible key the output is within 2**-13.6 * max|v|, well
    inside 16-bit rounding. A q tile with a row below that floor (rows of very negative logits)
    runs the exact loops (_softplus_accumulate) instead. The interpreter and float32 inputs take
    the exact loops only (FAST_SOFTPLUS 0; 2 runs the first pass on tl.math.log2, for tests)."""
    fold = "row_scale" if ir.score.modified else f"row_scale * {LOG2E}"
    return [
        "    if FAST_SOFTPLUS:",
        *indent([
            f"    fast_scale = {fold}  # logits in base 2{' after the modifiers' if ir.score.modified else ''}",
            "    l_i = tl.zeros([SUB_M], tl.float32)",
            "    n_i = tl.zeros([SUB_M], tl.float32)  # visible keys",
            "    acc = tl.zeros([SUB_M, BLOCK_DV], tl.float32)",
            "",
            *_tile_loops(ir, fast=True),
            "",
            "    # The weights are in units of 1 / ln 2: the statistic's log2 offset is log2(ln 2).",
            f"    m_i = tl.full([SUB_M], {math.log2(math.log(2))!r}, tl.float32)",
            f"    exact = tl.max(tl.where(l_i < n_i * {FAST_FLOOR!r}, 1, 0), 0) > 0",
        ]),
        "    else:",
        "        exact: tl.constexpr = True",
        "    if exact:  # the exact loops: float32, the interpreter, or a row the first pass cannot serve",
    ]


def _softplus_fast_accumulate(ir: N.Attention, masked: bool, one_group: bool = False) -> list[str]:
    """_softplus_fast's weights for one kv piece (`keep`: the mask, on PARTIAL tiles)."""
    keep, masked = _keep(ir, masked, one_group)
    lines = [f"        s = s * {LOG2E}"] if ir.score.modified else []
    lines.append("        p = tl.maximum(s, 0.0) + _lg2(1.0 + tl.math.exp2(-tl.abs(s)), FAST_SOFTPLUS)")
    if masked:
        lines += [
            keep,
            "        p = tl.where(keep, p, 0.0)",
            "        n_i += tl.sum(tl.broadcast_to(tl.where(keep, 1.0, 0.0), [SUB_M, SUB_N]), 1)",
        ]
    else:
        lines.append("        n_i += SUB_N")
    return lines + [
        "        l_i += tl.sum(p, 1)",
        '        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)',
    ]


def _epilogue(score: N.Score) -> list[str]:
    if score.kind == "sigmoid":
        return [
            "    # Sigmoid weights are not normalised; the statistic kept is the row sum of weights.",
            "    out = acc",
            "    stat = l_i",
        ]
    return [
        "    # A row that sees no key outputs 0 and has statistic -inf (DESIGN.md section 3).",
        "    l_safe = tl.where(l_i == 0.0, 1.0, l_i)",
        "    out = acc / l_safe[:, None]",
        f'    stat = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * {LN2})',
    ]


def _store() -> list[str]:
    return [
        "    tl.store(O_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,",
        "             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V))",
        "    tl.store(Stat + bh.to(tl.int64) * Nq + offs_m, stat, mask=offs_m < Nq)",
    ]


def emit_kernel(ir: N.Attention) -> list[str]:
    """The @triton.jit forward kernel `attnc_fwd`, its signature from the ABI."""
    fast = softplus_first_pass(ir)
    return [
        "@triton.jit",
        "def attnc_fwd(",
        *abi.signature(ir),
        "):",
        *_docstring(ir.score),
        *_setup(ir),
        "    # The q tile SUB_M rows at a time, each kv tile SUB_N columns at a time (codegen/target.sub_tiles:",
        "    # smaller pieces where whole tiles would spill registers; else one pass, which Triton folds away).",
        "    for sub in range(0, BLOCK_M, SUB_M):",
        *indent([
            *_rows(ir),
            *(_softplus_fast(ir) if fast else []),
            *indent([
                *_init_state(ir.score),
                "",
                *_tile_loops(ir),
            ], "    " if fast else ""),
            "",
            *_epilogue(ir.score),
            *_store(),
        ]),
    ]


def indent(lines: list[str], by: str = "    ") -> list[str]:
    """Lines nested one level deeper (blank lines stay blank)."""
    return [by + x if x else x for x in lines]


def _has_window(ir: N.Attention) -> bool:
    return any(isinstance(x, N.Window) for e in pair_exprs(ir) for x in N.walk(e))


def _has_abs_test(ir: N.Attention) -> bool:
    return any(abs_bound(x) is not None for e in pair_exprs(ir) for x in N.walk(e))


def emit_forward(ir: N.Attention, header: str, backward: list[list[str]] = ()) -> str:
    """Complete module source: header comment, helpers, the mask predicate, the logit bias (when
    the spec has one), the forward kernel, then the `backward` parts (codegen/emit_bwd.py)."""
    parts = [header.strip("\n").splitlines(), ["import triton", "import triton.language as tl"],
             prelude(ir.score, _has_window(ir), ir.route is not None, _has_abs_test(ir)), emit_visible(ir)]
    if ir.score.logit_bias is not None:
        parts.append(emit_pair_function(ir, "logit_bias", ir.score.logit_bias, "bias"))
    parts.append(emit_kernel(ir))
    parts += backward
    return "\n\n\n".join("\n".join(p) for p in parts) + "\n"
