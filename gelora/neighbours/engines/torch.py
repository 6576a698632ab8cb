"""Plain torch engine: blocked ``mm`` + ``topk``; the always-available fallback (any device), and the
cross search of the distributed ring where no faster engine has one."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .base import Candidates, KnnBackend, NormScaledError
from .registry import register

#: Rows of the query block. 2048 x N float32 tiles keep the working set at 8 MiB per 1k keys;
#: measured on a 2-core AVX2 box (torch 2.13, MKL) as the knee of the block-size curve.
QUERY_BLOCK = 2048
#: Upper bound for one (QUERY_BLOCK, N) distance tile in bytes; larger N is split along keys.
TILE_BYTES = 256 << 20


def gemm_error_coef(dim: int, dtype: torch.dtype) -> float:
    """``coef`` of the shortcut's rounding bound ``|fl(|x|^2 + |y|^2 - 2<x, y>) - |x - y|^2| <=
    coef (|x|^2 + |y|^2)`` for a blocked GEMM of length-``dim`` dot products in ``dtype``.

    A probabilistic (not worst-case) rounding bound for blocked dot products: the error of a length-D
    dot product grows like ``sqrt(D) * u * |x| |y| <= sqrt(D) u (|x|^2 + |y|^2) / 2`` for
    round-to-nearest with independent errors, doubled for the ``-2<x, y>``; we take 8 standard
    deviations and twice that again (the norms and the two additions), which the certification tests
    never saw exceeded, and rows that do not clear it are recomputed in float64 anyway."""
    u = torch.finfo(dtype).eps / 2
    return 16.0 * math.sqrt(dim + 2) * u


def gemm_error_model(sq_norms: torch.Tensor, dim: int, dtype: torch.dtype) -> NormScaledError:
    """The per-pair form of :func:`gemm_error_bound` (:class:`gelora.neighbours.engines.base.NormScaledError`), which
    the pipeline evaluates at the norms that can compete for each row's neighbours."""
    return NormScaledError(sq_norms, gemm_error_coef(dim, dtype))


def gemm_error_bound(sq_norms: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Bound on ``|fl(|x|^2 + |y|^2 - 2<x, y>) - |x - y|^2|`` for row ``x`` and *any* other row ``y``
    (:func:`gemm_error_coef` at the largest norm of the data).

    Args:
        sq_norms: (N,) squared norms of the rows (float32/float64).
        dim: D, the length of the dot products.
        dtype: the dtype the tile products were computed in.

    Returns:
        (N,) float32 bound per row.
    """
    return gemm_error_model(sq_norms, dim, dtype).rows().to(torch.float32)


def blocked_topk_sq(
    x: torch.Tensor,
    kc: int,
    query_block: int = QUERY_BLOCK,
    *,
    keys: Optional[torch.Tensor] = None,
    q_offset: int = 0,
    k_offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest ``kc`` squared distances of every row of ``x`` to the rows of ``keys`` (default: the
    other rows of ``x``), by blocked mm + topk.

    Never forms the N x K matrix: each (query_block, key_block) tile is reduced to its top ``kc`` and
    merged into a running (N, kc) result. A key whose global index (``k_offset + j``) equals a query's
    (``q_offset + i``) is that query itself and is excluded by index (not by distance: duplicates have
    distance 0 too).

    Args:
        x: (N, D) float tensor (any device); the caller centres it. keys: (K, D), same dtype/device.
        kc: candidates per row, ``kc <= K`` (``K - 1`` for a self search).

    Returns:
        d2: (N, kc) squared distances (dtype of ``x``), ascending (``inf`` where a row has fewer keys);
        idx: (N, kc) int64 indices into ``keys`` (-1 there).
    """
    if keys is None:
        keys = x
    n, m = x.shape[0], keys.shape[0]
    sq = (x * x).sum(dim=1)
    sk = sq if keys is x else (keys * keys).sum(dim=1)
    key_block = max(kc + 1, min(m, TILE_BYTES // (max(1, query_block) * x.element_size())))
    out_d = torch.full((n, kc), float("inf"), dtype=x.dtype, device=x.device)
    out_i = torch.full((n, kc), -1, dtype=torch.int64, device=x.device)
    shift = q_offset - k_offset  # key column of query row i is i + shift
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        best_d = out_d[q0:q1]
        best_i = out_i[q0:q1]
        for k0 in range(0, m, key_block):
            k1 = min(m, k0 + key_block)
            tile = torch.addmm(sk[k0:k1].unsqueeze(0), x[q0:q1], keys[k0:k1].T, beta=1.0, alpha=-2.0)
            tile.add_(sq[q0:q1].unsqueeze(1))
            lo, hi = max(q0, k0 - shift), min(q1, k1 - shift)
            if lo < hi:
                r = torch.arange(lo, hi, device=x.device)
                tile[r - q0, r + shift - k0] = float("inf")
            kk = min(kc, k1 - k0)
            d, i = torch.topk(tile, kk, dim=1, largest=False, sorted=False)
            if k0 == 0 and kk == kc:  # the first key block fills the list: nothing to merge yet
                best_d, best_i = d, i
                continue
            cd = torch.cat([best_d, d], dim=1)
            ci = torch.cat([best_i, i + k0], dim=1)
            best_d, sel = torch.topk(cd, kc, dim=1, largest=False, sorted=False)
            best_i = torch.gather(ci, 1, sel)
        best_d, order = torch.sort(best_d, dim=1)
        best_i = torch.gather(best_i, 1, order)
        out_d[q0:q1] = best_d
        out_i[q0:q1] = torch.where(torch.isinf(best_d), torch.full_like(best_i, -1), best_i)
    return out_d, out_i


class TorchBackend(KnnBackend):
    name = "torch"
    description = "blocked torch mm + topk (reference engine, any device)"

    def _input_reasons(self, x: torch.Tensor) -> List[str]:
        return []

    def search(self, x: torch.Tensor, kc: int) -> Candidates:
        """See :meth:`KnnBackend.search`; the (N,) squared norms of the rows come back too (sums of
        squares in the work dtype, the ones the error bound uses)."""
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        d2, idx = blocked_topk_sq(work, kc)
        sq = (work * work).sum(dim=1)
        return Candidates(d2, idx, gemm_error_model(sq, work.shape[1], work.dtype), sq)

    def cross_reasons(self) -> List[str]:
        return []

    def cross_search(self, q, keys, kc, *, q_offset, k_offset, top=None) -> Candidates:
        """See :meth:`KnnBackend.cross_search`: blocked mm + topk of the queries against the keys."""
        d2, idx = blocked_topk_sq(q, kc, keys=keys, q_offset=q_offset, k_offset=k_offset)
        sq = (q * q).sum(dim=1)
        return Candidates(d2, idx, gemm_error_model(sq, q.shape[1], q.dtype), sq)


register(TorchBackend())
