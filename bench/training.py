"""Training benchmark: attnc's Triton kernels, forward and forward + backward, against
FlexAttention (compiled) and PyTorch SDPA, on the same masks, inputs and run.

    python -m bench.training --out bench/results      # GPU: every case, bf16 (~6-8 min on an H100)
    python -m bench.training --smoke --out /tmp/tr    # every case at 128-256 tokens, float32, on CPU
    python -m bench.training --only causal_8k,alibi_causal
    python bench/training.py --help                   # options and case names

Each case runs in a process of its own (a kernel that faults loses one case, not the run), with
a time limit taken from --budget. Per case: exact visible-pair count, attnc compile and tiles,
Flex's create_block_mask, then for attnc, Flex and SDPA the median time of a forward (no grad)
and of a forward + backward (torch.autograd.grad of the output against q, k, v and any float
table), TFLOP/s of the visible work, the ratio attnc/peer, and one correctness check (attnc's
output and gradients against Flex's, SDPA's, and at smoke sizes attnc's float64 reference).
A measurement that cannot run is a result: "failed: <message>" or "skipped: <reason>".
Writes <out>/training-<date>.json and .md (suffixed -smoke / -only-...). See bench/README.md.

This module is the driver (options, one process per case, budgets, the result files) and the
child's outline; the cases, inputs and pair counts are in bench/training_cases.py, the systems'
runners, timing and correctness check in bench/training_peers.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# No torch at module level: under --smoke, TRITON_INTERPRET must be set before torch and Triton load.
from bench.analysis import attnc_source, fmt_duration, fmt_time, machine  # noqa: E402
from bench.cases import ROOT  # noqa: E402
from bench.training_cases import (  # noqa: E402
    BWD_FACTOR, BY_NAME, CASES, MODE_LABEL, MODES, SYSTEMS, Case, closed_form_pairs, make_inputs, mask_mod_count,
    mask_mod_for, n_tokens, spec_params)
from bench.training_peers import (  # noqa: E402
    CaseRun, check, fatal, forward, forward_backward, measure, setup_systems)

# The child's exit status after an error that leaves the CUDA context unusable: the driver reruns
# the systems not yet measured in a fresh process.
EXIT_FATAL = 3


# -- one case, in a child process ----------------------------------------------------------------
def child(a) -> int:
    if a.smoke:  # before torch or Triton are imported (the driver sets it too)
        os.environ["TRITON_INTERPRET"] = "1"
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # eager Flex warns on every call that it is unfused
    case = BY_NAME[a.child]
    run = CaseRun(case, a)
    rec, p = run.rec, case.smoke if a.smoke else case.gpu
    cuda = not a.smoke
    if cuda and not torch.cuda.is_available():
        rec["error"] = "no CUDA device (use --smoke for the CPU check of the harness)"
        run.save()
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if isinstance(getattr(torch._dynamo.config, limit, None), int):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    import attnc

    n, B, H, D = n_tokens(case, p), p["batch"], p["heads"], p["dim"]
    rec.update(params=spec_params(p), shape={"batch": B, "heads": H, "tokens": n, "dim": D},
               dtype=str(dtype).replace("torch.", ""), device=str(device),
               device_name=torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter for attnc)",
               cuda=torch.version.cuda if cuda else None)
    (q, k, v, dout), tables, ints, documents = make_inputs(torch, case, p, device, dtype)
    if documents is not None:
        rec["documents"] = documents
    mask_mod = mask_mod_for(case, p, ints.get("doc"))

    # Visible pairs: the closed form, checked against the mask_mod evaluated in row chunks (and,
    # at small sizes, attnc's own dense mask).
    pairs = closed_form_pairs(case, p)
    counted = mask_mod_count(torch, mask_mod, n, device)
    rec["pairs"] = {"pairs": pairs, "mask_mod_count": counted, "agree": counted == pairs}
    flops_fwd = 4 * pairs * D * B * H  # QK^T and PV over visible pairs: 2 matmuls x 2 flops per MAC
    rec["flops"] = {"fwd": flops_fwd, "fwd_bwd": flops_fwd * (1 + BWD_FACTOR)}
    run.say(f"{B}×{H}×{n}×{D} {rec['dtype']} on {rec['device_name']}, {pairs:,} visible pairs per head"
            + ("" if counted == pairs else f" (MASK_MOD COUNTS {counted:,})"))
    run.save()

    runners = setup_systems(run, torch, attnc, p, mask_mod, ints, pairs, device, dtype, cuda)
    if runners is None:
        return EXIT_FATAL
    for mode in MODES:
        for system in SYSTEMS:
            if system not in runners:
                continue
            if mode == "fwd":
                call = forward(torch, runners[system], q, k, v, tables)
            else:
                call = forward_backward(torch, runners[system], q, k, v, tables, dout)
            if not measure(run, torch, system, mode, call, rec["flops"][mode], cuda):
                return EXIT_FATAL  # the CUDA context is gone: the driver reruns the other systems

    rec["check"] = check(run, torch, attnc, case, p, (q, k, v, dout), tables, ints)
    rec["attnc_source_after"] = attnc_source()
    run.save()
    return 0


# -- the driver ----------------------------------------------------------------------------------
def run_child(case: Case, index: str, limit: float, systems: str, opts, t0: float) -> tuple[dict | None, str | None, int]:
    """One child process for `case` (own session), killed after `limit` seconds plus a grace.
    Returns its record (partial if it was killed; None if it wrote none), why it ended early, and its exit status."""
    with tempfile.TemporaryDirectory(prefix="attnc-training-") as tmp:
        out = Path(tmp) / "case.json"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if opts.smoke:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "bench.training", "--child", case.name, "--child-out", str(out),
               "--deadline", str(time.time() + limit), "--limit", str(limit), "--index", index, "--t0", str(t0),
               "--repeats", str(opts.repeats), "--warmup", str(opts.warmup), "--measure-budget",
               str(opts.measure_budget), "--reserve", str(opts.reserve), "--systems", systems,
               "--flex", opts.flex] + (["--smoke"] if opts.smoke else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        verdict = None
        try:
            proc.wait(timeout=limit + opts.grace)
        except subprocess.TimeoutExpired:
            verdict = f"killed after {limit + opts.grace:.0f} s (the case's time limit, from --budget)"
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                except ProcessLookupError:
                    pass
                proc.wait()
        try:
            rec = json.loads(out.read_text())
        except (OSError, ValueError):
            rec = None
    code = proc.returncode
    if verdict is None and code == EXIT_FATAL:
        verdict = "a CUDA error left the context unusable"
    elif verdict is None and code:
        verdict = f"the process died ({f'signal {-code}' if code < 0 else f'exit status {code}'})"
    return rec, verdict, code


def run_case(case: Case, index: str, limit: float, opts, t0: float) -> dict:
    """A case in a child process; if that one ends early (a fatal CUDA error, a crash), the systems
    it did not measure get a fresh process with the time left."""
    started = time.monotonic()
    wanted = [s for s in opts.systems.split(",") if s in SYSTEMS]
    rec, verdict, code = run_child(case, index, limit, ",".join(wanted), opts, t0)
    rec = rec or {"name": case.name, "title": case.title, "spec": f"specs/{case.spec}", "systems": {}}
    events = []
    if verdict:
        events.append(verdict)
        # Systems with a mode not measured yet, except one whose error was the fatal one.
        faulted = {s for s in wanted for m in MODES
                   if fatal(True, rec["systems"].get(s, {}).get(m, {}).get("message", ""))}
        todo = [s for s in wanted if s not in faulted
                and any(rec["systems"].get(s, {}).get(m, {}).get("status") is None for m in MODES)]
        left = limit - (time.monotonic() - started)
        if todo and not verdict.startswith("killed after") and left > 30:
            sys.stderr.write(f"[{index}] {case.name} · rerunning {', '.join(todo)} in a fresh process\n")
            again, verdict2, _ = run_child(case, index, left, ",".join(todo), opts, t0)
            if again:
                for s in todo:
                    rec["systems"][s] = again["systems"].get(s, {})
                for key, value in again.items():
                    rec.setdefault(key, value)
            events.append(f"rerun of {', '.join(todo)}: " + (verdict2 or "completed"))
        if faulted:  # the check needs attnc's and the peers' results from one process
            rec["check"] = {"status": f"not checked: {', '.join(sorted(faulted))} hit a fatal CUDA error"}
    if events:
        rec["process"] = "; ".join(events)
    rec["wall_s"] = time.monotonic() - started
    rec.setdefault("title", case.title)
    for system in SYSTEMS:  # whatever did not get measured says why
        slot = rec["systems"].setdefault(system, {})
        for mode in MODES:
            if system not in wanted:
                slot.setdefault(mode, {"status": "skipped", "message": "not selected (--systems)"})
            status = "timed out" if "killed after" in rec.get("process", "") else "failed"
            slot.setdefault(mode, {"status": status, "message": rec.get("error") or rec.get("process")
                                   or "not measured"})
    return rec


def derive(rec: dict) -> dict:
    """attnc / peer = attnc TFLOP/s / peer TFLOP/s = peer time / attnc time (above 1: attnc faster)."""
    out = {}
    for mode in MODES:
        mine = rec["systems"].get("attnc", {}).get(mode, {})
        for peer in ("flex", "sdpa"):
            theirs = rec["systems"].get(peer, {}).get(mode, {})
            ok = mine.get("status") == "ok" and theirs.get("status") == "ok"
            out[f"{mode} attnc/{peer}"] = theirs["median_s"] / mine["median_s"] if ok else None
    return out


class Notes:
    def __init__(self):
        self.items: list[str] = []

    def ref(self, text: str) -> int:
        text = text.replace("\n", " ").replace("|", "\\|")
        if text not in self.items:
            self.items.append(text)
        return self.items.index(text) + 1


def cell(r: dict | None, notes: Notes) -> str:
    if not r:
        return "—"
    if r.get("status") == "ok":
        return f"{fmt_time(r['median_s'])} · {r['tflops']:.3g} TF/s"
    return f"{r['status']} [{notes.ref(r['status'] + ': ' + r.get('message', ''))}]"


def ratio(x) -> str:
    return "—" if x is None else f"{x:.3g}×"


def tolerance(report: dict) -> str:
    tol = next((r["check"]["tolerance"] for r in report["cases"] if (r.get("check") or {}).get("tolerance")), None)
    return "—" if tol is None else f"{tol['out']:g} for the output, {tol['grad']:g} for gradients"


def markdown(report: dict) -> str:
    m, o, notes = report["machine"], report["options"], Notes()
    git = m.get("attnc_git") or {}
    dev = next((r for r in report["cases"] if r.get("device_name")), {})
    sources = {r.get("attnc_source_before") for r in report["cases"]} | {
        r.get("attnc_source_after") for r in report["cases"] if r.get("attnc_source_after")}
    sources.discard(None)
    lines = [
        "# Training benchmark: attnc vs FlexAttention and SDPA, forward and forward+backward",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}",
        f"- Device: {dev.get('device_name', '?')}" + (f", CUDA {dev['cuda']}" if dev.get("cuda") else "")
        + f"; dtype {dev.get('dtype', '?')}",
        f"- Versions: Python {m['python']}, torch {m['torch']}, triton {m['triton']}, numpy {m['numpy']}, "
        f"attnc {m['attnc']} (commit {(git.get('commit') or '?')[:12]}"
        f"{', attnc/ modified' if git.get('attnc_modified') else ''})",
        ("- attnc source hash (attnc/*.py): `" + next(iter(sources)) + "`") if len(sources) == 1 else
        f"- **attnc's source changed during the run**: {len(sources)} states ({', '.join(sorted(sources))})",
        f"- Flex: `flex_attention` {'compiled (torch.compile, fullgraph)' if o['flex'] == 'compiled' else 'eager'}"
        f", `create_block_mask` at its default block size; SDPA: `torch.nn.functional.scaled_dot_product_attention`.",
        f"- Times: median of up to {o['repeats']} calls after {o['warmup']} warm-up call(s) and a first call "
        f"(compilation), {'CUDA events around each call' if dev.get('cuda') else 'time.perf_counter'}; "
        f"forward under no_grad, forward+backward = output plus torch.autograd.grad against q, k, v and float tables.",
        f"- TF/s = visible work / time: forward 4 · pairs · D · B · H FLOPs, backward {BWD_FACTOR}× forward "
        f"(FlashAttention's count), so forward+backward = {1 + BWD_FACTOR}× forward; dense SDPA is credited with the "
        f"visible pairs only. attnc/peer = peer time / attnc time (above 1: attnc is faster).",
        "",
    ]
    for mode in MODES:
        lines += [f"## {MODE_LABEL[mode].capitalize()}", "",
                  "| case | B × H × N × D | visible pairs / head | attnc | FlexAttention | SDPA | attnc/Flex | attnc/SDPA |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for rec in report["cases"]:
            sh, s, d = rec.get("shape"), rec["systems"], rec.get("derived", {})
            pairs = rec.get("pairs", {})
            pc = f"{pairs['pairs']:,}" + ("" if pairs.get("agree", True) else " (MISMATCH)") if pairs else "—"
            lines.append("| " + " | ".join([
                rec["name"], f"{sh['batch']} × {sh['heads']} × {sh['tokens']:,} × {sh['dim']}" if sh else "—", pc,
                *(cell(s.get(x, {}).get(mode), notes) for x in SYSTEMS),
                ratio(d.get(f"{mode} attnc/flex")), ratio(d.get(f"{mode} attnc/sdpa"))]) + " |")
        lines.append("")
    lines += ["## Correctness (once per case, from the timed calls' results)", "",
              "Relative error max |attnc − ref| / max |ref| of the output and of each gradient (dq, dk, dv, "
              "d<table>); tolerance " + tolerance(report) + ". ref: Flex, SDPA; at small sizes also "
              "attnc's float64 reference backend; for sigmoid, a dense float32 PyTorch expression on batch 0, heads 0–1.",
              "", "| case | vs Flex | vs SDPA | vs reference / dense | verdict |", "|---|---|---|---|---|"]
    for rec in report["cases"]:
        c = rec.get("check") or {}

        def errs(key):
            r = c.get(key)
            if not r:
                return "—"
            return " ".join(f"{k} {e:.1e}" for k, e in r["errors"].items()) + ("" if r["ok"] else " **over**")
        ref = errs("vs_reference_float64") if "vs_reference_float64" in c else errs("vs_dense_slice")
        verdict = ("ok" if c.get("ok") else "**FAILED**" if any(k.startswith("vs_") for k in c) else
                   c.get("status", "not checked"))
        if c.get("attnc_gradients"):
            verdict += " (outputs only: attnc has no gradients)"
        if c.get("error"):
            verdict += f" [{notes.ref('check: ' + c['error'])}]"
        lines.append(f"| {rec['name']} | {errs('vs_flex')} | {errs('vs_sdpa')} | {ref} | {verdict} |")
    lines += ["", "## Setup (not in the times above)", "",
              "First calls include compilation (Triton JIT for attnc, torch.compile for Flex) unless caches were warm.",
              "", "| case | attnc compile | attnc first call fwd / fwd+bwd | attnc layout · tiles computed (FULL) · "
              "tile efficiency | Flex create_block_mask · blocks computed (FULL) | Flex first call fwd / fwd+bwd "
              "| SDPA mask |", "|---|---:|---:|---|---|---:|---|"]
    for rec in report["cases"]:
        s = rec["systems"]
        at, fx, sd = (s.get(x, {}).get("setup", {}) for x in SYSTEMS)
        at_t, fx_t = at.get("tiles"), fx.get("tiles")
        def first(system):
            return " / ".join(fmt_time(s.get(system, {}).get(mo, {}).get("first_s")) for mo in MODES)
        lines.append("| " + " | ".join([
            rec["name"], fmt_time(at.get("compile_s")), first("attnc"),
            f"{at.get('layout')} · {at_t['computed']:,} ({at_t['full']:,}) of {at_t['total']:,} "
            f"{at['tile'][0]}² tiles · {100 * at['tile_efficiency']:.1f} %" if at_t else "—",
            f"{fmt_time(fx.get('block_mask_s'))} · {fx_t['computed']:,} ({fx_t['full']:,}) of {fx_t['total']:,} "
            f"{fx['tile'][0]}² blocks" if fx_t else "—",
            first("flex"), (sd.get("mask", "—") + (f"; prepared in {fmt_time(sd['mask_build_s'])}" if "mask_build_s" in sd else ""))
        ]) + " |")
    extra = [f"{rec['name']}: {rec['process']}" for rec in report["cases"] if rec.get("process")]
    extra += [f"{rec['name']}: attnc returned no gradient for {', '.join(r['no_gradient_for'])}"
              for rec in report["cases"] for r in [rec["systems"].get("attnc", {}).get("fwd_bwd", {})]
              if r.get("no_gradient_for")]
    if notes.items or extra:
        lines += ["", "## Notes", ""] + [f"{i}. {t}" for i, t in enumerate(notes.items, 1)] + [f"- {t}" for t in extra]
    return "\n".join(lines) + "\n"


def write(report: dict, stem: Path):
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="attnc forward/backward vs FlexAttention and SDPA",
                                 epilog="cases: " + ", ".join(c.name for c in CASES))
    ap.add_argument("--smoke", action="store_true",
                    help="every case at 128-256 tokens, float32, on CPU (Triton's interpreter): checks the harness")
    ap.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]", help="only these cases")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of attnc,flex,sdpa")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the result files")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all cases (default 460 on GPU, 900 with --smoke); cases are cut to fit")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 20; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 2; smoke 0)")
    ap.add_argument("--measure-budget", type=float, default=2.0, help="seconds of timed calls per measurement")
    ap.add_argument("--flex", choices=("compiled", "eager"), default=None,
                    help="Flex mode (default compiled; eager with --smoke, where compiling costs ~10 s per case)")
    ap.add_argument("--render", type=Path, metavar="RESULTS.json",
                    help="measure nothing: rewrite the .md (and the ratios) of a results file")
    ap.add_argument("--reserve", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grace", type=float, default=15.0, help=argparse.SUPPRESS)
    # the child process of one case
    for name in ("--child", "--child-out", "--index"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--deadline", "--limit", "--t0"):
        ap.add_argument(name, type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (3 if a.smoke else 20)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.smoke else 2)
    a.flex = a.flex or ("eager" if a.smoke else "compiled")
    a.reserve = a.reserve if a.reserve is not None else (2.0 if a.smoke else 10.0)
    if a.child:
        return child(a)
    if a.render:
        report = json.loads(a.render.read_text())
        for rec in report["cases"]:
            rec["derived"] = derive(rec)
        write(report, a.render.with_suffix(""))
        sys.stdout.write(markdown(report))
        return 0

    names = [n for group in a.only for n in group.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(BY_NAME)}")
    cases = [BY_NAME[n] for n in names] if names else CASES
    if not a.smoke:
        import torch  # only to refuse early: every measurement runs in a child process

        if not torch.cuda.is_available():
            ap.error("no CUDA device here: use --smoke to check the harness on CPU")
    budget = a.budget or (900.0 if a.smoke else 460.0)
    date = dt.date.today().isoformat()
    suffix = "-smoke" if a.smoke else ""
    if names:
        suffix += "-only-" + "-".join(names)
    stem = a.out / f"training-{date}{suffix}"
    report = {"date": date, "command": "python -m bench.training " + shlex.join(argv if argv is not None else
                                                                                  sys.argv[1:]),
              "machine": machine(), "options": {"smoke": a.smoke, "repeats": a.repeats, "warmup": a.warmup,
                                                 "measure_budget_s": a.measure_budget, "budget_s": budget,
                                                 "flex": a.flex, "systems": a.systems,
                                                 "backward_flops_factor": BWD_FACTOR}, "cases": []}
    t0 = time.time()
    for i, case in enumerate(cases):
        remaining = budget - (time.time() - t0)
        left = len(cases) - i
        limit = min(remaining, max(75.0, 2 * remaining / left))
        index = f"{i + 1}/{len(cases)}"
        if remaining < min(20.0, budget / 4):
            rec = {"name": case.name, "title": case.title, "spec": f"specs/{case.spec}",
                   "systems": {s: {m: {"status": "skipped", "message": f"the run's time budget ({budget:.0f} s, "
                                       "--budget) was spent"} for m in MODES} for s in SYSTEMS}}
            sys.stderr.write(f"[{index}] {case.name} · skipped: time budget spent\n")
        else:
            rec = run_case(case, index, limit, a, t0)
        rec["derived"] = derive(rec)
        report["cases"].append(rec)
        report["wall_s"] = time.time() - t0
        write(report, stem)
    sys.stdout.write(markdown(report))
    sys.stderr.write(f"wrote {stem}.json and .md in {fmt_duration(time.time() - t0)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
