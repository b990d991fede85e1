"""The generated kernels, forward and backward, compile for real GPU targets (sm_90, sm_80) with
Triton's native compiler, on a machine without a GPU: triton.compile on an ASTSource for a
GPUTarget produces PTX and a cubin. The interpreter, which the rest of the suite runs, accepts
code the compiler would reject (scalar/tile mixes, dynamic loop bounds, reductions to scalars),
so this is the check that the kernels are GPU code at all.

The compile runs in a subprocess with TRITON_INTERPRET=0: this process is in interpreter mode.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import attnc
from attnc.codegen import abi
from attnc.ir import nodes as N

cases, arch, dtype, head_dim = json.loads(sys.argv[1])
DATA = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
FLOAT32 = {"Stat", "Delta", "ROW_SCALE", "ROW_BIAS", "SINK"}
results = {}
for name, params, kernel, fname in ((n, p, k, f) for n, p in cases for k, f in
                                    (("fwd", "attnc_fwd"), ("dq", "attnc_bwd_dq"), ("dkdv", "attnc_bwd_dkdv"))):
    fn = attnc.compile(f"specs/{name}.attn", tiles=(64, 64), **params)
    ir = fn.ir
    sig, const = {}, {}
    for a in abi.kernel_args(ir, kernel):
        if a.kind == abi.PTR:
            if a.name in DATA:
                sig[a.name] = "*" + dtype
            elif a.name in FLOAT32 or a.name.endswith("_grad"):
                sig[a.name] = "*fp32"
            elif a.name.endswith("_ptr"):  # a runtime tensor: float32 tables, int32 ids
                n = int(a.name[2:].split("_")[0])
                sig[a.name] = "*fp32" if ir.tensors[n].dtype == N.FLOAT else "*i32"
            else:
                sig[a.name] = "*i32"  # schedule lists and orders
        elif a.kind == abi.INT:
            sig[a.name] = "i32"
        elif a.kind == abi.FLOAT:
            sig[a.name] = "fp32"
        else:
            sig[a.name] = "constexpr"
            const[a.name] = {"HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_D": head_dim,
                             "BLOCK_DV": head_dim, "BLOCK_M": 64, "BLOCK_N": 64}.get(a.name, False)
    compiled = triton.compile(ASTSource(getattr(fn.compiled.module, fname), sig, const),
                              target=GPUTarget("cuda", arch, 32))
    results.setdefault(name, {})[kernel] = {"shared": compiled.metadata.shared, "ptx_mma": compiled.asm["ptx"].count("mma")}
print(json.dumps(results))
'''

CASES = [
    ("swin_bias", {"H": 14, "W": 14}),  # 2-D coordinates, a per-head bias table and its gradient
    ("softcap_sink", {"N": 64}),  # soft-cap and sinks
    ("softplus", {"N": 64}),  # softplus in log space, n_visible in the scale
    ("document_causal", {"N": 64}),  # runtime ids in the mask
]


@pytest.fixture(scope="module")
def sm90() -> dict:
    """Every case compiled for sm_90 in float16, head dim 64, in one subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([CASES, 90, "fp16", 64])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernels_compile_for_sm90(sm90, name):
    results = sm90[name]
    assert set(results) == {"fwd", "dq", "dkdv"}
    for kernel, r in results.items():
        assert r["shared"] <= 227 * 1024, (kernel, r)  # fits an H100's shared memory per block
        assert r["ptx_mma"] > 0, (kernel, "no tensor-core instruction in the PTX")
