"""How long does ``gelora.profile_model`` take on a 7B-shaped decoder at 100k tokens per layer, and how
does the time split between the forward passes and TwoNN?

Stage 4 of ``benchmarks/gpu_check.sh``. The model is a randomly initialised Llama-2-7B-shaped
``LlamaForCausalLM`` (32 blocks, hidden 4096, MLP 11008, 32 heads, vocabulary 32000, bf16), built from a
``LlamaConfig`` on the GPU: no weights, no network. Its IDs mean nothing; its shapes, dtype and hidden-state
statistics (a repeated first token in every sequence) are those of the real model, so the time is the
time a real profile takes. Data: random token ids, sequences of 2048 tokens each starting with the BOS
id 1, enough of them for 100k tokens per layer (49 sequences, 100,352 tokens); ``profile_model`` samples
100k points per layer (33 layers: the embeddings and the 32 block outputs) and estimates each layer's
TwoNN ID on the GPU.

Reported: the model build time (not part of the goal), and ``ProfileResult.timings``: ``forward`` (the
batches through the model, hooks and device-to-host copies included), ``wait`` (for the writer thread),
``estimate`` (33 TwoNN estimates) and ``total`` (goal: <= 180 s); per layer the ID, the duplicates
collapsed and ``n_fixed`` (rows recomputed in float64). Outputs: ``$OUT/profile_speed.json`` and headline
rows in ``$OUT/gpu_check.csv``.

    python3 benchmarks/profile_speed.py                 # on a GPU (gpu_check.sh stage 4)
    python3 benchmarks/profile_speed.py --smoke         # a tiny Llama on the CPU: checks this script
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _gpu_check import add_row, out_dir, write_json  # noqa: E402

import torch  # noqa: E402

# the Triton tile config is pinned (the first candidate), as in the rest of gpu_check.sh: no tuning pass
os.environ.setdefault("GELORA_TRITON_AUTOTUNE", "0")
STAGE = "4 profile"
GOAL_S = 180.0
#: Llama-2-7B's shape (meta-llama/Llama-2-7b-hf config.json)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A randomly initialised ``LlamaForCausalLM`` of ``shape``, created directly on ``device`` in
    ``dtype`` (no float32 copy of the weights, no host round trip)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a 2-block Llama of width 64 on the CPU, 300 tokens per layer")
    ap.add_argument("--tokens", type=int, default=None, help="points per layer (default 100000; smoke 300)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; smoke 32)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    args = ap.parse_args()
    out_dir().mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: nothing to measure (--smoke checks this script on the CPU)")
        return 2
    import gelora

    device = torch.device("cuda" if cuda else "cpu")
    shape = TINY if args.smoke else LLAMA2_7B
    tokens = args.tokens or (300 if args.smoke else 100_000)
    seq = args.seq or (32 if args.smoke else 2048)
    n_seq = math.ceil(tokens / seq)
    info = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", shape=shape, tokens=tokens, seq=seq,
                n_seq=n_seq, batch=args.batch, dtype="bfloat16")
    path = out_dir() / "profile_speed.json"

    from transformers import LlamaForCausalLM  # noqa: F401 - the lazy import (seconds) is not the build

    t0 = time.perf_counter()
    model = build_model(shape, device, torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    info.update(build_s=build_s, params=n_params)
    write_json(path, info)
    print(f"built {type(model).__name__}: {n_params / 1e9:.2f}B parameters, bf16, on {device} in {build_s:.1f} s",
          flush=True)
    add_row(STAGE, "profile_build_s", f"random Llama ({shape['num_hidden_layers']} blocks, hidden "
            f"{shape['hidden_size']}) built on {device.type}", build_s, unit="s", note=f"{n_params / 1e9:.2f}B params; "
            "not part of the goal")

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab_size"], (n_seq, seq), generator=g)
    ids[:, 0] = 1  # BOS: the same first token in every sequence, as in real data
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = gelora.profile_model(model, ids, max_tokens=tokens, batch_size=args.batch, max_length=seq,
                               progress=False)
    tm = res.timings
    info.update(timings=tm, ids=res.ids, n_points=res.n_points, n_duplicates=res.n_duplicates,
                n_fixed=res.n_fixed, backend=res.backend, host_gb=res.host_bytes / 1e9,
                peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None)
    write_json(path, info)
    print(res.summary())
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()), flush=True)
    total = tm["total"]
    add_row(STAGE, "profile_total_s", f"profile_model, {tokens} tokens per layer x {len(res.ids)} layers", total,
            unit="s", goal=f"<= {GOAL_S:.0f} s", met=total <= GOAL_S,
            note=f"engine {res.backend}; host samples {res.host_bytes / 1e9:.1f} GB")
    add_row(STAGE, "profile_split", "forward+wait / TwoNN seconds", f"{tm['forward'] + tm['wait']:.1f} / "
            f"{tm['estimate']:.1f}", unit="s", note=f"forward {tm['forward']:.1f}, wait {tm['wait']:.1f}; "
            f"{tm.get('points_per_s', float('nan')):.0f} tokens/s")
    add_row(STAGE, "profile_fixed", "rows recomputed in float64, all layers (most in one layer)",
            f"{sum(res.n_fixed)} ({max(res.n_fixed)})", note=f"duplicates collapsed at the embeddings: "
            f"{res.n_duplicates[0]}; IDs {min(res.ids):.1f}..{max(res.ids):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
