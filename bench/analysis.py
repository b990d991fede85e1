"""Analysis benchmark: attnc's tile analysis against FlexAttention's create_block_mask.

    python -m bench.analysis                 # every case (the 1M-token ones take up to ~10 min each)
    python -m bench.analysis --quick         # the 16K-65K cases only
    python -m bench.analysis --only causal_32k,natten2d_7x7
    python -m bench.analysis --smoke         # every case at ~1K tokens: checks the harness itself

Per case it counts the visible pairs, validates at a small size that attnc and the Flex mask_mod
describe the same pattern, then measures each system in a fresh process (bench/measure.py) under
a timeout and a memory cap, and writes bench/results/analysis-<date>.json and .md. See
bench/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import CASES, ROOT  # noqa: E402
from bench.measure import RESULT_MARK, TILE  # noqa: E402

SYSTEMS = ("attnc", "attnc-analysis", "flex-compiled", "flex-eager")
CHECKS = ("closed_form_ok", "attnc_mask_equal", "attnc_tiles_sound", "flex_tiles_exact")  # see measure.job_validate
GiB = 1 << 30


# -- one measurement in a child process ----------------------------------------------------------
def session_rss(sid: int) -> int:
    """Resident bytes of every process in session `sid`: the child and whatever it started
    (torch.compile's compile workers). /proc/PID/task/*/children is not always there, so scan."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ... rss is 21
            total += int(fields[21]) * page
    return total


def attnc_source() -> str:
    """A short hash of attnc's source files. Others edit attnc/ while a long run goes on; each
    measurement records the source it ran against, so that a report mixing states says so."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "attnc").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".lark"):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run_job(case, job: str, opts, progress) -> dict:
    """Run bench.measure for (case, job); enforce the timeout and the memory cap from outside."""
    timeout = opts.timeout
    source, load = attnc_source(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="attnc-bench-") as tmp:
        # Fresh compiler caches per process: Flex's first compiled call is a cold compile, and
        # attnc's kernel cache starts empty (its warm-up fills it, as a user's first compile does).
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton",
                   ATTNC_CACHE_DIR=f"{tmp}/attnc", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "bench.measure", case.name, job, "--repeats", str(opts.repeats),
               "--budget", str(opts.budget), "--deadline", str(timeout)] + (["--small"] if opts.smoke else [])
        with open(f"{tmp}/out", "w+") as out, open(f"{tmp}/err", "w+") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
            t0, peak, verdict = time.monotonic(), 0, None
            try:
                while proc.poll() is None:
                    elapsed, rss = time.monotonic() - t0, session_rss(proc.pid)
                    peak = max(peak, rss)
                    if rss > opts.mem_cap:
                        verdict = {"status": "killed", "message": f"killed at {rss / GiB:.1f} GiB resident "
                                   f"(the benchmark's memory cap, --mem-cap-gb {opts.mem_cap / GiB:g})"}
                    elif elapsed > timeout:
                        verdict = {"status": "timed out", "message": f"no result after {timeout:.0f} s (--timeout)"}
                    if verdict:
                        break
                    progress.tick(elapsed, rss)
                    time.sleep(0.05)
            finally:  # over a limit, or the run interrupted (the child is in its own session: no Ctrl-C)
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the child's own group: only what we started
                    except ProcessLookupError:
                        pass  # it ended meanwhile
            proc.wait()
            wall = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            lines = [ln for ln in out.read().splitlines() if ln.startswith(RESULT_MARK)]
            stderr_tail = err.read()[-2000:]
    if verdict is None and lines:
        result = json.loads(lines[-1][len(RESULT_MARK):])
    elif verdict is None:  # died without a word: most likely the kernel's OOM killer
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        result = {"status": "killed", "message": f"the process died ({how}) without a result",
                  "stderr_tail": stderr_tail}
    else:
        result = verdict
    after = attnc_source()
    # The 1-minute load average around the measurement: this machine is shared, and a load above
    # the core count means the times include waiting for a CPU.
    result.update(wall_s=wall, session_peak_rss_mb=peak / 2**20, load_before=load, load_after=os.getloadavg()[0],
                  attnc_source=source if after == source else f"{source} -> {after} (changed during it)")
    return result


class Progress:
    """Which case, which system, how long, on stderr: a live line on a terminal, else a line
    every 30 s (so a log shows a long run is alive)."""

    def __init__(self, total: int):
        self.total, self.t_run, self.tty = total, time.monotonic(), sys.stderr.isatty()
        self.label, self.last = "", 0.0

    def start(self, index: int, record: dict, job: str):
        self.label = f"[{index}/{self.total}] {record['name']} ({record['tokens']:,} tokens) · {job}"
        self.last = time.monotonic()
        if not self.tty:
            self._print(f"{self.label} ...")

    def tick(self, elapsed: float, rss: int):
        now = time.monotonic()
        if now - self.last >= (0.5 if self.tty else 30):
            self.last = now
            self._print(f"{self.label} · {elapsed:.0f} s · {rss / GiB:.2f} GiB", live=True)

    def done(self, result: dict):
        status = result.get("status")
        what = status
        if status == "ok" and (result.get("median_s") or result.get("first_s")) is not None:
            what = fmt_time(result.get("median_s") or result.get("first_s"))
        elif status == "ok" and result.get("ok") is False:
            what = "CHECK FAILED"
        self._print(f"{self.label} · {what} (process {result['wall_s']:.1f} s)")

    def _print(self, line: str, live: bool = False):
        line = f"{line}   [run {fmt_duration(time.monotonic() - self.t_run)}]"
        if self.tty:  # a live line is redrawn in place until the measurement ends
            sys.stderr.write("\r\033[K" + line + ("" if live else "\n"))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# -- machine and versions ------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")
    mem = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    # attnc's version from its source (the tree being measured), without importing it here.
    attnc_version = re.search(r'__version__\s*=\s*"([^"]+)"', _read(ROOT / "attnc" / "version.py"))
    return {
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "os": platform.platform(), "python": platform.python_version(),
        "torch": version("torch"), "triton": version("triton"), "numpy": version("numpy"),
        "attnc": attnc_version.group(1) if attnc_version else None, "attnc_git": git_state(),
    }


def git_state() -> dict | None:
    """The commit measured and whether attnc/ differs from it. Read-only: GIT_OPTIONAL_LOCKS=0
    keeps `git status` from refreshing the index."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attnc"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "attnc_modified": bool(dirty), "attnc_changes": dirty.splitlines()[:50]}


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# -- derived figures -----------------------------------------------------------------------------
def derive(record: dict) -> dict:
    """Tile efficiency, FULL share and speedups from the raw results of one case."""
    pairs = (record.get("pairs") or {}).get("pairs")
    systems = record["systems"]
    out = {"efficiency": {}, "full_share": {}, "computed_tiles": {}}
    for name, r in systems.items():
        tiles = r.get("tiles") if r.get("status") == "ok" else None
        if not tiles:
            continue
        computed = tiles["partial"] + tiles["full"]
        out["computed_tiles"][name] = computed
        out["full_share"][name] = tiles["full"] / computed if computed else None
        if pairs is not None:
            out["efficiency"][name] = pairs / max(1, computed * TILE * TILE)
    out["speedup"], out["speedup_vs_first_call"] = {}, {}
    for mine in ("attnc", "attnc-analysis"):
        for peer in ("flex-compiled", "flex-eager"):
            a, f = seconds(systems.get(mine)), seconds(systems.get(peer))
            out["speedup"][f"{peer} / {mine}"] = f / a if a and f else None
            # A compiled build too slow to repeat within the timeout has only its first call
            # (compile included): a ratio against it is shown, labelled, rather than none.
            r = systems.get(peer) or {}
            if a and f is None and r.get("status") == "ok":
                out["speedup_vs_first_call"][f"{peer} / {mine}"] = r["first_s"] / a
    return out


def seconds(r: dict | None) -> float | None:
    """The figure compared: the median (for compiled Flex, of the calls after the compile)."""
    if not r or r.get("status") != "ok":
        return None
    return r.get("median_s")


# -- formatting ----------------------------------------------------------------------------------
def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"


def fmt_duration(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}:{s:02d}"


def fmt_mb(mb: float | None) -> str:
    if mb is None:
        return "—"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def fmt_ratio(x: float | None, first: float | None = None) -> str:
    if x is None:
        return "—" if first is None else f"{fmt_ratio(first)} (vs first call)"
    return f"{x:.3g}×" if x < 1000 else f"{x:,.0f}×"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


class Notes:
    """Footnotes for cells that hold a failure instead of a number (messages are long)."""

    def __init__(self):
        self.items: list[str] = []

    def cell(self, r: dict | None, who: str) -> str:
        if not r:
            return "not run"
        text = f"{who}: {r.get('message', r.get('status'))}".replace("\n", " ").replace("|", "\\|")
        if text not in self.items:
            self.items.append(text)
        return f"{r['status']} [{self.items.index(text) + 1}]"


def time_cell(r: dict | None, who: str, notes: Notes, compiled: bool = False) -> str:
    if not r or r.get("status") != "ok":
        return notes.cell(r, who)
    if compiled:
        steady = fmt_time(r.get("median_s")) if r.get("median_s") is not None else "not repeated"
        return f"{steady} (first {fmt_time(r['first_s'])})"
    if r["calls"] == 1:
        return fmt_time(r["median_s"]) + " (1 call)"
    # A first call far slower than the rest: a cache inside the system, or a cold start; show it.
    slow_first = f" (first {fmt_time(r['first_s'])})" if r["first_s"] > 2 * r["median_s"] else ""
    return fmt_time(r["median_s"]) + slow_first


def mem_cell(r: dict | None) -> str:
    if not r:
        return "—"
    if r.get("status") == "ok":
        return fmt_mb(r.get("peak_mb"))
    return f"{r['status']} (≥ {fmt_mb(r.get('session_peak_rss_mb'))} resident)"


def markdown(report: dict) -> str:
    m, notes = report["machine"], Notes()
    git = m.get("attnc_git") or {}
    lines = [
        "# Analysis benchmark: attnc vs FlexAttention `create_block_mask`",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gib']} GiB RAM; {m['os']}",
        f"- Versions: Python {m['python']}, torch {m['torch']}, triton {m['triton']}, numpy {m['numpy']}, "
        f"attnc {m['attnc']} (commit {git.get('commit', '?')[:12]}"
        f"{', attnc/ modified' if git.get('attnc_modified') else ''})",
        *source_lines(report),
        f"- Tiles 64 × 64 for both systems; times are medians of {report['options']['repeats'] + 1} calls (up to "
        f"{5 * report['options']['repeats'] + 1} when they take under 0.5 s in all; fewer when they would exceed "
        f"{report['options']['budget']:.0f} s, marked '1 call'); timeout "
        f"{report['options']['timeout']:.0f} s and memory cap {report['options']['mem_cap_gb']:g} GiB per measurement.",
        "",
        "## Time",
        "",
        "attnc compile = `attnc.compile` + `fn.tile_map(**tensors)` (parse, bind, layout, tile analysis, kernel "
        "source); attnc analyse = `attnc.analysis.tiles.analyse` alone. Flex compiled: steady state (first call, "
        "with the compilation, in brackets). Speedup = Flex time / attnc time (above 1: attnc is faster).",
        "",
        "| case | tokens | attnc compile | attnc analyse | Flex compiled | Flex eager "
        "| speedup vs compiled (compile · analyse) | speedup vs eager (compile · analyse) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in report["cases"]:
        s, d = rec["systems"], rec.get("derived", {}).get("speedup", {})
        d1 = rec.get("derived", {}).get("speedup_vs_first_call", {})

        def ratio(key):
            return fmt_ratio(d.get(key), d1.get(key))

        lines.append("| " + " | ".join([
            rec["title"], f"{rec['tokens']:,}",
            time_cell(s.get("attnc"), f"{rec['name']}, attnc compile", notes),
            time_cell(s.get("attnc-analysis"), f"{rec['name']}, attnc analyse", notes),
            time_cell(s.get("flex-compiled"), f"{rec['name']}, Flex compiled", notes, compiled=True),
            time_cell(s.get("flex-eager"), f"{rec['name']}, Flex eager", notes),
            f"{ratio('flex-compiled / attnc')} · {ratio('flex-compiled / attnc-analysis')}",
            f"{ratio('flex-eager / attnc')} · {ratio('flex-eager / attnc-analysis')}",
        ]) + " |")
    lines += [
        "",
        "## Peak memory",
        "",
        "Increase of the measuring process's peak resident memory over what it held before the first timed call "
        "(VmHWM, reset first). For a failed measurement, the most the process tree held before it ended.",
        "",
        "| case | attnc compile | attnc analyse | Flex compiled | Flex eager |",
        "|---|---:|---:|---:|---:|",
    ]
    for rec in report["cases"]:
        lines.append(f"| {rec['title']} | " + " | ".join(mem_cell(rec["systems"].get(k)) for k in SYSTEMS) + " |")
    lines += [
        "",
        "## Tiles (64 × 64)",
        "",
        "Tile efficiency = visible pairs / (computed tiles × 64 × 64), computed = PARTIAL + FULL; FULL share = "
        "FULL / computed. The visible pairs are one exact count used for both systems. attnc's tiles are "
        "`fn.tile_map(...)` in the layout it chose.",
        "",
        "| case | visible pairs | attnc layout | attnc computed tiles | attnc efficiency | attnc FULL share "
        "| Flex computed tiles | Flex efficiency | Flex FULL share |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in report["cases"]:
        d = rec.get("derived", {})
        flex = "flex-compiled" if "flex-compiled" in d.get("computed_tiles", {}) else "flex-eager"
        pairs = (rec.get("pairs") or {}).get("pairs")
        lines.append("| " + " | ".join([
            rec["title"], f"{pairs:,}" if pairs is not None else notes.cell(rec.get("pairs"), f"{rec['name']}, pairs"),
            str((rec["systems"].get("attnc") or {}).get("layout") or "—"),
            _int(d.get("computed_tiles", {}).get("attnc")), fmt_pct(d.get("efficiency", {}).get("attnc")),
            fmt_pct(d.get("full_share", {}).get("attnc")),
            _int(d.get("computed_tiles", {}).get(flex)), fmt_pct(d.get("efficiency", {}).get(flex)),
            fmt_pct(d.get("full_share", {}).get(flex)),
        ]) + " |")
    lines += ["", "## Checks", ""]
    for rec in report["cases"]:
        v, p = rec.get("validate") or {}, rec.get("pairs") or {}
        if v.get("status") == "ok":
            failed = [k for k in CHECKS if not v.get(k)]
            check = "ok" if not failed else "**FAILED**: " + ", ".join(failed)
            check += (f" ({v['tokens']:,} tokens; attnc layout {v.get('attnc_layout')}: "
                      f"{v.get('attnc_conservative_tiles')} conservative PARTIAL tiles, "
                      f"{v.get('attnc_empty_over_visible')} EMPTY over visible pairs, "
                      f"{v.get('attnc_full_over_hidden')} FULL over hidden pairs)")
        else:
            check = notes.cell(v, f"{rec['name']}, validation") if v else "not run"
        agree = {True: ", closed form agrees", False: ", CLOSED FORM DISAGREES"}.get(p.get("closed_form_agrees"), "")
        lines.append(f"- {rec['name']}: same pattern in attnc and the mask_mod, tiles sound: {check}; "
                     f"visible pairs by {p.get('method', '—')}{agree}")
    if notes.items:
        lines += ["", "## Notes", ""] + [f"{i}. {t}" for i, t in enumerate(notes.items, 1)]
    return "\n".join(lines) + "\n"


def source_lines(report: dict) -> list[str]:
    """Warnings about the run itself: attnc's source changing under it, a loaded machine."""
    results = [(rec["name"], job, r) for rec in report["cases"]
               for job, r in [("pairs", rec.get("pairs")), ("validate", rec.get("validate")),
                              *rec["systems"].items()] if r]
    states: dict[str, dict[str, list[str]]] = {}  # source hash -> case -> attnc jobs run against it
    for name, job, r in results:
        if job.startswith("attnc") or job == "validate":
            states.setdefault(r.get("attnc_source", "?"), {}).setdefault(name, []).append(job)
    split = {name for cases in states.values() for name in cases
             if sum(name in other for other in states.values()) > 1}

    def which(cases):  # a case's name, or its jobs where the change fell inside the case
        return ", ".join(f"{n} ({', '.join(jobs)})" if n in split else n for n, jobs in cases.items())

    lines = []
    if len(states) > 1:
        lines.append(f"- **attnc's source changed during the run** ({len(states)} states of attnc/*.py, by hash): "
                     + "; ".join(f"`{h}`: {which(cases)}" for h, cases in states.items()))
    elif states:
        lines.append(f"- attnc source hash (attnc/*.py, the same for every measurement): `{next(iter(states))}`")
    loads = [r[k] for _, _, r in results for k in ("load_before", "load_after") if k in r]
    if loads:
        lines.append(f"- 1-minute load average during the measurements: {min(loads):.1f}–{max(loads):.1f} "
                     f"on {report['machine']['cores']} cores (other work shares the machine; above the core count, "
                     f"times include waiting for a CPU)")
    return lines


def _int(x) -> str:
    return "—" if x is None else f"{x:,}"


# -- the run -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="attnc tile analysis vs FlexAttention create_block_mask",
                                 epilog="cases: " + ", ".join(c.name for c in CASES))
    ap.add_argument("--quick", action="store_true", help="only the 16K-65K-token cases")
    ap.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]", help="only these cases")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--smoke", action="store_true", help="every case at ~1K tokens: a test of the harness")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first, at most (default 3)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of repeated calls per measurement (default 60)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement process (default 600)")
    ap.add_argument("--mem-cap-gb", type=float, default=None,
                    help="kill a measurement above this many GiB resident "
                         "(default: 16, or 70%% of free memory if less)")
    ap.add_argument("--no-validate", action="store_true", help="skip the small-size agreement checks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the result files")
    ap.add_argument("--render", type=Path, metavar="RESULTS.json",
                    help="measure nothing: recompute the derived figures of a results .json and its .md")
    opts = ap.parse_args(argv)
    # Stopped with SIGTERM, unwind as for Ctrl-C, so that the running measurement is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if opts.render:  # the measurements as they are; derived figures and the .md recomputed
        report = json.loads(opts.render.read_text())
        for record in report["cases"]:
            record["derived"] = derive(record)
        write(report, opts.render.with_suffix(""))
        print(markdown(report))
        return 0

    only = {n for arg in opts.only for n in arg.split(",") if n}
    unknown = only - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(c.name for c in CASES)}")
    systems = [s for s in opts.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        ap.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    cases = [c for c in CASES if (not only or c.name in only) and not (opts.quick and c.huge)]
    avail = re.search(r"MemAvailable:\s+(\d+) kB", _read("/proc/meminfo"))
    default_cap = min(16.0, 0.7 * int(avail.group(1)) / 2**20) if avail else 16.0
    opts.mem_cap_gb = opts.mem_cap_gb or round(default_cap, 1)
    opts.mem_cap = int(opts.mem_cap_gb * GiB)

    today = dt.date.today().isoformat()
    suffix = "-smoke" if opts.smoke else "-only-" + "-".join(sorted(only)) if only else "-quick" if opts.quick else ""
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = opts.out / f"analysis-{today}{suffix}"
    report = {
        "date": today, "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.analysis" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": machine(),
        "options": {"repeats": opts.repeats, "budget": opts.budget, "timeout": opts.timeout,
                    "mem_cap_gb": opts.mem_cap_gb, "tile": TILE, "smoke": opts.smoke, "systems": systems},
        "cases": [],
    }
    jobs = ["pairs"] + ([] if opts.no_validate else ["validate"]) + systems
    progress = Progress(len(cases) * len(jobs))
    step = 0
    for case in cases:
        params = case.small if opts.smoke else case.params
        record = {"name": case.name, "title": case.title + (" (smoke size)" if opts.smoke else ""),
                  "tokens": case.pattern.tokens(params), "params": params,
                  "spec": case.spec.strip() if "\n" in case.spec else _relative(case.spec),
                  "systems": {}}
        report["cases"].append(record)
        for job in jobs:
            step += 1
            progress.start(step, record, job)
            result = run_job(case, job, opts, progress)
            progress.done(result)
            if job in ("pairs", "validate"):
                record[job] = result
            else:
                record["systems"][job] = result
            record["derived"] = derive(record)
            write(report, stem)  # after every measurement: a long run interrupted keeps what it has
    report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    write(report, stem)
    print(markdown(report))
    print(f"results: {_relative(str(stem))}.json, .md", file=sys.stderr)
    return 0


def _relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def write(report: dict, stem: Path) -> None:
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
