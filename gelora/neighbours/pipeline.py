"""Exact k nearest neighbours of a point set with itself: the pipeline every backend shares.

1. centre the points (the mean is taken in float64): the ``|x|^2 + |y|^2 - 2<x,y>`` shortcut that
   fast engines use loses ``~u * |x|^2`` absolute accuracy, so large offsets must go first;
2. the backend returns ``kc > k`` *candidates* per row with approximate squared distances of the
   centred points and an error bound (:meth:`gelora.neighbours.engines.base.KnnBackend.search`);
3. the candidates are re-ranked with distances computed directly, ``sum((x - y)^2)`` in float32 (float64
   for float64 input), on the user's points as given (not the centred ones: centring into float32
   rounds every coordinate once more, by up to ``u |x - mean|``, which is not small against the
   neighbour distances of a tight cluster far from the mean). Exact duplicates get exactly 0, never a
   fake ``1e-2`` from cancellation;
4. certification, per row (:func:`gelora.neighbours.certify.uncertified_rows`): a row is exact when its re-ranked k-th distance is
   below the smallest distance any non-candidate can have (the backend's kc-th approximate distance
   minus its error bound, moved by the centring's rounding, :func:`centring_floor`), with both bounds
   evaluated at the norms that can compete for the row's neighbours (:func:`competitor_radius`), so a
   few rows of huge norm (massive activations) do not loosen the others'. Rows that fail are searched
   exactly in their norm shell when it is thin (:func:`gelora.neighbours.reference.norm_shell_rows`: the outlier rows), else
   recomputed by the streamed float64 reference (:func:`gelora.neighbours.reference.reference_rows`, within :func:`gelora.neighbours.points.chunk_bytes`
   of working memory), so the answer never depends on the engine's rounding.

:func:`knn_reference` is the float64 reference that tests and benchmarks compare against. It runs the
same pipeline in float64 with a worst-case (not probabilistic) bound on the shortcut's rounding
(:func:`float64_shortcut_error`), and a row it cannot certify gets a brute-force direct-difference
search over all points, so it is exact even where float64 cannot separate the neighbours through the
shortcut (points far from the mean relative to their neighbour distances).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..distributed import knn2_distributed
from .certify import uncertified_rows
from .engines.base import KnnBackend
from .engines.registry import select_backend
from .inputs import ArrayLike, as_points, check_k, k_points_need, power_of_two_scale, unscale_distances
from .points import centre_and_mean
from .reference import norm_shell_rows, reference_rows

def knn_exact(
    xc: torch.Tensor,
    k: int,
    engine: KnnBackend,
    *,
    points: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """k nearest neighbours of the points, searched by ``engine`` on their centred copy ``xc``,
    re-ranked on the points themselves, and certified.

    Args:
        xc: (N, D) centred points (:func:`centre_and_mean`), float32 (float64 for float64 points).
        k: neighbours per row, ``1 <= k <= N - 1`` and at most the engine's ``max_candidates``.
        engine: the candidate engine; it is asked for ``kc`` = :meth:`KnnBackend.candidates_for`
            candidates, ``k`` plus its extra ones where it can keep them. The certificate compares the
            k-th re-ranked distance with the kc-th candidate value, so it holds for any ``kc >= k``.
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
    kc = engine.candidates_for(k, n)
    cand_d2, cand_idx, err, sq = engine.search(xc, kc)
    exact = engine.rerank(points if points.dtype == xc.dtype else points.to(xc.dtype), cand_idx)
    exact, order = torch.sort(exact, dim=1, stable=True)
    idx = torch.gather(cand_idx, 1, order)[:, :k]
    d2 = exact[:, :k]
    n_fixed = 0
    if kc < n - 1:
        bad = uncertified_rows(d2[:, -1], cand_d2[:, -1], err, xc, sq, centred)
        if bad.numel():
            n_fixed = int(bad.numel())
            d2 = d2.clone()
            # rows with few points in their norm shell (outliers) first: exact, O(shell * D) each
            done, wd2, wi = norm_shell_rows(points, xc, bad, k, d2[bad, -1], centred)
            if done.numel():
                d2[bad[done]] = wd2.to(d2.dtype)
                idx[bad[done]] = wi
                rest = torch.ones(bad.numel(), dtype=torch.bool, device=bad.device)
                rest[done] = False
                bad = bad[rest]
        if bad.numel():
            if centred:
                fd2, fi = reference_rows(points, bad, k, xc=xc, mean=mean)
            else:
                fd2, fi = reference_rows(xc, bad, k)
            d2[bad] = fd2.to(d2.dtype)
            idx[bad] = fi
    dist = d2.clamp_min(0).sqrt()
    if dist.dtype not in (torch.float32, torch.float64):
        dist = dist.float()
    return dist, idx, n_fixed


def knn(
    x: ArrayLike,
    k: int,
    *,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of every row of ``x`` among the other rows.

    The engine proposes candidates, which are re-ranked with directly computed distances and certified
    per row; rows the certificate cannot vouch for are searched again exactly (:func:`knn_exact`), so
    the answer does not depend on the engine's rounding.

    Args:
        x: (N, D) or (B, T, D) tensor/array (float16, bfloat16, float32, float64; any device a backend
            supports). (B, T, D) is flattened to tokens.
        k: neighbours per row, an integer with ``1 <= k <= N - 1``. Every engine serves k up to its
            ``max_candidates`` (Triton: :data:`gelora.neighbours.engines.triton.MAX_KC`; the C++ core,
            FAISS and torch: no practical limit); automatic selection skips an engine that cannot,
            and a forced one raises with its limit.
        backend: force ``"triton"``, ``"cpp"``, ``"faiss"`` or ``"torch"``; default: the first usable.
        mask: optional boolean (B, T) token mask (True keeps a token).

    Returns:
        dist: (N, k) float32 Euclidean distances (not squared), ascending per row, in the units of ``x``.
            Points far from 1 (``max|x|`` outside ``[2^-32, 2^32)``) are searched scaled by a power of
            two (exact; :func:`gelora.neighbours.inputs.power_of_two_scale`) and the distances scaled
            back in float64: one beyond float32's range comes back ``inf`` (above ~3.4e38) or
            subnormal/0 (below ~1.2e-38); ``idx`` is exact either way.
        idx: (N, k) int64 neighbour indices (into the masked, flattened points). A point is never its
            own neighbour (excluded by index, not by distance): a duplicate of it is a neighbour at
            distance 0, so duplicates count as points here (k needs more points, not more distinct
            ones; an estimator that collapses duplicates checks the distinct count itself). Among
            equal distances the order of the indices is unspecified.

    Raises:
        TypeError: ``k`` is not an integer (a bool or a float is not one).
        ValueError: ``k < 1``, ``k >= N``, NaN/Inf in ``x``, or bad shapes (:func:`as_points`).
        gelora.BackendUnavailable: the forced engine cannot run here or cannot keep ``k`` candidates.
    """
    k = check_k(k)
    xt = as_points(x, mask, min_points=k + 1, need=k_points_need(k))
    engine = select_backend(xt, backend, k=k)
    scale = power_of_two_scale(xt)
    if scale != 1.0:
        xt = xt * scale
    dist, idx = knn_checked(xt, k, engine)
    return unscale_distances(dist, scale).float(), idx


def knn_checked(
    xt: torch.Tensor, k: int, engine: KnnBackend, *, mean: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn` of points that are already checked (finite, ``1 <= k < N``) and in range
    (:func:`power_of_two_scale` is 1 for them): centred, searched by ``engine`` and certified
    (:func:`knn_exact`). For callers that prepared the points themselves (the estimators of
    :mod:`gelora.id`), so that the points are not read again for checks they passed; ``mean``: their
    (D,) float64 column mean when the caller has it (see :func:`centre`).

    Returns:
        dist: (N, k) Euclidean distances (float32; float64 for float64 points), ascending; idx: (N, k).
    """
    xc, mean = centre_and_mean(xt, compute_dtype(xt), mean=mean)
    dist, idx, _ = knn_exact(xc, k, engine, points=xt, mean=mean)
    return dist, idx


def knn2(
    x: ArrayLike,
    *,
    k: int = 2,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
    group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest neighbours of every row of ``x`` among the other rows: :func:`knn` with ``k = 2``
    (TwoNN's two) by default, and the distributed search over a process group.

    Args:
        x, k, backend, mask: as for :func:`knn`.
        group: a ``torch.distributed`` process group (``True``: the default group): ``x`` is this rank's
            shard and indices are global (see :func:`gelora.distributed.knn2_distributed`).

    Returns:
        dist: (N, k) float32 distances, ascending; idx: (N, k) int64 indices (see :func:`knn`).
    """
    k = check_k(k)
    if group is not None and group is not False:
        if mask is not None:
            x = as_points(x, mask, min_points=1)
        return knn2_distributed(x, k=k, group=None if group is True else group, backend=backend)
    return knn(x, k, backend=backend, mask=mask)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the points are centred into for the search: float64 stays float64, everything else is
    float32 (engines that want half-precision tiles round their operands themselves and report the
    larger error bound)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
