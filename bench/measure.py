"""One measurement of the analysis benchmark, in a process of its own.

    python -m bench.measure CASE JOB [--repeats R] [--budget S] [--deadline S]

JOB is one of: attnc (attnc.compile plus fn.tile_map), attnc-analysis (attnc.analysis.tiles.analyse
alone), flex-eager, flex-compiled (create_block_mask, plain or wrapped in torch.compile), pairs
(the exact visible-pair count) or validate (attnc and the mask_mod agree at a small size).
The driver (bench/analysis.py) starts one process per measurement, so that peak memory is the
measurement's own and a crash, an out-of-memory kill or a timeout loses only that measurement.
The result is one JSON line on stdout, prefixed with RESULT_MARK.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import BY_NAME, Case  # noqa: E402

RESULT_MARK = "BENCH-RESULT "
TILE = 64  # BLOCK_M = BLOCK_N for both systems: the tile efficiency figures are at 64
STARTED = time.monotonic()


# -- memory --------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak resident memory of this process during a block, above what it held at the start.

    Linux resets the high-water mark (VmHWM) when 5 is written to /proc/self/clear_refs, so the
    peak is the measurement's own, not the imports' or the setup's. Where that is refused, fall
    back to ru_maxrss, which then also covers whatever came before (said in `method`)."""

    def __enter__(self):
        gc.collect()
        self.base = _status_kib("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after reset"
        except OSError:
            self.method = "ru_maxrss (includes setup)"
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.increase_mb = max(0, peak - self.base) / 1024
        self.base_mb = self.base / 1024
        return False


# -- timing --------------------------------------------------------------------------------------
def timed(call, repeats: int, budget: float, deadline: float, compiled: bool):
    """Call `call` once, then `repeats` more times (up to 5x as many for quick calls) while the
    steady calls stay within `budget` seconds and the next call is expected to end before
    `deadline` (seconds since this process started). Returns the per-call times and the last result.

    With compiled=True the first call is the compilation: it is outside the budget, and one
    steady call is attempted whenever the deadline allows."""
    times, result = [], None
    while True:
        result = None  # drop the last result first, so that two never coexist in the peak
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
        steady = times[1:] if compiled else times
        # Enough calls: `repeats` after the first, and more (up to 5x) while they are too quick
        # for a median of a few to be steady (under 0.5 s in all).
        if len(times) > repeats and (sum(steady) >= 0.5 or len(times) > 5 * repeats):
            break
        if time.monotonic() - STARTED + times[-1] > 0.9 * deadline:
            break
        if steady and sum(steady) + times[-1] > budget:
            break
    return times, result


def summary(times: list[float], compiled: bool) -> dict:
    steady = times[1:] if compiled else times
    return {"times_s": times, "first_s": times[0], "calls": len(times),
            "median_s": statistics.median(steady) if steady else None}


def tile_counts(classes) -> dict:
    """EMPTY / PARTIAL / FULL counts of a [q tiles, kv tiles] class map (0 / 1 / 2)."""
    import numpy as np

    c = np.asarray(classes)
    return {"total": int(c.size), "partial": int((c == 1).sum()), "full": int((c == 2).sum())}


# -- jobs ----------------------------------------------------------------------------------------
def job_attnc(case: Case, a) -> dict:
    """What a user pays before the first kernel runs: compile (parse, bind, layout, analysis,
    kernel source) plus fn.tile_map(**tensors), where data-dependent tiles are classified."""
    import attnc

    warm = attnc.compile(case.spec, **case.small)  # imports, Triton, the kernel cache: not timed
    warm.tile_map(**case.attnc_tensors(case.small))
    tensors = case.attnc_tensors()
    parts = []

    def call():
        t0 = time.perf_counter()
        fn = attnc.compile(case.spec, **case.params)
        t1 = time.perf_counter()
        classes = fn.tile_map(**tensors)
        parts.append((t1 - t0, time.perf_counter() - t1))
        return fn, classes

    with PeakMemory() as mem:
        times, (fn, classes) = timed(call, a.repeats, a.budget, a.deadline, compiled=False)
    return {**summary(times, False), **memory(mem), "tiles": tile_counts(classes.numpy()),
            "layout": getattr(fn.layout, "name", None),
            "compile_median_s": statistics.median(p[0] for p in parts),
            "tile_map_median_s": statistics.median(p[1] for p in parts)}


def job_attnc_analysis(case: Case, a) -> dict:
    """attnc.analysis.tiles.analyse alone, on the compiled binding and layout, as pipeline.build
    calls it. Tiles that depend on runtime data are not decided here (see job_attnc)."""
    import attnc
    from attnc.analysis.tiles import analyse

    def prepared(params):
        # The reference backend binds and lays out without analysing, so setup stays cheap while
        # the analysis is O(N^2); should it stop carrying a layout, compile for real instead.
        fn = attnc.compile(case.spec, backend="reference", **params)
        if fn.layout is None:
            fn = attnc.compile(case.spec, **params)
        return fn.compiled.bound, fn.layout

    small_bound, small_layout = prepared(case.small)
    analyse(small_bound, TILE, TILE, small_layout)  # warm-up, not timed
    bound, layout = prepared(case.params)
    with PeakMemory() as mem:
        times, schedule = timed(lambda: analyse(bound, TILE, TILE, layout), a.repeats, a.budget, a.deadline,
                                compiled=False)
    classes = getattr(schedule, "classes", None)
    return {**summary(times, False), **memory(mem), "layout": getattr(layout, "name", None),
            "tiles": tile_counts(classes) if classes is not None else None}


def job_flex(case: Case, a, compiled: bool) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    n = case.tokens
    mask_mod = case.pattern.mask_mod(case.params)
    build = torch.compile(create_block_mask) if compiled else create_block_mask
    if not compiled:  # warm the eager path at a small size; compiled: the first call is the compile
        m = case.pattern.tokens(case.small)
        create_block_mask(case.pattern.mask_mod(case.small), 1, 1, m, m, device="cpu", BLOCK_SIZE=TILE)

    def call():
        return build(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=TILE)

    with PeakMemory() as mem:
        times, bm = timed(call, a.repeats, a.budget, a.deadline, compiled=compiled)
    partial = int(bm.kv_num_blocks.sum())
    full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
    tiles = {"total": math.ceil(n / TILE) ** 2, "partial": partial, "full": full}
    return {**summary(times, compiled), **memory(mem), "tiles": tiles}


def job_pairs(case: Case, a) -> dict:
    """Visible pairs, the numerator of tile efficiency for both systems. Up to 65,536 tokens: the
    mask_mod evaluated over row chunks (O(chunk * N) memory); above, the pattern's closed form.
    Where both exist they are compared."""
    n = case.tokens
    closed = case.pattern.pairs(case.params)
    if n > 65536:
        return {"pairs": closed, "method": "closed form"}
    import torch

    mask_mod = case.pattern.mask_mod(case.params)
    kv = torch.arange(n)[None, :]
    rows = max(1, (1 << 23) // n)
    count = 0
    with torch.no_grad():
        for start in range(0, n, rows):
            q = torch.arange(start, min(n, start + rows))[:, None]
            count += int(mask_mod(0, 0, q, kv).sum())
    return {"pairs": count, "method": "chunked mask_mod evaluation", "closed_form": closed,
            "closed_form_agrees": closed == count}


def job_validate(case: Case, a) -> dict:
    """At the case's small size: attnc's mask equals the mask_mod pair for pair; attnc's tile map
    is sound (never EMPTY over a visible pair, never FULL over a hidden one) in its own layout;
    Flex's block mask is exact; the closed-form pair count is right."""
    import numpy as np
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    import attnc

    p, n = case.small, case.pattern.tokens(case.small)
    idx = torch.arange(n)
    dense = case.pattern.mask_mod(p)(0, 0, idx[:, None], idx[None, :]).numpy()
    out = {"tokens": n, "closed_form_ok": case.pattern.pairs(p) == int(dense.sum())}

    fn = attnc.compile(case.spec, **p)
    tensors = case.attnc_tensors(p)
    out["attnc_mask_equal"] = bool(np.array_equal(fn.mask(**tensors).numpy(), dense))
    q_order, kv_order = fn.layout.q_order.numpy(), fn.layout.kv_order.numpy()
    want = exact_classes(dense[q_order][:, kv_order])
    got = fn.tile_map(**tensors).numpy()
    out["attnc_layout"] = fn.layout.name
    if got.shape == want.shape:
        out["attnc_empty_over_visible"] = int(((got == 0) & (want != 0)).sum())  # unsound
        out["attnc_full_over_hidden"] = int(((got == 2) & (want != 2)).sum())  # unsound
        out["attnc_conservative_tiles"] = int(((got == 1) & (want != 1)).sum())  # allowed, counted
        out["attnc_tiles_sound"] = out["attnc_empty_over_visible"] == out["attnc_full_over_hidden"] == 0
    else:
        out["attnc_tiles_sound"] = False
        out["attnc_tile_map_shape"] = [list(got.shape), list(want.shape)]

    bm = create_block_mask(case.pattern.mask_mod(p), 1, 1, n, n, device="cpu", BLOCK_SIZE=TILE)
    flex = np.zeros_like(want)
    for cls, num, ind in ((1, bm.kv_num_blocks, bm.kv_indices), (2, bm.full_kv_num_blocks, bm.full_kv_indices)):
        for r in range(flex.shape[0]):
            flex[r, ind[0, 0, r, :int(num[0, 0, r])].numpy()] = cls
    out["flex_tiles_exact"] = bool(np.array_equal(flex, exact_classes(dense)))
    out["ok"] = all(out[k] for k in ("closed_form_ok", "attnc_mask_equal", "attnc_tiles_sound", "flex_tiles_exact"))
    return out


def exact_classes(dense):
    """Brute-force tile classes of a dense bool mask (tokens a multiple of TILE here)."""
    import numpy as np

    nq, nk = dense.shape
    t = dense.reshape(nq // TILE, TILE, nk // TILE, TILE)
    return np.where(t.all(axis=(1, 3)), 2, np.where(t.any(axis=(1, 3)), 1, 0)).astype(np.int8)


def memory(mem: PeakMemory) -> dict:
    return {"peak_mb": mem.increase_mb, "base_rss_mb": mem.base_mb, "peak_method": mem.method}


JOBS = {
    "attnc": job_attnc,
    "attnc-analysis": job_attnc_analysis,
    "flex-eager": lambda c, a: job_flex(c, a, compiled=False),
    "flex-compiled": lambda c, a: job_flex(c, a, compiled=True),
    "pairs": job_pairs,
    "validate": job_validate,
}


def failure(err: BaseException) -> dict:
    """A failed measurement is a result: attnc refusing a size, Flex failing to allocate."""
    message = f"{type(err).__name__}: {err}".strip()
    if type(err).__name__ == "AttncError":
        status = "refused"
    elif isinstance(err, MemoryError) or "can't allocate memory" in message or "out of memory" in message.lower():
        status = "out of memory"
    else:
        status = "error"
    return {"status": status, "message": message[:4000], "traceback": traceback.format_exc()[-4000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(BY_NAME))
    ap.add_argument("job", choices=sorted(JOBS))
    ap.add_argument("--repeats", type=int, default=3, help="calls after the first, at most")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of repeated calls, at most")
    ap.add_argument("--deadline", type=float, default=600.0, help="the driver's timeout for this process")
    ap.add_argument("--small", action="store_true", help="measure at the case's small size (a smoke test)")
    a = ap.parse_args(argv)
    case = BY_NAME[a.case]
    if a.small:
        case = dataclasses.replace(case, params=case.small)
    try:
        result = {"status": "ok", **JOBS[a.job](case, a)}
    except Exception as err:  # noqa: BLE001 - every failure is reported, not raised
        result = failure(err)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
