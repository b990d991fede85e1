"""Export a compiled spec to PyTorch FlexAttention (`fn.to_flex()`, docs/coming_from_flex.md).

mask_mod and score_mod are Python generated from the bound IR: straight-line torch code, one
assignment per distinct node (windows expanded, parameters bound, flat indices decoded, a branch
per key segment), elementwise only, so Flex can vmap it and torch.compile fuse it. Guards are kept
as ir/evaluate.py keeps them for a whole block: lookups are clamped and zero divisors replaced
where `and` / `or` rules the pair out, and the value computed there is discarded. The BlockMask is
attnc's own tile analysis in row-major order: PARTIAL tiles are Flex's kv blocks, FULL tiles its
full blocks. Scores: softplus(z) / sum softplus(z) is the softmax of log(softplus(z)); sinks and
sigmoid weights are no softmax of a per-pair value, and `run` finishes them from Flex's logsumexp.
"""
from __future__ import annotations

import ast
import linecache
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..analysis.data import data_schedule
from ..analysis.layout import row_major
from ..analysis.tiles import Schedule, analyse
from ..backends.inputs import host_ints
from ..errors import AttncError, suggest
from ..ir import nodes as N
from ..ir.bits import ilog2_code
from ..ir.evaluate import evaluate, part_expr, show
from ..ir.intervals import needs_int64
from ..ir.scores import row_scores, score_reads_n_visible, sink_logits, softcap_value

_VARYING = (N.Coord, N.Head, N.Batch, N.Lookup, N.Window, N.Member, N.NVisible)
# Below it log(softplus(z)) = z - exp(z)/2 + ... is z to double precision; above it softplus
# (log1p(exp(z))) is accurate in float32 too, so log never sees 0.
_SOFTPLUS_FLOOR = -80.0


@dataclass(frozen=True, eq=False)
class FlexExport:
    """A compiled spec in FlexAttention's terms, for one binding and one set of runtime tensors.

    `flex_attention(q, k, v, score_mod=e.score_mod, block_mask=e.block_mask, scale=e.scale,
    enable_gqa=e.enable_gqa)` is attnc's attention when score_mod is set or score_note is None
    (plain softmax); otherwise score_note says why not, and `e.run(q, k, v)` is, in every case.
    scale None is Flex's default 1/sqrt(head_dim), the spec's too then. Float tables' head
    extents are checked by `run`, which knows the heads. enable_gqa: attnc maps query head h to
    kv head h // (Hq / Hkv), as Flex does with it. source: the generated mask_mod and score_mod.
    """

    name: str
    mask_mod: Callable
    score_mod: Callable | None
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    scale: float | None
    score_note: str | None
    head_dim: int | None = None
    enable_gqa: bool = True
    source: str = field(default="", repr=False)
    tensors: dict = field(default_factory=dict, repr=False)
    _logits: Callable | None = field(default=None, repr=False)  # score_mod, or run's log-space form
    _post: str | None = field(default=None, repr=False)  # 'sink' or 'sigmoid': run's lse step
    _needs_head_dim: bool = field(default=False, repr=False)  # the score reads head_dim: run supplies it
    _remake: Callable | None = field(default=None, repr=False)  # (head_dim, device) -> FlexExport
    _fn: object = field(default=None, repr=False)

    device = property(lambda self: self.block_mask.kv_num_blocks.device)

    def to(self, device) -> "FlexExport":
        """The same export with the block mask and captured tensors on `device`."""
        return self._remake(self.head_dim, torch.device(device))

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False):
        """flex_attention with this export, equal to `fn(q, k, v, **tensors)` (row-major tokens;
        [B, Hq, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, Dv]). Eager Flex materialises the scores;
        wrap the call in torch.compile for fused kernels."""
        from torch.nn.attention.flex_attention import flex_attention

        fn, bound = self._fn, self._fn.compiled.bound
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            raise AttncError("q, k and v must be 4-D tensors [batch, heads, tokens, head_dim]")
        if q.shape[2] != bound.nq or k.shape[2] != bound.nk or v.shape[2] != bound.nk:
            raise AttncError(f"'{self.name}' with {bound.describe()} takes {bound.nq} queries and {bound.nk} keys; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise AttncError(f"q has {q.shape[1]} heads and k has {k.shape[1]}; "
                             "the q heads must be a multiple of the kv heads")
        if return_lse and fn.ir.score.kind != "softmax":
            raise AttncError(f"return_lse needs softmax scoring; this spec scores with {fn.ir.score.kind}")
        heads, head_dim = q.shape[1], q.shape[3]
        if self.head_dim is not None and self.head_dim != head_dim:
            raise AttncError(f"this export was made for head_dim={self.head_dim}; q has head_dim {head_dim}")
        tensors = fn._check_tensors(dict(self.tensors), heads=heads, device=q.device,  # tables' head extents too
                                    batch=q.shape[0])
        this = self._remake(head_dim, q.device) if q.device != self.device or self._needs_head_dim else self
        kw = dict(score_mod=this._logits, block_mask=this.block_mask, scale=this.scale, enable_gqa=True)
        if not (return_lse or this._post):
            return flex_attention(q, k, v, **kw)
        out, lse = _flex_with_lse(flex_attention, q, k, v, kw)
        if this._post == "sink":  # exp(z) / (exp(t) + sum exp(z)) = softmax * sigmoid(lse - t)
            t = sink_logits(bound, heads, tensors, head_dim, lse)[None, :, None]
            out = (out.to(lse.dtype) * torch.sigmoid(lse - t)[..., None]).to(out.dtype)
            lse = torch.logaddexp(lse, t.expand_as(lse))
        elif this._post == "sigmoid":  # softmax of logsigmoid(z + b), times sum sigmoid(z + b)
            out = (out.to(lse.dtype) * torch.exp(lse)[..., None]).to(out.dtype)
        return (out, lse) if return_lse else out


def export(fn, block_size: "int | tuple[int, int]" = 128, head_dim: int | None = None,
           **tensors: torch.Tensor) -> FlexExport:
    """FlexAttention's mask_mod, score_mod, BlockMask and scale for a compiled spec. block_size:
    Flex's BLOCK_SIZE, an int or (Q, KV), powers of two from 16 (attnc's tiles). head_dim: only
    for a score that reads it beyond Flex's default scale 1/sqrt(head_dim) (else score_mod is
    None and `run` passes q's). tensors: the spec's runtime tensors, on Flex's device."""
    ir = fn.ir
    if ir.route is not None:
        raise AttncError(f"'{ir.name}' routes keys by data (top-k over q and k); FlexAttention's mask_mod "
                         "cannot see q and k, so routed specs do not export",
                         hint="fn.routed_mask(q, k) gives the visibility for one batch")
    sizes = _block_sizes(block_size)
    if head_dim is not None and not (_is_int(head_dim) and head_dim >= 1):
        raise AttncError(f"head_dim must be a positive integer, got {head_dim!r}")
    tensors = _checked(fn, tensors)
    devices = {t.device for t in tensors.values()} or {torch.device("cpu")}
    if len(devices) > 1:
        raise AttncError(f"runtime tensors are on several devices: {', '.join(sorted(map(str, devices)))}")
    sched = _schedule(fn, sizes, host_ints(tensors))
    return _build(fn, sched, tensors, None if head_dim is None else int(head_dim), devices.pop())


def _block_sizes(block_size) -> tuple[int, int]:
    sizes = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    if not (len(sizes) == 2 and all(_is_int(b) and b >= 16 and not b & (b - 1) for b in sizes)):
        raise AttncError(f"block_size must be a power of two, at least 16, or a pair of them (Q, KV); "
                         f"got {block_size!r}",
                         hint="Flex's kernels need multiples of 16; attnc's tile analysis cuts powers of two")
    return int(sizes[0]), int(sizes[1])


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _checked(fn, given: dict) -> dict[str, torch.Tensor]:
    """The runtime tensors, named in every error. Integer tensors get attnc's call-time checks
    (dtype, int32 values, shapes from the spec's index ranges, divisors); float tables are
    checked for kind and rank here, and for their extents per head by `run`."""
    decls = {t.name: t for t in fn.ir.tensors}
    unknown = [n for n in given if n not in decls]
    if unknown:
        hints = [h for n in unknown if (h := suggest(n, decls))]
        raise AttncError(f"'{fn.ir.name}' reads no runtime tensor{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(n) for n in unknown)}",
                         hint="; ".join(hints) or (f"it reads: {', '.join(decls)}" if decls else "it reads none"))
    missing = [n for n in decls if n not in given]
    if missing:
        raise AttncError(f"'{fn.ir.name}' reads runtime tensor{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(n) for n in missing)}; pass {', '.join(f'{n}=tensor' for n in missing)}")
    for name, decl in decls.items():
        t = given[name]
        if not isinstance(t, torch.Tensor):
            raise AttncError(f"runtime tensor '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if decl.dtype == N.FLOAT:
            ranks = (decl.rank, decl.rank + 1) if decl.per_head else (decl.rank,)
            if not t.dtype.is_floating_point or t.dim() not in ranks:
                raise AttncError(f"runtime tensor '{name}' is a float table of rank {decl.rank}"
                                 f"{' (or one more, per head)' if decl.per_head else ''}; "
                                 f"got {t.dtype} {list(t.shape)}")
            if t.numel() and (torch.isnan(t).any() or (t == float("inf")).any()):
                raise AttncError(f"runtime tensor '{name}' contains NaN or +inf")
    ints = fn._check_tensors({n: t for n, t in given.items() if decls[n].dtype != N.FLOAT}, heads=None)
    return {n: ints.get(n, t) for n, t in given.items()}


def _schedule(fn, sizes: tuple[int, int], ints: dict) -> Schedule:
    """attnc's tiles of Flex's block size in row-major order, classified with this data."""
    bound, s, lay = fn.compiled.bound, fn.compiled.schedule, fn.compiled.layout
    try:
        if s is None or (s.block_m, s.block_n) != sizes or not (lay.q_identity and lay.kv_identity):
            s = analyse(bound, *sizes, row_major(bound.nq, bound.nk))
        return s if s.exact else data_schedule(s, ints)
    except AttncError as err:
        raise err.with_source(fn.spec.text, fn.spec.filename) from None


def _block_mask(s: Schedule, mask_mod, device):
    """BlockMask.from_kv_blocks from the schedule's CSR lists (B = H = 1: it broadcasts)."""
    from torch.nn.attention.flex_attention import BlockMask

    def pairs(ptr, idx):
        return np.repeat(np.arange(s.q_tiles), np.diff(ptr).astype(np.int64)), np.asarray(idx, dtype=np.int64)

    (pr, pc), (fr, fc) = pairs(s.part_ptr, s.part_idx), pairs(s.full_ptr, s.full_idx)
    if s.nq % s.block_m:
        # attnc may call a ragged last q tile FULL (its missing rows do not exist); Flex pads it
        # with hidden rows, so create_block_mask never does: follow Flex, its kernels expect it.
        last = fr == s.q_tiles - 1
        pr, pc = np.concatenate([pr, fr[last]]), np.concatenate([pc, fc[last]])
        fr, fc = fr[~last], fc[~last]

    def lists(rows, cols):
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        counts = np.bincount(rows, minlength=s.q_tiles)
        table = np.zeros((s.q_tiles, s.kv_tiles), dtype=np.int32)  # Flex's layout: a row per q tile
        table[rows, np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]] = cols
        return (torch.from_numpy(counts.astype(np.int32))[None, None].to(device),
                torch.from_numpy(table)[None, None].to(device))

    return BlockMask.from_kv_blocks(*lists(pr, pc), *lists(fr, fc), BLOCK_SIZE=(s.block_m, s.block_n),
                                    mask_mod=mask_mod, seq_lengths=(s.nq, s.nk))


def _build(fn, sched: Schedule, tensors: dict, head_dim: int | None, device: torch.device) -> FlexExport:
    bound, ir = fn.compiled.bound, fn.ir
    tensors = {n: t.to(device) for n, t in tensors.items()}
    # Integers in int32 where every intermediate fits (Flex's kernels pay for int64 // and %).
    idx = torch.int64 if needs_int64(bound) else torch.int32
    tables = {n: (t if t.dtype.is_floating_point else t.to(idx)) for n, t in tensors.items()}
    plan = _score_plan(bound, head_dim, lambda: sched.row_counts)
    code = _Code(tables)
    code.globals["I"] = idx
    _mask_body(bound, code)
    code.function("mask_mod", "b, h, q_idx, kv_idx")
    if plan.get("mod"):
        for name in ("row_scale", "row_bias") if plan["per_row"] else ():
            code.globals[name.upper()] = torch.from_numpy(plan[name]).to(device)
        _score_body(bound, code, plan, head_dim)
        code.function("score_mod", "score, b, h, q_idx, kv_idx")
    ns = code.load(f"<attnc.to_flex {ir.name} {hash(code.source) & 0xFFFFFFFF:08x}>")  # one per distinct source
    logits = ns.get("score_mod")
    return FlexExport(
        name=ir.name, mask_mod=ns["mask_mod"], score_mod=None if plan.get("post") else logits,
        block_mask=_block_mask(sched, ns["mask_mod"], device), scale=plan.get("scale"),
        score_note=plan.get("note"), head_dim=head_dim, source=code.source, tensors=tensors,
        _logits=logits, _post=plan.get("post"), _needs_head_dim=bool(plan.get("needs_head_dim")), _fn=fn,
        _remake=lambda hd, dev: _build(fn, sched, tensors, hd, dev))


# -- scores -------------------------------------------------------------------------------------
def _default_scale(e) -> bool:
    """1 / sqrt(head_dim): Flex's own default, so it exports as scale=None without head_dim."""
    return (isinstance(e, N.Binary) and e.op == "/" and isinstance(e.lhs, N.Const)
            and not isinstance(e.lhs.value, bool) and e.lhs.value == 1 and e.rhs == N.Call("sqrt", (N.HeadDim(),)))


def _score_plan(bound, head_dim: int | None, counts: Callable[[], np.ndarray]) -> dict:
    """How the spec's score maps onto Flex: scale, per-row tables, whether score_mod has work,
    the step `run` applies after Flex ('sink' / 'sigmoid'), and a note."""
    score, env = bound.ir.score, bound.env
    kind, per_row = score.kind, score_reads_n_visible(score)
    hd_reads = [e for e in (score.logit_bias, score.softcap, score.bias if kind == "sigmoid" else None,
                            None if _default_scale(score.scale) else score.scale)
                if e is not None and any(isinstance(x, N.HeadDim) for x in N.walk(e))]
    if head_dim is None and hd_reads:
        return {"needs_head_dim": True,
                "note": f"the score reads head_dim (`{show(hd_reads[0])}`), which a score_mod cannot see: pass "
                        "head_dim=D to to_flex() (run() passes q's)"}
    uniform_bias = kind == "sigmoid" and not per_row
    plan: dict = {"kind": kind, "per_row": per_row, "cap": softcap_value(bound, head_dim) if score.softcap else None,
                  "bias": float(evaluate(score.bias, env, {}, head_dim)) if uniform_bias else None}
    if per_row:  # n_visible: a scale (and sigmoid bias) per query row, applied in score_mod
        plan["row_scale"], plan["row_bias"] = row_scores(bound, head_dim, counts())
        plan["scale"] = 1.0
    elif not (head_dim is None and _default_scale(score.scale)):
        plan["scale"] = float(evaluate(score.scale, env, {}, head_dim))
    plan["mod"] = score.logit_bias is not None or plan["cap"] is not None or per_row or kind != "softmax"
    if score.sink is not None:
        plan["post"] = "sink"
        plan["note"] = ("the sink adds exp(sink) to the softmax's denominator and Flex normalises over real keys "
                        "only: no score_mod does it. run() does, from Flex's logsumexp: out * sigmoid(lse - sink)")
    elif kind == "sigmoid":
        plan["post"] = "sigmoid"
        plan["note"] = ("sigmoid weights are not normalised over the row, and Flex always is: no score_mod "
                        "reproduces them. run() does, exactly: softmax of logsigmoid(z + b), times exp(lse)")
    elif kind == "softplus":
        plan["note"] = ("softplus(z) / sum softplus(z) is the softmax of log(softplus(z)); score_mod returns "
                        "that" + (", with scale=1.0 and attnc's per-row scale (n_visible)" if per_row else ""))
    return plan


def _score_body(bound, code: "_Code", plan: dict, head_dim: int | None) -> None:
    """score_mod: z = score (scale * q.k) [* row scale] + bias, soft-cap, then the log-space
    form of a sigmoid or softplus score."""
    code.lines += ["F = torch.promote_types(score.dtype, torch.float32)", "z = score.to(F)"]
    if plan["per_row"]:
        code.lines += [f"qr = q_idx.clamp(0, {bound.nq - 1})", "z = z * ROW_SCALE[qr].to(F)"]
    if bound.ir.score.logit_bias is not None:
        code.lines += ["qi = q_idx.to(I)", "ki = kv_idx.to(I)"]
        code.lines.append(f"z = z + {_per_segment(bound, code, bound.ir.score.logit_bias, head_dim, float_=True)[0]}")
    if plan["cap"] is not None:
        code.lines.append(f"z = {plan['cap']!r} * torch.tanh(z / {plan['cap']!r})")
    if plan["kind"] == "sigmoid":
        b = "ROW_BIAS[qr].to(F)" if plan["per_row"] else _literal(plan["bias"])
        code.lines.append(f"z = torch.nn.functional.logsigmoid(z + {b})")
    elif plan["kind"] == "softplus":
        code.lines.append(f"z = torch.where(z < {_SOFTPLUS_FLOOR}, z, "
                          f"torch.log(torch.nn.functional.softplus(z.clamp(min={_SOFTPLUS_FLOOR}))))")
    code.lines.append("return z.to(score.dtype)")


def _flex_with_lse(flex_attention, q, k, v, kw):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest
        return flex_attention(q, k, v, return_lse=True, **kw)
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kw)
    return out, aux.lse


# -- code generation ----------------------------------------------------------------------------
class _Code:
    """Lines of generated Python, its globals (captured tables) and fresh temporaries."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables, self.globals = tables, {"torch": torch, "np": np}
        self.lines, self.functions, self.count = [], [], 0

    def tmp(self, expr: str, name: str | None = None) -> str:
        if name is None:
            name, self.count = f"t{self.count}", self.count + 1
        self.lines.append(f"{name} = {expr}")
        return name

    def function(self, name: str, args: str) -> None:  # the lines emitted so far
        self.functions.append(f"def {name}({args}):\n" + "".join(f"    {x}\n" for x in self.lines))
        self.lines, self.count = [], 0
        self.source = "\n\n".join(self.functions)

    def load(self, filename: str) -> dict:
        # Registered with linecache so tracebacks and torch.compile can show the generated lines.
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        ns = dict(self.globals)
        exec(compile(self.source, filename, "exec"), ns)
        return ns


def _mask_body(bound, code: _Code) -> None:
    """The mask: per key segment, keys decoded within the segment, OR-ed over segments."""
    code.lines += ["qi = q_idx.to(I)", "ki = kv_idx.to(I)"]
    out, tensor = _per_segment(bound, code, bound.ir.mask, None, float_=False)
    if not tensor:  # a mask that reads no token (softplus's `true`): vmap needs a tensor
        out = code.tmp(f"torch.full_like(qi, {out}, dtype=torch.bool)")
    code.lines.append(f"return {out}")


def _per_segment(bound, code: _Code, e: N.Expr, head_dim, float_: bool) -> tuple[str, bool]:
    """Code for `e` at (q_idx, kv_idx): on segmented spaces, each (query segment, key segment)
    specialisation with coordinates within the segments, selected by where q and k fall."""
    parts = bound.kv_parts
    out = None
    for a, qpart in enumerate(bound.q_parts):
        seeds: dict = {}
        q_flat = ("qi", None) if qpart.offset == 0 else (f"q{a}_i", f"qi - {qpart.offset}")
        q_inside = [f"(qi >= {qpart.offset})"] * (a > 0) + [f"(qi < {qpart.offset + qpart.size})"] * \
            (len(bound.q_parts) > 1)
        for n, part in enumerate(parts):
            flat = ("ki", None) if part.offset == 0 else (f"k{n}_i", f"ki - {part.offset}")  # emitted when read
            em = _Emitter(code, bound.env, head_dim, {"q": (q_flat, qpart.dims, qpart.space.axes),
                                                      "k": (flat, part.dims, part.space.axes)}, seeds)
            val, tensor = em.emit(part_expr(e, part.name, qpart.name))
            seeds = {key: v for key, v in em.names.items() if key[0] != "k"}
            if len(parts) == 1 and len(bound.q_parts) == 1:
                return val, tensor
            inside = " & ".join(q_inside + [f"(ki >= {part.offset})"] * (n > 0) +
                                [f"(ki < {part.offset + part.size})"] * (len(parts) > 1))
            out = _combine(code, out, inside, val, float_)
    return out, True


def _combine(code: "_Code", out, inside: str, val: str, float_: bool):
    """Fold one segment combination's value into the result so far."""
    if float_:
        return val if out is None else code.tmp(f"torch.where({inside}, {val}, {out})")
    term = code.tmp(f"{inside} & {val}" if val != "True" else inside)
    return term if out is None else code.tmp(f"{term} | {out}")


class _Emitter:
    """Torch code for one bound IR expression (ints exact in I, floats in F); one temporary
    per distinct node. Subtrees that read no token are evaluated here, by ir/evaluate.py."""

    def __init__(self, code: _Code, env: dict, head_dim, spaces: dict, names: dict):
        self.code, self.env, self.head_dim, self.spaces = code, env, head_dim, spaces
        self.names = dict(names)  # (side, axis) or 'head' -> variable
        self.memo, self.varies = {}, {}  # node -> (code, is a tensor); node -> reads a token

    def emit(self, e: N.Expr) -> tuple[str, bool]:
        """(code, whether it is a tensor)."""
        hit = self.memo.get(e)
        if hit is None:
            hit = self.memo[e] = self._emit(e)
        return hit

    def _varying(self, e: N.Expr) -> bool:
        v = self.varies.get(e)
        if v is None:
            v = self.varies[e] = isinstance(e, _VARYING) or any(self._varying(c) for c in N.children(e))
        return v

    def _emit(self, e: N.Expr) -> tuple[str, bool]:
        if not self._varying(e):
            try:
                return _literal(evaluate(e, self.env, {}, self.head_dim, strict=False)), False
            except AttncError:
                pass  # an integer division by a zero that a token guard may rule out: guarded below
        tmp = self.code.tmp
        if isinstance(e, N.Coord):
            return self.coord(e.side, e.axis), True
        if isinstance(e, N.Head):
            if "head" not in self.names:
                self.names["head"] = tmp("h.to(I)", "head")
            return self.names["head"], True
        if isinstance(e, N.Batch):
            if "batch" not in self.names:
                self.names["batch"] = tmp("b.to(I)", "batch")
            return self.names["batch"], True
        if isinstance(e, N.Window):
            return self.emit(e.expand())
        if isinstance(e, N.Lookup):
            return self.lookup(e)
        if isinstance(e, N.Unary):
            a, t = self.emit(e.operand)
            if e.op == "ilog2":  # 0 for a <= 0: only where a guard rules the pair out (attnc refuses the rest)
                return ilog2_code(a, tmp, "torch.where") if t else tmp(f"max(int({a}), 1).bit_length() - 1"), t
            if _value(a, t) is not None:  # on a constant left by expansion or a decided guard
                return _literal(evaluate(N.Unary(e.op, N.Const(_value(a, t))), {}, {})), False
            if e.op == "not":
                return (tmp(f"torch.logical_not({a})"), True) if t else (f"(not {a})", False)
            return tmp(f"-{a}" if e.op == "neg" else f"abs({a})"), t
        if isinstance(e, N.Call):
            a, t = self.as_float(e.args[0])
            return (tmp(f"torch.{e.fn}({a})"), True) if t else (tmp(f"float(np.{e.fn}(np.float64({a})))"), False)
        if isinstance(e, N.Binary):
            return self.binary(e)
        raise AttncError(f"`{show(e)}` has no FlexAttention form")  # Member / NVisible never get here

    def as_float(self, e: N.Expr) -> tuple[str, bool]:
        a, t = self.emit(e)
        return (self.code.tmp(f"{a}.to(F)"), True) if t and e.type != N.FLOAT else (a, t)

    def binary(self, e: N.Binary) -> tuple[str, bool]:
        op, tmp = e.op, self.code.tmp
        if op in ("and", "or"):
            (a, ta), (b, tb) = self.emit(e.lhs), self.emit(e.rhs)
            for lit, other, t in ((a, b, tb), (b, a, ta)):
                if lit in ("True", "False"):  # a side that reads no token decides or drops out
                    return (other, t) if (lit == "True") == (op == "and") else (lit, False)
            return tmp(f"{a} {'&' if op == 'and' else '|'} {b}"), True
        if e.type == N.FLOAT and op in ("+", "-", "*", "/", "min", "max"):
            (a, ta), (b, tb) = self.as_float(e.lhs), self.as_float(e.rhs)
        else:
            (a, ta), (b, tb) = self.emit(e.lhs), self.emit(e.rhs)
        va, vb = _value(a, ta), _value(b, tb)
        if va is not None and vb is not None:  # constant after expansion (a window's i % 1)
            try:
                return _literal(evaluate(N.Binary(op, N.Const(va), N.Const(vb)), {}, {}, strict=False)), False
            except AttncError:
                pass
        if vb is not None and type(vb) is int and (vb == 1 and op in ("//", "*") or vb == 0 and op in ("+", "-")):
            return a, ta
        if vb is not None and type(vb) is int and vb == 1 and op == "%":
            return "0", False
        if op in ("<<", ">>"):  # an out-of-range count is read only where a guard rules the pair out
            lo, hi = N.SHIFT_LIMITS
            b = tmp(f"{b}.clamp({lo}, {hi})") if tb else repr(min(max(vb, lo), hi)) if vb is not None else b
        if op in ("//", "%") and (tb or vb is None or vb == 0):
            # A zero divisor is read only where a guard rules the pair out (attnc refuses the
            # rest): any divisor will do there, and the quotient is discarded.
            b = tmp(f"torch.where({b} == 0, 1, {b})") if tb else f"({b} or 1)"
        t = ta or tb
        if op in ("min", "max"):
            if ta and tb:
                return tmp(f"torch.{'minimum' if op == 'min' else 'maximum'}({a}, {b})"), True
            if t:
                x, c = (a, b) if ta else (b, a)
                return tmp(f"torch.clamp({x}, {'max' if op == 'min' else 'min'}={c})"), True
            return tmp(f"{op}({a}, {b})"), False
        return tmp(f"{a} {op} {b}"), t

    def coord(self, side: str, axis: str) -> str:
        (flat, shifted), dims, axes = self.spaces[side]
        if (side, "i") not in self.names:  # a segment's own index, computed when first read
            self.names[(side, "i")] = flat if shifted is None else self.code.tmp(shifted, flat)
        if (side, axis) not in self.names:  # decode the flat index once, as evaluate.decode does
            prefix, rest = (flat.split("_")[0] if "_" in flat else side), self.names[(side, "i")]
            for n, (ax, size) in enumerate(zip(reversed(axes), reversed(dims))):
                self.names[(side, ax)] = self.code.tmp(f"{rest} % {size}", f"{prefix}_{ax}")
                if n + 1 < len(axes):
                    rest = self.code.tmp(f"{rest} // {size}")
        return self.names[(side, axis)]

    def lookup(self, e: N.Lookup) -> tuple[str, bool]:
        table = self.code.tables[e.tensor]
        idx = [self.emit(i) for i in e.indices]
        if e.type == N.FLOAT and table.dim() == len(idx) + 1:  # per head: [Hq, ...]
            idx = [self.emit(N.Head())] + idx
        if table.numel() == 0:  # never read where a pair is visible (extents)
            return ("0.0" if e.type == N.FLOAT else "0"), False
        # Clamped: a pair the mask hides, or a guard rules out, may index outside the table.
        parts = [f"{c}.clamp(0, {n - 1})" if t else f"min(max({c}, 0), {n - 1})" for (c, t), n in zip(idx, table.shape)]
        self.code.globals[f"T_{e.tensor}"] = table
        code = f"T_{e.tensor}[{', '.join(parts)}]"
        return self.code.tmp(code + (".to(F)" if e.type == N.FLOAT else "")), True


def _value(code: str, tensor: bool):
    """The Python value of a literal emitted by _literal, else None."""
    try:
        return None if tensor else ast.literal_eval(code)
    except (ValueError, SyntaxError):
        return None


def _literal(v) -> str:
    v = v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0) else v
    if isinstance(v, float) and not np.isfinite(v):
        return f"float('{v}')"
    return f"({v!r})" if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 else repr(v)
