"""How often symbolic tile analysis is conservative, per spec in specs/.

A PARTIAL tile is conservative when brute force (the dense mask) would call it EMPTY or FULL: the
kernel then evaluates the mask where it need not. Soundness (never EMPTY when a pair is visible,
never FULL when one is hidden) is asserted on the way.

    python -m bench.conservative            # 64x64 and 16x32 tiles, the specs' test sizes
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import attnc
from attnc.analysis.tiles import EMPTY, FULL, PARTIAL

SPECS = Path(__file__).resolve().parent.parent / "specs"
CASES = [  # routing specs have no kernels; document_causal's tiles depend on call-time ids
    ("causal", dict(N=77)), ("sliding_window", dict(N=300, W=20)), ("longformer", dict(N=700, W=40, G=5)),
    ("natten2d", dict(H=13, W=17, kernel=5, dilation=2)), ("natten2d", dict(H=32, W=30, kernel=7, dilation=2)),
    ("natten2d", dict(H=32, W=32, kernel=7, dilation=1)), ("gna3d_video", dict(T=5, H=16, W=12)),
    ("cross_causal", dict(M=75, N=150)), ("streaming_sink", dict(N=300, W=16, S=4)),
    ("swin_shifted", dict(H=28, W=28)), ("maxvit_grid", dict(H=24, W=24, G=3)),
    ("sigmoid_causal", dict(N=200)), ("softplus", dict(N=100)), ("scale_dit", dict(H=32, W=32)),
    ("swin_bias", dict(H=28, W=28)), ("alibi_causal", dict(N=150)), ("softcap_sink", dict(N=300, W=50)),
]


def rates(name: str, params: dict, tiles: tuple[int, int]) -> tuple[int, int]:
    fn = attnc.compile(SPECS / f"{name}.attn", tiles=tiles, **params)
    dense = attnc.compile(SPECS / f"{name}.attn", backend="reference", **params).mask().numpy()
    s, (bm, bn) = fn.schedule, tiles
    classes, conservative = s.classes, 0
    for t in range(s.q_tiles):
        for u in range(s.kv_tiles):
            block = dense[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            ragged = (u + 1) * bn > s.nk
            assert not (classes[t, u] == EMPTY and block.any()), (name, t, u)
            assert not (classes[t, u] == FULL and not (block.all() and not ragged)), (name, t, u)
            conservative += int(classes[t, u] == PARTIAL and (not block.any() or (block.all() and not ragged)))
    return conservative, int((classes == PARTIAL).sum())


def main() -> None:
    print("| spec | sizes | tiles | conservative / PARTIAL | rate |")
    print("|---|---|---|---|---|")
    for name, params in CASES:
        for tiles in ((64, 64), (16, 32)):
            c, p = rates(name, params, tiles)
            sizes = ", ".join(f"{k}={v}" for k, v in params.items())
            print(f"| {name} | {sizes} | {tiles[0]}x{tiles[1]} | {c} / {p} | {c / max(1, p):.1%} |")
            sys.stdout.flush()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
