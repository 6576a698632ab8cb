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
from .backends import (LORA_BACKENDS, PRIORITY, TorchLoraBackend, TritonLoraBackend,  # noqa: F401
                       describe_lora_backends, select_lora_backend)
from .config import DEFAULT_SIBLING_NAMES, LoraFuseConfig, LoraFuseReport
from .functions import LoraGroupedLinearFunction, LoraLinearFunction, lora_grouped_linear, lora_linear
from .inject import fuse_lora, unfuse_lora
from ..kernels.lora import lora_grouped_reference, lora_linear_reference

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


def __getattr__(name):  # PEP 562: gelora.lora.FusedLoraLinear, the class fuse_lora puts into a model
    if name == "FusedLoraLinear":
        from .inject import _fused_class

        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
