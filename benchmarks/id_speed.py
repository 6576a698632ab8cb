"""How fast is exact TwoNN intrinsic-dimension estimation with gelora, against what users would pick instead?

Providers (all exact, all on the same data, interleaved, medians of repeats):
  gelora-<backend>  gelora.twonn(x, backend=...) for every backend usable here (whole pipeline:
                    checks, dedup, centring, kNN, re-rank, certification, estimate)
  faiss-flat        faiss.IndexFlatL2, add + search k=3 of the set against itself, then the MLE
  dadapy            dadapy.Data(coordinates=x, maxk=3).compute_id_2NN(algorithm="ml")
  skdim             skdim.id.TwoNN().fit(x) (scikit-dimension's default, linear fit)
  torch-topk        the plain torch recipe: torch.cdist on query blocks + topk(3)
  gemm-floor        the N x N x D product alone (torch.mm over query blocks, nothing else): any exact
                    method that computes all pairwise products takes at least this long

The table printed last gives, per shape and provider: median seconds, points/s, the ratio to FAISS
and to the GEMM floor measured in the same run, and the ID each produced. Rows are appended to
benchmarks/results/id_speed.csv; --png draws seconds per provider.

    python benchmarks/id_speed.py --quick          # < 1 minute
    python benchmarks/id_speed.py                  # 10k x 384, 4096 x 768, 20k x 768, 50k x 768
    python benchmarks/id_speed.py --large          # adds 100k x 768
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import (  # noqa: E402
    append_csv,
    format_table,
    interleaved_medians,
    machine_line,
    set_threads,
)

QUICK_SHAPES = [(4096, 384), (10_000, 384)]
DEFAULT_SHAPES = [(10_000, 384), (4096, 768), (20_000, 768), (50_000, 768)]
LARGE_SHAPES = [(100_000, 768)]


def make_data(n: int, d: int, intrinsic: int = 16, seed: int = 0):
    """n points on a smooth ``intrinsic``-dimensional manifold in R^d (a random two-layer tanh map of
    Gaussian latents, plus an offset of 5): no duplicates, known ID, realistic float32 hidden-state-like
    scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, intrinsic, generator=g)
    w1 = torch.randn(intrinsic, 4 * intrinsic, generator=g) / math.sqrt(intrinsic)
    w2 = torch.randn(4 * intrinsic, d, generator=g) / math.sqrt(4 * intrinsic)
    return (torch.tanh(z @ w1) @ w2 + 5.0).contiguous()


def mle_from_r(r1, r2) -> float:
    import numpy as np

    mu = np.asarray(r2, dtype=np.float64) / np.asarray(r1, dtype=np.float64)
    return float((mu.size - 1) / np.log(mu).sum())


def providers(x, skip: set):
    import numpy as np
    import torch

    import gelora
    from gelora.backends import all_backends

    xn = x.numpy()
    out = {}
    for name, b in all_backends().items():
        if name in skip or b.not_supported_reasons(x):
            continue
        out[f"gelora-{name}"] = (lambda nm=name: gelora.twonn(x, backend=nm).id)

    if "faiss" not in skip:
        try:
            import faiss

            def faiss_flat():
                index = faiss.IndexFlatL2(xn.shape[1])
                index.add(xn)
                dd, _ = index.search(xn, 3)
                return mle_from_r(np.sqrt(np.maximum(dd[:, 1], 0)), np.sqrt(np.maximum(dd[:, 2], 0)))

            out["faiss-flat"] = faiss_flat
        except ImportError:
            pass
    if "dadapy" not in skip:
        try:
            import dadapy

            def dadapy_ml():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = dadapy.Data(coordinates=xn, maxk=3, verbose=False)
                    return float(data.compute_id_2NN(algorithm="ml")[0])

            out["dadapy"] = dadapy_ml
        except ImportError:
            pass
    if "skdim" not in skip:
        try:
            import skdim

            def skdim_twonn():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return float(skdim.id.TwoNN().fit(xn).dimension_)

            out["skdim"] = skdim_twonn
        except ImportError:
            pass

    block = 2048

    def torch_topk():
        r = torch.empty(x.shape[0], 2)
        for s in range(0, x.shape[0], block):
            d = torch.cdist(x[s:s + block], x)
            v = torch.topk(d, 3, dim=1, largest=False).values
            r[s:s + block] = v[:, 1:]
        return mle_from_r(r[:, 0].numpy(), r[:, 1].numpy())

    if "torch-topk" not in skip:
        out["torch-topk"] = torch_topk

    def gemm_floor():
        for s in range(0, x.shape[0], block):
            torch.mm(x[s:s + block], x.T)
        return float("nan")

    out["gemm-floor"] = gemm_floor
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small shapes, under a minute")
    ap.add_argument("--large", action="store_true", help="add 100k x 768")
    ap.add_argument("--shapes", type=str, default=None, help="e.g. 4096x768,20000x768")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=str, default="", help="comma-separated providers to leave out")
    ap.add_argument("--slow-budget", type=float, default=20.0,
                    help="a provider slower than this (s) on its first run is not repeated")
    ap.add_argument("--csv", type=Path, default=HERE / "results" / "id_speed.csv")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    import torch

    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = DEFAULT_SHAPES + (LARGE_SHAPES if args.large else [])
    repeats = 1 if args.quick else args.repeats
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    print(f"# exact TwoNN speed; {machine_line(args.threads)}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for n, d in shapes:
        x = make_data(n, d)
        fns = providers(x, skip)
        print(f"## {n} x {d}: {', '.join(fns)}", flush=True)
        res = interleaved_medians(fns, repeats=repeats, warmup=True, budget_s=args.slow_budget)
        faiss_t = res.get("faiss-flat", {}).get("median", float("nan"))
        gemm_t = res["gemm-floor"]["median"]
        for name, r in res.items():
            t = r["median"]
            row = dict(
                provider=name, n=n, d=d, threads=args.threads, seconds=t, points_per_s=n / t,
                vs_faiss=faiss_t / t if not math.isnan(faiss_t) else float("nan"),
                x_gemm_floor=t / gemm_t, id=r["result"], repeats=len(r["times"]),
                gflops_equiv=2.0 * n * n * d / t / 1e9,
            )
            rows.append(row)
            print(f"   {name:14s} {t:8.3f} s  id={row['id']:.3f}", flush=True)
    append_csv(args.csv, rows)
    if args.png:
        _plot(rows, args.png)
    print(f"\n# total {time.perf_counter() - t_start:.1f} s; rows appended to {args.csv}")
    print("# vs_faiss = FAISS time / provider time (higher is faster); x_gemm_floor = provider time / "
          "time of the bare N x N x D product (1.0 = the floor)\n")
    print(format_table(rows, ["provider", "n", "d", "seconds", "points_per_s", "vs_faiss", "x_gemm_floor",
                              "id"]))
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["n"], r["d"]) for r in rows})
    provs = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        ys = [next((r["seconds"] for r in rows if r["provider"] == p and (r["n"], r["d"]) == s), 0)
              for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{n}x{d}" for n, d in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median)")
    ax.set_title("exact TwoNN")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
