"""`attnc tune FILE`: choose warps and stages per kernel for one compiled spec, head dim, dtype
and GPU, and keep the choice on disk so that every later launch of the same kernels uses it.

On a GPU the candidates are timed (forward: the forward call; backward: dQ and dK/dV together,
through a full backward), median of several runs. Without one, the choice is static: each
candidate is compiled for the target (codegen/target.gpu_report) and the one kept passes the
report's checks (no spills, shared memory within the target's limit, tensor cores): the default
launch config when it passes, else the deepest pipeline that does, then the shortest loops. Either way the choice is
written to `<cache dir>/tune/<kernel module>-t<tiles>-sm<arch>-<dtype>-d<head dim>.json`, read
by the launcher (backends/triton/launch.py `launch_options`) for kernels of that source and tile
shape, and shown by `attnc explain`. Timing runs the candidates through the normal launch path
(an override keyed by the kernel module): run it alone, not beside other launches of the spec.

Tiles are not tuned: the schedule is analysed for the compiled tile shape (`tiles=`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .codegen.target import KERNELS, SHARED_LIMIT, dtype_name, launch_config, tune_path
from .errors import AttncError

CANDIDATES = {
    "fwd": [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4)],
    "dq": [(4, 2), (4, 3), (8, 2), (8, 3)],
    "dkdv": [(4, 1), (4, 2), (8, 1), (8, 2)],
}


def _static(fn, arch: int, dtype, head_dim: int, progress) -> dict:
    """Per kernel the candidate that passes the static report (see the module docstring)."""
    configs = sorted({c for cands in CANDIDATES.values() for c in cands})
    reports = {}
    for n, (w, st) in enumerate(configs):
        progress(f"[{n + 1}/{len(configs)}] compiling for sm_{arch}: {w} warps, {st} stages")
        for r in fn.gpu_report(arch=arch, dtype=dtype, head_dim=head_dim, num_warps=w, num_stages=st):
            reports[(r["kernel"], w, st)] = r
    out = {}
    for kernel, name in KERNELS.items():
        default = launch_config(kernel, arch, head_dim, dtype, fn.schedule.block_m, fn.ir)

        def rank(c, name=name, default=default):
            r = reports[(name, *c)]
            fails = r["spill_bytes"] > 0 or r["shared_bytes"] > SHARED_LIMIT[arch] or r["tensor_cores"] == "none"
            # Instruction counts cannot weigh latency hiding, so the default wins when it passes;
            # otherwise the deepest pipeline that passes, then the shortest loops.
            return (fails, r["spill_bytes"], c != default, -c[1], sum(r["loops"]))

        best = min(CANDIDATES[kernel], key=rank)
        r = reports[(name, *best)]
        out[kernel] = {"num_warps": best[0], "num_stages": best[1], "how": "static",
                       "spill_bytes": r["spill_bytes"], "loop_instructions": r["loops"]}
    return out


def _timed(fn, dtype, head_dim: int, batch: int, heads: int, repeats: int, progress) -> dict:
    """Per kernel the fastest candidate on this GPU (median of `repeats` runs)."""
    import torch

    from .backends.triton import launch
    from .benchmark import median_seconds, random_tensors

    dt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype_name(dtype)])
    b = fn.compiled.bound
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to("cuda", dt).requires_grad_()
               for n in (b.nq, b.nk, b.nk))
    tensors = random_tensors(fn, heads, g, torch.device("cuda"))
    dout = torch.randn(batch, heads, b.nq, head_dim, device="cuda", dtype=dt)

    def forward():
        with torch.no_grad():
            fn(q, k, v, **tensors)

    def backward():
        out = fn(q, k, v, **tensors)
        out.backward(dout)

    out, chosen = {}, {}
    stem = fn.compiled.kernel_path.stem
    plan = [("fwd", ["fwd"], forward, [(c,) for c in CANDIDATES["fwd"]]),
            ("bwd", ["dq", "dkdv"], backward, [(a, d) for a in CANDIDATES["dq"] for d in CANDIDATES["dkdv"]])]
    for what, kernels, call, grid in plan:
        best = None
        for n, combo in enumerate(grid):
            launch.OVERRIDE.update({(stem, k): c for k, c in {**chosen, **dict(zip(kernels, combo))}.items()})
            try:
                ms = median_seconds(call, repeats, torch.device("cuda")) * 1e3
            except Exception as err:  # a config that does not fit this GPU (shared memory): skip it
                progress(f"[{what} {n + 1}/{len(grid)}] {combo}: failed ({type(err).__name__})")
                continue
            finally:
                launch.OVERRIDE.clear()
            progress(f"[{what} {n + 1}/{len(grid)}] {combo}: {ms:.3f} ms")
            if best is None or ms < best[0]:
                best = (ms, combo)
        if best is None:
            raise AttncError(f"no {what} launch config ran on this GPU")
        for kernel, c in zip(kernels, best[1]):
            chosen[kernel] = c
            out[kernel] = {"num_warps": c[0], "num_stages": c[1], "how": "timed", "median_ms": best[0]}
    return out


def tune(fn, head_dim: int, dtype, arch: int | None = None, batch: int = 1, heads: int = 8, repeats: int = 10,
         progress=print) -> tuple[dict, Path]:
    """Tune `fn`'s kernels for head dim `head_dim` and `dtype`: timed on this process's GPU when
    there is one and `arch` is None or its own, else statically for sm_`arch` (90 by default).
    Returns the choice and the file it was written to."""
    import torch

    from .settings import settings

    if fn.compiled.schedule is None:
        raise AttncError("the reference backend has no kernels to tune; compile with backend='triton'")
    gpu = torch.cuda.is_available() and not settings().interpret
    own = None
    if gpu:
        major, minor = torch.cuda.get_device_capability()
        own = major * 10 + minor
    arch = own if arch is None and gpu else (arch or 90)
    if arch not in SHARED_LIMIT and arch != own:
        raise AttncError(f"arch {arch} is not a target attnc reports on; choose one of {sorted(SHARED_LIMIT)}")
    kernels = (_timed(fn, dtype, head_dim, batch, heads, repeats, progress) if gpu and arch == own
               else _static(fn, arch, dtype, head_dim, progress))
    s = fn.compiled.schedule
    path = tune_path(settings().cache_dir, fn.compiled.kernel_path.stem, (s.block_m, s.block_n), arch, dtype, head_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": fn.ir.name, "arch": arch, "dtype": dtype_name(dtype), "head_dim": head_dim,
                               "kernels": kernels}, indent=1))
    tmp.replace(path)
    from .backends.triton import launch

    launch._TUNED.clear()  # launches in this process see the new choice
    return kernels, path
