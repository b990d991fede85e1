"""IR -> Triton source for the forward kernel.

The source depends only on the IR (parameters stay symbolic and arrive as runtime arguments),
so one generated file serves every size. Tile sizes, head dims and integer width are constexprs.
Names in the source come from the IR's validated identifiers, never from raw spec text.

The kernel's arguments are described once, in `abi.py`; the text is assembled from functions that
return lists of lines, in the order they appear in the kernel (no template, no placeholders, so
nothing a spec names can rewrite the kernel).
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.printer import format_expr, format_score, format_space
from . import abi

_OPS = {"+": "+", "-": "-", "*": "*", "==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=",
        "and": "&", "or": "|"}
LOG2E = "1.4426950408889634"
LN2 = "0.6931471805599453"


def int_params(ir: N.Attention) -> list[str]:
    """Kernel argument names carrying the integer parameters, in declaration order."""
    return [abi.param_name(p.name) for p in ir.params if p.type == N.INT]


class _Emitter:
    """Emits an expression as a list of assignments, sharing repeated subexpressions."""

    def __init__(self, ir: N.Attention, indent: str = "    ", key: str = "k", count: int = 0):
        self.ir = ir
        self.indent = indent
        self.key = key  # name prefix of key coordinates: 'k', or 'k0', 'k1', ... per segment
        self.lines: list[str] = []
        self.memo: dict[N.Expr, str] = {}
        self.count = count
        self.uses_tile0 = False  # needs `tile0`, a zero of the tile's shape

    def temp(self, code: str) -> str:
        name = f"t{self.count}"
        self.count += 1
        self.lines.append(f"{self.indent}{name} = {code}")
        return name

    def emit(self, e: N.Expr) -> str:
        if e in self.memo:
            return self.memo[e]
        out = self._emit(e)
        self.memo[e] = out
        return out

    def _emit(self, e: N.Expr) -> str:
        if isinstance(e, N.Const):
            return repr(e.value)
        if isinstance(e, N.Param):
            return abi.param_name(e.name)
        if isinstance(e, N.HeadDim):
            return "head_dim"
        if isinstance(e, N.Head):
            return "h"
        if isinstance(e, N.Lookup):
            n, offset, inside = self.lookup_offset(e)
            other = "0.0" if e.type == N.FLOAT else "0"
            # Padding rows and columns of a tile may index past the tensor: those loads are masked.
            # Offsets are int64 when INT64 is set (the launcher sets it for tables of 2**31 elements).
            return self.temp(f"tl.load({abi.table_name(n, 'ptr')} + {offset}, mask={inside}, other={other})  # {e.tensor}[...]")
        if isinstance(e, N.Coord):
            return f"{self.key if e.side == 'k' else 'q'}_{e.axis}"
        if isinstance(e, N.Window):
            line = self.ir.line_of("mask")
            where = f" (spec line {line})" if line else ""
            self.lines.append(f"{self.indent}# {format_expr(e)}{where}")
            return self.temp(self.emit_inline(e.expand()))
        return self.temp(self.emit_inline(e))

    def lookup_offset(self, e: N.Lookup) -> tuple[int, str, str]:
        """(tensor number, element offset, in-bounds condition) of a runtime tensor read."""
        n = [t.name for t in self.ir.tensors].index(e.tensor)
        # An index that is the same for the whole tile (`t[head, ...]`, `t[P, ...]`) is
        # broadcast to the tile first: Triton's interpreter mis-types a load mask that mixes
        # scalar and tile conditions.
        idx = []
        for i in e.indices:
            if _varies_per_pair(i):
                idx.append(self.emit(i))
            else:
                idx.append(self.temp(f"{self.emit(i)} + tile0"))
                self.uses_tile0 = True
        size, stride = (lambda d: abi.table_name(n, f"n{d}")), (lambda d: abi.table_name(n, f"s{d}"))
        offset = " + ".join(f"{i} * {stride(d)}" for d, i in enumerate(idx))
        if self.ir.tensors[n].per_head:
            offset += f" + h * {abi.table_name(n, 'hs')}"
        inside = " & ".join(f"({i} >= 0) & ({i} < {size(d)})" for d, i in enumerate(idx))
        return n, offset, inside

    def emit_inline(self, e: N.Expr) -> str:
        if isinstance(e, N.Unary):
            x = self.emit(e.operand)
            return {"not": f"~{x}", "neg": f"-{x}", "abs": f"tl.abs({x})"}[e.op]
        if isinstance(e, N.Binary):
            a, b = self.emit(e.lhs), self.emit(e.rhs)
            if e.op in ("min", "max"):
                return f"tl.{e.op}imum({a}, {b})"
            if e.op in ("//", "%"):
                if _nonneg(e.lhs) and _positive(e.rhs):
                    return f"{a} {e.op} {b}"  # C and floor semantics agree here
                return f"{'_floordiv' if e.op == '//' else '_floormod'}({a}, {b})"
            if e.op == "/":
                return f"(({a}) * 1.0 / {b})"  # true division, also of integers
            return f"({a} {_OPS[e.op]} {b})"
        if isinstance(e, N.Call):
            return f"tl.{e.fn}(({self.emit(e.args[0])}) * 1.0)"
        return self.emit(e)


def _varies_per_pair(e: N.Expr) -> bool:
    return any(isinstance(x, (N.Coord, N.Window)) for x in N.walk(e))


def _nonneg(e: N.Expr) -> bool:
    if isinstance(e, N.Const):
        return e.value >= 0
    if isinstance(e, (N.Coord, N.HeadDim)):
        return True
    if isinstance(e, N.Unary):
        return e.op == "abs"
    if isinstance(e, N.Binary):
        if e.op in ("+", "*", "min"):
            return _nonneg(e.lhs) and _nonneg(e.rhs)
        if e.op == "max":
            return _nonneg(e.lhs) or _nonneg(e.rhs)
        if e.op in ("//", "%"):
            return _nonneg(e.lhs) and _positive(e.rhs)
    return False


def _positive(e: N.Expr) -> bool:
    return isinstance(e, N.Const) and e.value > 0


def _decode(space: N.Space, name: str, used: set[str], em: _Emitter) -> list[str]:
    """Coordinates `{name}_{axis}` of tokens from the flat index `{name}_i` (row-major)."""
    out = []
    rest = f"{name}_i"
    axes = space.axes
    if space.kind == "seq" or not (used & set(axes)):
        return out
    for pos in range(len(axes) - 1, -1, -1):
        axis = axes[pos]
        size = em.emit(space.dims[pos])
        out.append(f"    {name}_{axis} = {rest} % {size}")
        if pos:
            out.append(f"    {name}_r{pos} = {rest} // {size}")
            rest = f"{name}_r{pos}"
    return out


def _coords_used(e: N.Expr) -> set[tuple[str, str]]:
    return {(x.side, x.axis) for x in N.walk(e, expand_windows=True) if isinstance(x, N.Coord)}


def emit_pair_function(ir: N.Attention, name: str, expr: N.Expr, doc: str, produce=None,
                       emitter=None) -> list[str]:
    """A @triton.jit function of one (query, key) tile pair ([M, 1] and [1, N] flat indices):
    the mask (`visible`), the logit bias, or (with `produce`, which returns the codes of several
    outputs from an emitter and the expression) values derived from the bias, such as its
    gradient. On a segmented key space each segment gets its own decoded coordinates and its
    specialised expression, selected by the key's flat index."""
    emitter = emitter or _Emitter
    head = [
        "@triton.jit",
        f"def {name}({', '.join(['q_i', 'k_i'] + abi.pair_params(ir))}):",
        f'    """{doc} = {format_expr(expr)}',
        "",
        f"    spec line {ir.line_of('mask' if expr is ir.mask else 'bias') or '-'}; "
        f"q = {format_space(ir.q)}, kv = {format_space(ir.kv)}.",
        '    """',
        "    if INT64:  # widen every integer input, so that no intermediate can wrap",
        *(f"        {a} = tl.cast({a}, tl.int64)" for a in ["h"] + int_params(ir) + ["head_dim"]),
    ]
    is_bool = expr.type == N.BOOL and produce is None
    if isinstance(expr, N.Const) and is_bool:
        # Constant masks still return a tile so callers can combine it with bounds checks.
        return head + [f"    return k_i {'>=' if expr.value else '<'} 0"]
    produce = produce or (lambda em, sub: [em.emit(sub)])
    top = emitter(ir)
    q_used = {a for s, a in _coords_used(expr) if s == "q"}
    body = _decode(ir.q, "q", q_used, top)
    parts = N.parts(ir.kv)
    if isinstance(ir.kv, N.Segments):  # segment bounds first, so every segment shares them
        bounds = [(top.emit(o), top.emit(sp.size())) for o, (_, sp) in zip(ir.kv.offsets(), parts)]
    results = []
    count = top.count
    uses_tile0 = False
    for j, (seg, space) in enumerate(parts):
        sub = N.specialise(expr, seg)
        key = "k" if seg is None else f"k{j}"
        em = emitter(ir, key=key, count=count)
        em.memo = dict(top.memo)
        if seg is not None:
            offset, size = bounds[j]
            em.lines.append(f"    # segment {seg}: {format_space(space)}")
            em.lines.append(f"    {key}_i = k_i" + ("" if offset == "0" else f" - {offset}"))
            em.lines.append(f"    in{j} = ({key}_i >= 0) & ({key}_i < {size})")
        em.lines += _decode(space, key, {a for s, a in _coords_used(sub) if s == "k"}, em)
        results.append((j, produce(em, sub)))
        body += em.lines
        count = em.count
        uses_tile0 = uses_tile0 or em.uses_tile0
    sizes = top.lines + (["    tile0 = (q_i + k_i) * 0  # broadcasts tile-invariant indices"] if uses_tile0 else [])
    outputs = []
    for o in range(len(results[0][1])):
        if len(parts) == 1:
            result = results[0][1][o]
        elif is_bool:
            result = " | ".join(f"in{j}" if r[o] == "True" else f"(in{j} & {r[o]})" for j, r in results
                                if r[o] != "False")
            result = result or "k_i < 0"
        else:
            result = "0.0"
            for j, r in reversed(results):
                result = f"tl.where(in{j}, {r[o]}, {result})"
        outputs.append(result)
    return head + sizes + body + [f"    return {', '.join(outputs)}"]


def emit_visible(ir: N.Attention) -> list[str]:
    """The mask as a @triton.jit predicate over flat q/k indices ([M, 1] and [1, N] tiles)."""
    return emit_pair_function(ir, "visible", ir.mask, "mask")


# -- helpers ----------------------------------------------------------------------------------
def _prelude(score: N.Score) -> list[str]:
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
    if score.softcap is not None:
        lines += ["", "", *_SOFTCAP]
    if score.kind == "softplus":
        lines += ["", "", *_LOG_SOFTPLUS]
    return lines


# tanh(x) / x = 1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925 + ...: for |x| < 1/4
# the next term is below 1e-9 relative to the sum.
_SOFTCAP = [
    "@triton.jit",
    "def _softcap(s, cap):",
    '    """cap * tanh(s / cap) without cancellation, so that a huge cap returns s itself."""',
    "    ax = tl.abs(s / cap)",
    "    # |x| < 1/4: s * tanh(x) / x, by the Taylor series of tanh(x) / x to x**10 (in a clamped",
    "    # |x|, so that the branch not taken cannot overflow).",
    "    a = tl.minimum(ax, 0.25)",
    "    y = a * a",
    "    series = 1.0 + y * (-0.3333333333333333 + y * (0.13333333333333333 + y * (-0.05396825396825397",
    "             + y * (0.021869488536155203 + y * -0.008863235529902197))))",
    "    # otherwise tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) <= exp(-1/2): no cancellation, no overflow.",
    "    e = tl.exp(-2.0 * ax)",
    "    big = cap * ((1.0 - e) / (1.0 + e))",
    "    return tl.where(ax < 0.25, s * series, tl.where(s < 0.0, -big, big))",
]


# Shared by the forward and backward kernels.
_LOG_SOFTPLUS = [
    "@triton.jit",
    "def _log_softplus(s):",
    '    """(log softplus(s), log1p(exp(-|s|))), exact where softplus underflows: with e = exp(-|s|)',
    "    and r = log1p(e) / e (log1p written out (Goldberg), r -> 1 as e -> 0), softplus(s) = e * r",
    "    for s < 0 and |s| + e * r otherwise (the branch not taken never sees the log of a negative).",
    '    """',
    "    e = tl.exp(-tl.abs(s))",
    "    u = 1.0 + e",
    "    tiny = u == 1.0",
    "    r = tl.where(tiny, 1.0, tl.log(u) / tl.where(tiny, 1.0, u - 1.0))",
    "    return tl.where(s < 0.0, s + tl.log(r), tl.log(tl.abs(s) + e * r)), e * r",
]


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


def _setup(score: N.Score) -> list[str]:
    """Program ids, base pointers, offsets, the q tile, its tokens and row scores."""
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
        "    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    offs_n0 = tl.arange(0, BLOCK_N)",
        "    offs_d = tl.arange(0, BLOCK_D)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    if ADDR64:",
        "        offs_m, offs_n0 = offs_m.to(tl.int64), offs_n0.to(tl.int64)",
        "        offs_d, offs_dv = offs_d.to(tl.int64), offs_dv.to(tl.int64)",
        "    q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        "                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)",
        "    q_i = offs_m[:, None]",
        "    if Q_PERMUTED:",
        "        q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]",
        "    if INT64:",
        "        q_i = q_i.to(tl.int64)",
        "    row_scale = tl.load(ROW_SCALE + offs_m, mask=offs_m < Nq, other=0.0)",
    ] + ([  # only sigmoid adds a per-row bias after the modifiers
        "    row_bias = tl.load(ROW_BIAS + offs_m, mask=offs_m < Nq, other=0.0)",
    ] if score.kind == "sigmoid" else [])


def _init_state(score: N.Score) -> list[str]:
    if score.sink is not None:
        # The sink is a virtual key with logit SINK[h] and value 0: it starts the running max and sum.
        state = [
            f"    m_i = tl.full([BLOCK_M], 1.0, tl.float32) * (tl.load(SINK + h64) * {LOG2E})",
            "    l_i = tl.full([BLOCK_M], 1.0, tl.float32)",
        ]
    elif score.kind == "sigmoid":  # weights are not normalised: no running maximum
        state = ["    l_i = tl.zeros([BLOCK_M], tl.float32)"]
    else:
        state = [
            '    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)',
            "    l_i = tl.zeros([BLOCK_M], tl.float32)",
        ]
    return state + ["    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)"]


def _tile_loop(ir: N.Attention, masked: bool) -> list[str]:
    """The loop over the FULL or the PARTIAL kv tiles the schedule lists for this q tile."""
    ptr, idx = ("PART_PTR", "PART_IDX") if masked else ("FULL_PTR", "FULL_IDX")
    what = ("    # PARTIAL tiles: evaluate the mask per element. EMPTY tiles are never visited." if masked else
            "    # FULL tiles: every pair is visible and in bounds; no predicate, no bounds checks.")
    return [
        what,
        f"    lo = tl.load({ptr} + q_tile)",
        f"    hi = tl.load({ptr} + q_tile + 1)",
        "    for t in range(lo, hi):",
        f"        kv_tile = tl.load({idx} + t)",
        *_load_kv(masked),
        *_logits(ir, masked),
        *_accumulate(ir, masked),
    ]


def _load_kv(masked: bool) -> list[str]:
    bounds = "(offs_n[:, None] < Nk) & " if masked else ""
    return [
        "        offs_n = kv_tile * BLOCK_N + offs_n0",
        "        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,",
        f"                    mask={bounds}(offs_d[None, :] < HEAD_DIM), other=0.0)",
        "        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"                    mask={bounds}(offs_dv[None, :] < HEAD_DIM_V), other=0.0)",
    ]


def _logits(ir: N.Attention, masked: bool) -> list[str]:
    """s: the tile's logits after the logit bias and the soft-cap (natural units, or base 2 for an
    unmodified softmax, whose host scale includes log2(e))."""
    score = ir.score
    call = ", ".join(["q_i", "k_i"] + abi.pair_call_args(ir))
    lines = ['        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * row_scale[:, None]']
    if masked or score.logit_bias is not None:
        lines += [
            "        k_i = offs_n[None, :]  # kernel position; the mask and bias read the token there",
            "        if KV_PERMUTED:",
            "            k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]",
            "        if INT64:",
            "            k_i = k_i.to(tl.int64)",
        ]
    if score.logit_bias is not None:
        lines.append(f"        s += logit_bias({call})")
    if score.softcap is not None:
        lines.append("        s = _softcap(s, softcap)")
    return lines


def _accumulate(ir: N.Attention, masked: bool) -> list[str]:
    """Fold the tile into the running state (`keep`: the mask, on PARTIAL tiles). Softmax and
    softplus share FlashAttention-2's online normalisation (log2 domain): softplus runs it on
    log softplus(s), so its weights are normalised in log space. Sigmoid weights are not
    normalised and need no running max."""
    score = ir.score
    keep = f"        keep = (offs_n[None, :] < Nk) & visible({', '.join(['q_i', 'k_i'] + abi.pair_call_args(ir))})"
    lines = []
    if score.kind == "sigmoid":
        lines.append("        p = tl.sigmoid(s + row_bias[:, None])")
        if masked:
            lines += [keep, "        p = tl.where(keep, p, 0.0)"]
        return lines + [
            "        l_i += tl.sum(p, 1)",
            '        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)',
        ]
    if score.kind == "softplus":
        lines += [
            "        log_sp, l1p = _log_softplus(s)",
            f"        s = log_sp * {LOG2E}  # base 2",
        ]
    elif score.modified:
        lines.append(f"        s = s * {LOG2E}  # to base 2 after the modifiers")
    if masked:
        lines += [keep, '        s = tl.where(keep, s, float("-inf"))']
    lines.append("        m_new = tl.maximum(m_i, tl.max(s, 1))")
    if masked or score.modified:
        lines += [
            "        # Rows that have seen no finite logit keep m = -inf; shift them by 0 to avoid inf - inf.",
            '        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
        ]
    else:
        lines.append("        m_use = m_new")
    return lines + [
        "        alpha = tl.math.exp2(m_i - m_use)",
        "        p = tl.math.exp2(s - m_use[:, None])",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        '        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)',
        "        m_i = m_new",
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
    return [
        "@triton.jit",
        "def attnc_fwd(",
        *abi.signature(ir),
        "):",
        *_docstring(ir.score),
        *_setup(ir.score),
        *_init_state(ir.score),
        "",
        *_tile_loop(ir, masked=False),
        "",
        *_tile_loop(ir, masked=True),
        "",
        *_epilogue(ir.score),
        *_store(),
    ]


def emit_forward(ir: N.Attention, header: str, backward: list[list[str]] = ()) -> str:
    """Complete module source: header comment, helpers, the mask predicate, the logit bias (when
    the spec has one), the forward kernel, then the `backward` parts (codegen/emit_bwd.py)."""
    parts = [header.strip("\n").splitlines(), ["import triton", "import triton.language as tl"],
             _prelude(ir.score), emit_visible(ir)]
    if ir.score.logit_bias is not None:
        parts.append(emit_pair_function(ir, "logit_bias", ir.score.logit_bias, "bias"))
    parts.append(emit_kernel(ir))
    parts += backward
    return "\n\n\n".join("\n".join(p) for p in parts) + "\n"
