"""Triton kernels work whatever imported Triton first (each case in a fresh interpreter)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

FLEX = """
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
x = torch.randn(1, 1, 128, 16)
block_mask = create_block_mask(lambda b, h, q, k: k <= q, 1, 1, 128, 128, device="cpu")
flex_attention(x, x, x, block_mask=block_mask)
"""

# Compile after whatever came first; softplus reads more of triton.language's own @jit helpers
# (reductions, math) than softmax does.
CHECK = """
import attnc, torch
device = "cuda" if torch.cuda.is_available() else "cpu"
for spec in ("specs/causal.attn", "specs/softplus.attn"):
    fn = attnc.compile(spec, N=64)
    ref = attnc.compile(spec, backend="reference", N=64)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        out = fn(q.to(device), k.to(device), v.to(device)).cpu().double()
    err = (out - ref(q.double(), k.double(), v.double())).abs().max().item()
    assert err < 1e-4, (spec, err)
print("OK")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not torch.cuda.is_available():
        # `import attnc` in this process set it; the child must start as a user's process does.
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("first", ["import triton", "import torch._inductor", FLEX,
                                   "import triton\nimport attnc\nimport torch._inductor"],
                         ids=["triton", "inductor", "flex_attention", "attnc_between"])
def test_triton_backend_works_whatever_imported_triton_first(first):
    result = _run(first + "\n" + CHECK)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is chosen only without CUDA")
def test_import_attnc_decides_interpreter_mode_before_triton_is_imported():
    # Triton builds triton.language's own @jit helpers when it is imported: interpreted ones
    # only if TRITON_INTERPRET was already set.
    result = _run("""
        import sys, attnc
        assert "triton" not in sys.modules
        import triton.language as tl
        print(type(tl.zeros).__name__)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["InterpretedFunction"]
