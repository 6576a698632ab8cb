#!/usr/bin/env bash
# One call on a CUDA machine (sized for one H200, under 8 minutes, no network needed):
#   1. install gelora in place (no dependencies, no C++ core: GELORA_NO_EXT=1);
#   2. the `gpu` tests (tests/test_gpu.py; 120 s limit);
#   3. benchmarks/id_gpu.py: GEMM rates, kernel vs float64 reference at 3 shapes, estimate_id at
#      100k and 1M x 4096 (bf16, fp16, fp32) against torch mm+topk, gelora's torch engine and FAISS
#      when importable; partial tables as it goes, the full table last (300 s limit).
# Logs, CSV and JSON go to $OUT when it is set (else benchmarks/results/gpu).
#   bash benchmarks/gpu_check.sh            # everything
#   GPU_CHECK_TESTS=0 bash benchmarks/gpu_check.sh   # benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export GELORA_NO_EXT=1
export PYTHONUNBUFFERED=1

echo "== gpu_check: $(date -Is) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null || true

echo "== install"
if timeout 120 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 \
   && "$PY" -c "import gelora.kernels.knn_top2" >>"$OUT/pip.log" 2>&1; then
  echo "installed (editable)"
else
  # fall back to a source overlay: gelora/ with kernels/ mapped to gelora/kernels/, as setup.py does
  echo "pip install failed (tail of pip.log below); using a source overlay on PYTHONPATH"
  tail -5 "$OUT/pip.log"
  OVL=$(mktemp -d)
  cp -r "$ROOT/gelora" "$OVL/gelora"
  rm -rf "$OVL/gelora/kernels"
  cp -r "$ROOT/kernels" "$OVL/gelora/kernels"
  export PYTHONPATH="$OVL${PYTHONPATH:+:$PYTHONPATH}"
fi
# -P: keep the checkout's gelora/ (which has no kernels/ inside) from shadowing the installed package
PYFLAGS=""
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' && PYFLAGS="-P"
"$PY" $PYFLAGS - <<'EOF'
import torch, gelora
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
from gelora.knn.engines import describe
for name, usable, reasons, _ in describe():
    print(f"  backend {name:7s} usable={usable} {'; '.join(reasons)[:160]}")
EOF

if [ "${GPU_CHECK_TESTS:-1}" != "0" ]; then
  echo "== gpu tests (limit 120 s)"
  timeout 120 "$PY" $PYFLAGS -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider >"$OUT/pytest_gpu.log" 2>&1
  rc=$?
  tail -25 "$OUT/pytest_gpu.log"
  echo "pytest exit code: $rc (124 = time limit)"
fi

echo "== benchmark (limit 300 s)"
timeout 300 "$PY" benchmarks/id_gpu.py --budget "${GPU_CHECK_BUDGET:-270}"
echo "benchmark exit code: $? (124 = time limit; partial tables above, files in $OUT)"
