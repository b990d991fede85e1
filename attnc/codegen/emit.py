"""IR -> Triton source for the forward kernel.

The source depends only on the IR (parameters stay symbolic and arrive as runtime arguments),
so one generated file serves every size. Tile sizes, head dims and integer width are constexprs.
Names in the source come from the IR's validated identifiers, never from raw spec text.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.printer import format_expr, format_score, format_space

_OPS = {"+": "+", "-": "-", "*": "*", "==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=",
        "and": "&", "or": "|"}


def int_params(ir: N.Attention) -> list[str]:
    """Kernel argument names carrying the integer parameters, in declaration order."""
    return [f"p_{p.name}" for p in ir.params if p.type == N.INT]


def tensor_args(ir: N.Attention) -> list[str]:
    """Kernel argument names for runtime tensors: pointer, sizes, strides, and for tables that
    may be per head the head stride (0 when shared). Names are numbered (rt0, rt1, ...) rather
    than derived from spec names, so they can never collide."""
    out = []
    for n, t in enumerate(ir.tensors):
        out.append(f"rt{n}_ptr")
        out += [f"rt{n}_n{d}" for d in range(t.rank)] + [f"rt{n}_s{d}" for d in range(t.rank)]
        if t.per_head:
            out.append(f"rt{n}_hs")
    return out


def pair_args(ir: N.Attention) -> list[str]:
    """Arguments of the generated per-pair functions (visible, logit_bias) after q_i and k_i."""
    return ["h"] + int_params(ir) + ["head_dim"] + tensor_args(ir) + ["INT64"]


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
            return f"p_{e.name}"
        if isinstance(e, N.HeadDim):
            return "head_dim"
        if isinstance(e, N.Head):
            return "h"
        if isinstance(e, N.Lookup):
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
            offset = " + ".join(f"{i} * rt{n}_s{d}" for d, i in enumerate(idx))
            if self.ir.tensors[n].per_head:
                offset += f" + h * rt{n}_hs"
            inside = " & ".join(f"({i} >= 0) & ({i} < rt{n}_n{d})" for d, i in enumerate(idx))
            other = "0.0" if e.type == N.FLOAT else "0"
            # Padding rows and columns of a tile may index past the tensor: those loads are masked.
            return self.temp(f"tl.load(rt{n}_ptr + {offset}, mask={inside}, other={other})  # {e.tensor}[...]")
        if isinstance(e, N.Coord):
            return f"{self.key if e.side == 'k' else 'q'}_{e.axis}"
        if isinstance(e, N.Window):
            line = self.ir.line_of("mask")
            where = f" (spec line {line})" if line else ""
            self.lines.append(f"{self.indent}# {format_expr(e)}{where}")
            return self.temp(self.emit_inline(e.expand()))
        return self.temp(self.emit_inline(e))

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


def emit_pair_function(ir: N.Attention, name: str, expr: N.Expr, doc: str) -> str:
    """A @triton.jit function of one (query, key) tile pair ([M, 1] and [1, N] flat indices):
    the mask (`visible`) or the logit bias. On a segmented key space each segment gets its own
    decoded coordinates and its specialised expression, selected by the key's flat index."""
    head = [
        "@triton.jit",
        f"def {name}({', '.join(['q_i', 'k_i'] + pair_args(ir)[:-1] + ['INT64: tl.constexpr'])}):",
        f'    """{doc} = {format_expr(expr)}',
        "",
        f"    spec line {ir.line_of({'visible': 'mask', 'logit_bias': 'bias'}[name]) or '-'}; "
        f"q = {format_space(ir.q)}, kv = {format_space(ir.kv)}.",
        '    """',
        "    if INT64:  # widen every integer input, so that no intermediate can wrap",
        *(f"        {a} = tl.cast({a}, tl.int64)" for a in ["h"] + int_params(ir) + ["head_dim"]),
    ]
    is_bool = expr.type == N.BOOL
    if isinstance(expr, N.Const) and is_bool:
        # Constant masks still return a tile so callers can combine it with bounds checks.
        return "\n".join(head + [f"    return k_i {'>=' if expr.value else '<'} 0", ""])
    top = _Emitter(ir)
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
        em = _Emitter(ir, key=key, count=count)
        em.memo = dict(top.memo)
        if seg is not None:
            offset, size = bounds[j]
            em.lines.append(f"    # segment {seg}: {format_space(space)}")
            em.lines.append(f"    {key}_i = k_i" + ("" if offset == "0" else f" - {offset}"))
            em.lines.append(f"    in{j} = ({key}_i >= 0) & ({key}_i < {size})")
        em.lines += _decode(space, key, {a for s, a in _coords_used(sub) if s == "k"}, em)
        results.append((j, em.emit(sub)))
        body += em.lines
        count = em.count
        uses_tile0 = uses_tile0 or em.uses_tile0
    sizes = top.lines + (["    tile0 = (q_i + k_i) * 0  # broadcasts tile-invariant indices"] if uses_tile0 else [])
    if len(parts) == 1:
        result = results[0][1]
    elif is_bool:
        result = " | ".join(f"in{j}" if r == "True" else f"(in{j} & {r})" for j, r in results if r != "False")
        result = result or "k_i < 0"
    else:
        result = "0.0"
        for j, r in reversed(results):
            result = f"tl.where(in{j}, {r}, {result})"
    return "\n".join(head + sizes + body + [f"    return {result}", ""])


def emit_visible(ir: N.Attention) -> str:
    """The mask as a @triton.jit predicate over flat q/k indices ([M, 1] and [1, N] tiles)."""
    return emit_pair_function(ir, "visible", ir.mask, "mask")


_PRELUDE = '''\
@triton.jit
def _floordiv(a, b):
    # Triton integer division truncates toward zero; the spec language floors.
    q = a // b
    return q - (((a % b) != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _floormod(a, b):
    r = a % b
    return r + (((r != 0) & ((r < 0) != (b < 0))).to(r.dtype) * b)
'''


def _tile_step(masked: bool, score: N.Score) -> str:
    """One kv tile: FlashAttention-2 online softmax (log2 domain), or the sigmoid / softplus
    accumulation, which needs no running max."""
    kind = score.kind
    bounds = "(offs_n[:, None] < Nk) & " if masked else ""
    lines = [
        "        offs_n = kv_tile * BLOCK_N + offs_n0",
        "        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,",
        f"                    mask={bounds}(offs_d[None, :] < HEAD_DIM), other=0.0)",
        "        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"                    mask={bounds}(offs_dv[None, :] < HEAD_DIM_V), other=0.0)",
        "        s = tl.dot(q, tl.trans(k), input_precision=\"ieee\") * row_scale[:, None]",
    ]
    if masked or score.logit_bias is not None:
        lines += [
            "        k_i = offs_n[None, :]  # kernel position; the mask and bias read the token there",
            "        if KV_PERMUTED:",
            "            k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]",
            "        if INT64:",
            "            k_i = k_i.to(tl.int64)",
        ]
    if score.logit_bias is not None:
        lines.append("        s += logit_bias(q_i, k_i, PAIR_ARGS)")
    if score.softcap is not None:
        lines += [
            "        # soft-cap: softcap * tanh(s / softcap), with tanh from one exp (no overflow)",
            "        e2 = tl.exp(-2.0 * tl.abs(s) / softcap)",
            "        s = softcap * tl.where(s < 0, -1.0, 1.0) * (1.0 - e2) / (1.0 + e2)",
        ]
    if kind == "softmax" and score.modified:
        lines.append("        s = s * 1.4426950408889634  # to base 2 after the modifiers")
    if masked:
        lines.append("        keep = (offs_n[None, :] < Nk) & visible(q_i, k_i, PAIR_ARGS)")
    if kind == "softmax":
        if masked:
            lines.append("        s = tl.where(keep, s, float(\"-inf\"))")
        lines.append("        m_new = tl.maximum(m_i, tl.max(s, 1))")
        if masked or score.modified:
            lines += [
                "        # Rows that have seen no finite logit keep m = -inf; shift them by 0 to avoid inf - inf.",
                "        m_use = tl.where(m_new == float(\"-inf\"), 0.0, m_new)",
            ]
        else:
            lines.append("        m_use = m_new")
        lines += [
            "        alpha = tl.math.exp2(m_i - m_use)",
            "        p = tl.math.exp2(s - m_use[:, None])",
            "        l_i = l_i * alpha + tl.sum(p, 1)",
            "        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=\"ieee\")",
            "        m_i = m_new",
        ]
        return "\n".join(lines)
    if kind == "sigmoid":
        lines.append("        p = tl.sigmoid(s + row_bias[:, None])")
    else:
        lines += [
            "        # softplus(s) = max(s, 0) + log1p(exp(-|s|)), log1p written out (Goldberg) so that",
            "        # very negative logits keep their relative precision: the weights are normalised.",
            "        e = tl.exp(-tl.abs(s))",
            "        u = 1.0 + e",
            "        tiny = u == 1.0",
            "        p = tl.maximum(s, 0.0) + tl.where(tiny, e, tl.log(u) * (e / tl.where(tiny, 1.0, u - 1.0)))",
        ]
    if masked:
        lines.append("        p = tl.where(keep, p, 0.0)")
    lines += [
        "        l_i += tl.sum(p, 1)",
        "        acc += tl.dot(p.to(v.dtype), v, input_precision=\"ieee\")",
    ]
    return "\n".join(lines)


_EPILOGUE = {
    "softmax": """\
    # A row that sees no key outputs 0 and has logsumexp -inf (DESIGN.md section 3).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    stat = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)""",
    "sigmoid": """\
    # Sigmoid weights are not normalised; the statistic kept is the row sum of weights.
    out = acc
    stat = l_i""",
    "softplus": """\
    # l1-normalised softplus weights; a row that sees no key outputs 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    stat = l_i""",
}


_KERNEL = '''\
@triton.jit
def attnc_fwd(
    Q, K, V, Out, Stat, ROW_SCALE, ROW_BIAS, SINK, softcap,
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, Q_ORDER, KV_ORDER,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, kv_group, Nq, Nk, head_dim,PARAMS
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INT64: tl.constexpr, Q_PERMUTED: tl.constexpr, KV_PERMUTED: tl.constexpr,
):
    """Forward attention for one (query tile, batch * head).

    Tokens are in kernel order: Q, K, V, Out, Stat and the row vectors are indexed by kernel
    position; the mask and bias read the row-major token at a position through Q_ORDER and
    KV_ORDER when the layout permutes that side.

    Score: SCORE_TEXT.
    Per-row scale and bias come from the host (without modifiers, softmax's scale includes log2(e)).
    Stat receives the logsumexp (softmax) or the row sum of weights (sigmoid, softplus).
    """
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    h_kv = h // kv_group  # grouped-query attention: query head h reads kv head h // (Hq / Hkv)
    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    K_base = K + b * stride_kb + h_kv * stride_kh
    V_base = V + b * stride_vb + h_kv * stride_vh
    q_i = offs_m[:, None]
    if Q_PERMUTED:
        q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]
    if INT64:
        q_i = q_i.to(tl.int64)
    row_scale = tl.load(ROW_SCALE + offs_m, mask=offs_m < Nq, other=0.0)
    row_bias = tl.load(ROW_BIAS + offs_m, mask=offs_m < Nq, other=0.0)
INIT_STATE
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # FULL tiles: every pair is visible and in bounds; no predicate, no bounds checks.
    lo = tl.load(FULL_PTR + q_tile)
    hi = tl.load(FULL_PTR + q_tile + 1)
    for t in range(lo, hi):
        kv_tile = tl.load(FULL_IDX + t)
FULL_STEP

    # PARTIAL tiles: evaluate the mask per element. EMPTY tiles are never visited.
    lo = tl.load(PART_PTR + q_tile)
    hi = tl.load(PART_PTR + q_tile + 1)
    for t in range(lo, hi):
        kv_tile = tl.load(PART_IDX + t)
PARTIAL_STEP

EPILOGUE
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Stat + bh * Nq + offs_m, stat, mask=offs_m < Nq)
'''


_INIT = """\
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)"""
# The sink is a virtual key with logit SINK[h] and value 0: it starts the running max and sum.
_INIT_SINK = """\
    m_i = tl.full([BLOCK_M], 1.0, tl.float32) * (tl.load(SINK + h) * 1.4426950408889634)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)"""


def emit_forward(ir: N.Attention, header: str) -> str:
    """Complete module source: header comment, helpers, the mask predicate and the kernel."""
    params = int_params(ir)
    score = ir.score
    kernel = _KERNEL.replace("FULL_STEP", _tile_step(False, score)).replace("PARTIAL_STEP", _tile_step(True, score))
    kernel = kernel.replace("EPILOGUE", _EPILOGUE[score.kind]).replace("SCORE_TEXT", format_score(score))
    kernel = kernel.replace("INIT_STATE", _INIT_SINK if score.sink is not None else _INIT)
    kernel = kernel.replace("PARAMS", "".join(f"\n    {p}," for p in params + tensor_args(ir)))
    kernel = kernel.replace("PAIR_ARGS", ", ".join(pair_args(ir)))
    parts = [header, "import triton\nimport triton.language as tl", _PRELUDE, emit_visible(ir)]
    if score.logit_bias is not None:
        parts.append(emit_pair_function(ir, "logit_bias", score.logit_bias, "bias"))
    parts.append(kernel)
    return "\n\n\n".join(p.strip("\n") for p in parts) + "\n"
