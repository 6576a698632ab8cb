"""Question: is gelora's fused LoRA linear layer faster and lighter than PEFT's eager LoRA layer?

For one LoRA linear layer ``y = x W^T + b + s (x A^T) B^T`` (d_in = d_out = d, frozen W, trainable A, B,
input x requiring grad as inside a network) we time the training forward (autograd graph recorded)
and forward+backward of three providers on the same weights and inputs:

* ``peft``   PEFT's ``lora.Linear``, eager (base GEMM, lora_A, lora_B, * scale, +);
* ``gelora`` the same module after ``gelora.fuse_lora`` (Triton on CUDA; on the CPU merged weights
  when tokens outnumber features, else addmm/addmm_, and the one-pass C++ weight gradients);
* ``dense``  the bare ``nn.Linear`` without adapter: the floor, the GEMMs any LoRA layer must run
  (``vs_dense`` = time / dense time shows how much above that floor each provider is);
* ``gelora_torch`` (``--gpu`` only) the fused layer forced onto the torch backend (cuBLAS addmm +
  addmm_), to tell the Triton GEMM's own speed apart from the fusion.

Reported per shape: median time over interleaved repeats (providers round-robin, so load drifting on a
shared machine hits all alike); ``vs_peft`` (speedup over ``peft``) and ``vs_dense`` (time over
``dense``) are medians of the per-round ratios, the providers of one round having run back to back,
so load that changes between rounds cancels; GFLOP/s of the layer's useful flops (forward
``2MNK + 2MKr + 2MNr``, backward ``2MNK + 4MKr + 4MNr``); peak transient memory of the step and
activation bytes saved for backward (see ``_lora_util``: dispatch-mode live-bytes accounting on CPU,
``max_memory_allocated`` on CUDA); and the accuracy, ``max|got - ref| / max|ref|`` against float64
(forward rows: y; forward+backward rows: the largest over y, dX (first 256 tokens), dA and dB).

Sweep: d in {384, 1024, 4096}, r in {4, 8, 16, 64}, tokens in {512, 2048, 8192}, float32 on the CPU.
``--quick``: three shapes including the CPU target (under a minute on an idle 2-core box). ``--gpu``:
bfloat16 on CUDA, d=4096, r in {8, 16, 64}, 2048 tokens (the first call of each shape autotunes the
kernels: about 1-2 minutes in all; ``benchmarks/gpu_check.sh`` runs it with ``GELORA_LORA_TUNE_MAX=3``, three
configs per kernel). ``--device``/``--dtype``/``--d``/``--r``/``--tokens`` override.
Targets: CPU fp32 d=1024 r=16 2048 tokens, fused forward+backward >= 1.15x PEFT with lower peak
memory; H200 bf16 d=4096 r in {8, 16, 64}, 2048 tokens, >= 1.3x.

Reading the CPU rows: ``vs_dense`` of ``gelora`` is the stable number (the same in every run on a
quiet box); ``vs_peft`` also carries PEFT's own run-to-run spread, mostly its (M, N) temporaries
(allocator state, page faults: PEFT's ``vs_dense`` moves between about 1.15 and 1.28 at the CPU target
shape from one process to the next). Run the target shape in a few fresh processes before quoting it
(``docs/lora_speed.md``). What an exact layer cannot avoid on top of the dense GEMMs (``4 M d^2``
flops, square layer): the merge ``2 d^2 r`` and the gradients' four rank-r products ``8 M d r``, so its
floor is ``1 + r/(2M) + 2r/d`` of the dense time at equal efficiency: 1.035 at the target shape, where
gelora measures about 1.05 and PEFT 1.15-1.28.

Rows are appended to ``--csv`` (default ``benchmarks/results/lora_speed.csv``); the table is printed last.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _lora_util import (append_csv, format_table, interleaved_medians, list_of_ints, mib,  # noqa: E402
                        peak_bytes, saved_bytes)

CPU_TARGET = dict(d=1024, r=16, tokens=2048, speedup=1.15)
GPU_TARGET = dict(d=4096, rs=(8, 16, 64), tokens=2048, speedup=1.3)
ACC_ROWS = 256


class One(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def layer_flops(m: int, d: int, r: int, mode: str) -> float:
    fwd = 2 * m * d * d + 4 * m * d * r
    bwd = 2 * m * d * d + 8 * m * d * r
    return fwd if mode == "fwd" else fwd + bwd


class EagerLora(nn.Module):
    """PEFT's eager formula without PEFT (used only when PEFT is not installed, e.g. on a bare GPU box):
    ``base(x) + lora_B(lora_A(x)) * s``, the same ops PEFT's ``lora.Linear`` runs with dropout 0."""

    def __init__(self, base: nn.Linear, r: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=r ** -0.5)
        self.scaling = scaling

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


class FusedLora(nn.Module):
    """gelora.lora.lora_linear on an :class:`EagerLora`'s parameters."""

    def __init__(self, eager: EagerLora, backend=None) -> None:
        super().__init__()
        self.eager, self.backend = eager, backend

    def forward(self, x):
        from gelora.lora import lora_linear

        e = self.eager
        return lora_linear(x, e.base_layer.weight, e.base_layer.bias, e.lora_A.weight, e.lora_B.weight, e.scaling,
                           backend=self.backend)


def parts(layer):
    """(base nn.Linear, A, B, scaling) of any provider's layer; A, B None for ``dense``."""
    if isinstance(layer, FusedLora):
        layer = layer.eager
    if isinstance(layer, EagerLora):
        return layer.base_layer, layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    if hasattr(layer, "lora_A"):  # PEFT lora.Linear (fused or not)
        return (layer.get_base_layer(), layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                float(layer.scaling["default"]))
    return layer, None, None, None


def build(d, r, dtype, device):
    """Providers on identical weights: {name: module}; and whether PEFT itself is the eager provider."""
    import gelora.lora as L

    torch.manual_seed(d * 1000 + r)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        eager = EagerLora(nn.Linear(d, d), r, 2.0).to(device, dtype)
        layers = {"peft": eager, "gelora": FusedLora(eager)}
        if device.type == "cuda":
            layers["gelora_torch"] = FusedLora(eager, backend="torch")
        layers["dense"] = copy.deepcopy(eager.base_layer)
        return layers, False
    model = get_peft_model(One(d), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                              init_lora_weights=False)).to(device, dtype)
    layers = {"peft": model.base_model.model.proj}
    fused = copy.deepcopy(model)
    L.fuse_lora(fused)
    layers["gelora"] = fused.base_model.model.proj
    if device.type == "cuda":
        fused_t = copy.deepcopy(model)
        L.fuse_lora(fused_t, backend="torch")
        layers["gelora_torch"] = fused_t.base_model.model.proj
    layers["dense"] = copy.deepcopy(model.base_model.model.proj.get_base_layer())
    return layers, True


def lora_params(layer):
    _, a, b, _ = parts(layer)
    return [] if a is None else [a, b]


def make_step(layer, x, g, mode, inner):
    params = lora_params(layer)

    def step():
        for _ in range(inner):
            x.grad = None
            for p in params:
                p.grad = None
            y = layer(x)
            if mode != "fwd":
                y.backward(g)
            del y

    return step


def reference(layer, x, g):
    """float64 references: y and dX of the first ACC_ROWS tokens by autograd through
    ``gelora.lora.lora_linear_reference`` (rows are independent, so a row subset is exact); dA and dB
    (sums over all tokens) from their closed forms ``s (g B)^T x`` and ``s g^T (x A^T)``, which need no
    (M, N, K) GEMM, so the check stays cheap at d=4096, 8192 tokens."""
    from gelora.lora import lora_linear_reference

    rows = min(ACC_ROWS, x.shape[0])
    base, a, bb, s = parts(layer)
    a, bb = a.detach().double(), bb.detach().double()
    xs = x[:rows].detach().double().requires_grad_()
    y = lora_linear_reference(xs, base.weight.double(), base.bias.double(), a, bb, s)
    y.backward(g[:rows].double())
    xd, gd = x.detach().double(), g.double()
    return dict(y=y.detach(), dx=xs.grad, da=s * (gd @ bb).t() @ xd, db=s * gd.t() @ (xd @ a.t()))


def accuracy(layer, x, g, ref):
    """``{"y": e_y, "all": max(e_y, e_dX, e_dA, e_dB)}`` with ``e = max|got - ref| / max|ref|`` (y and
    dX on the first ACC_ROWS tokens), from one forward+backward."""
    params = lora_params(layer)
    if not params:
        return {"y": float("nan"), "all": float("nan")}
    x.grad = None
    for p in params:
        p.grad = None
    rows = ref["y"].shape[0]
    rel = lambda got, want: float((got.detach().double() - want).abs().max() / want.abs().max())  # noqa: E731
    y = layer(x)
    e_y = rel(y[:rows], ref["y"])
    y.backward(g)
    e_all = max(e_y, rel(x.grad[:rows], ref["dx"]), rel(params[0].grad, ref["da"]), rel(params[1].grad, ref["db"]))
    return {"y": e_y, "all": e_all}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three shapes including the CPU target (< 1 min)")
    ap.add_argument("--gpu", action="store_true", help="bf16 on CUDA, d=4096, r in {8,16,64}, 2048 tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per provider (median kept)")
    ap.add_argument("--d", type=list_of_ints, default=None, help="comma-separated widths")
    ap.add_argument("--r", type=list_of_ints, default=None, help="comma-separated ranks")
    ap.add_argument("--tokens", type=list_of_ints, default=None, help="comma-separated token counts")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --gpu, else cpu)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 with --gpu, else float32")
    ap.add_argument("--csv", type=Path, default=HERE / "results" / "lora_speed.csv")
    args = ap.parse_args(argv)

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.gpu else "float32"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.gpu:
        shapes = [(GPU_TARGET["d"], r, GPU_TARGET["tokens"]) for r in GPU_TARGET["rs"]]
    elif args.quick:
        shapes = [(1024, 16, 2048), (384, 4, 512), (4096, 8, 256)]
    else:
        shapes = [(d, r, m) for d in [384, 1024, 4096] for r in [4, 8, 16, 64] for m in [512, 2048, 8192]]
    if device.type == "cuda":  # ~0.1-1 ms per call: time 10 calls between synchronisations
        repeats, inner, budget = args.repeats or 30, 10, None
    else:
        repeats, inner, budget = args.repeats or 15, 1, (4.0 if not args.quick else 2.5)
    if args.d or args.r or args.tokens:
        shapes = [(d, r, m) for d in (args.d or sorted({s[0] for s in shapes}))
                  for r in (args.r or sorted({s[1] for s in shapes}))
                  for m in (args.tokens or sorted({s[2] for s in shapes}))]

    import gelora.lora as L

    backend = L.select_lora_backend(torch.empty(1, device=device, dtype=dtype)).name
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(__doc__.split("\n")[0])
    print(f"{dev_name}; torch {torch.__version__}; {threads} threads (torch.get_num_threads()="
          f"{torch.get_num_threads()}); dtype {str(dtype).replace('torch.', '')}; gelora backend on this "
          f"device: {backend}; {_dt.datetime.now().isoformat(timespec='seconds')}")
    if device.type == "cuda":
        import triton

        print(f"triton {triton.__version__}, CUDA {torch.version.cuda}")

    rows = []
    t_start = time.perf_counter()
    for d, r, m in shapes:
        layers, with_peft = build(d, r, dtype, device)
        if not with_peft and not rows:
            print("PEFT is not installed: provider 'peft' is its eager formula in plain torch (EagerLora)")
        gen = torch.Generator(device="cpu").manual_seed(m)
        x = torch.randn(m, d, generator=gen).to(device, dtype).requires_grad_()
        g = (torch.randn(m, d, generator=gen) / d ** 0.5).to(device, dtype)
        # accuracy (y of the fwd+bwd pass for the fwd row) and saved bytes do not depend on the mode
        ref = reference(layers["peft"], x, g)
        errs = {name: accuracy(layer, x, g, ref) for name, layer in layers.items()}
        saved = {name: saved_bytes(lambda: layer(x), [parts(layer)[0].weight, *lora_params(layer)])
                 for name, layer in layers.items()}
        for mode in ("fwd", "fwd+bwd"):
            steps = {name: make_step(layer, x, g, mode, inner) for name, layer in layers.items()}
            # warm-up (and autotuning on CUDA), then pick repeats to fit the time budget on the CPU
            t0 = time.perf_counter()
            for fn in steps.values():
                fn()
            one = (time.perf_counter() - t0) / len(steps)
            is_target = (d, r, m) == (CPU_TARGET["d"], CPU_TARGET["r"], CPU_TARGET["tokens"])
            cap = budget * (4 if is_target else 1) if budget is not None else None
            reps = repeats if cap is None else max(5, min(repeats * (2 if is_target else 1), int(cap / max(one, 1e-9))))
            timing = interleaved_medians(steps, reps, device, warmup=0)
            for name, layer in layers.items():
                peak = peak_bytes(make_step(layer, x, g, mode, 1), device)
                sec = timing[name]["median"] / inner
                rows.append(dict(
                    device=dev_name, threads=threads, dtype=str(dtype).replace("torch.", ""), d=d, r=r, tokens=m,
                    mode=mode, provider=name, ms=sec * 1e3, gflops=layer_flops(m, d, r, mode) / sec / 1e9,
                    vs_peft=float("nan"), vs_dense=float("nan"), peak_mib=mib(peak), saved_mib=mib(saved[name]),
                    err=errs[name]["y" if mode == "fwd" else "all"], repeats=reps,
                    when=_dt.datetime.now().isoformat(timespec="seconds")))
            group = [row for row in rows if (row["d"], row["r"], row["tokens"], row["mode"]) == (d, r, m, mode)]
            # ratios: median over rounds of the per-round ratio (the providers of one round ran back to
            # back, so load that drifts between rounds cancels); times: per-provider medians
            t_peft = next(row["ms"] for row in group if row["provider"] == "peft")
            for row in group:
                mine = timing[row["provider"]]["times"]
                row["vs_peft"] = statistics.median(p / q for p, q in zip(timing["peft"]["times"], mine))
                row["vs_dense"] = statistics.median(q / p for p, q in zip(timing["dense"]["times"], mine))
            gl = next(row for row in group if row["provider"] == "gelora")
            print(f"  d={d:5d} r={r:3d} tokens={m:5d} {mode:8s} peft {t_peft:9.3f} ms  gelora {gl['ms']:9.3f} ms  "
                  f"speedup {gl['vs_peft']:.2f}x  ({reps} repeats)", flush=True)
        del layers, x, g
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # shape by shape, so that a run stopped by a time limit keeps the shapes it finished
        append_csv(args.csv, [row for row in rows if (row["d"], row["r"], row["tokens"]) == (d, r, m)])

    print(f"\n{len(rows)} rows appended to {args.csv}; {time.perf_counter() - t_start:.0f} s")
    target = GPU_TARGET if args.gpu else CPU_TARGET
    for row in rows:
        hit = (row["d"] == target["d"] and row["tokens"] == target["tokens"] and row["mode"] == "fwd+bwd"
               and row["provider"] == "gelora" and row["r"] in target.get("rs", (target.get("r"),)))
        if hit:
            peft_row = next(p for p in rows if p["provider"] == "peft" and all(
                p[k] == row[k] for k in ("d", "r", "tokens", "mode")))
            ok = row["vs_peft"] >= target["speedup"] and row["peak_mib"] < peft_row["peak_mib"]
            print(f"target d={row['d']} r={row['r']} tokens={row['tokens']} fwd+bwd: speedup "
                  f"{row['vs_peft']:.2f}x (need >= {target['speedup']}x), peak {row['peak_mib']:.1f} MiB vs "
                  f"PEFT {peft_row['peak_mib']:.1f} MiB -> {'met' if ok else 'NOT met'}")
    cols = ["d", "r", "tokens", "mode", "provider", "ms", "gflops", "vs_peft", "vs_dense", "peak_mib",
            "saved_mib", "err", "repeats"]
    print()
    print(format_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
