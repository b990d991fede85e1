"""Routing on the Triton backend (BiFormer regions, MoBA blocks): the per-call selection of key
groups and the per-(batch, head) schedule the generated kernels run over.

docs/language.md "Routing" defines the rule; this is its production implementation, tested
against the reference's (backends/reference/routing.py) and against BiFormer's and MoBA's own
algorithms. Per call:

1. select: per (batch, query head, unit) the chosen groups, `sel [B, Hq, units, top]` (int32,
   -1 where fewer than `top` groups are candidates). Pooled means and scores are float64, as
   the reference's (its sums run in another order, so a near-tie within float64 rounding could
   resolve differently; exact ties cannot), summed in a fixed order (a gather and a sum, no
   atomics: the backward's recomputed selection is the forward's, also on a GPU); ties go to
   the lower group (a stable sort), `own = true` puts the unit's own group first.
2. schedule: the kv tiles that hold a chosen group of some unit of each q tile, intersected
   with the mask's own FULL and PARTIAL tiles: one CSR per (batch * head, q tile) for the
   forward and dQ kernels, and per (batch * kv head, kv tile) for dK/dV (the union over the
   query heads of the group). The kernels then test that the key's group is one of the row's
   unit's choices: per row on the forward's and dQ's FULL tiles whose keys are of one group
   (`one_group_tiles`: MoBA's blocks of a multiple of the tile), per element on the others (the
   MIXED lists, the PARTIAL tiles, and dK/dV; codegen/helpers.py `_chosen_row`, `_chosen`).

The selection is not differentiated (as in BiFormer and MoBA); gradients flow through the
attention over the chosen keys. The backward recomputes the selection from the same q and k
(deterministic), so nothing is saved between the passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...analysis.tiles import Schedule
from ...ir.evaluate import decode, evaluate_uniform, mask_block
from ...pipeline import Compiled

FULL, PARTIAL = 2, 1


@dataclass(frozen=True)
class Plan:
    """What routing needs that depends on the binding (and, for masks reading runtime tensors,
    on the call's data), all by kernel position."""

    unit: np.ndarray  # [Nq] routing unit of the query at each position
    group: np.ndarray  # [Nk] group of the key at each position
    own: np.ndarray  # [units] the group of each unit's own position
    n_units: int
    n_groups: int
    top: int
    own_first: bool  # `own = true`
    unit_members: np.ndarray  # [units, longest] positions of each unit's queries (len(unit): padding)
    group_members: np.ndarray  # [groups, longest] positions of each group's keys (len(group): padding)
    cand: np.ndarray  # bool [units, groups]: the mask lets some query of the unit see the group


def groups_of(c: Compiled) -> tuple[np.ndarray, int]:
    """Group of every row-major token (q and kv share one space) and the number of groups."""
    bound = c.bound
    route = bound.ir.route
    sizes = [int(evaluate_uniform(s, bound.env)) for s in route.sizes]
    counts = [math.ceil(d / s) for d, s in zip(bound.q_dims, sizes)]
    coords = decode(bound.q_dims, bound.ir.q.axes, np.arange(bound.nq))
    group = np.zeros(bound.nq, dtype=np.int64)
    for axis, s, n in zip(bound.ir.q.axes, sizes, counts):
        group = group * n + coords[axis] // s
    return group, math.prod(counts)


def plan(c: Compiled, s: Schedule, tensors: dict | None = None) -> Plan:
    """The routing plan under schedule `s` (the compiled one, or the call's for runtime data)."""
    bound, lay = c.bound, c.layout
    route = bound.ir.route
    group_tok, n_groups = groups_of(c)
    q_tok, k_tok = np.asarray(lay.q_perm, np.int64), np.asarray(lay.kv_perm, np.int64)
    group = group_tok[k_tok]
    if route.query == "mean":
        unit, n_units, own = group_tok[q_tok], n_groups, np.arange(n_groups)
    else:
        unit, n_units, own = q_tok, bound.nq, group_tok
    return Plan(unit, group, own, n_units, n_groups, int(evaluate_uniform(route.top, bound.env)), route.own,
                _members(unit, n_units), _members(group, n_groups),
                _candidates(c, s, unit, group, n_units, n_groups, tensors))


def _members(ids: np.ndarray, n: int) -> np.ndarray:
    """[n, longest] positions holding each id, ascending, padded with len(ids) (a zero row)."""
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((n, max(1, int(counts.max(initial=0)))), len(ids), np.int64)
    slot = np.arange(len(ids)) - np.repeat(starts, counts)
    out[ids[order], slot] = order
    return out


def _candidates(c: Compiled, s: Schedule, unit, group, n_units: int, n_groups: int, tensors) -> np.ndarray:
    """cand[u, g]: some query of unit u sees some key of group g under the mask. FULL tiles
    contribute every (unit, group) pair they hold, through per-tile sets; PARTIAL tiles are
    evaluated pair by pair (only they are: no N^2 pass)."""
    bm, bn = s.block_m, s.block_n
    cls = s.classes
    lay = c.layout
    qt_of, kt_of = np.arange(len(unit)) // bm, np.arange(len(group)) // bn
    tile_groups = np.zeros((s.kv_tiles, n_groups), bool)
    tile_groups[kt_of, group] = True
    full_groups = (cls == FULL).astype(np.float32) @ tile_groups.astype(np.float32) > 0  # [q tiles, groups]
    cand = np.zeros((n_units, n_groups), bool)
    pu, pq = np.unique(np.stack([unit, qt_of]), axis=1)  # (unit, q tile) pairs, by unit
    starts = np.flatnonzero(np.r_[True, pu[1:] != pu[:-1]])
    cand[pu[starts]] = np.logical_or.reduceat(full_groups[pq], starts, axis=0)
    q_tok, k_tok = np.asarray(lay.q_perm, np.int64), np.asarray(lay.kv_perm, np.int64)
    for qt, kt in zip(*np.nonzero(cls == PARTIAL)):
        rows, cols = slice(qt * bm, (qt + 1) * bm), slice(kt * bn, (kt + 1) * bn)
        seen = mask_block(c.bound, q_tok[rows], k_tok[cols], tensors, what="the routing candidates")
        r, k = np.nonzero(seen)
        cand[unit[rows][r], group[cols][k]] = True
    return cand


def select(p: Plan, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sel int32 [B, Hq, units, top]: each unit's chosen groups in choice order, -1 past the
    candidates (q, k in kernel order)."""
    device = q.device
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]

    def means(x, members):  # [B, H, N, D] -> [B, H, n, D], float64, summed in a fixed order
        padded = torch.cat([x.to(torch.float64), x.new_zeros((B, x.shape[1], 1, D), dtype=torch.float64)], 2)
        idx = torch.from_numpy(members).to(device)
        count = (idx < x.shape[2]).sum(1).clamp(min=1).to(torch.float64)
        return padded[:, :, idx.reshape(-1)].view(B, x.shape[1], *idx.shape, D).sum(3) / count[:, None]

    k_mean = means(k, p.group_members)
    if Hq != Hkv:
        k_mean = k_mean.repeat_interleave(Hq // Hkv, dim=1)
    scores = means(q, p.unit_members) @ k_mean.transpose(-1, -2)  # [B, Hq, units, groups]
    cand = torch.from_numpy(p.cand).to(device)
    scores = scores.masked_fill(~cand, float("-inf"))
    if p.own_first:
        own = torch.nn.functional.one_hot(torch.from_numpy(p.own).to(device), p.n_groups).bool() & cand
        scores = scores.masked_fill(own, float("inf"))
    top = min(p.top, p.n_groups)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top]
    taken = cand.expand(B, Hq, -1, -1).gather(-1, order)
    sel = torch.where(taken, order, -1).to(torch.int32)
    if top < p.top:  # fewer groups than places
        sel = torch.cat([sel, sel.new_full((*sel.shape[:-1], p.top - top), -1)], -1)
    return sel.contiguous()


def launch_values(p: Plan, sel: torch.Tensor, s: Schedule, kv_heads: int) -> dict:
    """The routed kernels' schedule and routing arguments: per-(batch * head, q tile) CSR lists
    of FULL kv tiles of one routing group (FULL_*), of several (MIXED_*) and of PARTIAL kv tiles
    (PART_*), per-(batch * kv head, kv tile) lists of q tiles for dK/dV (*_T_*), and the
    selection itself."""
    device = sel.device
    B, Hq, _, top = sel.shape
    qt, kt = s.q_tiles, s.kv_tiles
    # chosen[bh, q tile, group]: some unit of the q tile chose the group.
    pairs = np.unique(np.stack([p.unit, np.arange(len(p.unit)) // s.block_m]), axis=1)  # (unit, q tile)
    pu, pq = (torch.from_numpy(x).to(device) for x in pairs)
    g = sel.view(B * Hq, p.n_units, top)[:, pu, :].long()  # [BH, pairs, top]
    flat = torch.where(g >= 0, pq[None, :, None] * p.n_groups + g, qt * p.n_groups)
    chosen = torch.zeros((B * Hq, qt * p.n_groups + 1), dtype=torch.float32, device=device)
    chosen.scatter_(1, flat.reshape(B * Hq, -1), 1.0)
    chosen = chosen[:, :-1].view(B * Hq, qt, p.n_groups)
    tile_groups = torch.zeros((p.n_groups, kt), dtype=torch.float32, device=device)
    tile_groups[torch.from_numpy(p.group).to(device), torch.arange(len(p.group), device=device) // s.block_n] = 1.0
    tiles = (chosen @ tile_groups) > 0  # [BH, q tiles, kv tiles]
    cls = torch.from_numpy(np.ascontiguousarray(s.classes)).to(device)
    per_kv = tiles.view(B, kv_heads, Hq // kv_heads, qt, kt).any(2).transpose(-1, -2)  # [B Hkv, kv, q]
    out = {"ROUTE_UNIT": _i32(p.unit, device), "ROUTE_GROUP": _i32(p.group, device), "ROUTE_SEL": sel,
           "n_units": p.n_units, "ROUTE_K": p.top}
    one = torch.from_numpy(one_group_tiles(p.group, s.block_n, kt)).to(device)  # [kv tiles]
    lists = {"": (("FULL", (cls == FULL) & one), ("MIXED", (cls == FULL) & ~one), ("PART", cls == PARTIAL)),
             "_T": (("FULL", cls.T == FULL), ("PART", cls.T == PARTIAL))}
    for name, grid in (("", tiles), ("_T", per_kv.reshape(B * kv_heads, kt, qt))):
        for kind, chosen_class in lists[name]:
            keep = (grid & chosen_class).reshape(-1, grid.shape[-1])
            ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=device)
            ptr[1:] = torch.cumsum(keep.sum(1), 0)
            idx = keep.nonzero()[:, 1].to(torch.int32)
            out[f"{kind}{name}_PTR"] = ptr
            out[f"{kind}{name}_IDX"] = idx if idx.numel() else ptr.new_zeros(1)
    return out


def visible_counts(c: Compiled, s: Schedule, p: Plan, tensors: dict | None = None) -> np.ndarray:
    """int64 [Nq, groups]: how many keys of each group each query (kernel position) sees under
    the mask; `n_visible` under routing sums them over the groups chosen for the query's unit
    (routed_counts). FULL tiles add their groups' sizes, PARTIAL tiles are evaluated pair by pair
    (as _candidates: no N^2 pass)."""
    bm, bn = s.block_m, s.block_n
    cls = s.classes
    tile_counts = np.zeros((s.kv_tiles, p.n_groups), np.int64)
    np.add.at(tile_counts, (np.arange(len(p.group)) // bn, p.group), 1)
    vis = ((cls == FULL).astype(np.int64) @ tile_counts)[np.arange(len(p.unit)) // bm]
    q_tok, k_tok = np.asarray(c.layout.q_perm, np.int64), np.asarray(c.layout.kv_perm, np.int64)
    for qt, kt in zip(*np.nonzero(cls == PARTIAL)):
        rows, cols = slice(qt * bm, (qt + 1) * bm), slice(kt * bn, (kt + 1) * bn)
        seen = mask_block(c.bound, q_tok[rows], k_tok[cols], tensors, what="n_visible under routing")
        onehot = np.zeros((seen.shape[1], p.n_groups), np.int64)
        onehot[np.arange(seen.shape[1]), p.group[cols]] = 1
        vis[rows] += seen.astype(np.int64) @ onehot
    return vis


def routed_counts(vis: np.ndarray, p: Plan, sel: torch.Tensor) -> np.ndarray:
    """int64 [B, Hq, Nq]: n_visible of every row under this call's selection (kernel positions)."""
    chosen = sel.cpu().numpy().astype(np.int64)[:, :, p.unit, :]  # [B, Hq, Nq, top]
    counts = vis[np.arange(len(p.unit))[:, None], np.maximum(chosen, 0)]
    return np.where(chosen >= 0, counts, 0).sum(-1)


def one_group_tiles(group: np.ndarray, block_n: int, kv_tiles: int) -> np.ndarray:
    """bool [kv tiles]: every key of the tile is in one group (MoBA's blocks of a multiple of the
    tile; a tile running past the last key is not). The forward and dQ test the routing of such
    FULL tiles per row (FULL lists), of the others per element (MIXED lists)."""
    padded = np.full(kv_tiles * block_n, -1, np.int64)
    padded[:len(group)] = group
    tiles = padded.reshape(kv_tiles, block_n)
    return (tiles.min(1) == tiles.max(1)) & (tiles.min(1) >= 0)


def _i32(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
