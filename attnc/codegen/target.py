"""Static GPU reports: the generated kernels compiled for a GPU target, on any machine.

Triton compiles a kernel for a GPUTarget without a GPU (`triton.compile` on an ASTSource), and
its wheel ships ptxas and cuobjdump. From them, per kernel: registers and spills (ptxas -v on
the PTX), shared memory (Triton's metadata), whether the matmuls use tensor cores (HGMMA is
wgmma, HMMA is mma, in the SASS), and the instruction count of each main loop (a backward branch
in the SASS delimits a loop body).

A process in Triton's interpreter mode cannot compile natively (its kernels and Triton's own
helpers are interpreted functions), so there the compile runs in a child process with
TRITON_INTERPRET=0. The child renders the kernel source from the spec text itself, through the
verified cache path: nothing but attnc's own rendering is executed.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import AttncError
from ..ir import nodes as N
from . import abi
from .pairs import varies_per_pair

KERNELS = {"fwd": "attnc_fwd", "dq": "attnc_bwd_dq", "dkdv": "attnc_bwd_dkdv"}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# Shared memory one block may use (opt-in maximum), bytes: A100, RTX 30xx, RTX 40xx / L40, H100.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_DATA = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
_FLOAT32 = {"Stat", "Delta", "ROW_SCALE", "ROW_BIAS", "SINK"}


def dtype_name(dtype) -> str:
    """Triton's name ('fp16', 'bf16', 'fp32') of a torch dtype or of any of its names
    (torch.bfloat16, 'bfloat16', 'bf16')."""
    name = str(dtype).removeprefix("torch.")
    short = DTYPES.get(name, name)
    if short not in DTYPES.values():
        raise AttncError(f"dtype {dtype!r}: choose float16 (fp16), bfloat16 (bf16) or float32 (fp32)")
    return short


def dot_precision(dtype) -> str:
    """tl.dot's input precision for q, k, v of `dtype`. float32 follows PyTorch's own setting, as
    its matmuls do: "high" and "medium" allow TF32 tensor cores; "highest" (the default) keeps
    float32 accuracy with 3xTF32 (each operand split into a TF32 head and tail, three tensor-core
    products: about 2**-22 relative, the rounding of a float32 sum of the same length), which on
    sm_90 runs its loops in an eighth of the instructions of IEEE FMA loops and without their
    spills (bench/results/kernel-quality-*.md). 16-bit inputs always use tensor cores."""
    import torch

    if dtype != torch.float32:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def launch_config(kernel: str, arch: int | None, head_dim: int, dtype="bf16", block_m: int = 64,
                  ir: N.Attention | None = None) -> tuple[int, int]:
    """(num_warps, num_stages) of a kernel, chosen statically from the reports (bench/results/
    kernel-quality-*.md): the forward takes 4 warps up to head dim 64 and 8 above (with 4, its
    accumulator leaves no registers at D = 128 on sm_80). On sm_90 a wgmma warp group takes 64
    rows: 8 warps on a 64-row tile make both warp groups compute the same tile (twice the MUFU
    and HGMMA instructions per tile), so there the 16-bit forward takes 4 warps up to D = 128 on
    64-row tiles, unless the spec's logit bias is gathered per element (`gathered_bias`: it
    spills with 4; ALiBi's per-head slope does not, and ran its tile twice with 8) (float32 takes
    16-row pieces, as mma, and keeps 8). dQ on sm_90 likewise, where it takes 64-row pieces (no
    bias-table gradients): with 8 warps each thread ran as many MUFU ops as with 4 and more HGMMA
    ones. The other backward kernels hold more tiles live and take 8 warps (4 spill on sm_80 and
    sm_90 even at D = 64; dK/dV's 8 warps split the work: half the MUFU ops per thread); 3
    stages, 2 for dK/dV and above head dim 128 (3 needed 256 KB of shared memory for dQ on sm_90, over its 227 KB, and
    240 KB for a forward with a bias table), 1 at D = 256 below sm_90's shared memory, and 1 for
    the float32 backward above D = 64 (more spilled 4-32 bytes for some specs). `arch` None: no
    GPU (the interpreter ignores both)."""
    bias = ir is not None and gathered_bias(ir)
    hopper_4 = (arch or 0) >= 90 and head_dim <= 128 and block_m <= 64 and not bias and dtype_name(dtype) != "fp32"
    whole_rows = ir is None or sub_tiles(kernel, arch, dtype, head_dim, block_m, block_m, ir)[0] >= 64
    warps = 4 if kernel == "fwd" and (head_dim <= 64 or hopper_4) or kernel == "dq" and hopper_4 and whole_rows else 8
    stages = 2 if kernel == "dkdv" or head_dim > 128 else 3
    if head_dim > 128 and (arch or 90) < 90 or kernel != "fwd" and head_dim > 64 and dtype_name(dtype) == "fp32":
        stages = 1
    return warps, stages


def gathered_bias(ir: N.Attention) -> bool:
    """The logit bias reads a table at indices that vary per (query, key) pair (Swin's relative
    position table): a gather per element, which spills the sm_90 forward with 4 warps. A read
    per tile or per head (ALiBi's `slopes[head]`) is not one."""
    bias = ir.score.logit_bias
    return bias is not None and any(isinstance(x, N.Lookup) and any(varies_per_pair(i) for i in x.indices)
                                    for x in N.walk(bias))


def tune_path(cache_dir: Path, module: str, tiles: tuple[int, int], arch: int, dtype, head_dim: int) -> Path:
    """Where `attnc tune` keeps its choice for these kernels (the module's source hash), tile
    shape (a config that fits 64 x 64 tiles need not fit larger ones), GPU, dtype and head dim."""
    bm, bn = tiles
    return Path(cache_dir) / "tune" / f"{module}-t{bm}x{bn}-sm{arch}-{dtype_name(dtype)}-d{head_dim}.json"


def tuned(cache_dir: Path, module: str, tiles: tuple[int, int], arch: int, dtype, head_dim: int) -> dict | None:
    """{kernel: (num_warps, num_stages)} chosen by `attnc tune` (attnc/tune.py), or None."""
    path = tune_path(cache_dir, module, tiles, arch, dtype, head_dim)
    try:
        data = json.loads(path.read_text())
        return {k: (int(v["num_warps"]), int(v["num_stages"])) for k, v in data["kernels"].items() if k in KERNELS}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or not ours: the static launch config applies


def sub_tiles(kernel: str, arch: int | None, dtype, head_dim: int, block_m: int, block_n: int,
              ir: N.Attention) -> tuple[int, int]:
    """(SUB_M, SUB_N): rows of a q tile and columns of a kv tile a kernel takes at a time, where
    whole 64 x 64 tiles leave too few registers (bench/results/kernel-quality-*.md). 16-bit:
    - forward: whole tiles; 32 columns above head dim 128 when the spec has a logit bias (Swin's
      spilled);
    - dQ: 16 x 32 above head dim 128 (it spilled 4-68 bytes at D = 256 in larger pieces), and
      32 rows when it also sums bias table gradients (the per-entry loop over the
      tile spilled 100-1,000 bytes);
    - dK/dV: 32 rows above head dim 64 (it spilled at D = 128 on sm_90, at D = 256 everywhere);
      32 columns up to D = 64 below sm_90 (8-32 bytes of spills on sm_80 for 6 of the specs).
    float32 operands take twice the registers (3xTF32 splits each in two): forward 32 x 32 (16 x
    32 above D = 64); dQ and dK/dV 16 rows, 32 columns up to D = 64 and 16 above. No GPU
    (`arch` None: the interpreter): whole tiles. Pieces are powers of two dividing the tile, and
    the sums run in the same order either way (rows are independent; columns and table entries
    are summed piece by piece in schedule order)."""
    if arch is None:
        return block_m, block_n
    tables, bias = bool(abi.grad_tables(ir)), ir.score.logit_bias is not None
    if dtype_name(dtype) == "fp32":
        m, n = {"fwd": (32 if head_dim <= 64 else 16, 32), "dq": (16, 32 if head_dim <= 64 else 16),
                "dkdv": (16, 32 if head_dim <= 64 else 16)}[kernel]
    elif kernel == "fwd":
        m, n = block_m, (32 if head_dim > 128 and bias else block_n)
    elif kernel == "dq":
        m, n = (16, 32) if head_dim > 128 else ((32 if tables else block_m), block_n)
    else:
        m, n = (32 if head_dim > 64 else block_m), (32 if head_dim <= 64 and arch < 90 else block_n)
    return min(m, block_m), min(n, block_n)


def head_chunk(kernel: str, arch: int | None, dtype, head_dim: int) -> int:
    """D_CHUNK of a backward kernel: head-dim columns of q.k and do.v it multiplies at a time
    (codegen/emit_bwd._head_dot). 32 for float32 above head dim 64 on a GPU, where whole rows of
    3xTF32 operands left too few registers (4-28 bytes of spills in dQ and dK/dV); else the whole
    head dim. The forward takes none."""
    if kernel != "fwd" and arch is not None and dtype_name(dtype) == "fp32" and head_dim > 64:
        return 32
    return block_dim(head_dim)


def block_dim(head_dim: int) -> int:
    """BLOCK_D (BLOCK_DV) of a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def launch_values(ir: N.Attention, kernel: str, head_dim: int, values: dict | None) -> dict[str, int]:
    """The integer arguments Triton sees when the kernel is launched on contiguous [B, H, N, D]
    tensors (8 query heads, as many kv heads) with `values`: the binding's `Nq`, `Nk` and
    parameters (kernel argument names). A table's last stride is 1 (contiguous); its sizes, and
    anything else not known before a call, are left out (no specialisation)."""
    values = dict(values or {})
    nq, nk = values.get("Nq"), values.get("Nk")
    out = {"n_heads": 8, "kv_group": 1, "head_dim": head_dim, **values}
    for a in abi.kernel_args(ir, kernel):
        if a.name.startswith("stride_"):
            n = nq if a.name[7:-1] in ("q", "o", "do", "dq") else nk
            per = {"d": 1, "m": head_dim, "n": head_dim, "h": None if n is None else n * head_dim}[a.name[-1]] \
                if a.name[-1] in "dmnh" else None
            if a.name[-1] == "b" and n is not None:
                per = 8 * n * head_dim
            if per is not None:
                out[a.name] = per
        elif a.name.startswith("rt") and a.name[-2:] == f"s{ir.tensors[int(a.name[2:].split('_')[0])].rank - 1}":
            out[a.name] = 1
    return out


def signature(ir: N.Attention, kernel: str, dtype: str, head_dim: int, block_m: int, block_n: int,
              precision: str = "ieee", flags: dict | None = None,
              values: dict | None = None) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attrs) of one kernel for q, k, v of `dtype` ('fp16',
    'bf16', 'fp32') and head dim `head_dim` (also Dv), from the ABI; `precision`: tl.dot's input
    precision (dot_precision); `flags`: the boolean constexprs the launch sets (Q_PERMUTED,
    KV_PERMUTED, INT64; the rest False). Specialised as Triton's launcher specialises the
    arguments of a launch (`launch_values`): an integer equal to 1 becomes the constant 1, one
    divisible by 16 and every pointer (torch allocations are aligned) carry tt.divisibility 16."""
    pow2 = block_dim(head_dim)
    known = launch_values(ir, kernel, head_dim, values)
    sig, const, attrs = {}, {}, {}
    for i, a in enumerate(abi.kernel_args(ir, kernel)):
        if a.kind == abi.PTR:
            attrs[(i,)] = [["tt.divisibility", 16]]
            if a.name in _DATA:
                sig[a.name] = "*" + dtype
            elif a.name in _FLOAT32 or a.name.endswith("_grad"):
                sig[a.name] = "*fp32"
            elif a.name.startswith("rt") and a.name.endswith("_ptr"):  # float32 tables, int32 ids
                sig[a.name] = "*fp32" if ir.tensors[int(a.name[2:].split("_")[0])].dtype == N.FLOAT else "*i32"
            else:
                sig[a.name] = "*i32"  # schedule lists and orders
        elif a.kind == abi.INT:
            v = known.get(a.name)
            if v == 1:
                sig[a.name], const[a.name] = "constexpr", 1
            else:
                sig[a.name] = "i32"
                if v is not None and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif a.kind == abi.FLOAT:
            sig[a.name] = "fp32"
        else:
            sig[a.name] = "constexpr"
            const[a.name] = {"HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_D": pow2, "BLOCK_DV": pow2,
                             "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": precision, "D_CHUNK": pow2,
                             "ROUTE_K": known.get("ROUTE_K", 4), "FAST_TANH": dtype != "fp32",
                             "FAST_SOFTPLUS": int(dtype != "fp32"), "POS_SCALE": True,
                             **(flags or {})}.get(a.name, a.name.endswith("_want"))
    return sig, const, attrs


def gpu_report(spec_text: str, ir: N.Attention, arch: int, dtype, head_dim: int, block_m: int,
               block_n: int, num_warps: int | None = None, num_stages: int | None = None, sass: bool = False,
               flags: dict | None = None, values: dict | None = None) -> list[dict]:
    """One dict per kernel: kernel, registers, spill_bytes, shared_bytes, tensor_cores ('wgmma',
    'mma' or 'none'), num_warps, num_stages, loops (SASS instructions per main loop, in program
    order), cubin (bytes), sub_m, sub_n and d_chunk (`sub_tiles`, `head_chunk`: below 64 rows, sm_90 runs the matmuls
    as mma, wgmma needing 64 rows per warp group), and with sass=True the SASS text. float32 follows
    torch.get_float32_matmul_precision(), as the launch does; warps and stages are the launch's
    (`launch_config`) unless given. Arguments are specialised as a launch on contiguous tensors
    with `values` (the binding's sizes and parameters) specialises them (`signature`)."""
    if arch not in SHARED_LIMIT:
        raise AttncError(f"arch {arch} is not a target attnc reports on; choose one of {sorted(SHARED_LIMIT)}")
    dtype = dtype_name(dtype)
    if not 1 <= head_dim <= 256:
        raise AttncError(f"head_dim {head_dim} is outside 1..256")
    import torch

    precision = dot_precision(getattr(torch, {v: k for k, v in DTYPES.items()}[dtype]))
    configs, pieces = {}, {}
    for kernel in KERNELS:
        warps, stages = launch_config(kernel, arch, head_dim, dtype, block_m, ir)
        configs[kernel] = (num_warps or warps, num_stages or stages)
        pieces[kernel] = (*sub_tiles(kernel, arch, dtype, head_dim, block_m, block_n, ir),
                          head_chunk(kernel, arch, dtype, head_dim))
    job = dict(spec=spec_text, arch=arch, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
               configs=configs, pieces=pieces, precision=precision, flags=flags or {}, values=values or {})
    from ..settings import settings

    if settings().interpret:
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        try:
            done = subprocess.run([sys.executable, "-m", "attnc.codegen.target"], input=json.dumps(job), env=env,
                                  capture_output=True, text=True, timeout=1800,
                                  cwd=str(Path(__file__).resolve().parents[2]))
        except subprocess.TimeoutExpired:
            raise AttncError(f"compiling for sm_{arch} took more than 30 minutes; gave up") from None
        if done.returncode != 0:
            raise AttncError(f"compiling for sm_{arch} failed:\n{done.stderr[-4000:]}")
        compiled = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        compiled = _compile_all(job, ir)
    rows = [describe(KERNELS[kernel], entry, *configs[kernel], sass) for kernel, entry in compiled.items()]
    for kernel, row in zip(compiled, rows):  # the pieces of a tile the kernel takes at a time
        row["sub_m"], row["sub_n"], row["d_chunk"] = pieces[kernel]
    return rows


def _compile_all(job: dict, ir: N.Attention | None = None) -> dict:
    """{kernel: {shared, ptxas (its -v log), cubin (base64)}}, compiled natively in this process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..settings import settings
    from .cache import load_module

    if ir is None:
        from ..frontend import parse
        from ..ir.lower import lower

        ir = lower(parse(job["spec"]))
    module, _, _ = load_module(ir, settings().cache_dir)
    out = {}
    for kernel, name in KERNELS.items():
        flags = dict(job.get("flags") or {})
        flags["SUB_M"], flags["SUB_N"], chunk = job["pieces"][kernel]
        if kernel != "fwd":
            flags["D_CHUNK"] = chunk
        sig, const, attrs = signature(ir, kernel, job["dtype"], job["head_dim"], job["block_m"], job["block_n"],
                                      job["precision"], flags, job.get("values"))
        k = triton.compile(ASTSource(getattr(module, name), sig, const, attrs),
                           target=GPUTarget("cuda", job["arch"], 32),
                           options={"num_warps": job["configs"][kernel][0], "num_stages": job["configs"][kernel][1]})
        out[kernel] = assembled(k, job["arch"])
    return out


def assembled(k, arch: int) -> dict:
    """{shared, ptxas (its -v log: registers, spills), cubin (base64)} of a kernel Triton compiled
    for sm_`arch`: what `describe` reads (bench/yardstick.py's kernel goes through it too)."""
    with tempfile.TemporaryDirectory(prefix="attnc-report-") as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        info = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp) / "v.o")],
                              capture_output=True, text=True)
    if info.returncode != 0:
        raise AttncError(f"ptxas could not assemble {k.name} for sm_{arch}:\n{info.stderr[-2000:]}")
    return {"shared": int(k.metadata.shared), "ptxas": info.stdout + info.stderr,
            "cubin": base64.b64encode(k.asm["cubin"]).decode()}


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (its wheel ships one per CUDA generation)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        from triton import knobs

        return knobs.nvidia.ptxas.path


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / name)


def describe(name: str, entry: dict, num_warps: int, num_stages: int, sass: bool = False) -> dict:
    """The report of one assembled kernel (see gpu_report)."""
    cubin = base64.b64decode(entry["cubin"])
    with tempfile.TemporaryDirectory(prefix="attnc-report-") as tmp:
        cub = Path(tmp) / "k.cubin"
        cub.write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-sass", str(cub)], capture_output=True, text=True).stdout
    log = entry["ptxas"]
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    tensor = "wgmma" if "HGMMA" in text else "mma" if "HMMA" in text else "none"
    out = {"kernel": name, "registers": int(regs.group(1)) if regs else None,
           "spill_bytes": max(spills, default=0), "shared_bytes": entry["shared"], "tensor_cores": tensor,
           "num_warps": num_warps, "num_stages": num_stages, "loops": main_loops(text), "cubin": cubin}
    if sass:
        out["sass"] = text
    return out


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)")


def main_loops(sass: str) -> list[int]:
    """SASS instructions in each outermost loop body, in program order. A loop is a backward
    branch (to an address at or before the branch); loops nested in another count towards it."""
    spans = set()
    for line in sass.splitlines():
        m = _INSN.search(line)
        if not m:
            continue
        b = _BRANCH.search(m.group(2))
        at = int(m.group(1), 16)
        if b and int(b.group(1), 16) < at:
            spans.add((int(b.group(1), 16), at))
    outer = sorted(s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o != s for o in spans))
    return [(end - start) // 16 + 1 for start, end in outer]  # 16-byte instructions (sm_70 and later)


def _child() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(_compile_all(job)))


if __name__ == "__main__":
    _child()
