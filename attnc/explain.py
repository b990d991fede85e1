"""Render a compiled spec's stored artifacts for `attnc explain`."""
from __future__ import annotations

from .frontend import format_spec
from .analysis.tiles import tile_picture
from .ir.printer import digest, format_ir
from .pipeline import Compiled

SECTIONS = ("spec", "ir", "layout", "tiles", "kernel")


def explain(c: Compiled, sections=None) -> str:
    sections = sections or SECTIONS
    out = []
    if "spec" in sections:
        out += [_rule("parsed spec"), format_spec(c.spec.ast).rstrip()]
    if "ir" in sections:
        out += [_rule(f"IR (sha256 {digest(c.spec.ir)[:16]})"), format_ir(c.spec.ir),
                f"bound: {c.bound.describe()}; {c.bound.nq} queries x {c.bound.nk} keys"]
    if "layout" in sections and c.layout is not None and c.schedule is not None:
        out += [_rule("layout (token order the kernel works in)")] + layout_lines(c.layout)
    if "tiles" in sections and c.schedule is not None:
        s = c.schedule
        st = s.stats()
        out += [
            _rule(f"tile map {s.block_m}x{s.block_n} ('#' full, '+' partial, '.' empty; rows = query tiles)"),
            tile_picture(s),
            f"density: {'' if s.exact else 'at most '}{st['pairs_visible']} of {s.nq * s.nk} pairs visible "
            f"({st['density']:.2%})" + ("" if s.exact else "; the mask reads runtime tensors, so tiles that depend "
                                        "on them are PARTIAL and evaluated per element"),
            f"tiles: {st['tiles_full']} full, {st['tiles_partial']} partial, {st['tiles_empty']} empty of "
            f"{st['tiles']} (computed {st['tile_density']:.2%}; tile efficiency {st['tile_efficiency']:.2%})",
            f"integer width in kernel: {'int64' if c.int64 else 'int32'}",
        ]
    if "kernel" in sections and c.kernel_source is not None:
        out += [_rule("launch config on a GPU, 16-bit inputs (warps x stages, codegen/target.launch_config)"),
                *launch_lines(c), *tuned_lines(c),
                _rule(f"generated kernels ({c.kernel_path})"), c.kernel_source.rstrip()]
    return "\n".join(out)


def launch_lines(c) -> list[str]:
    """Warps x stages per kernel for 16-bit inputs on sm_90 and sm_80 (codegen/target.launch_config)."""
    from .codegen.target import KERNELS, launch_config

    def cell(kernel: str, arch: int, d: int) -> str:
        warps, stages = launch_config(kernel, arch, d, "bf16", c.schedule.block_m, c.spec.ir)
        return f"D={d}: {warps}x{stages}"

    return [f"{name:16} " + "; ".join(f"sm_{arch} " + ", ".join(cell(kernel, arch, d) for d in (64, 128, 256))
                                      for arch in (90, 80)) for kernel, name in KERNELS.items()]


def tuned_lines(c) -> list[str]:
    """The choices `attnc tune` kept for these kernels (they replace the static config there)."""
    import json

    from .settings import settings

    lines = []
    for path in sorted((settings().cache_dir / "tune").glob(f"{c.kernel_path.stem}-*.json")):
        try:
            data = json.loads(path.read_text())
            cells = [f"{k} {v['num_warps']}x{v['num_stages']} ({v['how']})" for k, v in data["kernels"].items()]
            tiles = path.stem.split("-")[1]
            lines.append(f"tuned for sm_{data['arch']} {data['dtype']} D={data['head_dim']} tiles {tiles[1:]}: "
                         f"{', '.join(cells)}")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return lines


def _rule(title: str) -> str:
    return f"\n== {title} " + "=" * max(3, 72 - len(title))


def layout_lines(layout) -> list[str]:
    """The chosen order and, when the cost model weighed candidates, their figures."""
    figures = layout.figures()
    if not figures:
        return [f"chosen: {layout.name} (no other candidate weighed)"]
    lines = [f"chosen: {layout.name}, the cheapest of {len(figures)} candidates "
             "(cost: FULL + 1.5 x PARTIAL tiles + permutation, in 64x64 FULL tiles)",
             f"{'candidate':34} {'q order':16} {'kv order':16} {'full':>7} {'partial':>8} {'efficiency':>10} {'cost':>10}"]
    for f in figures:
        if f.get("skipped") or f.get("cost") is None:
            lines.append(f"{f['name']:34} {f['q']:16} {f['kv']:16}   (not analysed: its permutation alone "
                         "costs more than the best so far)")
            continue
        eff = "" if f.get("efficiency") is None else f"{f['efficiency']:.2%}"
        mark = "  <- chosen" if f["name"] == layout.name else ""
        lines.append(f"{f['name']:34} {f['q']:16} {f['kv']:16} {f.get('full', ''):>7} {f.get('partial', ''):>8} "
                     f"{eff:>10} {f['cost']:>10.1f}{mark}")
    return lines
