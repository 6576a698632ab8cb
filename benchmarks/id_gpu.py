"""How fast is exact TwoNN with gelora's Triton engine on one GPU at 1M x 4096, against the dense GEMM
rate and against what users would write instead (torch mm + topk), and what limits the kernel there?

Stage 2 of ``benchmarks/gpu_check.sh`` (run it through that script; alone: ``python3 benchmarks/id_gpu.py``).
Steps, in the order of their importance (rows are written as they come, so a time limit keeps them):

  1. the card's bf16 and fp16 GEMM rates (8192^3 torch.mm on random data, median of 10);
  2. warm-up: ``gelora.twonn`` on 20k x 4096 bf16 with massive-activation rows, so that every kernel
     variant the pipeline uses is compiled before anything is timed; the tile config is pinned
     (``GELORA_TRITON_AUTOTUNE=0``, set by gpu_check.sh: the first candidate config): no tuning pass;
  3. 1M x 4096 bf16: ``gelora.twonn(x, backend="triton")`` (one run: the whole exact pipeline) and torch
     mm+topk in bf16 on the same points, timed on its first 16 query blocks of 2048 rows and
     extrapolated to all 489 (the table says so); no float32 copy of the points is ever made;
  4. 100k x 4096 bf16 (the other input dtypes use the same fp16 tiles): gelora (median of 3), torch
     mm+topk bf16 (all blocks), torch mm+topk float32 with TF32 (extrapolated from 8 blocks), and gelora
     on the same points with 0.1% massive-activation rows (one coordinate +3000) and a repeated row;
  5. the compiled kNN kernels' registers, spills and shared memory;
  6. a slice of the real 1M launch per candidate tile config: the diagonal launch (pinned config)
     gives the thresholds, then the first 3 x n_SM super-block pairs of the off-diagonal launch, in
     the launch's own order, are timed for each config of ``knn_top2.candidate_configs``; the table
     gives its rate and the launch time it predicts;
  7. A/B at 200k rows: the 1M launch's super-block size against the default one for 200k rows (do
     programs that share a column super-block stay in step, or does every tile re-read it from HBM?);
     with ``ncu`` on the PATH the same A/B runs again under it (``--clock-control none``) and the HBM
     bytes read per launch are reported; skipped with the reason when ncu is missing or fails.

Rates: ``tflops`` counts the products a method must compute, over its time: ``N^2 D`` for gelora (the
symmetric tiles compute each pair once), ``2 N^2 D`` for torch mm+topk; ``frac_gemm`` divides it by the
measured fp16 GEMM rate (the tiles are fp16 for every input dtype). Nothing is extrapolated by N^2
from a smaller shape. Outputs: the table printed last, ``$OUT/id_gpu.json`` (everything, including the
kernels' resources, the slices, the A/B and ncu's raw lines) and headline rows in ``$OUT/gpu_check.csv``.

    python3 benchmarks/id_gpu.py --budget 140          # on a GPU (gpu_check.sh stage 2)
    TRITON_INTERPRET=1 python3 benchmarks/id_gpu.py --smoke   # tiny shapes on the CPU: checks this script
"""
from __future__ import annotations

import argparse
import gc
import glob
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _gpu_check import add_row, out_dir, write_json  # noqa: E402
from _util import format_table  # noqa: E402

import torch  # noqa: E402

from gelora._env import triton_interpret as _env_interpret  # noqa: E402

# the tile config is pinned (the first candidate): no tuning pass inside a timed search (read per call)
os.environ.setdefault("GELORA_TRITON_AUTOTUNE", "0")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: candidates per row that gelora.twonn asks the engine for (k = 2 neighbours + gelora.neighbours.EXTRA_CANDIDATES)
KC = 4
STAGE = "2 twonn"
T0 = time.perf_counter()
RESULTS: list = []
INFO: dict = {}


def log(msg: str = "") -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


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
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def save() -> None:
    write_json(out_dir() / "id_gpu.json", dict(info=INFO, rows=RESULTS))


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------
# Rates and data
# ---------------------------------------------------------------------------------------------------
def gemm_rate(dtype: torch.dtype, n: int, reps: int = 10) -> float:
    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(n, n, device=DEV, generator=g).to(dtype)
    b = torch.randn(n, n, device=DEV, generator=g).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    ts = [timed(lambda: torch.mm(a, b))[0] for _ in range(reps)]
    return 2 * n ** 3 / statistics.median(ts)


def make_data(n: int, d: int, dtype: torch.dtype, seed: int, massive: float = 0.0) -> torch.Tensor:
    """n points of a smooth 16-dimensional manifold in R^d (tanh map of Gaussian latents, offset 5),
    made block by block in ``dtype`` (no float32 copy of the whole set). ``massive``: that share of the
    rows get one coordinate +3000 (massive activations), and row 1 repeats row 0 (a first token)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w1 = torch.randn(16, 256, device=DEV, generator=g) / 4.0
    w2 = torch.randn(256, d, device=DEV, generator=g) / 16.0
    out = torch.empty(n, d, device=DEV, dtype=dtype)
    step = 65536
    for s in range(0, n, step):
        e = min(n, s + step)
        z = torch.randn(e - s, 16, device=DEV, generator=g)
        out[s:e] = (torch.tanh(z @ w1) @ w2 + 5.0).to(dtype)
    if massive:
        rows = torch.arange(0, n, max(2, int(1 / massive)), device=DEV)
        out[rows, 7] += 3000.0
        out[1] = out[0]
    return out


def mle_id(d1: torch.Tensor, d2: torch.Tensor) -> float:
    keep = d1 > 0
    lm = torch.log(d2[keep].double() / d1[keep].double())
    return float((lm.numel() - 1) / lm.sum())


def torch_mm_topk(x: torch.Tensor, max_blocks=None, block: int = 2048) -> dict:
    """Plain torch: the points centred in their dtype (float32 with TF32 allowed), (block, N) distance
    tiles by one mm each, topk(2). With ``max_blocks``, the first block is a warm-up and the next
    ``max_blocks`` are timed, and the time of all blocks is extrapolated from them (plus the centring,
    timed on its own)."""
    n = x.shape[0]
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for float32 inputs
    try:
        def centre():
            mean = torch.zeros(x.shape[1], device=DEV, dtype=torch.float64)
            for s in range(0, n, 65536):
                mean += x[s:s + 65536].double().sum(0)
            mean = (mean / n).to(torch.float32)
            xc = torch.empty_like(x)
            sq = torch.empty(n, device=DEV)
            for s in range(0, n, 65536):
                b = x[s:s + 65536].float() - mean
                xc[s:s + 65536] = b.to(x.dtype)
                sq[s:s + 65536] = xc[s:s + 65536].float().square().sum(1)
            return xc, sq

        t_centre, (xc, sq) = timed(centre)
        d1 = torch.empty(n, device=DEV)
        d2 = torch.empty(n, device=DEV)
        starts = list(range(0, n, block))

        def run_block(s):
            e = min(n, s + block)
            t = torch.mm(xc[s:e], xc.T).float()
            t.mul_(-2).add_(sq.unsqueeze(0)).add_(sq[s:e].unsqueeze(1))
            t[torch.arange(e - s, device=DEV), torch.arange(s, e, device=DEV)] = float("inf")
            v = torch.topk(t, 2, dim=1, largest=False).values.clamp_min(0).sqrt()
            d1[s:e], d2[s:e] = v[:, 0], v[:, 1]

        if max_blocks is None or max_blocks + 1 >= len(starts):
            t_blocks, _ = timed(lambda: [run_block(s) for s in starts])
            done, est, extrap = n, t_centre + t_blocks, False
        else:
            run_block(starts[0])  # warm-up (cuBLAS heuristics, topk workspace)
            timed_starts = starts[1:1 + max_blocks]
            t_blocks, _ = timed(lambda: [run_block(s) for s in timed_starts])
            est = t_centre + t_blocks * len(starts) / len(timed_starts)
            done, extrap = min(n, timed_starts[-1] + block), True
        rows = slice(0, done)
        id_ = mle_id(d1[rows], d2[rows])
        return dict(s=est, id=id_, extrapolated=extrap, blocks=len(starts),
                    timed_blocks=len(starts) if not extrap else max_blocks)
    finally:
        torch.set_float32_matmul_precision(old)


def add_result(shape, dt, provider, seconds, n, d, rate, id_=float("nan"), n_fixed="", peak_gb=float("nan"),
               note="", symmetric=True):
    work = (1.0 if symmetric else 2.0) * n * n * d
    ok = seconds == seconds and seconds > 0
    row = dict(shape=shape, dtype=dtype_name(dt) if isinstance(dt, torch.dtype) else dt, provider=provider,
               s=seconds, tflops=work / seconds / 1e12 if ok else float("nan"),
               frac_gemm=work / seconds / rate if ok and rate else float("nan"), x_vs_torch=float("nan"),
               id=id_, n_fixed=n_fixed, peak_gb=peak_gb, note=note)
    RESULTS.append(row)
    save()
    return row


def ratio_to_torch(shape: str, dt: str, seconds: float) -> float:
    base = [r["s"] for r in RESULTS if r["shape"] == shape and r["dtype"] == dt and r["provider"] == "torch-mm-topk"]
    return base[0] / seconds if base and seconds == seconds and seconds > 0 else float("nan")


def fill_ratios() -> None:
    for r in RESULTS:
        if r["provider"].startswith("gelora"):
            r["x_vs_torch"] = ratio_to_torch(r["shape"], r["dtype"], r["s"])


def print_table(title: str) -> None:
    fill_ratios()
    cols = ["shape", "dtype", "provider", "s", "tflops", "frac_gemm", "x_vs_torch", "id", "n_fixed", "peak_gb", "note"]
    log(title)
    print(format_table(RESULTS, cols, floatfmt="{:.4g}"), flush=True)


def peak_reset() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else float("nan")


# ---------------------------------------------------------------------------------------------------
# gelora
# ---------------------------------------------------------------------------------------------------
def gelora_twonn(x: torch.Tensor, backend: str, reps: int = 1):
    import gelora

    ts, res = [], None
    peak_reset()
    for _ in range(reps):
        t, res = timed(lambda: gelora.twonn(x, backend=backend))
        ts.append(t)
    return statistics.median(ts), res


def kernel_report() -> list:
    """Registers, spills and shared memory of every compiled variant of the kNN kernel (Triton's
    per-device cache of compiled kernels; empty under the interpreter)."""
    from gelora.kernels import knn_top2 as kmod

    return triton_kernel_report(kmod._knn_top2_kernel)


def triton_kernel_report(fn) -> list:
    while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):  # autotuner / heuristics wrappers
        fn = fn.fn
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        return []
    names = list(getattr(fn, "arg_names", []))
    rows = []
    for entry in list(caches.values()):
        kernels = entry[0] if isinstance(entry, tuple) else entry
        for k in list(kernels.values()):
            try:
                k._init_handles()
            except Exception:  # noqa: BLE001 - a kernel that does not load still has its metadata
                pass
            consts = {}
            for path, v in (getattr(getattr(k, "src", None), "constants", None) or {}).items():
                idx = path[0] if isinstance(path, tuple) and len(path) == 1 else path
                name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
                if name.isupper() and not isinstance(v, str):
                    consts[name] = v
            md = k.metadata
            rows.append(dict(kernel=k.name, regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                             shared_kb=round(getattr(md, "shared", 0) / 1024, 1), warps=getattr(md, "num_warps", None),
                             stages=getattr(md, "num_stages", None),
                             constexprs=" ".join(f"{a}={b}" for a, b in sorted(consts.items()))))
    return rows


# ---------------------------------------------------------------------------------------------------
# The kernel alone: operand, slices of the 1M launch, A/B of the super-block size
# ---------------------------------------------------------------------------------------------------
def fp16_operand(x: torch.Tensor):
    """The engine's fp16 operand of ``x`` (centred, scaled by a power of two so that the largest entry
    is about 2**14, zero padded to 256 rows x 64 columns) and its float32 squared row norms; built in
    blocks of rows, never a float32 copy of the whole set."""
    from gelora.kernels import knn_top2 as kmod

    n, d = x.shape
    mean = torch.zeros(d, device=x.device, dtype=torch.float64)
    top = 0.0
    step = 65536
    for s in range(0, n, step):
        mean += x[s:s + step].double().sum(0)
    mean = (mean / n).float()
    for s in range(0, n, step):
        top = max(top, float((x[s:s + step].float() - mean).abs().max()))
    scale = 2.0 ** (math.ceil(math.log2(top)) - 14) if top > 0 else 1.0
    op = torch.zeros(kmod._round_up(n, kmod.GPU_ALIGN), kmod._round_up(d, kmod.K_ALIGN), dtype=torch.float16,
                     device=x.device)
    sq = torch.empty(n, device=x.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        op[s:e, :d] = ((x[s:e].float() - mean) / scale).to(torch.float16)
        sq[s:e] = op[s:e].float().square().sum(1)
    return op, sq


def event_time(fn, reps: int, setup=None) -> list:
    """Seconds of ``reps`` calls of ``fn`` (CUDA events on the GPU); ``setup()`` runs before each, untimed."""
    ts = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if DEV == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return ts


def n_sms() -> int:
    from gelora.kernels import knn_top2 as kmod

    return kmod._n_sms(torch.device(DEV))


def super_rows_for(n: int, cfg) -> int:
    """The super-block size a self-search of n rows uses (knn_top2's own choice), rounded up to the
    largest block of the candidate configs so that it suits each of them."""
    from gelora.kernels import knn_top2 as kmod

    dev = torch.device(DEV)
    align = max(c.align for c in kmod.candidate_configs(dev, torch.float16, "ieee"))
    return kmod._round_up(kmod._choose_super(n, cfg, dev, max(1, kmod._next_pow2(KC)), n), align)


def slices(op: torch.Tensor, sq: torch.Tensor, n: int, pinned, rate: float, budget: Budget, waves: int = 3,
           reps: int = 2) -> list:
    """Time the first ``waves * n_SM`` programs of the 1M off-diagonal launch for every candidate config
    (uses the launcher's internals ``_launch``/``_pair_order``: the public ``knn_top2`` runs whole
    launches only)."""
    from gelora.kernels import knn_top2 as kmod

    dev = torch.device(DEV)
    sup = super_rows_for(n, pinned)
    ns = -(-n // sup)
    part_d = torch.full((n, ns, KC), float("inf"), dtype=torch.float32, device=dev)
    part_i = torch.full((n, ns, KC), -1, dtype=torch.int32, device=dev)
    diag = [(i, i) for i in range(ns)]

    def diag_launch(cfg):
        kmod._launch(cfg, op, op, sq, sq, None, None, part_d, part_i, part_d, part_i, diag, n, n, 0, 0, sup, KC,
                     False, "ieee")

    t_diag = statistics.median(event_time(lambda: diag_launch(pinned), reps))  # compiled by the warm-up
    ar = torch.arange(n, device=dev)
    tau = kmod._bump(part_d[ar, ar // sup].amax(dim=1))
    del ar
    off = kmod._pair_order([(i, j) for i in range(ns) for j in range(i + 1, ns)])
    sl = off[: max(1, waves * n_sms())]
    flops_slice = 2.0 * len(sl) * sup * sup * op.shape[1]
    flops_off = 2.0 * len(off) * sup * sup * op.shape[1]
    INFO["slice"] = dict(rows=n, super_rows=sup, super_blocks=ns, diag_programs=ns, off_programs=len(off),
                         slice_programs=len(sl), n_sm=n_sms(), diag_s=t_diag)
    log(f"slice of the {n}-row launch: super-block {sup} rows, {ns} super-blocks, {len(off)} off-diagonal "
        f"programs, timing the first {len(sl)}; diagonal launch {t_diag * 1e3:.1f} ms")
    out = []
    cands = list(kmod.candidate_configs(dev, torch.float16, "ieee"))
    for cfg in cands:
        if budget.left() < 15:
            log(f"  slice {cfg}: skipped (budget)")
            out.append(dict(config=str(cfg), note="skipped: budget"))
            continue

        def reset():  # every slot starts empty in the real launch too (each is owned by one program)
            part_d.fill_(float("inf"))
            part_i.fill_(-1)

        def run():
            kmod._launch(cfg, op, op, sq, sq, tau, tau, part_d, part_i, part_d, part_i, sl, n, n, 0, 0, sup, KC,
                         True, "ieee")
        try:
            reset()
            t_c, _ = timed(run)  # compiles a config not seen yet
            ts = event_time(run, reps, setup=reset)
            t = statistics.median(ts)
            rec = dict(config=f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
                       pinned=cfg == pinned, slice_ms=t * 1e3, tflops=flops_slice / 2 / t / 1e12,
                       frac_gemm=flops_slice / 2 / t / rate if rate else float("nan"),
                       predicted_launch_s=t * len(off) / len(sl) + t_diag, first_call_s=t_c)
        except Exception as exc:  # noqa: BLE001 - a config that fails here is a finding, not a stop
            rec = dict(config=str(cfg), note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")
        out.append(rec)
        log(f"  slice {rec}")
        INFO["slices"] = out
        save()
    # the flops of the whole off-diagonal launch (symmetric: each pair once)
    INFO["slice"]["off_launch_pair_products"] = flops_off / 2
    del part_d, part_i, tau
    free()
    return out


def ab_super(op: torch.Tensor, sq: torch.Tensor, n_ab: int, sup_big: int, pinned, reps: int = 3) -> dict:
    """knn_top2 on the first ``n_ab`` rows with the big problem's super-block size against the default
    one (interleaved, median of ``reps``)."""
    from gelora.kernels import knn_top2 as kmod

    sub = op[:n_ab]
    sq_s = sq[:n_ab].contiguous()
    sup_def = super_rows_for(n_ab, pinned)
    fns = {
        f"super={sup_big}": lambda: kmod.knn_top2(sub, KC, n_a=n_ab, sq_a=sq_s, symmetric=True, config=pinned,
                                                  super_rows=sup_big),
        f"super={sup_def} (default)": lambda: kmod.knn_top2(sub, KC, n_a=n_ab, sq_a=sq_s, symmetric=True,
                                                            config=pinned),
    }
    if reps > 1:
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k] += event_time(f, 1)
    flops = 1.0 * n_ab * n_ab * op.shape[1]
    res = {k: dict(s=statistics.median(v), tflops=flops / statistics.median(v) / 1e12) for k, v in times.items()}
    return dict(rows=n_ab, super_big=sup_big, super_default=sup_def, results=res)


#: ncu metric units -> bytes / seconds (values are converted to these; ``--print-units base`` should make
#: them "byte" and "nsecond" already)
NCU_UNITS = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12, "nsecond": 1e-9,
             "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}


def find_ncu():
    hit = shutil.which("ncu")
    if hit:
        return hit
    for pat in ("/usr/local/cuda*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        found = sorted(glob.glob(pat))
        if found:
            return found[-1]
    return None


def ncu_ab(n_ab: int, sup_big: int, timeout: float) -> dict:
    """Run the A/B again in a child process under ncu and read the HBM bytes of each kernel launch."""
    if DEV != "cuda":
        return dict(skipped="no CUDA device")
    ncu = find_ncu()
    if ncu is None:
        return dict(skipped="ncu not found on the PATH, in /usr/local/cuda*/bin or /opt/nvidia/nsight-compute")
    if timeout < 20:
        return dict(skipped=f"budget ({timeout:.0f} s left)")
    metrics = "dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,lts__t_sector_hit_rate.pct"
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--csv", "--print-units", "base",
           "--kernel-name", "regex:knn_top2", "--metrics", metrics,
           sys.executable, str(Path(__file__).resolve()), "--ab-worker", "--ab-rows", str(n_ab),
           "--ab-super", str(sup_big)]
    log(f"ncu: {' '.join(cmd[:12])} ... (limit {timeout:.0f} s)")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(skipped=f"ncu run exceeded {timeout:.0f} s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('"')]
    if p.returncode != 0 or len(lines) < 2:
        tail = (p.stdout + p.stderr).strip().splitlines()[-6:]
        return dict(skipped=f"ncu exit {p.returncode}", tail=tail)
    import csv as _csv

    rows = list(_csv.DictReader(lines))
    launches = {}
    for r in rows:
        rid = int(r.get("ID", 0))
        rec = launches.setdefault(rid, dict(kernel=r.get("Kernel Name", ""), grid=r.get("Grid Size", "")))
        name = r.get("Metric Name", "?")
        try:  # to bytes, seconds and percent whatever unit ncu chose
            rec[name] = float(r["Metric Value"].replace(",", "")) * NCU_UNITS.get(r.get("Metric Unit", ""), 1.0)
        except (KeyError, ValueError):
            rec[name] = r.get("Metric Value")
        rec[name + " unit"] = r.get("Metric Unit", "")
    order = [launches[k] for k in sorted(launches)]
    names = [f"super={sup_big} diagonal", f"super={sup_big} off-diagonal", "default diagonal",
             "default off-diagonal"]
    for name, rec in zip(names, order):
        rec["launch"] = name
    return dict(launches=order, markers=[ln for ln in p.stdout.splitlines() if ln.startswith("AB-WORKER")],
                raw=lines[:24])


def ab_worker(n_ab: int, sup_big: int) -> int:
    """The child of :func:`ncu_ab`: the same two searches, once each (diagonal + off-diagonal launches)."""
    from gelora.kernels import knn_top2 as kmod

    pinned = kmod.default_config(torch.device(DEV), torch.float16, "ieee")
    x = make_data(n_ab, 4096, torch.bfloat16, seed=3)
    op, sq = fp16_operand(x)
    del x
    n = n_ab
    kmod.knn_top2(op, KC, n_a=n, sq_a=sq, symmetric=True, config=pinned, super_rows=sup_big)
    torch.cuda.synchronize()
    print(f"AB-WORKER super={sup_big} done", flush=True)
    kmod.knn_top2(op, KC, n_a=n, sq_a=sq, symmetric=True, config=pinned)
    torch.cuda.synchronize()
    print(f"AB-WORKER default super={super_rows_for(n, pinned)} done", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=140.0, help="seconds for the whole script")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (Triton under TRITON_INTERPRET=1, else the torch engine)")
    ap.add_argument("--ab-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ab-rows", type=int, default=200_192, help=argparse.SUPPRESS)
    ap.add_argument("--ab-super", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ab_worker:
        return ab_worker(args.ab_rows, args.ab_super)
    out_dir().mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    interp = _env_interpret()
    if DEV != "cuda" and not args.smoke:
        log("no CUDA device: nothing to measure (--smoke checks this script on the CPU)")
        return 2
    try:
        import triton

        from gelora.kernels import knn_top2 as kmod
        has_triton = DEV == "cuda" or interp
        INFO["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - the smoke run works without Triton
        has_triton = False
        INFO["triton"] = f"missing: {exc}"
    import gelora
    from gelora.neighbours.engines import all_backends

    all_backends()
    backend = "triton" if has_triton else "torch"
    d = args.dim
    if args.smoke:  # the interpreter runs one 32 x 32 tile in ~30 ms: a few tiles per launch
        big, small, warm, n_ab, d = 160, 96, 64, 128, min(d, 48)
        gemm_n = 128
    else:
        big, small, warm, n_ab = 1_000_000, 100_000, 20_000, 200_192
        gemm_n = 8192
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        INFO.update(device=props.name, sms=props.multi_processor_count,
                    l2_mb=getattr(props, "L2_cache_size", 0) / 2 ** 20, mem_gb=props.total_memory / 1e9)
    else:
        INFO.update(device=f"cpu ({'Triton interpreter' if has_triton else 'torch engine'})", sms=os.cpu_count())
    INFO.update(torch=torch.__version__, gelora=gelora.__version__, backend=backend,
                autotune=os.environ.get("GELORA_TRITON_AUTOTUNE", "1"), shapes=dict(big=big, small=small, dim=d))
    pinned = kmod.default_config(torch.device(DEV), torch.float16, "ieee") if has_triton else None
    INFO["pinned"] = str(pinned)
    log(f"{INFO['device']}; torch {torch.__version__}; triton {INFO['triton']}; engine {backend}; "
        f"tile config {pinned}")
    big_s = f"{big}x{d}"
    small_s = f"{small}x{d}"

    # 1. GEMM rates -------------------------------------------------------------------------------
    rate_bf16 = gemm_rate(torch.bfloat16, gemm_n)
    rate_fp16 = gemm_rate(torch.float16, gemm_n)
    INFO.update(gemm_bf16_tflops=rate_bf16 / 1e12, gemm_fp16_tflops=rate_fp16 / 1e12, gemm_n=gemm_n)
    log(f"GEMM {gemm_n}^3: bf16 {rate_bf16 / 1e12:.1f} TFLOP/s, fp16 {rate_fp16 / 1e12:.1f} TFLOP/s")
    add_row(STAGE, "gemm_rate", f"GEMM rate {gemm_n}^3 (fp16 / bf16)",
            f"{rate_fp16 / 1e12:.0f} / {rate_bf16 / 1e12:.0f}", unit="TFLOP/s",
            note="the floor for frac_gemm (fp16: the tiles' dtype)")
    rate = rate_fp16
    free()

    # 2. warm-up: every pipeline path compiled before anything is timed ---------------------------
    # Triton specialises integer arguments on divisibility by 16: clean data keeps N (like 1M and 100k),
    # the massive-activation set loses its repeated row to deduplication (N - 1, like the 100k one)
    INFO["warmup_s"] = 0.0
    for massive in (0.0, 1e-3):
        t, res = timed(lambda: gelora.twonn(make_data(warm, d, torch.bfloat16, seed=9, massive=massive),
                                            backend=backend))
        log(f"warm-up {warm}x{d} bf16{' with massive rows' if massive else ''}: {t:.1f} s incl. compilation, "
            f"id {res.id:.2f}, n_fixed {res.n_fixed}, duplicates {res.n_duplicates}")
        INFO["warmup_s"] += t
    free()

    # 3. the big shape ------------------------------------------------------------------------------
    x = make_data(big, d, torch.bfloat16, seed=1)
    log(f"{big_s} bf16 made ({x.numel() * 2 / 1e9:.1f} GB); GPU memory allocated "
        f"{torch.cuda.memory_allocated() / 1e9 if DEV == 'cuda' else 0:.1f} GB")
    try:
        t, res = gelora_twonn(x, backend)
        r = add_result(big_s, torch.bfloat16, f"gelora-{backend}", t, big, d, rate, res.id, res.n_fixed, peak_gb(),
                       note="1 run, whole pipeline")
        log(f"  gelora {big_s}: {t:.2f} s, id {res.id:.3f}, n_fixed {res.n_fixed}, peak {r['peak_gb']:.1f} GB")
        add_row(STAGE, "twonn_big_s", f"gelora.twonn {big_s} bf16 ({backend})", t, unit="s", goal="<= 15 s",
                met=t <= 15.0, note=f"1 run; id {res.id:.2f}; n_fixed {res.n_fixed}; peak {r['peak_gb']:.1f} GB")
        add_row(STAGE, "twonn_big_frac_gemm", f"{big_s}: N^2 D / t over the fp16 GEMM rate", r["frac_gemm"] * 100,
                unit="%", goal=">= 70%", met=r["frac_gemm"] >= 0.7, note=f"{r['tflops']:.0f} TFLOP/s (symmetric half)")
    except Exception:  # noqa: BLE001
        log(f"  gelora {big_s} FAILED:\n{traceback.format_exc()}")
        add_result(big_s, torch.bfloat16, f"gelora-{backend}", float("nan"), big, d, rate, note="failed")
        add_row(STAGE, "twonn_big_s", f"gelora.twonn {big_s} bf16", "failed", goal="<= 15 s", met=False,
                note="see gpu_check.log")
    free()
    try:
        tb = torch_mm_topk(x, max_blocks=16 if not args.smoke else 2)
        note = (f"extrapolated from {tb['timed_blocks']} of {tb['blocks']} blocks of 2048 rows" if tb["extrapolated"]
                else "1 run")
        add_result(big_s, torch.bfloat16, "torch-mm-topk", tb["s"], big, d, rate, tb["id"], note=note, symmetric=False)
        log(f"  torch mm+topk {big_s} bf16: {tb['s']:.2f} s ({note})")
        xt = ratio_to_torch(big_s, "bfloat16", next((r["s"] for r in RESULTS if r["shape"] == big_s
                                                     and r["provider"].startswith("gelora")), float("nan")))
        add_row(STAGE, "twonn_big_x_torch", f"{big_s}: speed-up over torch mm+topk bf16", xt, unit="x", goal=">= 3x",
                met=xt >= 3.0 if xt == xt else False, note=f"torch {tb['s']:.3g} s, {note}")
    except Exception:  # noqa: BLE001
        log(f"  torch mm+topk {big_s} FAILED:\n{traceback.format_exc()}")
    free()
    print_table(f"partial table after {big_s}")

    # 4. the small shape ------------------------------------------------------------------------------
    xs = make_data(small, d, torch.bfloat16, seed=2)
    reps = 1 if args.smoke else 3
    try:
        if not args.smoke:
            gelora_twonn(xs, backend)  # warm-up at this shape
        t, res = gelora_twonn(xs, backend, reps=reps)
        clean_id = res.id
        add_result(small_s, torch.bfloat16, f"gelora-{backend}", t, small, d, rate, res.id, res.n_fixed, peak_gb(),
                   note=f"median of {reps}")
        log(f"  gelora {small_s}: {t:.3f} s, id {res.id:.3f}, n_fixed {res.n_fixed}")
        tb = torch_mm_topk(xs)
        add_result(small_s, torch.bfloat16, "torch-mm-topk", tb["s"], small, d, rate, tb["id"], note="1 run",
                   symmetric=False)
        xt = ratio_to_torch(small_s, "bfloat16", t)
        add_row(STAGE, "twonn_small_x_torch", f"{small_s}: speed-up over torch mm+topk bf16", xt, unit="x",
                note=f"gelora {t:.3g} s (median of {reps}), torch {tb['s']:.3g} s (1 run)")
        tf = torch_mm_topk(xs.float(), max_blocks=8 if not args.smoke else 2)
        add_result(small_s, torch.float32, "torch-mm-topk", tf["s"], small, d, rate, tf["id"], symmetric=False,
                   note=("TF32; " + (f"extrapolated from {tf['timed_blocks']} of {tf['blocks']} blocks"
                                     if tf["extrapolated"] else "1 run") + f"; {tf['s'] / t:.2f}x the gelora bf16 time"
                         " (every input dtype uses the same fp16 tiles)"))
        free()
        xm = make_data(small, d, torch.bfloat16, seed=2, massive=1e-3)
        t, res = gelora_twonn(xm, backend)
        add_result(small_s + " massive", torch.bfloat16, f"gelora-{backend}", t, small, d, rate, res.id, res.n_fixed,
                   peak_gb(), note=f"0.1% rows +3000 on one coordinate, {res.n_duplicates} duplicate; 1 run")
        add_row(STAGE, "twonn_small_massive", f"{small_s} with massive-activation rows: seconds (n_fixed)", t, unit="s",
                note=f"n_fixed {res.n_fixed}; id {res.id:.2f} (clean: {clean_id:.2f})")
        del xm
    except Exception:  # noqa: BLE001
        log(f"  {small_s} FAILED:\n{traceback.format_exc()}")
    del xs
    free()
    print_table(f"partial table after {small_s}")

    # 5. compiled kernels -------------------------------------------------------------------------------
    if has_triton:
        kr = kernel_report()
        INFO["kernels"] = kr
        save()
        if kr:
            log("compiled kNN kernels (registers, spills, shared memory):")
            print(format_table(kr, ["kernel", "regs", "spills", "shared_kb", "warps", "stages", "constexprs"]),
                  flush=True)
            worst = max(kr, key=lambda r: (r["spills"] or 0))
            add_row(STAGE, "knn_spills", "kNN kernel variants compiled / most spilled bytes",
                    f"{len(kr)} / {worst['spills']}",
                    note=f"regs max {max(r['regs'] or 0 for r in kr)}; {worst['constexprs'][:60]}")
        else:
            log("compiled kNN kernels: none to report (interpreter)")

    # 6./7. slices of the big launch and the super-block A/B -------------------------------------------
    if has_triton and budget.left() > 20:
        try:
            op, sq = fp16_operand(x)
            del x
            free()
            sl = slices(op, sq, big, pinned, rate, budget, reps=1 if args.smoke else 2)
            ok = [s for s in sl if "slice_ms" in s]
            if ok:
                print(format_table(ok, ["config", "pinned", "slice_ms", "tflops", "frac_gemm", "predicted_launch_s",
                                        "first_call_s"], floatfmt="{:.4g}"), flush=True)
                best = min(ok, key=lambda s: s["slice_ms"])
                pin = next((s for s in ok if s["pinned"]), best)
                add_row(STAGE, "slice_best", f"slice of the {big_s} launch: best config (pinned)",
                        f"{best['config']} ({pin['config']})", note=f"{best['tflops']:.0f} TFLOP/s vs pinned "
                        f"{pin['tflops']:.0f}; predicts {best['predicted_launch_s']:.2f} s vs "
                        f"{pin['predicted_launch_s']:.2f} s for the kernel launches")
            if budget.left() > 15:
                sup_big = INFO["slice"]["super_rows"]
                ab = ab_super(op, sq, n_ab, sup_big, pinned, reps=1 if args.smoke else 3)
                INFO["ab"] = ab
                save()
                (ka, ra), (kb, rb) = list(ab["results"].items())
                log(f"A/B {n_ab} rows: {ka} {ra['s'] * 1e3:.1f} ms ({ra['tflops']:.0f} TFLOP/s) vs {kb} "
                    f"{rb['s'] * 1e3:.1f} ms ({rb['tflops']:.0f} TFLOP/s)")
                add_row(STAGE, "ab_super", f"A/B {n_ab} rows: time with the 1M super-block / default",
                        ra["s"] / rb["s"], unit="x", note=f"{ka}: {ra['s'] * 1e3:.1f} ms; {kb}: {rb['s'] * 1e3:.1f} ms")
            del op, sq
            free()
            if "ab" in INFO:
                nc = ncu_ab(n_ab, INFO["ab"]["super_big"], budget.left() - 5)
                INFO["ncu"] = nc
                save()
                if "launches" in nc:
                    for rec in nc["launches"]:
                        num = lambda k: rec[k] if isinstance(rec.get(k), float) else float("nan")  # noqa: E731
                        log(f"  ncu {rec.get('launch', '?')}: grid {rec.get('grid')}, HBM read "
                            f"{num('dram__bytes_read.sum') / 1e9:.2f} GB, written "
                            f"{num('dram__bytes_write.sum') / 1e9:.2f} GB, "
                            f"{num('gpu__time_duration.sum') * 1e3:.1f} ms, L2 hit "
                            f"{num('lts__t_sector_hit_rate.pct'):.1f}%")
                    offs = [r for r in nc["launches"] if "off-diagonal" in r.get("launch", "")]
                    if len(offs) == 2:
                        gb = [o.get("dram__bytes_read.sum") for o in offs]
                        gb = [v / 1e9 if isinstance(v, float) else float("nan") for v in gb]
                        add_row(STAGE, "ab_hbm", "A/B HBM read, off-diagonal launch: 1M super-block / default",
                                f"{gb[0]:.2f} / {gb[1]:.2f}", unit="GB", note="ncu --clock-control none")
                else:
                    log(f"  ncu: {nc}")
                    add_row(STAGE, "ab_hbm", "A/B HBM bytes read (ncu)", "skipped", note=str(nc.get("skipped"))[:100])
        except Exception:  # noqa: BLE001
            log(f"slices / A/B FAILED:\n{traceback.format_exc()}")
    else:
        log(f"slices and A/B skipped ({'budget' if has_triton else 'no Triton'})")

    print_table("RESULTS (s: seconds; tflops: products the method needs (gelora N^2 D, torch 2 N^2 D) per second; "
                "frac_gemm: of the measured fp16 GEMM rate; x_vs_torch: speed-up over torch mm+topk, same input)")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
