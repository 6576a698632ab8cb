#!/usr/bin/env bash
# GPU check of the fused LoRA layers, one command: about 4-6 minutes on an H200, at most 8 (timeouts
# 220 s for the tests, 250 s for the benchmark, plus imports).
#
#   bash benchmarks/lora_gpu_check.sh            # from the repository root
#
# 1. correctness: the `gpu`-marked tests of tests/test_lora.py (Triton path against PEFT's eager
#    formula and float64, fp32/fp16/bf16, ranks 1..256, odd shapes, grouped q/k/v, bf16 training
#    steps) with one tile configuration per kernel (GELORA_LORA_TUNE=0: no autotuning, fewer compiles);
# 2. speed: python benchmarks/lora_speed.py --gpu (bf16, d=4096, r in {8, 16, 64}, 2048 tokens, with
#    autotuning), whose table ends with the speedup over PEFT's eager layer (target >= 1.3x fwd+bwd).
#
# Works from a plain checkout: when gelora is not installed, the repository root goes on PYTHONPATH
# (gelora.lora then loads kernels/ from the source tree). Results go to $OUT when set, else
# benchmarks/results/. Each step has its own timeout so that one hang cannot eat the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if ! python -c "import gelora.lora" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for mod in ("triton", "peft", "transformers", "pytest"):
    try:
        print(mod, importlib.import_module(mod).__version__)
    except Exception as exc:  # noqa: BLE001
        print(mod, "missing:", exc)
import gelora.lora as L
for name, usable, reasons, _ in L.describe_lora_backends("cuda", torch.bfloat16):
    print(f"  lora backend {name}: {'usable' if usable else 'NOT usable: ' + '; '.join(reasons)}")
EOF

status=0
t0=$(date +%s)
if python -c "import pytest" 2>/dev/null; then
    GELORA_LORA_TUNE=0 timeout 220 python -m pytest -q -m gpu tests/test_lora.py -p no:cacheprovider \
        -o addopts="" --junitxml="$RESULTS/lora_gpu_tests.xml" 2>&1 | tail -25
    rc=${PIPESTATUS[0]}
    echo "gpu tests: exit $rc after $(( $(date +%s) - t0 )) s"
    [ "$rc" -ne 0 ] && status=1
else
    echo "pytest missing: correctness tests not run"
    status=1
fi

t1=$(date +%s)
timeout 250 python benchmarks/lora_speed.py --gpu --csv "$RESULTS/lora_speed_gpu.csv" 2>&1 | tee "$RESULTS/lora_speed_gpu.txt"
rc=${PIPESTATUS[0]}
echo "benchmark: exit $rc after $(( $(date +%s) - t1 )) s; total $(( $(date +%s) - t0 )) s"
[ "$rc" -ne 0 ] && status=1
exit $status
