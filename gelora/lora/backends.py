"""Fused-LoRA backends, declared, checked, explainable: the Triton kernels on CUDA, torch on the CPU
(merged weights and the C++ one-pass weight gradients), one :class:`gelora._registry.Registry`."""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from .. import _env
from .._registry import Registry
from ..neighbours.inputs import cpu_core
from ..kernels import lora as _klora  # gelora/kernels links to the top-level kernels/ folder

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

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
