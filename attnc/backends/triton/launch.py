"""Launch of the generated forward kernel: permute into kernel order, launch, permute back."""
from __future__ import annotations

import math

import torch

from ...ir import nodes as N
from ...ir.scores import sink_logits, softcap_value
from ...pipeline import Compiled
from .host import HostState, host_ints, tensor_args


def forward(c: Compiled, state: HostState, q, k, v, tensors: dict[str, torch.Tensor]):
    """out [B, Hq, Nq, Dv] and the per-row statistic [B, Hq, Nq] (float32), row-major tokens."""
    s, lay, ir = c.schedule, c.layout, c.spec.ir
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    device = q.device
    full_ptr, full_idx, part_ptr, part_idx, q_order, kv_order = state.tables(device)
    if not lay.q_identity:
        q = q.index_select(2, q_order)
    if not lay.kv_identity:
        k, v = k.index_select(2, kv_order), v.index_select(2, kv_order)
    out = torch.empty((B, Hq, Nq, Dv), dtype=q.dtype, device=device)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=device)
    scale, bias = state.row_scores(D, device, host_ints(tensors) if not s.exact else {})
    f32 = torch.empty(0, dtype=torch.float32, device=device)
    sink = sink_logits(c.bound, Hq, tensors, D, f32)
    sink = f32.new_zeros(1) if sink is None else sink.to(torch.float32).contiguous()
    cap = softcap_value(c.bound, D) or 0.0
    params = [int(c.bound.env[p.name]) for p in ir.params if p.type == N.INT]
    grid = (s.q_tiles, B * Hq)
    c.module.attnc_fwd[grid](
        q, k, v, out, lse, scale, bias, sink, cap, full_ptr, full_idx, part_ptr, part_idx, q_order, kv_order,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Nq, s.nk, D, *params, *tensor_args(ir, tensors),
        HEAD_DIM=D, HEAD_DIM_V=Dv,
        BLOCK_D=max(16, _next_pow2(D)), BLOCK_DV=max(16, _next_pow2(Dv)),
        BLOCK_M=s.block_m, BLOCK_N=s.block_n, INT64=c.int64,
        Q_PERMUTED=not lay.q_identity, KV_PERMUTED=not lay.kv_identity,
    )
    if not lay.q_identity:  # back to row-major: token order[p] is at position p
        inv = torch.empty_like(q_order)
        inv[q_order.long()] = torch.arange(Nq, dtype=inv.dtype, device=device)
        out, lse = out.index_select(2, inv), lse.index_select(2, inv)
    return out, lse


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))
