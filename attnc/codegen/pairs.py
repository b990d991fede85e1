"""IR expressions -> Triton device functions of one (query tile, key tile) pair: the mask
(`visible`), the logit bias, and (through `produce`) values derived from them such as the bias's
gradient. Shared by the forward kernel (emit.py) and the backward kernels (emit_bwd.py).

Names in the source come from the IR's validated identifiers, never from raw spec text.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.bits import ilog2_code
from ..ir.printer import format_expr, format_space
from . import abi
from .parts import names as part_names, token_parts, window_range

_OPS = {"+": "+", "-": "-", "*": "*", "==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=",
        "and": "&", "or": "|", "&": "&", "|": "|", "^": "^"}

def int_params(ir: N.Attention) -> list[str]:
    """Kernel argument names carrying the integer parameters, in declaration order."""
    return [abi.param_name(p.name) for p in ir.params if p.type == N.INT]


class _Emitter:
    """Emits an expression as a list of assignments, sharing repeated subexpressions."""

    def __init__(self, ir: N.Attention, indent: str = "    ", key: str = "k", count: int = 0, qkey: str = "q"):
        self.ir = ir
        self.indent = indent
        self.key = key  # name prefix of key coordinates: 'k', or 'k0', 'k1', ... per segment
        self.qkey = qkey  # likewise for queries: 'q', or 'q0', 'q1', ... per query segment
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
        if isinstance(e, N.Batch):
            return "b"
        if isinstance(e, N.Lookup):
            n, offset, inside = self.lookup_offset(e)
            other = "0.0" if e.type == N.FLOAT else "0"
            # Padding rows and columns of a tile may index past the tensor: those loads are masked.
            # Offsets are int64 when INT64 is set (the launcher sets it for tables of 2**31 elements).
            return self.temp(f"tl.load({abi.table_name(n, 'ptr')} + {offset}, mask={inside}, other={other})  # {e.tensor}[...]")
        if isinstance(e, N.Coord):
            return f"{self.key if e.side == 'k' else self.qkey}_{e.axis}"
        if isinstance(e, N.Window):
            line = self.ir.line_of("mask")
            where = f" (spec line {line})" if line else ""
            self.lines.append(f"{self.indent}# {format_expr(e)}{where}: one range test (parts.window_range)")
            code, lo, length = (self.emit(x) for x in window_range(e))
            return self.temp(f"_in_range({code}, {lo}, {length}, INT64)")
        return self.temp(self.emit_inline(e))

    def lookup_offset(self, e: N.Lookup) -> tuple[int, str, str]:
        """(tensor number, element offset, in-bounds condition) of a runtime tensor read."""
        n = [t.name for t in self.ir.tensors].index(e.tensor)
        # A read whose indices are all the same for the whole tile (`slopes[head]`) is one scalar
        # load. In a read that mixes such indices with per-pair ones (`t[head, q.i - k.i]`), they
        # are broadcast to the tile first: Triton's interpreter mis-types a load mask that mixes
        # scalar and tile conditions.
        mixed = any(varies_per_pair(i) for i in e.indices)
        idx = []
        for i in e.indices:
            if varies_per_pair(i) or not mixed:
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

    def _joint_abs_tests(self, e: N.Expr) -> str | None:
        """`abs(x) <= c and abs(y) <= c and ...` (neighborhoods): the tests that share a c as one
        unsigned maximum and one comparison (helpers._abs_off): separate tests left LLVM a select
        per test per element. None when no two tests in the conjunction share a c."""
        parts = _conjuncts(e)
        groups: dict[int, list[N.Expr]] = {}
        for x in parts:
            c = self._abs_bound(x)
            if c is not None:
                groups.setdefault(c, []).append(x)
        if all(len(g) < 2 for g in groups.values()):
            return None
        out, done = [], set()
        for x in parts:
            c = self._abs_bound(x)
            if c is None or len(groups[c]) < 2:
                out.append(self.emit(x))
            elif c not in done:  # & of booleans: every conjunct is evaluated, so order is free
                done.add(c)
                joint = f"_abs_off({self.emit(groups[c][0].lhs.operand)}, {c}, INT64)"
                for y in groups[c][1:]:
                    joint = f"tl.maximum({joint}, _abs_off({self.emit(y.lhs.operand)}, {c}, INT64))"
                out.append(f"({joint} <= {2 * c})")
        return out[0] if len(out) == 1 else "(" + " & ".join(out) + ")"

    def _abs_bound(self, e: N.Expr) -> int | None:
        """abs_bound, unless `abs(x)` is a token part already (in the memo): its operand x may read
        coordinates nothing decodes, so the part's value is compared instead."""
        c = abs_bound(e)
        return None if c is None or e.lhs in self.memo else c

    def emit_inline(self, e: N.Expr) -> str:
        if isinstance(e, N.Binary) and e.op == "and":
            joint = self._joint_abs_tests(e)
            if joint is not None:
                return joint
        c = self._abs_bound(e)
        if c is not None:  # |x| <= c as one unsigned comparison (codegen/helpers._ABS_LE)
            return f"_abs_le({self.emit(e.lhs.operand)}, {c}, INT64)"
        x = power_of_two_test(e)
        if x is not None:  # x == 1 << ilog2(x): x a power of two, without the bit-length search
            v = self.emit(x)
            return f"(({v} > 0) & (({v} & ({v} - 1)) == 0))"
        if isinstance(e, N.Unary):
            x = self.emit(e.operand)
            if e.op == "ilog2":
                return ilog2_code(x, self.temp, "tl.where")
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
            if e.op in ("<<", ">>"):  # signed >> is arithmetic in Triton, as in Python
                lo, hi = N.SHIFT_LIMITS
                if not (isinstance(e.rhs, N.Const) and lo <= e.rhs.value <= hi):
                    # Counts out of range are errors where live; elsewhere clamp them, so that no
                    # lane shifts by its width or more (undefined in LLVM).
                    b = f"tl.minimum(tl.maximum({b}, {lo}), {hi})"
                return f"({a} {e.op} {b})"
            return f"({a} {_OPS[e.op]} {b})"
        if isinstance(e, N.Call):
            return f"tl.{e.fn}(({self.emit(e.args[0])}) * 1.0)"
        return self.emit(e)


def _conjuncts(e: N.Expr) -> list[N.Expr]:
    if isinstance(e, N.Binary) and e.op == "and":
        return _conjuncts(e.lhs) + _conjuncts(e.rhs)
    return [e]


def abs_bound(e: N.Expr) -> int | None:
    """c when e is `abs(x) <= c` or `abs(x) < c + 1` for an integer x and a constant c >= 0."""
    if isinstance(e, N.Binary) and e.op in ("<=", "<") and isinstance(e.lhs, N.Unary) and e.lhs.op == "abs" \
            and e.lhs.type == N.INT and isinstance(e.rhs, N.Const) and isinstance(e.rhs.value, int) \
            and not isinstance(e.rhs.value, bool):
        c = e.rhs.value - (e.op == "<")
        return c if 0 <= c < 2**30 else None
    return None


def power_of_two_test(e: N.Expr) -> N.Expr | None:
    """x when e is `x == 1 << ilog2(x)` (either side): true iff x is a power of two (x <= 0 has
    ilog2 0 in the kernels, and 1 != x there), which `x > 0 and x & (x - 1) == 0` says in four
    instructions where ilog2's search takes two dozen."""
    if not (isinstance(e, N.Binary) and e.op == "=="):
        return None
    for x, p in ((e.lhs, e.rhs), (e.rhs, e.lhs)):
        if isinstance(p, N.Binary) and p.op == "<<" and p.lhs == N.Const(1) and isinstance(p.rhs, N.Unary) \
                and p.rhs.op == "ilog2" and p.rhs.operand == x:
            return x
    return None


def varies_per_pair(e: N.Expr) -> bool:
    return any(isinstance(x, (N.Coord, N.Window)) for x in N.walk(e))


def _nonneg(e: N.Expr) -> bool:
    if isinstance(e, N.Const):
        return e.value >= 0
    if isinstance(e, (N.Coord, N.HeadDim)):
        return True
    if isinstance(e, N.Unary):
        return e.op in ("abs", "ilog2")  # the emitted ilog2 is >= 0 everywhere
    if isinstance(e, N.Binary):
        if e.op in ("+", "*", "min", "|", "^"):
            return _nonneg(e.lhs) and _nonneg(e.rhs)
        if e.op in ("<<", ">>"):
            return _nonneg(e.lhs)
        if e.op == "&":
            return _nonneg(e.lhs) or _nonneg(e.rhs)
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


def _coords_used(e: N.Expr, known: dict) -> set[tuple[str, str]]:
    """Coordinates read outside the token parts in `known` (those arrive computed)."""
    out, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x in known:
            continue
        if isinstance(x, N.Coord):
            out.add((x.side, x.axis))
        stack.extend(window_range(x) if isinstance(x, N.Window) else N.children(x))
    return out


def _enter_segment(what: str, name: str, space, prefix: str, flat: str, inside: str, bound) -> list[str]:
    """A token's index within its segment (`{prefix}_i`) and whether it lies there (`inside`)."""
    offset, size = bound
    return [f"    # {what} {name}: {format_space(space)}",
            f"    {prefix}_i = {flat}" + ("" if offset == "0" else f" - {offset}"),
            f"    {inside} = ({prefix}_i >= 0) & ({prefix}_i < {size})"]


def pair_call(ir: N.Attention) -> str:
    """The arguments a kernel passes to a per-pair function (q_i, k_i, the head, kernel
    arguments, then the token parts loaded for the tile: parts.load_lines)."""
    return ", ".join(["q_i", "k_i"] + abi.pair_call_args(ir) + part_names(ir))


def emit_pair_function(ir: N.Attention, name: str, expr: N.Expr, doc: str, produce=None,
                       emitter=None) -> list[str]:
    """A @triton.jit function of one (query, key) tile pair ([M, 1] and [1, N] flat indices):
    the mask (`visible`), the logit bias, or (with `produce`, which returns the codes of several
    outputs from an emitter and the expression) values derived from the bias, such as its
    gradient. On a segmented key (query) space each segment gets its own decoded coordinates and
    its specialised expression, selected by the key's (query's) flat index; with both segmented,
    each (query segment, key segment) combination gets its own."""
    emitter = emitter or _Emitter
    head = [
        "@triton.jit",
        f"def {name}({', '.join(['q_i', 'k_i'] + abi.pair_params(ir) + part_names(ir))}):",
        f'    """{doc} = {format_expr(expr)}',
        "",
        f"    spec line {ir.line_of('mask' if expr is ir.mask else 'bias') or '-'}; "
        f"q = {format_space(ir.q)}, kv = {format_space(ir.kv)}.",
        '    """',
        "    if INT64:  # widen every integer input, so that no intermediate can wrap",
        *(f"        {a} = tl.cast({a}, tl.int64)" for a in abi.pair_call_args(ir)[:abi.pair_leading(ir)] + int_params(ir) + ["head_dim"]),
    ]
    is_bool = expr.type == N.BOOL and produce is None
    if isinstance(expr, N.Const) and is_bool:
        # Constant masks still return a tile so callers can combine it with bounds checks.
        return head + [f"    return k_i {'>=' if expr.value else '<'} 0"]
    produce = produce or (lambda em, sub: [em.emit(sub)])
    top = emitter(ir)
    every = token_parts(ir)
    q_parts, parts = N.parts(ir.q), N.parts(ir.kv)
    # Segment bounds first, so every combination shares them: queries by q_i, keys by k_i.
    bounds = {side: [(top.emit(o), top.emit(sp.size())) for o, (_, sp) in zip(space.offsets(), N.parts(space))]
              for side, space in (("q", ir.q), ("k", ir.kv)) if isinstance(space, N.Segments)}
    body: list[str] = []
    results = []  # ((query segment number, key segment number), output codes)
    count = top.count
    uses_tile0 = False
    for a, (q_seg, q_space) in enumerate(q_parts):
        q_sub = N.specialise(expr, None, q_seg)
        qkey = "q" if q_seg is None else f"q{a}"
        qem = emitter(ir, count=count, qkey=qkey)
        qem.memo = dict(top.memo)
        qem.memo.update({p.expr: p.name for p in every if p.side == "q" and p.segment == q_seg})
        if q_seg is not None:
            qem.lines += _enter_segment("query segment", q_seg, q_space, qkey, "q_i", f"inq{a}", bounds["q"][a])
        q_used = {x for s_, x in _coords_used(q_sub, qem.memo) if s_ == "q"}
        qem.lines += _decode(q_space, qkey, q_used, qem)
        body += qem.lines
        count = qem.count
        for j, (seg, space) in enumerate(parts):
            sub = N.specialise(q_sub, seg)
            key = "k" if seg is None else f"k{j}"
            em = emitter(ir, key=key, count=count, qkey=qkey)
            em.memo = dict(qem.memo)
            em.memo.update({p.expr: p.name for p in every if p.side == "k" and p.segment == seg})
            if seg is not None:
                em.lines += _enter_segment("segment", seg, space, key, "k_i", f"in{j}", bounds["k"][j])
            em.lines += _decode(space, key, {x for s_, x in _coords_used(sub, em.memo) if s_ == "k"}, em)
            results.append(((a, j), produce(em, sub)))
            body += em.lines
            count = em.count
            uses_tile0 = uses_tile0 or em.uses_tile0
    sizes = top.lines + (["    tile0 = (q_i + k_i) * 0  # broadcasts tile-invariant indices"] if uses_tile0 else [])

    def where(a: int, j: int) -> str:
        return " & ".join(([f"inq{a}"] if len(q_parts) > 1 else []) + ([f"in{j}"] if len(parts) > 1 else []))

    outputs = []
    for o in range(len(results[0][1])):
        if len(results) == 1:
            result = results[0][1][o]
        elif is_bool:
            result = " | ".join((f"({where(a, j)})" if " & " in where(a, j) else where(a, j)) if r[o] == "True"
                                else f"({where(a, j)} & {r[o]})"
                                for (a, j), r in results if r[o] != "False")
            result = result or "k_i < 0"
        else:
            result = "0.0"
            for (a, j), r in reversed(results):
                result = f"tl.where({where(a, j)}, {r[o]}, {result})"
        outputs.append(result)
    return head + sizes + body + [f"    return {', '.join(outputs)}"]


def emit_visible(ir: N.Attention) -> list[str]:
    """The mask as a @triton.jit predicate over flat q/k indices ([M, 1] and [1, N] tiles)."""
    return emit_pair_function(ir, "visible", ir.mask, "mask")
