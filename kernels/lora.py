"""Fused variable-rank LoRA linear layers: Triton kernels, their launchers and the plain reference.

A LoRA linear layer computes ``y = x W^T + b + s (x A^T) B^T`` with a frozen ``W`` (N, K), a trainable
``A`` (r, K) and ``B`` (N, r) and a scalar ``s``. Run eagerly (PEFT) that is five kernels and three
(M, N) temporaries: the base GEMM, ``x A^T``, ``(.) B^T``, ``* s`` and ``+``. Here it is two kernels,
following the LoRAFusion split (Zhu et al., 2025, arXiv:2510.00206):

1. shrink, :func:`lora_shrink`: ``S = s * (x A^T)``, an (M, r) result, ``r`` a runtime value masked to a
   ``BLOCK_R`` block (any ``r >= 1``, not only powers of two). The scale is folded in here, so
   ``dB = dY^T S`` needs no extra pass;
2. fused GEMM, :func:`lora_fused_forward`: one tiled GEMM over ``x W^T`` whose fp32 tile accumulator
   also takes ``S B^T`` (and the bias) before the single store, so the LoRA term never makes its own
   pass over ``y``.

The input-gradient is the same pattern turned around, :func:`lora_fused_dx`:
``dX = dY W + T A`` with ``T = s dY B`` (a shrink of ``dY`` against ``B``). ``dA = T^T x`` and
``dB = dY^T S`` are skinny GEMMs with a long reduction over tokens; the autograd function in
:mod:`gelora.lora` leaves them to cuBLAS, which splits that reduction well.

Grouped launches: projections that read the same input with different ranks and widths (q, k, v of
an attention block; gate and up of an MLP) run as one launch of each kernel. Their ``A`` matrices are
concatenated into one (R_total, K) matrix, so the shrink is a single GEMM; the fused GEMM and the
dX kernel read per-projection ``W``, ``B``, bias and output addresses, widths ``N_g``, ranks ``r_g`` and
rank offsets from small tables (grid axis 1 is the projection).

When fusing stops paying off: the saving is the LoRA passes over (M, N) and (M, K) activations
(memory traffic), not flops. It shrinks as ``K`` and ``N`` grow (the base GEMM dominates) and when the
Triton GEMM is slower than the vendor GEMM for a shape (small or skinny ``M``: at a few hundred tokens
the win is launch count, not bandwidth). For ``r`` approaching ``min(N, K) / 4`` the LoRA flops
themselves matter and merging ``W + s B A`` is the better plan.

:func:`lora_linear_reference` is the plain torch formula the tests and benchmarks compare against.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence

import torch

from .. import _env

try:  # Triton is optional: the reference and the launchers' checks import without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - a broken or absent Triton means "no Triton backend"
    triton = None
    tl = None
    HAS_TRITON = False

#: True when the kernels were built by the Triton interpreter (``TRITON_INTERPRET=1`` before import):
#: they then run on CPU tensors, one program at a time, with a single small tile configuration.
INTERPRET = _env.triton_interpret()

#: Largest rank block of one ``tl.dot`` step; larger ranks loop over blocks of this size.
MAX_BLOCK_R = 64

#: ``GELORA_LORA_TUNE=0`` keeps only the first (fitting) tile configuration of each kernel: no autotuning,
#: for quick correctness runs on a GPU. Read when this module is imported.
TUNE = _env.flag("GELORA_LORA_TUNE", True)
#: ``GELORA_LORA_TUNE_MAX=N`` tunes over at most the first N (fitting) configurations of each kernel: a
#: short tuning pass (``benchmarks/gpu_check.sh`` uses 3: about 20 compilations for three ranks instead of
#: ~70). Unset or 0: no limit. Read when this module is imported.
TUNE_MAX = _env.integer("GELORA_LORA_TUNE_MAX", 0, minimum=0)

#: Shared-memory budget of one program when pruning configurations before compiling them (bytes):
#: Hopper allows 227 KiB per block, Ampere 163 KiB; a configuration that still does not fit is
#: rejected by the autotuner at launch. Pruning early saves compiling it (6-20 s each for fp32 tiles).
SMEM_BUDGET = 200 * 1024


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------
def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Plain, unfused LoRA linear layer: ``y = x W^T + b + s (x A^T) B^T`` (PEFT's eager formula).

    Args:
        x: (..., K) input.
        weight: (N, K) base weight ``W``; bias: (N,) or None.
        lora_A: (r, K); lora_B: (N, r); scaling: the scalar ``s``.
        dtype: compute dtype (``torch.float64`` for an accuracy reference); default: ``x.dtype``.

    Returns:
        (..., N) tensor of ``dtype`` (or ``x.dtype``); differentiable with respect to every input.
    """
    if dtype is not None:
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = None if bias is None else bias.to(dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B)
    return base + lora * scaling


def lora_grouped_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dtype: Optional[torch.dtype] = None,
) -> List[torch.Tensor]:
    """:func:`lora_linear_reference` for G projections of the same input; returns G tensors (..., N_g)."""
    return [
        lora_linear_reference(x, w, b, a, bb, s, dtype)
        for w, b, a, bb, s in zip(weights, biases, lora_As, lora_Bs, scalings)
    ]


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
def _gemm_configs():
    """Tile configurations of the two fused GEMM kernels.

    Under the interpreter: one 16x16x16 tile (autotuning needs a GPU; tiny tiles exercise the masks).
    On CUDA: the bf16 set of the Triton matmul tutorial (03-matrix-multiplication, tuned there on
    A100/H100 for M, N, K of 1024-8192) plus the 256x128 / 128x256 eight-warp tiles that suit Hopper's
    wgmma, and smaller tiles for skinny outputs (k/v projections). Not yet measured on our side: the
    autotuner picks per (M, N, K, R, dtype) on first use, about 1-3 s of compilation per configuration
    for bf16 (measured offline for sm_90 with Triton 3.7's bundled ptxas), 10 s for fp32 IEEE tiles.
    The first three differ in tile size and warps (a short tuning pass, :data:`TUNE_MAX` = 3, still
    tries one of each kind); the first is the one used without tuning.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1,
                              num_stages=1)]
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        cfg({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ]


def _prune_gemm(configs, named_args, **kwargs):
    """Drop configurations whose pipelined tiles exceed :data:`SMEM_BUDGET`; without tuning keep one."""
    t = named_args.get("X", named_args.get("DY"))
    size = t.element_size() if hasattr(t, "element_size") else 2
    fit = [c for c in configs
           if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * size
           <= SMEM_BUDGET]
    fit = fit or configs[-1:]
    return _limit(fit)


def _prune_shrink(configs, named_args, **kwargs):
    return _limit(configs)


def _limit(configs):
    """The configurations to tune over: one without tuning, the first :data:`TUNE_MAX` with a limit."""
    if not TUNE:
        return configs[:1]
    return configs[:TUNE_MAX] if TUNE_MAX > 0 else configs


def _shrink_configs():
    """Tile configurations of the shrink kernel ``(M, K) x (K, R)``: memory-bound (it reads x once), so
    the row block is small enough to give every SM work at a few thousand tokens (2048 / 16 = 128
    programs for 132 SMs on an H100/H200) and the K block is long."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 16, "BLOCK_K": 256}, num_stages=3, num_warps=4),
        cfg({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 32, "BLOCK_K": 256}, num_stages=3, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=3, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_K": 128}, num_stages=4, num_warps=2),
    ]


if HAS_TRITON:

    @triton.jit
    def _mm_acc(acc, a_ptrs, b_ptrs, k_total, step_a, step_b, offs_k, EVEN: tl.constexpr,
                BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """``acc += A[:, 0:k_total] @ B[0:k_total, :]`` for one output tile.

        ``a_ptrs`` (BLOCK_M, BLOCK_K) and ``b_ptrs`` (BLOCK_K, BLOCK_N) address the first K block and
        advance by ``step_a`` / ``step_b`` elements per block; ``EVEN`` drops the K mask when
        ``k_total % BLOCK_K == 0``. Rows and columns are not masked (the callers wrap them modulo the
        extent and mask the store).
        """
        for kb in range(0, tl.cdiv(k_total, BLOCK_K)):
            if EVEN:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                rem = k_total - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < rem, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < rem, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += step_a
            b_ptrs += step_b
        return acc

    @triton.jit
    def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped ("super-tile") ordering of the Triton matmul tutorial: GROUP_M row blocks share
        their column blocks while they are in L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.autotune(configs=_shrink_configs(), key=["M", "K", "R"],
                     prune_configs_by={"early_config_prune": _prune_shrink})
    @triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    @triton.jit
    def _lora_shrink_kernel(
        X, A, SCALE, S,
        M, K, R,
        stride_xm, stride_ak, stride_ar, stride_sm,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """``S[m, j] = SCALE[j] * sum_k X[m, k] * A[j, k]``; X (M, K) row-major, ``A[j, k]`` at
        ``A + j*stride_ar + k*stride_ak`` (so ``A`` may be a transposed view), SCALE (R,) fp32,
        S (M, R) with row stride ``stride_sm`` (a column slice of a wider buffer is fine)."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        rm = offs_m % M
        rr = offs_r % R
        a_ptrs = X + rm[:, None] * stride_xm + offs_k[None, :]
        b_ptrs = A + offs_k[:, None] * stride_ak + rr[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc = _mm_acc(acc, a_ptrs, b_ptrs, K, BLOCK_K, BLOCK_K * stride_ak, offs_k, EVEN_K, BLOCK_K,
                      INPUT_PRECISION)
        acc = acc * tl.load(SCALE + rr)[None, :]
        s_ptrs = S + offs_m[:, None] * stride_sm + offs_r[None, :]
        tl.store(s_ptrs, acc.to(S.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))

    @triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R", "GROUPED"],
                     prune_configs_by={"early_config_prune": _prune_gemm})
    @triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
                        "N_ALIGNED": lambda a: a["N_GCD"] % 16 == 0})
    @triton.jit
    def _lora_fwd_kernel(
        X, W, BIAS, S, B, Y,
        W_TAB, BIAS_TAB, B_TAB, Y_TAB, N_TAB, R_TAB, ROFF_TAB,
        M, N, K, R, N_GCD,
        stride_xm, stride_sm,
        HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, N_ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """``Y = X W^T + BIAS + S[:, roff:roff+r] B^T`` in one tiled GEMM (fp32 accumulator).

        X (M, K) row-major; W (N, K), B (N, r), BIAS (N,) and Y (M, N) contiguous; S (M, R_total)
        row-major. With ``GROUPED`` grid axis 1 is the projection ``g`` and its ``W``/``B``/bias/``Y``
        addresses, ``N_g``, ``r_g`` and rank offset come from the tables; the scalar arguments ``W``,
        ``B``, ``BIAS``, ``Y``, ``N``, ``R`` then only give element types (and ``N`` the widest grid).
        """
        pid = tl.program_id(0)
        if GROUPED:
            g = tl.program_id(1)
            n = tl.load(N_TAB + g).to(tl.int32)
            if N_ALIGNED:
                n = tl.multiple_of(n, 16)
            r = tl.load(R_TAB + g).to(tl.int32)
            roff = tl.load(ROFF_TAB + g).to(tl.int32)
            # tables hold element offsets from the first projection's tensors, multiples of 16 (the
            # launcher checks): base pointer + offset keeps the alignment the compiler needs to
            # vectorize and pipeline the loads, which an integer cast to a pointer would lose
            w_ptr = W + tl.multiple_of(tl.load(W_TAB + g), 16)
            b_ptr = B + tl.multiple_of(tl.load(B_TAB + g), 16)
            y_ptr = Y + tl.multiple_of(tl.load(Y_TAB + g), 16)
            bias_ptr = BIAS + tl.multiple_of(tl.load(BIAS_TAB + g), 16)
        else:
            n = N
            r = R
            roff = 0
            w_ptr = W
            b_ptr = B
            y_ptr = Y
            bias_ptr = BIAS
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(n, BLOCK_N)
        if pid >= num_pid_m * num_pid_n:  # grid is sized for the widest projection
            return
        pid_m, pid_n = _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = offs_n % n
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # base: X (BLOCK_M, BLOCK_K) @ W^T (BLOCK_K, BLOCK_N)
        a_ptrs = X + rm[:, None] * stride_xm + offs_k[None, :]
        b_ptrs = w_ptr + rn[None, :] * K + offs_k[:, None]
        acc = _mm_acc(acc, a_ptrs, b_ptrs, K, BLOCK_K, BLOCK_K, offs_k, EVEN_K, BLOCK_K, INPUT_PRECISION)
        # LoRA: S (BLOCK_M, BLOCK_R) @ B^T (BLOCK_R, BLOCK_N) into the same accumulator
        offs_r = tl.arange(0, BLOCK_R)
        s_ptrs = S + rm[:, None] * stride_sm + roff + offs_r[None, :]
        bt_ptrs = b_ptr + rn[None, :] * r + offs_r[:, None]
        acc = _mm_acc(acc, s_ptrs, bt_ptrs, r, BLOCK_R, BLOCK_R, offs_r, False, BLOCK_R, INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * n + offs_n[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < n))

    @triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R", "GROUPED"],
                     prune_configs_by={"early_config_prune": _prune_gemm})
    @triton.heuristics({"EVEN_N": lambda a: a["N_GCD"] % a["BLOCK_K"] == 0,
                        "N_ALIGNED": lambda a: a["N_GCD"] % 16 == 0})
    @triton.jit
    def _lora_dx_kernel(
        DY, W, T, A, DX,
        DY_TAB, W_TAB, N_TAB,
        M, N, K, R, G, N_GCD,
        stride_dym, stride_tm,
        GROUPED: tl.constexpr, N_ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """``DX = sum_g DY_g W_g + T A`` in one tiled GEMM (fp32 accumulator); the output tile is
        (BLOCK_M, BLOCK_N) of DX (M, K) and the reduction runs over every projection's ``N_g``.

        DY_g (M, N_g) with row stride ``stride_dym`` (``N_g`` when GROUPED), W_g (N_g, K) contiguous,
        T (M, R) row-major with row stride ``stride_tm``, A (R, K) contiguous, DX (M, K) contiguous.
        ``N_GCD``: gcd of the ``N_g`` (drops the reduction mask when a multiple of BLOCK_K).
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_k = tl.cdiv(K, BLOCK_N)
        pid_m, pid_k = _tile_ids(pid, num_pid_m, num_pid_k, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_o = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        ro = offs_o % K
        offs_red = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GROUPED:
            for g in range(0, G):
                n = tl.load(N_TAB + g).to(tl.int32)
                if N_ALIGNED:
                    n = tl.multiple_of(n, 16)
                dy_ptr = DY + tl.multiple_of(tl.load(DY_TAB + g), 16)
                w_ptr = W + tl.multiple_of(tl.load(W_TAB + g), 16)
                a_ptrs = dy_ptr + rm[:, None] * n + offs_red[None, :]
                b_ptrs = w_ptr + offs_red[:, None] * K + ro[None, :]
                acc = _mm_acc(acc, a_ptrs, b_ptrs, n, BLOCK_K, BLOCK_K * K, offs_red, EVEN_N, BLOCK_K,
                              INPUT_PRECISION)
        else:
            a_ptrs = DY + rm[:, None] * stride_dym + offs_red[None, :]
            b_ptrs = W + offs_red[:, None] * K + ro[None, :]
            acc = _mm_acc(acc, a_ptrs, b_ptrs, N, BLOCK_K, BLOCK_K * K, offs_red, EVEN_N, BLOCK_K,
                          INPUT_PRECISION)
        offs_r = tl.arange(0, BLOCK_R)
        t_ptrs = T + rm[:, None] * stride_tm + offs_r[None, :]
        at_ptrs = A + offs_r[:, None] * K + ro[None, :]
        acc = _mm_acc(acc, t_ptrs, at_ptrs, R, BLOCK_R, BLOCK_R * K, offs_r, False, BLOCK_R,
                      INPUT_PRECISION)
        dx_ptrs = DX + offs_m[:, None] * K + offs_o[None, :]
        tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_o[None, :] < K))


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; the fused LoRA kernels need it (pip install triton)")


def block_r(r: int) -> int:
    """Rank block of the kernels: the next power of two of ``r``, at least 16 (``tl.dot``'s smallest
    operand) and at most :data:`MAX_BLOCK_R` (larger ranks loop); 16 under the interpreter so that small
    test ranks already take several rank blocks."""
    if INTERPRET:
        return 16
    return min(MAX_BLOCK_R, max(16, 1 << (max(1, r) - 1).bit_length()))


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: IEEE fp32 products for float32 unless torch itself allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), so the fused path rounds like ``torch.matmul``."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(device, *columns) -> List[torch.Tensor]:
    """Device tables of the grouped kernels, built with one host-to-device copy.

    A column of ints stays as is. A column of G tensors becomes their offsets in elements from the
    first one (the kernel adds them to the first tensor's pointer); each offset must be a multiple of
    16 elements (the kernels tell the compiler so), which separate allocations always are (the CUDA
    caching allocator aligns blocks to 512 bytes). Returns the columns' tables, each an int64 (G,) view.
    """
    rows = []
    for col in columns:
        if isinstance(col[0], torch.Tensor):
            base, size = col[0].data_ptr(), col[0].element_size()
            offs = []
            for t in col:
                delta = t.data_ptr() - base
                if delta % (16 * size):
                    raise ValueError("grouped LoRA kernels need 16-element aligned tensors; got a view at "
                                     f"offset {delta} bytes (pass .clone())")
                offs.append(delta // size)
            rows.append(offs)
        else:
            rows.append([int(v) for v in col])
    # pinned + non_blocking: a copy from pageable memory would synchronise the stream on every call
    pinned = torch.device(device).type == "cuda"
    flat = torch.tensor([v for row in rows for v in row], dtype=torch.int64, pin_memory=pinned)
    flat = flat.to(device, non_blocking=pinned)
    return list(flat.view(len(rows), -1).unbind(0))


def _aligned(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors themselves when each starts 16 elements past a multiple of the first one's address
    (always true for separate allocations), else copies (fresh allocations are aligned)."""
    ts = list(ts)
    out = [ts[0] if ts[0].data_ptr() % 32 == 0 else ts[0].clone()]
    base, size = out[0].data_ptr(), out[0].element_size()
    for t in ts[1:]:
        out.append(t if (t.data_ptr() - base) % (16 * size) == 0 else t.clone())
    return out


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    scale: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    a_transposed: bool = False,
) -> torch.Tensor:
    """``out = scale * (x @ a^T)`` (or ``scale * (x @ a)`` with ``a_transposed``) with one Triton launch.

    Args:
        x: (M, K) float32/float16/bfloat16, rows contiguous (``stride(1) == 1``).
        a: (R, K) contiguous, the concatenated ``A`` of a group; with ``a_transposed`` a (K, R)
            contiguous matrix instead (``B`` of a layer, for ``T = s dY B``).
        scale: (R,) float32 per-column scale (``s_g`` repeated ``r_g`` times).
        out: optional (M, R) destination with ``stride(1) == 1`` (a column slice of a wider buffer is
            fine); default a new (M, R) tensor of ``x.dtype``.

    Returns:
        ``out``: (M, R) of ``x.dtype``, fp32-accumulated and rounded once.
    """
    _require_triton()
    x = _row_major(x)
    m, k = x.shape
    if a_transposed:
        r = a.shape[1]
        stride_ak, stride_ar = a.stride(0), a.stride(1)
    else:
        r = a.shape[0]
        stride_ar, stride_ak = a.stride(0), a.stride(1)
    if out is None:
        out = torch.empty((m, r), dtype=x.dtype, device=x.device)
    br = block_r(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, br))  # noqa: E731
    _lora_shrink_kernel[grid](
        x, a, scale, out, m, k, r, x.stride(0), stride_ak, stride_ar, out.stride(0),
        BLOCK_R=br, INPUT_PRECISION=input_precision(x.dtype),
    )
    return out


def lora_fused_forward(
    x: torch.Tensor,
    s_cat: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    lora_Bs: Sequence[torch.Tensor],
    ranks: Sequence[int],
    offsets: Sequence[int],
) -> List[torch.Tensor]:
    """``y_g = x W_g^T + b_g + S[:, off_g:off_g+r_g] B_g^T`` for every projection g, one launch.

    Args:
        x: (M, K) rows contiguous; s_cat: (M, R_total) rows contiguous, the scaled shrink of x.
        weights: G tensors (N_g, K) contiguous; biases: G tensors (N_g,) or None; lora_Bs: G tensors
            (N_g, r_g) contiguous; ranks: the r_g; offsets: start column of each r_g block in s_cat.
            All of ``x.dtype``.

    Returns:
        G new contiguous tensors (M, N_g) of ``x.dtype``.
    """
    _require_triton()
    x = _row_major(x)
    m, k = x.shape
    g_count = len(weights)
    ys = [torch.empty((m, w.shape[0]), dtype=x.dtype, device=x.device) for w in weights]
    has_bias = any(b is not None for b in biases)
    r_total = s_cat.shape[1]
    br = block_r(max(ranks))
    prec = input_precision(x.dtype)
    if g_count == 1:
        w, b, bb, y = weights[0], biases[0], lora_Bs[0], ys[0]
        n = w.shape[0]
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)  # noqa: E731
        _lora_fwd_kernel[grid](
            x, w, b if b is not None else w, s_cat, bb, y,
            x, x, x, x, x, x, x,  # tables: unused
            m, n, k, ranks[0], n, x.stride(0), s_cat.stride(0),
            HAS_BIAS=b is not None, GROUPED=False, BLOCK_R=br, INPUT_PRECISION=prec,
        )
        return ys
    dev = x.device
    if has_bias:  # projections without a bias read zeros, so one HAS_BIAS variant serves the group
        biases = [b if b is not None else torch.zeros(w.shape[0], dtype=x.dtype, device=dev)
                  for w, b in zip(weights, biases)]
    else:
        biases = list(weights)  # never read (HAS_BIAS=False); any valid address will do
    ns = [w.shape[0] for w in weights]
    weights, biases, lora_Bs = (_aligned(ts) for ts in (weights, biases, lora_Bs))
    w_tab, bias_tab, b_tab, y_tab, n_tab, r_tab, off_tab = _tables(
        dev, weights, biases, lora_Bs, ys, ns, ranks, offsets)
    n_max = max(ns)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_max, meta["BLOCK_N"]), g_count)  # noqa: E731
    _lora_fwd_kernel[grid](
        x, weights[0], biases[0], s_cat, lora_Bs[0], ys[0],
        w_tab, bias_tab, b_tab, y_tab, n_tab, r_tab, off_tab,
        m, n_max, k, r_total, functools.reduce(math.gcd, ns), x.stride(0), s_cat.stride(0),
        HAS_BIAS=has_bias, GROUPED=True, BLOCK_R=br, INPUT_PRECISION=prec,
    )
    return ys


def lora_fused_dx(
    dys: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    t_cat: torch.Tensor,
    a_cat: torch.Tensor,
) -> torch.Tensor:
    """``dX = sum_g dY_g W_g + T A`` in one launch.

    Args:
        dys: G tensors (M, N_g) contiguous (the output gradients); weights: G tensors (N_g, K)
            contiguous; t_cat: (M, R_total) rows contiguous, ``T = [s_g dY_g B_g]_g``; a_cat:
            (R_total, K) contiguous, ``[A_g]_g``. All of one dtype.

    Returns:
        dX: new (M, K) contiguous tensor of that dtype.
    """
    _require_triton()
    m = dys[0].shape[0]
    k = weights[0].shape[1]
    r_total = t_cat.shape[1]
    dx = torch.empty((m, k), dtype=dys[0].dtype, device=dys[0].device)
    br = block_r(r_total)
    prec = input_precision(dys[0].dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    ns = [w.shape[0] for w in weights]
    if len(dys) == 1:
        dy = _row_major(dys[0])
        _lora_dx_kernel[grid](
            dy, weights[0], t_cat, a_cat, dx,
            dy, dy, dy,  # tables: unused
            m, ns[0], k, r_total, 1, ns[0], dy.stride(0), t_cat.stride(0),
            GROUPED=False, BLOCK_R=br, INPUT_PRECISION=prec,
        )
        return dx
    dys = _aligned([d.contiguous() for d in dys])
    weights = _aligned(weights)
    dy_tab, w_tab, n_tab = _tables(dx.device, dys, weights, ns)
    _lora_dx_kernel[grid](
        dys[0], weights[0], t_cat, a_cat, dx,
        dy_tab, w_tab, n_tab,
        m, max(ns), k, r_total, len(dys), functools.reduce(math.gcd, ns), 0, t_cat.stride(0),
        GROUPED=True, BLOCK_R=br, INPUT_PRECISION=prec,
    )
    return dx
