"""The k nearest neighbours that the multiscale estimators (:mod:`gelora.id.gride`, :mod:`gelora.id.mle`)
start from: the input checks, the power-of-two scale, duplicates collapsed (:mod:`gelora.id.dedup`) and
one exact search of the distinct points (:func:`search_k`).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch

from ..neighbours.engines.registry import select_backend
from ..neighbours.inputs import ArrayLike, as_points, check_points, power_of_two_scale
from ..neighbours.pipeline import knn_checked
from .dedup import hash_coef, unique_rows


class KNeighbours(NamedTuple):
    """What :func:`search_k` found.

    Attributes:
        dist: (M, k) float32 exact Euclidean distances of the kept rows to their k nearest other rows,
            ascending, in the units of the points times ``scale``.
        idx: (M, k) int64 neighbour indices among the kept rows.
        keep: (M,) int64 indices of the kept rows among the N points (all of them without dedup).
        n_points: N, points after the mask. n_duplicates: N - M with dedup, else 0.
        backend: the kNN engine that searched. scale: the power of two the points were multiplied by.
    """

    dist: torch.Tensor
    idx: torch.Tensor
    keep: torch.Tensor
    n_points: int
    n_duplicates: int
    backend: str
    scale: float


def check_int(value, name: str, lowest: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not an integer >= ``lowest``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    return int(value)


def distinct_points(x: ArrayLike, *, dedup: bool, mask: Optional[ArrayLike], what: str):
    """The checked (M, D) points (NaN/Inf rejected as in :func:`gelora.twonn`), multiplied by the power of
    two that keeps float32 distances in range, duplicates collapsed when ``dedup``.

    Returns:
        (points, keep, n_points, n_duplicates, scale, mean): ``mean`` the (D,) float64 column mean of
        the returned points when the finiteness pass gave it and no row was dropped, else None.
    """
    xt = as_points(x, mask, check_finite=False, min_points=1)
    scale = power_of_two_scale(xt)  # 1.0 for NaN/Inf, which check_points rejects
    if scale != 1.0:
        xt = xt * scale
    hashes, mean = check_points(xt, coef=hash_coef(xt.shape[1]) if dedup else None)
    n_points = xt.shape[0]
    keep = torch.arange(n_points, device=xt.device)
    n_dup = 0
    if dedup:
        keep, n_dup = unique_rows(xt, hashes)
        if n_dup:
            xt = xt[keep]
            mean = None
    if xt.shape[0] < 3:
        kind = "distinct " if dedup else ""
        raise ValueError(f"{what}: only {xt.shape[0]} {kind}point(s) among {n_points}; need at least 3")
    return xt, keep, n_points, int(n_dup), scale, mean


def knn_distinct(points: torch.Tensor, k: int, backend: Optional[str], mean: Optional[torch.Tensor] = None):
    """Exact k nearest neighbours of prepared points (:func:`distinct_points`, ``mean`` its column mean
    or None): ``(dist, idx, engine)``, dist (M, k) float32 ascending, idx (M, k) int64, self excluded
    by index. The one place the estimators call the kNN search."""
    engine = select_backend(points, backend, k=k)
    dist, idx = knn_checked(points, k, engine, mean=mean)
    return dist.float(), idx, engine.name


def search_k(
    x: ArrayLike,
    k: int,
    *,
    dedup: bool = True,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
    what: str = "knn",
) -> KNeighbours:
    """Exact k nearest neighbours of the distinct points of ``x``.

    Args:
        x: (N, D) points or (B, T, D) hidden states, any float dtype, any device a backend supports.
        k: neighbours per point: an int >= 1 below the number M of (distinct) points, or a callable
            ``M -> k`` (the estimator's choice once M is known).
        dedup: collapse exact duplicate rows first (:func:`gelora.unique_rows`).
        backend: force a kNN engine; mask: optional (B, T) token mask; what: the caller's name for errors.

    Raises:
        ValueError: NaN/Inf, fewer than 3 (distinct) points, ``k`` not an int >= 1 or not below the
            number of (distinct) points; and what :func:`gelora.knn` raises.
    """
    if not callable(k):
        check_int(k, "k", 1)
    xt, keep, n_points, n_dup, scale, mean = distinct_points(x, dedup=dedup, mask=mask, what=what)
    m = xt.shape[0]
    if callable(k):
        k = k(m)
    if k >= m:
        kind = "distinct " if dedup else ""
        raise ValueError(f"{what}: k={k} neighbours need at least k + 1 = {k + 1} {kind}points; got {m}")
    dist, idx, name = knn_distinct(xt, k, backend, mean)
    return KNeighbours(dist, idx, keep, n_points, n_dup, name, scale)
