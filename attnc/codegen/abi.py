"""The kernels' arguments (forward, dQ and dK/dV), described once.

The emitter writes each kernel's signature (and the per-pair functions' signatures) from
`kernel_args`; the launcher passes every value by name through `bind`, which checks the dict
against the same list. Adding, removing or reordering an argument is therefore one edit here,
and a launcher that forgets a value fails with a message naming it instead of shifting every
later positional argument.

Each argument has a kind (a tensor pointer, a runtime int or float, or a constexpr, which Triton
specialises the kernel on) and says where the launcher takes its value from. Names cannot
collide: integer parameters are `p_{name}`, runtime tensors are numbered (rt0, rt1, ...) rather
than named after the spec, and no fixed name starts with `p_` or `rt`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import nodes as N
from ..ir.evaluate import per_batch
from ..ir.scores import base2_logits, softplus_first_pass

PTR, INT, FLOAT, CONSTEXPR = "pointer", "int", "float", "constexpr"


class AbiError(RuntimeError):
    """An internal error: the launcher and the kernel disagree (a bug in attnc, not bad input)."""


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # PTR | INT | FLOAT | CONSTEXPR
    source: str  # where the launcher takes the value from
    group: str  # arguments of one group share a line of the emitted signature
    pair: bool = False  # also passed on to the per-pair functions (mask and logit bias)


# Stride arguments: stride_{side}{dim} for q, k, v and out, in their dimension order.
_STRIDES = {"q": ("q", "bhmd"), "k": ("k", "bhnd"), "v": ("v", "bhnd"), "o": ("out", "bhmd"),
            "do": ("dout", "bhmd"), "dq": ("dq", "bhmd"), "dk": ("dk", "bhnd"), "dv": ("dv", "bhnd")}


def param_name(name: str) -> str:
    """The kernel argument carrying parameter `name`."""
    return f"p_{name}"


def kernel_params(ir: N.Attention) -> list[N.ParamDecl]:
    """The parameters the kernel receives: every integer one (sizes and mask constants), and the
    float ones a logit bias reads (float32 scalars); scale, bias and soft-cap are computed on the host."""
    read = {x.name for x in N.walk(ir.score.logit_bias, expand_windows=True) if isinstance(x, N.Param)} \
        if ir.score.logit_bias is not None else set()
    return [p for p in ir.params if p.type == N.INT or p.name in read]


def table_name(n: int, what: str) -> str:
    """Arguments of runtime tensor number n: `ptr`, sizes `n{d}`, strides `s{d}`, head stride `hs`."""
    return f"rt{n}_{what}"


def _strides(side: str) -> list[Arg]:
    tensor, dims = _STRIDES[side]
    return [Arg(f"stride_{side}{d}", INT, f"{tensor}.stride({n})", f"strides of {tensor}")
            for n, d in enumerate(dims)]


def stride_values(side: str, t) -> dict[str, int]:
    """The stride arguments of q, k, v or out ('o') from the tensor passed for it."""
    return {f"stride_{side}{d}": int(s) for d, s in zip(_STRIDES[side][1], t.stride(), strict=True)}


def table_values(ir: N.Attention, tensors: dict) -> dict:
    """The arguments of every runtime tensor from the (converted, contiguous) tensors by name: a
    per-head table ([heads, ...]) passes its head stride, a shared one 0."""
    out = {}
    for n, decl in enumerate(ir.tensors):
        t = tensors[decl.name]
        per_head = t.dim() == decl.rank + 1
        dims = t.shape[1:] if per_head else t.shape
        strides = t.stride()[1:] if per_head else t.stride()
        out[table_name(n, "ptr")] = t
        out.update({table_name(n, f"n{d}"): int(x) for d, x in enumerate(dims)})
        out.update({table_name(n, f"s{d}"): int(x) for d, x in enumerate(strides)})
        if decl.per_head:
            out[table_name(n, "hs")] = int(t.stride(0)) if per_head else 0
    return out


def grad_tables(ir: N.Attention) -> list[int]:
    """Numbers of the float runtime tensors the logit bias reads: the dQ kernel accumulates their
    gradients (a sink's gradient is computed on the host from the row statistics)."""
    if ir.score.logit_bias is None:
        return []
    read = {x.tensor for x in N.walk(ir.score.logit_bias, expand_windows=True)
            if isinstance(x, N.Lookup) and x.type == N.FLOAT}
    return [n for n, t in enumerate(ir.tensors) if t.name in read]


def _data(ir: N.Attention, kernel: str) -> list[Arg]:
    q, k, v = (Arg("Q", PTR, "q in kernel order [B, Hq, Nq, D]", "data"),
               Arg("K", PTR, "k in kernel order [B, Hkv, Nk, D]", "data"),
               Arg("V", PTR, "v in kernel order [B, Hkv, Nk, Dv]", "data"))
    stat = Arg("Stat", PTR, "row statistic [B, Hq, Nq] float32, contiguous", "data")
    if kernel == "fwd":
        return [q, k, v, Arg("Out", PTR, "output [B, Hq, Nq, Dv], q's dtype", "data"), stat]
    back = [Arg("DO", PTR, "gradient of the output [B, Hq, Nq, Dv], kernel order", "data"), stat,
            Arg("Delta", PTR, "rowsum(dO * O) [B, Hq, Nq] float32, contiguous (minus the lse's gradient)", "data")]
    if kernel == "dkdv":
        return [q, k, v, *back, Arg("DK", PTR, "dk [B, Hkv, Nk, D]", "data"),
                Arg("DV", PTR, "dv [B, Hkv, Nk, Dv]", "data")]
    grads = []
    for n in grad_tables(ir):
        grads += [Arg(table_name(n, "grad"), PTR, f"float32 [programs, numel of table {n}]: each dQ program's "
                      "own partial gradient of the table", f"gradient {n}"),
                  Arg(table_name(n, "gstride"), INT, f"numel of table {n}", f"gradient {n}"),
                  Arg(table_name(n, "want"), CONSTEXPR, f"table {n} wants its gradient (else the buffer is a "
                      "dummy and the kernel skips it)", f"gradient {n}")]
    return [q, k, v, *back, Arg("DQ", PTR, "dq [B, Hq, Nq, D]", "data"), *grads]


def _schedule(kernel: str) -> list[Arg]:
    t, whom = ("_T", "per kv tile (schedule.transposed)") if kernel == "dkdv" else ("", "per q tile")
    return [
        Arg(f"FULL{t}_PTR", PTR, f"FULL tiles {whom}: CSR offsets, int32", "schedule"),
        Arg(f"FULL{t}_IDX", PTR, f"FULL tiles {whom}: tile indices, int32", "schedule"),
        Arg(f"PART{t}_PTR", PTR, f"PARTIAL tiles {whom}: CSR offsets, int32", "schedule"),
        Arg(f"PART{t}_IDX", PTR, f"PARTIAL tiles {whom}: tile indices, int32", "schedule"),
        Arg("Q_ORDER", PTR, "layout.q_perm, int32: kernel position -> row-major token", "schedule"),
        Arg("KV_ORDER", PTR, "layout.kv_perm, int32", "schedule"),
        Arg("ROW_PARTS", PTR, "token parts of the queries [q parts, Nq] by kernel position (codegen/parts.py), "
            "int32, int64 where the IR's ranges need it", "schedule"),
        Arg("COL_PARTS", PTR, "token parts of the keys [k parts, Nk] by kernel position", "schedule"),
    ]


def _route(kernel: str) -> list[Arg]:
    """Routed specs only (backends/triton/routing.py): the schedule lists are then per
    (batch * head, q tile), or per (batch * kv head, kv tile) for dK/dV; the forward's and dQ's
    FULL lists hold the kv tiles of one routing group, MIXED the FULL tiles of several."""
    mixed = [] if kernel == "dkdv" else [
        Arg("MIXED_PTR", PTR, "FULL tiles of several routing groups per q tile: CSR offsets, int32", "route"),
        Arg("MIXED_IDX", PTR, "FULL tiles of several routing groups per q tile: tile indices, int32", "route")]
    return mixed + [
        Arg("ROUTE_UNIT", PTR, "routing unit of the query at each kernel position, int32", "route"),
        Arg("ROUTE_GROUP", PTR, "routing group of the key at each kernel position, int32", "route"),
        Arg("ROUTE_SEL", PTR, "chosen groups [B, Hq, units, ROUTE_K], int32, -1 past the candidates", "route"),
        Arg("n_units", INT, "routing units", "route"),
        Arg("ROUTE_K", CONSTEXPR, "groups chosen per unit (the route's top)", "route"),
    ]


_STRIDED = {"fwd": ("q", "k", "v", "o"), "dq": ("q", "k", "v", "do", "dq"), "dkdv": ("q", "k", "v", "do", "dk", "dv")}


def forward_args(ir: N.Attention) -> tuple[Arg, ...]:
    """Every argument of `attnc_fwd`, in signature order."""
    return kernel_args(ir, "fwd")


def kernel_args(ir: N.Attention, kernel: str = "fwd") -> tuple[Arg, ...]:
    """Every argument of one kernel (`fwd`, `dq` or `dkdv`), in signature order. The three share
    everything but their data pointers, the schedule's direction and the strides."""
    args = [
        *_data(ir, kernel),
        Arg("ROW_SCALE", PTR, "float32 [Nq] score scale per kernel position", "rows"),
        Arg("ROW_BIAS", PTR, "float32 [Nq] score bias per kernel position", "rows"),
        Arg("SINK", PTR, "float32 [Hq] sink logits (a dummy without a sink)", "rows"),
        Arg("softcap", FLOAT, "the soft-cap value (0.0 without one)", "rows"),
        *_schedule(kernel),
        *(_route(kernel) if ir.route is not None else []),
        *(a for side in _STRIDED[kernel] for a in _strides(side)),
        Arg("n_heads", INT, "Hq", "sizes"),
        Arg("kv_group", INT, "Hq // Hkv", "sizes"),
        Arg("Nq", INT, "queries (bound.nq)", "sizes"),
        Arg("Nk", INT, "keys (bound.nk)", "sizes"),
        Arg("head_dim", INT, "D, the spec's `head_dim`", "sizes", pair=True),
    ]
    args += [Arg(param_name(p.name), INT if p.type == N.INT else FLOAT, f"parameter {p.name}", "params", pair=True)
             for p in kernel_params(ir)]
    for n, t in enumerate(ir.tensors):
        what = f"runtime tensor '{t.name}'"
        group = f"tensor {n}"
        args.append(Arg(table_name(n, "ptr"), PTR, f"{what}, {'float32' if t.dtype == N.FLOAT else 'int32'}, contiguous",
                        group, pair=True))
        args += [Arg(table_name(n, f"n{d}"), INT, f"{what}: size of index {d}", group, pair=True) for d in range(t.rank)]
        args += [Arg(table_name(n, f"s{d}"), INT, f"{what}: stride of index {d}", group, pair=True) for d in range(t.rank)]
        if t.per_head:
            args.append(Arg(table_name(n, "hs"), INT, f"{what}: head stride (0 when shared by all heads)", group, pair=True))
    args += [
        Arg("HEAD_DIM", CONSTEXPR, "D", "dims"),
        Arg("HEAD_DIM_V", CONSTEXPR, "Dv", "dims"),
        Arg("BLOCK_D", CONSTEXPR, "D padded to a power of two (>= 16)", "blocks"),
        Arg("BLOCK_DV", CONSTEXPR, "Dv padded to a power of two (>= 16)", "blocks"),
        Arg("BLOCK_M", CONSTEXPR, "schedule.block_m", "blocks"),
        Arg("BLOCK_N", CONSTEXPR, "schedule.block_n", "blocks"),
        Arg("SUB_M", CONSTEXPR, "rows of a q tile taken at a time (divides BLOCK_M; codegen/target.sub_tiles)",
            "blocks"),
        Arg("SUB_N", CONSTEXPR, "columns of a kv tile taken at a time (divides BLOCK_N)", "blocks"),
        *([Arg("D_CHUNK", CONSTEXPR, "head-dim columns of q.k and do.v taken at a time (codegen/target."
               "head_chunk; >= BLOCK_D: all)", "blocks")] if kernel != "fwd" else []),
        Arg("INT64", CONSTEXPR, "mask and bias integers in int64 (their ranges, or a runtime table's "
            "addresses, need it)", "flags", pair=True),
        Arg("ADDR64", CONSTEXPR, "offsets inside one (batch, head) slice of q, k, v or out reach 2**31", "flags"),
        Arg("DOT_PRECISION", CONSTEXPR, "tl.dot's input precision: 'tf32x3' or 'tf32', from "
            "torch.get_float32_matmul_precision() for float32 inputs ('ieee' for 16-bit ones)", "flags"),
        *([Arg("FAST_TANH", CONSTEXPR, "the soft-cap's tanh is the GPU's tanh.approx (a GPU, 16-bit q and k)",
               "flags")] if ir.score.softcap is not None else []),
        *([Arg("FAST_SOFTPLUS", CONSTEXPR, "softplus's first pass: 0 none, 1 on the GPU's lg2.approx (a GPU, "
               "16-bit q and k), 2 on tl.math.log2 (tests in the interpreter)", "flags")]
          if kernel == "fwd" and softplus_first_pass(ir) else []),
        *([Arg("POS_SCALE", CONSTEXPR, "every row scale is > 0: the forward applies it after the max, in "
               "exp2's FMA", "flags")] if kernel == "fwd" and base2_logits(ir.score) else []),
        Arg("Q_PERMUTED", CONSTEXPR, "the layout reorders queries", "flags"),
        Arg("KV_PERMUTED", CONSTEXPR, "the layout reorders keys", "flags"),
    ]
    names = [a.name for a in args]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AbiError(f"kernel arguments named twice: {sorted(dup)}")
    return tuple(args)


def signature(ir: N.Attention, indent: str = "    ", kernel: str = "fwd") -> list[str]:
    """Lines of the kernel's parameter list: one line per group, constexprs annotated."""
    lines: list[list[str]] = []
    group = None
    for a in kernel_args(ir, kernel):
        if a.group != group:
            lines.append([])
            group = a.group
        lines[-1].append(f"{a.name}: tl.constexpr" if a.kind == CONSTEXPR else a.name)
    return [f"{indent}{', '.join(names)}," for names in lines]


def pair_params(ir: N.Attention) -> list[str]:
    """Parameters of the per-pair functions after q_i and k_i: the head, then the kernel
    arguments they read, in ABI order (constexprs annotated)."""
    return _leading(ir) + [f"{a.name}: tl.constexpr" if a.kind == CONSTEXPR else a.name
                           for a in forward_args(ir) if a.pair]


def pair_call_args(ir: N.Attention) -> list[str]:
    """What the kernel passes to a per-pair function after q_i and k_i."""
    return _leading(ir) + [a.name for a in forward_args(ir) if a.pair]


def _leading(ir: N.Attention) -> list[str]:
    """The head, and the batch index when the mask reads `batch` (only then: other kernels
    keep their signatures)."""
    return ["h", "b"] if per_batch(ir.mask) else ["h"]


def pair_leading(ir: N.Attention) -> int:
    return len(_leading(ir))


def bind(ir: N.Attention, values: dict, kernel: str = "fwd") -> dict:
    """The launch's keyword arguments, checked against the ABI: every argument present, nothing
    else, ints for ints and constexprs never None."""
    args = kernel_args(ir, kernel)
    missing = [a for a in args if a.name not in values]
    if missing:
        raise AbiError("the launcher gives no value for kernel argument(s) " +
                       ", ".join(f"{a.name} ({a.kind}: {a.source})" for a in missing))
    known = {a.name for a in args}
    extra = sorted(set(values) - known)
    if extra:
        raise AbiError(f"the launcher passes argument(s) the kernel does not take: {', '.join(extra)}")
    for a in args:
        v = values[a.name]
        if a.kind == INT and not isinstance(v, int):
            raise AbiError(f"kernel argument {a.name} ({a.source}) must be an int, got {type(v).__name__}")
        if a.kind == FLOAT and not isinstance(v, float):
            raise AbiError(f"kernel argument {a.name} ({a.source}) must be a float, got {type(v).__name__}")
        if a.kind == PTR and not hasattr(v, "data_ptr"):
            raise AbiError(f"kernel argument {a.name} ({a.source}) must be a tensor, got {type(v).__name__}")
    return {a.name: values[a.name] for a in args}
