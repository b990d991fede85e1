"""The analysis benchmark's cases: each an attnc spec plus the same pattern written independently
as a FlexAttention mask_mod, with an exact count of its visible pairs.

A pattern knows, for a binding of its spec's parameters: the token count, the Flex mask_mod, the
runtime tensors attnc's callable needs, and (where one exists) a closed form of the number of
visible (query, key) pairs. The mask_mods are written from the definitions in DESIGN.md §3, not
from attnc's code, so the benchmark compares two implementations of one pattern; `validate` (in
measure.py) checks at small sizes that they agree pair for pair.

mask_mods use only elementwise torch ops, so the same function serves Flex (vmap over scalar
indices) and the chunked pair count (broadcast index tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"

# The "1-D window ±256" (89.1 % tile efficiency at 64-tiles) is the symmetric radius, not
# specs/sliding_window.attn (causal, W most recent keys), so it is written inline.
WINDOW_1D = """
# 1-D sliding window on both sides: query i sees keys j with |i - j| <= R, clipped at the ends.
attention window1d(N, R = 256) {
    q, kv = seq(N)
    mask  = abs(q.i - k.i) <= R
}
"""


# -- patterns ------------------------------------------------------------------------------------
class Window1D:
    spec = WINDOW_1D

    @staticmethod
    def tokens(p):
        return p["N"]

    @staticmethod
    def mask_mod(p):
        r = p["R"]

        def window(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= r

        return window

    @staticmethod
    def pairs(p):
        # Each query sees the clipped range [max(i - R, 0), min(i + R, N - 1)].
        n, r = p["N"], p["R"]
        i = np.arange(n, dtype=np.int64)
        return int((np.minimum(i + r, n - 1) - np.maximum(i - r, 0) + 1).sum())


@dataclass(frozen=True)
class Axis:
    """One axis of a NATTEN window (DESIGN.md §3): length n, kernel k, dilation d, stride s."""

    n: int
    k: int
    d: int = 1
    s: int = 1
    causal: bool = False


def natten_axis(i, j, a: Axis):
    """Whether key coordinate j is in query coordinate i's window along one axis (torch tensors).

    Dilation group g = i mod d, group coordinate i' = i // d, group length ceil((n - g) / d);
    keys only from the same group. The leader of a stride group picks the window, which is shifted
    inward at the borders (non-causal), so every query sees exactly k keys per axis.
    Branches on d and s are Python-level (they are constants), as a user would write them."""
    import torch

    if a.d == 1:
        ig, jg, n_g, same = i, j, a.n, None
    else:
        g = i % a.d
        ig, jg, n_g = i // a.d, j // a.d, (a.n - g + a.d - 1) // a.d
        same = (j % a.d) == g
    # n_g is a tensor only with dilation (it depends on the query's group).
    at_most = torch.minimum if a.d > 1 else (lambda x, hi: torch.clamp(x, max=hi))
    if a.s == 1:
        lead = ig  # leads itself (ig <= n_g - 1 always)
    else:
        lead = at_most((ig // a.s) * a.s + (a.s - 1 if a.causal else a.s // 2), n_g - 1)
    if a.causal:
        inside = (jg >= torch.clamp(lead - a.k + 1, min=0)) & (jg <= ig)
    else:
        start = at_most(torch.clamp(lead - a.k // 2, min=0), n_g - a.k)
        inside = (jg >= start) & (jg < start + a.k)
    return inside if same is None else inside & same


def natten_axis_pairs(a: Axis) -> int:
    """Visible (i, j) pairs along one axis, from the same definition, in O(n)."""
    i = np.arange(a.n, dtype=np.int64)
    if not a.causal:
        return a.n * a.k  # the window is shifted inward, so every query sees exactly k keys
    ig, g = i // a.d, i % a.d
    n_g = (a.n - g + a.d - 1) // a.d
    lead = np.minimum((ig // a.s) * a.s + a.s - 1, n_g - 1)
    return int((ig - np.maximum(lead - a.k + 1, 0) + 1).sum())


class Natten:
    """A NATTEN window over a grid: the AND of per-axis windows, tokens flattened row-major."""

    def __init__(self, spec: str, axes):
        self.spec = spec
        self.axes = axes  # params -> [Axis, ...], outermost axis first

    def tokens(self, p):
        return int(np.prod([a.n for a in self.axes(p)]))

    def mask_mod(self, p):
        axes = self.axes(p)
        strides = [int(np.prod([b.n for b in axes[i + 1:]])) for i in range(len(axes))]

        def neighborhood(b, h, q_idx, kv_idx):
            ok = None
            for axis, (a, st) in enumerate(zip(axes, strides)):
                qi, ki = q_idx // st, kv_idx // st
                if axis > 0:  # the outermost coordinate needs no wrap
                    qi, ki = qi % a.n, ki % a.n
                inside = natten_axis(qi, ki, a)
                ok = inside if ok is None else ok & inside
            return ok

        return neighborhood

    def pairs(self, p):
        # The mask is an AND over axes of a product space: visible pairs multiply across axes.
        return int(np.prod([natten_axis_pairs(a) for a in self.axes(p)], dtype=object))


class Causal:
    spec = str(SPECS / "causal.attn")

    @staticmethod
    def tokens(p):
        return p["N"]

    @staticmethod
    def mask_mod(p):
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return causal

    @staticmethod
    def pairs(p):
        return p["N"] * (p["N"] + 1) // 2


def document_lengths(n: int, mean: int, seed: int = 0) -> np.ndarray:
    """Lengths of packed documents filling n tokens: log-normal (a long tail, as real corpora
    have) with the given mean, at least 16 tokens each, the last one cut to fit. Fixed seed."""
    rng = np.random.default_rng(seed)
    sigma = 0.8
    lengths = []
    while sum(lengths) < n:
        lengths.append(max(16, int(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))))
    lengths[-1] -= sum(lengths) - n
    return np.array(lengths, dtype=np.int64)


class DocumentCausal:
    spec = str(SPECS / "document_causal.attn")

    @staticmethod
    def tokens(p):
        return p["N"]

    @staticmethod
    def lengths(p):
        return document_lengths(p["N"], min(3000, p["N"] // 8))

    @classmethod
    def doc_ids(cls, p):
        import torch

        lengths = cls.lengths(p)
        return torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths))

    @classmethod
    def mask_mod(cls, p):
        doc = cls.doc_ids(p)

        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

        return document_causal

    @classmethod
    def attnc_tensors(cls, p):
        return {"doc": cls.doc_ids(p)}

    @classmethod
    def pairs(cls, p):
        lengths = cls.lengths(p)
        return int((lengths * (lengths + 1) // 2).sum())


NATTEN2D = Natten(str(SPECS / "natten2d.attn"),
                  lambda p: [Axis(p["H"], p["kernel"], p["dilation"]), Axis(p["W"], p["kernel"], p["dilation"])])
# specs/gna3d_video.attn: window(3, 7, 7, stride = (1, 2, 2), causal = (true, false, false)).
GNA3D = Natten(str(SPECS / "gna3d_video.attn"),
               lambda p: [Axis(p["T"], 3, causal=True), Axis(p["H"], 7, s=2), Axis(p["W"], 7, s=2)])


# -- cases ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    title: str
    pattern: object
    params: dict  # binds the spec: the benchmarked size
    small: dict  # the same pattern at about 1K tokens: warm-ups and validation
    huge: bool = False  # 1M tokens: not in --quick
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return self.pattern.spec

    @property
    def tokens(self) -> int:
        return self.pattern.tokens(self.params)

    def attnc_tensors(self, p=None) -> dict:
        tensors = getattr(self.pattern, "attnc_tensors", None)
        return tensors(self.params if p is None else p) if tensors else {}


CASES = [
    Case("window1d_16k", "1-D window ±256, N = 16,384", Window1D, {"N": 16384, "R": 256}, {"N": 1024, "R": 256}),
    Case("natten2d_7x7", "2-D 7×7 neighborhood on 128²", NATTEN2D,
         {"H": 128, "W": 128, "kernel": 7, "dilation": 1}, {"H": 32, "W": 32, "kernel": 7, "dilation": 1}),
    Case("natten2d_7x7_dil2", "2-D 7×7, dilation 2, on 128²", NATTEN2D,
         {"H": 128, "W": 128, "kernel": 7, "dilation": 2}, {"H": 32, "W": 32, "kernel": 7, "dilation": 2}),
    Case("natten2d_13x13", "2-D 13×13 neighborhood on 128²", NATTEN2D,
         {"H": 128, "W": 128, "kernel": 13, "dilation": 1}, {"H": 32, "W": 32, "kernel": 13, "dilation": 1}),
    Case("gna3d_64", "3-D (3,7,7) stride (1,2,2), causal in time, 16×64×64", GNA3D,
         {"T": 16, "H": 64, "W": 64}, {"T": 4, "H": 16, "W": 16}),
    Case("causal_32k", "causal, N = 32,768", Causal, {"N": 32768}, {"N": 1024}),
    Case("document_causal_65k", "document-causal, N = 65,536, log-normal document lengths (mean 3000)", DocumentCausal,
         {"N": 65536}, {"N": 1024}),
    Case("window1d_1m", "1-D window ±256, N = 1,048,576", Window1D, {"N": 1 << 20, "R": 256}, {"N": 1024, "R": 256},
         huge=True),
    Case("gna3d_1m", "3-D (3,7,7) stride (1,2,2), causal in time, 16×256×256 (1M)", GNA3D,
         {"T": 16, "H": 256, "W": 256}, {"T": 4, "H": 16, "W": 16}, huge=True),
]
BY_NAME = {c.name: c for c in CASES}
