"""`attnc check | explain | run`: the command line over the pipeline."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import AttncError


def _param_values(extra: list[str]) -> dict[str, int | float]:
    """`--N 64 --scale 0.5` -> {'N': 64, 'scale': 0.5}."""
    out: dict[str, int | float] = {}
    it = iter(extra)
    for flag in it:
        if not flag.startswith("--") or len(flag) < 3:
            raise AttncError(f"expected a parameter flag like --N, got {flag!r}")
        name = flag[2:]
        if "=" in name:
            name, text = name.split("=", 1)
        else:
            text = next(it, None)
            if text is None:
                raise AttncError(f"parameter --{name} needs a value")
        try:
            out[name] = int(text)
        except ValueError:
            try:
                out[name] = float(text)
            except ValueError:
                raise AttncError(f"parameter --{name} needs a number, got {text!r}") from None
    return out


def cmd_bench(args, extra) -> int:
    import itertools

    import torch

    from .benchmark import format_rows, run
    from .runtime import compile

    tokens = [part for x in extra for part in (x.split("=", 1) if x.startswith("--") else [x])]  # --N=64 too
    if len(tokens) % 2:
        raise AttncError(f"parameter {tokens[-1]} needs a value")
    sweeps = {flag: value.split(",") for flag, value in zip(tokens[::2], tokens[1::2])}  # --N 1024,2048: a run each
    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    for values in itertools.product(*sweeps.values()):
        params = _param_values([x for pair in zip(sweeps, values) for x in pair])
        fn = compile(args.file, tiles=_tiles(args.tiles), layout=args.layout, **params)
        print(f"\n{fn.ir.name}({fn.compiled.bound.describe()}): batch {args.batch}, {args.heads} heads, head dim "
              f"{args.head_dim}, {dtype}, {'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU (interpreter)'}, "
              f"layout {fn.layout.name}")
        rows = run(fn, args.batch, args.heads, args.head_dim, getattr(torch, dtype),
                   backward=not args.forward_only, repeats=1 if args.smoke else args.repeats)
        print(format_rows(rows))
    return 0


def cmd_tune(args, extra) -> int:
    from .runtime import compile
    from .tune import tune

    fn = compile(args.file, tiles=_tiles(args.tiles), layout=args.layout, **_param_values(extra))
    arch = _target_arch(args.target) if args.target else None
    kernels, path = tune(fn, args.head_dim, args.dtype, arch, batch=args.batch, heads=args.heads,
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
    for kernel, choice in kernels.items():
        how = (f"median {choice['median_ms']:.3f} ms" if choice["how"] == "timed" else
               f"static: {choice['spill_bytes']} B spilled, loops {choice['loop_instructions']}")
        print(f"{kernel:5} {choice['num_warps']} warps x {choice['num_stages']} stages ({how})")
    print(f"wrote {path}")
    return 0


def _target_arch(text: str) -> int:
    """--target sm90 / sm_90 / 90 -> 90."""
    try:
        return int(text.lower().removeprefix("sm_").removeprefix("sm"))
    except ValueError:
        raise AttncError(f"--target {text!r}: give a GPU target such as sm80 or sm90") from None


def _tiles(text: str) -> tuple[int, int]:
    try:
        m, n = text.lower().split("x")
        return int(m), int(n)
    except ValueError:
        raise AttncError(f"--tiles takes MxN, e.g. 64x64, got {text!r}") from None


class _Progress:
    """A one-line progress display on stderr, shown only for work that takes a while."""

    def __init__(self, label: str):
        self.label, self.start, self.shown = label, time.perf_counter(), False

    def __call__(self, done: int, total: int) -> None:
        if time.perf_counter() - self.start < 1.0 or not sys.stderr.isatty():
            return
        self.shown = True
        sys.stderr.write(f"\r{self.label}: {done}/{total} ({100 * done // total}%)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_check(args) -> int:
    from .pipeline import parse

    failed = 0
    for path in args.files:
        try:
            spec = parse(path) if path != "-" else parse(sys.stdin.read())
        except AttncError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        params = ", ".join(p.name for p in spec.params)
        print(f"ok: {path}: attention {spec.name}({params})")
    return 1 if failed else 0


def cmd_explain(args, extra) -> int:
    from .explain import explain
    from .pipeline import build, parse

    spec = parse(args.file)
    compiled = build(spec, _param_values(extra), "triton", _tiles(args.tiles), args.layout,
                     progress=_Progress("analysing tiles"))
    print(explain(compiled, sections=args.section))
    if args.plot:
        _plot(compiled, args.plot)
    if args.target:
        _report(compiled, args)
    return 0


def _report(compiled, args) -> None:
    """The static GPU report (codegen/target.py) as a table, and with --sass the main loops' SASS."""
    from .codegen.target import SHARED_LIMIT, dtype_name

    arch = _target_arch(args.target)
    dtype = dtype_name(args.dtype)
    s = compiled.schedule
    print(f"\n== static GPU report: sm_{arch}, {dtype}, head dim {args.head_dim}, tiles {s.block_m}x{s.block_n} "
          f"(compiled without a GPU) " + "=" * 8, file=sys.stderr, flush=True)
    from .runtime import AttentionFn

    rows = AttentionFn(compiled).gpu_report(arch, dtype, args.head_dim, sass=args.sass)
    print(f"{'kernel':16} {'regs':>5} {'spill B':>8} {'shared KB':>10} {'tensor cores':>13} {'warps':>6} {'stages':>7} "
          f"{'pieces':>10}  loops")
    for r in rows:
        over = " (over the limit)" if r["shared_bytes"] > SHARED_LIMIT[arch] else ""
        # rows x columns of a tile taken at a time, and head-dim chunks (codegen/target.sub_tiles, head_chunk)
        pieces = f"{r['sub_m']}x{r['sub_n']}" + (f",d{r['d_chunk']}" if r["d_chunk"] < args.head_dim else "")
        print(f"{r['kernel']:16} {r['registers']:>5} {r['spill_bytes']:>8} {r['shared_bytes'] / 1024:>10.1f} "
              f"{r['tensor_cores']:>13} {r['num_warps']:>6} {r['num_stages']:>7} {pieces:>10}  "
              f"{' / '.join(map(str, r['loops']))} SASS instructions per iteration{over}")
    if args.sass:
        for r in rows:
            print(f"\n== SASS of {r['kernel']} " + "=" * 40)
            print(r["sass"])


def _plot(compiled, path: str) -> None:
    """The chosen layout's tile map beside row-major's (matplotlib, an optional extra)."""
    from .analysis.layout import ROW_MAJOR, row_major
    from .analysis.tiles import analyse
    from .plot import plot_tile_maps

    s = compiled.schedule
    if s is None:
        raise AttncError("--plot needs tiles; the reference backend has none")
    panels = [(f"layout {compiled.layout.name}", s)]
    if compiled.layout.name != ROW_MAJOR:
        b = compiled.bound
        panels.insert(0, (ROW_MAJOR, analyse(b, s.block_m, s.block_n, row_major(b.nq, b.nk))))
    plot_tile_maps(panels, path)
    print(f"tile map written to {path}", file=sys.stderr)


def cmd_run(args, extra) -> int:
    import torch

    from .benchmark import random_tensors

    from .analysis.tiles import tile_picture
    from .pipeline import build
    from .runtime import AttentionFn

    params = _param_values(extra)
    t0 = time.perf_counter()
    compiled = build(args.file, params, args.backend, _tiles(args.tiles), args.layout,
                     progress=_Progress("analysing tiles"))
    fn = AttentionFn(compiled)
    t_compile = time.perf_counter() - t0
    b = compiled.bound
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.heads, b.nq, args.head_dim)
    shape_k = (args.batch, args.kv_heads or args.heads, b.nk, args.head_dim)
    q = torch.randn(shape_q, generator=gen).to(device, dtype)
    k = torch.randn(shape_k, generator=gen).to(device, dtype)
    v = torch.randn(shape_k, generator=gen).to(device, dtype)
    tensors = random_tensors(fn, args.heads, gen, device)
    print(f"spec      {args.file}: attention {compiled.spec.name}({b.describe()})")
    if tensors:
        print("tensors   " + ", ".join(f"{n}{list(t.shape)} (random)" for n, t in tensors.items()))
    if compiled.schedule is not None:
        from .backends.inputs import host_ints

        s = compiled.schedule
        if not s.exact:  # the mask reads runtime tensors: the tiles of this data
            s = fn._host.schedule(host_ints(tensors))
        stats = s.stats()
        print(f"tokens    {b.nq} queries x {b.nk} keys; visible pairs {stats['pairs_visible']} "
              f"(density {stats['density']:.2%})")
        print(f"layout    {compiled.layout.name}")
        print(f"tiles     {s.block_m}x{s.block_n}: {stats['tiles_full']} full, "
              f"{stats['tiles_partial']} partial, {stats['tiles_empty']} empty of {stats['tiles']} "
              f"(tile density {stats['tile_density']:.2%}, tile efficiency {stats['tile_efficiency']:.2%})")
        print(f"kernel    {compiled.kernel_path}")
    print(f"compile   {t_compile * 1e3:.1f} ms (parse, analyse, generate or load from cache)")
    t1 = time.perf_counter()
    with torch.no_grad():
        out = fn(q, k, v, **tensors)
    if device != "cpu":
        torch.cuda.synchronize()
    t_run = time.perf_counter() - t1
    mode = "reference" if args.backend == "reference" else \
        "Triton interpreter" if device == "cpu" else f"native on {torch.cuda.get_device_name()}"
    print(f"run       q{list(q.shape)} k{list(k.shape)} {args.dtype} on {device} ({mode}): "
          f"{t_run * 1e3:.1f} ms incl. first-call compilation")
    ref = AttentionFn(build(compiled.spec, params, "reference"))(
        q.double().cpu(), k.double().cpu(), v.double().cpu(),
        **{n: (t.double() if t.is_floating_point() else t).cpu() for n, t in tensors.items()})
    err = (out.double().cpu() - ref).abs().max().item()
    print(f"check     max |out - float64 reference| = {err:.3e}")
    if args.picture and compiled.schedule is not None:
        print(tile_picture(compiled.schedule))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnc", description="A compiler for attention patterns.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="parse and validate spec files")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("explain", help="show the parsed spec, IR, tile map and generated kernel",
                       description="Parameters follow the file as --NAME VALUE, e.g. --N 64.")
    p.add_argument("file")
    p.add_argument("--tiles", default="64x64", help="BLOCK_MxBLOCK_N (default 64x64)")
    p.add_argument("--section", action="append", choices=["spec", "ir", "layout", "tiles", "kernel"],
                   help="print only these sections (repeatable)")
    p.add_argument("--layout", default="auto", help="token order: auto (default), row_major, or a layout name")
    p.add_argument("--plot", metavar="PNG", help="draw the tile map (chosen layout beside row-major); needs matplotlib")
    p.add_argument("--target", metavar="SM", help="static GPU report for this target (sm80, sm86, sm89, sm90), "
                   "compiled without a GPU")
    p.add_argument("--dtype", default="bf16", help="dtype of q, k, v for --target: bf16 (default), fp16, fp32")
    p.add_argument("--head-dim", type=int, default=128, help="head dim for --target (default 128)")
    p.add_argument("--sass", action="store_true", help="with --target: print the kernels' SASS")
    p = sub.add_parser("run", help="compile a spec, run it on random tensors, check it against the reference",
                       description="Parameters follow the file as --NAME VALUE, e.g. --N 64.")
    p.add_argument("file")
    p.add_argument("--tiles", default="64x64")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", action="store_true", help="print the tile map")
    p.add_argument("--layout", default="auto", help="token order: auto (default), row_major, or a layout name")
    p.add_argument("--backend", choices=["triton", "reference"], default="triton",
                   help="reference: the dense evaluator (the oracle)")
    p = sub.add_parser("tune", help="choose warps and stages per kernel (timed on a GPU, static without one)",
                       description="Parameters follow the file as --NAME VALUE. The choice is kept on disk "
                                   "and used by every later launch of the same kernels.")
    p.add_argument("file")
    p.add_argument("--target", metavar="SM", help="without a GPU: the target of the static choice (default sm90)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16, fp32")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tiles", default="64x64")
    p.add_argument("--layout", default="auto")
    p.add_argument("--batch", type=int, default=1, help="timing inputs on a GPU")
    p.add_argument("--heads", type=int, default=8, help="timing inputs on a GPU")
    p = sub.add_parser("bench", help="time forward and forward+backward against SDPA and FlexAttention",
                       description="Parameters follow the file as --NAME VALUE; a comma list sweeps it, "
                                   "e.g. --N 4096,8192.")
    p.add_argument("file")
    p.add_argument("--tiles", default="64x64")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--layout", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny repeats on CPU: checks that the command works")
    args, extra = parser.parse_known_args(argv)
    try:
        if args.cmd == "check":
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            return cmd_check(args)
        if args.cmd == "explain":
            return cmd_explain(args, extra)
        if args.cmd == "bench":
            return cmd_bench(args, extra)
        if args.cmd == "tune":
            return cmd_tune(args, extra)
        return cmd_run(args, extra)
    except AttncError as err:
        print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
