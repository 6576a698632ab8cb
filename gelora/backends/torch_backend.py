"""Plain torch backend: blocked ``mm`` + ``topk``; the always-available fallback (any device)."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from . import KnnBackend, NormScaledError, register

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
    """The per-pair form of :func:`gemm_error_bound` (:class:`gelora.backends.NormScaledError`), which
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
    x: torch.Tensor, kc: int, query_block: int = QUERY_BLOCK
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest ``kc`` squared distances of every row of ``x`` to the other rows, by blocked mm + topk.

    Never forms the N x N matrix: each (query_block, key_block) tile is reduced to its top ``kc``
    and merged into a running (N, kc) result.

    Args:
        x: (N, D) float tensor (any device); the caller centres it.
        kc: candidates per row, ``kc <= N - 1``.

    Returns:
        d2: (N, kc) squared distances (dtype of ``x``), ascending; idx: (N, kc) int64.
    """
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    key_block = max(kc + 1, min(n, TILE_BYTES // (max(1, query_block) * x.element_size())))
    out_d = torch.empty(n, kc, dtype=x.dtype, device=x.device)
    out_i = torch.empty(n, kc, dtype=torch.int64, device=x.device)
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        xq = x[q0:q1]
        best_d = None
        best_i = None
        for k0 in range(0, n, key_block):
            k1 = min(n, k0 + key_block)
            tile = torch.addmm(sq[k0:k1].unsqueeze(0), xq, x[k0:k1].T, beta=1.0, alpha=-2.0)
            tile.add_(sq[q0:q1].unsqueeze(1))
            # exclude the query itself by index (not by distance: duplicates have distance 0 too)
            lo, hi = max(q0, k0), min(q1, k1)
            if lo < hi:
                r = torch.arange(lo, hi, device=x.device)
                tile[r - q0, r - k0] = float("inf")
            kk = min(kc, k1 - k0)
            d, i = torch.topk(tile, kk, dim=1, largest=False, sorted=False)
            i = i + k0
            if best_d is None:
                best_d, best_i = d, i
            else:
                cd = torch.cat([best_d, d], dim=1)
                ci = torch.cat([best_i, i], dim=1)
                best_d, sel = torch.topk(cd, min(kc, cd.shape[1]), dim=1, largest=False, sorted=False)
                best_i = torch.gather(ci, 1, sel)
        best_d, order = torch.sort(best_d, dim=1)
        out_d[q0:q1] = best_d
        out_i[q0:q1] = torch.gather(best_i, 1, order)
    return out_d, out_i


class TorchBackend(KnnBackend):
    name = "torch"
    description = "blocked torch mm + topk (reference engine, any device)"

    def _input_reasons(self, x: torch.Tensor) -> List[str]:
        return []

    def search(self, x: torch.Tensor, kc: int, *, src_dtype=None):
        return self.search_with_norms(x, kc, src_dtype=src_dtype)[:3]

    def search_with_norms(self, x: torch.Tensor, kc: int, *, src_dtype=None):
        """:meth:`search` and the (N,) squared norms of the rows (sums of squares in the work dtype)
        that its error bound used, for the centring term of :func:`gelora.knn.knn_exact`."""
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        d2, idx = blocked_topk_sq(work, kc)
        sq = (work * work).sum(dim=1)
        err = gemm_error_model(sq, work.shape[1], work.dtype)
        return d2.float() if d2.dtype != torch.float64 else d2, idx, err, sq


register(TorchBackend())
