"""Kernel quality without a GPU: every spec's kernels compiled for sm_80 and sm_90, checked and
measured by `fn.gpu_report`, against a plain FlashAttention-2 kernel compiled the same way.

    python -m bench.kernel_quality                     # the full matrix (about 15 minutes on 2 cores)
    python -m bench.kernel_quality --quick             # sm_90 bf16 D=128 and sm_80 fp16 D=64
    python -m bench.kernel_quality --out bench/results

Per (spec, arch, dtype, head dim; float32 at "highest", torch's default: 3xTF32) and kernel
(forward, dQ, dK/dV): registers, spill bytes, shared
memory against the target's limit, tensor cores, and the SASS instructions of each main loop
(forward: FULL then PARTIAL tiles) with its ratio to the yardstick's loop (bench/yardstick.py).
Writes kernel-quality-<date>.md and .json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
# Small sizes: the kernels do not depend on them (sizes are runtime arguments). Also the
# bindings of tests/test_gpu_compile.py (importing this module has no side effects).
PARAMS = {"causal": dict(N=64), "cross_causal": dict(M=64, N=64), "sliding_window": dict(N=64, W=16),
          "natten2d": dict(H=16, W=16), "longformer": dict(N=64, W=5, G=3), "gna3d_video": dict(T=4, H=16, W=16),
          "streaming_sink": dict(N=64, W=16, S=4), "swin_shifted": dict(H=14, W=14), "swin_bias": dict(H=14, W=14),
          "maxvit_grid": dict(H=8, W=8, G=2), "sigmoid_causal": dict(N=64), "softplus": dict(N=64),
          "scale_dit": dict(H=12, W=8), "document_causal": dict(N=64), "alibi_causal": dict(N=64),
          "softcap_sink": dict(N=64, W=16), "power_attention": dict(N=64, W=8),
          "biformer": dict(H=8, W=8, R=4, K=2), "moba": dict(N=64, B=16, K=2)}
FULL = [(a, d, h) for a in (80, 90) for d in ("fp16", "bf16", "fp32") for h in (64, 128)] + \
    [(90, "bf16", 256), (90, "fp16", 256)]
QUICK = [(90, "bf16", 128), (80, "fp16", 64)]


def yardstick(arch: int, dtype: str, head_dim: int) -> int:
    """The yardstick's loop under the launch config attnc gives its own forward kernel."""
    from attnc.codegen.target import assembled, describe, launch_config
    from bench.yardstick import compile_yardstick

    warps, stages = launch_config("fwd", arch, head_dim)
    k = compile_yardstick(arch, dtype, head_dim, num_warps=warps, num_stages=stages)
    return describe("fa2_fwd", assembled(k, arch), warps, stages)["loops"][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two targets only")
    ap.add_argument("--only", help="comma-separated spec names")
    ap.add_argument("--out", help="directory for kernel-quality-<date>.md/.json")
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # native compiles: before anything imports Triton
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    import triton

    import attnc
    from attnc.codegen.target import SHARED_LIMIT

    targets = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else sorted(PARAMS)
    rows, yard = [], {}
    start = time.time()
    for t, (arch, dtype, hd) in enumerate(targets):
        # float32 runs 3xTF32 (torch's "highest"): no plain FlashAttention-2 loop to compare with
        yard[(arch, dtype, hd)] = yardstick(arch, dtype, hd) if dtype != "fp32" else None
        for s, name in enumerate(names):
            fn = attnc.compile(SPECS / f"{name}.attn", **PARAMS[name])
            print(f"[{t * len(names) + s + 1}/{len(targets) * len(names)}] sm_{arch} {dtype} D={hd} {name} "
                  f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
            for r in fn.gpu_report(arch=arch, dtype=dtype, head_dim=hd):
                r.pop("cubin")
                ok = (r["spill_bytes"] == 0 and r["shared_bytes"] <= SHARED_LIMIT[arch] and r["tensor_cores"] != "none")
                rows.append({"spec": name, "arch": arch, "dtype": dtype, "head_dim": hd, "ok": ok,
                             "yardstick_loop": yard[(arch, dtype, hd)], **r})
    lines = [
        "# Kernel quality without a GPU: static reports (`fn.gpu_report`)",
        "",
        f"- Date: {dt.date.today()}; command: `python -m bench.kernel_quality{' --quick' if args.quick else ''}`",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"attnc {attnc.__version__}; tiles 64 x 64, warps and stages as launched (codegen/target.launch_config); "
        "integer arguments specialised as a launch on contiguous tensors with the bindings in PARAMS "
        "specialises them (codegen/target.signature)",
        "- Checks per kernel: no spills, shared memory within the target's limit "
        f"({', '.join(f'sm_{a} {v // 1024} KB' for a, v in SHARED_LIMIT.items())}), tensor cores for the matmuls.",
        "- Loops: SASS instructions per iteration of each main loop (forward: FULL tiles, then PARTIAL "
        "tiles; dQ likewise; dK/dV: one loop over the group's heads, holding both), and the forward "
        "loops' ratio to the yardstick (bench/yardstick.py, a plain FlashAttention-2 forward loop). "
        "Routed specs (biformer, moba): FULL tiles of one routing group, FULL tiles of several, "
        "PARTIAL. softplus in 16 bits: the first pass's FULL and PARTIAL loops, then the exact "
        "ones (codegen/emit._softplus_fast). float32 kernels that take tiles in pieces show one loop "
        "around the rest.",
        "",
        f"Passing all checks: {sum(r['ok'] for r in rows)} of {len(rows)} kernels.",
        "",
        *_summary(rows, yard),
        "",
        "| spec | target | kernel | regs | spill B | shared KB | tensor cores | loops | fwd loops / yardstick | ok |",
        "|---|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        ratio = " / ".join(f"{x / r['yardstick_loop']:.2f}" for x in r["loops"]) \
            if r["kernel"] == "attnc_fwd" and r["yardstick_loop"] else ""
        lines.append(f"| {r['spec']} | sm_{r['arch']} {r['dtype']} D={r['head_dim']} | {r['kernel']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['tensor_cores']} | "
                     f"{' / '.join(map(str, r['loops']))} | {ratio} | {'yes' if r['ok'] else '**no**'} |")
    lines += ["", "Yardstick loop (instructions): " + ", ".join(f"sm_{a} {d} D={h}: {n}" for (a, d, h), n in yard.items()
                                                            if n)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        stem = Path(args.out) / f"kernel-quality-{dt.date.today()}{'-quick' if args.quick else ''}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "yardstick": {f"sm_{a} {d} D={h}": n for (a, d, h), n in yard.items()}}, indent=1))
        print(f"wrote {stem}.md/.json", file=sys.stderr)
    return 0


def _summary(rows: list[dict], yard: dict) -> list[str]:
    """Forward loops (FULL / PARTIAL) against the yardstick, spec x target at head dim 128."""
    targets = [t for t, n in yard.items() if t[2] == 128 and n]
    out = ["Forward main loops at head dim 128, FULL / PARTIAL (routed: FULL of one group / of several / "
           "PARTIAL; softplus: first pass FULL / PARTIAL, exact FULL / PARTIAL), as multiples of the "
           "yardstick's loop:", "",
           "| spec | " + " | ".join(f"sm_{a} {d}" for a, d, _ in targets) + " |",
           "|---|" + "---|" * len(targets)]
    for name in sorted({r["spec"] for r in rows}):
        cells = []
        for a, d, h in targets:
            r = next((r for r in rows if (r["spec"], r["arch"], r["dtype"], r["head_dim"], r["kernel"])
                      == (name, a, d, h, "attnc_fwd")), None)
            cells.append(" / ".join(f"{x / yard[(a, d, h)]:.2f}" for x in r["loops"]) if r else "")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
