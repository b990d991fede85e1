"""Launch of the generated forward kernel: permute into kernel order, launch, permute back;
and the arguments all kernels share (backward.py launches the backward ones).

Every kernel argument is passed by name through `codegen.abi.bind`, which checks the values
against the one description the emitter wrote the signature from.
"""
from __future__ import annotations

import torch

from ...codegen import abi
from ...codegen.target import block_dim, dot_precision, head_chunk, launch_config, sub_tiles
from ...ir import nodes as N
from ...ir.evaluate import per_row
from ...ir.scores import base2_logits, sink_logits, softcap_value, softplus_first_pass
from ...analysis.tiles import Schedule
from ...pipeline import Compiled
from ...settings import launch_guard
from ..inputs import host_ints
from .host import HostState

# Element offsets at or beyond this need 64-bit address arithmetic in the kernel.
ADDR_LIMIT = 2**31


def common_values(c: Compiled, state: HostState, s: Schedule, q, k, v, tensors: dict[str, torch.Tensor],
                  sink, natural: bool = False) -> dict:
    """The arguments every kernel shares: row vectors, sizes, parameters, runtime tensors and
    constexprs (q, k, v in kernel order; `sink`: the sink logits [Hq], checked, or None;
    `natural`: the backward kernels' unscaled row scale)."""
    ir, lay = c.spec.ir, c.layout
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    device = q.device
    q_order, kv_order = state.orders(device)[:2]
    scale, bias, positive = state.row_scores(D, device, s, natural)
    f32 = torch.empty(0, dtype=torch.float32, device=device)
    sink = f32.new_zeros(1) if sink is None else sink.detach().to(torch.float32).contiguous()
    tables = {decl.name: _table(decl, tensors[decl.name]) for decl in ir.tensors}
    return {
        "ROW_SCALE": scale, "ROW_BIAS": bias, "SINK": sink, "softcap": softcap_value(c.bound, D) or 0.0,
        "Q_ORDER": q_order, "KV_ORDER": kv_order, **dict(zip(("ROW_PARTS", "COL_PARTS"), state.parts(device))),
        **abi.stride_values("q", q), **abi.stride_values("k", k), **abi.stride_values("v", v),
        "n_heads": Hq, "kv_group": Hq // Hkv, "Nq": Nq, "Nk": int(s.nk), "head_dim": D,
        **{abi.param_name(p.name): (int if p.type == N.INT else float)(c.bound.env[p.name]) for p in abi.kernel_params(ir)},
        **abi.table_values(ir, tables),
        "HEAD_DIM": D, "HEAD_DIM_V": Dv, "BLOCK_D": block_dim(D), "BLOCK_DV": block_dim(Dv),
        "BLOCK_M": int(s.block_m), "BLOCK_N": int(s.block_n),
        # Integer arithmetic of the mask and bias: int64 when their ranges need it, or when a
        # runtime table is large enough that its element offsets do.
        "INT64": bool(c.int64) or any(_extent(t) >= ADDR_LIMIT for t in tables.values()),
        # The kernel adds each (batch, head) slice's base in int64; offsets inside a slice need
        # int64 only for huge slices (or strided views spanning a huge storage).
        "ADDR64": any(_extent(t, dims=(2, 3)) >= ADDR_LIMIT for t in (q, k, v)),
        "Q_PERMUTED": not lay.q_identity, "KV_PERMUTED": not lay.kv_identity,
        "DOT_PRECISION": dot_precision(q.dtype),
        **({"FAST_TANH": fast_math(q)} if ir.score.softcap is not None else {}),
        **({"FAST_SOFTPLUS": fast_softplus(q)} if softplus_first_pass(ir) and not natural else {}),
        **({"POS_SCALE": positive} if base2_logits(ir.score) and not natural else {}),  # the forward's
    }


# `attnc tune` times candidates through the normal launch path by setting these ({(kernel module,
# kernel): (warps, stages)}: other specs' launches are not affected); tuned choices on disk are
# read once per (cache dir, kernels, tiles, arch, dtype, head dim).
OVERRIDE: dict[tuple[str, str], tuple[int, int]] = {}
_TUNED: dict[tuple, dict | None] = {}


def fast_math(q: torch.Tensor) -> bool:
    """The soft-cap uses the GPU's tanh.approx.f32 and softplus a first pass on its exp2 and log2
    (NVIDIA, 16-bit inputs: codegen/helpers._TANH, emit._softplus_fast); float32 inputs and the
    interpreter take the accurate forms."""
    return q.device.type == "cuda" and torch.version.hip is None and q.dtype in (torch.float16, torch.bfloat16)


def fast_softplus(q: torch.Tensor) -> int:
    """FAST_SOFTPLUS of the forward (codegen/emit._softplus_fast): 1, a first pass on the GPU's
    lg2.approx, for 16-bit inputs on a GPU; else 0, the exact loops only. Tests set 2, the
    first pass on tl.math.log2, to run it in the interpreter."""
    return int(fast_math(q))


def device_arch(t: torch.Tensor) -> int | None:
    """sm_XY of the GPU holding `t` as XY, or None off a GPU (the interpreter)."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def launch_options(kernel: str, q, v, c: Compiled) -> dict:
    """Warps and stages of a native launch: `attnc tune`'s choice for these kernels when there is
    one (attnc/tune.py), else codegen/target.launch_config; none in the interpreter."""
    arch, head_dim = device_arch(q), max(q.shape[3], v.shape[3])
    if arch is None:
        return {}
    if (c.kernel_path.stem, kernel) in OVERRIDE:
        warps, stages = OVERRIDE[(c.kernel_path.stem, kernel)]
    else:
        choice = tuned_config(c, arch, q.dtype, head_dim)
        warps, stages = (choice or {}).get(kernel) or launch_config(kernel, arch, head_dim, q.dtype,
                                                                   c.schedule.block_m, c.spec.ir)
    return {"num_warps": warps, "num_stages": stages}


def tuned_config(c: Compiled, arch: int, dtype, head_dim: int) -> dict | None:
    from ...codegen.target import tuned
    from ...settings import settings

    tiles = (c.schedule.block_m, c.schedule.block_n)
    key = (str(settings().cache_dir), str(c.kernel_path), tiles, arch, str(dtype), head_dim)
    if key not in _TUNED:
        _TUNED[key] = tuned(settings().cache_dir, c.kernel_path.stem, tiles, arch, dtype, head_dim)
    return _TUNED[key]


def to_kernel_order(state: HostState, lay, q, k, v, device):
    """q, k, v permuted from row-major into the layout's kernel order (unchanged where the
    layout keeps a side's order)."""
    q_order, kv_order = state.orders(device)[:2]
    if not lay.q_identity:
        q = q.index_select(2, q_order)
    if not lay.kv_identity:
        k, v = k.index_select(2, kv_order), v.index_select(2, kv_order)
    return q, k, v


def forward(c: Compiled, state: HostState, q, k, v, tensors: dict[str, torch.Tensor], kernel_order: bool = False):
    """out [B, Hq, Nq, Dv] and the per-row statistic [B, Hq, Nq] (float32), row-major tokens, or
    with kernel_order=True, tokens in the layout's kernel order in and out (no permutation).

    The statistic (the kernel's Stat) is the logsumexp for softmax, log(sum softplus) for
    softplus (both -inf for a row that sees no key), and the row sum of weights for sigmoid."""
    s, lay, ir = c.schedule, c.layout, c.spec.ir
    sink = sink_logits(c.bound, q.shape[1], tensors, q.shape[3], q.new_empty(0, dtype=torch.float32))
    B, Hq, Nq, _ = q.shape
    device = q.device
    s = state.schedule(host_ints(tensors) if not s.exact else {})
    full_ptr, full_idx, part_ptr, part_idx = state.tables(device, s)
    if not kernel_order:
        q, k, v = to_kernel_order(state, lay, q, k, v, device)
    out = torch.empty((B, Hq, Nq, v.shape[3]), dtype=q.dtype, device=device)
    stat = torch.empty((B, Hq, Nq), dtype=torch.float32, device=device)
    values = {
        **common_values(c, state, s, q, k, v, tensors, sink),
        "Q": q, "K": k, "V": v, "Out": out, "Stat": stat, **abi.stride_values("o", out),
        "FULL_PTR": full_ptr, "FULL_IDX": full_idx, "PART_PTR": part_ptr, "PART_IDX": part_idx,
        **sub_values("fwd", c, q, v),
    }
    values["ADDR64"] = values["ADDR64"] or _extent(out, dims=(2, 3)) >= ADDR_LIMIT
    if ir.route is not None:  # the per-(batch * head) schedule of this call's selection
        route, counts = state.route(s, host_ints(tensors), q, k)
        values.update(routed_scores(state, counts, q), **routed(route, "fwd"))
    elif per_row(ir.mask):  # the per-(batch * head) schedule of a mask that reads `head` or `batch`
        values.update(routed(state.head_tables(host_ints(tensors), B, Hq, k.shape[1], device), "fwd"))
    kwargs = abi.bind(ir, values)
    with launch_guard():  # the interpreter is not reentrant across threads
        c.module.attnc_fwd[(s.q_tiles, B * Hq)](**kwargs, **launch_options("fwd", q, v, c))
    if not lay.q_identity and not kernel_order:  # back to row-major: token order[p] is at position p
        q_inverse = state.orders(device)[2]
        out, stat = out.index_select(2, q_inverse), stat.index_select(2, q_inverse)
    return out, stat


def sub_values(kernel: str, c: Compiled, q: torch.Tensor, v: torch.Tensor) -> dict[str, int]:
    """SUB_M and SUB_N of a kernel: the pieces of a tile it takes at a time (codegen/target.sub_tiles),
    and a backward kernel's D_CHUNK (head_chunk)."""
    s, arch, head_dim = c.schedule, device_arch(q), max(q.shape[3], v.shape[3])
    pieces = sub_tiles(kernel, arch, q.dtype, head_dim, int(s.block_m), int(s.block_n), c.spec.ir)
    chunk = {} if kernel == "fwd" else {"D_CHUNK": head_chunk(kernel, arch, q.dtype, head_dim)}
    return {**dict(zip(("SUB_M", "SUB_N"), pieces)), **chunk}


def routed_scores(state: HostState, counts, q: torch.Tensor, natural: bool = False) -> dict:
    """Routed specs whose score reads n_visible: the row scale and bias of every (batch, head)
    from `counts`, this call's n_visible ([B * Hq, Nq]: the kernels index them by batch * head;
    HostState.route); {} without counts."""
    if counts is None:
        return {}
    scale, bias, positive = state.row_scores(q.shape[3], q.device, None, natural, counts)
    pos = base2_logits(state.c.spec.ir.score) and not natural  # the forward's POS_SCALE
    return {"ROW_SCALE": scale, "ROW_BIAS": bias, **({"POS_SCALE": positive} if pos else {})}


def routed(values: dict, kernel: str) -> dict:
    """The routing launch values one kernel takes: dK/dV's schedule is per kv tile (*_T_*)."""
    return {n: v for n, v in values.items()
            if n.startswith("ROUTE_") or n == "n_units" or ("_T_" in n) == (kernel == "dkdv")}


def _table(decl: N.TensorDecl, t: torch.Tensor) -> torch.Tensor:
    """A runtime tensor as the kernel reads it: float tables in float32, integer ones in int32
    (the runtime has checked that their values fit), contiguous."""
    return (t.to(torch.float32) if decl.dtype == N.FLOAT else t.to(torch.int32)).contiguous()


def _extent(t: torch.Tensor, dims=None) -> int:
    """The largest element offset `t`'s indices reach along `dims` (all by default)."""
    dims = range(t.dim()) if dims is None else dims
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0)
