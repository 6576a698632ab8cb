"""Exact k nearest neighbours of a point set with itself: the pipeline every backend shares.

1. centre the points (the mean is taken in float64): the ``|x|^2 + |y|^2 - 2<x,y>`` shortcut that
   fast engines use loses ``~u * |x|^2`` absolute accuracy, so large offsets must go first;
2. the backend returns ``kc > k`` *candidates* per row with approximate squared distances and an
   error bound (:meth:`gelora.backends.KnnBackend.search`);
3. the candidates are re-ranked with distances computed directly, ``sum((x - y)^2)`` in float32 (float64
   for float64 input): exact duplicates get exactly 0, never a fake ``1e-2`` from cancellation;
4. certification: a row is exact when its re-ranked k-th distance is below the smallest distance any
   non-candidate can have (the backend's kc-th approximate distance minus its error bound). Rows that
   fail are recomputed by the float64 reference, so the answer never depends on the engine's rounding.

:func:`knn_reference` is the float64 reference that tests and benchmarks compare against. It runs the
same pipeline in float64 with a worst-case (not probabilistic) bound on the shortcut's rounding
(:func:`float64_shortcut_error`), and a row it cannot certify gets a brute-force direct-difference
search over all points, so it is exact even where float64 cannot separate the neighbours through the
shortcut (points far from the mean relative to their neighbour distances).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._input import ArrayLike, as_points, cpu_core
from .backends import KnnBackend, select_backend

#: Extra candidates per row beyond k for the re-rank (a wider net makes certification failures rarer).
EXTRA_CANDIDATES = 2
#: Elements of one gathered (rows, kc, D) block in the direct re-rank on the CPU (~4 MiB of float32;
#: 256 rows x 4 x 768 measured fastest on a 2-core AVX2 box: 3 ms for 4096 x 4 x 768).
RERANK_CHUNK_ELEMS = 1 << 20
#: At most this many failing rows are recomputed against float64 chunks of the points instead of one
#: float64 copy of all of them (see :func:`_reference_rows`); more rows amortise the copy.
STREAM_MAX_ROWS = 64
#: Elements of one float64 chunk of the points in that streamed recomputation (4 MiB: cache-sized, and
#: few enough chunks that the per-op cost of a shared machine stays small).
STREAM_CHUNK_ELEMS = 1 << 19
#: Elements of one (rows, points, D) float64 difference block of the brute-force search that the float64
#: reference runs for rows it cannot certify (32 MiB).
BRUTE_CHUNK_ELEMS = 1 << 22


def centre(
    x: torch.Tensor, compute_dtype: Optional[torch.dtype] = None, *, mean: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x - mean(x)`` with the mean taken in float64, returned in ``compute_dtype`` (default: float32,
    float64 for float64 input), contiguous, on the device of ``x``.

    ``mean``: the (D,) float64 column mean of ``x`` when the caller already has it (the C++ core's
    ``prepare_points`` returns it with the finiteness count and the row hashes), so the points are not
    read once more just for it; it must be the mean of exactly these rows."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    core = cpu_core(x) if x.dtype == compute_dtype else None
    if core is not None:
        arr = x.detach().contiguous().numpy()
        nt = torch.get_num_threads()
        if mean is None:
            _, m, _ = core.prepare_points(arr, n_threads=nt)
        else:
            m = mean.detach().to("cpu", torch.float64).contiguous().numpy()
        return torch.from_numpy(core.centre(arr, m, n_threads=nt))
    if mean is None:
        mean = x.mean(dim=0, dtype=torch.float64)
    mean = mean.to(device=x.device, dtype=compute_dtype)
    return (x.to(compute_dtype) - mean).contiguous()


def direct_sq_dist(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    cand: torch.Tensor,
    keys: Optional[torch.Tensor] = None,
    *,
    chunk_elems: Optional[int] = None,
) -> torch.Tensor:
    """Squared distances ``sum((x[rows[i]] - keys[cand[i, j]])^2)`` computed directly (no norm shortcut).

    Args:
        x: (N, D) float32/float64 query points.
        rows: (M,) int64 indices of the query rows in ``x``; None: every row of ``x`` in order (M = N).
        cand: (M, C) int64 indices into ``keys``.
        keys: (K, D) points of the dtype of ``x`` that ``cand`` indexes; default ``x`` itself (the
            distributed search passes the shard in hand, the float64 fallback its float64 candidates).
        chunk_elems: elements of one gathered (rows, C, D) block; default cache-sized on the CPU and
            ``1 << 16`` rows on a GPU (the distributed search bounds it on every device).

    Returns:
        (M, C) tensor of the dtype of ``x``.
    """
    if keys is None:
        keys = x
    m = cand.shape[0]
    out = torch.empty(cand.shape, dtype=x.dtype, device=x.device)
    kc, d = cand.shape[1], x.shape[1]
    if chunk_elems is None:
        # small chunks keep the gathered (rows, C, D) block in cache: ~15x faster than one big gather
        step = max(1, RERANK_CHUNK_ELEMS // max(1, kc * d)) if x.device.type == "cpu" else 1 << 16
    else:
        step = max(1, chunk_elems // max(1, kc * d))
    for s in range(0, m, step):
        c = cand[s : s + step]
        g = torch.index_select(keys, 0, c.reshape(-1)).view(c.shape[0], kc, d)
        q = x[s : s + step] if rows is None else torch.index_select(x, 0, rows[s : s + step])
        g.sub_(q.unsqueeze(1))
        out[s : s + step] = g.pow_(2).sum(dim=-1)
    return out


def knn_reference(x: ArrayLike, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute-force reference: k nearest neighbours of every row among the other rows.

    Blocked over query rows (memory O(block * N)), distances from the centred float64 points.

    Args:
        x: (N, D) tensor/array, any float dtype.
        k: neighbours per row, ``1 <= k <= N - 1``.

    Returns:
        dist: (N, k) float64 Euclidean distances, ascending; idx: (N, k) int64.
    """
    xt = as_points(x, min_points=k + 1)
    xc = centre(xt, torch.float64)
    return _reference_rows(xc, torch.arange(xc.shape[0], device=xc.device), k)


def float64_shortcut_error(sq_norms: torch.Tensor, dim: int) -> Tuple[torch.Tensor, float]:
    """Worst-case rounding bounds of the float64 search of :func:`_reference_rows`.

    For rows ``x``, ``y`` with squared norms ``a``, ``b`` (computed as ``sum(x * x)``), the float64
    shortcut ``(a + b) - 2 <x, y>`` errs by at most ``2 gamma_{D+2} (|x|^2 + |y|^2)``: each norm by
    ``gamma_D |x|^2`` and the dot product (any summation order, blocked or FMA) by
    ``gamma_D sum|x_i y_i| <= gamma_D (|x|^2 + |y|^2) / 2``, doubled, plus two roundings of the
    additions on at most ``2 (|x|^2 + |y|^2)``; ``gamma_n = n u / (1 - n u)``. The bound returned takes
    twice that (covering the norms being the computed ones) with the largest norm for ``y``, so it holds
    for every other row. The direct distance ``sum((x - y)^2)`` has relative error at most
    ``gamma_{D+2}`` (a rounded difference, its square, a sum of D non-negative terms).

    Args:
        sq_norms: (N,) float64 squared norms of the rows.
        dim: D.

    Returns:
        err: (N,) float64, ``|shortcut(x_r, y) - |x_r - y|^2| <= err[r]`` for every row ``y``;
        rel: the relative error bound of a direct distance.
    """
    u = torch.finfo(torch.float64).eps / 2
    nu = (dim + 2) * u
    rel = nu / (1.0 - nu)
    return 4.0 * rel * (sq_norms + sq_norms.max()), rel


def _reference_rows(xc: torch.Tensor, rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 k-NN for the query rows ``rows`` of ``xc`` (self excluded by index).

    Candidates from the float64 shortcut, re-ranked by direct distances and certified like the engines'
    (:func:`float64_shortcut_error`: the row's k-th direct distance lies below the smallest direct
    distance any non-candidate can have); a row that fails gets :func:`_brute_rows`, whose answer
    replaces the candidates' only where their distances differ. Ties keep the order of the stable sort
    of the candidates (by index in a replaced row).

    A few failing rows of float32 points on the CPU are first tried against float64 chunks of the
    points (:func:`_reference_rows_streamed`): a float64 copy of all the points costs more than the
    arithmetic of a handful of rows (a 25 MB copy and its squared norms at 4096 x 768). Every other
    case, and any row that try cannot certify, takes the float64 copy."""
    n, d = xc.shape
    # query rows per block: the (block, N) float64 distance block stays within 64 MiB
    block = max(1, min(1024, (64 << 20) // max(1, 8 * n)))
    few = 0 < rows.shape[0] <= min(STREAM_MAX_ROWS, block)
    if few and xc.device.type == "cpu" and xc.dtype != torch.float64:
        found = _reference_rows_streamed(xc, rows, k)
        if found is not None:
            return found
    x64 = xc.to(torch.float64)
    sq = (x64 * x64).sum(1)
    kc = min(n - 1, k + EXTRA_CANDIDATES)
    err, rel = float64_shortcut_error(sq, d)
    out_d = torch.empty(rows.shape[0], k, dtype=torch.float64, device=xc.device)
    out_i = torch.empty(rows.shape[0], k, dtype=torch.int64, device=xc.device)
    for s in range(0, rows.shape[0], block):
        r = rows[s : s + block]
        d2 = sq[r].unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x64[r] @ x64.T)
        d2[torch.arange(r.shape[0], device=xc.device), r] = float("inf")
        sc, cand = torch.topk(d2, kc, dim=1, largest=False)
        del d2
        # re-rank the float64 candidates directly as well, so the reference is exact for duplicates
        exact = direct_sq_dist(x64, r, cand)
        exact, order = torch.sort(exact, dim=1, stable=True)
        best_d = exact[:, :k].clone()
        best_i = torch.gather(cand, 1, order)[:, :k]
        if kc < n - 1:
            # every non-candidate j has shortcut >= sc[:, -1], so true d2 >= sc[:, -1] - err and
            # direct d2 >= (sc[:, -1] - err) * (1 - rel); "not <" also catches NaN
            unsure = torch.nonzero(~(best_d[:, -1] < (sc[:, -1] - err[r]) * (1.0 - rel))).flatten()
            if unsure.numel():
                bd, bi = _brute_rows(x64, r[unsure], k)
                # where the candidates already had the k smallest distances (a tie with a
                # non-candidate, e.g. on a lattice), their indices are as good: keep them
                wrong = (bd != best_d[unsure]).any(dim=1)
                best_d[unsure[wrong]] = bd[wrong]
                best_i[unsure[wrong]] = bi[wrong]
        out_d[s : s + block] = best_d.clamp_min(0).sqrt()
        out_i[s : s + block] = best_i
    return out_d, out_i


def _brute_rows(x64: torch.Tensor, rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Squared direct distances ``sum((x - y)^2)`` of the rows ``rows`` of the float64 points ``x64`` to
    every other point and their k smallest (ties by index): exact, O(N D) per row, for the rows the
    shortcut cannot certify. The differences are formed in (rows, points, D) blocks of at most
    :data:`BRUTE_CHUNK_ELEMS` elements (one row against one point when D alone is larger); the (rows, N)
    distances stay within the caller's block. The same float64 operations as :func:`direct_sq_dist`,
    so a pair gets the same value in both."""
    n, d = x64.shape
    m = rows.shape[0]
    out_d = torch.empty(m, k, dtype=torch.float64, device=x64.device)
    out_i = torch.empty(m, k, dtype=torch.int64, device=x64.device)
    # rows per pass: at least 256 points (or all) per difference block, few passes over the points
    rb = max(1, min(m, BRUTE_CHUNK_ELEMS // max(1, d * min(n, 256))))
    for a in range(0, m, rb):
        r = rows[a : a + rb]
        q = x64[r].unsqueeze(1)
        d2 = torch.empty(r.shape[0], n, dtype=torch.float64, device=x64.device)
        step = max(1, BRUTE_CHUNK_ELEMS // max(1, r.shape[0] * d))
        for s in range(0, n, step):
            diff = x64[s : s + step].unsqueeze(0) - q
            d2[:, s : s + step] = diff.pow_(2).sum(dim=-1)
        d2[torch.arange(r.shape[0], device=x64.device), r] = float("inf")
        out_d[a : a + rb], out_i[a : a + rb] = _smallest_by_index(d2, k)
    return out_d, out_i


def _smallest_by_index(d2: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k smallest values of every row of ``d2`` and their columns, ties by column: what a stable
    sort of the whole row gives, from a topk and a stable sort of the entries up to the k-th value."""
    m, n = d2.shape
    kth = torch.topk(d2, k, dim=1, largest=False).values[:, -1:]
    keep = d2 <= kth
    cnt = keep.sum(dim=1)
    width = int(cnt.max())
    if width * 8 > n:  # ties with a good share of the row: the full sort is as cheap
        val, idx = torch.sort(d2, dim=1, stable=True)
        return val[:, :k], idx[:, :k]
    rr, cc = torch.nonzero(keep, as_tuple=True)  # row-major: ascending columns within a row
    pos = torch.arange(rr.numel(), device=d2.device) - (torch.cumsum(cnt, 0) - cnt)[rr]
    pd = torch.full((m, width), float("inf"), dtype=d2.dtype, device=d2.device)
    pi = torch.zeros((m, width), dtype=torch.int64, device=d2.device)
    pd[rr, pos] = d2[rr, cc]
    pi[rr, pos] = cc
    val, order = torch.sort(pd, dim=1, stable=True)
    return val[:, :k], torch.gather(pi, 1, order[:, :k])


def _reference_rows_streamed(
    xc: torch.Tensor, rows: torch.Tensor, k: int
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_reference_rows` for a few rows (one query block) without a float64 copy of all of ``xc``,
    or None.

    The float64 shortcut distances of the rows are computed against float64 chunks of the points, so
    only one chunk and the rows' candidates are ever float64. The answer must be the one of the full
    copy bit for bit, and the shortcut itself is not: the GEMM's rounding depends on its shape (the
    float64 products of a column chunk differ from those of all columns in the last bits). So the
    answer is returned only where it is the unique exact one: every row passes the full copy's
    certification (:func:`float64_shortcut_error`) against its own shortcut, and its first k + 1 direct
    distances are distinct. The full copy's answer is exact as well (certified, or brute force), and
    the direct distances are the same computation on the same float64 values in both paths, so both
    are that one answer. Otherwise None: the caller takes the full copy (exact ties, e.g. duplicate
    rows, or points too far from the mean for the shortcut to separate their neighbours: rare among a
    handful of failing rows).
    """
    n, d = xc.shape
    m = rows.shape[0]
    kc = min(n - 1, k + EXTRA_CANDIDATES)
    q = xc[rows].to(torch.float64)
    sq_q = (q * q).sum(1)
    d2 = torch.empty(m, n, dtype=torch.float64)
    sq = torch.empty(n, dtype=torch.float64)
    step = max(1, min(n, STREAM_CHUNK_ELEMS // max(1, d)))
    buf = torch.empty(step, d, dtype=torch.float64)
    tmp = torch.empty(step, d, dtype=torch.float64)
    for s in range(0, n, step):
        e = min(n, s + step)
        kb, t = buf[: e - s], tmp[: e - s]
        kb.copy_(xc[s:e])
        torch.sum(torch.mul(kb, kb, out=t), 1, out=sq[s:e])
        torch.addmm(sq[s:e].unsqueeze(0), q, kb.T, beta=1.0, alpha=-2.0, out=d2[:, s:e])
    d2.add_(sq_q.unsqueeze(1))
    d2[torch.arange(m), rows] = float("inf")
    sc, cand = torch.topk(d2, kc, dim=1, largest=False)
    keys = xc[cand.reshape(-1)].to(torch.float64)
    exact = direct_sq_dist(q, None, torch.arange(m * kc).view(m, kc), keys)
    exact, order = torch.sort(exact, dim=1, stable=True)
    ok = torch.ones(m, dtype=torch.bool)
    if kc > 1:
        ok &= (exact[:, 1 : min(kc, k + 1)] > exact[:, : min(kc, k + 1) - 1]).all(dim=1)
    if kc < n - 1:
        err, rel = float64_shortcut_error(sq, d)
        ok &= exact[:, k - 1] < (sc[:, -1] - err[rows]) * (1.0 - rel)
    if not bool(ok.all()):
        return None
    return exact[:, :k].clamp_min(0).sqrt(), torch.gather(cand, 1, order)[:, :k]


def knn_exact(
    xc: torch.Tensor, k: int, engine: KnnBackend, src_dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """k nearest neighbours of the centred points ``xc`` with ``engine``, re-ranked and certified.

    Returns:
        dist: (N, k) float32 (float64 for float64 ``xc``) Euclidean distances, ascending.
        idx: (N, k) int64.
        n_fixed: rows the certification sent to the float64 reference.
    """
    n = xc.shape[0]
    kc = min(n - 1, k + getattr(engine, "extra_candidates", EXTRA_CANDIDATES))
    cand_d2, cand_idx, err = engine.search(xc, kc, src_dtype=src_dtype)
    rows = torch.arange(n, device=xc.device)
    rerank = getattr(engine, "rerank", None)
    exact = rerank(xc, cand_idx) if rerank is not None else direct_sq_dist(xc, rows, cand_idx)
    exact, order = torch.sort(exact, dim=1, stable=True)
    idx = torch.gather(cand_idx, 1, order)[:, :k]
    d2 = exact[:, :k]
    n_fixed = 0
    if kc < n - 1:
        # every non-candidate j has approx d2 >= cand_d2[:, -1], so exact d2 >= cand_d2[:, -1] - err
        floor = cand_d2[:, -1].to(exact.dtype) - torch.as_tensor(err, device=xc.device).to(exact.dtype)
        bad = torch.nonzero(d2[:, -1] > floor).flatten()
        if bad.numel():
            n_fixed = int(bad.numel())
            fd, fi = _reference_rows(xc, bad, k)
            d2 = d2.clone()
            d2[bad] = (fd * fd).to(d2.dtype)
            idx[bad] = fi
    dist = d2.clamp_min(0).sqrt()
    if dist.dtype not in (torch.float32, torch.float64):
        dist = dist.float()
    return dist, idx, n_fixed


def knn2(
    x: ArrayLike,
    *,
    k: int = 2,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
    group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest neighbours of every row of ``x`` among the other rows.

    Args:
        x: (N, D) or (B, T, D) tensor/array (float16, bfloat16, float32, float64; any device a backend
            supports). (B, T, D) is flattened to tokens.
        k: neighbours per row (2 for TwoNN).
        backend: force ``"triton"``, ``"cpp"``, ``"faiss"`` or ``"torch"``; default: the first usable.
        mask: optional boolean (B, T) token mask (True keeps a token).
        group: a ``torch.distributed`` process group (``True``: the default group): ``x`` is this rank's
            shard and indices are global (see :func:`gelora.distributed.knn2_distributed`).

    Returns:
        dist: (N, k) float32 Euclidean distances (not squared), ascending per row.
        idx: (N, k) int64 neighbour indices (into the masked, flattened points). A point is never its
            own neighbour (excluded by index, not by distance: a duplicate is a neighbour at 0).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if group is not None and group is not False:
        from .distributed import knn2_distributed

        if mask is not None:
            x = as_points(x, mask, min_points=1)
        return knn2_distributed(x, k=k, group=None if group is True else group, backend=backend)
    xt = as_points(x, mask, min_points=k + 1)
    engine = select_backend(xt, backend)
    xc = centre(xt, _compute_dtype(xt, engine))
    dist, idx, _ = knn_exact(xc, k, engine, xt.dtype)
    return dist.float(), idx


def _compute_dtype(x: torch.Tensor, engine: KnnBackend) -> torch.dtype:
    """float64 stays float64; everything else is centred into float32 (engines that want half precision
    tiles cast their tile operands themselves and report the larger error bound)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
