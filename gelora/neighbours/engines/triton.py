"""Triton backend: fused distance tiles + running top-k on CUDA (``gelora.kernels.knn_top2``).

Tile precision
--------------
The centred float32 points are rounded once into the tile operands (``precision``, or
``GELORA_TRITON_PRECISION``):

* ``"fp16"`` (default): float16 operands, scaled by a power of two so that the largest entry is
  ``2**14``; tensor-core products are exact and accumulate in float32. Same speed as bf16, and 8x
  finer rounding (``u = 2**-11`` against ``2**-8``), so certification failures are rarer.
* ``"bf16"``: bfloat16 operands (no scaling needed).
* ``"tf32"``: float32 operands pre-rounded to tf32 (10-bit mantissa, round to nearest), so that the
  tensor cores' truncation of the low bits is exact; half the fp16 rate.
* ``"ieee"``: plain float32 FMA products (slow; for checks).

Error bound (what ``search`` returns as ``err``)
-------------------------------------------------
Write ``x`` for a centred point, ``x~`` for its rounded operand (scaled back) and ``eps_i = |x~_i - x_i|``
(computed exactly, per row). The kernel value ``K_ij`` approximates ``T_ij = |x~_i - x~_j|^2``, and by
the triangle inequality ``| |x~_i - x~_j| - |x_i - x_j| | <= eps_i + eps_j``. So the rounding of the
operands moves *distances* by at most ``eps_i + eps_j``, an error that scales with the distance, not
with the norms. Let ``K`` be row i's kc-th candidate value and ``B_i = |x_i| + sqrt(K)``. A row j with
``|x_j| > B_i`` is farther than ``sqrt(K)`` from ``x_i`` by the triangle inequality; every other row has
``eps_j <= eps*_i = max{eps_j : |x_j| <= B_i}`` and ``|x~_j| <= S_i = B_i + eps*_i`` (norm-sorted prefix
maxima, so one far outlier row, e.g. a BOS token with a huge norm, does not loosen every row's bound).
With ``a_i`` the float32 accumulation bound of ``K`` for those rows and ``e = eps_i + eps*_i``::

    err_i = a_i + 2 sqrt(K + a_i) e + e^2 + rho (K + a_i)

Every row j that is not a candidate then has exact squared distance ``>= K - err_i``, and every row
with exact squared distance ``<= K`` has ``|K_ij - exact| <= err_i``: what the certification in
:mod:`gelora.neighbours` needs. ``rho`` covers the pipeline's own float32 re-rank. The accumulation bound
``a_i = alpha (|x~_i|^2 + S_i^2)`` follows :func:`gelora.neighbours.engines.torch.gemm_error_coef`
(8 standard deviations of ``sqrt(D) u`` random rounding) with ``u = 2**-23`` and a deterministic bias
of one ulp per 8 accumulated columns for tensor cores, which truncate instead of rounding.

Memory and long inputs
----------------------
Working memory is O(N D): the operands (N x D at 2 bytes for fp16/bf16), ``n_slots * kc`` candidates
per row (``n_slots`` ~ number of multiprocessors) and O(N) statistics; never O(N^2). When the operands
do not fit (or ``GELORA_TRITON_CHUNK_ROWS`` is set), rows are cut into chunks and the chunk pairs
``a <= b`` are processed one at a time (symmetric tiles across chunks), the running kc-th distances of
earlier pairs pruning the later ones.

A CPU tensor is accepted when CUDA is there and the backend was forced by name (``backend="triton"``,
through ``not_supported_reasons(x, forced=True)``), the tensor is in pinned memory (``x.pin_memory()``)
or ``GELORA_TRITON_STREAM=1`` is set: its chunks are then streamed through the GPU (inputs larger
than device memory), and the results come back to the CPU. Automatic selection never streams an
ordinary CPU tensor (the C++ engine is the better choice for data that fits the CPU's caches). Under ``TRITON_INTERPRET=1`` the kernel
runs in Triton's CPU interpreter on CPU tensors (tests only: slow).
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ... import _env
from .base import Candidates, KnnBackend
from .registry import register

log = logging.getLogger("gelora")

PRECISIONS = ("fp16", "bf16", "tf32", "ieee")
_OP_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "tf32": torch.float32, "ieee": torch.float32}
#: fp16 operands are scaled so that the largest magnitude is 2**FP16_TOP (fp16 max is ~2**16).
FP16_TOP = 14
#: Rows per block of the O(N D) statistics passes (bounds their temporaries: a few float32/float64
#: copies of the block, ~2 GB at 65536 x 4096 on a GPU).
STATS_ROWS = 16384
STATS_ROWS_CUDA = 65536
#: Largest candidate count the kernel keeps in registers (``gelora.kernels.knn_top2.MAX_KC``, repeated
#: here so that the engine's limit is known without importing Triton): k up to 126 gets the two extra
#: candidates, k = 127 and 128 fewer (:meth:`KnnBackend.candidates_for`); above it selection skips
#: this engine and a forced one raises.
MAX_KC = 128
#: Self-searches at least this large tune the tile shape first (a few seconds, once per shape).
TUNE_MIN_ROWS = 65536


def _interpreting() -> bool:
    return _env.triton_interpret()


def _kernels():
    from gelora.kernels import knn_top2 as mod  # noqa: PLC0415 - triton is optional

    return mod


def default_precision() -> str:
    p = _env.text("GELORA_TRITON_PRECISION", "fp16").lower()
    if p not in PRECISIONS:
        raise ValueError(f"GELORA_TRITON_PRECISION must be one of {PRECISIONS}, got {p!r}")
    return p


# ---------------------------------------------------------------------------------------------------
# Operands and their statistics
# ---------------------------------------------------------------------------------------------------
def operand_scale(x: torch.Tensor, precision: str) -> float:
    """Power-of-two scale of the operands: ``x / scale`` is what the tiles see (1 except for fp16)."""
    if precision != "fp16":
        return 1.0
    lo, hi = torch.aminmax(x)
    top = max(abs(float(lo)), abs(float(hi)))
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    return float(2.0 ** (math.ceil(math.log2(top)) - FP16_TOP))


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest tf32 value (10-bit mantissa, ties to even), kept in float32."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    bits = (bits + 0x0FFF + lsb) & ~0x1FFF
    return bits.view(torch.float32)


def round_operand(x: torch.Tensor, precision: str, scale: float) -> torch.Tensor:
    """The tile operand of ``x``: rounded to ``precision`` after division by ``scale``."""
    if precision == "fp16":
        return (x / scale).to(torch.float16) if scale != 1.0 else x.to(torch.float16)
    if precision == "bf16":
        return x.to(torch.bfloat16)
    if precision == "tf32":
        return _round_tf32(x.to(torch.float32))
    return x.to(torch.float32)


@dataclass
class OperandStats:
    """Per-row statistics of a block of points and its operand.

    Attributes:
        op: (rows_pad, D_pad) operand (zero padded), dtype of the precision.
        sq: (n,) float32 squared norms of the operand rows, in operand units (what the kernel adds).
        norm: (n,) float64 norms ``|x_i|`` of the centred points.
        eps: (n,) float64 rounding errors ``|scale * op_i - x_i|``.
        n: valid rows.
    """

    op: torch.Tensor
    sq: torch.Tensor
    norm: torch.Tensor
    eps: torch.Tensor
    n: int


def prepare_operand(x: torch.Tensor, precision: str, scale: float, align: int,
                    device: Optional[torch.device] = None) -> OperandStats:
    """Round the (n, D) float32/float64 points ``x`` into a padded tile operand on ``device`` and
    compute the statistics of the error bound (O(n D), in blocks of :data:`STATS_ROWS` rows)."""
    k = _kernels()
    dev = device or x.device
    n, d = x.shape
    rows = k._round_up(max(n, 1), align)
    cols = k._round_up(d, k.K_ALIGN)
    op = torch.zeros(rows, cols, dtype=_OP_DTYPE[precision], device=dev)
    sq = torch.empty(n, dtype=torch.float32, device=dev)
    norm = torch.empty(n, dtype=torch.float64, device=dev)
    eps = torch.empty(n, dtype=torch.float64, device=dev)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    step = STATS_ROWS_CUDA if dev.type == "cuda" else STATS_ROWS
    for s in range(0, n, step):
        e = min(n, s + step)
        xb = x[s:e].to(device=dev, non_blocking=True)
        ob = round_operand(xb, precision, scale)
        op[s:e, :d] = ob
        of = ob.to(wide)
        sq[s:e] = of.square().sum(dim=1, dtype=torch.float32)
        # |scale * op - x| is exact in float32 (Sterbenz); its norm is summed in float64
        diff = of * scale - xb.to(wide)
        eps[s:e] = torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64)
        norm[s:e] = torch.linalg.vector_norm(xb, dim=1, dtype=torch.float64)
    return OperandStats(op=op, sq=sq, norm=norm, eps=eps, n=n)


@dataclass
class KeyIndex:
    """Norm-sorted summary of a key set for :func:`tile_error_bound`."""

    norm_sorted: torch.Tensor  # (M,) float64 ascending
    eps_prefmax: torch.Tensor  # (M,) float64: max eps over keys with norm <= norm_sorted[k]

    @classmethod
    def build(cls, norm: torch.Tensor, eps: torch.Tensor) -> "KeyIndex":
        order = torch.argsort(norm)
        return cls(norm[order].contiguous(), torch.cummax(eps[order], dim=0).values.contiguous())


def _accumulation_constants(precision: str, dim_pad: int, tensor_cores: bool) -> Tuple[float, float]:
    """(alpha, rho): ``|K - T| <= alpha (|x~_i|^2 + |x~_j|^2)`` for the kernel's float32 sums, and the
    relative error ``rho`` of the kernel's truncated selection keys plus the pipeline's direct float32
    re-rank."""
    root = 8.0 * math.sqrt(dim_pad + 2)
    if tensor_cores and precision != "ieee":
        acc = (root + math.ceil(dim_pad / 8)) * 2.0 ** -23   # truncating accumulator + bias
    else:
        acc = root * 2.0 ** -24
    norms = root * 2.0 ** -24          # squared norms summed by torch in float32
    final = 2.0 ** -22                 # the two roundings of |a|^2 + |b|^2 - 2 <a, b>
    rho = (2.0 + root) * 2.0 ** -24    # the pipeline's direct float32 re-rank
    rho += 2.0 ** (_kernels().MAX_BLOCK.bit_length() - 1 - 23)  # selection keys truncate the value
    return acc + norms + final, rho


def tile_error_bound(
    kth: torch.Tensor,
    q: OperandStats,
    keys: KeyIndex,
    scale: float,
    precision: str,
    dim_pad: int,
    tensor_cores: bool,
) -> torch.Tensor:
    """Per-row bound ``err`` (see the module docstring) for rows ``q`` searched against ``keys``.

    Args:
        kth: (n,) the kc-th candidate value of every row, in squared-distance units (unscaled).

    Returns:
        (n,) float64.
    """
    alpha, rho = _accumulation_constants(precision, dim_pad, tensor_cores)
    k = kth.to(torch.float64).clamp_min(0.0)
    reach = (q.norm + k.sqrt()) * (1.0 + 1e-12) + 1e-300
    pos = torch.searchsorted(keys.norm_sorted, reach, right=True) - 1
    eps_star = torch.where(pos >= 0, keys.eps_prefmax[pos.clamp_min(0)], torch.zeros_like(reach))
    e = q.eps + eps_star
    s = reach + eps_star
    sq_q = q.sq.to(torch.float64) * (scale * scale)
    a = alpha * (sq_q + s * s)
    err = a + 2.0 * torch.sqrt(k + a) * e + e * e + rho * (k + a)
    return err * (1.0 + 1e-6)


# ---------------------------------------------------------------------------------------------------
# Search drivers
# ---------------------------------------------------------------------------------------------------
def _compute_device(x: torch.Tensor) -> torch.device:
    if x.device.type == "cuda" or _interpreting():
        return x.device
    return torch.device("cuda", torch.cuda.current_device())


def _chunk_rows(n: int, d: int, precision: str, kc: int, dev: torch.device, resident: bool) -> int:
    """Rows per chunk: all of them when the operands, candidate slots and statistics fit in about
    60% of free device memory (30% when streaming from the host); ``GELORA_TRITON_CHUNK_ROWS`` overrides."""
    env = _env.integer("GELORA_TRITON_CHUNK_ROWS", None, minimum=1)
    if env is not None:
        return env
    if dev.type != "cuda":
        return n
    free = _kernels().free_bytes(dev)  # the caching allocator's unused blocks count as free
    es = torch.finfo(_OP_DTYPE[precision]).bits // 8
    per_row = d * es + 8 * 160 * kc + 64        # operand + candidate slots + statistics
    if not resident:
        per_row += d * 4                          # float32 staging of streamed rows
    frac = 0.6 if resident else 0.3
    fit = int(free * frac) // per_row
    if fit >= n:
        return n
    return max(4096, fit // 2)                    # two chunks resident at a time


def triton_candidates(
    x: torch.Tensor,
    kc: int,
    *,
    precision: Optional[str] = None,
    symmetric: Optional[bool] = None,
    chunk_rows: Optional[int] = None,
    config=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kc`` candidate neighbours of every row of ``x`` by the Triton kernel (see :meth:`KnnBackend.search`).

    Args:
        x: (N, D) float32/float64 centred points on CUDA (CPU: streamed through the GPU, or run in
            the interpreter).
        kc: candidates per row, ``1 <= kc <= min(N - 1, MAX_KC)``.
        precision: tile precision (:data:`PRECISIONS`; default :func:`default_precision`).
        symmetric: compute each pair once (default: on, ``GELORA_TRITON_SYMMETRIC=0`` turns it off).
        chunk_rows: rows per chunk (default: from free device memory).
        config: a :class:`gelora.kernels.knn_top2.TileConfig` (default: tuned / from the device).

    Returns:
        cand_d2 (N, kc) float32 ascending, cand_idx (N, kc) int64, err (N,) float32; on ``x.device``.
    """
    k = _kernels()
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if symmetric is None:
        symmetric = _env.flag("GELORA_TRITON_SYMMETRIC", True)
    n, d = x.shape
    dev = _compute_device(x)
    resident = x.device == dev
    scale = operand_scale(x, precision)
    dot_prec = "tf32" if precision == "tf32" else "ieee"
    cfg = config or k.default_config(dev, _OP_DTYPE[precision], dot_prec, kc)
    align = k.GPU_ALIGN if dev.type == "cuda" else cfg.align
    dim_pad = k._round_up(d, k.K_ALIGN)
    tensor_cores = dev.type == "cuda"
    c_rows = chunk_rows or _chunk_rows(n, d, precision, kc, dev, resident)
    c_rows = max(c_rows, kc + 1)
    bounds = [(s, min(n, s + c_rows)) for s in range(0, n, c_rows)]

    if len(bounds) == 1:
        st = prepare_operand(x, precision, scale, align, dev)
        if config is None and dev.type == "cuda" and n >= TUNE_MIN_ROWS and _env.flag("GELORA_TRITON_AUTOTUNE", True):
            k.tune_config(st.op, kc, precision=dot_prec, symmetric=symmetric)
        cd, ci, _, _ = k.knn_top2(st.op, kc, n_a=n, sq_a=st.sq, symmetric=symmetric,
                                  precision=dot_prec, config=config)
        keys = KeyIndex.build(st.norm, st.eps)
        stats = [st]
    else:
        cd, ci, stats = _search_chunk_pairs(x, kc, bounds, precision, scale, align, dot_prec, symmetric,
                                            config, dev)
        keys = KeyIndex.build(torch.cat([s.norm for s in stats]), torch.cat([s.eps for s in stats]))

    cand_d2 = cd * (scale * scale)
    q = OperandStats(op=None, sq=torch.cat([s.sq for s in stats]), norm=torch.cat([s.norm for s in stats]),
                     eps=torch.cat([s.eps for s in stats]), n=n)
    err = tile_error_bound(cand_d2[:, -1], q, keys, scale, precision, dim_pad, tensor_cores)
    out = x.device
    return cand_d2.to(out), ci.to(out), err.to(torch.float32).to(out)


def _search_chunk_pairs(x, kc, bounds, precision, scale, align, dot_prec, symmetric, config, dev):
    """The chunked search of :func:`triton_candidates`: the chunk pairs ``a <= b`` one at a time (symmetric
    tiles across chunks), at most the two chunks of the current pair resident, the running kc-th
    distances of earlier pairs pruning the later ones.

    Returns:
        (N, kc) float32 candidate values (operand units) ascending, (N, kc) int64 indices, and the
        statistics of every chunk (:class:`OperandStats` without the operand).
    """
    k = _kernels()
    n = x.shape[0]
    cd = torch.full((n, kc), float("inf"), dtype=torch.float32, device=dev)
    ci = torch.full((n, kc), -1, dtype=torch.int64, device=dev)
    stats: List[Optional[OperandStats]] = [None] * len(bounds)
    live = {}  # chunk -> operand; at most the two chunks of the current pair stay resident

    def get(c: int) -> OperandStats:
        if c not in live:
            for old in [o for o in live if o not in keep]:
                del live[old]
            s0, s1 = bounds[c]
            st = prepare_operand(x[s0:s1], precision, scale, align, dev)
            live[c] = st.op
            if stats[c] is None:
                stats[c] = _slim(st)
        st = stats[c]
        return OperandStats(op=live[c], sq=st.sq, norm=st.norm, eps=st.eps, n=st.n)

    def merge(rows: slice, nd: torch.Tensor, ni: torch.Tensor) -> None:
        dd = torch.cat([cd[rows], nd], 1)
        ii = torch.cat([ci[rows], ni], 1)
        v, sel = torch.topk(dd, kc, dim=1, largest=False, sorted=True)
        cd[rows] = v
        ci[rows] = torch.gather(ii, 1, sel)

    def shift(i: torch.Tensor, off: int) -> torch.Tensor:
        return torch.where(i >= 0, i + off, i)

    for ca, (a0, a1) in enumerate(bounds):
        keep = {ca}
        sa = get(ca)
        if ca == 0 and config is None and dev.type == "cuda" and _env.flag("GELORA_TRITON_AUTOTUNE", True):
            k.tune_config(sa.op, kc, precision=dot_prec, symmetric=symmetric)
        ra = slice(a0, a1)
        nd, ni, _, _ = k.knn_top2(sa.op, kc, n_a=sa.n, sq_a=sa.sq, a_offset=a0,
                                  tau_a=cd[ra, -1].contiguous(), symmetric=symmetric,
                                  precision=dot_prec, config=config)
        merge(ra, nd, shift(ni, a0))
        for cb in range(ca + 1, len(bounds)):
            keep = {ca, cb}
            b0, b1 = bounds[cb]
            sb = get(cb)
            rb = slice(b0, b1)
            da, ia, db, ib = k.knn_top2(
                sa.op, kc, b=sb.op, n_a=sa.n, n_b=sb.n, sq_a=sa.sq, sq_b=sb.sq,
                a_offset=a0, b_offset=b0, tau_a=cd[ra, -1].contiguous(),
                tau_b=cd[rb, -1].contiguous(), symmetric=symmetric, precision=dot_prec,
                config=config)
            merge(ra, da, shift(ia, b0))
            if not symmetric:
                db, ib, _, _ = k.knn_top2(
                    sb.op, kc, b=sa.op, n_a=sb.n, n_b=sa.n, sq_a=sb.sq, sq_b=sa.sq,
                    a_offset=b0, b_offset=a0, tau_a=cd[rb, -1].contiguous(),
                    symmetric=False, precision=dot_prec, config=config)
            merge(rb, db, shift(ib, a0))
        keep = set()
    live.clear()
    return cd, ci, stats


def _slim(st: OperandStats) -> OperandStats:
    """Drop the operand (keep the statistics) once a chunk is no longer needed."""
    return OperandStats(op=None, sq=st.sq, norm=st.norm, eps=st.eps, n=st.n)


def triton_cross(
    q: OperandStats,
    keys: OperandStats,
    kc: int,
    *,
    q_offset: int,
    k_offset: int,
    tau: Optional[torch.Tensor] = None,
    precision: str,
    config=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``kc`` nearest rows of ``keys`` for every row of ``q`` (rows-only kernel launch), in operand
    units (multiply by ``scale**2``). Rows whose global index (offset + row) coincide are skipped.

    Returns:
        (n_q, kc) float32 ascending (``inf`` where fewer keys), (n_q, kc) int64 indices into ``keys``.
    """
    k = _kernels()
    d, i, _, _ = k.knn_top2(q.op, kc, b=keys.op, n_a=q.n, n_b=keys.n, sq_a=q.sq, sq_b=keys.sq,
                            a_offset=q_offset, b_offset=k_offset, tau_a=tau, symmetric=False,
                            precision="tf32" if precision == "tf32" else "ieee", config=config)
    return d, i


# ---------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------
class TritonBackend(KnnBackend):
    name = "triton"
    description = "Triton kernel on CUDA (fused fp16 distance tiles + top-k, symmetric tiles)"

    def _availability_reasons(self) -> List[str]:
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install triton; Linux with an NVIDIA GPU)"]
        try:
            _kernels()
        except Exception as exc:  # noqa: BLE001 - a broken triton install is a reason, not a crash
            return [f"the Triton kernel failed to import: {exc!r}"]
        if _interpreting():
            return []
        if not torch.cuda.is_available():
            return ["no CUDA device (torch.cuda.is_available() is False)"]
        major, minor = torch.cuda.get_device_capability()
        if major < 7:
            return [f"CUDA device of compute capability {major}.{minor}; the kernel needs 7.0 or newer"]
        return []

    def not_supported_reasons(self, x: torch.Tensor, forced: bool = False, *, k: Optional[int] = None) -> List[str]:
        """As :meth:`KnnBackend.not_supported_reasons`; ``forced=True`` (the backend was asked for by
        name) also accepts a CPU tensor when CUDA is there: it is streamed through the GPU."""
        reasons = self.availability_reasons()
        if reasons:
            return list(reasons)
        return self._reasons(x, forced) + ([] if k is None else self.k_reasons(k))

    def _input_reasons(self, x: torch.Tensor) -> List[str]:
        return self._reasons(x, False)

    def _reasons(self, x: torch.Tensor, forced: bool) -> List[str]:
        reasons = []
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            reasons.append(f"dtype {x.dtype} is not supported (float16, bfloat16, float32, float64)")
        if x.device.type == "cuda":
            pass
        elif x.device.type == "cpu":
            if _interpreting():
                pass
            elif not torch.cuda.is_available():
                reasons.append("input is on the CPU and there is no CUDA device")
            elif not (forced or _is_pinned(x) or _env.flag("GELORA_TRITON_STREAM")):
                reasons.append("input is on the CPU: move it to CUDA, or have it streamed through the GPU "
                               "(force backend='triton', pin it with x.pin_memory(), or set "
                               "GELORA_TRITON_STREAM=1)")
        else:
            reasons.append(f"input is on device type {x.device.type!r}; the kernel runs on CUDA")
        return reasons

    max_candidates = MAX_KC

    def search(self, x: torch.Tensor, kc: int) -> Candidates:
        """See :meth:`KnnBackend.search` (``kc <= MAX_KC``: the kernel keeps its candidates in registers)."""
        if kc > MAX_KC:
            raise ValueError(f"the Triton kernel keeps at most {MAX_KC} candidates per row; {kc} asked")
        d2, idx, err = triton_candidates(x, kc)
        return Candidates(d2, idx, err)

    def cross_reasons(self) -> List[str]:
        return []

    def cross_search(self, q, keys, kc, *, q_offset, k_offset, top=None) -> Candidates:
        """See :meth:`KnnBackend.cross_search`: a rows-only launch of the kernel, the queries against the
        keys, both rounded into tile operands with one power-of-two scale from ``top`` (every rank of
        the ring passes the same), and the per-row bound of :func:`tile_error_bound`."""
        if kc > MAX_KC:
            raise ValueError(f"the Triton kernel keeps at most {MAX_KC} candidates per row; {kc} asked")
        k = _kernels()
        precision = default_precision()
        if top is None:
            top = max([float(t.abs().max()) for t in (q, keys) if t.numel()] or [0.0])
        scale = operand_scale(torch.tensor([float(top)]), precision)
        align = k.GPU_ALIGN if q.device.type == "cuda" else k.default_config(q.device).align
        qs = prepare_operand(q, precision, scale, align)
        ks = prepare_operand(keys, precision, scale, align)
        d, i = triton_cross(qs, ks, kc, q_offset=q_offset, k_offset=k_offset, precision=precision)
        d = d * (scale * scale)
        dim_pad = k._round_up(keys.shape[1], k.K_ALIGN)
        last = torch.where(torch.isfinite(d[:, -1]), d[:, -1], torch.zeros_like(d[:, -1]))
        err = tile_error_bound(last, qs, KeyIndex.build(ks.norm, ks.eps), scale, precision, dim_pad,
                               keys.device.type == "cuda")
        return Candidates(d.to(torch.float64 if keys.dtype == torch.float64 else torch.float32), i, err)


def _is_pinned(x: torch.Tensor) -> bool:
    try:
        return bool(x.is_pinned())
    except Exception:  # noqa: BLE001 - no CUDA runtime: nothing is pinned
        return False


register(TritonBackend())
