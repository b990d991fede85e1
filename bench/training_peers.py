"""The training benchmark's systems (bench/training.py), inside the child process of one case: a
runner per system (attnc, FlexAttention, SDPA), each a callable run(q, k, v, tables) -> out; the
forward and forward + backward calls built on it; the timing of one (system, mode); and the
correctness check of attnc's output and gradients against the peers' and a reference.

A measurement that cannot run is a result: describe_error makes an exception "failed: <message>"
or "skipped: <reason>". No torch at module level: the child passes it in, once TRITON_INTERPRET
is set.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from bench.analysis import attnc_source, fmt_duration, fmt_time
from bench.cases import ROOT
from bench.training_cases import LABEL, MODE_LABEL, MODES, NOT_EXPRESSIBLE, SYSTEMS, Case, n_tokens, spec_params


# -- one case, in the child process -------------------------------------------------------------
class CaseRun:
    """Measures one case; the record is rewritten to `path` after every step, so a child killed
    at its time limit leaves what it measured."""

    def __init__(self, case: Case, a):
        self.case, self.a, self.path = case, a, Path(a.child_out)
        self.deadline = a.deadline
        self.rec: dict = {"name": case.name, "title": case.title, "spec": f"specs/{case.spec}", "systems": {},
                          "attnc_source_before": attnc_source()}
        self.kept: dict = {}  # (system, mode) -> outputs and gradients of the last timed call

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rec, default=str))
        os.replace(tmp, self.path)

    def say(self, what: str):
        sys.stderr.write(f"[{self.a.index}] {self.case.name} · {what}   "
                         f"[run {fmt_duration(time.time() - self.a.t0)}]\n")
        sys.stderr.flush()

    def time_left(self) -> float:
        return self.deadline - time.time()


def describe_error(err: BaseException) -> tuple[str, str]:
    """(status, one-line message) of an exception. A NotImplementedError anywhere in the chain
    (Flex has no CPU backward; Dynamo and Inductor wrap it) means the peer cannot run this here:
    "skipped". Anything else, an AttncError included, "failed"."""
    chain, e = [], err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(err).split())
    if "LoweringException" in text and " target: " in text:  # Inductor appends its IR: drop it
        text = text.split(" target: ")[0]
    message = f"{type(err).__name__}: {text}"[:600]
    unsupported = next((x for x in chain if isinstance(x, NotImplementedError)), None)
    if unsupported is not None and unsupported is not err:
        message = f"{type(unsupported).__name__}: {' '.join(str(unsupported).split())}"[:600]
    elif unsupported is None and "NotImplementedError(" in text:  # Dynamo quotes the error it observed
        message = "NotImplementedError: " + text.split("NotImplementedError(", 1)[1].split("')")[0].strip("'\"")
    if unsupported is not None or "NotImplementedError" in text:
        return "skipped", message
    return "failed", message


# Errors after which the CUDA context is unusable: the child stops, and the driver reruns the
# systems not yet measured in a fresh process.
FATAL_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure", "illegal instruction",
              "misaligned address", "CUDA error: an illegal", "uncorrectable ECC", "CUDA error: unknown error")


def fatal(cuda: bool, message: str) -> bool:
    return cuda and any(f.lower() in message.lower() for f in FATAL_CUDA)


# -- systems: each a callable run(q, k, v, tables) -> out ----------------------------------------
def setup_systems(run: CaseRun, torch, attnc, p: dict, mask_mod, ints: dict, pairs: int, device, dtype,
                  cuda: bool) -> dict | None:
    """The runner of each selected system that can run the case; one that cannot, or whose setup
    fails, gets its result in the record instead. None after an error that leaves the CUDA context
    unusable (the driver reruns the other systems in a fresh process)."""
    a, case, rec = run.a, run.case, run.rec
    n = n_tokens(case, p)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runners, setup = {}, {s: {} for s in SYSTEMS}
    wanted = [s for s in a.systems.split(",") if s in SYSTEMS]
    for system in SYSTEMS:
        reason = NOT_EXPRESSIBLE.get((system, case.kind))
        if system not in wanted:
            reason = "not selected (--systems)"
        if reason:
            rec["systems"][system] = {m: {"status": "skipped", "message": reason} for m in MODES}
            continue
        try:
            t0 = time.perf_counter()
            if system == "attnc":
                runners[system] = make_attnc(attnc, case, p, ints, setup[system], pairs)
            elif system == "flex":
                runners[system] = make_flex(torch, case, p, mask_mod, n, device, a.flex, setup[system])
            else:
                runners[system] = make_sdpa(torch, case, mask_mod, n, device, dtype, setup[system])
            sync()
            setup[system]["setup_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - recorded, not raised
            status, message = describe_error(err)
            rec["systems"][system] = {m: {"status": status, "message": f"setup: {message}",
                                          "traceback": traceback.format_exc()[-3000:]} for m in MODES}
            run.say(f"{LABEL[system]} setup {status}: {message}")
            if fatal(cuda, message):
                run.save()
                return None
        rec["systems"].setdefault(system, {})["setup"] = setup[system]
        if "mask_pairs" in setup[system]:
            rec["pairs"]["attnc_mask_count"] = setup[system]["mask_pairs"]
            rec["pairs"]["agree"] = rec["pairs"]["agree"] and setup[system]["mask_pairs"] == pairs
            if setup[system]["mask_pairs"] != pairs:
                run.say(f"ATTNC'S MASK COUNTS {setup[system]['mask_pairs']:,} PAIRS, the closed form {pairs:,}")
        run.save()
    return runners


def forward(torch, f, q, k, v, tables):
    """One forward call under no_grad."""
    def call():
        with torch.no_grad():
            return f(q, k, v, tables)
    return call


def forward_backward(torch, f, q, k, v, tables, dout):
    """One forward call with q, k, v and the float tables requiring grad, then the gradients of
    the output against them for `dout`: (out, {name: gradient or None})."""
    leaves = {"q": q, "k": k, "v": v, **tables}
    leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    qg, kg, vg = leaves["q"], leaves["k"], leaves["v"]
    tg = {name: leaves[name] for name in tables}

    def call():
        out = f(qg, kg, vg, tg)
        grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
        return out, dict(zip(leaves, grads))
    return call


def make_attnc(attnc, case, p, ints, info, pairs):
    t0 = time.perf_counter()
    fn = attnc.compile(ROOT / "specs" / case.spec, **spec_params(p))
    info["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    classes = fn.tile_map(**{k: t.cpu() for k, t in ints.items()}).numpy()
    info["tile_map_s"] = time.perf_counter() - t0
    sched = fn.schedule
    computed, full = int((classes > 0).sum()), int((classes == 2).sum())
    info.update(layout=getattr(fn.layout, "name", None), tile=[sched.block_m, sched.block_n],
                tiles={"total": int(classes.size), "computed": computed, "full": full},
                tile_efficiency=pairs / max(1, computed * sched.block_m * sched.block_n))

    if fn.compiled.bound.nq <= 4096:  # small: attnc's own dense mask counts the pairs too
        info["mask_pairs"] = int(fn.mask(**{k: t.cpu() for k, t in ints.items()}).sum())

    def run(q, k, v, tables):
        return fn(q, k, v, **tables, **ints)
    return run


def make_flex(torch, case, p, mask_mod, n, device, mode, info):
    from torch.nn.attention import flex_attention as fa

    aux_request = getattr(fa, "AuxRequest", None)
    t0 = time.perf_counter()
    block_mask = fa.create_block_mask(mask_mod, None, None, n, n, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    info["block_mask_s"] = time.perf_counter() - t0
    blk = block_mask.BLOCK_SIZE
    partial = int(block_mask.kv_num_blocks.sum())
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    info.update(tile=list(blk) if isinstance(blk, tuple) else [blk, blk],
                tiles={"total": math.ceil(n / info_tile(blk, 0)) * math.ceil(n / info_tile(blk, 1)),
                       "computed": partial + full, "full": full}, mode=mode)
    kind, cap = case.kind, p.get("cap")

    def core(q, k, v, block_mask, slopes=None, sinks=None):
        score_mod = None
        if kind == "alibi":
            def alibi(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx)
            score_mod = alibi
        elif kind == "softcap_sink":
            def softcap(score, b, h, q_idx, kv_idx):
                return cap * torch.tanh(score / cap)
            score_mod = softcap
        if sinks is None:
            return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        # A sink is a virtual key with logit sinks[h] and value 0: rescale by exp(lse) / (exp(lse) + exp(sink)).
        if aux_request is not None:
            out, aux = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                         return_aux=aux_request(lse=True))
            lse = aux.lse
        else:  # older torch
            out, lse = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
        weight = torch.sigmoid(lse - sinks[None, :, None].to(lse.dtype))
        return (out.float() * weight[..., None]).to(out.dtype)

    compiled = torch.compile(core, dynamic=False, fullgraph=True) if mode == "compiled" else core

    def run(q, k, v, tables):
        return compiled(q, k, v, block_mask, **tables)
    return run


def info_tile(blk, axis):
    return blk[axis] if isinstance(blk, tuple) else blk


def make_sdpa(torch, case, mask_mod, n, device, dtype, info):
    import torch.nn.functional as F

    if case.kind == "causal" or case.kind == "sigmoid":
        info["mask"] = "is_causal=True"
        return lambda q, k, v, tables: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    idx = torch.arange(n, device=device)
    t0 = time.perf_counter()
    dense = mask_mod(0, 0, idx[:, None], idx[None, :]).expand(n, n).contiguous()
    if case.kind == "alibi":
        # The bias depends on the slopes, so it is rebuilt inside every call (the gradient to the
        # slopes flows through it); only the distances are prepared here.
        dist = (idx[:, None] - idx[None, :]).to(torch.float32)
        info["mask"] = "float mask [1, H, N, N] = where(causal, -slopes[h] * (i - j), -inf) built in each call"
        neg_inf = torch.tensor(float("-inf"), device=device, dtype=dtype)

        def alibi(q, k, v, tables):
            bias = torch.where(dense, (-tables["slopes"][:, None, None] * dist).to(dtype), neg_inf)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        run = alibi
    else:
        info["mask"] = "dense bool mask [N, N]"

        def run(q, k, v, tables):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if device.type == "cuda":
        torch.cuda.synchronize()
    info["mask_build_s"] = time.perf_counter() - t0
    return run


# -- timing --------------------------------------------------------------------------------------
def measure(run: CaseRun, torch, system: str, mode: str, call, flops: float, cuda: bool) -> bool:
    """First call (compilation included) timed alone; then warm-up calls; then the timed calls:
    CUDA events around each call on GPU, perf_counter on CPU. Keeps the last call's results.
    Returns False after an error that leaves the CUDA context unusable."""
    a, slot = run.a, run.rec["systems"].setdefault(system, {})
    label = f"{LABEL[system]} {MODE_LABEL[mode]}"
    if run.time_left() < a.reserve:
        slot[mode] = {"status": "skipped", "message": f"the case's time limit was reached ({a.limit:.0f} s; --budget)"}
        run.say(f"{label}: skipped (time)")
        run.save()
        return True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run.say(f"{label} ...")
    try:
        t0 = time.perf_counter()
        result = call()
        sync()
        first = time.perf_counter() - t0
        for _ in range(a.warmup):
            result = call()
        sync()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < a.repeats:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                result = call()
                times.append(time.perf_counter() - t)
            spent = time.perf_counter() - started
            if len(times) >= 3 and (spent > a.measure_budget or run.time_left() < a.reserve):
                break
        median = statistics.median(times)
        slot[mode] = {"status": "ok", "first_s": first, "times_s": times, "median_s": median, "calls": len(times),
                      "tflops": flops / median / 1e12}
        out, grads = result if mode == "fwd_bwd" else (result, {})
        missing = [name for name, g in grads.items() if g is None]
        if missing:
            slot[mode]["no_gradient_for"] = missing
        run.kept[(system, mode)] = (out.detach(), {k: g.detach() for k, g in grads.items() if g is not None})
        run.say(f"{label}: {fmt_time(median)} · {slot[mode]['tflops']:.3g} TFLOP/s (first call {fmt_time(first)})"
                + (f"; no gradient for {', '.join(missing)}" if missing else ""))
    except Exception as err:  # noqa: BLE001 - a failure is a result
        status, message = describe_error(err)
        slot[mode] = {"status": status, "message": message, "traceback": traceback.format_exc()[-3000:]}
        run.say(f"{label}: {status}: {message}")
        if fatal(cuda, message):
            run.save()
            return False
        if cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as again:  # noqa: BLE001 - the context is gone after all
                if fatal(cuda, str(again)):
                    run.save()
                    return False
    run.save()
    return True


# -- correctness ---------------------------------------------------------------------------------
def rel_err(torch, a, b) -> float:
    """max |a - b| / max |b|: the error relative to the reference's largest magnitude."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(torch, mine, ref, tol) -> dict:
    """Compare attnc's (out, grads) with a reference's; gradients where both have them."""
    (out, grads), (r_out, r_grads) = mine, ref
    errs = {"out": rel_err(torch, out, r_out)}
    for name in r_grads:
        if name in grads:
            errs["d" + name] = rel_err(torch, grads[name], r_grads[name])
    bad = [k for k, e in errs.items() if not e <= (tol["out"] if k == "out" else tol["grad"])]
    return {"errors": errs, "ok": not bad, "over_tolerance": bad,
            "grads_compared": len(errs) > 1}


def check(run: CaseRun, torch, attnc, case, p, inputs, tables, ints) -> dict:
    """attnc's output and gradients against each peer's, from the last timed calls (the same
    inputs); at small sizes also against attnc's float64 reference backend; for sigmoid (no peer)
    against a dense float32 PyTorch expression on batch 0, heads 0-1."""
    q, k, v, dout = inputs
    tol = {"out": 2e-3, "grad": 2e-3} if run.a.smoke else {"out": 3e-2, "grad": 6e-2}
    res: dict = {"tolerance": tol, "metric": "max |attnc - ref| / max |ref|"}
    mine = run.kept.get(("attnc", "fwd_bwd"))
    if mine is None and ("attnc", "fwd") in run.kept:
        mine = run.kept[("attnc", "fwd")]
        res["attnc_gradients"] = "none: attnc's forward+backward did not run (see its status)"
    if mine is None:
        res["status"] = "not checked: attnc produced no output"
        run.say(res["status"])
        return res
    try:
        for peer in ("flex", "sdpa"):
            ref = run.kept.get((peer, "fwd_bwd")) or run.kept.get((peer, "fwd"))
            if ref is not None:
                res[f"vs_{peer}"] = compare(torch, mine, ref, tol)
        if case.kind == "sigmoid":
            res["vs_dense_slice"] = compare(torch, sliced(mine), dense_sigmoid(torch, q, k, v, dout), tol)
        n, B, H = q.shape[2], q.shape[0], q.shape[1]
        if B * H * n * n <= 1 << 22:  # small: the dense float64 reference of attnc itself
            ref_fn = attnc.compile(ROOT / "specs" / case.spec, backend="reference", **spec_params(p))
            leaves = {name: t.detach().double().requires_grad_() for name, t in
                      {"q": q, "k": k, "v": v, **tables}.items()}
            out = ref_fn(leaves["q"], leaves["k"], leaves["v"], **{t: leaves[t] for t in tables}, **ints)
            grads = torch.autograd.grad(out, list(leaves.values()), dout.double(), allow_unused=True)
            res["vs_reference_float64"] = compare(
                torch, mine, (out, {n_: g for n_, g in zip(leaves, grads) if g is not None}), tol)
    except Exception as err:  # noqa: BLE001
        res["error"] = describe_error(err)[1]
    checked = [key for key in res if key.startswith("vs_")]
    res["ok"] = bool(checked) and all(res[key]["ok"] for key in checked) and "error" not in res
    summary = "; ".join(f"{key[3:]}: " + " ".join(f"{n_} {e:.1e}" for n_, e in res[key]["errors"].items())
                        + ("" if res[key]["ok"] else " OVER TOLERANCE") for key in checked)
    run.say(f"check {'ok' if res['ok'] else 'FAILED'} ({summary or res.get('error', 'nothing to compare')})")
    return res


def sliced(result):
    out, grads = result
    return out[:1, :2], {name: g[:1, :2] for name, g in grads.items() if name in ("q", "k", "v")}


def dense_sigmoid(torch, q, k, v, dout):
    """specs/sigmoid_causal.attn written out densely: sigmoid(q.k / sqrt(d) - log N) on visible
    pairs, no normalisation, times v. float32, batch 0, heads 0-1 (the full problem is too big)."""
    n, d = q.shape[2], q.shape[3]
    leaves = [t[:1, :2].detach().float().requires_grad_() for t in (q, k, v)]
    qs, ks, vs = leaves
    s = (qs @ ks.transpose(-1, -2)) / math.sqrt(d) - math.log(n)
    idx = torch.arange(n, device=q.device)
    w = torch.where(idx[:, None] >= idx[None, :], torch.sigmoid(s), torch.zeros((), device=q.device))
    out = w @ vs
    grads = torch.autograd.grad(out, leaves, dout[:1, :2].float())
    return out, dict(zip("qkv", grads))
