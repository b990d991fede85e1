"""Token layouts: the order in which a kernel visits query and key tokens, and how it is chosen.

A layout holds, for each of q and kv, a permutation from kernel position to row-major token:
kernel position p holds token `order[p]`. Tile analysis, schedules and row statistics are
expressed in kernel positions; kernels decode a token's coordinates through the order; the
runtime permutes q, k, v in and the outputs back out (nothing when the order is the identity).

Candidates (`candidates`) come from the token spaces and the mask (`hints`): box tilings whose
boxes fill a tile (shapes ranked by how many kv boxes a q box's windows reach, q and kv shapes may
differ, as NATTEN's 4x16 / 8x8), boxes aligned to the mask's own blocks (same_block, Swin's
shifted windows), Morton and Hilbert orders of the tokens, and dilation groups contiguous (window
dilations, MaxViT grids) with row-major order or tile boxes inside each group. Segmented key
spaces keep segments contiguous and order each one alone. The orders themselves are pure
functions in `orders.py` (which also orders boxes along the curves; with tile-sized boxes that
changes no tile count, so those are not candidates). A graph ordering (reverse Cuthill-McKee and
spectral orders of a coarse graph of 16-token blocks, networkx) was tried and dropped: it never
beat these orders, under the tile analysis or counted exactly.

Cost model (`cost`), in units of one FULL 64x64 tile at head dim 64 (tile costs scale with
BLOCK_M * BLOCK_N):
  cost = FULL + PARTIAL_COST * PARTIAL                       (tiles the schedule computes)
       + per permuted side: PERMUTE_FIXED + PERMUTE_PER_TOKEN * tokens
PARTIAL_COST = 1.5: a PARTIAL tile decodes coordinates and evaluates the predicate per element.
PERMUTE_PER_TOKEN = 0.06: permuting moves two token rows per token and side (q in and the output
back; k and v), 2 x 2 x 128 bytes at head dim 64 in fp16, about 0.17 ns at 3 TB/s, against about
3 ns for a 64x64x64 tile (two 0.5 MFLOP products at ~350 TFLOP/s). PERMUTE_FIXED = 128: two
gather launches per side (~8 us) shared by ~16 (batch, head) slices. These are estimates (no GPU
measured them yet); they decide only close calls, and small problems stay row-major.

`choose(bound, "auto", BLOCK_M, BLOCK_N, analyse)` analyses row-major and the candidates whose
permutation cost alone does not already exceed the best cost so far, and keeps the cheapest;
row-major wins ties, problems too small for any permutation to pay, and one-dimensional spaces
with no dilation or blocks in the mask (row-major is already the best 1-D order).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import AttncError
from ..ir import nodes as N
from ..ir.bind import Bound
from ..ir.evaluate import evaluate_uniform
from . import orders

AUTO = "auto"
ROW_MAJOR = "row_major"
FAMILIES = ("boxes", "morton", "hilbert", "dilation")
NAMES = (AUTO, ROW_MAJOR) + FAMILIES

PARTIAL_COST = 1.5
PERMUTE_PER_TOKEN = 0.06
PERMUTE_FIXED = 128.0
TILE_UNIT = 64 * 64


@dataclass(frozen=True, eq=False)
class Layout:
    name: str
    q_perm: np.ndarray = field(repr=False)  # int64 [Nq]: kernel position -> row-major token
    kv_perm: np.ndarray = field(repr=False)  # int64 [Nk]
    q_identity: bool = True
    kv_identity: bool = True
    # The cost-model figures of every candidate `choose` weighed (dicts: name, q, kv (the orders
    # in words), tiles, full, partial, pairs_computed, permute_cost, cost, skipped, chosen);
    # empty when none were weighed. `figures()` adds each one's tile efficiency.
    candidates: list = field(default_factory=list, repr=False)
    # Schedules already analysed under this layout: (id(bound), block_m, block_n) -> (bound, schedule).
    _analysed: dict = field(default_factory=dict, repr=False)

    @property
    def identity(self) -> bool:
        return self.q_identity and self.kv_identity

    @property
    def q_order(self):
        """int64 tensor: kernel position p holds row-major query token q_order[p]."""
        import torch

        return torch.from_numpy(self.q_perm)

    @property
    def kv_order(self):
        """int64 tensor: kernel position p holds row-major key token kv_order[p]."""
        import torch

        return torch.from_numpy(self.kv_perm)

    def figures(self) -> list[dict]:
        """`candidates`, each with its tile efficiency (visible pairs / computed pairs; None
        when it was not analysed). Visible pairs come from this layout's own schedule (its row
        counts, computed on the first call: work proportional to its PARTIAL tiles)."""
        if self.candidates and "efficiency" not in self.candidates[0]:
            schedules = [s for _, s in self._analysed.values()]
            visible = int(schedules[0].row_counts.sum()) if schedules else None
            for f in self.candidates:
                computed = f.get("pairs_computed")
                f["efficiency"] = None if visible is None or not computed else visible / computed
        return self.candidates

    def analysed(self, bound: Bound, block_m: int, block_n: int):
        """The schedule `choose` already analysed for this bound and these tiles, or None."""
        hit = self._analysed.get((id(bound), block_m, block_n))
        return hit[1] if hit is not None and hit[0] is bound else None

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, nq={len(self.q_perm)}, nk={len(self.kv_perm)})"


def from_orders(name: str, q_order, kv_order) -> Layout:
    """A layout from two explicit orders; each must be a permutation of its token range."""
    perms = []
    for side, order in (("q", q_order), ("kv", kv_order)):
        perm = np.asarray(order, dtype=np.int64).reshape(-1)
        if not orders.is_permutation(perm, len(perm)):
            raise AttncError(f"layout '{name}': the {side} order is not a permutation of 0..{len(perm) - 1}")
        perms.append(perm)
    q, kv = perms
    return Layout(name, q, kv, _is_identity(q), _is_identity(kv))


def row_major(nq: int, nk: int) -> Layout:
    return Layout(ROW_MAJOR, np.arange(nq, dtype=np.int64), np.arange(nk, dtype=np.int64))


def inverse(perm: np.ndarray) -> np.ndarray:
    out = np.empty_like(perm)
    out[perm] = np.arange(len(perm), dtype=perm.dtype)
    return out


def _is_identity(perm: np.ndarray) -> bool:
    return bool((perm == np.arange(len(perm))).all())


# -- recipes: how one side is ordered -----------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """One side's order: `kind` in orders.ORDERS, boxes of `box` (per axis, or None), box grid
    shifted by `offset`, inside dilation groups `dilation` (None: none)."""

    kind: str = "row_major"
    box: tuple[int, ...] | None = None
    offset: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None

    def perm(self, dims: tuple[int, ...]) -> np.ndarray:
        """The order of one space (a key segment of fewer axes takes the trailing entries)."""
        def fit(v):
            if v is None or len(v) == len(dims):
                return v
            return tuple(v[-len(dims):]) if len(v) > len(dims) else (1,) * (len(dims) - len(v)) + tuple(v)

        return orders.order(dims, self.kind, fit(self.box), fit(self.dilation), fit(self.offset))

    def describe(self) -> str:
        out = "row-major" if self.kind == "row_major" and self.box is None else self.kind
        if self.box is not None:
            out += (" of boxes " if self.kind in ("morton", "hilbert") else " ") + _shape(self.box)
        if self.offset and any(self.offset):
            out += f" shifted {_shape(self.offset)}"
        if self.dilation is not None:
            out = f"dilation groups {_shape(self.dilation)}, {out} inside"
        return out


def _shape(v) -> str:
    return "x".join(str(int(x)) for x in v)


def side_perm(recipe: Recipe, parts: list[tuple[int, ...]]) -> np.ndarray:
    """The order of a side made of `parts` (key segments stay contiguous, each ordered alone)."""
    out, offset = [], 0
    for dims in parts:
        out.append(recipe.perm(dims) + offset)
        offset += math.prod(dims)
    return np.concatenate(out) if len(out) > 1 else out[0]


# -- hints read from the mask --------------------------------------------------------------------
@dataclass
class Hints:
    """Per axis name: how far a query's keys reach below and above it (windows: (lo, hi) in
    tokens, and in group coordinates when dilated), dilation (or grid modulus), block (size,
    offset)."""

    reach: dict = field(default_factory=dict)
    group_reach: dict = field(default_factory=dict)
    dilation: dict = field(default_factory=dict)
    block: dict = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.reach or self.dilation or self.block)


_VARIES = (N.Coord, N.Lookup, N.Window, N.Head, N.NVisible, N.HeadDim, N.Member)


def _uniform(e: N.Expr, env) -> int | None:
    if any(isinstance(x, _VARIES) for x in N.walk(e)):
        return None
    try:
        v = evaluate_uniform(e, env)
    except (AttncError, ArithmeticError, ValueError, TypeError):
        return None
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def _affine(e: N.Expr, env) -> tuple[str, int] | None:
    """(axis, c) when e is a coordinate plus a constant (any side), else None."""
    if isinstance(e, N.Coord):
        return e.axis, 0
    if isinstance(e, N.Binary) and e.op in ("+", "-"):
        a = _affine(e.lhs, env)
        u = _uniform(e.rhs, env)
        if a is not None and u is not None:
            return a[0], a[1] + (u if e.op == "+" else -u)
        if e.op == "+":
            a, u = _affine(e.rhs, env), _uniform(e.lhs, env)
            if a is not None and u is not None:
                return a[0], a[1] + u
    return None


def hints(bound: Bound) -> Hints:
    env, out = bound.env, Hints()
    for x in N.walk(bound.ir.mask):
        if isinstance(x, N.Window):
            k, d, s = (_uniform(v, env) for v in (x.kernel, x.dilation, x.stride))
            if k is None or d is None or s is None or min(k, d, s) < 1:
                continue
            # NATTEN: keys [i - k // 2, i + (k - 1) // 2] in group coordinates around the leader
            # (within s of the query); causal: [i - k + 1, i].
            lo, hi = (k - 1, s - 1) if x.causal else (k // 2 + s // 2, (k - 1) // 2 + s // 2)
            for table, scale in ((out.reach, d), (out.group_reach, 1)):
                was = table.get(x.axis, (0, 0))
                table[x.axis] = (max(was[0], lo * scale), max(was[1], hi * scale))
            if d > 1:
                out.dilation[x.axis] = max(out.dilation.get(x.axis, 1), d)
        elif isinstance(x, N.Binary) and x.op in ("%", "//"):
            a, m = _affine(x.lhs, env), _uniform(x.rhs, env)
            if a is None or m is None or m < 2:
                continue
            if x.op == "%":
                out.dilation[a[0]] = max(out.dilation.get(a[0], 1), m)
            else:
                out.block[a[0]] = (m, a[1] % m)
                was = out.reach.get(a[0], (0, 0))
                out.reach[a[0]] = (max(was[0], m // 2), max(was[1], m // 2))
    return out


# -- candidates ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    name: str
    q: Recipe
    kv: Recipe

    @property
    def family(self) -> str:
        return self.name if self.name == ROW_MAJOR else self.name.split("_")[0]


def _tile_shapes(dims: tuple[int, ...], volume: int) -> list[tuple[int, ...]]:
    """Power-of-two box shapes of `volume` tokens (less when the space is smaller) that fit the
    space's bounding power-of-two grid."""
    caps = [1 << max(0, (d - 1).bit_length()) for d in dims]
    volume = min(volume, math.prod(caps))
    out = []
    for shape in itertools.product(*([1 << e for e in range(c.bit_length())] for c in caps)):
        if math.prod(shape) == volume:
            out.append(shape)
    return out


def _touched(q: int, k: int, lo: int, hi: int) -> float:
    """Mean number of kv boxes (of k, aligned at multiples of k) that the keys of a q box (of q,
    aligned at multiples of q) reach, keys reaching lo below and hi above each query."""
    period = math.lcm(q, k) // q
    return sum((a * q + q - 1 + hi) // k - (a * q - lo) // k + 1 for a in range(period)) / period


def _box_estimate(qs, ks, reach) -> float:
    """kv boxes a q box's keys touch, per axis independently (borders ignored)."""
    return math.prod(_touched(q, k, lo, hi) for q, k, (lo, hi) in zip(qs, ks, reach))


def _box_pairs(q_dims, kv_dims, bm, bn, reach, count=3):
    """The `count` most promising (q shape, kv shape) box pairs, plus the squarest pair."""
    qs_all, ks_all = _tile_shapes(q_dims, bm), _tile_shapes(kv_dims, bn)
    if not qs_all or not ks_all:
        return []
    square = lambda s: (max(s) / min(s), s)
    squarest = (min(qs_all, key=square), min(ks_all, key=square))
    if len(q_dims) != len(kv_dims):
        return [squarest]
    ranked = sorted(itertools.product(qs_all, ks_all),
                    key=lambda p: (_box_estimate(p[0], p[1], reach), square(p[0]), square(p[1])))
    out = ranked[:count]
    return out + ([squarest] if squarest not in out else [])


def _pair_name(prefix: str, qs, ks) -> str:
    return f"{prefix}_{_shape(qs)}" if qs == ks else f"{prefix}_{_shape(qs)}_{_shape(ks)}"


def candidates(bound: Bound, block_m: int = 64, block_n: int = 64) -> list[Candidate]:
    """Every candidate layout for this binding, row-major first (names are unique)."""
    if len(bound.q_parts) > 1:  # a segmented query space: tokens stay in row-major order
        return [Candidate(ROW_MAJOR, Recipe(), Recipe())]
    ir, h = bound.ir, hints(bound)
    q_axes, q_dims = ir.q.axes, bound.q_dims
    kv_axes = [p.space.axes for p in bound.kv_parts]
    kv_dims = bound.kv_parts[0].dims
    out = [Candidate(ROW_MAJOR, Recipe(), Recipe())]
    multi = max(len(q_dims), len(kv_dims)) > 1
    if multi:
        reach = [h.reach.get(a, (0, 0)) for a in q_axes]
        pairs = _box_pairs(q_dims, kv_dims, block_m, block_n, reach)
        for qs, ks in pairs:
            out.append(Candidate(_pair_name("boxes", qs, ks), Recipe("boxes", qs), Recipe("boxes", ks)))
        # Curves of tokens (on power-of-two grids their aligned runs are square boxes; elsewhere
        # they cut differently). Curves of tile-sized boxes have the boxes' tile counts (only the
        # order of the tiles changes), so the cost model never prefers them: not candidates.
        for kind in ("morton", "hilbert"):
            out.append(Candidate(kind, Recipe(kind), Recipe(kind)))
    # Boxes aligned to the mask's own blocks (same_block, Swin's shifted windows).
    if h.block and all(a in h.block for a in q_axes) and q_axes == kv_axes[0]:
        size = tuple(h.block[a][0] for a in q_axes)
        off = tuple(h.block[a][1] for a in q_axes)
        name = f"boxes_{_shape(size)}" + (f"_shift{_shape(off)}" if any(off) else "")
        if all(c.name != name for c in out):
            r = Recipe("boxes", size, off if any(off) else None)
            out.append(Candidate(name, r, r))
    # Dilation groups contiguous, row-major or tile boxes inside each group.
    dil = tuple(h.dilation.get(a, 1) for a in q_axes)
    if any(d > 1 for d in dil) and len(kv_axes) == 1 and kv_axes[0] == q_axes:
        r = Recipe("row_major", dilation=dil)
        out.append(Candidate("dilation", r, r))
        if multi:
            sub = lambda dims: tuple(-(-n // d) for n, d in zip(dims, dil))
            inner = [h.group_reach.get(a, (0, 0)) for a in q_axes]
            pairs = _box_pairs(sub(q_dims), sub(kv_dims), block_m, block_n, inner, count=1)
            for qs, ks in pairs:
                out.append(Candidate(_pair_name("dilation_boxes", qs, ks), Recipe("boxes", qs, dilation=dil),
                                     Recipe("boxes", ks, dilation=dil)))
    return out


def build_layout(bound: Bound, cand: Candidate) -> Layout:
    """The Layout of a candidate (its orders computed)."""
    if cand.name == ROW_MAJOR:
        return row_major(bound.nq, bound.nk)
    q = side_perm(cand.q, [bound.q_dims])
    kv = side_perm(cand.kv, [p.dims for p in bound.kv_parts])
    return Layout(cand.name, q, kv, _is_identity(q), _is_identity(kv))


# -- the cost model ------------------------------------------------------------------------------
def permute_cost(layout: Layout) -> float:
    cost = 0.0
    for identity, n in ((layout.q_identity, len(layout.q_perm)), (layout.kv_identity, len(layout.kv_perm))):
        if not identity:
            cost += PERMUTE_FIXED + PERMUTE_PER_TOKEN * n
    return cost


def tile_counts(schedule) -> tuple[int, int]:
    """(FULL, PARTIAL) tiles of a schedule."""
    if hasattr(schedule, "tiles_full"):
        return int(schedule.tiles_full), int(schedule.tiles_partial)
    st = schedule.stats()
    return int(st["tiles_full"]), int(st["tiles_partial"])


def cost(full: int, partial: int, block_m: int, block_n: int, layout: Layout) -> float:
    return (full + PARTIAL_COST * partial) * (block_m * block_n / TILE_UNIT) + permute_cost(layout)


def choose(bound: Bound, layout, block_m: int = 64, block_n: int = 64, analyse=None) -> Layout:
    """The layout asked for: "auto", a name (a family, or a candidate's full name), or an explicit
    Layout (checked against the sizes). `analyse(bound, block_m, block_n, layout)` is the tile
    analysis the cost model weighs; without it, "auto" is row-major and a family its first member."""
    if isinstance(layout, Layout):
        if len(layout.q_perm) != bound.nq or len(layout.kv_perm) != bound.nk:
            raise AttncError(f"layout '{layout.name}' orders {len(layout.q_perm)} queries and "
                             f"{len(layout.kv_perm)} keys; the spec has {bound.nq} and {bound.nk}")
        return layout
    if not isinstance(layout, str):
        raise AttncError(f"unknown layout {layout!r}; choose one of {', '.join(NAMES)}")
    if layout == ROW_MAJOR:
        return row_major(bound.nq, bound.nk)
    if layout == AUTO:
        return _auto(bound, block_m, block_n, analyse)
    cands = candidates(bound, block_m, block_n)
    pool = [c for c in cands if c.name == layout] or [c for c in cands if c.family == layout]
    if not pool:
        here = ", ".join(c.name for c in cands)
        if layout in FAMILIES:
            raise AttncError(f"layout '{layout}' does not apply to '{bound.ir.name}' with {bound.describe()}; "
                             f"its candidates are: {here}")
        raise AttncError(f"unknown layout {layout!r}; choose one of {', '.join(NAMES)} "
                         f"(or a candidate of this spec: {here})")
    if analyse is None or len(pool) == 1:
        return build_layout(bound, pool[0])
    return _weigh(bound, pool, block_m, block_n, analyse, prune=False)


def _auto(bound: Bound, block_m: int, block_n: int, analyse) -> Layout:
    plain = row_major(bound.nq, bound.nk)
    if analyse is None:
        return plain
    ndim = max(len(bound.q_dims), *(len(p.dims) for p in bound.kv_parts))
    if ndim == 1 and not hints(bound).any or len(bound.q_parts) > 1:
        return plain  # 1-D without dilation or blocks: row-major is already the best order
    # The cheapest permutation costs more than computing every tile PARTIAL in row-major order.
    tiles = math.ceil(bound.nq / block_m) * math.ceil(bound.nk / block_n)
    cheapest = PERMUTE_FIXED + PERMUTE_PER_TOKEN * min(bound.nq, bound.nk)
    if PARTIAL_COST * tiles * (block_m * block_n / TILE_UNIT) <= cheapest:
        return plain
    cands = candidates(bound, block_m, block_n)
    if len(cands) == 1:
        return plain
    return _weigh(bound, cands, block_m, block_n, analyse, prune=True)


def _weigh(bound: Bound, cands: list[Candidate], block_m: int, block_n: int, analyse, prune: bool) -> Layout:
    """Analyse each candidate (with prune, skipping those whose permutation alone costs at least
    the best so far) and return the cheapest, earlier ones winning ties, with every figure."""
    figures, best, best_cost = [], None, math.inf
    for cand in cands:
        lay = build_layout(bound, cand)
        pc = permute_cost(lay)
        fig = dict(name=cand.name, q=cand.q.describe(), kv=cand.kv.describe(), permute_cost=round(pc, 2))
        figures.append(fig)
        if prune and best is not None and (pc >= best_cost or lay.identity):  # identity: row-major again
            fig.update(skipped=True, cost=None)
            continue
        try:
            schedule = analyse(bound, block_m, block_n, lay)
        except AttncError:  # beyond the analysis limits under this order: not a candidate
            if cand is cands[-1] and best is None:
                raise
            fig.update(skipped=True, cost=None)
            continue
        lay._analysed[(id(bound), block_m, block_n)] = (bound, schedule)
        full, partial = tile_counts(schedule)
        c = cost(full, partial, block_m, block_n, lay)
        fig.update(skipped=False, tiles=full + partial, full=full, partial=partial,
                   pairs_computed=(full + partial) * block_m * block_n, cost=round(c, 2))
        if c < best_cost:
            best, best_cost = lay, c
    for fig in figures:
        fig["chosen"] = fig["name"] == best.name
    best.candidates[:] = figures
    return best
