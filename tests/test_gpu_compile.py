"""Every spec's kernels, forward and backward, compile for real GPU targets (sm_90 in bfloat16,
sm_80 in float16, head dim 64) with Triton's native compiler, on a machine without a GPU, and
pass the static report's checks (`fn.gpu_report`, codegen/target.py): tensor cores for the
matmuls, shared memory within the target's limit, no register spills.
The interpreter, which the rest of the suite runs, accepts code the compiler rejects, so this is
the check that the kernels are GPU code at all. The full matrix is bench/kernel_quality.py.

The reports run in child processes with TRITON_INTERPRET=0 (this process is in interpreter
mode), one per target, side by side.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnc.codegen.target import SHARED_LIMIT
from bench.kernel_quality import PARAMS

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"sm90": (90, "bfloat16", 64, "wgmma"), "sm80": (80, "float16", 64, "mma")}
_SCRIPT = r'''
import json, sys
import attnc
params, arch, dtype, head_dim = json.loads(sys.argv[1])
out = {}
for name, p in params.items():
    fn = attnc.compile(f"specs/{name}.attn", tiles=(64, 64), **p)
    out[name] = [{k: v for k, v in r.items() if k != "cubin"}
                 for r in fn.gpu_report(arch=arch, dtype=dtype, head_dim=head_dim)]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def reports() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    children = {t: subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps([PARAMS, arch, dtype, hd])], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for t, (arch, dtype, hd, _) in TARGETS.items()}
    out = {}
    for t, child in children.items():
        stdout, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, stderr[-3000:]
        out[t] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_every_spec_is_reported():
    assert set(PARAMS) == {p.stem for p in (ROOT / "specs").glob("*.attn")}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_kernels_pass_the_static_report(reports, target, name):
    arch, _, _, tensor_cores = TARGETS[target]
    rows = reports[target][name]
    assert [r["kernel"] for r in rows] == ["attnc_fwd", "attnc_bwd_dq", "attnc_bwd_dkdv"]
    for r in rows:
        # wgmma takes 64 rows per warp group: kernels taking q tiles in sub-tiles use mma
        want = "mma" if r.get("sub_m", 64) < 64 else tensor_cores
        assert r["tensor_cores"] == want, (r["kernel"], r["tensor_cores"])
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], (r["kernel"], r["shared_bytes"])
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} bytes"
        assert r["loops"], f"{r['kernel']}: no main loop found in the SASS"


def test_explain_prints_the_static_report():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "attnc.cli", "explain", "specs/causal.attn", "--N", "64",
                           "--section", "ir", "--target", "sm90", "--dtype", "bf16", "--head-dim", "64"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel") and "regs" in line)
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["attnc_fwd", "attnc_bwd_dq", "attnc_bwd_dkdv"]
    assert all(r[4] == "wgmma" for r in rows)


@pytest.mark.parametrize("kw,match", [(dict(arch=75), "arch 75"), (dict(dtype="float64"), "dtype"),
                                      (dict(head_dim=512), "head_dim 512")])
def test_gpu_report_refuses_what_it_cannot_report(kw, match):
    import attnc

    fn = attnc.compile(ROOT / "specs/causal.attn", N=64)
    with pytest.raises(attnc.AttncError, match=match):
        fn.gpu_report(**kw)
    with pytest.raises(attnc.AttncError, match="reference backend"):
        attnc.compile(ROOT / "specs/causal.attn", backend="reference", N=64).gpu_report()


@pytest.mark.parametrize("dtype,fast", [("bfloat16", True), ("float32", False)])
def test_softcap_uses_the_gpu_tanh_for_16_bit_inputs(dtype, fast):
    """16-bit q and k soft-cap with tanh.approx.f32 (MUFU.TANH: one instruction, error below an
    fp16 rounding of the logit); float32 inputs keep the accurate form (codegen/helpers._TANH)."""
    import attnc

    fn = attnc.compile(ROOT / "specs/softcap_sink.attn", N=64, W=16)
    for r in fn.gpu_report(arch=90, dtype=dtype, head_dim=64, sass=True):
        assert ("MUFU.TANH" in r["sass"]) == fast, r["kernel"]


@pytest.mark.parametrize("dtype,fast", [("bfloat16", True), ("float32", False)])
def test_softplus_first_pass_uses_the_gpu_log2_for_16_bit_inputs(dtype, fast):
    """16-bit q and k run softplus's first pass on lg2.approx (MUFU.LG2, one instruction) before
    the exact loops (two main loops, FULL and PARTIAL, more in the forward); float32 inputs have
    the exact loops only (codegen/emit._softplus_fast)."""
    import attnc

    fn = attnc.compile(ROOT / "specs/softplus.attn", N=64)
    fwd = next(r for r in fn.gpu_report(arch=90, dtype=dtype, head_dim=64, sass=True) if r["kernel"] == "attnc_fwd")
    assert ("MUFU.LG2" in fwd["sass"]) == fast
    if fast:  # float32 takes tiles in pieces: one loop around the rest
        assert len(fwd["loops"]) == 4
