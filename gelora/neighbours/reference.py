"""The float64 reference and the exact fallback of failing rows, both streamed (memory bounded by
:func:`gelora.neighbours.points.chunk_bytes`, whatever N).

:func:`knn_reference` is the float64 reference that tests and benchmarks compare against. It runs the
pipeline's steps in float64 with a worst-case (not probabilistic) bound on the shortcut's rounding
(:func:`gelora.neighbours.certify.float64_shortcut_error`), and a row it cannot certify gets a brute-force
direct-difference search over all points, so it is exact even where float64 cannot separate the
neighbours through the shortcut (points far from the mean relative to their neighbour distances).
:func:`reference_rows` is the same for a subset of rows (the pipeline's float64 fallback);
:func:`norm_shell_rows` is the fallback of rows whose competitors lie in a thin shell of norms.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .certify import float64_floor
from .inputs import ArrayLike, as_points, check_k, k_points_need, power_of_two_scale, unscale_distances
from .points import chunk_bytes, column_mean, direct_sq_dist

#: Extra candidates per row beyond k for the re-rank (a wider net makes certification failures rarer).
EXTRA_CANDIDATES = 2


#: Elements of one float64 chunk of the points per 64 query rows in that recomputation (4 MiB: cache-
#: sized for a handful of rows, measured on a 2-core AVX2 box; more rows take proportionally larger chunks).
STREAM_CHUNK_ELEMS = 1 << 19


#: Elements of one (rows, points, D) float64 difference block of the brute-force search that the float64
#: reference runs for rows it cannot certify (32 MiB).
BRUTE_CHUNK_ELEMS = 1 << 22


#: A failing row is searched in its norm shell (:func:`norm_shell_rows`) when the shell holds at most this
#: fraction of the points (or :data:`SHELL_MIN_POINTS`); wider shells go to the float64 reference, whose
#: GEMM does the same work per point 10-50x faster than the shell's elementwise differences. Measured on
#: a 2-core AVX2 box: MiniLM-L6 token states (10,000 x 384, 393 failing rows with shells of ~2,000
#: points) took 11 s with 1/16, 1.2 s through the reference; SmolLM2's massive-activation rows have
#: shells of a few dozen points.
SHELL_MAX_FRACTION = 1.0 / 64
SHELL_MIN_POINTS = 64


def knn_reference(x: ArrayLike, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference: k nearest neighbours of every row among the other rows, exact.

    Blocked over query rows (memory O(block * N)); candidates from the float64 shortcut on the points
    centred in float64, distances computed directly from the points as given (converted to float64,
    exactly), see :func:`reference_rows`.

    Args:
        x: (N, D) tensor/array, any float dtype.
        k: neighbours per row, ``1 <= k <= N - 1``.

    Returns:
        dist: (N, k) float64 Euclidean distances, ascending; idx: (N, k) int64. Points beyond float64's
        comfortable range are searched scaled by a power of two (:func:`power_of_two_scale`, exact);
        the distances are scaled back, so a distance beyond float64's range is ``inf`` or subnormal.
    """
    k = check_k(k)
    xt = as_points(x, min_points=k + 1, need=k_points_need(k))
    scale = power_of_two_scale(xt, torch.float64)
    if scale != 1.0:
        xt = xt * scale
    d2, idx = reference_rows(xt, torch.arange(xt.shape[0], device=xt.device), k, mean=column_mean(xt))
    return unscale_distances(d2.clamp_min(0).sqrt(), scale), idx


def reference_rows(
    x: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    *,
    xc: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 k-NN for the query rows ``rows`` of the points ``x`` (self excluded by index),
    streamed: no float64 copy of all the points.

    Candidates from the float64 shortcut on the points centred, kept as a running top-``kc`` per row
    over float64 chunks of the points; re-ranked by direct float64 distances of the points ``x``
    themselves (any float dtype, converted exactly a chunk at a time) and certified like the engines'
    (:func:`float64_floor`: the row's k-th direct distance lies below the smallest direct distance any
    non-candidate can have); a row that fails gets :func:`_brute_rows`, whose answer replaces the
    candidates' only where their distances differ. Ties are broken by index (the candidates are
    sorted by index before the stable sort of their distances).

    Centring: ``mean`` is the (D,) float64 mean; the shortcut runs on ``x - mean`` centred in float64
    a chunk at a time. ``xc``: a centred copy of ``x`` when the caller has one; a float64 one is used
    as it is (no centring here), another dtype is ignored (centring it into float32 has rounded it).
    With neither, ``mean`` is computed (:func:`column_mean`) when ``xc`` was given, else the shortcut
    runs on ``x`` itself (nothing centred, nothing to account for).

    Memory: rows are taken in blocks and the points in chunks so that the float64 query block, one
    float64 chunk and their distance tile stay within :func:`gelora.neighbours.points.chunk_bytes`, whatever N; each block
    reads the points once more (about ``M / 1024`` passes, fewer for small D).

    Returns:
        (M, k) float64 *squared* distances, ascending, and (M, k) int64 indices.
    """
    n, d = x.shape
    m = rows.shape[0]
    dev = x.device
    if xc is not None and xc.dtype == torch.float64:
        src, sub, centred = xc, None, True
    elif xc is not None or mean is not None:
        src, centred = x, True
        sub = (column_mean(x) if mean is None else mean).to(device=dev, dtype=torch.float64)
    else:
        src, sub, centred = x, None, False
    kc = min(n - 1, k + EXTRA_CANDIDATES)
    out_d = torch.empty(m, k, dtype=torch.float64, device=dev)
    out_i = torch.empty(m, k, dtype=torch.int64, device=dev)
    if m == 0:
        return out_d, out_i
    budget = chunk_bytes() // 8  # float64 elements
    # query rows per block: the block takes at most a quarter of the budget
    block = max(1, min(m, 1024, budget // (4 * max(1, d))))
    # points per chunk: cache-sized for few rows, larger for more; the chunk, its tile and the merge
    # buffers share the rest of the budget
    want = max(1, STREAM_CHUNK_ELEMS // max(1, d)) * max(1, block // 64)
    cap = max(1, (budget - block * d) // (d + 2 * block + 2 * kc))
    step = max(min(n, kc + 1), min(n, want, cap))
    sq_max = None
    for s in range(0, m, block):
        r = rows[s : s + block]
        sc, best_i, sq_q, top = _shortcut_candidates(src, sub, r, kc, step)
        sq_max = top if sq_max is None else sq_max
        # candidates by index, then a stable sort of their direct distances: ties by index
        cand = torch.sort(best_i, dim=1).values
        exact = direct_sq_dist(x, r, cand, dtype=torch.float64)
        exact, order = torch.sort(exact, dim=1, stable=True)
        bd_k = exact[:, :k].clone()
        bi_k = torch.gather(cand, 1, order)[:, :k]
        if kc < n - 1:
            # "not <" also catches NaN
            floor = float64_floor(sc[:, -1], sq_q, sq_max, d, torch.float64 if centred else None)
            unsure = torch.nonzero(~(bd_k[:, -1] < floor)).flatten()
            if unsure.numel():
                bd, bi = _brute_rows(x, r[unsure], k)
                # where the candidates already had the k smallest distances (a tie with a
                # non-candidate, e.g. on a lattice), their indices are as good: keep them
                wrong = (bd != bd_k[unsure]).any(dim=1)
                bd_k[unsure[wrong]] = bd[wrong]
                bi_k[unsure[wrong]] = bi[wrong]
        out_d[s : s + block] = bd_k
        out_i[s : s + block] = bi_k
    return out_d, out_i


def _shortcut_candidates(
    src: torch.Tensor, sub: Optional[torch.Tensor], r: torch.Tensor, kc: int, step: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``kc`` smallest float64 shortcut distances of the rows ``r`` of ``src - sub`` (``sub``: the
    float64 mean, or None) to all rows, as a running top-``kc`` over chunks of ``step`` rows converted
    to float64 one at a time (the row itself excluded by index).

    Returns:
        (b, kc) float64 shortcut values ascending, (b, kc) int64 indices, (b,) float64 squared norms of
        the centred query rows, and the largest squared norm of all centred rows (0-d float64).
    """
    n = src.shape[0]
    dev = src.device
    b = r.shape[0]
    q = src[r].to(torch.float64, copy=True)  # (gathered: a copy already, but never in place)
    if sub is not None:
        q.sub_(sub)
    sq_q = (q * q).sum(1)
    best_d = torch.full((b, kc), float("inf"), dtype=torch.float64, device=dev)
    best_i = torch.full((b, kc), -1, dtype=torch.int64, device=dev)
    top = torch.zeros((), dtype=torch.float64, device=dev)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        if sub is not None:  # a float64 copy (never the caller's float64 points in place)
            kb = src[c0:c1].to(torch.float64, copy=True).sub_(sub)
        else:
            kb = src[c0:c1].to(torch.float64)
        sk = (kb * kb).sum(1)
        top = torch.maximum(top, sk.max())
        tile = torch.addmm(sk.unsqueeze(0), q, kb.T, beta=1.0, alpha=-2.0)
        del kb
        tile.add_(sq_q.unsqueeze(1))
        hit = torch.nonzero((r >= c0) & (r < c1)).flatten()
        if hit.numel():
            tile[hit, r[hit] - c0] = float("inf")  # the row itself, by index
        td, ti = torch.topk(tile, min(kc, c1 - c0), dim=1, largest=False)
        del tile
        cd = torch.cat([best_d, td], 1)
        ci = torch.cat([best_i, ti + c0], 1)
        best_d, sel = torch.topk(cd, kc, dim=1, largest=False, sorted=True)
        best_i = torch.gather(ci, 1, sel)
    return best_d, best_i, sq_q, top


def _brute_rows(x: torch.Tensor, rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`brute_knn` of the rows ``rows`` of the points ``x`` against all of them, self excluded."""
    return brute_knn(x[rows], x, k, rows)


def brute_knn(
    q: torch.Tensor, keys: torch.Tensor, k: int, self_cols: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Squared float64 direct distances ``sum((q_i - y)^2)`` of the query rows ``q`` to every key ``y``
    and their k smallest (ties by key index): exact, O(K D) per row, for the rows the shortcut cannot
    certify. Queries and keys (any float dtype) are converted to float64 exactly, a block at a time.

    The differences are formed in (rows, keys, D) blocks of at most :data:`BRUTE_CHUNK_ELEMS` elements
    (one row against one key when D alone is larger); the (rows, K) distances stay within the caller's
    block. The same float64 operations as :func:`direct_sq_dist` with ``dtype=torch.float64``, so a
    pair gets the same value in both.

    Args:
        q: (M, D) query rows. keys: (K, D), ``k <= K``.
        self_cols: (M,) int64 key index that row i must not return (its own row; -1: none).

    Returns:
        (M, k) float64 squared distances, ascending, and (M, k) int64 key indices.
    """
    n, d = keys.shape
    m = q.shape[0]
    out_d = torch.empty(m, k, dtype=torch.float64, device=keys.device)
    out_i = torch.empty(m, k, dtype=torch.int64, device=keys.device)
    # rows per pass: at least 256 keys (or all) per difference block, few passes over the keys
    rb = max(1, min(m, BRUTE_CHUNK_ELEMS // max(1, d * min(n, 256))))
    for a in range(0, m, rb):
        qa = q[a : a + rb].to(torch.float64).unsqueeze(1)
        mb = qa.shape[0]
        d2 = torch.empty(mb, n, dtype=torch.float64, device=keys.device)
        step = max(1, BRUTE_CHUNK_ELEMS // max(1, mb * d))
        for s in range(0, n, step):
            diff = keys[s : s + step].to(torch.float64).unsqueeze(0) - qa
            d2[:, s : s + step] = diff.pow_(2).sum(dim=-1)
        if self_cols is not None:
            sc = self_cols[a : a + rb]
            hit = torch.nonzero(sc >= 0).flatten()
            d2[hit, sc[hit]] = float("inf")
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


def norm_shell_rows(
    points: torch.Tensor,
    xc: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    kth_sq: torch.Tensor,
    centred: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact k-NN of those failing ``rows`` whose competitors lie in a thin shell of norms: the rows of
    huge norm (massive activations) that no float32 shortcut can rank, found by direct float64
    distances to the few points of similar norm instead of a float64 pass over all points.

    Derivation. Row i has k candidates at computed direct squared distances ``<= kth_sq[i]``; each is
    computed in the dtype of ``xc`` (a rounded difference, its square and a sum of D terms: relative
    error at most ``gamma_{D+2}``), so k points lie within ``R_i = sqrt(kth_sq[i] (1 + 2 gamma_{D+2}))``
    of ``x_i`` and no point farther than ``R_i`` is among its k nearest. With the centring's rounding
    (:func:`competitor_radius`), ``|x_i - x_j| >= (1 - u) |xc_j| - (1 + u) |xc_i| - t`` and
    ``>= (1 - u) |xc_i| - (1 + u) |xc_j| - t``, so a point within ``R_i`` has::

        ((1 - u) |xc_i| - R_i - t) / (1 + u)  <=  |xc_j|  <=  ((1 + u) |xc_i| + R_i + t) / (1 - u)

    (``u = t = 0`` with nothing centred). The norms are taken in float64 (relative error ~1e-15; the
    shell is widened by 1e-9 relative), sorted once, and each row's shell is a slice of them; a row
    whose shell holds at most ``max(SHELL_MIN_POINTS, SHELL_MAX_FRACTION N)`` points gets
    :func:`brute_knn` against it (float64 direct distances of the points as given, ties by index).

    Args:
        points: (N, D) the points as given. xc: (N, D) the searched copy (centred when ``centred``).
        rows: (M,) int64 failing rows. kth_sq: (M,) their k-th re-ranked squared distances.

    Returns:
        done: (P,) int64 positions into ``rows`` that were searched here; their (P, k) float64 squared
        distances and (P, k) int64 indices.
    """
    n, d = xc.shape
    empty = torch.empty(0, dtype=torch.int64, device=xc.device)
    limit = max(SHELL_MIN_POINTS, int(SHELL_MAX_FRACTION * n))
    if limit >= n - 1:
        return empty, torch.empty(0, k, dtype=torch.float64, device=xc.device), empty.view(0, k)
    step = max(1, (1 << 22) // max(1, d))
    nrm = torch.cat([torch.linalg.vector_norm(xc[s:s + step], dim=1, dtype=torch.float64)
                     for s in range(0, n, step)])
    srt, order = torch.sort(nrm)
    if centred:
        fi = torch.finfo(xc.dtype)
        u, t = fi.eps / 2, 2.0 * math.sqrt(d) * fi.tiny
    else:
        u = t = 0.0
    ucomp = torch.finfo(xc.dtype).eps / 2
    nu = (d + 2) * ucomp
    gamma = nu / (1.0 - nu)
    r = (kth_sq.to(torch.float64).clamp_min(0) * (1.0 + 2.0 * gamma)).sqrt()
    ni = nrm[rows]
    lo_v = (((1.0 - u) * ni - r - t) / (1.0 + u)) * (1.0 - 1e-9)
    hi_v = (((1.0 + u) * ni + r + t) / (1.0 - u)) * (1.0 + 1e-9)
    lo = torch.searchsorted(srt, lo_v, right=False)
    hi = torch.searchsorted(srt, hi_v, right=True)
    width = hi - lo
    ok = torch.nonzero((width <= limit) & (width > k) & torch.isfinite(r)).flatten()
    out_d = torch.empty(ok.numel(), k, dtype=torch.float64, device=xc.device)
    out_i = torch.empty(ok.numel(), k, dtype=torch.int64, device=xc.device)
    for p, pos in enumerate(ok.tolist()):
        shell = torch.sort(order[int(lo[pos]):int(hi[pos])]).values  # ascending index: ties by index
        row = rows[pos]
        me = torch.searchsorted(shell, row.view(1)).clamp_max(shell.numel() - 1)
        me = torch.where(shell[me] == row, me, torch.full_like(me, -1))  # (its own shell holds it)
        bd, bi = brute_knn(points[row].view(1, d), points[shell], k, me)
        out_d[p], out_i[p] = bd[0], shell[bi[0]]
    return ok, out_d, out_i
