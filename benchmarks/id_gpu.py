"""How fast is exact TwoNN with gelora's Triton engine on one GPU, against the dense GEMM floor and
against what users would write instead (torch mm + topk), and is it still exact?

Steps (each with its own time limit; a step that would overrun the budget is skipped and says so):
  1. the card's measured bf16 and tf32 GEMM rates (8192^3 torch.mm, median of 10);
  2. correctness: gelora.knn2(backend="triton") against the float64 reference (gelora.knn_reference)
     at 3 shapes, tie-aware, plus the engine's error bound checked on a subset of rows against exact
     float64 distances to every point;
  3. estimate_id at 100k x 4096 and 1M x 4096 (bf16, fp16, fp32 inputs) for the providers
       gelora-triton   gelora.twonn(x, backend="triton"): the whole exact pipeline
       gelora-kernel   the Triton candidate search alone (triton_candidates on the centred points)
       gelora-torch    gelora.twonn(x, backend="torch") (blocked float32 mm + topk; 1M: N^2 estimate)
       torch-mm-topk   plain torch: centred x @ x.T in the input dtype over row blocks + topk(2)
                       (not exact in low precision; the speed a user would get); stopped after its
                       time limit and extrapolated from the blocks done
       faiss           faiss GpuIndexFlatL2 (when faiss with GPU support is importable; 100k only)

The table printed last gives seconds, the dense-equivalent rate 2 N^2 D / t in TFLOP/s, its fraction
of the measured bf16 GEMM rate (the symmetric kernel does half the products, so > 1 is possible),
the speed-up over torch-mm-topk, the ID and the rows recomputed in float64. Rows go to
$OUT/id_gpu.csv (or benchmarks/results/id_gpu.csv) and a JSON summary next to it.

    python benchmarks/id_gpu.py --budget 420          # about 6 minutes on one H200
    python benchmarks/id_gpu.py --quick               # small shapes, a minute
    TRITON_INTERPRET=1 python benchmarks/id_gpu.py --smoke   # tiny shapes on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import append_csv, format_table  # noqa: E402

import torch  # noqa: E402

OUT = Path(os.environ.get("OUT") or (HERE / "results"))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOG = None
T0 = time.perf_counter()
RESULTS = []
INFO = {}


def log(msg: str = "") -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    if LOG is not None:
        LOG.write(line + "\n")
        LOG.flush()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def free() -> None:
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# 1. GEMM rates
# ---------------------------------------------------------------------------------------------------
def gemm_rate(dtype: torch.dtype, tf32: bool = False, n: int = 8192, reps: int = 10) -> float:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        g = torch.Generator(device=DEV).manual_seed(0)
        a = torch.randn(n, n, device=DEV, dtype=torch.float32, generator=g).to(dtype)
        b = torch.randn(n, n, device=DEV, dtype=torch.float32, generator=g).to(dtype)
        for _ in range(3):
            torch.mm(a, b)
        ts = []
        for _ in range(reps):
            t, _ = timed(lambda: torch.mm(a, b))
            ts.append(t)
        return 2 * n ** 3 / statistics.median(ts)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------------
# Data: a smooth `intrinsic`-dimensional manifold in R^d (tanh map of Gaussian latents, offset 5)
# ---------------------------------------------------------------------------------------------------
def make_data(n: int, d: int, dtype: torch.dtype, intrinsic: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w1 = torch.randn(intrinsic, 256, device=DEV, generator=g) / math.sqrt(intrinsic)
    w2 = torch.randn(256, d, device=DEV, generator=g) / math.sqrt(256)
    out = torch.empty(n, d, device=DEV, dtype=dtype)
    step = 65536
    for s in range(0, n, step):
        e = min(n, s + step)
        z = torch.randn(e - s, intrinsic, device=DEV, generator=g)
        out[s:e] = (torch.tanh(z @ w1) @ w2 + 5.0).to(dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------
def mle_id(d1: torch.Tensor, d2: torch.Tensor) -> float:
    keep = d1 > 0
    lm = torch.log(d2[keep].double() / d1[keep].double())
    return float((lm.numel() - 1) / lm.sum())


def torch_mm_topk(x: torch.Tensor, limit_s: float, block: int = 2048):
    """Plain torch: centred x in its dtype, (block, N) distance tiles, topk(2). Returns
    (seconds, id, extrapolated)."""
    n = x.shape[0]
    sync()
    t0 = time.perf_counter()
    mean = x.float().mean(0)
    xc = (x.float() - mean).to(x.dtype)
    sq = xc.float().square().sum(1)
    d1 = torch.empty(n, device=DEV)
    d2 = torch.empty(n, device=DEV)
    done = 0
    for s in range(0, n, block):
        e = min(n, s + block)
        t = torch.mm(xc[s:e], xc.T).float()
        t.mul_(-2).add_(sq.unsqueeze(0)).add_(sq[s:e].unsqueeze(1))
        t[torch.arange(e - s, device=DEV), torch.arange(s, e, device=DEV)] = float("inf")
        v = torch.topk(t, 2, dim=1, largest=False).values.clamp_min(0).sqrt()
        d1[s:e], d2[s:e] = v[:, 0], v[:, 1]
        done = e
        if (s // block) % 16 == 15:
            sync()
            if time.perf_counter() - t0 > limit_s:
                break
    sync()
    dt = time.perf_counter() - t0
    est = dt * n / done
    return est, mle_id(d1[:done], d2[:done]), done < n


def faiss_gpu(x: torch.Tensor):
    import faiss  # noqa: PLC0415

    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError("faiss has no GPU support")
    xs = (x.float() - x.float().mean(0)).cpu().numpy()
    sync()
    t0 = time.perf_counter()
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatL2(res, xs.shape[1])
    index.add(xs)
    dd, _ = index.search(xs, 3)
    dt = time.perf_counter() - t0
    dd = torch.from_numpy(dd).clamp_min(0).sqrt()
    return dt, mle_id(dd[:, 1], dd[:, 2])


def add_row(shape, dtype_name, provider, seconds, rate_bf16, n, d, id_=float("nan"), n_fixed="",
            note=""):
    flops = 2.0 * n * n * d
    row = dict(shape=shape, dtype=dtype_name, provider=provider, s=seconds,
               tflops=flops / seconds / 1e12 if seconds and seconds == seconds else float("nan"),
               frac_gemm=(flops / seconds / rate_bf16) if rate_bf16 and seconds else float("nan"),
               x_vs_torch=float("nan"), id=id_, n_fixed=n_fixed, note=note)
    RESULTS.append(row)
    return row


def fill_ratios() -> None:
    base = {(r["shape"], r["dtype"]): r["s"] for r in RESULTS if r["provider"] == "torch-mm-topk"}
    for r in RESULTS:
        b = base.get((r["shape"], r["dtype"]))
        if b and r["s"] == r["s"] and r["s"] > 0:
            r["x_vs_torch"] = b / r["s"]


def print_table(title: str) -> None:
    fill_ratios()
    cols = ["shape", "dtype", "provider", "s", "tflops", "frac_gemm", "x_vs_torch", "id", "n_fixed", "note"]
    log(title)
    for line in format_table(RESULTS, cols, floatfmt="{:.4g}").splitlines():
        log(line)


# ---------------------------------------------------------------------------------------------------
# 2. Correctness
# ---------------------------------------------------------------------------------------------------
def check_correctness(n: int, d: int, dtype: torch.dtype) -> dict:
    import gelora
    from gelora.knn.engines.triton import triton_candidates
    from gelora.knn.points import centre

    x = make_data(n, d, dtype, seed=n)
    x[3] = x[11]  # a duplicate
    dist, idx = gelora.knn2(x, backend="triton")
    rd, _ = gelora.knn_reference(x, k=2)
    dev = float((dist.double() - rd).abs().max())
    ok_d = bool(torch.allclose(dist.double(), rd, rtol=1e-5, atol=1e-5))
    xc = centre(x)
    x64 = xc.double()
    at = torch.stack([(x64[idx[:, j]] - x64).pow(2).sum(-1) for j in range(idx.shape[1])], 1).sqrt()
    ok_i = bool(torch.allclose(at, rd, rtol=1e-5, atol=1e-5)) and bool((idx != torch.arange(n, device=DEV)[:, None]).all())
    # the error bound on 512 rows against exact float64 distances to every point
    c2, ci, err = triton_candidates(xc, 4)
    rows = torch.arange(0, n, max(1, n // 512), device=DEV)[:512]
    ratio, viol = 0.0, 0
    sq64 = x64.square().sum(1)
    for s in range(0, rows.numel(), 64):
        r = rows[s:s + 64]
        # float64 norm formula: its error (~1e-16 |x|^2) is far below the bounds being checked
        ex = (sq64[r].unsqueeze(1) + sq64.unsqueeze(0) - 2.0 * (x64[r] @ x64.T)).clamp_min(0)
        ex[torch.arange(r.numel(), device=DEV), r] = float("inf")
        e = err[r].double()
        atc = torch.gather(ex, 1, ci[r])
        ratio = max(ratio, float(((c2[r].double() - atc).abs() / e[:, None]).max()))
        non = torch.ones_like(ex, dtype=torch.bool)
        non.scatter_(1, ci[r], False)
        non[torch.arange(r.numel(), device=DEV), r] = False
        viol += int(((ex < (c2[r, -1].double() - e)[:, None]) & non).sum())
    res = gelora.twonn(x, backend="triton")
    out = dict(shape=f"{n}x{d}", dtype=str(dtype).replace("torch.", ""), dist_ok=ok_d, idx_ok=ok_i,
               max_dev=dev, bound_ratio_max=ratio, floor_violations=viol, n_fixed=res.n_fixed,
               err_median_rel=float((err / c2[:, -1].clamp_min(1e-30)).median()))
    del x, xc, x64, c2, ci, err
    free()
    return out


# ---------------------------------------------------------------------------------------------------
# 3. Timings
# ---------------------------------------------------------------------------------------------------
def run_shape(n: int, d: int, dtypes, budget: Budget, rate_bf16: float, big: bool) -> None:
    import gelora
    from gelora.knn.engines.triton import triton_candidates
    from gelora.knn.points import centre

    shape = f"{n}x{d}"
    base = make_data(n, d, torch.float32, seed=1)
    floor = 2.0 * n * n * d / rate_bf16
    log(f"{shape}: dense bf16 GEMM floor {floor:.2f} s at {rate_bf16 / 1e12:.0f} TFLOP/s")
    t_bf16 = None
    for dt in dtypes:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]
        guess = t_bf16 or floor
        if big and "t_small_" + name in INFO:  # N^2 scaling of the smaller shape's time
            guess = max(guess, INFO["t_small_" + name] * (n / INFO["ref_n"]) ** 2)
        need = 1.5 * guess + 20
        if budget.left() < need:
            log(f"skip {shape} {name}: {budget.left():.0f} s left, needs ~{need:.0f} s")
            add_row(shape, name, "gelora-triton", float("nan"), rate_bf16, n, d, note="skipped: budget")
            continue
        x = base.to(dt) if dt != torch.float32 else base
        reps = 1 if big else 3
        try:
            if not big:
                timed(lambda: gelora.twonn(x, backend="triton"))  # warm-up: compile, tune
            ts, res = [], None
            for _ in range(reps):
                t, res = timed(lambda: gelora.twonn(x, backend="triton"))
                ts.append(t)
            t = statistics.median(ts)
            t_bf16 = t_bf16 or t
            if not big:
                INFO["t_small_" + name] = t
            add_row(shape, name, "gelora-triton", t, rate_bf16, n, d, res.id, res.n_fixed,
                    note="" if reps > 1 else "1 run")
            log(f"  gelora-triton {name}: {t:.2f} s  id={res.id:.3f}  n_fixed={res.n_fixed}")
        except Exception:  # noqa: BLE001 - keep going, report
            log(f"  gelora-triton {name} FAILED:\n{traceback.format_exc()}")
            add_row(shape, name, "gelora-triton", float("nan"), rate_bf16, n, d, note="failed")
        if name == "bf16" and budget.left() > 2 * (t_bf16 or floor) + 10:
            try:
                xc = centre(x)
                t, _ = timed(lambda: triton_candidates(xc, 4))
                add_row(shape, name, "gelora-kernel", t, rate_bf16, n, d, note="candidates only")
                log(f"  gelora-kernel {name}: {t:.2f} s")
                if not big:
                    t2, _ = timed(lambda: triton_candidates(xc, 4, symmetric=False))
                    add_row(shape, name, "gelora-kernel-rows", t2, rate_bf16, n, d, note="no symmetric tiles")
                    log(f"  gelora-kernel rows-only {name}: {t2:.2f} s")
                del xc
                free()
            except Exception:  # noqa: BLE001
                log(f"  gelora-kernel FAILED:\n{traceback.format_exc()}")
        limit = 60.0 if big else 30.0
        if name in ("bf16", "fp16") or not big:
            if budget.left() > limit + 20:
                try:
                    t, id_, extrap = torch_mm_topk(x, limit)
                    add_row(shape, name, "torch-mm-topk", t, rate_bf16, n, d, id_,
                            note="extrapolated" if extrap else "1 run")
                    log(f"  torch-mm-topk {name}: {t:.2f} s{' (extrapolated)' if extrap else ''}  id={id_:.3f}")
                except Exception:  # noqa: BLE001
                    log(f"  torch-mm-topk FAILED:\n{traceback.format_exc()}")
            else:
                log(f"  skip torch-mm-topk {name}: budget")
        free()
        if not big and name == "fp32" and budget.left() > 60:
            try:
                t, res = timed(lambda: gelora.twonn(x, backend="torch"))
                add_row(shape, name, "gelora-torch", t, rate_bf16, n, d, res.id, res.n_fixed, note="1 run")
                INFO.setdefault("gelora_torch_100k_s", t)
                log(f"  gelora-torch {name}: {t:.2f} s id={res.id:.3f}")
            except Exception:  # noqa: BLE001
                log(f"  gelora-torch FAILED:\n{traceback.format_exc()}")
            try:
                t, id_ = faiss_gpu(x)
                add_row(shape, name, "faiss", t, rate_bf16, n, d, id_, note="GpuIndexFlatL2")
                log(f"  faiss {name}: {t:.2f} s id={id_:.3f}")
            except Exception as exc:  # noqa: BLE001
                log(f"  faiss: not run ({type(exc).__name__}: {exc})")
        del x
        free()
    if big and "gelora_torch_100k_s" in INFO:
        ref_n = INFO["ref_n"]
        est = INFO["gelora_torch_100k_s"] * (n / ref_n) ** 2
        add_row(shape, "fp32", "gelora-torch", est, rate_bf16, n, d, note=f"est. N^2 from {ref_n}")
    del base
    free()


def main() -> int:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1 (checks this script)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    LOG = (OUT / "id_gpu.log").open("a")
    budget = Budget(args.budget)
    if DEV != "cuda" and not (args.smoke and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        log("no CUDA device: nothing to measure (TRITON_INTERPRET=1 ... --smoke checks the script on the CPU)")
        return 2
    import triton

    import gelora
    from gelora.knn.engines import all_backends
    from gelora.kernels import knn_top2 as kmod

    all_backends()  # register every engine before anything imports one backend module directly

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    else:
        name, sms = "cpu (Triton interpreter)", os.cpu_count()
    INFO.update(device=name, sms=sms, torch=torch.__version__, triton=triton.__version__,
                gelora=gelora.__version__)
    log(f"{name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")

    gemm_n = 256 if args.smoke else 8192
    rate_bf16 = gemm_rate(torch.bfloat16, n=gemm_n)
    rate_tf32 = gemm_rate(torch.float32, tf32=True, n=gemm_n)
    INFO.update(gemm_bf16_tflops=rate_bf16 / 1e12, gemm_tf32_tflops=rate_tf32 / 1e12)
    log(f"GEMM {gemm_n}^3: bf16 {rate_bf16 / 1e12:.0f} TFLOP/s, tf32 {rate_tf32 / 1e12:.0f} TFLOP/s")
    free()

    checks = [(4097, 59, torch.float32), (20000, 768, torch.bfloat16), (50000, args.dim, torch.bfloat16)]
    if args.quick:
        checks = checks[:2]
    if args.smoke:  # the interpreter has no bf16 tl.dot; fp16 inputs still use fp16 tiles
        checks = [(97, 59, torch.float32), (150, 33, torch.float16), (203, args.dim, torch.float32)]
    INFO["checks"] = []
    for n, d, dt in checks:
        if budget.left() < (5 if args.smoke else 60):
            log(f"skip check {n}x{d}: budget")
            continue
        try:
            t, c = timed(lambda: check_correctness(n, d, dt))
            c["seconds"] = t
            INFO["checks"].append(c)
            log(f"check {c['shape']} {c['dtype']}: dist_ok={c['dist_ok']} idx_ok={c['idx_ok']} "
                f"max|d-ref|={c['max_dev']:.2e} bound ratio max={c['bound_ratio_max']:.3f} "
                f"floor violations={c['floor_violations']} n_fixed={c['n_fixed']} "
                f"err/d2 median={c['err_median_rel']:.2e} ({t:.1f} s incl. compile)")
        except Exception:  # noqa: BLE001
            log(f"check {n}x{d} FAILED:\n{traceback.format_exc()}")
            INFO["checks"].append(dict(shape=f"{n}x{d}", failed=traceback.format_exc()[-2000:]))

    shapes = [(20000 if args.quick else 100_000, False)]
    if not args.quick:
        shapes.append((1_000_000, True))
    if args.smoke:
        shapes = [(160, False), (320, True)]
    INFO["ref_n"] = shapes[0][0]
    for n, big in shapes:
        dts = [torch.bfloat16, torch.float16, torch.float32]
        if args.smoke:
            dts = [torch.float16, torch.float32]
        try:
            run_shape(n, args.dim, dts, budget, rate_bf16, big)
        except Exception:  # noqa: BLE001
            log(f"{n}x{args.dim} FAILED:\n{traceback.format_exc()}")
        INFO["tuned_configs"] = {str(k): str(v) for k, v in kmod._tuned.items()}
        print_table(f"partial table after {n} rows")
        _save()
    log(f"tuned tile configs: {INFO.get('tuned_configs')}")
    print_table("RESULTS (s: median seconds; tflops: 2 N^2 D / s; frac_gemm: of the measured bf16 GEMM "
                "rate; x_vs_torch: speed-up over torch-mm-topk on the same input)")
    _save()
    return 0


def _save() -> None:
    fill_ratios()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = [dict(r, device=INFO.get("device", ""), when=stamp) for r in RESULTS]
    if rows:
        path = OUT / "id_gpu.csv"
        if path.exists():
            path.unlink()
        append_csv(path, rows)
    (OUT / "id_gpu.json").write_text(json.dumps(dict(info=INFO, rows=RESULTS), indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
