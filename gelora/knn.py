"""Exact k nearest neighbours of a point set with itself: the pipeline every backend shares.

1. centre the points (the mean is taken in float64): the ``|x|^2 + |y|^2 - 2<x,y>`` shortcut that
   fast engines use loses ``~u * |x|^2`` absolute accuracy, so large offsets must go first;
2. the backend returns ``kc > k`` *candidates* per row with approximate squared distances of the
   centred points and an error bound (:meth:`gelora.backends.KnnBackend.search`);
3. the candidates are re-ranked with distances computed directly, ``sum((x - y)^2)`` in float32 (float64
   for float64 input), on the user's points as given (not the centred ones: centring into float32
   rounds every coordinate once more, by up to ``u |x - mean|``, which is not small against the
   neighbour distances of a tight cluster far from the mean). Exact duplicates get exactly 0, never a
   fake ``1e-2`` from cancellation;
4. certification, per row (:func:`_uncertified`): a row is exact when its re-ranked k-th distance is
   below the smallest distance any non-candidate can have (the backend's kc-th approximate distance
   minus its error bound, moved by the centring's rounding, :func:`centring_floor`), with both bounds
   evaluated at the norms that can compete for the row's neighbours (:func:`competitor_radius`), so a
   few rows of huge norm (massive activations) do not loosen the others'. Rows that fail are searched
   exactly in their norm shell when it is thin (:func:`_norm_shell_rows`: the outlier rows), else
   recomputed by the streamed float64 reference (:func:`_reference_rows`, within :func:`chunk_bytes`
   of working memory), so the answer never depends on the engine's rounding.

:func:`knn_reference` is the float64 reference that tests and benchmarks compare against. It runs the
same pipeline in float64 with a worst-case (not probabilistic) bound on the shortcut's rounding
(:func:`float64_shortcut_error`), and a row it cannot certify gets a brute-force direct-difference
search over all points, so it is exact even where float64 cannot separate the neighbours through the
shortcut (points far from the mean relative to their neighbour distances).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ._input import ArrayLike, as_points, cpu_core, power_of_two_scale, unscale_distances
from .backends import KnnBackend, error_rows, select_backend

#: Extra candidates per row beyond k for the re-rank (a wider net makes certification failures rarer).
EXTRA_CANDIDATES = 2
#: Elements of one gathered (rows, kc, D) block in the direct re-rank on the CPU (~4 MiB of float32;
#: 256 rows x 4 x 768 measured fastest on a 2-core AVX2 box: 3 ms for 4096 x 4 x 768).
RERANK_CHUNK_ELEMS = 1 << 20
#: Bytes of working memory that the float64 recomputation of failing rows (:func:`_reference_rows`) and
#: the mean of the points (:func:`column_mean`) may take beyond the input and its centred copy, whatever
#: N: float64 chunks of the points, the query rows and their distance tile. ``GELORA_CHUNK_BYTES``
#: overrides it (bytes; e.g. ``268435456`` for 256 MiB).
CHUNK_BYTES = 1 << 30
#: Elements of one float64 chunk of the points per 64 query rows in that recomputation (4 MiB: cache-
#: sized for a handful of rows, measured on a 2-core AVX2 box; more rows take proportionally larger chunks).
STREAM_CHUNK_ELEMS = 1 << 19
#: Elements of one (rows, points, D) float64 difference block of the brute-force search that the float64
#: reference runs for rows it cannot certify (32 MiB).
BRUTE_CHUNK_ELEMS = 1 << 22


def chunk_bytes() -> int:
    """:data:`CHUNK_BYTES`, or ``GELORA_CHUNK_BYTES`` when set (at least 1 MiB)."""
    env = os.environ.get("GELORA_CHUNK_BYTES", "").strip()
    if env:
        try:
            return max(1 << 20, int(float(env)))
        except ValueError as exc:
            raise ValueError(f"GELORA_CHUNK_BYTES must be a number of bytes, got {env!r}") from exc
    return CHUNK_BYTES


def column_mean(x: torch.Tensor) -> torch.Tensor:
    """(D,) float64 column mean of the (N, D) points ``x`` (any float dtype and device), summed chunk by
    chunk so that no float64 copy of all the points is made (a chunk of at most an eighth of
    :func:`chunk_bytes`)."""
    n, d = x.shape
    step = max(1, chunk_bytes() // (8 * 8 * max(1, d)))
    acc = torch.zeros(d, dtype=torch.float64, device=x.device)
    for s in range(0, n, step):
        acc += x[s : s + step].sum(dim=0, dtype=torch.float64)
    return acc / max(1, n)


def centre(
    x: torch.Tensor, compute_dtype: Optional[torch.dtype] = None, *, mean: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x - mean(x)`` with the mean taken in float64, returned in ``compute_dtype`` (default: float32,
    float64 for float64 input), contiguous, on the device of ``x``.

    ``mean``: the (D,) float64 column mean of ``x`` when the caller already has it (the C++ core's
    ``prepare_points`` returns it with the finiteness count and the row hashes), so the points are not
    read once more just for it; it must be the mean of exactly these rows.

    Every coordinate is one rounding of ``x - m~``, with ``m~`` the mean rounded to ``compute_dtype``
    (the same for every row): what :func:`centring_floor` accounts for."""
    return centre_and_mean(x, compute_dtype, mean=mean)[0]


def centre_and_mean(
    x: torch.Tensor, compute_dtype: Optional[torch.dtype] = None, *, mean: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`centre` and the (D,) float64 mean it subtracted (``mean`` itself when given; on the CPU
    for the C++ core, else on the device of ``x``), which the float64 recomputation of
    :func:`knn_exact` centres the points with."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    core = cpu_core(x) if x.dtype == compute_dtype else None
    if core is not None:
        arr = x.detach().contiguous().numpy()
        nt = torch.get_num_threads()
        if mean is None:
            _, m, _ = core.prepare_points(arr, n_threads=nt)
            mean = torch.from_numpy(m)
        else:
            mean = mean.detach().to("cpu", torch.float64).contiguous()
            m = mean.numpy()
        return torch.from_numpy(core.centre(arr, m, n_threads=nt)), mean
    if mean is None:
        mean = column_mean(x.detach())
    mean = mean.detach().to(device=x.device, dtype=torch.float64)
    xc = x.detach().to(compute_dtype, memory_format=torch.contiguous_format, copy=True)
    return xc.sub_(mean.to(compute_dtype)), mean


def direct_sq_dist(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    cand: torch.Tensor,
    keys: Optional[torch.Tensor] = None,
    *,
    chunk_elems: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Squared distances ``sum((x[rows[i]] - keys[cand[i, j]])^2)`` computed directly (no norm shortcut).

    Args:
        x: (N, D) query points, any float dtype.
        rows: (M,) int64 indices of the query rows in ``x``; None: every row of ``x`` in order (M = N).
        cand: (M, C) int64 indices into ``keys``.
        keys: (K, D) points that ``cand`` indexes, any float dtype; default ``x`` itself (the
            distributed search passes the shard in hand).
        chunk_elems: elements of one gathered (rows, C, D) block; default cache-sized on the CPU and
            ``1 << 16`` rows on a GPU (the distributed search bounds it on every device).
        dtype: the dtype of the arithmetic; the gathered rows are converted to it chunk by chunk (no
            copy of all the points), exactly when it is at least as wide as theirs. Default: the dtype
            of ``x``, float32 for float16/bfloat16.

    Returns:
        (M, C) tensor of ``dtype``. A pair gets the same value whatever the chunking and whichever
        rows are asked with it (the same elementwise float operations and the same reduction).
    """
    if keys is None:
        keys = x
    if dtype is None:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    m = cand.shape[0]
    out = torch.empty(cand.shape, dtype=dtype, device=x.device)
    kc, d = cand.shape[1], x.shape[1]
    if chunk_elems is None:
        # small chunks keep the gathered (rows, C, D) block in cache: ~15x faster than one big gather
        step = max(1, RERANK_CHUNK_ELEMS // max(1, kc * d)) if x.device.type == "cpu" else 1 << 16
        if x.device.type != "cpu" and keys.dtype != dtype:
            # the gathered block and its converted copy together take the bytes of one block of dtype
            size = torch.empty(0, dtype=dtype).element_size()
            step = max(1, step * size // (size + keys.element_size()))
    else:
        step = max(1, chunk_elems // max(1, kc * d))
    for s in range(0, m, step):
        c = cand[s : s + step]
        g = torch.index_select(keys, 0, c.reshape(-1)).view(c.shape[0], kc, d)
        if g.dtype != dtype:
            g = g.to(dtype)
        q = x[s : s + step] if rows is None else torch.index_select(x, 0, rows[s : s + step])
        g.sub_(q.to(dtype).unsqueeze(1))
        out[s : s + step] = g.pow_(2).sum(dim=-1)
    return out


def knn_reference(x: ArrayLike, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference: k nearest neighbours of every row among the other rows, exact.

    Blocked over query rows (memory O(block * N)); candidates from the float64 shortcut on the points
    centred in float64, distances computed directly from the points as given (converted to float64,
    exactly), see :func:`_reference_rows`.

    Args:
        x: (N, D) tensor/array, any float dtype.
        k: neighbours per row, ``1 <= k <= N - 1``.

    Returns:
        dist: (N, k) float64 Euclidean distances, ascending; idx: (N, k) int64. Points beyond float64's
        comfortable range are searched scaled by a power of two (:func:`power_of_two_scale`, exact);
        the distances are scaled back, so a distance beyond float64's range is ``inf`` or subnormal.
    """
    xt = as_points(x, min_points=k + 1)
    scale = power_of_two_scale(xt, torch.float64)
    if scale != 1.0:
        xt = xt * scale
    d2, idx = _reference_rows(xt, torch.arange(xt.shape[0], device=xt.device), k, mean=column_mean(xt))
    return unscale_distances(d2.clamp_min(0).sqrt(), scale), idx


def float64_shortcut_error(
    sq_norms: torch.Tensor, dim: int, key_max: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, float]:
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
        key_max: the largest squared norm of the rows ``y`` the bound must hold for (the distributed
            recomputation passes one shard's); default ``sq_norms.max()``.

    Returns:
        err: (N,) float64, ``|shortcut(x_r, y) - |x_r - y|^2| <= err[r]`` for every row ``y``;
        rel: the relative error bound of a direct distance.
    """
    u = torch.finfo(torch.float64).eps / 2
    nu = (dim + 2) * u
    rel = nu / (1.0 - nu)
    top = sq_norms.max() if key_max is None else key_max
    return 4.0 * rel * (sq_norms + top), rel


def norm_bounds(sq_norms: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 upper bounds on the Euclidean norms of rows whose squared norms ``sq_norms`` were
    computed in their dtype as sums of ``dim`` squares (any order, FMA or not; also ``vector_norm``
    squared): each of at most ``dim + 3`` roundings (squares, additions, a square root and its square)
    shrinks a sum of non-negative terms by at most a factor ``1 - u``, and a square that underflows
    loses at most ``tiny``. So ``|x|^2 <= (computed + D tiny) / (1 - u)^(D + 4)``, for any D."""
    fi = torch.finfo(sq_norms.dtype)
    u, u64 = fi.eps / 2, torch.finfo(torch.float64).eps / 2
    grow = math.exp(-(dim + 4) * math.log1p(-u)) * (1.0 + 4.0 * u64)
    return ((sq_norms.to(torch.float64) + dim * fi.tiny) * grow).sqrt() * (1.0 + 2.0 * u64)


def centring_floor(
    floor_c: torch.Tensor, norms: torch.Tensor, norm_max, dtype: torch.dtype, dim: int
) -> torch.Tensor:
    """A lower bound on ``|x_i - x_j|^2`` for the user's points from one, ``F``, on ``|xc_i - xc_j|^2``
    for their centred copies (what the engines' shortcut distances bound), for every row ``j``.

    Derivation. The centred points are ``xc_i = fl(x_i - m~)``: the exact point (float16/bfloat16/
    float32 -> float32 and float64 -> float64 are exact) minus one mean ``m~``, the same for every row,
    rounded once to ``dtype`` (unit roundoff ``u``; :func:`centre`). Rounding to nearest gives, per
    coordinate, ``fl(a) = a / (1 + d)`` with ``|d| <= u``, so ``xc_ic = (x_ic - m~_c) + e_ic`` with
    ``|e_ic| = |d xc_ic| <= u |xc_ic|`` (the error relative to the rounded result), hence
    ``|e_i| <= u |xc_i|`` for the error vector of a row. The mean cancels in a difference of two rows,
    ``xc_i - xc_j = (x_i - x_j) + (e_i - e_j)``, and by the triangle inequality::

        | |xc_i - xc_j| - |x_i - x_j| | <= |e_i| + |e_j| <= u (|xc_i| + |xc_j|).

    (A coordinate in the subnormal range has an absolute error of at most ``tiny`` instead, flushed
    to zero or not: ``2 sqrt(D) tiny`` more for the pair.) With ``|xc_j| <= norm_max`` for every row
    ``j`` and ``c_i = u (|xc_i| + norm_max) + 2 sqrt(D) tiny``: ``|x_i - x_j| >= sqrt(F) - c_i``, so
    ``|x_i - x_j|^2 >= (sqrt(F) - c_i)^2`` where ``sqrt(F) > c_i``, and ``>= 0`` otherwise. Evaluated in
    float64 and shrunk by a few float64 units of its own rounding (sqrt, subtraction, square).

    Args:
        floor_c: (M,) the bounds ``F`` (any float dtype; negative and NaN count as 0).
        norms: (M,) upper bounds on ``|xc_i|`` (:func:`norm_bounds`).
        norm_max: upper bound on ``|xc_j|`` over the rows ``j`` that ``F`` covers (0-d tensor or float,
            or (M,) per row: the window of :func:`competitor_radius`).
        dtype: the dtype the centred points were rounded to.
        dim: D.

    Returns:
        (M,) float64 lower bounds on ``|x_i - x_j|^2`` (``inf`` where ``F`` is).
    """
    fi = torch.finfo(dtype)
    u64 = torch.finfo(torch.float64).eps / 2
    c = (fi.eps / 2 * (norms.to(torch.float64) + norm_max) + 2.0 * math.sqrt(dim) * fi.tiny) * (1.0 + 8.0 * u64)
    s = floor_c.to(torch.float64).clamp_min(0).sqrt() * (1.0 - 4.0 * u64) - c
    return torch.where(s > 0, s * s * (1.0 - 4.0 * u64), torch.zeros_like(s))


def competitor_radius(
    norms: torch.Tensor,
    kth_sq: torch.Tensor,
    dim: int,
    centred: Optional[torch.dtype] = None,
    norm_max=None,
) -> torch.Tensor:
    """Per row, the largest norm a point can have and still compete for the row's first k neighbours:
    ``W_i`` such that every row j with ``|xc_j| > W_i`` lies at a true distance ``>= sqrt(kth_sq[i])``
    from row i, so the certification only has to bound the engine's error for rows with
    ``|xc_j| <= W_i``. This is what keeps a few rows of huge norm (massive activations) from loosening
    every other row's certificate: an error bound that grows with ``|xc_j|^2`` is evaluated at ``W_i``
    (about ``|xc_i| + r_k``), not at the largest norm of the data set.

    Derivation. Nothing centred (``centred=None``, the shortcut ran on the points themselves): the
    triangle inequality gives ``|x_i - x_j| >= |x_j| - |x_i|``, so ``W_i = |x_i| + sqrt(kth_sq[i])``.
    Centred into ``centred`` (unit roundoff ``u``; ``xc = fl(x - m~)``, :func:`centring_floor`): the
    distance of the points as given is at least the centred one minus the rounding of both rows,
    ``|x_i - x_j| >= |xc_i - xc_j| - u (|xc_i| + |xc_j|) - t`` with ``t = 2 sqrt(D) tiny`` for
    subnormal coordinates, and ``|xc_i - xc_j| >= |xc_j| - |xc_i|``, so::

        |x_i - x_j| >= (1 - u) |xc_j| - (1 + u) |xc_i| - t  >  sqrt(kth_sq[i])
            whenever  |xc_j| > W_i = ((1 + u) |xc_i| + sqrt(kth_sq[i]) + t) / (1 - u).

    Evaluated in float64 from upper bounds on ``|xc_i|`` and grown by a few float64 units of its own
    rounding; capped at ``norm_max`` (an upper bound on every row's norm, past which there is nothing
    to exclude). A NaN threshold gives ``norm_max`` (or ``inf``).

    Args:
        norms: (M,) float64 upper bounds on ``|xc_i|`` (:func:`norm_bounds`).
        kth_sq: (M,) the squared distance each row must be certified at (its k-th re-ranked distance).
        dim: D.
        centred: the dtype the centred points were rounded to; None: nothing centred.
        norm_max: optional upper bound on the norm of every row (0-d tensor or float).

    Returns:
        (M,) float64 radii ``W_i``.
    """
    u64 = torch.finfo(torch.float64).eps / 2
    r = kth_sq.to(torch.float64).clamp_min(0).sqrt()
    norms = norms.to(torch.float64)
    if centred is None:
        w = norms + r
    else:
        fi = torch.finfo(centred)
        u = fi.eps / 2
        w = ((1.0 + u) * norms + r + 2.0 * math.sqrt(dim) * fi.tiny) / (1.0 - u)
    w = w * (1.0 + 8.0 * u64)
    w = torch.where(torch.isnan(w), torch.full_like(w, float("inf")), w)
    if norm_max is not None:
        w = torch.minimum(w, torch.as_tensor(norm_max, dtype=torch.float64, device=w.device))
    return w


def float64_floor(
    sc_last: torch.Tensor,
    sq_q: torch.Tensor,
    sq_key_max: torch.Tensor,
    dim: int,
    centred: Optional[torch.dtype] = torch.float64,
) -> torch.Tensor:
    """The smallest float64 direct squared distance, on the points as given, that a key which is not a
    candidate can have: the float64 shortcut (on the centred points) of every non-candidate is at
    least ``sc_last`` (the row's kc-th), its true centred distance at least that minus
    :func:`float64_shortcut_error`, its true distance on the points at least :func:`centring_floor` of
    that, and the direct distance computed from them at least that times ``1 - gamma_{D+2}``.

    Args:
        sc_last: (M,) float64 kc-th shortcut distance of each row.
        sq_q: (M,) float64 squared norms (computed in float64) of the centred query rows the shortcut
            used.
        sq_key_max: 0-d float64 largest squared norm of the keys the bound covers.
        dim: D.
        centred: the dtype the centred points were rounded to (``fl(x - m)`` with one ``m`` for all
            rows: float64 for the reference's own centring, float32 for the engines' centred points
            converted to float64); None: the shortcut ran on the points themselves.

    Returns:
        (M,) float64; a row whose k-th direct distance is below it is certified.
    """
    err, rel = float64_shortcut_error(sq_q, dim, key_max=sq_key_max)
    f = sc_last - err
    if centred is not None:
        f = centring_floor(f, norm_bounds(sq_q, dim), norm_bounds(sq_key_max, dim), centred, dim)
    return f * (1.0 - rel)


def _reference_rows(
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
    float64 chunk and their distance tile stay within :func:`chunk_bytes`, whatever N; each block
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
            kk = min(kc, c1 - c0)
            td, ti = torch.topk(tile, kk, dim=1, largest=False)
            del tile
            cd = torch.cat([best_d, td], 1)
            ci = torch.cat([best_i, ti + c0], 1)
            best_d, sel = torch.topk(cd, kc, dim=1, largest=False, sorted=True)
            best_i = torch.gather(ci, 1, sel)
        sq_max = top if sq_max is None else sq_max
        sc = best_d
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



def _uncertified(
    kth: torch.Tensor,
    cand_last: torch.Tensor,
    err,
    xc: torch.Tensor,
    sq: Optional[torch.Tensor],
    centred: bool,
) -> torch.Tensor:
    """Rows whose k-th re-ranked distance ``kth`` a non-candidate might undercut: the certification of
    :func:`knn_exact`, per row and outlier-aware.

    Row i is certified when every row j that is not among its candidates has a true squared distance
    (on the points as given) of at least ``kth[i]``. Split the rows j by their centred norm at
    ``W_i`` (:func:`competitor_radius`): beyond it, the triangle inequality alone puts j at least
    ``sqrt(kth[i])`` away. Within it, the engine's approximate distance of j is at least the row's
    kc-th candidate value ``cand_last[i]`` (the engine's contract), so its true centred squared distance
    is at least ``cand_last[i] - err_i(W_i)``, with the engine's error bound evaluated for keys of norm
    at most ``W_i`` (:func:`gelora.backends.error_rows`), and its true distance on the points at least
    :func:`centring_floor` of that with ``W_i`` as the largest key norm. The row is certified when
    ``kth[i]`` is at most that floor. Neither term uses the largest norm of the data set unless a row's
    own window reaches it, so a few rows of huge norm (massive activations) fail alone.

    Args:
        kth: (N,) k-th re-ranked squared distances (dtype of ``xc``).
        cand_last: (N,) the engine's kc-th approximate squared distances.
        err: the engine's error bound (tensor, scalar or :class:`gelora.backends.NormScaledError`).
        xc: (N, D) the searched (centred) points. sq: (N,) their squared norms, or None.
        centred: whether ``xc`` is a centred copy of the points the distances are of.

    Returns:
        (M,) int64 indices of the rows that fail (NaN fails).
    """
    d = xc.shape[1]
    if sq is None:
        sq = torch.linalg.vector_norm(xc, dim=1).square_()
    nb = norm_bounds(sq.to(xc.device), d)
    t = kth.to(torch.float64)
    w = competitor_radius(nb, t, d, xc.dtype if centred else None, nb.max())
    floor = cand_last.to(torch.float64) - error_rows(err, w, device=xc.device)
    if centred:
        floor = centring_floor(floor, nb, w, xc.dtype, d)
    return torch.nonzero(~(t <= floor)).flatten()


#: A failing row is searched in its norm shell (:func:`_norm_shell_rows`) when the shell holds at most
#: this fraction of the points (or :data:`SHELL_MIN_POINTS`); wider shells go to the float64 reference.
SHELL_MAX_FRACTION = 1.0 / 16
SHELL_MIN_POINTS = 2048


def _norm_shell_rows(
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


def knn_exact(
    xc: torch.Tensor,
    k: int,
    engine: KnnBackend,
    src_dtype: Optional[torch.dtype] = None,
    *,
    points: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """k nearest neighbours of the points, searched by ``engine`` on their centred copy ``xc``,
    re-ranked on the points themselves, and certified.

    Args:
        xc: (N, D) centred points (:func:`centre_and_mean`), float32 (float64 for float64 points).
        k: neighbours per row. engine: the candidate engine. src_dtype: dtype of the user's input.
        points: (N, D) the points as given (any float dtype, the device of ``xc``; converted exactly
            to the dtype of ``xc`` a chunk at a time, float32 and float64 not copied): the distances
            returned are theirs, with one rounding per term. None: ``xc`` itself (nothing centred).
        mean: (D,) float64 mean that ``xc`` was centred with; the float64 recomputation of failing rows
            centres ``points`` with it (computed there when not given).

    Returns:
        dist: (N, k) float32 (float64 for float64 ``xc``) Euclidean distances, ascending.
        idx: (N, k) int64.
        n_fixed: rows the certification sent to the float64 reference.
    """
    n, d = xc.shape
    centred = points is not None and points is not xc
    if points is None:
        points = xc
    kc = min(n - 1, k + engine.extra_candidates)
    cand_d2, cand_idx, err, sq = engine.search_with_norms(xc, kc, src_dtype=src_dtype)
    rerank = getattr(engine, "rerank", None)
    if rerank is not None:
        exact = rerank(points if points.dtype == xc.dtype else points.to(xc.dtype), cand_idx)
    else:
        exact = direct_sq_dist(points, None, cand_idx, dtype=xc.dtype)
    exact, order = torch.sort(exact, dim=1, stable=True)
    idx = torch.gather(cand_idx, 1, order)[:, :k]
    d2 = exact[:, :k]
    n_fixed = 0
    if kc < n - 1:
        bad = _uncertified(d2[:, -1], cand_d2[:, -1], err, xc, sq, centred)
        if bad.numel():
            n_fixed = int(bad.numel())
            d2 = d2.clone()
            # rows with few points in their norm shell (outliers) first: exact, O(shell * D) each
            done, wd2, wi = _norm_shell_rows(points, xc, bad, k, d2[bad, -1], centred)
            if done.numel():
                d2[bad[done]] = wd2.to(d2.dtype)
                idx[bad[done]] = wi
                rest = torch.ones(bad.numel(), dtype=torch.bool, device=bad.device)
                rest[done] = False
                bad = bad[rest]
        if bad.numel():
            if centred:
                fd2, fi = _reference_rows(points, bad, k, xc=xc, mean=mean)
            else:
                fd2, fi = _reference_rows(xc, bad, k)
            d2[bad] = fd2.to(d2.dtype)
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
        dist: (N, k) float32 Euclidean distances (not squared), ascending per row, in the units of ``x``.
            Points far from 1 (``max|x|`` outside ``[2^-32, 2^32)``) are searched scaled by a power of
            two (exact; :func:`gelora._input.power_of_two_scale`) and the distances scaled back in
            float64: one beyond float32's range comes back ``inf`` (above ~3.4e38) or subnormal/0
            (below ~1.2e-38); ``idx`` is exact either way.
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
    scale = power_of_two_scale(xt)
    if scale != 1.0:
        xt = xt * scale
    xc, mean = centre_and_mean(xt, _compute_dtype(xt, engine))
    dist, idx, _ = knn_exact(xc, k, engine, xt.dtype, points=xt, mean=mean)
    return unscale_distances(dist, scale).float(), idx


def _compute_dtype(x: torch.Tensor, engine: KnnBackend) -> torch.dtype:
    """float64 stays float64; everything else is centred into float32 (engines that want half precision
    tiles cast their tile operands themselves and report the larger error bound)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
