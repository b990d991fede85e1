"""Token layouts: the order in which a kernel visits query and key tokens.

A layout holds, for each of q and kv, a permutation from kernel position to row-major token:
kernel position p holds token `order[p]`. Tile analysis, schedules and row statistics are
expressed in kernel positions; kernels decode a token's coordinates through the order; the
runtime permutes q, k, v in and the outputs back out (nothing when the order is the identity).
Row-major is the only order chosen so far; the seam exists so that others plug in here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import AttncError
from ..ir.bind import Bound

AUTO = "auto"
ROW_MAJOR = "row_major"
NAMES = (AUTO, ROW_MAJOR)


@dataclass(frozen=True, eq=False)
class Layout:
    name: str
    q_perm: np.ndarray = field(repr=False)  # int64 [Nq]: kernel position -> row-major token
    kv_perm: np.ndarray = field(repr=False)  # int64 [Nk]
    q_identity: bool = True
    kv_identity: bool = True

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

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, nq={len(self.q_perm)}, nk={len(self.kv_perm)})"


def from_orders(name: str, q_order, kv_order) -> Layout:
    """A layout from two explicit orders; each must be a permutation of its token range."""
    perms = []
    for side, order in (("q", q_order), ("kv", kv_order)):
        perm = np.asarray(order, dtype=np.int64).reshape(-1)
        n = len(perm)
        seen = np.zeros(n, dtype=bool)
        inside = (perm >= 0) & (perm < n)
        seen[perm[inside]] = True
        if not (inside.all() and seen.all()):
            raise AttncError(f"layout '{name}': the {side} order is not a permutation of 0..{n - 1}")
        perms.append(perm)
    q, kv = perms
    return Layout(name, q, kv, _is_identity(q), _is_identity(kv))


def row_major(nq: int, nk: int) -> Layout:
    return Layout(ROW_MAJOR, np.arange(nq, dtype=np.int64), np.arange(nk, dtype=np.int64))


def choose(bound: Bound, layout) -> Layout:
    """The layout asked for: a name, or an explicit Layout (checked against the sizes)."""
    if isinstance(layout, Layout):
        if len(layout.q_perm) != bound.nq or len(layout.kv_perm) != bound.nk:
            raise AttncError(f"layout '{layout.name}' orders {len(layout.q_perm)} queries and "
                             f"{len(layout.kv_perm)} keys; the spec has {bound.nq} and {bound.nk}")
        return layout
    if not isinstance(layout, str) or layout not in NAMES:
        raise AttncError(f"unknown layout {layout!r}; choose one of {', '.join(NAMES)}")
    return row_major(bound.nq, bound.nk)  # auto: row-major is the only candidate so far


def inverse(perm: np.ndarray) -> np.ndarray:
    out = np.empty_like(perm)
    out[perm] = np.arange(len(perm), dtype=perm.dtype)
    return out


def _is_identity(perm: np.ndarray) -> bool:
    return bool((perm == np.arange(len(perm))).all())
