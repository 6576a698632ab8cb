"""GRIDE, the generalised ratios ID estimator (Denti, Doimo, Laio, Mira, Sci. Rep. 12, 2022), at the
scales n1 = 1, 2, 4, ... (the neighbour orders), as DADApy's ``Data.return_id_scaling_gride``.

For every point, ``mu = r_n2 / r_n1`` (distances to its n2-th and n1-th nearest neighbour, n2 = 2 n1).
On a locally uniform d-dimensional manifold ``mu`` has the density

    f(mu) = d (mu^d - 1)^(n2 - n1 - 1) / (B(n2 - n1, n1) mu^((n2 - 1) d + 1)),   mu > 1,

and the ID at scale n1 maximises the log-likelihood, with DADApy's ``(N - 1) log d`` in place of
``N log d`` (at n1 = 1 the estimate is TwoNN's unbiased MLE ``(N - 1) / sum(log mu)``). Its score

    g(d) = (N - 1) / d + (n2 - n1 - 1) sum(l / (1 - exp(-d l))) - (n2 - 1) sum(l),   l = log mu,

is strictly decreasing and convex in d (the log-likelihood is concave), with the root bracketed by
``[c / ((n2 - 1) L), c / (n1 L)]``, ``c = N - 1 + (n2 - n1 - 1) N``, ``L = sum(l)`` (from
``1/d <= l / (1 - exp(-d l)) <= 1/d + l``). :func:`solve_scores` runs a safeguarded Newton iteration in
that bracket for every scale at once, to float64 precision (DADApy bisects to 1e-7).

Following DADApy: ratios ``mu >= q50 + 20 (q95 - q50)`` (percentiles of mu) are left out of the
maximisation as likely overlapping points; the standard error is ``1 / sqrt(I)`` with the observed
information ``I = N / d^2 + (n2 - n1 - 1) sum(l^2 mu^-d / (1 - mu^-d)^2)`` over all ratios (filtered
ones included); ``scales`` (DADApy's ``rs``) is the mean over the points of ``(r_n1 + r_n2) / 2``.

Duplicates and ties
-------------------
With ``dedup=True`` (default) exact duplicate rows are collapsed first (:mod:`gelora.id.dedup`), so the
curve is that of the distinct points, and equals DADApy's on the deduplicated data. DADApy instead
replaces zero distances by float64's epsilon: a point whose n1-th neighbour is a copy gets ``mu ~ 1e15``,
which its outlier cut removes only while such points are fewer than about 5% (beyond, they drag the ID
towards 0: 18% of such points give 0.19 for a 4-dimensional set, see tests/test_gride.py), and one
whose n1-th and n2-th neighbours are both copies gets ``mu = 1``, which raises ``N`` without adding to
``sum(l)`` (an ID pushed up). Neither says anything about the manifold: a copy is the same point.
With ``dedup=False`` gelora drops, per scale, the points with ``r_n1 = 0`` (counted in ``n_zero``, with a
warning). A genuine tie ``r_n2 = r_n1 > 0``
(lattices) enters with the limit of its terms (``l / (1 - exp(-d l)) -> 1/d``); DADApy nudges it to
``1 + 1e-15`` and clips its score term to about 0, so on tied data at n1 >= 2 the two differ
(scikit-dimension's ``GRIDE`` drops ties).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..neighbours.inputs import ArrayLike
from .kneighbours import check_int, search_k


@dataclass(frozen=True)
class GrideResult:
    """Result of :func:`gride`: one entry per scale (neighbour order ``n1``, ``n2 = 2 n1``).

    Attributes:
        ids: (S,) float64 ID estimates.
        stderr: (S,) float64 standard errors (inverse square root of the observed information).
        scales: (S,) float64 mean of ``(r_n1 + r_n2) / 2`` over the points, in the units of ``x``
            (DADApy's ``rs``).
        n1: (S,) int64 neighbour orders 1, 2, 4, ...; ``n2 = 2 n1`` up to the largest power of two
            ``<= min(range_max, M - 1)``.
        n_used: (S,) int64 ratios in the likelihood maximisation (after the filter).
        n_zero: (S,) int64 points dropped for ``r_n1 = 0`` (``dedup=False`` only).
        n_points, n_duplicates: points after the mask; rows collapsed as exact duplicates.
        backend: the kNN engine. range_max: as asked.
        mu: (M, S) float64 ratios ``r_n2 / r_n1`` on the host (NaN where ``r_n1 = 0``).
    """

    ids: torch.Tensor
    stderr: torch.Tensor
    scales: torch.Tensor
    n1: torch.Tensor
    n_used: torch.Tensor
    n_zero: torch.Tensor
    n_points: int
    n_duplicates: int
    backend: str
    range_max: int
    mu: Optional[torch.Tensor] = field(default=None, repr=False)

    def id_at(self, n1: int) -> float:
        """The ID at neighbour order ``n1`` (one of :attr:`n1`)."""
        hit = (self.n1 == int(n1)).nonzero().flatten()
        if not hit.numel():
            raise ValueError(f"n1={n1!r} is not among the scales {self.n1.tolist()}")
        return float(self.ids[hit[0]])


def gride(
    x: ArrayLike,
    *,
    range_max: int = 64,
    dedup: bool = True,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
) -> GrideResult:
    """GRIDE intrinsic dimension at the neighbour orders n1 = 1, 2, 4, ... (see the module docstring).

    Args:
        x: (N, D) points or (B, T, D) hidden states (flattened to tokens); torch tensor or numpy array,
            float16, bfloat16, float32 or float64, on any device a backend supports.
        range_max: largest neighbour order n2 (an int >= 2); the scales stop at the largest power of two
            ``<= min(range_max, M - 1)`` for M (distinct) points, as DADApy's and scikit-dimension's.
        dedup: collapse exact duplicate rows first (see the duplicates policy above).
        backend: force a kNN engine (``"triton"``, ``"cpp"``, ``"faiss"``, ``"torch"``).
        mask: optional boolean (B, T) token mask (True keeps a token).

    Returns:
        :class:`GrideResult`; the IDs do not depend on the units of ``x``.

    Raises:
        TypeError: unsupported dtype or input type.
        ValueError: ``range_max`` not an int >= 2, bad shape, NaN/Inf, fewer than 3 (distinct) points,
            a scale with fewer than 2 usable ratios or all of them tied.
        gelora.BackendUnavailable: a forced backend cannot run on this input.
    """
    return _gride(x, range_max=range_max, dedup=dedup, backend=backend, mask=mask)[0]


def gride_rows(x: torch.Tensor, *, range_max: int = 64, backend: Optional[str] = None):
    """:func:`gride` of the rows of ``x`` (duplicates collapsed) and the ratio of every row at every scale,
    in row order, for a bootstrap over points that several sets share (:mod:`gelora.id.paired`).

    Args:
        x: (N, D) float tensor, any device a backend supports. range_max, backend: as for :func:`gride`.

    Returns:
        (result, log_mu): ``result`` as :func:`gride` gives it on ``x``; ``log_mu`` (N, S) float64 on the
        CPU, ``log(r_n2 / r_n1)`` of row j at scale s where that ratio entered the likelihood
        maximisation, ``NaN`` where it did not: a later copy of an earlier row, or a ratio above the
        outlier cut (the replicates of a bootstrap keep the cut of the full sample).

    Raises:
        ValueError: as :func:`gride`; ``x`` not (N, D).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be an (N, D) tensor, got {getattr(x, 'shape', type(x))}")
    out, found, res = _gride(x, range_max=range_max, dedup=True, backend=backend, mask=None)
    lm = torch.full((x.shape[0], out.n1.numel()), float("nan"), dtype=torch.float64)
    used = res["used"]
    lm[found.keep.cpu()] = torch.where(used, torch.log(torch.where(used, res["mu"], 1.0)), float("nan"))
    return out, lm


def _gride(x: ArrayLike, *, range_max: int, dedup: bool, backend: Optional[str], mask: Optional[ArrayLike]):
    """``(GrideResult, KNeighbours, the dict of gride_from_distances)`` of :func:`gride`."""
    range_max = check_int(range_max, "range_max", 2)
    found = search_k(x, lambda m: 1 << (min(range_max, m - 1).bit_length() - 1), dedup=dedup,
                     backend=backend, mask=mask, what="gride")
    res = gride_from_distances(found.dist, dedup=dedup)
    out = GrideResult(ids=res["ids"], stderr=res["stderr"], scales=res["scales"] / found.scale,
                      n1=res["n1"], n_used=res["n_used"], n_zero=res["n_zero"], n_points=found.n_points,
                      n_duplicates=found.n_duplicates, backend=found.backend, range_max=range_max,
                      mu=res["mu"])
    return out, found, res



# ---------------------------------------------------------------------------------------------------
# The estimator on the neighbour distances
# ---------------------------------------------------------------------------------------------------
def gride_from_distances(dist: torch.Tensor, *, dedup: bool = True) -> dict:
    """GRIDE at every scale n1 = 1, 2, 4, ... that the columns of ``dist`` allow (n2 = 2 n1 <= k).

    Args:
        dist: (M, k) distances of M points to their k nearest neighbours, ascending (any float dtype;
            computed in float64 on its device). Points with ``r_n1 = 0`` are dropped at that scale.
        dedup: whether the caller collapsed duplicates (only changes the warning).

    Returns:
        dict of (S,) CPU tensors ``ids``, ``stderr``, ``scales`` (in the units of ``dist``), ``n1``,
        ``n_used``, ``n_zero``, ``mu`` (M, S) float64 (NaN where ``r_n1 = 0``) and ``used`` (M, S) bool
        (the ratios in the likelihood maximisation: ``r_n1 > 0`` and below the outlier cut).
    """
    m, k = dist.shape
    if k < 2:
        raise ValueError(f"gride needs the distances to at least 2 neighbours per point, got {k}")
    n_scales = k.bit_length() - 1
    n1 = 2 ** torch.arange(n_scales, device=dist.device)
    r = dist.to(torch.float64)
    r1, r2 = r[:, n1 - 1], r[:, 2 * n1 - 1]
    ok = r1 > 0
    n_zero = (~ok).sum(0)
    if bool(n_zero.any()):
        how = ("distinct rows at distance 0 in float32" if dedup else
               "exact duplicates; pass dedup=True to collapse them instead")
        warnings.warn(f"gride: dropped points with r_n1 == 0 ({how}): {n_zero.tolist()} per scale",
                      stacklevel=3)
    mu = torch.where(ok, r2 / torch.where(ok, r1, 1.0), float("nan"))
    cnt = ok.sum(0)
    if int(cnt.min()) < 2:
        raise ValueError(f"gride: fewer than 2 points with r_n1 > 0 at some scale ({cnt.tolist()} "
                         f"for n1 = {n1.tolist()})")
    q95, q50 = _percentiles(mu, cnt, (0.95, 0.50))
    used = ok & (mu < (20 * (q95 - q50) + q50))  # DADApy's cut of likely overlapping points
    log_mu = torch.where(ok, torch.log(torch.where(ok, mu, 1.0)), 0.0)
    ids = solve_scores(torch.where(used, log_mu, 0.0), used, n1)
    info = cnt / ids**2 + (n1 - 1) * _curvature(log_mu, ok, ids).sum(0)
    scales = torch.where(ok, r1 + r2, 0.0).sum(0) / (2 * cnt)
    return dict(ids=ids.cpu(), stderr=info.rsqrt().cpu(), scales=scales.cpu(), n1=n1.cpu(),
                n_used=used.sum(0).cpu(), n_zero=n_zero.cpu(), mu=mu.cpu(), used=used.cpu())


def _percentiles(v: torch.Tensor, cnt: torch.Tensor, qs) -> list:
    """[(S,) the q-quantile of the ``cnt[s]`` finite values of every column of ``v`` (M, S), NaN elsewhere,
    for q in qs]; linearly interpolated exactly as ``numpy.percentile``'s default (its ``_lerp``).
    One sort of the rows of the transpose (a sort along dim 0 is several times slower)."""
    srt = torch.sort(torch.nan_to_num(v.T.contiguous(), nan=float("inf")), dim=1).values
    out = []
    for q in qs:
        h = q * (cnt - 1).to(torch.float64)
        lo = torch.floor(h).long()
        hi = torch.minimum(lo + 1, cnt - 1)
        t = h - lo
        a, b = srt.gather(1, lo[:, None]).squeeze(1), srt.gather(1, hi[:, None]).squeeze(1)
        diff = b - a
        out.append(torch.where(t >= 0.5, b - diff * (1 - t), a + diff * t))
    return out


def _inverse_term(log_mu: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``l / (1 - exp(-d l))`` (its limit ``1/d`` at l = 0), elementwise for (M, S) l and (S,) d."""
    x = d * log_mu
    return torch.where(log_mu > 0, log_mu / -torch.expm1(-torch.where(log_mu > 0, x, 1.0)), 1 / d)


def _curvature(log_mu: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``w * l^2 mu^-d / (1 - mu^-d)^2 = w * (l / (2 sinh(d l / 2)))^2`` (limit ``1/d^2`` at l = 0);
    ``w`` boolean (where to count) or float64 counts."""
    x = d * log_mu
    pos = log_mu > 0
    v = torch.where(pos, (log_mu / (2 * torch.sinh(torch.where(pos, x, 1.0) / 2))) ** 2, 1 / d**2)
    return torch.where(w, v, 0.0) if w.dtype == torch.bool else w * v


def solve_scores(log_mu: torch.Tensor, used: torch.Tensor, n1: torch.Tensor, max_iter: int = 100,
                 start: Optional[torch.Tensor] = None):
    """(S,) roots of the GRIDE scores of the columns of ``log_mu`` (M, S) float64, entries where
    ``used`` (M, S) is False set to 0 and ignored; neighbour orders ``n1`` (S,), ``n2 = 2 n1``.
    ``used`` may also be float64 counts (ratio ``[j, s]`` counted ``used[j, s]`` times: a bootstrap
    replicate, :func:`gelora.id.paired.paired_bootstrap_gride`); ``log_mu`` may then be a broadcast view.

    A safeguarded Newton iteration inside the bracket of the module docstring: g is convex and
    decreasing, so Newton from the lower end climbs monotonically to the root; a step that leaves the
    current bracket (rounding near the root) is replaced by bisection. Stops when every step is below
    4 ulp of the root. ``start`` (S,): where to start instead of the lower end (clamped into the bracket),
    e.g. the estimate of the full sample for its bootstrap replicates.

    Raises:
        ValueError: a column with all its ratios equal to 1 (no root: the ID is unbounded).
    """
    weighted = used.dtype != torch.bool
    n = used.sum(0).to(torch.float64)
    a = (n1 - 1).to(torch.float64)  # n2 - n1 - 1
    total = (log_mu * used).sum(0) if weighted else log_mu.sum(0)
    if bool((total <= 0).any()):
        bad = n1[total <= 0].tolist()
        raise ValueError(f"gride: every ratio r_n2 / r_n1 is 1 at n1 = {bad} (tied neighbours): "
                         "the likelihood has no maximum")
    c = n - 1 + a * n
    lo, hi = c / ((2 * n1 - 1) * total), c / (n1 * total)
    d = lo.clone() if start is None else torch.minimum(torch.maximum(start.to(lo), lo), hi)
    eps = torch.finfo(torch.float64).eps
    for _ in range(max_iter):
        inv = _inverse_term(log_mu, d)
        inv = inv * used if weighted else torch.where(used, inv, 0.0)
        g = (n - 1) / d + a * inv.sum(0) - (2 * n1 - 1) * total
        gp = -(n - 1) / d**2 - a * _curvature(log_mu, used, d).sum(0)
        lo = torch.where(g >= 0, d, lo)
        hi = torch.where(g <= 0, d, hi)
        new = d - g / gp
        new = torch.where((new < lo) | (new > hi) | ~torch.isfinite(new), (lo + hi) / 2, new)
        done = ((new - d).abs() <= 4 * eps * new) | (hi - lo <= 4 * eps * hi)
        d = new
        if bool(done.all()):
            break
    return d
