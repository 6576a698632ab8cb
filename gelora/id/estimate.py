"""TwoNN intrinsic-dimension estimation (Facco, d'Errico, Rodriguez, Laio, Sci. Rep. 7, 2017).

For every point, ``mu = r2 / r1`` (distances to its second and first nearest neighbour). On a locally
uniform d-dimensional manifold ``log mu`` is exponential with rate ``d``: ``P(mu > m) = m^-d``.

Estimators (``estimator=``):

* ``"mle"`` (default): the unbiased maximum-likelihood estimate ``(n - 1) / sum(log mu)`` over all n
  points (DADApy ``compute_id_2NN(algorithm="ml")``). Standard error ``id / sqrt(n - 2)``
  (``sum(log mu)`` is Gamma(n, d)).
* ``"linear"``: the least-squares slope through the origin of ``-log(1 - F(mu))`` on ``log mu`` after
  discarding the largest ``discard_fraction`` of the ratios (the DADApy ``"base"`` / scikit-dimension
  ``TwoNN()`` default, ``F(mu_(i)) = i / n``).
* ``"mle_censored"``: the MLE under type-II censoring of the same largest ratios (scikit-dimension's
  ``method="mle"``), robust to the heavy tail that noise and curvature give ``mu``.

Duplicates and ties (policy)
----------------------------
Exact duplicate rows have ``r1 = 0`` and an infinite ``mu``, and a point whose two nearest neighbours
are copies of one point gets ``mu = 1``; both bias the estimate (DADApy returns 0 or NaN, scikit-dimension
drifts upwards). With ``dedup=True`` (default) duplicate rows are collapsed to one before the search
(bit-exact equality after ``-0.0 -> 0.0``; counted in ``n_duplicates``), so the estimate is that of the
distinct points. With ``dedup=False`` the raw estimator runs on all points and the ones with ``r1 = 0``
are dropped from the estimate (counted in ``n_zero_r1``, with a warning). ``n_ties`` counts the
remaining ``mu == 1`` (legitimate equal distances, e.g. on lattices); they stay in.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

ESTIMATORS = ("mle", "linear", "mle_censored")


@dataclass(frozen=True)
class TwoNNResult:
    """Result of :func:`twonn`.

    Attributes:
        id: the intrinsic-dimension estimate.
        stderr: its standard error (analytic, see the module docstring; the bootstrap one when
            ``bootstrap > 0`` was asked for).
        n_points: points after the mask.
        n_used: ratios ``mu`` that entered the estimate (after deduplication, dropped ``r1 = 0`` and the
            discarded tail).
        n_duplicates: rows removed as exact duplicates (``dedup=True``).
        n_zero_r1: points dropped for ``r1 = 0`` (``dedup=False`` only).
        n_ties: ratios equal to 1 that were kept.
        n_fixed: rows whose candidates failed certification and were recomputed in float64.
        estimator, backend, discard_fraction: how it was computed.
        r1_mean: mean nearest-neighbour distance (the scale at which the ID was measured).
        bootstrap_ids: the bootstrap replicates, when asked for.
        mu: (n,) float64 ratios on the host (sorted ascending), for plots and custom fits.
    """

    id: float
    stderr: float
    n_points: int
    n_used: int
    n_duplicates: int
    estimator: str
    backend: str
    discard_fraction: float
    n_zero_r1: int = 0
    n_ties: int = 0
    n_fixed: int = 0
    r1_mean: float = float("nan")
    bootstrap_ids: Optional[torch.Tensor] = field(default=None, repr=False)
    mu: Optional[torch.Tensor] = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.id)

    @property
    def ci95(self) -> Tuple[float, float]:
        """Normal-approximation 95% interval ``id -/+ 1.96 stderr`` (bootstrap percentiles when available)."""
        if self.bootstrap_ids is not None and self.bootstrap_ids.numel() >= 20:
            lo, hi = torch.quantile(self.bootstrap_ids, torch.tensor([0.025, 0.975], dtype=torch.float64))
            return float(lo), float(hi)
        return self.id - 1.96 * self.stderr, self.id + 1.96 * self.stderr


# ---------------------------------------------------------------------------------------------------
# Estimators on the ratios
# ---------------------------------------------------------------------------------------------------
def _fit(log_mu_sorted: torch.Tensor, estimator: str, discard_fraction: float) -> float:
    """ID from the sorted ``log mu`` (float64, ascending) with the chosen estimator."""
    n = log_mu_sorted.numel()
    if estimator == "mle":
        return float((n - 1) / log_mu_sorted.sum())
    n_keep = int(n * (1 - discard_fraction))
    if n_keep < 2:
        raise ValueError(f"discard_fraction={discard_fraction} leaves {n_keep} ratio(s); need at least 2")
    xk = log_mu_sorted[:n_keep]
    if estimator == "mle_censored":
        return float((n_keep - 1) / (xk.sum() + (n - n_keep) * xk[-1]))
    f = torch.arange(1, n_keep + 1, dtype=torch.float64, device=xk.device) / n
    y = -torch.log1p(-f)
    return float((xk * y).sum() / (xk * xk).sum())


def _n_used(n: int, estimator: str, discard_fraction: float) -> int:
    return n if estimator == "mle" else int(n * (1 - discard_fraction))


def id_from_distances(
    dist: torch.Tensor,
    *,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """The TwoNN estimate from (N, 2) nearest-neighbour distances (``r1``, ``r2``).

    Rows with ``r1 = 0`` are dropped (and counted). Runs on the device of ``dist``; only scalars leave.

    Returns:
        dict with ``id``, ``stderr``, ``n_used``, ``n_zero_r1``, ``n_ties``, ``r1_mean``, ``mu``,
        ``bootstrap_ids``.
    """
    check_estimator(estimator, discard_fraction, bootstrap)
    r = dist.to(torch.float64)
    r1, r2 = r[:, 0], r[:, 1]
    pos = r1 > 0
    n_zero = int((~pos).sum())
    mu = (r2[pos] / r1[pos])
    n = mu.numel()
    if n < 3:
        raise ValueError(f"only {n} point(s) with a positive nearest-neighbour distance; need at least 3")
    log_mu = torch.sort(torch.log(mu)).values
    n_ties = int((log_mu == 0).sum())
    if n_ties == n:
        raise ValueError("every point has r1 == r2 (mu = 1): the data are a lattice or fully tied; "
                         "the TwoNN estimate is undefined")
    est = _fit(log_mu, estimator, discard_fraction)
    n_used = _n_used(n, estimator, discard_fraction)
    stderr = est / math.sqrt(max(1, n_used - 2))
    boot = None
    if bootstrap:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draws = torch.randint(0, n, (bootstrap, n), generator=gen).to(log_mu.device)
        samples = torch.sort(log_mu[draws], dim=1).values
        boot = torch.tensor([_fit(s, estimator, discard_fraction) for s in samples], dtype=torch.float64)
        stderr = float(boot.std(unbiased=True))
    return dict(id=est, stderr=stderr, n_used=n_used, n_zero_r1=n_zero, n_ties=n_ties,
                r1_mean=float(r1[pos].mean()), mu=torch.exp(log_mu).cpu(), bootstrap_ids=boot)


def check_estimator(estimator: str, discard_fraction: float, bootstrap: int = 0) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (0.0 <= float(discard_fraction) < 1.0):
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    # one resample has no spread: its standard deviation would be a silent NaN
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, numbers.Integral) or bootstrap < 0 \
            or bootstrap == 1:
        raise ValueError(f"bootstrap must be 0 (analytic standard error) or a number of resamples >= 2, "
                         f"got {bootstrap!r}")


def result_from_distances(
    dist: torch.Tensor,
    *,
    estimator: str,
    discard_fraction: float,
    bootstrap: int,
    seed: int,
    dedup: bool,
    n_points: int,
    n_duplicates: int,
    backend: str,
    n_fixed: int,
    scale: float = 1.0,
) -> TwoNNResult:
    """The :class:`TwoNNResult` of (N, 2) neighbour distances (:func:`id_from_distances`), with the
    bookkeeping of the search that produced them; the one builder of the single-process and the
    sharded estimate. ``scale``: the power of two the points were multiplied by (``r1_mean`` is
    reported in the caller's units). Warns when ``dedup=False`` left points with ``r1 == 0``."""
    res = id_from_distances(dist, estimator=estimator, discard_fraction=discard_fraction,
                            bootstrap=bootstrap, seed=seed)
    if res["n_zero_r1"] and not dedup:
        warnings.warn(f"twonn: dropped {res['n_zero_r1']} point(s) with r1 == 0 (exact duplicates); "
                      "pass dedup=True to collapse duplicates instead", stacklevel=3)
    return TwoNNResult(
        id=res["id"], stderr=res["stderr"], n_points=n_points, n_used=res["n_used"],
        n_duplicates=n_duplicates, estimator=estimator, backend=backend,
        discard_fraction=float(discard_fraction), n_zero_r1=res["n_zero_r1"], n_ties=res["n_ties"],
        n_fixed=n_fixed, r1_mean=res["r1_mean"] / scale, bootstrap_ids=res["bootstrap_ids"], mu=res["mu"],
    )
