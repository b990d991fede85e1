"""The tokens of a run of kernel positions, as coordinate boxes.

Tile analysis asks, for blocks of kernel positions [start, stop), which tokens they hold. Under
a row-major order a run of flat indices is exactly a union of at most 2·ndim − 1 boxes (a
partial slice, full slices, a partial slice, recursively per axis). Under any other order the
analysis uses the bounding box of the tokens the run holds, per key segment: a superset, so
classes stay sound (box tilings make it exact, since their tiles are boxes).

A side's boxes for B blocks are a list of slots; each slot has a validity mask [B], the key
segment it lies in (its index in bound.q_parts or bound.kv_parts) and per axis (lo, hi) arrays
[B] of coordinates local to that segment, the flat index 'i' included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ir.bind import Bound
from .layout import Layout


@dataclass
class Slot:
    valid: np.ndarray
    part: int
    coords: dict[str, tuple[np.ndarray, np.ndarray]]
    # Per axis (stride, base): every coordinate is base + a multiple of stride (stride 0: all
    # equal). A bounding box of a dilation group's tokens is thereby exact for `x % d`.
    mods: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def _row_major(p0: np.ndarray, p1: np.ndarray, dims: tuple[int, ...]) -> list[tuple[np.ndarray, list]]:
    """Boxes covering flat indices [p0, p1) of a row-major space: a list of (valid, [(lo, hi) per
    axis]) with at most 2 * len(dims) - 1 entries."""
    if len(dims) == 1:
        return [(p1 > p0, [(p0, p1 - 1)])]
    inner = math.prod(dims[1:])
    a0, a1 = p0 // inner, (p1 - 1) // inner
    nonempty = p1 > p0
    out = []
    # The first slice: a0, from p0 to the end of the slice or p1.
    for valid, axes in _row_major(p0 - a0 * inner, np.minimum(p1, (a0 + 1) * inner) - a0 * inner, dims[1:]):
        out.append((valid & nonempty, [(a0, a0)] + axes))
    # Whole slices in between.
    zero = np.zeros_like(p0)
    middle = [(a0 + 1, a1 - 1)] + [(zero, zero + (d - 1)) for d in dims[1:]]
    out.append((nonempty & (a1 - a0 >= 2), middle))
    # The last slice, when it is not the first.
    for valid, axes in _row_major(zero, p1 - a1 * inner, dims[1:]):
        out.append((valid & nonempty & (a1 > a0), [(a1, a1)] + axes))
    return out


def _with_flat(axes: list, names: tuple[str, ...], dims: tuple[int, ...]) -> dict:
    """Per-axis ranges plus the flat index range of the box (its first and last token)."""
    coords = dict(zip(names, axes))
    if "i" not in coords:
        strides = [math.prod(dims[a + 1:]) for a in range(len(dims))]
        lo = sum(r[0] * s for r, s in zip(axes, strides))
        hi = sum(r[1] * s for r, s in zip(axes, strides))
        coords["i"] = (lo, hi)
    return coords


class SideBoxes:
    """Boxes of blocks of kernel positions on one side (queries, or keys with their segments)."""

    def __init__(self, bound: Bound, layout: Layout, side: str):
        self.side = side
        parts = bound.q_parts if side == "q" else bound.kv_parts
        self.parts = [(p.offset, p.size, p.space.axes, p.dims) for p in parts]
        if side == "q":
            self.perm, self.identity = layout.q_perm, layout.q_identity
        else:
            self.perm, self.identity = layout.kv_perm, layout.kv_identity
        self.n = sum(size for _, size, _, _ in self.parts)
        self._tile_boxes: dict[int, list[Slot]] = {}  # block size -> bounding boxes (permuted orders)

    def slots(self, start: np.ndarray, stop: np.ndarray, block: int) -> list[Slot]:
        """Boxes of the runs [start, stop) of kernel positions (all runs of `block` positions,
        the last one maybe shorter)."""
        if self.identity:
            return self._exact(start, np.minimum(stop, self.n))
        return self._bounding(start, block)

    def _exact(self, start: np.ndarray, stop: np.ndarray) -> list[Slot]:
        out = []
        for j, (offset, size, names, dims) in enumerate(self.parts):
            p0 = np.clip(start - offset, 0, size)
            p1 = np.clip(stop - offset, 0, size)
            for valid, axes in _row_major(p0, p1, dims):
                out.append(Slot(valid, j, _with_flat(axes, names, dims)))
        return out

    def _bounding(self, start: np.ndarray, block: int) -> list[Slot]:
        """Per segment, the bounding box of the tokens each run holds (O(N) per block size)."""
        if block not in self._tile_boxes:
            starts = np.arange(0, self.n, block)
            tokens = self.perm
            slots = []
            for j, (offset, size, names, dims) in enumerate(self.parts):
                inside = (tokens >= offset) & (tokens < offset + size)
                local = np.where(inside, tokens - offset, 0)
                count = np.add.reduceat(inside.astype(np.int64), starts)
                coords = {"i": local}
                rest = local
                for name, d in zip(reversed(names), reversed(dims)):
                    coords[name] = rest % d
                    rest = rest // d
                ranges, mods = {}, {}
                for name, v in coords.items():
                    big = np.iinfo(np.int64).max
                    lo = np.minimum.reduceat(np.where(inside, v, big), starts)
                    hi = np.maximum.reduceat(np.where(inside, v, -1), starts)
                    ranges[name] = (lo, hi)
                    first = np.repeat(lo, np.diff(np.append(starts, len(v))))
                    mods[name] = (np.gcd.reduceat(np.where(inside, v - first, 0), starts), lo)
                slots.append(Slot(count > 0, j, ranges, mods))
            self._tile_boxes[block] = slots
        index = start // block
        pick = lambda d: {a: (x[index], y[index]) for a, (x, y) in d.items()}  # noqa: E731
        return [Slot(s.valid[index], s.part, pick(s.coords), pick(s.mods)) for s in self._tile_boxes[block]]
