"""Gradient accuracy of the Triton backend per spec: the figures behind tests/test_backward.py.

    python -m bench.grad_errors                # CPU interpreter (float32, float16); GPU adds bfloat16
    python -m bench.grad_errors --out bench/results

For every spec with kernels (the cases of tests/test_backward.py), the output and every gradient
(q, k, v, float tables) are compared with the float64 reference; the eager reference in the
kernel's dtype is the yardstick (FlexAttention's discipline). Per spec and dtype it reports the
largest err(kernel, f64) / err(eager, f64) over the tensors, and the largest use of the test's
bound, err(kernel) / (2 err(eager) + EPS max|f64|) (below 1 passes).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for grad-errors-<date>.md (printed only without it)")
    args = ap.parse_args(argv)
    import torch

    import attnc  # noqa: F401  (decides interpreter mode before the tests import Triton)
    from tests import test_backward as tb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = tb.DTYPES + ([torch.bfloat16] if device == "cuda" else [])
    tb.EPS.setdefault(torch.bfloat16, 4e-3)
    rows = []
    for name, spec, params, kw in tb.CASES:
        for dtype in dtypes:
            kw = dict(kw)
            tiles = kw.pop("tiles", (32, 32))
            fn = attnc.compile(tb.SPECS / f"{spec}.attn", tiles=tiles, **params)
            ref = attnc.compile(tb.SPECS / f"{spec}.attn", backend="reference", **params)
            bound = ref.compiled.bound
            b, hq, hkv, d = kw.get("b", 1), kw.get("hq", 2), kw.get("hkv", 2), kw.get("d", 16)
            x = {n: t.to(device, dtype) for n, t in tb._inputs(bound.nq, bound.nk, b, hq, hkv, d, kw.get("dv"),
                                                                kw.get("tables")).items()}
            g = torch.randn(b, hq, bound.nq, kw.get("dv") or d, generator=tb._gen(1)).to(device, dtype)
            ints = {n: t.to(device) for n, t in (kw.get("ints") or {}).items()}
            kern = tb._run(fn, x, g, ints)
            low = tb._run(ref, x, g, ints)
            gold = tb._run(ref, {n: t.cpu().double() for n, t in x.items()}, g.cpu().double(),
                           {n: t.cpu() for n, t in ints.items()})
            worst_ratio, worst_use, at = 0.0, 0.0, ""
            for tensor, want in gold.items():
                e_kern = (kern[tensor].cpu().double() - want).abs().max().item()
                e_low = (low[tensor].cpu().double() - want).abs().max().item()
                use = e_kern / (2 * e_low + tb.EPS[dtype] * want.abs().max().item())
                ratio = e_kern / max(e_low, 1e-30)
                if use > worst_use:
                    worst_use, at = use, tensor
                worst_ratio = max(worst_ratio, ratio)
            rows.append((name, str(dtype)[6:], worst_ratio, worst_use, at))
            print(f"{name:24s} {str(dtype)[6:]:8s} err/eager {worst_ratio:6.2f}  bound used {worst_use:5.2f} ({at})",
                  file=sys.stderr)
    lines = [
        "# Gradient accuracy of the Triton backward kernels",
        "",
        f"- Date: {dt.date.today()}; command: `python -m bench.grad_errors`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs; device: "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (Triton interpreter)'}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, attnc {attnc.__version__}",
        "- Per spec and dtype, over the output and every gradient: the largest err(kernel, f64) / err(eager "
        "same dtype, f64), and the largest share of the test bound 2 err(eager) + EPS max|f64| "
        f"(EPS = {', '.join(f'{str(k)[6:]} {v:g}' for k, v in tb.EPS.items())}; below 1 passes).",
        "",
        "| case | dtype | max err / eager err | max share of the bound | at |",
        "|---|---|---:|---:|---|",
        *(f"| {n} | {d} | {r:.2f} | {u:.2f} | {a} |" for n, d, r, u, a in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        path = Path(args.out) / f"grad-errors-{dt.date.today()}.md"
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
