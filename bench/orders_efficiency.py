"""Tile efficiency of token orders (issue 9, item 4): row-major against the candidates the
layout cost model weighs, on the issue's cases, with 64 x 64 tiles.

    python bench/orders_efficiency.py                 # the five cases, tile analysis only (~10 s)
    python bench/orders_efficiency.py --exact         # also brute-force counts (minutes: 3-D is slow)
    python bench/orders_efficiency.py --only natten2d_7x7,gna3d --json out.json

Tile efficiency = visible pairs / pairs in computed (FULL + PARTIAL) tiles. "analysis" is what
`attnc.analysis.tiles.analyse` decides, i.e. what the kernel computes; "exact" (with --exact)
classifies each tile from the dense mask (O(Nq * Nk): seconds per order at 16K tokens, about a
minute at 65K), which shows where the analysis is conservative under an order. Prints a Markdown
table per case and a summary; nothing is written unless --json is given.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attnc.analysis import layout as L  # noqa: E402
from attnc.analysis.tiles import analyse  # noqa: E402
from attnc.ir.bind import bind  # noqa: E402
from attnc.pipeline import parse  # noqa: E402

SPECS = ROOT / "specs"
WINDOW_1D = """
attention window1d(N, R = 256) {
    q, kv = seq(N)
    mask  = abs(q.i - k.i) <= R
}
"""
# name: (spec, params, the "best order found" efficiency, %)
CASES = {
    "natten2d_7x7": (SPECS / "natten2d.attn", dict(H=128, W=128, kernel=7, dilation=1), 10.54),
    "natten2d_7x7_dil2": (SPECS / "natten2d.attn", dict(H=128, W=128, kernel=7, dilation=2), 10.94),
    "natten2d_13x13": (SPECS / "natten2d.attn", dict(H=128, W=128, kernel=13, dilation=1), 31.95),
    "gna3d": (SPECS / "gna3d_video.attn", dict(T=16, H=64, W=64), 14.89),
    "window1d_16k": (WINDOW_1D, dict(N=16384), 89.1),
}
BM = BN = 64


def exact_counts(bound, layout, bm: int = BM, bn: int = BN) -> tuple[int, int, int]:
    """(FULL, PARTIAL, visible) from the dense mask, one row of q tiles at a time."""
    try:
        from attnc.analysis.dense import mask_bounds
    except ImportError:  # older layout of the analysis package
        from attnc.analysis.tiles import mask_bounds
    nq, nk = bound.nq, bound.nk
    n_kt = math.ceil(nk / bn)
    pad = n_kt * bn - nk
    full = partial = visible = 0
    for t in range(math.ceil(nq / bm)):
        rows = layout.q_perm[t * bm:(t + 1) * bm]
        certain, possible = mask_bounds(bound, rows, layout.kv_perm)
        visible += int(possible.sum())
        any_ = np.pad(possible, ((0, 0), (0, pad))).reshape(len(rows), n_kt, bn).any(axis=(0, 2))
        all_ = np.pad(certain, ((0, 0), (0, pad))).reshape(len(rows), n_kt, bn).all(axis=(0, 2))
        all_[n_kt - 1] &= pad == 0  # a ragged last kv tile is never FULL
        full += int(all_.sum())
        partial += int((any_ & ~all_).sum())
    return full, partial, visible


def run_case(name: str, spec, params: dict, target: float, exact: bool) -> dict:
    bound = bind(parse(spec).ir, params)
    t0 = time.perf_counter()
    chosen = L.choose(bound, "auto", BM, BN, analyse)
    auto_s = time.perf_counter() - t0
    rows = []
    for cand in L.candidates(bound, BM, BN):
        t0 = time.perf_counter()
        lay = L.build_layout(bound, cand)
        order_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = analyse(bound, BM, BN, lay)
        analyse_s = time.perf_counter() - t0
        full, partial = L.tile_counts(s)
        rows.append(dict(name=cand.name, q=cand.q.describe(), kv=cand.kv.describe(), full=full, partial=partial,
                         cost=round(L.cost(full, partial, BM, BN, lay), 1), order_ms=round(1e3 * order_s, 1),
                         analyse_ms=round(1e3 * analyse_s, 1), layout=lay, schedule=s))
    visible = int(rows[0]["schedule"].row_counts.sum())  # the same under every order
    for r in rows:
        r["efficiency"] = 100 * visible / max(1, (r["full"] + r["partial"]) * BM * BN)
    best = max(rows, key=lambda r: (r["efficiency"], -rows.index(r)))
    if exact:
        picks = {rows[0]["name"], best["name"], chosen.name} | {r["name"] for r in rows if "dilation" in r["name"]}
        for r in rows:
            if r["name"] in picks:
                t0 = time.perf_counter()
                f, p, v = exact_counts(bound, r["layout"])
                assert v == visible
                r["exact_efficiency"] = 100 * v / max(1, (f + p) * BM * BN)
                r["exact_s"] = round(time.perf_counter() - t0, 1)
                print(f"  [{name}] exact {r['name']}: {r['exact_efficiency']:.2f} % ({r['exact_s']} s)",
                      file=sys.stderr, flush=True)
    for r in rows:
        del r["layout"], r["schedule"]
    best_exact = max((r for r in rows if "exact_efficiency" in r), key=lambda r: r["exact_efficiency"], default=None)
    return dict(case=name, params=params, tokens=bound.nq, visible=visible, target=target, auto=chosen.name,
                auto_ms=round(1e3 * auto_s, 1), row_major=rows[0]["efficiency"], best=best["name"],
                best_efficiency=best["efficiency"],
                auto_efficiency=next(r["efficiency"] for r in rows if r["name"] == chosen.name),
                best_exact=best_exact and best_exact["name"],
                best_exact_efficiency=best_exact and best_exact["exact_efficiency"], candidates=rows)


def show(res: dict) -> str:
    out = [f"### {res['case']} ({', '.join(f'{k}={v}' for k, v in res['params'].items())}; "
           f"{res['tokens']} tokens, 64x64 tiles)", "",
           "| order | q | kv | FULL | PARTIAL | efficiency | exact | cost |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in res["candidates"]:
        mark = " (auto)" if r["name"] == res["auto"] else ""
        ex = f"{r['exact_efficiency']:.2f} %" if "exact_efficiency" in r else ""
        out.append(f"| {r['name']}{mark} | {r['q']} | {r['kv']} | {r['full']} | {r['partial']} | "
                   f"{r['efficiency']:.2f} % | {ex} | {r['cost']} |")
    return "\n".join(out)


def summary(results: list[dict]) -> str:
    out = ["| case | row-major | auto (order) | best by analysis (order) | best exact (order) | issue's best |",
           "|---|---:|---|---|---|---:|"]
    for r in results:
        ex = f"{r['best_exact_efficiency']:.2f} % ({r['best_exact']})" if r["best_exact"] else ""
        out.append(f"| {r['case']} | {r['row_major']:.2f} % | {r['auto_efficiency']:.2f} % ({r['auto']}, "
                   f"{r['auto_ms']:.0f} ms) | {r['best_efficiency']:.2f} % ({r['best']}) | {ex} | {r['target']} % |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exact", action="store_true", help="also count tiles from the dense mask (slow)")
    ap.add_argument("--only", help=f"comma-separated cases: {', '.join(CASES)}")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(CASES)
    results = []
    for name in names:
        spec, params, target = CASES[name]
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        results.append(run_case(name, spec, params, target, args.exact))
        print(show(results[-1]) + "\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print("## Summary\n\n" + summary(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
