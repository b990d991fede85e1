"""The GPU benchmark scripts run, in their CPU smoke mode, so that they cannot rot unnoticed:
bench/gpu.sh --smoke runs `attnc bench` and bench/training.py at tiny sizes."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    if os.environ.get("TRITON_INTERPRET", "1") == "0":
        pytest.skip("the smoke mode runs Triton's interpreter")
    env = {**os.environ, "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attnc    fwd+bwd" in done.stdout  # attnc bench's table, forward and backward timed
    results = list((tmp_path / "attnc-gpu-smoke").glob("training-*.md"))
    assert results and "causal" in results[0].read_text()
