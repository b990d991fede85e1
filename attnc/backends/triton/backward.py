"""Launch of the generated backward kernels (codegen/emit_bwd.py), and the gradients computed on
the host from per-row quantities: Delta = rowsum(dO * O), and the sink logits' gradient.

Every gradient is deterministic: the kernels use no atomics, the bias tables' per-program
partial gradients are summed by torch in a fixed order, and so are the sinks'.
"""
from __future__ import annotations

import torch

from ... import limits
from ...codegen import abi
from ...ir import nodes as N
from ...ir.evaluate import per_row
from ...ir.scores import sink_logits
from ...pipeline import Compiled
from ...settings import launch_guard
from ..inputs import host_ints
from .host import HostState
from .launch import (ADDR_LIMIT, _extent, common_values, launch_options, routed, routed_scores, sub_values,
                     to_kernel_order)


def backward(c: Compiled, state: HostState, q, k, v, out, stat, dout, dstat, tensors: dict[str, torch.Tensor],
             kernel_order: bool = False, want_q: bool = True, want_kv: bool = True, want: set | None = None):
    """(dq, dk, dv, {float tensor: gradient}), from the forward's inputs and results (row-major,
    or kernel order with kernel_order=True) and the gradients of its outputs: dout, and dstat,
    the gradient of the logsumexp (softmax only; None for none). Only what is wanted is
    computed: dq with want_q, dk and dv with want_kv (else None), the tables named in `want`
    (every float table when None)."""
    ir, lay = c.spec.ir, c.layout
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    device = q.device
    sink = sink_logits(c.bound, Hq, tensors, D, q.new_empty(0, dtype=torch.float32))
    s = state.schedule(host_ints(tensors) if not c.schedule.exact else {})
    if not kernel_order:
        q, k, v = to_kernel_order(state, lay, q, k, v, device)
        if not lay.q_identity:
            q_order = state.orders(device)[0]
            out, dout, stat = (x.index_select(2, q_order) for x in (out, dout, stat))
            dstat = None if dstat is None else dstat.index_select(2, q_order)
    stat = stat.to(torch.float32).contiguous()
    # rowsum(dO * O) - d lse: the softmax (and softplus) row term of d loss / d logit.
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1)
    if dstat is not None and ir.score.kind == "softmax":
        delta = delta - dstat.to(torch.float32)
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    shared = {**common_values(c, state, s, q, k, v, tensors, sink, natural=True),
              "DO": dout, "Stat": stat, "Delta": delta, **abi.stride_values("do", dout)}
    shared["ADDR64"] = shared["ADDR64"] or _extent(dout, dims=(2, 3)) >= ADDR_LIMIT
    wanted = [n for n in abi.grad_tables(ir) if want is None or ir.tensors[n].name in want]
    grads = {n: _grad_rows(ir, n, shared, B * Hq * s.q_tiles, device) for n in wanted}
    full_ptr, full_idx, part_ptr, part_idx = state.tables(device, s)
    dq_args = {**shared, "Q": q, "K": k, "V": v, "DQ": dq, **abi.stride_values("dq", dq), **sub_values("dq", c, q, v),
               "FULL_PTR": full_ptr, "FULL_IDX": full_idx, "PART_PTR": part_ptr, "PART_IDX": part_idx}
    for n in abi.grad_tables(ir):  # a table nobody wants: a dummy buffer the kernel never touches
        rows = grads.get(n, delta.new_zeros((1, 1)))
        dq_args[abi.table_name(n, "grad")] = rows
        dq_args[abi.table_name(n, "gstride")] = int(rows.shape[1])
        dq_args[abi.table_name(n, "want")] = n in grads
    ft_ptr, ft_idx, pt_ptr, pt_idx = state.transposed(device, s)
    dkdv_args = {**shared, "Q": q, "K": k, "V": v, "DK": dk, "DV": dv,
                 **abi.stride_values("dk", dk), **abi.stride_values("dv", dv),
                 "FULL_T_PTR": ft_ptr, "FULL_T_IDX": ft_idx, "PART_T_PTR": pt_ptr, "PART_T_IDX": pt_idx,
                 **sub_values("dkdv", c, q, v)}
    if ir.route is not None:  # the same selection as the forward's: recomputed from the same q and k
        route, counts = state.route(s, host_ints(tensors), q, k)
        scores = routed_scores(state, counts, q, natural=True)
        dq_args.update(scores, **routed(route, "dq"))
        dkdv_args.update(scores, **routed(route, "dkdv"))
    elif per_row(ir.mask):  # per-(batch * head) schedules of a mask that reads `head` or `batch`
        heads = state.head_tables(host_ints(tensors), B, Hq, Hkv, device)
        dq_args.update(routed(heads, "dq"))
        dkdv_args.update(routed(heads, "dkdv"))
    with launch_guard():
        if want_q or grads:
            c.module.attnc_bwd_dq[(s.q_tiles, B * Hq)](**abi.bind(ir, dq_args, "dq"), **launch_options("dq", q, v, c))
        if want_kv:
            c.module.attnc_bwd_dkdv[(s.kv_tiles, B * Hkv)](**abi.bind(ir, dkdv_args, "dkdv"),
                                                          **launch_options("dkdv", q, v, c))
    table_grads = {}
    for n, rows in grads.items():
        t = tensors[ir.tensors[n].name]
        if _per_head(ir, n, t):  # rows are (batch, head, q tile) in order: sum batch and tiles per head
            g = rows.view(B, Hq, -1, rows.shape[1]).sum(dim=(0, 2))
        else:
            g = rows.sum(0)
        table_grads[ir.tensors[n].name] = g.reshape(-1)[: t.numel()].view(t.shape).to(t.dtype)
    if sink is not None:
        _sink_table_grads(c, tensors, sink_grad(sink, stat, delta), Hq, D, table_grads, want)
    if not kernel_order:
        orders = state.orders(device)
        if not lay.q_identity:
            dq = dq.index_select(2, orders[2])
        if not lay.kv_identity:
            dk, dv = dk.index_select(2, orders[3]), dv.index_select(2, orders[3])
    return dq if want_q else None, dk if want_kv else None, dv if want_kv else None, table_grads


def _grad_rows(ir: N.Attention, n: int, shared: dict, programs: int, device) -> torch.Tensor:
    """Zeroed float32 [programs, numel] partial gradients of bias table n, one row per dQ program:
    the whole table, or one head's slice of a table passed per head ([heads, ...])."""
    table = shared[abi.table_name(n, "ptr")]
    numel = max(1, table.numel() // (table.shape[0] if _per_head(ir, n, table) else 1))
    limits.check_bytes(f"the partial gradients of '{ir.tensors[n].name}' (one row per query tile and head)",
                       (programs, numel), 4, limits.MAX_TABLE_GRAD_BYTES, "MAX_TABLE_GRAD_BYTES")
    return torch.zeros((programs, numel), dtype=torch.float32, device=device)


def _per_head(ir: N.Attention, n: int, table: torch.Tensor) -> bool:
    return ir.tensors[n].per_head and table.dim() == ir.tensors[n].rank + 1


def sink_grad(sink, stat, delta) -> torch.Tensor:
    """d loss / d sink_h = -sum over rows of exp(sink_h - lse) * Delta: the sink is a key of
    value 0 whose weight is exp(sink - lse). Summed by torch in a fixed order."""
    weight = torch.exp(sink.to(torch.float32)[None, :, None] - stat)
    weight = torch.where(torch.isfinite(sink)[None, :, None], weight, 0.0)  # a -inf sink: no weight
    return -(weight * delta).sum(dim=(0, 2)).to(sink.dtype)


def _sink_table_grads(c: Compiled, tensors: dict, dsink, heads: int, head_dim: int, grads: dict,
                      want: set | None) -> None:
    """Carry d loss / d sink on to the float tables the sink expression reads: a vector-Jacobian
    product of the sink's torch evaluation (torch.func, which works inside a custom op)."""
    reads = {x.tensor for x in N.walk(c.spec.ir.score.sink) if isinstance(x, N.Lookup)}
    names = [n for n, t in tensors.items() if n in reads and t.dtype.is_floating_point and (want is None or n in want)]
    if not names:
        return
    like = dsink.new_empty(0)

    def sink_of(*tables):
        return sink_logits(c.bound, heads, {**tensors, **dict(zip(names, tables))}, head_dim, like, check=False)

    _, vjp = torch.func.vjp(sink_of, *(tensors[n] for n in names))
    for name, g in zip(names, vjp(dsink)):
        grads[name] = grads[name] + g if name in grads else g
