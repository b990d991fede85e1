"""Sizes attnc refuses before it starts: every limit in one place, as a named constant.

Each limit guards an allocation or a piece of work whose size follows from the bound sizes
(Nq, Nk, tiles, batch, heads). The check runs before the allocation or the work, so a spec that
cannot run fails fast with an `AttncError` that names the limit and the size asked for, instead
of hanging or dying with a MemoryError. Tests lower these constants to exercise each check.
"""
from __future__ import annotations

import math

from .errors import AttncError

GiB = 1 << 30

# Kernels index tokens and runtime-tensor entries in int32.
MAX_TOKENS = 2**31 - 1
MAX_HEADS = 2**16
MAX_BATCH = 2**16  # interval analysis of `batch` in masks before a call fixes it

# One host array indexed by token (the layout's orders, per-row counts: int64 per token).
MAX_TOKEN_ARRAY_BYTES = 4 * GiB

# Work that evaluates the mask pair by pair: the per-call row counts, row counts inside PARTIAL
# tiles, and the scan of the pairs a bias table is read at (times the heads, for per-head
# indices). Tile analysis itself is symbolic and never evaluates pairs.
MAX_ANALYSED_PAIRS = 10**11

# The tiles a schedule keeps (PARTIAL and FULL): two int64 coordinates while they are listed,
# then an int32 CSR entry each.
MAX_TILE_MAP_BYTES = 4 * GiB
MAX_TILES = 2**31 - 1  # CSR offsets are int32

# fn.mask() and the reference backend's dense mask: bool [Nq, Nk].
MAX_DENSE_MASK_BYTES = 4 * GiB

# One dense [B, H, Nq, Nk] tensor of the reference backend (scores, weights), in its dtype.
MAX_REFERENCE_BYTES = 4 * GiB

# The partial gradients of one bias table in the backward pass: one row per (batch, head,
# query tile), float32.
MAX_TABLE_GRAD_BYTES = 4 * GiB

# Pairs evaluated at once by the numpy evaluator (mask_block works in row chunks of this size),
# so that its int64 intermediates stay small whatever the output size.
EVAL_CHUNK_PAIRS = 1 << 22

# The largest magnitude of a finite float that reaches a float32 kernel: score scale and bias,
# float constants of a bias expression, bias-table entries. float32 ends at 3.4e38; the kernels
# scale logits by log2(e) and add to them, so a margin is kept.
MAX_FLOAT = 1e38


def show_bytes(n: float) -> str:
    for unit, size in (("TiB", GiB << 10), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} bytes"


def show_count(n: float) -> str:
    if n < 1e6:
        return str(int(n))
    mantissa, exponent = f"{n:.2g}".split("e")
    return f"{mantissa}e{int(exponent)}"


def show_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_bytes(what: str, shape, itemsize: int, limit: int, name: str) -> None:
    """Refuse an allocation of prod(shape) * itemsize bytes above `limit` (named `name`)."""
    size = math.prod(int(s) for s in shape) * itemsize
    if size > limit:
        raise AttncError(f"{what} would allocate {show_bytes(size)} for {show_shape(shape)}; "
                         f"the limit is {show_bytes(limit)} (attnc.limits.{name})")


def check_count(what: str, count: int, limit: int, name: str, unit: str = "(query, key) pairs") -> None:
    """Refuse work over `count` items above `limit` (named `name`)."""
    if count > limit:
        raise AttncError(f"{what} would evaluate {show_count(count)} {unit}; the limit is "
                         f"{show_count(limit)} (attnc.limits.{name})")
