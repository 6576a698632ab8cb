#!/usr/bin/env bash
# Builds the C++ core under AddressSanitizer into a temporary directory (the installed gelora._C is not
# touched) and runs it on a few inputs: every instruction set, several blockings and thread counts,
# duplicates, float64, and the error paths. Python itself is not instrumented, so libasan is preloaded.
#
#   bash tests/asan_check.sh            (prints "ASAN CHECK PASSED" at the end; exit status 0 on success)
#   KEEP=1 bash tests/asan_check.sh     keeps the build directory
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
CXX_BIN="${CXX:-c++}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gelora-asan.XXXXXX")"
cleanup() { if [[ -z "${KEEP:-}" ]]; then rm -rf "$WORK"; else echo "build kept in $WORK"; fi; }
trap cleanup EXIT

LIBASAN="$("$CXX_BIN" -print-file-name=libasan.so)"
# libstdc++ goes in with it: the interceptor of __cxa_throw must find the real one at start-up
LIBSTDCXX="$("$CXX_BIN" -print-file-name=libstdc++.so)"
if [[ ! -e "$LIBASAN" ]]; then
  echo "libasan.so not found for $CXX_BIN (install the compiler's sanitizer runtime)" >&2
  exit 2
fi

PYBIND11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S "$ROOT" -B "$WORK/build" -DGELORA_ASAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX_BIN" -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND11_DIR" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$WORK/lib" > "$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" -j "$(nproc)" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
SO="$(ls "$WORK"/lib/_C*.so)"

export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1"
LD_PRELOAD="$LIBASAN $LIBSTDCXX" GELORA_ASAN_SO="$SO" "$PY" - <<'PYEOF'
import importlib.util
import os

import numpy as np

spec = importlib.util.spec_from_file_location("_C", os.environ["GELORA_ASAN_SO"])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
info = C.info()
assert info["asan"], "the module under test is not the AddressSanitizer build"
print("asan build:", info)

rng = np.random.default_rng(0)


def check(x, kc, **kw):
    d2, idx, sq, plan = C.knn_candidates(x, kc, **kw)
    xd = x.astype(np.float64)
    full = ((xd[:, None, :] - xd[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    ref = np.sort(full, 1)[:, :kc]
    got = np.sort(np.take_along_axis(full, idx, 1), 1)
    scale = (xd ** 2).sum(1).max() + 1.0
    tol = (1e-4 if x.dtype == np.float32 else 1e-12) * scale
    assert not (idx == np.arange(len(x))[:, None]).any()
    assert np.all(got - ref <= tol), (kw, (got - ref).max())
    ex = C.direct_sq_dist(x, idx)
    assert np.allclose(ex, np.take_along_axis(full, idx, 1), rtol=1e-5, atol=1e-6)


n_runs = 0
for isa in info["isas"]:
    for dtype in (np.float32, np.float64):
        for n, d in [(2, 1), (3, 5), (13, 1), (97, 59), (301, 130)]:
            for kw in [dict(), dict(block_rows=1, block_cols=1, depth=1, prepack=0, private_lists=0),
                       dict(block_rows=1, block_cols=1, depth=1, prepack=1, private_lists=1),
                       dict(block_rows=50, block_cols=40, depth=16, n_threads=3, prepack=1, private_lists=0),
                       dict(block_rows=50, block_cols=40, depth=16, n_threads=3, prepack=0, private_lists=1)]:
                x = rng.standard_normal((n, d)).astype(dtype)
                if n > 10:
                    x[n // 2:n // 2 + 3] = x[:3]
                check(x, min(n - 1, 4), isa=isa, **kw)
                check(x, n - 1, isa=isa, **kw)
                n_runs += 2
                if n > 20:  # a heap of odd size (the last parent has one child)
                    check(x, 19, isa=isa, **kw)
                    n_runs += 1

for dtype in (np.float32, np.float64):
    x = rng.standard_normal((37, 11)).astype(dtype)
    h, mean, n_bad = C.prepare_points(x, rng.integers(1, 2**62, size=11) | 1)
    assert n_bad == 0 and h.shape == (37,) and np.allclose(mean, x.mean(0))
    assert np.allclose(C.centre(x, mean), x - mean.astype(dtype))
    C.centre(x, mean, out=x)

for bad in [lambda: C.knn_candidates(np.zeros((5, 3), np.float32), 5),
            lambda: C.prepare_points(np.zeros((5, 3), np.float32), np.ones(2, np.int64)),
            lambda: C.centre(np.zeros((5, 3), np.float32), np.zeros(4)),
            lambda: C.knn_candidates(np.zeros((5,), np.float32), 1),
            lambda: C.knn_candidates(np.zeros((5, 3), np.int32), 1),
            lambda: C.knn_candidates(np.full((5, 3), np.nan, np.float32), 1),
            lambda: C.knn_candidates(np.zeros((5, 3), np.float32), 1, out_d2=np.zeros((4, 1), np.float32)),
            lambda: C.direct_sq_dist(np.zeros((5, 3), np.float32), np.full((5, 2), 7, np.int64)),
            lambda: C.lora_grad(np.zeros((5, 3), np.float32), np.zeros((4, 2), np.float32),
                                np.zeros((1, 3), np.float32), np.zeros((2, 1), np.float32), 1.0)]:
    try:
        bad()
    except (ValueError, TypeError, IndexError):
        pass
    else:
        raise AssertionError("bad input did not raise")
# the LoRA weight-gradient kernel: every ISA, ragged tiles (k, n not multiples of the vector width,
# ranks around it), blocks and threads, T on and off
for isa in info["isas"]:
    for m, k, n, r in [(1, 1, 1, 1), (37, 19, 23, 3), (97, 59, 33, 17), (130, 100, 70, 64), (20, 33, 47, 256)]:
        for kw in [dict(), dict(block_rows=8, n_threads=3), dict(block_rows=1, n_threads=2)]:
            x = rng.standard_normal((m, k)).astype(np.float32)
            dy = rng.standard_normal((m, n)).astype(np.float32)
            a = rng.standard_normal((r, k)).astype(np.float32)
            b = rng.standard_normal((n, r)).astype(np.float32)
            da, db, t, _ = C.lora_grad(x, dy, a, b, 0.5, want_t=True, isa=isa, **kw)
            T = 0.5 * dy.astype(np.float64) @ b
            assert np.allclose(t, T, rtol=1e-4, atol=1e-4 * np.abs(T).max())
            assert np.allclose(da, T.T @ x, rtol=1e-4, atol=1e-4 * np.abs(T.T @ x).max())
            S = 0.5 * x.astype(np.float64) @ a.T
            assert np.allclose(db, dy.T @ S, rtol=1e-4, atol=1e-4 * np.abs(dy.T @ S).max())
            C.lora_grad(x, dy, a, b, 0.5, isa=isa, **kw)
            s, _ = C.lora_shrink(x, a, np.full(r, 0.5, np.float32), isa=isa,
                                 n_threads=kw.get("n_threads", 0))
            assert np.allclose(s, S, rtol=1e-4, atol=1e-4 * np.abs(S).max())
            n_runs += 3
print(f"{n_runs} core runs clean under AddressSanitizer")

# the backend and the whole pipeline on top of the instrumented core
import sys

import gelora  # noqa: E402

sys.modules["gelora._C"] = C
gelora._C = C
import torch  # noqa: E402

from gelora.testing import assert_knn_match  # noqa: E402

xt = torch.randn(500, 70, generator=torch.Generator().manual_seed(0))
xt[300:310] = xt[:10]
dist, idx = gelora.knn2(xt, k=2, backend="cpp")
ref_d, _ = gelora.knn_reference(xt, k=2)
torch_d, _ = gelora.knn2(xt, k=2, backend="torch")
atol = 2 * float((torch_d.double() - ref_d).abs().max()) + 1e-6 * float(ref_d.median())
assert_knn_match(xt, dist, idx, atol=atol)
assert (dist[:10, 0] == 0).all()
res = gelora.twonn(xt[:, ::2], backend="cpp")
assert res.backend == "cpp" and res.n_duplicates == 10
print("pipeline clean under AddressSanitizer")
print("ASAN CHECK PASSED")
PYEOF
