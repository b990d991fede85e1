"""`attnc bench FILE`: time a compiled spec's forward (and forward + backward) against SDPA and
FlexAttention on the same mask, in the same run, and report TFLOP/s of visible work.

Peers compute the same attention only when the score is a plain softmax (no bias, soft-cap or
sink, no sigmoid or softplus); for other specs they are reported as not comparable. Both peers
get the mask as a dense boolean tensor, the one `fn.mask(...)` gives, so they see exactly
attnc's pattern. Visible work: 4 * D flops per visible (query, key) pair and head forward,
2.5 times that backward (FlashAttention's convention).
"""
from __future__ import annotations

import statistics
import time

import torch

from .errors import AttncError
from .ir import nodes as N

BWD_FACTOR = 2.5


def random_tensors(fn, heads: int, gen, device) -> dict:
    """Plausible runtime tensors for `attnc run`: sorted small ids for integer tensors (document
    ids), N(0, 0.5^2) tables for score modifiers, of the smallest shape the spec accepts."""
    out = {}
    extents = fn._extents(heads)
    for decl in fn.ir.tensors:
        shape = extents.get(decl.name, (1,) * decl.rank)
        if decl.dtype == N.FLOAT:
            out[decl.name] = (torch.randn(shape, generator=gen) * 0.5).to(device)
        else:
            ids = torch.randint(0, 4, shape, generator=gen)
            out[decl.name] = (ids.sort(dim=-1).values if decl.rank == 1 else ids).to(device)
    return out


def visible_pairs(fn, tensors: dict) -> int:
    """Exact count of visible pairs, from the schedule's row counts (per call under runtime data)."""
    from .backends.inputs import host_ints

    s = fn.compiled.schedule
    if not s.exact:
        s = fn._host.schedule(host_ints(tensors))
    return int(s.row_counts.sum())


def median_seconds(call, repeats: int, device) -> float:
    """Median seconds of `call()` after one warm-up (CUDA events on a GPU)."""
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _plain_softmax(ir: N.Attention) -> bool:
    return ir.score.kind == "softmax" and not ir.score.modified


def run(fn, batch: int = 1, heads: int = 8, head_dim: int = 64, dtype=torch.float16, device=None,
        backward: bool = True, repeats: int = 10, flex: bool = True, compile_flex: bool | None = None,
        seed: int = 0) -> list[dict]:
    """One row per (system, pass): system, pass ('fwd' or 'fwd+bwd'), seconds, tflops, and
    speedup (peer time / attnc time, above 1 when attnc is faster), or skipped with a reason."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if fn.compiled.schedule is None:
        raise AttncError("attnc bench times the triton backend; this spec runs on the reference backend only")
    b = fn.compiled.bound
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype) for n in (b.nq, b.nk, b.nk))
    tensors = random_tensors(fn, heads, gen, device)
    ints = {n: t.cpu() for n, t in tensors.items() if not t.dtype.is_floating_point}
    if fn.ir.route is not None:  # routed: the peers get this data's routed visibility [B, H, Nq, Nk]
        mask = fn.routed_mask(q.cpu(), k.cpu(), **ints).to(device)
        flops = 4.0 * head_dim * int(mask.sum())
    else:
        mask = None
        flops = 4.0 * head_dim * batch * heads * visible_pairs(fn, tensors)
    systems = {"attnc": lambda q, k, v: fn(q, k, v, **tensors)}
    skipped = {}
    if _plain_softmax(fn.ir):
        mask = fn.mask(**ints).to(device) if mask is None else mask
        systems["sdpa"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if flex:
            try:
                systems["flex"] = _flex(mask, b.nq, b.nk, device, compile_flex)
            except Exception as exc:  # an old torch, or no compiler for this device
                skipped["flex"] = f"{type(exc).__name__}: {exc}"[:200]
    else:
        for peer in ("sdpa", "flex"):
            skipped[peer] = f"not comparable: the score is {fn.ir.score.kind} with modifiers" \
                if fn.ir.score.modified else f"not comparable: {fn.ir.score.kind} scores"
    rows = []
    for pass_, factor in (("fwd", 1.0), ("fwd+bwd", 1.0 + BWD_FACTOR)):
        if pass_ == "fwd+bwd" and not backward:
            continue
        base = None
        for name, f in systems.items():
            call = _pass(f, q, k, v, pass_)
            try:
                secs = median_seconds(call, repeats, device)
            except Exception as exc:
                rows.append({"system": name, "pass": pass_, "skipped": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            base = secs if name == "attnc" else base
            rows.append({"system": name, "pass": pass_, "seconds": secs, "tflops": flops * factor / secs / 1e12,
                         "speedup": None if name == "attnc" or base is None else secs / base})
        rows += [{"system": n, "pass": pass_, "skipped": why} for n, why in skipped.items()]
    return rows


def _pass(f, q, k, v, pass_: str):
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                f(q, k, v)
        return call
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn_like(q)

    def call():
        out = f(*leaves)
        torch.autograd.grad(out, leaves, grad)
    return call


def _flex(mask: torch.Tensor, nq: int, nk: int, device, compile_flex: bool | None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if mask.dim() == 2:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[q_idx, kv_idx]
        shape = (None, None)
    else:  # per (batch, head): a routed spec's visibility
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[b, h, q_idx, kv_idx]
        shape = mask.shape[:2]

    block = create_block_mask(mask_mod, *shape, nq, nk, device=device)
    attend = torch.compile(flex_attention) if (device.type == "cuda" if compile_flex is None else compile_flex) \
        else flex_attention
    return lambda q, k, v: attend(q, k, v, block_mask=block)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'system':8} {'pass':8} {'time':>12} {'TFLOP/s':>9} {'attnc speedup':>14}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['system']:8} {r['pass']:8} skipped: {r['skipped']}")
            continue
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['system']:8} {r['pass']:8} {r['seconds'] * 1e3:>9.3f} ms {r['tflops']:>9.3f} {speed:>14}")
    return "\n".join(lines)
