"""Host-side preparation for the generated kernels, built from the IR and the schedule: device
copies of the schedule and the layout, per-row score scale and bias, runtime tensor arguments,
sink logits, and, when the mask reads runtime data, the per-call schedule and row counts.

Everything here is indexed by kernel position (see analysis/layout.py).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from ...analysis.data import data_schedule
from ...analysis.layout import inverse
from ...analysis.tiles import Schedule
from ...codegen.parts import token_parts
from ...errors import AttncError
from ...ir.evaluate import decode, evaluate, per_row, reads_tensors
from ...ir.scores import base2_logits, row_scores, score_reads_n_visible
from ...pipeline import Compiled

LOG2E = 1.4426950408889634


class HostState:
    """Per-callable host state, cached per device (and head dim). Safe to share across threads:
    every cache entry is computed fully before it is published under the lock."""

    def __init__(self, compiled: Compiled):
        self.c = compiled
        self._lock = threading.Lock()
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._orders: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._transposed: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._scores: dict[tuple[int, torch.device, bool], tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self._parts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._route_plan = None
        self._visible: dict = {}  # routing.visible_counts of the compiled plan
        self._heads: dict[tuple, dict[str, torch.Tensor]] = {}

    def _cached(self, cache: dict, key, make):
        with self._lock:
            hit = cache.get(key)
        if hit is None:
            hit = make()
            with self._lock:
                hit = cache.setdefault(key, hit)
        return hit

    def schedule(self, ints: dict[str, np.ndarray]) -> Schedule:
        """The schedule of this call: the compiled one, or, when the mask reads runtime tensors,
        the one classified with their data (analysis/data.py)."""
        s = self.c.schedule
        # A mask that reads `head` keeps the compiled schedule for its sizes: its tiles come per
        # (batch, head) row from head_tables.
        return s if s.exact or per_row(self.c.spec.ir.mask) else data_schedule(s, ints)

    def tables(self, device: torch.device, schedule: Schedule) -> tuple[torch.Tensor, ...]:
        """The schedule's CSR lists on `device` (int32): cached for the compiled schedule, made
        per call for a per-call one."""
        def make():
            s = schedule
            return _on_device((s.full_ptr, s.full_idx, s.part_ptr, s.part_idx), device)

        if schedule is not self.c.schedule:
            return make()
        return self._cached(self._tables, device, make)

    def head_tables(self, ints: dict[str, np.ndarray], batch: int, heads: int, kv_heads: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
        """Masks that read `head`: the per-(batch * head) schedule (analysis/rows.py) on `device`,
        cached per shape when the mask reads no runtime tensor, made per call otherwise."""
        from ...analysis.rows import head_tables

        def make():
            tables = head_tables(self.c.schedule, ints, batch, heads, kv_heads)
            return dict(zip(tables, _on_device(tables.values(), device)))

        if reads_tensors(self.c.spec.ir.mask):
            return make()
        return self._cached(self._heads, (batch, heads, kv_heads, device), make)

    def orders(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The layout's q and kv orders and their inverses on `device` (int32), once."""
        lay = self.c.layout
        return self._cached(self._orders, device, lambda: _on_device(
            (lay.q_perm, lay.kv_perm, inverse(lay.q_perm), inverse(lay.kv_perm)), device))

    def route(self, schedule: Schedule, tensors: dict, q: torch.Tensor, k: torch.Tensor
              ) -> tuple[dict, np.ndarray | None]:
        """Routed specs: this call's selection and schedule (backends/triton/routing.py) as launch
        values, and, when the score reads n_visible, every row's count of the chosen keys it sees
        [B, Hq, Nq] (for row_scores; else None). The plan (groups, candidates) is computed once,
        or per call under runtime data."""
        from . import routing

        if schedule is self.c.schedule:
            with self._lock:
                plan = self._route_plan
            if plan is None:
                plan = routing.plan(self.c, schedule)
                with self._lock:
                    self._route_plan = plan
        else:
            plan = routing.plan(self.c, schedule, tensors)
        sel = routing.select(plan, q, k)
        values = routing.launch_values(plan, sel, schedule, k.shape[1])
        if not score_reads_n_visible(self.c.spec.ir.score):
            return values, None
        if schedule is self.c.schedule:  # n_visible counts the chosen keys only
            vis = self._cached(self._visible, "plan", lambda: routing.visible_counts(self.c, schedule, plan))
        else:
            vis = routing.visible_counts(self.c, schedule, plan, tensors)
        return values, routing.routed_counts(vis, plan, sel)

    def parts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The token parts (codegen/parts.py) of the queries [q parts, Nq] and of the keys
        [k parts, Nk], by kernel position, on `device`, once."""
        return self._cached(self._parts, device, lambda: tuple(
            _as_tensor(a, device, self.c.int64) for a in token_part_values(self.c)))

    def transposed(self, device: torch.device, schedule: Schedule) -> tuple[torch.Tensor, ...]:
        """The schedule per kv tile (for dK/dV) on `device`, like `tables`."""
        def make():
            return _on_device(schedule.transposed, device)

        if schedule is not self.c.schedule:
            return make()
        return self._cached(self._transposed, device, make)

    def row_scores(self, head_dim: int, device: torch.device, schedule: Schedule, natural: bool = False,
                   counts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """float32 per-position score scale and bias, and whether every scale is > 0 (softmax's
        scale in base 2 for the forward kernel, ir.scores.base2_logits; `natural` for the backward
        kernels, which work in natural units). Routed specs that read n_visible give this call's
        `counts` [B, Hq, Nq], and get [B * Hq * Nq] rows (the kernels index them by batch * head)."""
        ir = self.c.spec.ir

        def make(counts):
            scale, bias = row_scores(self.c.bound, head_dim, counts)
            if base2_logits(ir.score) and not natural:
                scale = scale * LOG2E  # the kernel's online softmax works in base 2
            # every row's scale > 0 (checked here, once): the forward may apply it after the max
            positive = bool((scale.astype(np.float32) > 0).all())
            return (*(torch.from_numpy(x).to(device, torch.float32) for x in (scale, bias)), positive)

        # Counts matter only through n_visible: any other score depends on head_dim alone (rows
        # that see nothing output 0 whatever their scale), so it is computed once; one that reads
        # n_visible uses the compiled schedule's counts, or this call's under runtime data.
        if not score_reads_n_visible(ir.score):
            return self._cached(self._scores, (head_dim, device, natural),
                                lambda: make(np.ones(self.c.bound.nq, np.int64)))
        if counts is not None:  # under routing: [B, Hq, Nq], this call's selection (route)
            return make(counts)
        if schedule is not self.c.schedule:  # counts under this call's data
            return make(schedule.row_counts)
        return self._cached(self._scores, (head_dim, device, natural), lambda: make(self.c.schedule.row_counts))


def token_part_values(c: Compiled) -> tuple[np.ndarray, np.ndarray]:
    """Each token part's value at every kernel position, from the IR's own evaluator. Parts are
    integer arithmetic of parameters and coordinates (no guards, no tables): a division by zero
    can only be where a guard of the mask makes the value unused, so nothing is checked here."""
    bound, lay = c.bound, c.layout
    every = token_parts(bound.ir)
    out = {"q": np.zeros((sum(p.side == "q" for p in every), bound.nq), np.int64),
           "k": np.zeros((sum(p.side == "k" for p in every), bound.nk), np.int64)}
    tokens = {"q": np.asarray(lay.q_perm, np.int64), "k": np.asarray(lay.kv_perm, np.int64)}
    segments = {"q": bound.q_parts, "k": bound.kv_parts}
    for part in every:
        # A part of a segment (of either side) is its value where the token lies in that segment.
        tok = tokens[part.side]
        seg = next(s for s in segments[part.side] if s.name == part.segment)
        inside = (tok >= seg.offset) & (tok < seg.offset + seg.size)
        local = np.where(inside, tok - seg.offset, 0)
        coords = {(part.side, a): v for a, v in decode(seg.dims, seg.space.axes, local).items()}
        out[part.side][part.index] = np.where(inside, _values(part.expr, bound.env, coords, len(tok)), 0)
    return out["q"], out["k"]


def _values(expr, env, coords, n: int) -> np.ndarray:
    nowhere = np.zeros(n, dtype=bool)  # live nowhere: divisions by zero give unused values, no error
    return np.broadcast_to(np.asarray(evaluate(expr, env, coords, live=nowhere), np.int64), (n,))


def _as_tensor(a: np.ndarray, device: torch.device, wide: bool) -> torch.Tensor:
    if not wide and a.size and (a.min() < -2**31 or a.max() >= 2**31):
        # The IR's ranges decide int32; a part (a window's folded range bound) can reach 2n.
        raise AttncError("a token part exceeds int32 for these sizes; an axis of 2**30 tokens is beyond "
                         "what the kernels address in int32")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64 if wide else np.int32)).to(device)
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=device)  # a valid pointer


def _on_device(arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    out = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device) for a in arrays)
    # Empty index arrays still need a valid pointer.
    return tuple(t if t.numel() else torch.zeros(1, dtype=torch.int32, device=device) for t in out)
