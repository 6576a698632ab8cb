"""Fused variable-rank LoRA linear layers for training, and the bridge to PEFT.

What is fused. A LoRA linear layer is ``y = x W^T + b + s (x A^T) B^T`` (frozen ``W``, trainable ``A``,
``B``, per-layer rank ``r`` and scale ``s``; after a GeLoRA allocation every layer has its own ``r``).
PEFT runs it eagerly: the base GEMM, then ``lora_B(lora_A(dropout(x))) * s`` and an add, three
(M, N) temporaries and five kernels forward, about as many again backward. Here:

* forward: ``S = s x A^T`` (the shrink, an (M, r) result), then ``y = x W^T + b + S B^T`` written once:
  on CUDA one Triton GEMM whose tile accumulator also takes ``S B^T`` (:mod:`gelora.kernels.lora`);
  on the CPU both terms accumulate into one output with in-place ``addmm_`` (``S B^T + b`` written
  first, the base GEMM added into it), the way Unsloth's LoRA layers avoid temporaries;
* backward: ``T = s dY B``, ``dX = dY W + T A`` (one fused GEMM on CUDA, ``mm`` + ``addmm_`` on the CPU),
  ``dA = T^T x``, ``dB = dY^T S``. No (M, N) or (M, K) temporary besides ``y`` and ``dX`` themselves;
* projections reading one input with different ranks (q/k/v, gate/up) run as one grouped launch:
  their ``A`` are concatenated so the shrink is one GEMM, and a small table of (rank, offset, width)
  drives one fused-GEMM launch for all outputs (:func:`lora_grouped_linear`).

The CPU (float32/float64) goes further, because there the skinny rank-r products, not memory
traffic, are what LoRA adds to the bare GEMMs:

* merged weights: when the batch has more tokens than the layer has features, ``y = x (W + s B A)^T``
  is the cheaper form of the same function (the merge costs ``2 N K r`` flops, the separate LoRA term
  ``2 M r (N + K)`` per step); the forward is then one GEMM and no ``S``, and ``dX = dY (W + s B A)``
  needs no ``T A``. The merged weight is kept for backward when it is no larger than the input that
  backward keeps anyway (``N <= M``), else merged again. Never in bf16/fp16, where ``W + s B A``
  would round the small update away. ``GELORA_LORA_MERGE=never|always`` overrides the rule;
* one-pass weight gradients (``gelora._C.lora_grad``, csrc/lora_grad.h): ``S``, ``T``, ``dA`` and
  ``dB`` per block of tokens while the block sits in L2, AVX-512/AVX2 register tiles, near the FMA
  peak, where four BLAS calls run at half of it; ``S`` is recomputed there, never kept.
  ``GELORA_LORA_CPU_KERNEL=0`` switches back to BLAS calls.

Memory/time trade of ``S``: it is (M, r), ``r/K`` of the input ``x`` that backward keeps anyway (1.6 %
at r=16, K=1024), and PEFT's eager layer keeps the same tensor (the input of ``lora_B``). Saving it
(the default, where it is used) costs that; ``recompute_shrink=True`` drops it and re-runs the shrink
in backward, one extra read of ``x`` and ``2 M K r`` flops (a few per cent of the layer's backward).

Measured with ``benchmarks/lora_speed.py`` on a 2-core Zen 4 (fp32, MKL, 2 threads), d=1024,
r=16, 2048 tokens, forward+backward: 1.05x the bare dense GEMMs (an exact layer's floor there is
1.035x), 1.12x faster than PEFT (median of 5 runs), peak memory 20 vs 32 MiB; docs/lora_speed.md has
the sweep. Tiny layers (d=128, 40 tokens) run at 0.5-0.7x PEFT's speed: the ~0.1 ms of
Python per call (checks, autograd function) dominates. With
``lora_dropout > 0`` a training step falls back to PEFT's eager layer (the dropout mask would have to
be kept for ``dA``; not implemented), as do DoRA and the other LoRA variants, ``lora_bias``, Conv1D
(``fan_in_fan_out``) bases and quantized bases: :func:`fuse_lora` leaves those modules alone and says why.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _env
from ._registry import BackendUnavailable, Registry
from .knn.inputs import cpu_core
from .kernels import lora as _klora  # gelora/kernels links to the top-level kernels/ folder

lora_linear_reference = _klora.lora_linear_reference
lora_grouped_reference = _klora.lora_grouped_reference

log = logging.getLogger("gelora")

__all__ = [
    "DEFAULT_SIBLING_NAMES",
    "LoraFuseConfig",
    "LoraFuseReport",
    "LoraGroupedLinearFunction",
    "LoraLinearFunction",
    "describe_lora_backends",
    "fuse_lora",
    "lora_grouped_linear",
    "lora_grouped_reference",
    "lora_linear",
    "lora_linear_reference",
    "select_lora_backend",
    "unfuse_lora",
]

#: Names of sibling projections that read the same input (grouped when ``group_siblings=True``).
DEFAULT_SIBLING_NAMES: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------
# Backends: declared, checked, explainable
# ---------------------------------------------------------------------------------------------------
class LoraBackend:
    """One way to run the fused layer. Subclasses answer :meth:`not_supported_reasons` and implement
    the four steps the autograd functions are made of (all tensors 2-D, rows contiguous):

    * ``shrink(x, a_cat, ranks, scalings) -> S``: (M, R) ``= x A_cat^T`` with column block g scaled by
      ``s_g``; x (M, K), a_cat (R, K), R = sum of ranks;
    * ``expand(x, S, weights, biases, Bs, ranks, offsets) -> [y_g]``: (M, N_g)
      ``= x W_g^T + b_g + S[:, off_g:off_g+r_g] B_g^T``;
    * ``grad_shrink(dys, Bs, ranks, offsets, scalings) -> T``: (M, R) ``= [s_g dY_g B_g]_g``;
    * ``dx(dys, weights, T, a_cat) -> dX``: (M, K) ``= sum_g dY_g W_g + T A_cat``.
    """

    name = "?"
    description = ""

    def availability_reasons(self) -> List[str]:
        return []

    def input_reasons(self, device: torch.device, dtype: torch.dtype) -> List[str]:
        return []

    def not_supported_reasons(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> List[str]:
        """Reasons this backend cannot run a layer on ``x`` computing in ``dtype`` (default
        ``x.dtype``); empty when it can."""
        reasons = self.availability_reasons()
        if reasons:
            return list(reasons)
        return list(self.input_reasons(x.device, dtype or x.dtype))

    def merge_plan(self, x, weights, ranks, recompute) -> Optional[bool]:
        """Whether to run the layer on merged weights ``W_g + s_g B_g A_g`` (None: no; True: merge and
        keep the merged weights for backward; False: merge, and merge again in backward)."""
        return None

    def weight_grads(self, x, dys, a_cat, lora_Bs, ranks, offsets, scalings, want_t):
        """``(T_cat or None, [dA_g], [dB_g])`` from one fused pass, or None when this backend has none."""
        return None

    def weight_grads_recompute_s(self, x) -> bool:
        """True when :meth:`weight_grads` runs on ``x`` and recomputes ``S`` itself (no need to keep it)."""
        return False


class TorchLoraBackend(LoraBackend):
    """Plain torch ops, any device: the LoRA term and the base GEMM accumulate into one output with
    ``addmm`` / in-place ``addmm_`` (no (M, N) temporary, no separate add)."""

    name = "torch"
    description = ("torch addmm/addmm_ into one output, no temporaries (CPU, or CUDA without Triton); "
                   "on the CPU also merged weights and the one-pass C++ weight gradients")

    def input_reasons(self, device, dtype):
        if dtype not in _FLOAT_DTYPES:
            return [f"dtype {dtype} is not a supported float type"]
        return []

    # Layouts below were the fastest of the equivalent forms on a 2-core Zen 4 box (MKL, fp32,
    # M=2048, K=N=1024, r=16, 2 threads): x @ (A^T contiguous) 0.65 ms vs x @ A.t() 0.87 ms;
    # T^T contiguous @ x 0.93 vs 1.34 ms; S^T contiguous @ dY 0.89 vs 1.30 ms (dA, dB in _backward).
    def shrink(self, x, a_cat, ranks, scalings):
        kernel = _cpu_lora_kernel(x, "lora_shrink")
        if kernel is not None:  # rank-r register tiles: BLAS runs a (M, K) x (K, r) GEMM far below peak
            scale = _scale_column(ranks, scalings, x.device, torch.float32)
            return torch.from_numpy(kernel(x.detach().numpy(), a_cat.detach().contiguous().numpy(),
                                           scale.numpy())[0])
        # s_g A_g formed in fp32 (fp64 for fp64) and rounded once: a bf16 copy of s would bias the term
        if len(ranks) == 1:  # a Python scalar multiplies in the wide type already
            a_s = a_cat * float(scalings[0])
        else:
            wide = torch.float64 if a_cat.dtype == torch.float64 else torch.float32
            scale = _scale_column(ranks, scalings, a_cat.device, wide)[:, None]
            a_s = (a_cat.to(wide) * scale).to(a_cat.dtype)
        return torch.mm(x, a_s.t().contiguous())

    # The skinny LoRA GEMM goes first and writes y; the big GEMM then accumulates into it in place
    # (beta=1), where reading y back hides under its compute. The other order (base first, then an
    # in-place skinny addmm_) reads and writes y once more: 2 % slower per fwd+bwd at M=2048,
    # K=N=1024, r=16 on the box above (median of 60 paired runs).
    def expand(self, x, s_cat, weights, biases, lora_Bs, ranks, offsets):
        ys = []
        for w, b, bb, r, off in zip(weights, biases, lora_Bs, ranks, offsets):
            s_g = s_cat[:, off:off + r]
            y = torch.mm(s_g, bb.t()) if b is None else torch.addmm(b, s_g, bb.t())
            ys.append(y.addmm_(x, w.t()))
        return ys

    def grad_shrink(self, dys, lora_Bs, ranks, offsets, scalings):
        ts = [torch.mm(dy, bb * s) for dy, bb, s in zip(dys, lora_Bs, scalings)]
        return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)

    def dx(self, dys, weights, t_cat, a_cat):
        dx = torch.mm(t_cat, a_cat)
        for dy, w in zip(dys, weights):
            dx.addmm_(dy, w)
        return dx

    # Merged weights. y = x (W + s B A)^T is the same function as x W^T + s (x A^T) B^T; merging costs
    # 2 N K r flops per merge, the separate LoRA term 2 M r (N + K) per forward+backward (expand, and T A
    # in dX), so with M tokens >= N, K it is the cheaper form, and the forward then needs no S at all
    # (the backward recomputes it). Only float32/float64: a bf16/fp16 W + s B A rounds the small update
    # to the weight's 8 (11) bits and would erase it. The merged weights are kept for backward when they
    # are no larger than the input that backward keeps anyway (N <= M); else they are merged again.
    def merge_plan(self, x, weights, ranks, recompute):
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return None
        mode = _env.text("GELORA_LORA_MERGE", "auto")
        if mode not in ("auto", "never", "always"):
            raise ValueError(f"GELORA_LORA_MERGE must be auto, never or always, got {mode!r}")
        if mode == "never":
            return None
        m, k = x.shape
        n_sum = sum(w.shape[0] for w in weights)
        keep = (not recompute) and n_sum <= m
        merge_cost = (1 if keep else 2) * sum(w.shape[0] * k * r for w, r in zip(weights, ranks))
        term_cost = sum(m * w.shape[0] * r for w, r in zip(weights, ranks)) + m * k * sum(ranks)
        return keep if (mode == "always" or merge_cost < term_cost) else None

    @staticmethod
    def merged_weights(weights, lora_As, lora_Bs, scalings):
        return [torch.addmm(w, bb, a, alpha=float(s)) for w, a, bb, s in zip(weights, lora_As, lora_Bs, scalings)]

    def weight_grads_recompute_s(self, x):
        return _cpu_lora_grad(x) is not None

    def weight_grads(self, x, dys, a_cat, lora_Bs, ranks, offsets, scalings, want_t):
        kernel = _cpu_lora_grad(x)
        if kernel is None:
            return None
        xn = x.detach().numpy()
        ts, d_as, d_bs = [], [], []
        for dy, bb, r, off, s in zip(dys, lora_Bs, ranks, offsets, scalings):
            da, db, t, _ = kernel(xn, dy.detach().numpy(), a_cat[off:off + r].detach().numpy(),
                                  bb.detach().numpy(), float(s), want_t=want_t)
            d_as.append(torch.from_numpy(da))
            d_bs.append(torch.from_numpy(db))
            ts.append(None if t is None else torch.from_numpy(t))
        t_cat = None
        if want_t:
            t_cat = ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)
        return t_cat, d_as, d_bs


def _cpu_lora_kernel(x: torch.Tensor, name: str):
    """``gelora._C.<name>`` (``lora_grad``: S, T, dA, dB in one pass over x and dY; ``lora_shrink``: S;
    see csrc/lora_grad.h) when it can run on ``x``: a float32 CPU tensor, the extension built, and
    ``GELORA_LORA_CPU_KERNEL`` not 0."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None  # (a row-strided x, e.g. a column slice, takes the BLAS calls that accept it)
    if not _env.flag("GELORA_LORA_CPU_KERNEL", True):
        return None
    return getattr(cpu_core(x), name, None)


def _cpu_lora_grad(x: torch.Tensor):
    return _cpu_lora_kernel(x, "lora_grad")


class TritonLoraBackend(LoraBackend):
    """The Triton kernels of :mod:`gelora.kernels.lora` (CUDA; CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    description = "Triton shrink + fused GEMM (LoRA term in the tile accumulator), CUDA"

    def availability_reasons(self):
        if not _klora.HAS_TRITON:
            return ["triton is not installed (pip install triton)"]
        if not _klora.INTERPRET and not torch.cuda.is_available():
            return ["no CUDA device (and TRITON_INTERPRET=1 was not set before gelora was imported)"]
        return []

    def input_reasons(self, device, dtype):
        reasons = []
        if device.type != "cuda" and not (_klora.INTERPRET and device.type == "cpu"):
            reasons.append(f"tensors are on {device.type}; the Triton kernels need CUDA")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"dtype {dtype} is not float32/float16/bfloat16")
        return reasons

    def shrink(self, x, a_cat, ranks, scalings):
        return _klora.lora_shrink(x, a_cat, _scale_column(ranks, scalings, x.device, torch.float32))

    def expand(self, x, s_cat, weights, biases, lora_Bs, ranks, offsets):
        return _klora.lora_fused_forward(x, s_cat, weights, biases, lora_Bs, ranks, offsets)

    def grad_shrink(self, dys, lora_Bs, ranks, offsets, scalings):
        m = dys[0].shape[0]
        t = torch.empty((m, sum(ranks)), dtype=dys[0].dtype, device=dys[0].device)
        for dy, bb, r, off, s in zip(dys, lora_Bs, ranks, offsets, scalings):
            _klora.lora_shrink(dy, bb, _scale_column((r,), (s,), dy.device, torch.float32),
                               out=t[:, off:off + r], a_transposed=True)
        return t

    def dx(self, dys, weights, t_cat, a_cat):
        return _klora.lora_fused_dx(dys, weights, t_cat, a_cat)


@functools.lru_cache(maxsize=256)
def _scale_vector(ranks: Tuple[int, ...], scalings: Tuple[float, ...], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """(sum r_g,) tensor holding ``s_g`` repeated ``r_g`` times; cached per layout, so a training step
    makes no host-to-device copy for it."""
    vals = [s for r, s in zip(ranks, scalings) for _ in range(r)]
    return torch.tensor(vals, dtype=dtype, device=device)


def _scale_column(ranks, scalings, device, dtype) -> torch.Tensor:
    return _scale_vector(tuple(int(r) for r in ranks), tuple(float(s) for s in scalings),
                         torch.device(device), dtype)


#: Order in which ``backend=None`` tries the backends (first usable one wins).
PRIORITY = ("triton", "torch")
#: The fused-LoRA backends (the registry mechanism of the kNN engines, :class:`gelora._registry.Registry`).
LORA_BACKENDS = Registry("LoRA", PRIORITY, (), "GELORA_LORA_BACKEND")
LORA_BACKENDS.register(TritonLoraBackend())
LORA_BACKENDS.register(TorchLoraBackend())


def describe_lora_backends(device: str = "cuda" if torch.cuda.is_available() else "cpu",
                           dtype: torch.dtype = torch.float32) -> List[Tuple[str, bool, List[str], str]]:
    """``(name, usable, reasons, description)`` of every LoRA backend for a ``device``/``dtype`` input,
    in priority order (for ``gelora info``)."""
    out = []
    for name, b in LORA_BACKENDS.all().items():
        reasons = b.availability_reasons() or list(b.input_reasons(torch.device(device), dtype))
        out.append((name, not reasons, reasons, b.description))
    return out


def select_lora_backend(x: torch.Tensor, backend: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None) -> LoraBackend:
    """The backend for input ``x``: the forced one (argument or ``GELORA_LORA_BACKEND``), else the first
    of :data:`PRIORITY` with no reasons.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailable: the forced backend cannot run on ``x`` (the message lists why), or none can.
    """
    return LORA_BACKENDS.select(lambda b, forced: b.not_supported_reasons(x, dtype), backend)


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------
def _check_group(x, weights, biases, lora_As, lora_Bs, scalings) -> None:
    """Clear errors for bad arguments (shapes, ranks, dtypes, devices), before any kernel runs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    g = len(weights)
    if g == 0:
        raise ValueError("at least one projection is needed")
    if not (len(biases) == len(lora_As) == len(lora_Bs) == len(scalings) == g):
        raise ValueError(f"weights, biases, lora_As, lora_Bs and scalings must have one entry per "
                         f"projection; got {len(weights)}, {len(biases)}, {len(lora_As)}, "
                         f"{len(lora_Bs)}, {len(scalings)}")
    k = x.shape[-1]
    for i, (w, b, a, bb, s) in enumerate(zip(weights, biases, lora_As, lora_Bs, scalings)):
        tag = f"projection {i}: " if g > 1 else ""
        if w.dim() != 2:
            raise ValueError(f"{tag}weight must be 2-D (N, K), got shape {tuple(w.shape)}")
        n = w.shape[0]
        if w.shape[1] != k:
            raise ValueError(f"{tag}weight has shape {tuple(w.shape)} but x has K={k} features "
                             f"(x shape {tuple(x.shape)})")
        if a.dim() != 2 or bb.dim() != 2:
            raise ValueError(f"{tag}lora_A and lora_B must be 2-D, got {tuple(a.shape)} and {tuple(bb.shape)}")
        r = a.shape[0]
        if r < 1:
            raise ValueError(f"{tag}LoRA rank must be >= 1, got lora_A of shape {tuple(a.shape)}")
        if a.shape[1] != k:
            raise ValueError(f"{tag}lora_A must have shape (r, K)=(r, {k}), got {tuple(a.shape)}")
        if tuple(bb.shape) != (n, r):
            raise ValueError(f"{tag}lora_B must have shape (N, r)=({n}, {r}), got {tuple(bb.shape)}")
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{tag}bias must have shape (N,)=({n},), got {tuple(b.shape)}")
        for nm, t in (("weight", w), ("bias", b), ("lora_A", a), ("lora_B", bb)):
            if t is None:
                continue
            if t.dtype != x.dtype:
                raise TypeError(f"{tag}dtype mismatch: x is {x.dtype} but {nm} is {t.dtype}; cast them to "
                                "one dtype (fused PEFT modules cast the adapter to the input's dtype)")
            if t.device != x.device:
                raise ValueError(f"{tag}device mismatch: x is on {x.device} but {nm} is on {t.device}")
        if not (isinstance(s, (int, float)) and math.isfinite(s)):
            raise ValueError(f"{tag}scaling must be a finite number, got {s!r}")


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------
def _forward(ctx, ops: LoraBackend, x, weights, biases, lora_As, lora_Bs, scalings, recompute):
    """Shared forward of both autograd functions; returns the G outputs reshaped like ``x``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ranks = [a.shape[0] for a in lora_As]
    offsets = [0]
    for r in ranks[:-1]:
        offsets.append(offsets[-1] + r)
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    lora_Bs = [bb if bb.is_contiguous() else bb.contiguous() for bb in lora_Bs]
    a_cat = lora_As[0].contiguous() if len(lora_As) == 1 else torch.cat(lora_As, dim=0)
    merge = ops.merge_plan(x2, weights, ranks, recompute)
    if merge is None:
        s_cat = ops.shrink(x2, a_cat, ranks, scalings)
        ys = ops.expand(x2, s_cat, weights, biases, lora_Bs, ranks, offsets)
        # the one-pass weight-gradient kernel recomputes S itself: nothing to keep then
        keep_s = not recompute and not ops.weight_grads_recompute_s(x2)
        kept = weights
    else:
        w_effs = TorchLoraBackend.merged_weights(weights, lora_As, lora_Bs, scalings)
        ys = [torch.mm(x2, we.t()) if b is None else torch.addmm(b, x2, we.t()) for we, b in zip(w_effs, biases)]
        s_cat, keep_s = None, False
        kept = w_effs if merge else weights
    ctx.ops = ops
    ctx.meta = (lead, ranks, offsets, [float(s) for s in scalings], keep_s, len(weights),
                [b is not None for b in biases], merge)
    ctx.save_for_backward(x2, a_cat, *kept, *lora_Bs, *((s_cat,) if keep_s else ()))
    return [y.view(*lead, y.shape[-1]) for y in ys]


def _backward(ctx, dys_in, needs_x, needs_w, needs_b, needs_a, needs_bb):
    """Shared backward; returns (dx, [dW_g], [db_g], [dA_g], [dB_g]) with None where not needed."""
    lead, ranks, offsets, scalings, keep_s, g, has_bias, merge = ctx.meta
    ops: LoraBackend = ctx.ops
    saved = ctx.saved_tensors
    x2, a_cat = saved[0], saved[1]
    weights = list(saved[2:2 + g])  # W_g, or W_g + s_g B_g A_g when the forward merged and kept them
    lora_Bs = list(saved[2 + g:2 + 2 * g])
    if merge is False:  # merged in forward, not kept: merge again
        weights = TorchLoraBackend.merged_weights(
            weights, [a_cat[off:off + r] for off, r in zip(offsets, ranks)], lora_Bs, scalings)
    merged = merge is not None
    dys = []
    for dy, w in zip(dys_in, weights):
        dy = dy.reshape(-1, w.shape[0])
        dys.append(dy if dy.is_contiguous() else dy.contiguous())
    # merged weights carry the LoRA term of dX already; T is then only needed for dA
    need_t = (needs_x and not merged) or any(needs_a)
    fused = None
    if any(needs_a) or any(needs_bb) or (needs_x and not merged):
        fused = ops.weight_grads(x2, dys, a_cat, lora_Bs, ranks, offsets, scalings,
                                 want_t=needs_x and not merged)
    if fused is not None:
        t_cat, d_as, d_bs = fused
        d_as = [d if need else None for d, need in zip(d_as, needs_a)]
        d_bs = [d if need else None for d, need in zip(d_bs, needs_bb)]
    else:
        t_cat = ops.grad_shrink(dys, lora_Bs, ranks, offsets, scalings) if need_t else None
        # dA and dB reduce over tokens: skinny GEMMs left to the vendor BLAS. On the CPU (MKL) the
        # transposed operand copied to contiguous first is faster (see TorchLoraBackend); cuBLAS takes
        # transposed operands natively, so on CUDA the plain form saves the copies' launches.
        cpu = x2.device.type == "cpu"
        d_as = [None] * g
        if any(needs_a):  # dA_g = T_g^T x = s_g (dY_g B_g)^T x, all g in one GEMM
            da_cat = torch.mm(t_cat.t().contiguous() if cpu else t_cat.t(), x2)
            d_as = [da_cat[off:off + r] if need else None for off, r, need in zip(offsets, ranks, needs_a)]
        d_bs = [None] * g
        if any(needs_bb):
            s_cat = saved[2 + 2 * g] if keep_s else ops.shrink(x2, a_cat, ranks, scalings)
            for i in range(g):  # dB_g = dY_g^T S_g (S_g already carries s_g)
                if needs_bb[i]:
                    s_g = s_cat[:, offsets[i]:offsets[i] + ranks[i]]
                    if cpu:
                        d_bs[i] = torch.mm(s_g.t().contiguous(), dys[i]).t().contiguous()
                    else:
                        d_bs[i] = torch.mm(dys[i].t(), s_g)
    dx = None
    if needs_x:
        if merged:  # dX = sum_g dY_g (W_g + s_g B_g A_g)
            dx = torch.mm(dys[0], weights[0])
            for dy, w in zip(dys[1:], weights[1:]):
                dx.addmm_(dy, w)
        else:
            dx = ops.dx(dys, weights, t_cat, a_cat)
        dx = dx.view(*lead, x2.shape[1])
    d_ws = [torch.mm(dys[i].t(), x2) if needs_w[i] else None for i in range(g)]
    d_bias = [dys[i].sum(0) if (needs_b[i] and has_bias[i]) else None for i in range(g)]
    return dx, d_ws, d_bias, d_as, d_bs


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear layer.

    Forward, with x (M, K) (any leading dims are flattened into M), W (N, K), b (N,), A (r, K),
    B (N, r), scalar s::

        S = s * x A^T                      (M, r)   saved, or recomputed in backward
        y = x W^T + b + S B^T              (M, N)   one fused GEMM (Triton) / addmm + addmm_ (torch)

    Backward, with dY (M, N)::

        T  = s * dY B                      (M, r)
        dX = dY W + T A                    (M, K)   = dY W + s (dY B) A
        dA = T^T x                         (r, K)   = s (dY B)^T x
        dB = dY^T S                        (N, r)   = s dY^T (x A^T)
        dW = dY^T x, db = sum_m dY         only if W / b require grad; a frozen W gets no gradient

    All matmuls accumulate in fp32 for fp16/bf16 inputs. The Triton path rounds ``y`` and ``dX`` once
    (base and LoRA terms share the accumulator); the torch path rounds the base GEMM and then the sum
    (``addmm_``), like PEFT's eager add. Arguments after ``scaling``: ``backend`` (a
    :class:`LoraBackend`) and ``recompute`` (bool).
    Prefer :func:`lora_linear`, which checks the inputs and picks the backend.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, backend, recompute):
        return _forward(ctx, backend, x, [weight], [bias], [lora_A], [lora_B], [scaling], recompute)[0]

    @staticmethod
    def backward(ctx, dy):
        n = ctx.needs_input_grad
        dx, d_ws, d_bias, d_as, d_bs = _backward(ctx, [dy], n[0], [n[1]], [n[2]], [n[3]], [n[4]])
        return dx, d_ws[0], d_bias[0], d_as[0], d_bs[0], None, None, None


class LoraGroupedLinearFunction(torch.autograd.Function):
    """G fused LoRA projections of one input with their own widths ``N_g`` and ranks ``r_g``.

    Forward, for every g (``A_cat = [A_1; ...; A_G]`` of shape (sum r_g, K))::

        S   = x A_cat^T, column block g scaled by s_g      (M, sum r_g)   one shrink
        y_g = x W_g^T + b_g + S_g B_g^T                    (M, N_g)       one grouped launch

    Backward::

        T_g = s_g dY_g B_g                                 (M, r_g)
        dX  = sum_g dY_g W_g + T_cat A_cat                 (M, K)         one grouped launch
        dA_g = T_g^T x,   dB_g = dY_g^T S_g

    Inputs: ``x, G, scalings (tuple), backend, recompute`` then ``G`` weights, ``G`` biases (or None),
    ``G`` lora_A, ``G`` lora_B. Returns the G outputs. Prefer :func:`lora_grouped_linear`.
    """

    @staticmethod
    def forward(ctx, x, g, scalings, backend, recompute, *params):
        ws, bs, a_s, b_s = (list(params[i * g:(i + 1) * g]) for i in range(4))
        ys = _forward(ctx, backend, x, ws, bs, a_s, b_s, list(scalings), recompute)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        g = ctx.meta[5]
        n = ctx.needs_input_grad
        p = n[5:]
        dx, d_ws, d_bias, d_as, d_bs = _backward(ctx, list(dys), n[0], list(p[:g]), list(p[g:2 * g]),
                                                 list(p[2 * g:3 * g]), list(p[3 * g:4 * g]))
        return (dx, None, None, None, None, *d_ws, *d_bias, *d_as, *d_bs)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    backend: Optional[str] = None,
    recompute_shrink: bool = False,
) -> torch.Tensor:
    """Fused LoRA linear layer ``y = x W^T + b + s (x A^T) B^T`` (see :class:`LoraLinearFunction`).

    Args:
        x: (..., K) float32/float16/bfloat16 (float64 on the torch backend).
        weight: (N, K); bias: (N,) or None; lora_A: (r, K), r >= 1; lora_B: (N, r). All of x's dtype
            and device.
        scaling: the LoRA scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        backend: "triton", "torch" or None (first usable of :data:`PRIORITY`; env GELORA_LORA_BACKEND).
        recompute_shrink: drop ``S`` after forward and recompute it in backward.

    Returns:
        (..., N) tensor of x's dtype.

    Raises:
        ValueError / TypeError: mismatched shapes, rank 0, mismatched dtypes or devices.
        BackendUnavailable: a forced backend cannot run here.
    """
    _check_group(x, [weight], [bias], [lora_A], [lora_B], [scaling])
    ops = select_lora_backend(x, backend)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), ops,
                                    bool(recompute_shrink))


def lora_grouped_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    *,
    backend: Optional[str] = None,
    recompute_shrink: bool = False,
) -> List[torch.Tensor]:
    """G LoRA projections of one input in one grouped launch (see :class:`LoraGroupedLinearFunction`).

    Args:
        x: (..., K). weights: G tensors (N_g, K); biases: G tensors (N_g,) or None; lora_As: G tensors
            (r_g, K); lora_Bs: G tensors (N_g, r_g); scalings: G floats. Ranks and widths may all differ.

    Returns:
        G tensors (..., N_g) of x's dtype.
    """
    weights, biases, lora_As, lora_Bs, scalings = (list(v) for v in (weights, biases, lora_As, lora_Bs,
                                                                      scalings))
    _check_group(x, weights, biases, lora_As, lora_Bs, scalings)
    ops = select_lora_backend(x, backend)
    g = len(weights)
    return list(LoraGroupedLinearFunction.apply(x, g, tuple(float(s) for s in scalings), ops,
                                                bool(recompute_shrink),
                                                *weights, *biases, *lora_As, *lora_Bs))


# ---------------------------------------------------------------------------------------------------
# PEFT bridge
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoraFuseConfig:
    """Options of :func:`fuse_lora` (validated on construction).

    Attributes:
        adapter_name: adapter to fuse; None: each module's first active adapter.
        backend: "triton", "torch" or None (automatic per call, see :func:`select_lora_backend`).
        recompute_shrink: recompute ``S = s x A^T`` in backward instead of keeping it.
        group_siblings: run sibling projections that read the same input (``sibling_names``, same
            parent module) as one grouped launch. The first sibling called computes all of them and the
            others pick their output up; if a sibling is ever called with a different input (say
            cross-attention), grouping switches itself off for that group. Off by default: with
            non-reentrant activation checkpointing that stops recomputation early, it can change the
            set of saved tensors between forward and recomputation.
        sibling_names: tuples of child names that form a group.
    """

    adapter_name: Optional[str] = None
    backend: Optional[str] = None
    recompute_shrink: bool = False
    group_siblings: bool = False
    sibling_names: Tuple[Tuple[str, ...], ...] = DEFAULT_SIBLING_NAMES

    def __post_init__(self) -> None:
        if self.backend is not None:
            LORA_BACKENDS.get(self.backend)  # ValueError naming the known ones
        if self.adapter_name is not None and not isinstance(self.adapter_name, str):
            raise TypeError(f"adapter_name must be a string or None, got {type(self.adapter_name).__name__}")
        names = tuple(tuple(group) for group in self.sibling_names)
        for group in names:
            if len(group) < 2 or not all(isinstance(n, str) and n for n in group):
                raise ValueError(f"each sibling group needs two or more names, got {group!r}")
        self.sibling_names = names
        self.recompute_shrink = bool(self.recompute_shrink)
        self.group_siblings = bool(self.group_siblings)


@dataclass
class LoraFuseReport:
    """What :func:`fuse_lora` did: ``fused`` module names, ``skipped`` {name: reason}, ``groups`` of
    sibling names sharing a launch, ``notes`` {name: remark} (e.g. dropout falls back in training)."""

    fused: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    groups: List[Tuple[str, ...]] = field(default_factory=list)
    notes: Dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _FusedState:
    adapter: str
    config: LoraFuseConfig
    group: Optional["_SiblingGroup"] = None


class _SiblingGroup:
    """Projections of one parent that read the same input: the first one called runs the grouped
    launch for every member that can fuse on that input and parks the others' outputs, which they
    take when called with the very same tensor (same object, same version, same grad mode)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members = list(members)
        self.enabled = True
        self._pending = None  # (x, version, grad_enabled, {member: output})

    def run(self, member: nn.Module, x: torch.Tensor, dt: torch.dtype) -> Optional[torch.Tensor]:
        pending = self._pending
        if pending is not None:
            px, version, grad_mode, outs = pending
            if px is x and x._version == version and grad_mode == torch.is_grad_enabled() and member in outs:
                out = outs.pop(member)
                if not outs:
                    self._pending = None
                return out
            # somebody's output was never picked up: these siblings do not read one input in turn
            self._pending = None
            self.enabled = False
            log.info("gelora: sibling projections %s do not share one input; grouping switched off",
                     [type(m).__name__ for m in self.members])
            return None
        members = [member] + [m for m in self.members if m is not member and m._gelora_dtype(x) == dt]
        if len(members) < 2:
            return None
        ys = _run_fused(members, x, dt, single=False)
        self._pending = (x, x._version, torch.is_grad_enabled(), dict(zip(members[1:], ys[1:])))
        return ys[0]


def _compute_dtype(module: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """dtype the base GEMM of ``module`` would run in on ``x`` (autocast's, else x's); None when PEFT's
    own forward must handle the call (x and the base weight disagree without autocast)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return dt if dt in _FLOAT_DTYPES else None
    if x.dtype != module.get_base_layer().weight.dtype:
        return None
    return x.dtype


def _layer_tensors(module, adapter, dt):
    base = module.get_base_layer()
    w = base.weight.to(dt)
    b = None if base.bias is None else base.bias.to(dt)
    a = module.lora_A[adapter].weight.to(dt)
    bb = module.lora_B[adapter].weight.to(dt)
    return w, b, a, bb, float(module.scaling[adapter])


def _other_adapters(module, x, y):
    """Add the active adapters other than the fused one, exactly as PEFT's forward does."""
    st: _FusedState = module._gelora_state
    out_dtype = y.dtype
    for name in module.active_adapters:
        if name == st.adapter or name not in module.lora_A.keys():
            continue
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        cast = getattr(module, "_cast_input_dtype", None)  # PEFT >= 0.14 (honours its opt-out)
        xa = cast(x, lora_A.weight.dtype) if cast is not None else x.to(lora_A.weight.dtype)
        y = y + lora_B(lora_A(module.lora_dropout[name](xa))) * module.scaling[name]
    return y.to(out_dtype)


def _run_fused(modules, x, dt, single: bool):
    st: _FusedState = modules[0]._gelora_state
    cfg = st.config
    ops_name = cfg.backend
    xc = x.to(dt)
    tensors = [_layer_tensors(m, m._gelora_state.adapter, dt) for m in modules]
    autocast_on = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast_on else _nullcontext():
        if single:
            w, b, a, bb, s = tensors[0]
            ys = [lora_linear(xc, w, b, a, bb, s, backend=ops_name, recompute_shrink=cfg.recompute_shrink)]
        else:
            ws, bs, a_s, b_s, ss = (list(v) for v in zip(*tensors))
            ys = lora_grouped_linear(xc, ws, bs, a_s, b_s, ss, backend=ops_name,
                                     recompute_shrink=cfg.recompute_shrink)
    return [_other_adapters(m, x, y) for m, y in zip(modules, ys)]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
    """The compute dtype when this call can take the fused path, else None (PEFT's forward runs).
    Checked on every call; cheap attribute tests."""
    st: Optional[_FusedState] = self.__dict__.get("_gelora_state")
    if st is None or self.disable_adapters or self.merged:
        return None
    adapter = st.adapter
    active = self.active_adapters
    if adapter not in active or adapter not in self.lora_A.keys():
        return None
    for name in active:  # other active adapters are added eagerly, unless they are a LoRA variant
        if _is_variant(self, name):
            return None
    drop = self.lora_dropout[adapter]
    if not isinstance(drop, nn.Identity) and not (isinstance(drop, nn.Dropout) and
                                                   (drop.p == 0 or not drop.training)):
        return None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return None
    if x.shape[-1] != self.in_features:
        return None
    # a forced backend that cannot run is not a reason to fall back: lora_linear raises its reasons
    return _compute_dtype(self, x)


@functools.lru_cache(maxsize=1)
def _fused_class():
    """``FusedLoraLinear``: PEFT's LoRA ``Linear`` with the fused forward (created on first use so that
    ``import gelora`` does not import PEFT)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class FusedLoraLinear(PeftLoraLinear):
        """PEFT LoRA ``Linear`` running its fused adapter through :func:`lora_linear`.

        Never constructed directly: :func:`fuse_lora` switches the class of an existing PEFT module
        (parameters, buffers, hooks and state-dict keys stay as they are) and :func:`unfuse_lora`
        switches it back. Calls the fused path cannot serve (adapter disabled or merged, fused adapter
        not active, dropout in training, extra arguments, input and base weight of different dtypes
        without autocast) run PEFT's forward.

        Dtypes: the fused adapter computes in the base layer's dtype (autocast's under autocast); an
        adapter kept in fp32 next to a bf16 base (PEFT's ``autocast_adapter_dtype``) is cast to bf16 for
        the fused GEMM, its gradients arrive in fp32. PEFT instead upcasts the input to fp32 for the
        LoRA branch, a full (M, K) fp32 copy; results agree within bf16 rounding.
        """

        _gelora_dtype = _fused_dtype

        def forward(self, x, *args, **kwargs):
            dt = None if (args or kwargs) else self._gelora_dtype(x)
            if dt is None:
                return super().forward(x, *args, **kwargs)
            group = self._gelora_state.group
            if group is not None and group.enabled:
                y = group.run(self, x, dt)
                if y is not None:
                    return y
            return _run_fused([self], x, dt, single=True)[0]

        def __repr__(self) -> str:
            return "gelora.fused_" + super().__repr__()

    FusedLoraLinear.__module__ = __name__
    FusedLoraLinear.__qualname__ = "FusedLoraLinear"
    return FusedLoraLinear


def __getattr__(name):  # PEP 562: gelora.lora.FusedLoraLinear (pickle finds the class here)
    if name == "FusedLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_variant(module, adapter: str) -> bool:
    """DoRA and the other variants (``lora_variant`` since PEFT 0.15, ``use_dora`` before)."""
    return adapter in getattr(module, "lora_variant", {}) or bool(getattr(module, "use_dora", {}).get(adapter))


def _skip_reason(module, adapter: Optional[str]) -> Optional[str]:
    if adapter is None:
        return "no active adapter"
    if adapter not in module.lora_A.keys():
        return f"no adapter named {adapter!r} (has {sorted(module.lora_A.keys())})"
    if _is_variant(module, adapter):
        kind = type(getattr(module, "lora_variant", {}).get(adapter, "DoRA")).__name__
        return f"adapter {adapter!r} is a LoRA variant ({kind}); not fused"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True is not fused"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D base layer) is not fused"
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not torch.nn.Linear"
    return None


def fuse_lora(model: nn.Module, *, adapter_name: Optional[str] = None, backend: Optional[str] = None,
              recompute_shrink: bool = False, group_siblings: bool = False,
              sibling_names: Sequence[Sequence[str]] = DEFAULT_SIBLING_NAMES) -> LoraFuseReport:
    """Switch PEFT's LoRA ``Linear`` modules of ``model`` to the fused forward, in place.

    Each module keeps its parameters (``lora_A``/``lora_B`` weights are the same tensors, so
    optimizers, ``save_pretrained``, ``merge_and_unload`` and adapter switching keep working) and
    reads its rank, scale (``rank_pattern``, ``alpha_pattern`` and rsLoRA are already folded into
    PEFT's ``r``/``scaling``) and active adapters on every call. Only the fused adapter takes the fused
    path; other active adapters are added eagerly, and a call where it is not active runs PEFT's
    forward. Undo with :func:`unfuse_lora`.

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers).
        adapter_name, backend, recompute_shrink, group_siblings, sibling_names: see
            :class:`LoraFuseConfig`.

    Returns:
        A :class:`LoraFuseReport`. Modules already fused are reported as skipped.
    """
    cfg = LoraFuseConfig(adapter_name=adapter_name, backend=backend, recompute_shrink=recompute_shrink,
                         group_siblings=group_siblings,
                         sibling_names=tuple(tuple(g) for g in sibling_names))
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.layer import LoraLayer

    fused_cls = _fused_class()
    report = LoraFuseReport()
    fused_modules: Dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if type(mod) is fused_cls:
            report.skipped[name] = "already fused (unfuse_lora first to change options)"
            continue
        if type(mod) is not PeftLoraLinear:
            if isinstance(mod, LoraLayer):
                report.skipped[name] = f"{type(mod).__name__} is not a plain PEFT LoRA Linear"
            continue
        active = list(mod.active_adapters)
        adapter = cfg.adapter_name if cfg.adapter_name is not None else (active[0] if active else None)
        reason = _skip_reason(mod, adapter)
        if reason is not None:
            report.skipped[name] = reason
            continue
        drop = mod.lora_dropout[adapter]
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            report.notes[name] = (f"lora_dropout={drop.p}: training calls run PEFT's eager path "
                                  "(dropout is not fused); eval calls are fused")
        mod.__class__ = fused_cls
        mod._gelora_state = _FusedState(adapter=adapter, config=cfg)
        fused_modules[name] = mod
        report.fused.append(name)
    if cfg.group_siblings:
        report.groups = _make_groups(fused_modules, cfg.sibling_names)
    return report


def _make_groups(fused: Dict[str, nn.Module], sibling_names) -> List[Tuple[str, ...]]:
    by_parent: Dict[str, Dict[str, str]] = {}
    for name in fused:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = name
    groups = []
    for parent, children in by_parent.items():
        for names in sibling_names:
            full = [children[c] for c in names if c in children]
            if len(full) < 2:
                continue
            mods = [fused[f] for f in full]
            w0 = mods[0].get_base_layer().weight
            same = all(m.in_features == mods[0].in_features
                       and m.get_base_layer().weight.dtype == w0.dtype
                       and m.get_base_layer().weight.device == w0.device for m in mods)
            if not same:
                continue
            grp = _SiblingGroup(mods)
            for m in mods:
                m._gelora_state.group = grp
            groups.append(tuple(full))
    return groups


def unfuse_lora(model: nn.Module) -> List[str]:
    """Undo :func:`fuse_lora`: every fused module becomes PEFT's LoRA ``Linear`` again (same
    parameters). Returns the names of the modules switched back."""
    fused_cls = _fused_class()
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    names = []
    for name, mod in model.named_modules():
        if type(mod) is fused_cls:
            mod.__class__ = PeftLoraLinear
            mod.__dict__.pop("_gelora_state", None)
            names.append(name)
    return names
