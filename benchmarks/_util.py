"""Shared helpers of the benchmark scripts: thread pinning, timing, CSV rows, tables.

Machines are noisy: every measurement is repeated, the median is kept, providers are interleaved
(round-robin over repeats) and results are reported as ratios measured in the same run.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence


def set_threads(n: int) -> None:
    """Pin every thread pool we use (OpenMP of the C++ core and FAISS, torch's intra-op pool).

    Must run before the heavy libraries start their pools; the scripts call it first thing."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except Exception:  # noqa: BLE001 - faiss is optional
        pass


def cpu_line() -> str:
    """The CPU as /proc/cpuinfo names it (model, family/model numbers, widest SIMD), or '' elsewhere: two
    machines of one kind may be different CPUs, and an outside tool's speed moves with its BLAS's SIMD."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return ""
    f = dict(ln.split(":", 1) for ln in info.splitlines() if ":" in ln)
    f = {k.strip(): v.strip() for k, v in f.items()}
    flags = set(f.get("flags", "").split())
    simd = next((s for s in ("avx512f", "avx2", "sse4_2") if s in flags), "?")
    return f"{f.get('model name', '?')} (family {f.get('cpu family', '?')} model {f.get('model', '?')}, {simd})"


def machine_line(threads: int) -> str:
    import torch

    return (f"{platform.machine()} {cpu_line() or platform.processor() or ''} {os.cpu_count()} cpus, "
            f"{threads} threads; "
            f"python {platform.python_version()}, torch {torch.__version__}; "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}")


def interleaved_medians(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: bool = True,
    budget_s: Optional[float] = None,
) -> Dict[str, dict]:
    """Time every callable ``repeats`` times, round-robin, and return per name
    ``{"median": s, "times": [...], "result": last return value}``.

    ``budget_s``: a provider whose first run exceeds it is not repeated (its single time is kept).
    """
    out = {name: {"times": [], "result": None} for name in fns}
    if warmup:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name]["result"] = fn()
            dt = time.perf_counter() - t0
            if budget_s is not None and dt > budget_s:
                out[name]["times"].append(dt)  # too slow to repeat: the warm-up run counts
    for _ in range(repeats):
        for name, fn in fns.items():
            if budget_s is not None and out[name]["times"] and out[name]["times"][0] > budget_s:
                continue
            t0 = time.perf_counter()
            out[name]["result"] = fn()
            out[name]["times"].append(time.perf_counter() - t0)
    for v in out.values():
        v["median"] = statistics.median(v["times"]) if v["times"] else float("nan")
    return out


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    keys: List[str] = list(rows[0].keys()) if rows else []
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        if new:
            w.writeheader()
        w.writerows(rows)


def format_table(rows: Iterable[dict], columns: Sequence[str], floatfmt: str = "{:.3g}") -> str:
    rows = list(rows)

    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
            for row in cells]
    return "\n".join([line, sep, *body])


def add_outside_tool(out: Dict[str, Callable], name: str, module: str, make: Callable, skip: Iterable[str]) -> None:
    """``out[name]`` = ``make(imported module)``, run with the tool's warnings silenced, unless ``name`` is
    in ``skip`` or the module is not installed (an optional outside tool)."""
    if name in skip:
        return
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    fn = make(mod)

    def quiet():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    out[name] = quiet


def faiss_flat_distances(faiss, xn, k: int):
    """Exact Euclidean distances (N, k) from every row of the float32 array ``xn`` to its k nearest
    other rows, by FAISS's brute-force ``IndexFlatL2`` (squared distances clamped at 0, self dropped)."""
    import numpy as np

    index = faiss.IndexFlatL2(xn.shape[1])
    index.add(xn)
    dd, _ = index.search(xn, k + 1)
    return np.sqrt(np.maximum(dd[:, 1:], 0))

