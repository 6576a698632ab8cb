"""The certificate of the exact kNN pipeline: rigorous bounds, with their derivations, that decide per row
whether the engine's candidates are the exact neighbours.

:func:`uncertified_rows` is the test :func:`gelora.neighbours.pipeline.knn_exact` applies: per row, the engine's
error bound and the centring's rounding are evaluated at the norms that can compete for the row's
neighbours (:func:`competitor_radius`), so a few rows of huge norm (massive activations) fail alone.
:func:`float64_floor` is the float64 reference's own (worst-case) certificate.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .engines.base import error_rows

def float64_shortcut_error(
    sq_norms: torch.Tensor, dim: int, key_max: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, float]:
    """Worst-case rounding bounds of the float64 search of :func:`gelora.neighbours.reference.reference_rows`.

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


def uncertified_rows(
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
    at most ``W_i`` (:func:`gelora.neighbours.engines.base.error_rows`), and its true distance on the points at least
    :func:`centring_floor` of that with ``W_i`` as the largest key norm. The row is certified when
    ``kth[i]`` is at most that floor. Neither term uses the largest norm of the data set unless a row's
    own window reaches it, so a few rows of huge norm (massive activations) fail alone.

    Args:
        kth: (N,) k-th re-ranked squared distances (dtype of ``xc``).
        cand_last: (N,) the engine's kc-th approximate squared distances.
        err: the engine's error bound (tensor, scalar or :class:`gelora.neighbours.engines.base.NormScaledError`).
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
