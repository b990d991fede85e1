"""IR -> Triton source for the backward kernels (FlashAttention-2 structure).

Forward saved one statistic per row (the logsumexp, log of the softplus normaliser); nothing of
size N^2 is kept. Two kernels recompute the tile's logits:

- `attnc_bwd_dq`, one program per (q tile, batch * head), walks the forward schedule and
  accumulates dQ, and the gradients of the bias tables (see below);
- `attnc_bwd_dkdv`, one program per (kv tile, batch * kv head), walks the transposed schedule
  (the q tiles that see the kv tile) for every query head of its group in turn, and accumulates
  dK and dV. Grouped-query sums are therefore a fixed sequential order: no atomics.

EMPTY tiles are never visited; FULL tiles evaluate no mask. Logits are in natural units here
(the host passes the unscaled row scale), so p = exp(s - lse).

Bias tables get deterministic gradients without atomics: the dQ program owns a private row of a
[programs, numel] buffer, adds each tile's per-entry sums there in a fixed order (entries in
ascending order, tiles in schedule order), and the host sums the rows (torch.sum, fixed order).
The per-entry sum over a tile loops over the entries the tile's visible pairs read.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.printer import format_score
from . import abi
from .emit import LOG2E, csr_row, indent, keep_expr, route_cols, route_rows, row_vector_at, tile_lists
from .pairs import _Emitter, emit_pair_function, pair_call, varies_per_pair
from .parts import load_lines

_INF = 'float("inf")'


class _GradEmitter(_Emitter):
    """An emitter that also writes derivatives of float expressions with respect to a table read."""

    def deriv(self, e: N.Expr, wrt: N.Lookup) -> str | None:
        """Code of d e / d wrt, or None where it is zero (e does not read `wrt`)."""
        if e == wrt:
            return "1.0"
        if not any(x == wrt for x in N.walk(e)):
            return None
        if isinstance(e, N.Unary):
            d = self.deriv(e.operand, wrt)
            if e.op == "neg":
                return self.temp(f"-{d}")
            x = self.emit(e.operand)  # abs; abs'(0) = 0, as torch has it
            return self.temp(f"tl.where({x} > 0, {d}, tl.where({x} < 0, -{d}, 0.0))")
        if isinstance(e, N.Call):
            a, d = self.emit(e.args[0]), self.deriv(e.args[0], wrt)
            outer = {"exp": self.emit(e), "log": f"1.0 / {a}", "sqrt": f"0.5 / {self.emit(e)}"}[e.fn]
            return self.temp(f"{d} * {outer}")
        if isinstance(e, N.Binary):
            da, db = self.deriv(e.lhs, wrt), self.deriv(e.rhs, wrt)
            both = e.op in ("min", "max", "/")  # else only the operands the rule reads
            a = self.emit(e.lhs) if db or both else None
            b = self.emit(e.rhs) if da or both else None
            if e.op in ("min", "max"):  # a tie splits the gradient evenly, as torch does
                first = "<" if e.op == "min" else ">"
                da, db = da or "0.0", db or "0.0"
                return self.temp(f"tl.where({a} {first} {b}, {da}, tl.where({a} == {b}, 0.5 * ({da} + {db}), {db}))")
            terms = {"+": [da, db], "-": [da, db and f"-{db}"],
                     "*": [da and f"{da} * {b}", db and f"{a} * {db}"],
                     "/": [da and f"{da} / {b}", db and f"-{a} * {db} / ({b} * {b})"]}[e.op]
            return self.temp(" + ".join(f"({t})" for t in terms if t))
        raise TypeError(f"no derivative for {e!r}")  # the verifier admits no other float node


def _table_reads(e: N.Expr, tensor: str) -> list[N.Lookup]:
    seen: list[N.Lookup] = []
    for x in N.walk(e):
        if isinstance(x, N.Lookup) and x.tensor == tensor and x not in seen:
            seen.append(x)
    return seen


def _grad_slots(ir: N.Attention) -> list[tuple[int, int]]:
    """(tensor number, read number) of every bias table read: on a segmented key space the
    specialised bias of each segment may read a table a different number of times."""
    out = []
    for n in abi.grad_tables(ir):
        name = ir.tensors[n].name
        reads = max(len(_table_reads(N.specialise(ir.score.logit_bias, seg), name)) for seg, _ in N.parts(ir.kv))
        out += [(n, r) for r in range(reads)]
    return out


def emit_grad_functions(ir: N.Attention) -> list[list[str]]:
    """Per table read r of tensor n, `bias_grad_n_r(q_i, k_i, ...)` -> (flat element offset,
    d bias / d element): the tile's entries read and their weights in the bias's gradient."""
    out = []
    for n, r in _grad_slots(ir):
        name = ir.tensors[n].name

        def produce(em: _GradEmitter, sub: N.Expr, n=n, r=r, name=name) -> list[str]:
            reads = _table_reads(sub, name)
            if r >= len(reads):
                return ["0", "0.0"]
            _, offset, _ = em.lookup_offset(reads[r])
            return [em.temp(offset), em.deriv(sub, reads[r]) or "0.0"]

        out.append(emit_pair_function(ir, f"bias_grad_{n}_{r}", ir.score.logit_bias,
                                      f"(offset, d bias / d {name}[...]) of read {r} of {name} in the bias",
                                      produce=produce, emitter=_GradEmitter))
    return out


def _logits_and_ds(ir: N.Attention, masked: bool, weights: bool = True, rows: bool = False,
                   one_group: bool = False) -> list[str]:
    """The tile's logits s, the weights p (zero where hidden; only where ds needs them, unless
    `weights`) and ds = d loss / d logit before the row scale, from q, k, v, do and the row
    vectors in scope. `rows`: a FULL tile whose q tile may run past the last query (dK/dV sums
    over rows, so padding rows must add exact zeros even where a bias is not finite there)."""
    score = ir.score
    call = pair_call(ir)
    lines = [*_head_dot("s", "q", "k", "D"), "        s = s * row_scale[:, None]"]
    if score.logit_bias is not None:
        lines.append(f"        s += logit_bias({call})")
    if score.softcap is not None:
        lines += ["        t_cap = _tanh(s * (1.0 / softcap), FAST_TANH)",
                  "        s = t_cap * softcap",
                  "        d_cap = 1.0 - t_cap * t_cap  # d cap*tanh(z/cap) / dz"]
    if masked:
        lines.append(f"        keep = {keep_expr(ir, True, '(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)')}")
    elif rows:
        lines.append(f"        keep = {keep_expr(ir, False, '(offs_m[:, None] < Nq) & (offs_n[None, :] >= 0)')}")
    elif ir.route is not None:
        lines.append(f"        keep = {keep_expr(ir, False, '', one_group)}")
    masked = masked or ir.route is not None  # routed tiles, FULL ones too, keep the chosen keys only
    hide = (lambda x: f"tl.where(keep, {x}, 0.0)") if masked or rows else (lambda x: x)
    lines += _head_dot("dp", "do", "v", "DV")
    if score.kind == "softmax":
        lines += [f"        p = {hide('tl.exp(s - stat_safe[:, None])')}",
                  "        ds = p * (dp - delta[:, None])"]
    elif score.kind == "sigmoid":
        lines += ["        x = s + row_bias[:, None]",
                  f"        p = {hide('tl.sigmoid(x)')}",
                  "        ds = dp * p * tl.sigmoid(-x)  # sigmoid' = sigmoid(x) sigmoid(-x), no cancellation"]
    else:  # softplus: w = softplus(s) / L, dw/ds = sigmoid(s) / L, both in log space
        lines.append("        log2_sp, l1p = _log2_softplus(s)  # log sigmoid(s) = min(s, 0) - l1p")
        if weights:
            lines.append(f"        p = {hide(f'tl.math.exp2(log2_sp - stat_safe[:, None] * {LOG2E})')}")
        lines.append(f"        ds = (dp - delta[:, None]) * {hide('tl.exp(tl.minimum(s, 0.0) - l1p - stat_safe[:, None])')}")
    if score.softcap is not None:
        lines.append("        ds = ds * d_cap")
    if (masked or rows) and score.logit_bias is not None and (score.softcap is not None or score.kind != "softmax"):
        # factors computed at hidden pairs (a bias may be nan there) must not reach ds
        lines.append("        ds = tl.where(keep, ds, 0.0)")
    return lines


_HEAD = {"D": "HEAD_DIM", "DV": "HEAD_DIM_V"}
_ROWS = {"q": ("Q", "q", "m", "Nq"), "do": ("DO", "do", "m", "Nq"), "k": ("K", "k", "n", "Nk"), "v": ("V", "v", "n", "Nk")}


def _head_dot(out: str, a: str, b: str, dim: str) -> list[str]:
    """out = a @ b^T over the head dim (D or DV). With D_CHUNK below the head dim (float32 at large
    head dims on a GPU: codegen/target.head_chunk) the sum runs D_CHUNK columns at a time in a
    loop, each chunk of a and b loaded again there: whole rows of 32-bit operands, split in two for
    3xTF32, took most of the registers the kernels spilled for. Else one tl.dot of the tiles."""
    def load(x: str) -> str:
        base, stride, axis, n = _ROWS[x]
        return (f"tl.load({base}_base + offs_{axis}[:, None] * stride_{stride}{axis} + offs_c[None, :] * "
                f"stride_{stride}d, mask=(offs_{axis}[:, None] < {n}) & (offs_c[None, :] < {_HEAD[dim]}), "
                "other=0.0)")
    return [
        f"        if D_CHUNK >= BLOCK_{dim}:",
        f"            {out} = tl.dot({a}, tl.trans({b}), input_precision=DOT_PRECISION)",
        "        else:",
        f"            {out} = tl.zeros([SUB_M, SUB_N], tl.float32)",
        f"            for d0 in range(0, BLOCK_{dim}, D_CHUNK):  # a loop, not unrolled: one chunk live at a time",
        "                offs_c = d0 + offs_c0",
        f"                {out} += tl.dot({load(a)},",
        f"                            tl.trans({load(b)}), input_precision=DOT_PRECISION)",
    ]


def _uniform_read(ir: N.Attention, n: int, r: int) -> bool:
    """Read r of table n names one entry for the whole tile (`slopes[head]`). Not on segmented
    spaces: there the read, and whether there is one, may change within a tile."""
    name = ir.tensors[n].name
    if isinstance(ir.q, N.Segments) or isinstance(ir.kv, N.Segments):
        return False
    for seg, _ in N.parts(ir.kv):
        reads = _table_reads(N.specialise(ir.score.logit_bias, seg), name)
        if r < len(reads) and any(varies_per_pair(i) for i in reads[r].indices):
            return False
    return True


def _table_grads(ir: N.Attention, masked: bool) -> list[str]:
    """Add the tile's contribution to this program's row of every bias table's gradient."""
    call = pair_call(ir)
    slots = _grad_slots(ir)
    # A FULL tile's q tile may run past the last query: those rows read no table entry.
    lines = ["        keep = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)"] if slots and not masked else []
    for n, r in slots:
        lines += [
            f"        if {abi.table_name(n, 'want')}:  # {ir.tensors[n].name}, read {r}: per entry, the sum of "
            "ds * d bias / d entry over the tile",
            f"            g_at, g_w = bias_grad_{n}_{r}({call})",
            "            g_val = tl.where(keep, ds * g_w, 0.0)",
        ]
        if _uniform_read(ir, n, r):  # one entry for the whole tile: one sum, no loop over entries
            lines += [f"            g_ptr = G{n} + g_at",
                      "            tl.store(g_ptr, tl.load(g_ptr) + tl.sum(g_val))"]
            continue
        lines += [
            "            g_lo = tl.min(tl.where(keep, g_at, tl.max(g_at)))",
            "            g_hi = tl.max(tl.where(keep, g_at, -1))",
            "            for g_f in range(g_lo, g_hi + 1):  # ascending: a fixed order of additions",
            f"                g_ptr = G{n} + g_f",
            "                tl.store(g_ptr, tl.load(g_ptr) + tl.sum(tl.where(g_at == g_f, g_val, 0.0)))",
        ]
    return lines


def _row_vectors(ir: N.Attention, indent: str, bh: str) -> list[str]:
    """Row scale, bias and saved statistics of the q tile at offs_m (`bh`: batch * head, int64)."""
    score = ir.score
    at = row_vector_at(ir, bh)
    lines = [f"{indent}row_scale = tl.load(ROW_SCALE + {at}, mask=offs_m < Nq, other=0.0)"]
    if score.kind == "sigmoid":
        lines.append(f"{indent}row_bias = tl.load(ROW_BIAS + {at}, mask=offs_m < Nq, other=0.0)")
    else:
        lines += [
            f'{indent}stat = tl.load(Stat + bh64 * Nq + offs_m, mask=offs_m < Nq, other=float("-inf"))',
            f"{indent}# a row that sees nothing has statistic -inf: its weights are exp(s - inf) = 0",
            f'{indent}stat_safe = tl.where(stat == float("-inf"), {_INF}, stat)',
            f"{indent}delta = tl.load(Delta + bh64 * Nq + offs_m, mask=offs_m < Nq, other=0.0)",
        ]
    return lines


def _load_rows(ir: N.Attention, indent: str) -> list[str]:
    """q and do of the q tile at offs_m (bounded: even a FULL tile's q tile may run past the last
    query), and the row-major tokens there."""
    rows = "(offs_m[:, None] < Nq) & "
    return [
        f"{indent}q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,",
        f"{indent}            mask={rows}(offs_d[None, :] < HEAD_DIM), other=0.0)",
        f"{indent}do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,",
        f"{indent}             mask={rows}(offs_dv[None, :] < HEAD_DIM_V), other=0.0)",
        f"{indent}q_i = offs_m[:, None]",
        f"{indent}if Q_PERMUTED:",
        f"{indent}    q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]",
        f"{indent}if INT64:",
        f"{indent}    q_i = q_i.to(tl.int64)",
        *load_lines(ir, "q", indent),
        *route_rows(ir, indent),
    ]


def _load_cols(ir: N.Attention, indent: str, bounded: bool, first: str | None = None) -> list[str]:
    """k and v of the kv tile at offs_n, and the row-major tokens there."""
    cols = "(offs_n[:, None] < Nk) & " if bounded else ""
    return [
        f"{indent}k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,",
        f"{indent}            mask={cols}(offs_d[None, :] < HEAD_DIM), other=0.0)",
        f"{indent}v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"{indent}            mask={cols}(offs_dv[None, :] < HEAD_DIM_V), other=0.0)",
        f"{indent}k_i = offs_n[None, :]",
        f"{indent}if KV_PERMUTED:",
        f"{indent}    k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]",
        f"{indent}if INT64:",
        f"{indent}    k_i = k_i.to(tl.int64)",
        *load_lines(ir, "k", indent),
        *route_cols(ir, indent, first),
    ]


_OFFSETS = [
    "    offs_d = tl.arange(0, BLOCK_D)",
    "    offs_dv = tl.arange(0, BLOCK_DV)",
    "    offs_c0 = tl.arange(0, D_CHUNK)",
    "    if ADDR64:",
    "        offs_d, offs_dv, offs_c0 = offs_d.to(tl.int64), offs_dv.to(tl.int64), offs_c0.to(tl.int64)",
]


def _dq_kernel(ir: N.Attention) -> list[str]:
    score = ir.score
    lines = [
        "@triton.jit",
        "def attnc_bwd_dq(",
        *abi.signature(ir, kernel="dq"),
        "):",
        '    """dQ (and bias-table gradients) for one (query tile, batch * head), over the forward schedule.',
        "",
        f"    Score: {format_score(score)}.",
        '    """',
        "    q_tile = tl.program_id(0)",
        "    bh = tl.program_id(1)",
        "    b = bh // n_heads",
        "    h = bh % n_heads",
        "    h_kv = h // kv_group",
        "    b64, h64, h_kv64 = b.to(tl.int64), h.to(tl.int64), h_kv.to(tl.int64)",
        *(["    bh64 = bh.to(tl.int64)"] if score.kind != "sigmoid" or abi.grad_tables(ir) else []),
        "    Q_base = Q + b64 * stride_qb + h64 * stride_qh",
        "    K_base = K + b64 * stride_kb + h_kv64 * stride_kh",
        "    V_base = V + b64 * stride_vb + h_kv64 * stride_vh",
        "    DO_base = DO + b64 * stride_dob + h64 * stride_doh",
        "    DQ_base = DQ + b64 * stride_dqb + h64 * stride_dqh",
        "    # The q tile SUB_M rows at a time, each kv tile SUB_N columns at a time (codegen/target.sub_tiles:",
        "    # smaller pieces where whole tiles would spill registers; else one pass, which Triton folds away).",
        "    offs_m0 = tl.arange(0, SUB_M)",
        "    offs_n0 = tl.arange(0, SUB_N)",
        "    if ADDR64:",
        "        offs_m0, offs_n0 = offs_m0.to(tl.int64), offs_n0.to(tl.int64)",
        *_OFFSETS,
    ]
    for n in abi.grad_tables(ir):
        # This program's own row; a table passed per head holds this head's slice only (offsets
        # there include h * hs, subtracted here; hs is 0 for a shared table).
        head = f" - h64 * {abi.table_name(n, 'hs')}" if ir.tensors[n].per_head else ""
        lines.append(f"    G{n} = {abi.table_name(n, 'grad')} + (bh64 * tl.num_programs(0) + q_tile) * "
                     f"{abi.table_name(n, 'gstride')}{head}")
    lines += [
        "    for sub in range(0, BLOCK_M, SUB_M):",
        "        offs_m = q_tile * BLOCK_M + sub + offs_m0",
        *_load_rows(ir, "        "),
        *_row_vectors(ir, "        ", "bh.to(tl.int64)"),
        "        dq = tl.zeros([SUB_M, BLOCK_D], tl.float32)",
    ]
    for kind in tile_lists(ir):
        masked, one_group = kind == "PART", kind == "FULL" and ir.route is not None
        ptr, idx = f"{kind}_PTR", f"{kind}_IDX"
        body = [
            f"        for t in range(tl.load({ptr} + {csr_row(ir, 'q_tile', 'bh')}), "
            f"tl.load({ptr} + {csr_row(ir, 'q_tile', 'bh')} + 1)):",
            f"            n_start = tl.load({idx} + t) * BLOCK_N",
            "            for col in range(0, BLOCK_N, SUB_N):",
            "                offs_n = n_start + col + offs_n0",
            *indent(_load_cols(ir, "        ", bounded=masked, first="n_start" if one_group else None), "        "),
            *indent(_logits_and_ds(ir, masked, weights=False, one_group=one_group), "        "),
            '                dq += tl.dot((ds * row_scale[:, None]).to(k.dtype), k, input_precision=DOT_PRECISION)',
            # after the matmul: k is dead by then (fewer live registers)
            *indent(_table_grads(ir, masked), "        "),
        ]
        lines += ["", {"PART": "        # PARTIAL tiles: the mask per element.",
                       "MIXED": "        # FULL tiles of several routing groups: the routing per element.",
                       "FULL": "        # FULL tiles: no mask, no bounds checks." +
                       (" One routing group: the routing per row." if one_group else "")}[kind], *body]
    return lines + [
        "",
        "        tl.store(DQ_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,",
        "                 dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM))",
    ]


def _dkdv_kernel(ir: N.Attention) -> list[str]:
    score = ir.score
    lines = [
        "@triton.jit",
        "def attnc_bwd_dkdv(",
        *abi.signature(ir, kernel="dkdv"),
        "):",
        '    """dK and dV for one (kv tile, batch * kv head), over the transposed schedule, summing the',
        "    query heads of the group in order (deterministic grouped-query gradients).",
        "",
        f"    Score: {format_score(score)}.",
        '    """',
        "    kv_tile = tl.program_id(0)",
        "    bhk = tl.program_id(1)",
        "    n_kv = n_heads // kv_group",
        "    b = bhk // n_kv",
        "    h_kv = bhk % n_kv",
        "    b64, h_kv64 = b.to(tl.int64), h_kv.to(tl.int64)",
        "    K_base = K + b64 * stride_kb + h_kv64 * stride_kh",
        "    V_base = V + b64 * stride_vb + h_kv64 * stride_vh",
        "    # The kv tile SUB_N columns at a time, each q tile SUB_M rows at a time (codegen/target.sub_tiles:",
        "    # smaller pieces where whole tiles would spill registers; else one pass, which Triton folds away).",
        "    offs_n0 = tl.arange(0, SUB_N)",
        "    offs_m0 = tl.arange(0, SUB_M)",
        "    if ADDR64:",
        "        offs_n0, offs_m0 = offs_n0.to(tl.int64), offs_m0.to(tl.int64)",
        *_OFFSETS,
        "    DK_base = DK + b64 * stride_dkb + h_kv64 * stride_dkh",
        "    DV_base = DV + b64 * stride_dvb + h_kv64 * stride_dvh",
        "    for col in range(0, BLOCK_N, SUB_N):",
        "        offs_n = kv_tile * BLOCK_N + col + offs_n0",
    ]
    body = [
        *_load_cols(ir, "    ", bounded=True),
        "    dk = tl.zeros([SUB_N, BLOCK_D], tl.float32)",
        "    dv = tl.zeros([SUB_N, BLOCK_DV], tl.float32)",
        "    for g in range(0, kv_group):",
        "        h = h_kv * kv_group + g",
        "        h64 = h.to(tl.int64)",
        *(["        bh64 = b64 * n_heads + h64"] if score.kind != "sigmoid" else []),
        "        Q_base = Q + b64 * stride_qb + h64 * stride_qh",
        "        DO_base = DO + b64 * stride_dob + h64 * stride_doh",
    ]
    for masked in (False, True):
        ptr, idx = ("PART_T_PTR", "PART_T_IDX") if masked else ("FULL_T_PTR", "FULL_T_IDX")
        body += [
            "        # PARTIAL tiles: the mask per element." if masked else "        # FULL tiles: no mask.",
            f"        for t in range(tl.load({ptr} + {csr_row(ir, 'kv_tile', 'bhk')}), "
            f"tl.load({ptr} + {csr_row(ir, 'kv_tile', 'bhk')} + 1)):",
            f"            m_start = tl.load({idx} + t) * BLOCK_M",
            "            for sub in range(0, BLOCK_M, SUB_M):",
            "                offs_m = m_start + sub + offs_m0",
            *_load_rows(ir, "                "),
            *_row_vectors(ir, "                ", "(b64 * n_heads + h64)"),
            # Without a bias, padding rows (q = 0, lse = -inf) have p = 0 exactly; a bias may be nan there.
            *indent(_logits_and_ds(ir, masked, rows=not masked and score.logit_bias is not None), "        "),
            '                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)',
            '                dk += tl.dot(tl.trans(ds * row_scale[:, None]).to(q.dtype), q, input_precision=DOT_PRECISION)',
        ]
    body += [
        "",
        "    tl.store(DK_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),",
        "             mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM))",
        "    tl.store(DV_base + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),",
        "             mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < HEAD_DIM_V))",
    ]
    return lines + indent(body)


def emit_backward(ir: N.Attention) -> list[list[str]]:
    """The backward parts of the kernel module (after the forward's helpers and functions)."""
    return [*emit_grad_functions(ir), _dq_kernel(ir), _dkdv_kernel(ir)]
