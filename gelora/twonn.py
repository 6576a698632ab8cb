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
from typing import List, Optional, Tuple

import torch

from ._input import ArrayLike, as_points, check_points, cpu_core, power_of_two_scale
from .backends import select_backend
from .knn import _compute_dtype, centre_and_mean, knn_exact

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
# Duplicates
# ---------------------------------------------------------------------------------------------------
#: Elements hashed per chunk (bounds the int64 temporary: 64 MiB).
HASH_CHUNK_ELEMS = 1 << 23
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def hash_coef(d: int) -> torch.Tensor:
    """The (d,) int64 CPU coefficients (odd, fixed seed) of the row hash of :func:`unique_rows`."""
    gen = torch.Generator(device="cpu").manual_seed(0x6E10)
    return torch.randint(1, 2**62, (d,), generator=gen, dtype=torch.int64) | 1


def unique_rows(x: torch.Tensor, hashes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """Indices of the first occurrence of every distinct row of ``x`` (bit-exact, ``-0.0 == 0.0``).

    Rows are hashed with a random 64-bit linear hash of their bit patterns (one pass, O(N D)), equal
    hashes are verified element-wise, and a collision falls back to ``torch.unique(dim=0)``.

    Args:
        x: (N, D) float tensor.
        hashes: (N,) int64 hashes of the rows of ``x`` with :func:`hash_coef` when the caller has them
            (:func:`gelora._input.check_points` returns them from its pass over the points).

    Returns:
        keep: (M,) int64 sorted indices of the rows to keep; n_duplicates = N - M.
    """
    n, d = x.shape
    core = cpu_core(x)
    if hashes is not None:
        h = hashes.to(x.device)
    elif core is not None:
        h = torch.from_numpy(core.prepare_points(x.detach().contiguous().numpy(), hash_coef(d).numpy(),
                                                 n_threads=torch.get_num_threads())[0])
    else:
        coef = hash_coef(d).to(x.device)
        h = torch.empty(n, dtype=torch.int64, device=x.device)
        step = max(1, HASH_CHUNK_ELEMS // d)
        for s in range(0, n, step):
            bits = (x[s : s + step] + 0.0).view(_INT_VIEW[x.dtype]).to(torch.int64)
            # a linear hash of the row's bit pattern, wrapping modulo 2^64 (integer mv on the CPU is ~10x
            # faster than mul + sum; CUDA has no integer mv)
            h[s : s + step] = bits @ coef if x.device.type == "cpu" else (bits * coef).sum(dim=1)
    uniq, inverse = torch.unique(h, return_inverse=True)
    if uniq.numel() == n:
        return torch.arange(n, device=x.device), 0
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=x.device), reduce="amin")
    rep = first[inverse]
    later = torch.nonzero(rep != torch.arange(n, device=x.device)).flatten()
    same = (x[later] == x[rep[later]]).all(dim=1)
    if not bool(same.all()):  # a hash collision between distinct rows: exact (slower) path
        _, inv = torch.unique(x + 0.0, dim=0, return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), n, dtype=torch.int64, device=x.device)
        first.scatter_reduce_(0, inv, torch.arange(n, device=x.device), reduce="amin")
    keep = torch.sort(first).values
    return keep, n - keep.numel()


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
    _check_estimator(estimator, discard_fraction, bootstrap)
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


def _check_estimator(estimator: str, discard_fraction: float, bootstrap: int = 0) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (0.0 <= float(discard_fraction) < 1.0):
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    # one resample has no spread: its standard deviation would be a silent NaN
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, numbers.Integral) or bootstrap < 0 \
            or bootstrap == 1:
        raise ValueError(f"bootstrap must be 0 (analytic standard error) or a number of resamples >= 2, "
                         f"got {bootstrap!r}")


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
def twonn(
    x: ArrayLike,
    *,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    dedup: bool = True,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
    bootstrap: int = 0,
    seed: int = 0,
    group=None,
) -> TwoNNResult:
    """Exact TwoNN intrinsic dimension of a point cloud.

    Args:
        x: (N, D) points or (B, T, D) hidden states (flattened to tokens); torch tensor on any device a
            backend supports, or numpy array; float16, bfloat16, float32 or float64.
        estimator: ``"mle"``, ``"linear"`` or ``"mle_censored"`` (see the module docstring).
        discard_fraction: share of the largest ratios that ``"linear"``/``"mle_censored"`` discard.
        dedup: collapse exact duplicate rows first (see the duplicates policy above).
        backend: force a kNN engine (``"triton"``, ``"cpp"``, ``"faiss"``, ``"torch"``); default: the first
            usable one, see ``python -m gelora.info``.
        mask: optional boolean (B, T) token mask (True keeps a token), e.g. an attention mask.
        bootstrap: number of bootstrap resamples of the ratios for ``stderr``/``ci95`` (0: analytic;
            otherwise at least 2).
        seed: seed of the bootstrap.
        group: a ``torch.distributed`` process group (or ``True`` for the default group): ``x`` is this
            rank's shard of the points, and every rank gets the global estimate over all shards (see
            :func:`gelora.distributed.twonn_distributed`). Never implied by an initialised process
            group alone: data-parallel jobs estimate each rank's data separately.

    Returns:
        :class:`TwoNNResult`. The estimate does not depend on the units of ``x``: points far from 1
        (``max|x|`` outside ``[2^-32, 2^32)``) are searched scaled by a power of two, which is exact
        (:func:`gelora._input.power_of_two_scale`); ``r1_mean`` is in the units of ``x``.

    Raises:
        TypeError: unsupported dtype (integer, complex, bool) or input type.
        ValueError: bad shape, empty input, NaN/Inf, fewer than 3 distinct points, bad mask, a bad
            ``estimator``, ``discard_fraction`` or ``bootstrap``.
        gelora.BackendUnavailable: a forced backend cannot run on this input.
    """
    _check_estimator(estimator, discard_fraction, bootstrap)
    if group is not None and group is not False:
        from .distributed import twonn_distributed

        return twonn_distributed(
            x, group=None if group is True else group, estimator=estimator,
            discard_fraction=discard_fraction, dedup=dedup, backend=backend, mask=mask,
            bootstrap=bootstrap, seed=seed,
        )
    xt = as_points(x, mask, check_finite=False)
    scale = power_of_two_scale(xt)  # 1.0 for NaN/Inf, which check_points rejects
    if scale != 1.0:
        xt = xt * scale
    # one pass over the points for the NaN check, the row hashes and the mean (with the C++ core)
    hashes, mean = check_points(xt, coef=hash_coef(xt.shape[1]) if dedup else None)
    n_points = xt.shape[0]
    n_dup = 0
    if dedup:
        keep, n_dup = unique_rows(xt, hashes)
        if n_dup:
            xt = xt[keep]
        if xt.shape[0] < 3:
            raise ValueError(f"only {xt.shape[0]} distinct point(s) among {n_points}; TwoNN needs at least 3")
    engine = select_backend(xt, backend)
    # the engines search the centred points; distances are re-ranked on the points as given
    xc, mean = centre_and_mean(xt, _compute_dtype(xt, engine), mean=None if n_dup else mean)
    dist, _, n_fixed = knn_exact(xc, 2, engine, xt.dtype, points=xt, mean=mean)
    res = id_from_distances(dist, estimator=estimator, discard_fraction=discard_fraction,
                            bootstrap=bootstrap, seed=seed)
    if res["n_zero_r1"] and not dedup:
        warnings.warn(f"twonn: dropped {res['n_zero_r1']} point(s) with r1 == 0 (exact duplicates); "
                      "pass dedup=True to collapse duplicates instead", stacklevel=2)
    return TwoNNResult(
        id=res["id"], stderr=res["stderr"], n_points=n_points, n_used=res["n_used"], n_duplicates=n_dup,
        estimator=estimator, backend=engine.name, discard_fraction=float(discard_fraction),
        n_zero_r1=res["n_zero_r1"], n_ties=res["n_ties"], n_fixed=n_fixed, r1_mean=res["r1_mean"] / scale,
        bootstrap_ids=res["bootstrap_ids"], mu=res["mu"],
    )


def estimate_id(x: ArrayLike, **kwargs) -> float:
    """``twonn(x, **kwargs).id``: the TwoNN intrinsic dimension as a float (see :func:`twonn`)."""
    return twonn(x, **kwargs).id


@dataclass(frozen=True)
class ScaleCurve:
    """ID against sample size (DADApy-style decimation): ``id[i]`` is the mean over ``repeats[i]``
    disjoint random subsets of ``n[i]`` points, ``stderr[i]`` the standard error of that mean (the
    analytic one when a level has a single subset)."""

    n: List[int]
    id: List[float]
    stderr: List[float]
    repeats: List[int]


def id_scale_curve(
    x: ArrayLike,
    *,
    n_min: int = 20,
    max_levels: int = 12,
    seed: int = 0,
    mask: Optional[ArrayLike] = None,
    **kwargs,
) -> ScaleCurve:
    """TwoNN ID on random subsets of N, N/2, N/4, ... points (down to ``n_min``).

    A flat curve means the estimate is stable across scales; a drift as N shrinks shows noise (ID up
    at small scales) or curvature/topology (ID changes at large scales). Each level splits a random
    permutation of the (deduplicated) points into ``2^level`` disjoint subsets. ``kwargs`` go to
    :func:`twonn`.

    Raises:
        ValueError: fewer than ``max(3, n_min)`` distinct points (no level to estimate on), or
            ``max_levels < 1``; and what :func:`twonn` raises.
    """
    if max_levels < 1:
        raise ValueError(f"max_levels must be at least 1, got {max_levels!r}")
    xt = as_points(x, mask)
    dedup = kwargs.pop("dedup", True)
    if dedup:
        keep, _ = unique_rows(xt)
        xt = xt[keep]
    need = max(3, n_min)
    if xt.shape[0] < need:
        raise ValueError(f"id_scale_curve: {xt.shape[0]} {'distinct ' if dedup else ''}point(s); a curve "
                         f"needs at least {need} (its smallest subsets have n_min={n_min} points, and "
                         "TwoNN needs 3)")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(xt.shape[0], generator=gen).to(xt.device)
    ns: List[int] = []
    ids: List[float] = []
    errs: List[float] = []
    reps: List[int] = []
    parts = 1
    while xt.shape[0] // parts >= max(3, n_min) and len(ns) < max_levels:
        size = xt.shape[0] // parts
        vals = []
        last = None
        for p in range(parts):
            last = twonn(xt[perm[p * size:(p + 1) * size]], dedup=False, **kwargs)
            vals.append(last.id)
        v = torch.tensor(vals, dtype=torch.float64)
        ns.append(size)
        ids.append(float(v.mean()))
        errs.append(float(v.std(unbiased=True) / math.sqrt(parts)) if parts > 1 else last.stderr)
        reps.append(parts)
        parts *= 2
    return ScaleCurve(n=ns, id=ids, stderr=errs, repeats=reps)
