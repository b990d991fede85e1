"""Golden kernels: the generated Triton source of every spec in specs/ is kept under
tests/golden/<spec>.py, and this module regenerates and diffs it, so that a refactor cannot
change a kernel by accident.

The source depends on the IR only (sizes are runtime arguments), so the goldens are emitted from
each spec's IR with a fixed header; the cache's header (versions, IR digest) is left out so that
a version bump alone changes no golden. test_pipeline_runs_the_golden_kernels checks that the pipeline, at the parameters the
other tests use, runs exactly these sources.

To refresh the goldens after an intended codegen change, run

    ATTNC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

and review the diff under tests/golden/ like any other change.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

import attnc
from attnc.codegen.emit import emit_forward
from attnc.codegen.emit_bwd import emit_backward

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("ATTNC_UPDATE_GOLDEN", "").strip().lower() in ("1", "true", "yes", "on")

# Parameters from README and tests/test_specs.py, test_language.py (the kernel source does not
# depend on them; the pipeline check below compiles at them).
PARAMS = {
    "alibi_causal": dict(N=45), "causal": dict(N=64), "cross_causal": dict(M=40, N=96),
    "document_causal": dict(N=40), "gna3d_video": dict(T=4, H=8, W=8), "longformer": dict(N=64, W=5, G=3),
    "maxvit_grid": dict(H=8, W=8, G=2), "natten2d": dict(H=13, W=17, kernel=5, dilation=2),
    "scale_dit": dict(H=12, W=8), "sigmoid_causal": dict(N=64), "sliding_window": dict(N=96, W=20),
    "softcap_sink": dict(N=40, W=8, cap=2.0), "softplus": dict(N=64), "streaming_sink": dict(N=96, W=16, S=4),
    "swin_bias": dict(H=14, W=14), "swin_shifted": dict(H=14, W=14), "power_attention": dict(N=96, W=8),
    "biformer": dict(H=8, W=8, R=4, K=2), "moba": dict(N=64, B=16, K=2),
}


def _header(name: str) -> str:
    return (f"# Golden forward kernel of specs/{name}.attn (tests/test_golden.py).\n"
            "# Refresh on purpose: ATTNC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py")


def _generate(name: str) -> str:
    ir = attnc.parse(SPECS / f"{name}.attn").ir
    return emit_forward(ir, _header(name), emit_backward(ir))


def _body(source: str) -> str:
    """The source after its header comment."""
    return source[source.index("import triton\n"):]


def test_every_spec_has_a_golden_kernel():
    specs = {p.stem for p in SPECS.glob("*.attn")}
    assert set(PARAMS) == specs
    stale = sorted({p.stem for p in GOLDEN.glob("*.py")} - set(PARAMS))
    if UPDATE:
        for name in stale:
            (GOLDEN / f"{name}.py").unlink()
    else:
        assert not stale, f"golden kernels of no spec: {stale}"


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_generated_kernel_matches_golden(name):
    source = _generate(name)
    path = GOLDEN / f"{name}.py"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        if not path.exists() or path.read_text() != source:
            path.write_text(source)
        return
    assert path.exists(), f"no golden kernel {path}; run ATTNC_UPDATE_GOLDEN=1 python -m pytest {__file__}"
    golden = path.read_text()
    if golden != source:
        diff = difflib.unified_diff(golden.splitlines(), source.splitlines(), f"golden/{name}.py", "generated",
                                    lineterm="", n=2)
        shown = "\n".join(list(diff)[:80])
        pytest.fail(f"the kernel generated for specs/{name}.attn differs from its golden:\n{shown}\n"
                    "If the change is intended: ATTNC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_pipeline_runs_the_golden_kernels(name):
    """What attnc.compile loads is the golden source under the cache's own header."""
    fn = attnc.compile(SPECS / f"{name}.attn", tiles=(32, 32), **PARAMS[name])
    assert _body(fn.kernel_source) == _body(_generate(name))
