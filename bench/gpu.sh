#!/usr/bin/env bash
# The GPU benchmark in one command, sized for under 5 minutes on one H100/H200:
#   bash bench/gpu.sh            # writes bench/results/training-<date>.{json,md} and attnc-bench-<date>.txt
#   bash bench/gpu.sh --smoke    # the same scripts at tiny sizes on CPU (Triton's interpreter): do they run?
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--smoke" ]]; then
    export TRITON_INTERPRET=1
    out="${TMPDIR:-/tmp}/attnc-gpu-smoke"
    mkdir -p "$out"
    python -m attnc.cli bench specs/causal.attn --N 128 --heads 2 --head-dim 16 --smoke
    python -m bench.training --smoke --only causal_8k,alibi_causal --out "$out"
    exit 0
fi

out=bench/results
mkdir -p "$out"
python - <<'PY' || { echo "bench/gpu.sh needs a CUDA device (use --smoke on CPU)" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
PY
# Forward and forward+backward against compiled FlexAttention and SDPA (about 3.5 minutes).
python -m bench.training --out "$out" --budget 210
# attnc bench on four patterns (about 1.5 minutes; routed MoBA: the peers get this data's routed mask).
report="$out/attnc-bench-$(date +%F).txt"
python - > "$report" <<'PY'
import datetime, platform, torch, triton, attnc
print(f"# attnc bench on {torch.cuda.get_device_name()}, {datetime.date.today()}")
print(f"# Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, attnc {attnc.__version__}")
PY
for args in "specs/causal.attn --N 4096,16384" \
            "specs/sliding_window.attn --N 16384 --W 1024" \
            "specs/natten2d.attn --H 128 --W 128 --kernel 7" \
            "specs/moba.attn --N 4096 --B 128 --K 4"; do
    # shellcheck disable=SC2086
    python -m attnc.cli bench $args --batch 2 --heads 16 --head-dim 128 --dtype bfloat16 | tee -a "$report"
done
echo "results: $out/training-$(date +%F).md, $report"
