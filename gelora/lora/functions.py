"""The fused variable-rank LoRA op: input checks, the forward and backward equations, the autograd
Functions beside their launchers (:func:`lora_linear`, :func:`lora_grouped_linear`).

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

import math
from typing import List, Optional, Sequence

import torch

from .backends import _FLOAT_DTYPES, LoraBackend, TorchLoraBackend, select_lora_backend


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
