"""Fused distance tiles + running top-k: the k nearest rows of a point set (or of a second set).

What is fused
-------------
One program owns a pair (I, J) of *super-blocks* (``super_rows`` consecutive rows each) and sweeps
its ``BLOCK_M x BLOCK_N`` tiles. For every tile it accumulates ``<a_r, b_c>`` over D with ``tl.dot``
(fp16/bf16 operands with fp32 accumulation, or fp32 operands in tf32/ieee), forms
``|a_r|^2 + |b_c|^2 - 2 <a_r, b_c>``, drops the point itself (by global index, so duplicates stay
neighbours at distance 0) and folds the tile into a running top-``KC`` list per row kept in registers.
With ``SYMMETRIC`` the same tile also feeds the lists of its columns, so a self-search computes each
unordered pair once (the triangle ``I < J``): half the arithmetic of a query/database search. Nothing
of size N x N is ever written: each program leaves ``KC`` candidates per row (and per column) in its
own slot of a ``(rows, n_slots, KC)`` buffer, and :func:`knn_top2` merges the slots.

A self-search runs in two launches: the diagonal pairs ``(I, I)`` first (rows only), whose ``KC``-th
distance is an upper bound ``tau`` on every row's final ``KC``-th distance, then the off-diagonal
pairs, which only extract tile entries below ``min(tau, running KC-th)``.

Selection works on int32 keys: the bits of ``max(d, 0)`` (monotone for non-negative floats) with the
lowest ``log2(max(BLOCK_M, BLOCK_N))`` bits replaced by the entry's position in the tile. One plain
min-reduction per round then yields the value and its column together, keys are unique within a row
(ties need no special case), and no index tensor has to be kept next to the tile (registers: the
symmetric 128 x 128 variant fits in 248 registers without spilling on sm_90a). The price is a
truncation of each value by at most ``2**-15`` relative, which the backend's error bound includes;
the returned values are the truncated ones. The number of rounds per tile is the largest number of
entries any row (column) of the tile has below its threshold, usually 0 to 2.

When fusing stops paying off
----------------------------
The epilogue costs a handful of CUDA-core operations per tile entry against ``2 D`` tensor-core
flops: below D of about 128 the kernel is bound by the top-k bookkeeping, not by the products, and
large ``KC`` (> 16) adds rounds on the first tiles of every pair. Neither matters for TwoNN on hidden
states (D = 768 ... 8192, KC = 4).

Large ``KC`` (up to :data:`MAX_KC` = 128: the 64 neighbours of GRIDE plus the pipeline's extra
candidates) keeps its lists in registers too, ``(BLOCK_M, KCP)`` keys and indices per program plus the
column lists of a symmetric tile: from ``KCP = 32`` on the launcher takes narrower tiles
(:data:`LARGE_KC_CONFIGS`), which ptxas compiles for sm_90a without spills up to ``KCP = 64`` and
with ~750-790 bytes of spills per thread at ``KCP = 128`` (the fewest of the shapes tried; correct
either way, and the rounds per tile stay bounded by ``KC``). Not yet timed on a GPU.

Column lists of a symmetric program are read, updated and written back through global memory (they
stay in L2) once per tile; a block barrier after the write orders them for the next row block, and
the reads bypass L1 (``.cg``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _env

__all__ = ["MAX_KC", "TileConfig", "knn_top2", "default_config", "interpreting", "tune_config"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return _env.triton_interpret()


# ---------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _knn_top2_kernel(
    A, B,                      # (rows_pad, D_PAD) operands, row-major, same dtype
    SQ_A, SQ_B,                # (M_A,), (M_B,) float32 squared norms of the operand rows
    TAU_A, TAU_B,              # (M_A,), (M_B,) float32 upper bounds of the final KC-th value
    ROW_D, ROW_I,              # (M_A, n_slots_b, KC) float32 / int32: candidates of A rows
    COL_D, COL_I,              # (M_B, n_slots_a, KC) float32 / int32: candidates of B rows
    PAIRS,                     # (n_programs, 2) int32 super-block pairs (I, J)
    M_A, M_B,                  # valid rows of A and B
    A_OFF, B_OFF,              # global index of row 0 of A / B (self exclusion)
    SUPER,                     # rows per super-block (multiple of BLOCK_M and BLOCK_N)
    D_PAD,                     # columns of the operands (multiple of BLOCK_K)
    stride_a, stride_b,        # row strides of A and B (elements)
    stride_rd, stride_cd,      # row strides of the candidate buffers (elements: n_slots * KC)
    KC: tl.constexpr,          # candidates per row
    KCP: tl.constexpr,         # KC rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOW_BITS: tl.constexpr,    # log2(max(BLOCK_M, BLOCK_N)): key bits that hold the tile position
    SYMMETRIC: tl.constexpr,   # also update the lists of the B rows (columns)
    HAS_TAU: tl.constexpr,
    PRECISION: tl.constexpr,   # input_precision of tl.dot for float32 operands ("ieee" / "tf32")
):
    # Selection runs on int32 keys: the bits of max(d, 0) (monotone for non-negative floats) with
    # the LOW_BITS lowest bits replaced by the position in the tile, so one min-reduction yields the
    # value and its column, and keys are unique within a row (no tie handling). The value loses
    # LOW_BITS of its 24-bit mantissa (relative 2**(LOW_BITS - 23); the error bound counts it).
    LOW_MASK = (1 << LOW_BITS) - 1
    SENT = 0x7FFFFFFF                        # empty slot / excluded entry: above every real key
    LIMIT = 0x7F800000 | LOW_MASK            # largest real key (value +inf)
    INF = float("inf")

    pid = tl.program_id(0).to(tl.int64)
    sb_i = tl.load(PAIRS + 2 * pid).to(tl.int64)
    sb_j = tl.load(PAIRS + 2 * pid + 1).to(tl.int64)
    a_lo = sb_i * SUPER
    a_hi = tl.minimum(a_lo + SUPER, M_A)
    b_lo = sb_j * SUPER
    b_hi = tl.minimum(b_lo + SUPER, M_B)

    kk = tl.arange(0, KCP)
    rn = tl.arange(0, BLOCK_M)
    cn = tl.arange(0, BLOCK_N)
    kr = tl.arange(0, BLOCK_K)

    for i0 in range(a_lo, a_hi, BLOCK_M):
        rows = i0 + rn                                   # int64
        rvalid = rows < a_hi
        sqa = tl.load(SQ_A + rows, mask=rvalid, other=0.0)
        if HAS_TAU:
            tau_v = tl.load(TAU_A + rows, mask=rvalid, other=INF)
            tau_r = (tau_v.to(tl.int32, bitcast=True) & ~LOW_MASK) | LOW_MASK
        else:
            tau_r = tl.full((BLOCK_M,), LIMIT, tl.int32)
        # running list: KC real slots start empty (SENT), padding slots at -1 (never the worst)
        best_k = tl.where(kk[None, :] < KC, SENT, -1) + tl.zeros((BLOCK_M, KCP), tl.int32)
        best_i = tl.full((BLOCK_M, KCP), -1, tl.int32)
        rmax, rpos = tl.max(best_k, axis=1, return_indices=True)

        for j0 in range(b_lo, b_hi, BLOCK_N):
            cols = j0 + cn
            cvalid = cols < b_hi

            # ---- tile of dot products ----
            a_ptrs = A + rows[:, None] * stride_a + kr[None, :]
            b_ptrs = B + cols[:, None] * stride_b + kr[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for _k in range(0, D_PAD, BLOCK_K):
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K

            sqb = tl.load(SQ_B + cols, mask=cvalid, other=0.0)
            d = tl.maximum(sqa[:, None] + sqb[None, :] - 2.0 * acc, 0.0)
            # the point itself: global row == global column, i.e. rn + shift == cn; a shift beyond the
            # block sizes can never match, so it is clamped to stay in int32 on the tile
            shift = (i0 + A_OFF) - (j0 + B_OFF)
            shift = tl.minimum(tl.maximum(shift, -2 * BLOCK_M - 2 * BLOCK_N), 2 * BLOCK_M + 2 * BLOCK_N)
            shift = shift.to(tl.int32)
            keep = rvalid[:, None] & cvalid[None, :] & ((rn[:, None] + shift) != cn[None, :])
            # row keys (column in the low bits); excluded entries are SENT, never below a threshold
            rk = tl.where(keep, (d.to(tl.int32, bitcast=True) & ~LOW_MASK) | cn[None, :], SENT)

            # ---- rows: extract, in key order, the entries below the row threshold ----
            rthr = tl.minimum(rmax, tau_r)
            n_rounds = tl.minimum(tl.max(tl.sum((rk < rthr[:, None]).to(tl.int32), axis=1), axis=0), KC)
            prev = tl.full((BLOCK_M,), -1, tl.int32)
            for _r in range(0, n_rounds):
                m = tl.min(tl.where(rk > prev[:, None], rk, SENT), axis=1)
                hit = (m < rthr)[:, None] & (kk[None, :] == rpos[:, None])
                best_k = tl.where(hit, m[:, None], best_k)
                best_i = tl.where(hit, (j0 + (m & LOW_MASK)).to(tl.int32)[:, None], best_i)
                rmax, rpos = tl.max(best_k, axis=1, return_indices=True)
                rthr = tl.minimum(rmax, tau_r)
                prev = m

            # ---- columns (symmetric tiles): the same along the other axis, lists kept in memory ----
            if SYMMETRIC:
                c_off = cols[:, None] * stride_cd + sb_i * KC + kk[None, :]
                c_mask = cvalid[:, None] & (kk[None, :] < KC)
                col_v = tl.load(COL_D + c_off, mask=c_mask, other=-INF, cache_modifier=".cg")
                col_i = tl.load(COL_I + c_off, mask=c_mask, other=-1, cache_modifier=".cg")
                col_k = tl.where(col_v == INF, SENT, col_v.to(tl.int32, bitcast=True) | (col_i & LOW_MASK))
                if HAS_TAU:
                    tau_w = tl.load(TAU_B + cols, mask=cvalid, other=INF)
                    tau_c = (tau_w.to(tl.int32, bitcast=True) & ~LOW_MASK) | LOW_MASK
                else:
                    tau_c = tl.full((BLOCK_N,), LIMIT, tl.int32)
                cmax, cpos = tl.max(col_k, axis=1, return_indices=True)
                cthr = tl.minimum(cmax, tau_c)
                # column keys (row in the low bits); excluded entries land above LIMIT
                ck = (rk & ~LOW_MASK) | rn[:, None]
                n_cr = tl.minimum(tl.max(tl.sum((ck < cthr[None, :]).to(tl.int32), axis=0), axis=0), KC)
                prev_c = tl.full((BLOCK_N,), -1, tl.int32)
                for _r in range(0, n_cr):
                    m = tl.min(tl.where(ck > prev_c[None, :], ck, SENT), axis=0)
                    hit = (m < cthr)[:, None] & (kk[None, :] == cpos[:, None])
                    col_k = tl.where(hit, m[:, None], col_k)
                    col_i = tl.where(hit, (i0 + (m & LOW_MASK)).to(tl.int32)[:, None], col_i)
                    cmax, cpos = tl.max(col_k, axis=1, return_indices=True)
                    cthr = tl.minimum(cmax, tau_c)
                    prev_c = m
                if n_cr > 0:
                    col_v = tl.where(col_k > LIMIT, INF, (col_k & ~LOW_MASK).to(tl.float32, bitcast=True))
                    tl.store(COL_D + c_off, col_v, mask=c_mask)
                    tl.store(COL_I + c_off, col_i, mask=c_mask)
                # the next row block re-reads these lists, possibly from other threads
                tl.debug_barrier()

        r_off = rows[:, None] * stride_rd + sb_j * KC + kk[None, :]
        r_mask = rvalid[:, None] & (kk[None, :] < KC)
        best_v = tl.where(best_k > LIMIT, INF, (best_k & ~LOW_MASK).to(tl.float32, bitcast=True))
        tl.store(ROW_D + r_off, best_v, mask=r_mask)
        tl.store(ROW_I + r_off, best_i, mask=r_mask)


# ---------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------
#: Largest tile side: the selection keys give up log2(MAX_BLOCK) = 8 mantissa bits of the distance
#: (a relative truncation of at most 2**-15, which the error bound of the backend includes).
MAX_BLOCK = 256


@dataclass(frozen=True)
class TileConfig:
    """Block shape and launch parameters of :func:`_knn_top2_kernel`.

    ``block_m`` rows of A times ``block_n`` rows of B per tile, ``block_k`` columns per ``tl.dot``.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v}")
        if max(self.block_m, self.block_n) > MAX_BLOCK:
            raise ValueError(f"TileConfig: block_m and block_n must be <= {MAX_BLOCK} (selection keys keep "
                             f"the tile position in {MAX_BLOCK.bit_length() - 1} bits)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"TileConfig.num_stages must be >= 1, got {self.num_stages}")

    @property
    def align(self) -> int:
        return max(self.block_m, self.block_n)

    @property
    def low_bits(self) -> int:
        """Key bits holding the position in the tile (the selection keys drop them from the value)."""
        return (self.align - 1).bit_length()

    @classmethod
    def parse(cls, text: str) -> "TileConfig":
        """``"BM,BN,BK,WARPS,STAGES"`` (the format of ``GELORA_TRITON_CONFIG``)."""
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
        if len(parts) != 5:
            raise ValueError(f"expected 'BM,BN,BK,WARPS,STAGES', got {text!r}")
        return cls(*parts)


#: Tuning candidates on Hopper (sm_90) for 16-bit operands. Register and shared-memory use read off
#: ``ptxas -v`` for sm_90a (Triton 3.7, KC = 4; not yet timed on a GPU, the tuner picks on the first
#: large call, see :func:`tune_config`):
#:   128x128x64, 8 warps, 4 stages: 248-255 registers, no spill (symmetric), 128 KB: the default;
#:   128x256x64 / 256x128x64, 8 warps: half the operand traffic per flop, 80-370 B of spills;
#:   128x64x64, 4 warps, 3 stages: 255 registers, no spill, 72 KB: two programs per multiprocessor,
#:   so one's top-k epilogue overlaps the other's products.
HOPPER_CONFIGS = (
    TileConfig(128, 128, 64, 8, 4),
    TileConfig(128, 256, 64, 8, 3),
    TileConfig(128, 64, 64, 4, 3),
    TileConfig(256, 128, 64, 8, 3),
)
#: float32 operands (tf32 tiles) take twice the shared memory per stage: half the K block.
HOPPER_CONFIGS_F32 = (
    TileConfig(128, 128, 32, 8, 3),
    TileConfig(128, 64, 32, 4, 3),
)
#: Ampere/Ada (sm_80/86/89) candidates: 128x128x32 with 4 stages fits the 100-164 KB of shared memory.
AMPERE_CONFIGS = (
    TileConfig(128, 128, 32, 4, 4),
    TileConfig(128, 128, 64, 8, 3),
    TileConfig(64, 128, 32, 4, 4),
)
#: ieee float32 products run on the FMA units: small tiles (larger ones spill heavily).
IEEE_CONFIG = TileConfig(64, 64, 16, 4, 2)
#: The interpreter runs each program in numpy: small blocks keep the test shapes fast.
INTERPRETER_CONFIG = TileConfig(32, 32, 32, 4, 1)
#: Last resort when the configs above fail to compile on a device (small tiles, little shared memory).
FALLBACK_CONFIG = TileConfig(64, 64, 32, 4, 2)
#: Largest candidate count per row (``KC``); the lists are ``KCP = next_pow2(KC)`` wide in registers.
MAX_KC = 128
#: From this ``KCP`` on, the CUDA launches take :data:`LARGE_KC_CONFIGS` (tensor-core tiles).
LARGE_KCP = 32
#: Narrow tiles for long candidate lists. ptxas -v for sm_90a (Triton 3.7, symmetric variant, bytes of
#: spill stores per thread; not yet timed on a GPU): 32x64x64 fp16, 8 warps: 0 at KCP = 32 and 64,
#: 750-790 at 128, on mma.sync (wgmma takes 64 rows per warpgroup); 64x64x64, 8 warps, wgmma: 0, 44,
#: 1170-1220; the default 128x128x64: 472, 1060, 5888. The tuner times both on large inputs.
LARGE_KC_CONFIGS = (TileConfig(32, 64, 64, 8, 3), TileConfig(64, 64, 64, 8, 3))
#: The same for float32 operands (tf32): 32x64x32: 0, 28, 750-790; 64x64x32: 0, 164, 1170.
LARGE_KC_CONFIGS_F32 = (TileConfig(32, 64, 32, 8, 3), TileConfig(64, 64, 32, 8, 3))

#: Operand rows and columns are padded to this multiple on the GPU (covers every config above).
GPU_ALIGN = 256
K_ALIGN = 64

_tuned: Dict[tuple, TileConfig] = {}


def _capability(device: torch.device) -> Tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def candidate_configs(device: torch.device, dtype: torch.dtype = torch.float16, precision: str = "ieee",
                      kc: int = 4):
    """Tile configurations worth trying for operands of ``dtype`` on ``device`` and ``kc`` candidates
    per row (first: the default)."""
    if interpreting() or device.type != "cuda":
        return (INTERPRETER_CONFIG,)
    if dtype == torch.float32:
        if precision != "tf32":
            return (IEEE_CONFIG,)
        if _next_pow2(kc) >= LARGE_KCP:
            return LARGE_KC_CONFIGS_F32
        return HOPPER_CONFIGS_F32 if _capability(device)[0] >= 9 else (TileConfig(128, 128, 32, 4, 3),)
    if _next_pow2(kc) >= LARGE_KCP:
        return LARGE_KC_CONFIGS
    return HOPPER_CONFIGS if _capability(device)[0] >= 9 else AMPERE_CONFIGS


def default_config(device: torch.device, dtype: torch.dtype = torch.float16, precision: str = "ieee",
                   kc: int = 4) -> TileConfig:
    """``GELORA_TRITON_CONFIG`` when set, else the first candidate for the device, operand dtype and
    ``kc``."""
    env = _env.text("GELORA_TRITON_CONFIG")
    if env:
        return TileConfig.parse(env)
    return candidate_configs(device, dtype, precision, kc)[0]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _round_up(v: int, m: int) -> int:
    return -(-int(v) // m) * m


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_precision(dtype: torch.dtype, precision: Optional[str]) -> str:
    if dtype == torch.float32:
        p = precision or "ieee"
        if p not in ("ieee", "tf32"):
            raise ValueError(f"precision for float32 operands must be 'ieee' or 'tf32', got {precision!r}")
        return p
    if dtype in (torch.float16, torch.bfloat16):
        return "ieee"  # ignored by tl.dot for 16-bit operands (products are exact, fp32 accumulation)
    raise TypeError(f"operands must be float16, bfloat16 or float32, got {dtype}")


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------
def _pad_operand(x: torch.Tensor, n: int, align: int, k_align: int = K_ALIGN) -> torch.Tensor:
    """``x[:n]`` as a zero-padded contiguous (round_up(n, align), round_up(D, k_align)) tensor (no copy
    when already so)."""
    rows = _round_up(max(n, 1), align)
    cols = _round_up(x.shape[1], k_align)
    if x.is_contiguous() and x.shape[0] >= rows and x.shape[0] % align == 0 and x.shape[1] % k_align == 0:
        return x
    out = torch.zeros(rows, cols, dtype=x.dtype, device=x.device)
    out[:n, : x.shape[1]] = x[:n]
    return out


def _sq_norms(op: torch.Tensor, n: int) -> torch.Tensor:
    return op[:n].float().square().sum(dim=1)


def free_bytes(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can take: what the driver reports free plus what torch's
    caching allocator holds but does not use (``mem_get_info`` alone counts the cache as taken, so a
    second search in the same process would see its predecessor's freed blocks as gone)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _choose_super(m: int, cfg: TileConfig, device: torch.device, kcp: int, n_other: int) -> int:
    """Rows per super-block: about one super-block per multiprocessor (so the diagonal launch fills
    the device and the off-diagonal one has ~n_sm^2/2 programs), within a memory budget for the
    candidate slots (``n_other * n_slots * KC * 8`` bytes)."""
    align = cfg.align
    n_sm = _n_sms(device)
    target = max(1, n_sm)
    if device.type == "cuda":
        budget = free_bytes(device) // 6
        per_slot = max(1, n_other) * kcp * 8
        target = max(1, min(target, budget // per_slot))
    return max(align, _round_up(-(-m // target), align))


def _pair_order(pairs):
    """Group pairs into ~8 x 16 rectangles of (I, J) so that the programs resident together share
    super-blocks of both operands in L2."""
    return sorted(pairs, key=lambda p: (p[0] // 8, p[1] // 16, p[0], p[1]))


def _launch(cfg, a, b, sq_a, sq_b, tau_a, tau_b, row_d, row_i, col_d, col_i, pairs, m_a, m_b,
            a_off, b_off, super_rows, kc, symmetric, precision):
    if not pairs:
        return
    dev = a.device
    pt = torch.tensor(pairs, dtype=torch.int32, device=dev).contiguous()
    kcp = max(1, _next_pow2(kc))
    has_tau = tau_a is not None
    if has_tau:
        tau_b = tau_b if tau_b is not None else torch.full((max(m_b, 1),), float("inf"), device=dev)
    dummy = sq_a
    _knn_top2_kernel[(len(pairs),)](
        a, b, sq_a, sq_b,
        tau_a if has_tau else dummy, tau_b if has_tau else dummy,
        row_d, row_i,
        col_d if symmetric else row_d, col_i if symmetric else row_i,
        pt, m_a, m_b, a_off, b_off, super_rows, a.shape[1],
        a.stride(0), b.stride(0),
        row_d.shape[1] * kc, (col_d.shape[1] * kc) if symmetric else 0,
        KC=kc, KCP=kcp,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, LOW_BITS=cfg.low_bits,
        SYMMETRIC=symmetric, HAS_TAU=has_tau, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _merge_slots(part_d: torch.Tensor, part_i: torch.Tensor, kc: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, n_slots, KC) candidate slots -> the KC smallest per row, ascending (inf / -1 when fewer)."""
    m = part_d.shape[0]
    flat_d = part_d.reshape(m, -1)
    flat_i = part_i.reshape(m, -1)
    take = min(kc, flat_d.shape[1])
    d, sel = torch.topk(flat_d, take, dim=1, largest=False, sorted=True)
    i = torch.gather(flat_i, 1, sel).to(torch.int64)
    if take < kc:
        d = torch.cat([d, d.new_full((m, kc - take), float("inf"))], 1)
        i = torch.cat([i, i.new_full((m, kc - take), -1)], 1)
    i = torch.where(torch.isfinite(d), i, torch.full_like(i, -1))
    return d, i


def _bump(t: torch.Tensor) -> torch.Tensor:
    """The next float32 up: thresholds compare with ``<``, so an entry equal to the bound stays in."""
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def knn_top2(
    a: torch.Tensor,
    kc: int,
    *,
    b: Optional[torch.Tensor] = None,
    n_a: Optional[int] = None,
    n_b: Optional[int] = None,
    sq_a: Optional[torch.Tensor] = None,
    sq_b: Optional[torch.Tensor] = None,
    a_offset: int = 0,
    b_offset: int = 0,
    tau_a: Optional[torch.Tensor] = None,
    tau_b: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    precision: Optional[str] = None,
    config: Optional[TileConfig] = None,
    super_rows: Optional[int] = None,
):
    """The ``kc`` smallest ``|a_r|^2 + |b_c|^2 - 2 <a_r, b_c>`` of every row, by the fused tile kernel.

    Self-search (``b is None``): the ``kc`` nearest other rows of ``a`` for every row of ``a``.
    Cross search: the ``kc`` nearest rows of ``b`` for every row of ``a`` and, with ``symmetric``, the
    ``kc`` nearest rows of ``a`` for every row of ``b`` (one pass over the pairs). In both, a pair whose
    global indices ``a_offset + r`` and ``b_offset + c`` are equal is skipped (the point itself).

    Args:
        a: (M_A', D') float16, bfloat16 or float32 operand on a CUDA device (CPU under the Triton
            interpreter); rows beyond ``n_a`` and columns beyond the data must be zero. An operand that
            is not padded to the block multiples (see :data:`GPU_ALIGN`, :data:`K_ALIGN`) is copied.
        kc: candidates per row, ``1 <= kc <=`` :data:`MAX_KC`.
        b: optional (M_B', D') operand of the same dtype and D'.
        n_a, n_b: valid rows (default: all rows of ``a`` / ``b``).
        sq_a, sq_b: (n,) float32 squared norms of the operand rows (computed when omitted).
        a_offset, b_offset: global index of row 0 of ``a`` / ``b``.
        tau_a, tau_b: optional (n,) float32 upper bounds of each row's final ``kc``-th value (e.g.
            from an earlier chunk); entries above them are never extracted.
        symmetric: self-search: compute each unordered pair once (triangle of tiles); cross search:
            also return the lists of the rows of ``b``.
        precision: ``"ieee"`` or ``"tf32"`` for float32 operands (default ``"ieee"``); ignored for
            16-bit operands.
        config: block shape (default :func:`default_config`, or the tuned one).
        super_rows: rows per super-block (default: chosen from the device; a multiple of the blocks).

    Returns:
        d_a: (n_a, kc) float32 values, ascending (``inf`` where fewer than ``kc`` rows exist).
        i_a: (n_a, kc) int64 row indices into ``b`` (into ``a`` for a self-search), ``-1`` where missing.
        d_b, i_b: the same for the rows of ``b`` (cross search with ``symmetric``), else ``None``.
    """
    if not isinstance(kc, int) or not 1 <= kc <= MAX_KC:
        raise ValueError(f"kc must be an integer in [1, {MAX_KC}], got {kc!r}")
    if a.dim() != 2 or (b is not None and (b.dim() != 2 or b.dtype != a.dtype)):
        raise ValueError("a and b must be 2-D operands of the same dtype")
    dev = a.device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError("knn_top2 needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    prec = _dot_precision(a.dtype, precision)
    n_a = a.shape[0] if n_a is None else int(n_a)
    cross = b is not None
    n_b = (b.shape[0] if n_b is None else int(n_b)) if cross else n_a
    key = _tune_key(a, kc, prec, cross, symmetric)
    if config is not None:
        return _search(config, a, kc, b, n_a, n_b, sq_a, sq_b, a_offset, b_offset, tau_a, tau_b,
                       symmetric, prec, super_rows, cross)
    first = _tuned.get(key) or default_config(dev, a.dtype, prec, kc)
    chain = [first] + [c for c in (*candidate_configs(dev, a.dtype, prec, kc), FALLBACK_CONFIG) if c != first]
    if dev.type != "cuda":
        chain = chain[:1]
    error = None
    for cfg in chain:
        try:
            out = _search(cfg, a, kc, b, n_a, n_b, sq_a, sq_b, a_offset, b_offset, tau_a, tau_b,
                          symmetric, prec, super_rows, cross)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory / registers for this shape
            error = exc
            warnings.warn(f"gelora: Triton kNN tile config {cfg} failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); trying the next one", RuntimeWarning, stacklevel=2)
            continue
        _tuned[key] = cfg
        return out
    raise error


def _search(cfg, a, kc, b, n_a, n_b, sq_a, sq_b, a_offset, b_offset, tau_a, tau_b, symmetric, prec,
            super_rows, cross):
    dev = a.device
    align = cfg.align
    kcp = max(1, _next_pow2(kc))

    k_align = max(K_ALIGN, cfg.block_k)
    a = _pad_operand(a, n_a, align, k_align)
    sq_a = _sq_norms(a, n_a) if sq_a is None else sq_a.float().contiguous()
    if cross:
        b = _pad_operand(b, n_b, align, k_align)
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"a and b have different numbers of columns ({a.shape[1]} vs {b.shape[1]})")
        sq_b = _sq_norms(b, n_b) if sq_b is None else sq_b.float().contiguous()
    else:
        b, sq_b = a, sq_a
    if super_rows is None:
        super_rows = _choose_super(max(n_a, n_b), cfg, dev, kcp, max(n_a, n_b))
    if super_rows % align:
        raise ValueError(f"super_rows={super_rows} must be a multiple of {align}")
    if a.shape[0] % align or b.shape[0] % align:
        raise ValueError("operand rows must be padded to a multiple of the block")
    inf = float("inf")
    tau_a = None if tau_a is None else tau_a.float().contiguous()
    tau_b = None if tau_b is None else tau_b.float().contiguous()

    ns_a = max(1, -(-n_a // super_rows))
    ns_b = max(1, -(-n_b // super_rows))
    if not cross:
        part_d = torch.full((n_a, ns_a, kc), inf, dtype=torch.float32, device=dev)
        part_i = torch.full((n_a, ns_a, kc), -1, dtype=torch.int32, device=dev)
        diag = [(i, i) for i in range(ns_a)]
        tau0 = None if tau_a is None else _bump(tau_a)
        _launch(cfg, a, a, sq_a, sq_a, tau0, tau0, part_d, part_i, part_d, part_i, diag, n_a, n_a,
                a_offset, a_offset, super_rows, kc, False, prec)
        if ns_a > 1:
            # the slots are unordered: the row's kc-th value in its own super-block is the slot maximum
            own = part_d[torch.arange(n_a, device=dev), torch.arange(n_a, device=dev) // super_rows].amax(dim=1)
            tau = _bump(own if tau_a is None else torch.minimum(own, tau_a))
            if symmetric:
                off = [(i, j) for i in range(ns_a) for j in range(i + 1, ns_a)]
            else:
                off = [(i, j) for i in range(ns_a) for j in range(ns_a) if i != j]
            _launch(cfg, a, a, sq_a, sq_a, tau, tau, part_d, part_i, part_d, part_i, _pair_order(off),
                    n_a, n_a, a_offset, a_offset, super_rows, kc, symmetric, prec)
        d_a, i_a = _merge_slots(part_d, part_i, kc)
        return d_a, i_a, None, None

    row_d = torch.full((n_a, ns_b, kc), inf, dtype=torch.float32, device=dev)
    row_i = torch.full((n_a, ns_b, kc), -1, dtype=torch.int32, device=dev)
    if symmetric:
        col_d = torch.full((n_b, ns_a, kc), inf, dtype=torch.float32, device=dev)
        col_i = torch.full((n_b, ns_a, kc), -1, dtype=torch.int32, device=dev)
    else:
        col_d = col_i = None
    pairs = _pair_order([(i, j) for i in range(ns_a) for j in range(ns_b)])
    if symmetric and tau_a is not None and tau_b is None:
        tau_b = torch.full((n_b,), inf, device=dev)
    if tau_a is None and tau_b is not None:
        tau_a = torch.full((n_a,), inf, device=dev)
    _launch(cfg, a, b, sq_a, sq_b, None if tau_a is None else _bump(tau_a),
            None if tau_b is None else _bump(tau_b), row_d, row_i, col_d, col_i, pairs, n_a, n_b,
            a_offset, b_offset, super_rows, kc, symmetric, prec)
    d_a, i_a = _merge_slots(row_d, row_i, kc)
    if not symmetric:
        return d_a, i_a, None, None
    d_b, i_b = _merge_slots(col_d, col_i, kc)
    return d_a, i_a, d_b, i_b


# ---------------------------------------------------------------------------------------------------
# Tuning (on a slice of the problem: timing a full 1M-row launch per config would take minutes)
# ---------------------------------------------------------------------------------------------------
def _tune_key(a: torch.Tensor, kc: int, precision: str, cross: bool, symmetric: bool) -> tuple:
    dev = a.device
    return (dev.type, dev.index, _capability(dev), a.dtype, _round_up(a.shape[1], K_ALIGN),
            _next_pow2(kc), precision, cross, symmetric)


def tune_config(
    a: torch.Tensor, kc: int, *, precision: Optional[str] = None, symmetric: bool = True,
    rows: int = 32768, repeats: int = 3, verbose: bool = False,
) -> TileConfig:
    """Pick the fastest :data:`HOPPER_CONFIGS`/:data:`AMPERE_CONFIGS` entry for this operand shape by
    timing a self-search of its first ``rows`` rows with each; cached per (device, dtype, D, KC,
    precision). ``GELORA_TRITON_CONFIG`` or the interpreter skip tuning. A config that fails to
    compile (shared memory, registers) is skipped."""
    dev = a.device
    prec = _dot_precision(a.dtype, precision)
    key = _tune_key(a, kc, prec, False, symmetric)
    if key in _tuned:
        return _tuned[key]
    cands = candidate_configs(dev, a.dtype, prec, kc)
    if _env.text("GELORA_TRITON_CONFIG") or dev.type != "cuda" or len(cands) == 1:
        cfg = default_config(dev, a.dtype, prec, kc)
        _tuned[key] = cfg
        return cfg
    n = min(rows, a.shape[0])
    sub = a[:n]
    # super-blocks of ~n/16 rows: ~120 off-diagonal programs of a few hundred tiles each, like the
    # programs of a large search (a per-multiprocessor split of 32k rows would give tiny programs)
    sup = _round_up(max(1, n // 16), GPU_ALIGN)
    best, best_t = None, math.inf
    for cfg in cands:
        try:
            subp = _pad_operand(sub, n, GPU_ALIGN, max(K_ALIGN, cfg.block_k))
            knn_top2(subp, kc, n_a=n, symmetric=symmetric, precision=prec, config=cfg,
                     super_rows=sup)  # compile, warm
            torch.cuda.synchronize(dev)
            times = []
            for _ in range(repeats):
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record()
                knn_top2(subp, kc, n_a=n, symmetric=symmetric, precision=prec, config=cfg,
                         super_rows=sup)
                e1.record()
                torch.cuda.synchronize(dev)
                times.append(e0.elapsed_time(e1) / 1e3)
            t = sorted(times)[len(times) // 2]
        except Exception as exc:  # noqa: BLE001 - a config that does not compile here is skipped
            if verbose:
                print(f"  tune {cfg}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        if verbose:
            print(f"  tune {cfg}: {t * 1e3:.2f} ms")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("no Triton kNN tile configuration compiled on this device")
    _tuned[key] = best
    _tuned[_tune_key(a, kc, prec, True, symmetric)] = best
    _tuned[_tune_key(a, kc, prec, True, False)] = _tuned.get(_tune_key(a, kc, prec, True, False), best)
    return best
