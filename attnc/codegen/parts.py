"""Token parts: the sub-expressions of the mask and the bias that read one side's coordinates
only (a query's window start, a key's grid row, `(k.y + 3) // 7`), computed once per token on
the host and read by the kernels as per-row ([BLOCK_M, 1]) and per-column ([1, BLOCK_N])
vectors, so that a tile pays per pair only for what truly mixes the two sides.

Without them, every key tile would decode its keys' coordinates with runtime divisors and
recompute each window bound: integer divisions, dozens of instructions each, per element of
the tile and per iteration (docs/analysis.md, "Kernel cost"). A part is an integer expression
of parameters and one side's coordinates; it never reads a runtime tensor, the head, the batch
index or head_dim (those change per call), and a bare flat index (`q.i`, the kernel's q_i) is not one.
Key parts belong to a key segment, and query parts to a query segment: they are the segment's
own specialised expressions, read only where the token lies in that segment.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..ir import nodes as N
from ..ir.printer import format_expr


@dataclass(frozen=True)
class Part:
    side: str  # 'q' or 'k'
    segment: str | None  # the segment (of its side) whose expressions hold it (None: an unsegmented side)
    expr: N.Expr
    index: int  # row of ROW_PARTS ('q') or COL_PARTS ('k')

    @property
    def name(self) -> str:
        return f"{self.side}p{self.index}"


def _side_of(e: N.Expr) -> str | None:
    """'q' or 'k' when `e` is an integer expression of that side's coordinates and parameters."""
    if e.type != N.INT or (isinstance(e, N.Coord) and e.axis == "i"):
        return None
    sides = set()
    for x in N.walk(e, expand_windows=True):
        if isinstance(x, (N.Lookup, N.Head, N.Batch, N.HeadDim, N.NVisible, N.Member)):
            return None
        if isinstance(x, N.Coord):
            sides.add(x.side)
    return sides.pop() if len(sides) == 1 else None


def _collect(e: N.Expr, found: list[tuple[str, N.Expr]]) -> None:
    """The maximal one-sided sub-expressions of e, in first-use order (Windows expanded)."""
    side = _side_of(e)
    if side is not None:
        if (side, e) not in found:
            found.append((side, e))
        return
    for child in window_range(e) if isinstance(e, N.Window) else N.children(e):
        _collect(child, found)


def window_range(w: N.Window) -> tuple[N.Expr, N.Expr, N.Expr]:
    """(code, lo, length) with w <=> 0 <= code - lo < length: the key's dilation group and
    group coordinate folded into one number, code = (j % d) m + j // d with m = ceil(n / d) (no
    group is longer), and the query's neighborhood [start, end) in its group g shifted to
    g m + start. Keys of another group land outside, since every group keeps k <= n_g <= m keys
    and start <= n_g - k (so one range test replaces the group equality and two comparisons:
    docs/kernels.md). lo and length read q only, code reads k only: all three are token parts."""
    j, d = N.Coord("k", w.axis), w.dilation
    group, start, end = w.bounds()
    m = (w.length + d - N.Const(1)) // d
    return (j % d) * m + j // d, group * m + start, end - start


def pair_exprs(ir: N.Attention) -> list[N.Expr]:
    """What the per-pair functions compute: the mask, and the logit bias when there is one."""
    return [ir.mask] + ([ir.score.logit_bias] if ir.score.logit_bias is not None else [])


@functools.lru_cache(maxsize=256)
def token_parts(ir: N.Attention) -> tuple[Part, ...]:
    """Every part of the mask and the logit bias (IR only: the kernel source depends on nothing
    else). Query parts of a query segment are shared by all key segments, and key parts of a
    key segment by all query segments."""
    exprs = pair_exprs(ir)
    out: list[Part] = []
    for q_seg, _ in N.parts(ir.q):
        for seg, _ in N.parts(ir.kv):
            found: list[tuple[str, N.Expr]] = []
            for e in exprs:
                _collect(N.specialise(e, seg, q_seg), found)
            for side, e in found:
                key = q_seg if side == "q" else seg
                if not any(p.side == side and p.segment == key and p.expr == e for p in out):
                    out.append(Part(side, key, e, sum(p.side == side for p in out)))
    return tuple(out)


# Key parts past the last key read this where one of them bounds the mask (`bounding_part`): a
# window test `code - lo < length` (unsigned) fails there, since with 0 <= lo, lo + length <= 2**31
# the difference, wrapped or not, is at least 2**30 + length as an unsigned number.
SENTINEL = -(2**30)


def _conjuncts(e: N.Expr) -> list[N.Expr]:
    if isinstance(e, N.Binary) and e.op == "and":
        return _conjuncts(e.lhs) + _conjuncts(e.rhs)
    return [e]


@functools.lru_cache(maxsize=256)
def bounding_part(ir: N.Attention) -> Part | None:
    """A key part that no key past the last one passes: the code of a window test that the
    mask requires (a conjunct at its top level), loaded as SENTINEL there, so that PARTIAL
    tiles need no separate key bounds test. Not on segmented spaces (parts per segment)."""
    if isinstance(ir.q, N.Segments) or isinstance(ir.kv, N.Segments):
        return None
    codes = [window_range(c)[0] for c in _conjuncts(ir.mask) if isinstance(c, N.Window)]
    return next((p for p in token_parts(ir) if p.side == "k" and p.expr in codes), None)


def names(ir: N.Attention) -> list[str]:
    """The parts' names, as the per-pair functions take them after the kernel arguments."""
    every = token_parts(ir)
    return [p.name for p in every if p.side == "q"] + [p.name for p in every if p.side == "k"]


def load_lines(ir: N.Attention, side: str, indent: str) -> list[str]:
    """Load this side's parts for the tile at offs_m (q) or offs_n (k): kernel positions, where
    the host wrote each part's value (int32, widened under INT64). The row offset is int64: the
    parts of a huge space may reach past 2**31 elements together."""
    ptr, offs, n, shape = ("ROW_PARTS", "offs_m", "Nq", "[:, None]") if side == "q" else \
        ("COL_PARTS", "offs_n", "Nk", "[None, :]")
    lines = []
    bound = bounding_part(ir)
    for p in token_parts(ir):
        if p.side == side:
            other = SENTINEL if p == bound else 0
            what = format_expr(p.expr)
            where = f" ({'queries' if side == 'q' else 'keys'} in {p.segment})" if p.segment else ""
            lines += [f"{indent}# {p.name} = {what if len(what) <= 80 else what[:77] + '...'}{where}",
                      f"{indent}{p.name} = tl.load({ptr} + tl.cast({n}, tl.int64) * {p.index} + {offs}, "
                      f"mask={offs} < {n}, other={other}){shape}",
                      f"{indent}if INT64:",
                      f"{indent}    {p.name} = {p.name}.to(tl.int64)"]
    return lines
