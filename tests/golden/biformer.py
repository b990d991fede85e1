# Golden forward kernel of specs/biformer.attn (tests/test_golden.py).
# Refresh on purpose: ATTNC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py


import triton
import triton.language as tl


@triton.jit
def _floordiv(a, b):
    # Triton integer division truncates toward zero; the spec language floors.
    q = a // b
    return q - (((a % b) != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _floormod(a, b):
    r = a % b
    return r + (((r != 0) & ((r < 0) != (b < 0))).to(r.dtype) * b)


@triton.jit
def _chosen(sel_row, k_grp, ROUTE_K: tl.constexpr):
    """The key's group is one of the ROUTE_K groups chosen for the row's unit (-1: no choice)."""
    hit = k_grp < -2
    for t in tl.static_range(ROUTE_K):
        hit = hit | (tl.load(sel_row + t)[:, None] == k_grp)
    return hit


@triton.jit
def _chosen_row(sel_row, grp, ROUTE_K: tl.constexpr):
    """Which rows' units chose group grp, the one group of a whole kv tile (-1: no choice)."""
    hit = tl.load(sel_row) == grp
    for t in tl.static_range(1, ROUTE_K):
        hit = hit | (tl.load(sel_row + t) == grp)
    return hit


@triton.jit
def visible(q_i, k_i, h, head_dim, p_H, p_W, p_R, p_K, INT64: tl.constexpr):
    """mask = true

    spec line -; q = grid(H, W), kv = grid(H, W).
    """
    if INT64:  # widen every integer input, so that no intermediate can wrap
        h = tl.cast(h, tl.int64)
        p_H = tl.cast(p_H, tl.int64)
        p_W = tl.cast(p_W, tl.int64)
        p_R = tl.cast(p_R, tl.int64)
        p_K = tl.cast(p_K, tl.int64)
        head_dim = tl.cast(head_dim, tl.int64)
    return k_i >= 0


@triton.jit
def attnc_fwd(
    Q, K, V, Out, Stat,
    ROW_SCALE, ROW_BIAS, SINK, softcap,
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, Q_ORDER, KV_ORDER, ROW_PARTS, COL_PARTS,
    MIXED_PTR, MIXED_IDX, ROUTE_UNIT, ROUTE_GROUP, ROUTE_SEL, n_units, ROUTE_K: tl.constexpr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, kv_group, Nq, Nk, head_dim,
    p_H, p_W, p_R, p_K,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
    INT64: tl.constexpr, ADDR64: tl.constexpr, DOT_PRECISION: tl.constexpr, POS_SCALE: tl.constexpr, Q_PERMUTED: tl.constexpr, KV_PERMUTED: tl.constexpr,
):
    """Forward attention for one (query tile, batch * head).

    Tokens are in kernel order: Q, K, V, Out, Stat and the row vectors are indexed by kernel
    position; the mask and bias read the row-major token at a position through Q_ORDER and
    KV_ORDER when the layout permutes that side.

    Score: softmax(scale = 1.0 / sqrt(head_dim)).
    Per-row scale and bias come from the host (without modifiers, softmax's scale includes log2(e)).
    Stat receives the row's logsumexp (natural log, the sink included), -inf for a row that
    sees no key.
    """
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    h_kv = h // kv_group  # grouped-query attention: query head h reads kv head h // (Hq / Hkv)
    # Each (batch, head) slice starts at an int64 offset: B * H * N * D may exceed 2**31. Offsets
    # inside a slice stay int32 unless the launcher sees a slice that needs more (ADDR64).
    b64, h64, h_kv64 = b.to(tl.int64), h.to(tl.int64), h_kv.to(tl.int64)
    Q_base = Q + b64 * stride_qb + h64 * stride_qh
    K_base = K + b64 * stride_kb + h_kv64 * stride_kh
    V_base = V + b64 * stride_vb + h_kv64 * stride_vh
    O_base = Out + b64 * stride_ob + h64 * stride_oh
    offs_m0 = tl.arange(0, SUB_M)
    offs_n0 = tl.arange(0, SUB_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if ADDR64:
        offs_m0, offs_n0 = offs_m0.to(tl.int64), offs_n0.to(tl.int64)
        offs_d, offs_dv = offs_d.to(tl.int64), offs_dv.to(tl.int64)
    # The q tile SUB_M rows at a time, each kv tile SUB_N columns at a time (codegen/target.sub_tiles:
    # smaller pieces where whole tiles would spill registers; else one pass, which Triton folds away).
    for sub in range(0, BLOCK_M, SUB_M):
        offs_m = q_tile * BLOCK_M + sub + offs_m0
        q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        q_i = offs_m[:, None]
        if Q_PERMUTED:
            q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]
        if INT64:
            q_i = q_i.to(tl.int64)
        r_unit = tl.load(ROUTE_UNIT + offs_m, mask=offs_m < Nq, other=0)
        SEL_row = ROUTE_SEL + ((b64 * n_heads + h64) * n_units + r_unit) * ROUTE_K
        row_scale = tl.load(ROW_SCALE + offs_m, mask=offs_m < Nq, other=0.0)
        # A positive row scale (POS_SCALE: the launcher checks every row) is applied after the row
        # maximum, inside exp2's FMA, as FlashAttention-2 does; another one before (a factor 1.0 folds away).
        ones = tl.full([SUB_M], 1.0, tl.float32)
        scale_before = ones if POS_SCALE else row_scale
        scale_after = row_scale if POS_SCALE else ones
        m_i = tl.full([SUB_M], float("-inf"), tl.float32)
        l_i = tl.zeros([SUB_M], tl.float32)
        acc = tl.zeros([SUB_M, BLOCK_DV], tl.float32)

        # FULL tiles: every pair is visible and in bounds; no predicate, no bounds checks.
        # Routed: the tile's keys are of one group (routing.one_group_tiles), chosen or not per row.
        lo = tl.load(FULL_PTR + (bh * tl.num_programs(0) + q_tile))
        hi = tl.load(FULL_PTR + (bh * tl.num_programs(0) + q_tile) + 1)
        for t in range(lo, hi):
            kv_tile = tl.load(FULL_IDX + t)
            for col in range(0, BLOCK_N, SUB_N):
                offs_n = kv_tile * BLOCK_N + col + offs_n0
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=(offs_d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_before[:, None]
                k_grp = tl.load(ROUTE_GROUP + kv_tile * BLOCK_N)  # the tile's one group
                keep = _chosen_row(SEL_row, k_grp, ROUTE_K)[:, None]
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * scale_after)
                # Rows that have seen no finite logit keep m = -inf; shift them by 0 to avoid inf - inf.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_use)
                p = tl.math.exp2(s * scale_after[:, None] - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new

        # FULL tiles of several routing groups: the routing per element.
        lo = tl.load(MIXED_PTR + (bh * tl.num_programs(0) + q_tile))
        hi = tl.load(MIXED_PTR + (bh * tl.num_programs(0) + q_tile) + 1)
        for t in range(lo, hi):
            kv_tile = tl.load(MIXED_IDX + t)
            for col in range(0, BLOCK_N, SUB_N):
                offs_n = kv_tile * BLOCK_N + col + offs_n0
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=(offs_d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_before[:, None]
                k_grp = tl.load(ROUTE_GROUP + offs_n, mask=offs_n < Nk, other=-2)[None, :]
                keep = _chosen(SEL_row, k_grp, ROUTE_K)
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * scale_after)
                # Rows that have seen no finite logit keep m = -inf; shift them by 0 to avoid inf - inf.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_use)
                p = tl.math.exp2(s * scale_after[:, None] - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new

        # PARTIAL tiles: evaluate the mask per element. EMPTY tiles are never visited.
        lo = tl.load(PART_PTR + (bh * tl.num_programs(0) + q_tile))
        hi = tl.load(PART_PTR + (bh * tl.num_programs(0) + q_tile) + 1)
        for t in range(lo, hi):
            kv_tile = tl.load(PART_IDX + t)
            for col in range(0, BLOCK_N, SUB_N):
                offs_n = kv_tile * BLOCK_N + col + offs_n0
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_before[:, None]
                k_grp = tl.load(ROUTE_GROUP + offs_n, mask=offs_n < Nk, other=-2)[None, :]
                k_i = offs_n[None, :]  # kernel position; the mask and bias read the token there
                if KV_PERMUTED:
                    k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]
                if INT64:
                    k_i = k_i.to(tl.int64)
                keep = (offs_n[None, :] < Nk) & visible(q_i, k_i, h, head_dim, p_H, p_W, p_R, p_K, INT64) & _chosen(SEL_row, k_grp, ROUTE_K)
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1) * scale_after)
                # Rows that have seen no finite logit keep m = -inf; shift them by 0 to avoid inf - inf.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_use)
                p = tl.math.exp2(s * scale_after[:, None] - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new

        # A row that sees no key outputs 0 and has statistic -inf (DESIGN.md section 3).
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        stat = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(O_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V))
        tl.store(Stat + bh.to(tl.int64) * Nq + offs_m, stat, mask=offs_m < Nq)


@triton.jit
def attnc_bwd_dq(
    Q, K, V, DO, Stat, Delta, DQ,
    ROW_SCALE, ROW_BIAS, SINK, softcap,
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, Q_ORDER, KV_ORDER, ROW_PARTS, COL_PARTS,
    MIXED_PTR, MIXED_IDX, ROUTE_UNIT, ROUTE_GROUP, ROUTE_SEL, n_units, ROUTE_K: tl.constexpr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, kv_group, Nq, Nk, head_dim,
    p_H, p_W, p_R, p_K,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr, D_CHUNK: tl.constexpr,
    INT64: tl.constexpr, ADDR64: tl.constexpr, DOT_PRECISION: tl.constexpr, Q_PERMUTED: tl.constexpr, KV_PERMUTED: tl.constexpr,
):
    """dQ (and bias-table gradients) for one (query tile, batch * head), over the forward schedule.

    Score: softmax(scale = 1.0 / sqrt(head_dim)).
    """
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    h_kv = h // kv_group
    b64, h64, h_kv64 = b.to(tl.int64), h.to(tl.int64), h_kv.to(tl.int64)
    bh64 = bh.to(tl.int64)
    Q_base = Q + b64 * stride_qb + h64 * stride_qh
    K_base = K + b64 * stride_kb + h_kv64 * stride_kh
    V_base = V + b64 * stride_vb + h_kv64 * stride_vh
    DO_base = DO + b64 * stride_dob + h64 * stride_doh
    DQ_base = DQ + b64 * stride_dqb + h64 * stride_dqh
    # The q tile SUB_M rows at a time, each kv tile SUB_N columns at a time (codegen/target.sub_tiles:
    # smaller pieces where whole tiles would spill registers; else one pass, which Triton folds away).
    offs_m0 = tl.arange(0, SUB_M)
    offs_n0 = tl.arange(0, SUB_N)
    if ADDR64:
        offs_m0, offs_n0 = offs_m0.to(tl.int64), offs_n0.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_c0 = tl.arange(0, D_CHUNK)
    if ADDR64:
        offs_d, offs_dv, offs_c0 = offs_d.to(tl.int64), offs_dv.to(tl.int64), offs_c0.to(tl.int64)
    for sub in range(0, BLOCK_M, SUB_M):
        offs_m = q_tile * BLOCK_M + sub + offs_m0
        q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        q_i = offs_m[:, None]
        if Q_PERMUTED:
            q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]
        if INT64:
            q_i = q_i.to(tl.int64)
        r_unit = tl.load(ROUTE_UNIT + offs_m, mask=offs_m < Nq, other=0)
        SEL_row = ROUTE_SEL + ((b64 * n_heads + h64) * n_units + r_unit) * ROUTE_K
        row_scale = tl.load(ROW_SCALE + offs_m, mask=offs_m < Nq, other=0.0)
        stat = tl.load(Stat + bh64 * Nq + offs_m, mask=offs_m < Nq, other=float("-inf"))
        # a row that sees nothing has statistic -inf: its weights are exp(s - inf) = 0
        stat_safe = tl.where(stat == float("-inf"), float("inf"), stat)
        delta = tl.load(Delta + bh64 * Nq + offs_m, mask=offs_m < Nq, other=0.0)
        dq = tl.zeros([SUB_M, BLOCK_D], tl.float32)

        # FULL tiles: no mask, no bounds checks. One routing group: the routing per row.
        for t in range(tl.load(FULL_PTR + (bh * tl.num_programs(0) + q_tile)), tl.load(FULL_PTR + (bh * tl.num_programs(0) + q_tile) + 1)):
            n_start = tl.load(FULL_IDX + t) * BLOCK_N
            for col in range(0, BLOCK_N, SUB_N):
                offs_n = n_start + col + offs_n0
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=(offs_d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                k_i = offs_n[None, :]
                if KV_PERMUTED:
                    k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]
                if INT64:
                    k_i = k_i.to(tl.int64)
                k_grp = tl.load(ROUTE_GROUP + n_start)  # the tile's one group
                if D_CHUNK >= BLOCK_D:
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                else:
                    s = tl.zeros([SUB_M, SUB_N], tl.float32)
                    for d0 in range(0, BLOCK_D, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + offs_c0
                        s += tl.dot(tl.load(Q_base + offs_m[:, None] * stride_qm + offs_c[None, :] * stride_qd, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM), other=0.0),
                                    tl.trans(tl.load(K_base + offs_n[:, None] * stride_kn + offs_c[None, :] * stride_kd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM), other=0.0)), input_precision=DOT_PRECISION)
                s = s * row_scale[:, None]
                keep = _chosen_row(SEL_row, k_grp, ROUTE_K)[:, None]
                if D_CHUNK >= BLOCK_DV:
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                else:
                    dp = tl.zeros([SUB_M, SUB_N], tl.float32)
                    for d0 in range(0, BLOCK_DV, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + offs_c0
                        dp += tl.dot(tl.load(DO_base + offs_m[:, None] * stride_dom + offs_c[None, :] * stride_dod, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM_V), other=0.0),
                                    tl.trans(tl.load(V_base + offs_n[:, None] * stride_vn + offs_c[None, :] * stride_vd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM_V), other=0.0)), input_precision=DOT_PRECISION)
                p = tl.where(keep, tl.exp(s - stat_safe[:, None]), 0.0)
                ds = p * (dp - delta[:, None])
                dq += tl.dot((ds * row_scale[:, None]).to(k.dtype), k, input_precision=DOT_PRECISION)

        # FULL tiles of several routing groups: the routing per element.
        for t in range(tl.load(MIXED_PTR + (bh * tl.num_programs(0) + q_tile)), tl.load(MIXED_PTR + (bh * tl.num_programs(0) + q_tile) + 1)):
            n_start = tl.load(MIXED_IDX + t) * BLOCK_N
            for col in range(0, BLOCK_N, SUB_N):
                offs_n = n_start + col + offs_n0
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=(offs_d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                k_i = offs_n[None, :]
                if KV_PERMUTED:
                    k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]
                if INT64:
                    k_i = k_i.to(tl.int64)
                k_grp = tl.load(ROUTE_GROUP + offs_n, mask=offs_n < Nk, other=-2)[None, :]
                if D_CHUNK >= BLOCK_D:
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                else:
                    s = tl.zeros([SUB_M, SUB_N], tl.float32)
                    for d0 in range(0, BLOCK_D, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + offs_c0
                        s += tl.dot(tl.load(Q_base + offs_m[:, None] * stride_qm + offs_c[None, :] * stride_qd, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM), other=0.0),
                                    tl.trans(tl.load(K_base + offs_n[:, None] * stride_kn + offs_c[None, :] * stride_kd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM), other=0.0)), input_precision=DOT_PRECISION)
                s = s * row_scale[:, None]
                keep = _chosen(SEL_row, k_grp, ROUTE_K)
                if D_CHUNK >= BLOCK_DV:
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                else:
                    dp = tl.zeros([SUB_M, SUB_N], tl.float32)
                    for d0 in range(0, BLOCK_DV, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + offs_c0
                        dp += tl.dot(tl.load(DO_base + offs_m[:, None] * stride_dom + offs_c[None, :] * stride_dod, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM_V), other=0.0),
                                    tl.trans(tl.load(V_base + offs_n[:, None] * stride_vn + offs_c[None, :] * stride_vd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM_V), other=0.0)), input_precision=DOT_PRECISION)
                p = tl.where(keep, tl.exp(s - stat_safe[:, None]), 0.0)
                ds = p * (dp - delta[:, None])
                dq += tl.dot((ds * row_scale[:, None]).to(k.dtype), k, input_precision=DOT_PRECISION)

        # PARTIAL tiles: the mask per element.
        for t in range(tl.load(PART_PTR + (bh * tl.num_programs(0) + q_tile)), tl.load(PART_PTR + (bh * tl.num_programs(0) + q_tile) + 1)):
            n_start = tl.load(PART_IDX + t) * BLOCK_N
            for col in range(0, BLOCK_N, SUB_N):
                offs_n = n_start + col + offs_n0
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                k_i = offs_n[None, :]
                if KV_PERMUTED:
                    k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]
                if INT64:
                    k_i = k_i.to(tl.int64)
                k_grp = tl.load(ROUTE_GROUP + offs_n, mask=offs_n < Nk, other=-2)[None, :]
                if D_CHUNK >= BLOCK_D:
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                else:
                    s = tl.zeros([SUB_M, SUB_N], tl.float32)
                    for d0 in range(0, BLOCK_D, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + offs_c0
                        s += tl.dot(tl.load(Q_base + offs_m[:, None] * stride_qm + offs_c[None, :] * stride_qd, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM), other=0.0),
                                    tl.trans(tl.load(K_base + offs_n[:, None] * stride_kn + offs_c[None, :] * stride_kd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM), other=0.0)), input_precision=DOT_PRECISION)
                s = s * row_scale[:, None]
                keep = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk) & visible(q_i, k_i, h, head_dim, p_H, p_W, p_R, p_K, INT64) & _chosen(SEL_row, k_grp, ROUTE_K)
                if D_CHUNK >= BLOCK_DV:
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                else:
                    dp = tl.zeros([SUB_M, SUB_N], tl.float32)
                    for d0 in range(0, BLOCK_DV, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + offs_c0
                        dp += tl.dot(tl.load(DO_base + offs_m[:, None] * stride_dom + offs_c[None, :] * stride_dod, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM_V), other=0.0),
                                    tl.trans(tl.load(V_base + offs_n[:, None] * stride_vn + offs_c[None, :] * stride_vd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM_V), other=0.0)), input_precision=DOT_PRECISION)
                p = tl.where(keep, tl.exp(s - stat_safe[:, None]), 0.0)
                ds = p * (dp - delta[:, None])
                dq += tl.dot((ds * row_scale[:, None]).to(k.dtype), k, input_precision=DOT_PRECISION)

        tl.store(DQ_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def attnc_bwd_dkdv(
    Q, K, V, DO, Stat, Delta, DK, DV,
    ROW_SCALE, ROW_BIAS, SINK, softcap,
    FULL_T_PTR, FULL_T_IDX, PART_T_PTR, PART_T_IDX, Q_ORDER, KV_ORDER, ROW_PARTS, COL_PARTS,
    ROUTE_UNIT, ROUTE_GROUP, ROUTE_SEL, n_units, ROUTE_K: tl.constexpr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, kv_group, Nq, Nk, head_dim,
    p_H, p_W, p_R, p_K,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr, D_CHUNK: tl.constexpr,
    INT64: tl.constexpr, ADDR64: tl.constexpr, DOT_PRECISION: tl.constexpr, Q_PERMUTED: tl.constexpr, KV_PERMUTED: tl.constexpr,
):
    """dK and dV for one (kv tile, batch * kv head), over the transposed schedule, summing the
    query heads of the group in order (deterministic grouped-query gradients).

    Score: softmax(scale = 1.0 / sqrt(head_dim)).
    """
    kv_tile = tl.program_id(0)
    bhk = tl.program_id(1)
    n_kv = n_heads // kv_group
    b = bhk // n_kv
    h_kv = bhk % n_kv
    b64, h_kv64 = b.to(tl.int64), h_kv.to(tl.int64)
    K_base = K + b64 * stride_kb + h_kv64 * stride_kh
    V_base = V + b64 * stride_vb + h_kv64 * stride_vh
    # The kv tile SUB_N columns at a time, each q tile SUB_M rows at a time (codegen/target.sub_tiles:
    # smaller pieces where whole tiles would spill registers; else one pass, which Triton folds away).
    offs_n0 = tl.arange(0, SUB_N)
    offs_m0 = tl.arange(0, SUB_M)
    if ADDR64:
        offs_n0, offs_m0 = offs_n0.to(tl.int64), offs_m0.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_c0 = tl.arange(0, D_CHUNK)
    if ADDR64:
        offs_d, offs_dv, offs_c0 = offs_d.to(tl.int64), offs_dv.to(tl.int64), offs_c0.to(tl.int64)
    DK_base = DK + b64 * stride_dkb + h_kv64 * stride_dkh
    DV_base = DV + b64 * stride_dvb + h_kv64 * stride_dvh
    for col in range(0, BLOCK_N, SUB_N):
        offs_n = kv_tile * BLOCK_N + col + offs_n0
        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        k_i = offs_n[None, :]
        if KV_PERMUTED:
            k_i = tl.load(KV_ORDER + offs_n, mask=offs_n < Nk, other=0)[None, :]
        if INT64:
            k_i = k_i.to(tl.int64)
        k_grp = tl.load(ROUTE_GROUP + offs_n, mask=offs_n < Nk, other=-2)[None, :]
        dk = tl.zeros([SUB_N, BLOCK_D], tl.float32)
        dv = tl.zeros([SUB_N, BLOCK_DV], tl.float32)
        for g in range(0, kv_group):
            h = h_kv * kv_group + g
            h64 = h.to(tl.int64)
            bh64 = b64 * n_heads + h64
            Q_base = Q + b64 * stride_qb + h64 * stride_qh
            DO_base = DO + b64 * stride_dob + h64 * stride_doh
            # FULL tiles: no mask.
            for t in range(tl.load(FULL_T_PTR + (bhk * tl.num_programs(0) + kv_tile)), tl.load(FULL_T_PTR + (bhk * tl.num_programs(0) + kv_tile) + 1)):
                m_start = tl.load(FULL_T_IDX + t) * BLOCK_M
                for sub in range(0, BLOCK_M, SUB_M):
                    offs_m = m_start + sub + offs_m0
                    q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                    do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                                 mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                    q_i = offs_m[:, None]
                    if Q_PERMUTED:
                        q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]
                    if INT64:
                        q_i = q_i.to(tl.int64)
                    r_unit = tl.load(ROUTE_UNIT + offs_m, mask=offs_m < Nq, other=0)
                    SEL_row = ROUTE_SEL + ((b64 * n_heads + h64) * n_units + r_unit) * ROUTE_K
                    row_scale = tl.load(ROW_SCALE + offs_m, mask=offs_m < Nq, other=0.0)
                    stat = tl.load(Stat + bh64 * Nq + offs_m, mask=offs_m < Nq, other=float("-inf"))
                    # a row that sees nothing has statistic -inf: its weights are exp(s - inf) = 0
                    stat_safe = tl.where(stat == float("-inf"), float("inf"), stat)
                    delta = tl.load(Delta + bh64 * Nq + offs_m, mask=offs_m < Nq, other=0.0)
                    if D_CHUNK >= BLOCK_D:
                        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                    else:
                        s = tl.zeros([SUB_M, SUB_N], tl.float32)
                        for d0 in range(0, BLOCK_D, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                            offs_c = d0 + offs_c0
                            s += tl.dot(tl.load(Q_base + offs_m[:, None] * stride_qm + offs_c[None, :] * stride_qd, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM), other=0.0),
                                        tl.trans(tl.load(K_base + offs_n[:, None] * stride_kn + offs_c[None, :] * stride_kd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM), other=0.0)), input_precision=DOT_PRECISION)
                    s = s * row_scale[:, None]
                    keep = _chosen(SEL_row, k_grp, ROUTE_K)
                    if D_CHUNK >= BLOCK_DV:
                        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                    else:
                        dp = tl.zeros([SUB_M, SUB_N], tl.float32)
                        for d0 in range(0, BLOCK_DV, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                            offs_c = d0 + offs_c0
                            dp += tl.dot(tl.load(DO_base + offs_m[:, None] * stride_dom + offs_c[None, :] * stride_dod, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM_V), other=0.0),
                                        tl.trans(tl.load(V_base + offs_n[:, None] * stride_vn + offs_c[None, :] * stride_vd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM_V), other=0.0)), input_precision=DOT_PRECISION)
                    p = tl.where(keep, tl.exp(s - stat_safe[:, None]), 0.0)
                    ds = p * (dp - delta[:, None])
                    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
                    dk += tl.dot(tl.trans(ds * row_scale[:, None]).to(q.dtype), q, input_precision=DOT_PRECISION)
            # PARTIAL tiles: the mask per element.
            for t in range(tl.load(PART_T_PTR + (bhk * tl.num_programs(0) + kv_tile)), tl.load(PART_T_PTR + (bhk * tl.num_programs(0) + kv_tile) + 1)):
                m_start = tl.load(PART_T_IDX + t) * BLOCK_M
                for sub in range(0, BLOCK_M, SUB_M):
                    offs_m = m_start + sub + offs_m0
                    q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                    do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                                 mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                    q_i = offs_m[:, None]
                    if Q_PERMUTED:
                        q_i = tl.load(Q_ORDER + offs_m, mask=offs_m < Nq, other=0)[:, None]
                    if INT64:
                        q_i = q_i.to(tl.int64)
                    r_unit = tl.load(ROUTE_UNIT + offs_m, mask=offs_m < Nq, other=0)
                    SEL_row = ROUTE_SEL + ((b64 * n_heads + h64) * n_units + r_unit) * ROUTE_K
                    row_scale = tl.load(ROW_SCALE + offs_m, mask=offs_m < Nq, other=0.0)
                    stat = tl.load(Stat + bh64 * Nq + offs_m, mask=offs_m < Nq, other=float("-inf"))
                    # a row that sees nothing has statistic -inf: its weights are exp(s - inf) = 0
                    stat_safe = tl.where(stat == float("-inf"), float("inf"), stat)
                    delta = tl.load(Delta + bh64 * Nq + offs_m, mask=offs_m < Nq, other=0.0)
                    if D_CHUNK >= BLOCK_D:
                        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                    else:
                        s = tl.zeros([SUB_M, SUB_N], tl.float32)
                        for d0 in range(0, BLOCK_D, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                            offs_c = d0 + offs_c0
                            s += tl.dot(tl.load(Q_base + offs_m[:, None] * stride_qm + offs_c[None, :] * stride_qd, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM), other=0.0),
                                        tl.trans(tl.load(K_base + offs_n[:, None] * stride_kn + offs_c[None, :] * stride_kd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM), other=0.0)), input_precision=DOT_PRECISION)
                    s = s * row_scale[:, None]
                    keep = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk) & visible(q_i, k_i, h, head_dim, p_H, p_W, p_R, p_K, INT64) & _chosen(SEL_row, k_grp, ROUTE_K)
                    if D_CHUNK >= BLOCK_DV:
                        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                    else:
                        dp = tl.zeros([SUB_M, SUB_N], tl.float32)
                        for d0 in range(0, BLOCK_DV, D_CHUNK):  # a loop, not unrolled: one chunk live at a time
                            offs_c = d0 + offs_c0
                            dp += tl.dot(tl.load(DO_base + offs_m[:, None] * stride_dom + offs_c[None, :] * stride_dod, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < HEAD_DIM_V), other=0.0),
                                        tl.trans(tl.load(V_base + offs_n[:, None] * stride_vn + offs_c[None, :] * stride_vd, mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < HEAD_DIM_V), other=0.0)), input_precision=DOT_PRECISION)
                    p = tl.where(keep, tl.exp(s - stat_safe[:, None]), 0.0)
                    ds = p * (dp - delta[:, None])
                    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
                    dk += tl.dot(tl.trans(ds * row_scale[:, None]).to(q.dtype), q, input_precision=DOT_PRECISION)

        tl.store(DK_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                 mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM))
        tl.store(DV_base + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                 mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < HEAD_DIM_V))
