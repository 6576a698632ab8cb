"""The public TwoNN API: :func:`twonn`, :func:`estimate_id`, :func:`id_scale_curve` (the estimators and
the duplicates policy are in :mod:`gelora.id.estimate`).

``twonn`` checks the points, scales them into float32's comfortable range when they are far from 1,
collapses duplicates (:mod:`gelora.id.dedup`), runs the exact kNN pipeline (:mod:`gelora.neighbours.pipeline`)
and estimates; with ``group=`` the same over the ranks of a process group (:mod:`gelora.distributed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from ..distributed import twonn_distributed
from ..neighbours.engines.registry import select_backend
from ..neighbours.inputs import ArrayLike, as_points, check_points, power_of_two_scale
from ..neighbours.pipeline import compute_dtype, knn_exact
from ..neighbours.points import centre_and_mean
from .dedup import hash_coef, unique_rows
from .estimate import TwoNNResult, check_estimator, result_from_distances

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
        (:func:`gelora.neighbours.inputs.power_of_two_scale`); ``r1_mean`` is in the units of ``x``.

    Raises:
        TypeError: unsupported dtype (integer, complex, bool) or input type.
        ValueError: bad shape, empty input, NaN/Inf, fewer than 3 distinct points, bad mask, a bad
            ``estimator``, ``discard_fraction`` or ``bootstrap``.
        gelora.BackendUnavailable: a forced backend cannot run on this input.
    """
    check_estimator(estimator, discard_fraction, bootstrap)
    if group is not None and group is not False:
        return twonn_distributed(
            x, group=None if group is True else group, estimator=estimator,
            discard_fraction=discard_fraction, dedup=dedup, backend=backend, mask=mask,
            bootstrap=bootstrap, seed=seed,
        )
    found = neighbour_distances(x, dedup=dedup, backend=backend, mask=mask)
    return result_from_distances(found.dist, estimator=estimator, discard_fraction=discard_fraction,
                                 bootstrap=bootstrap, seed=seed, dedup=dedup, n_points=found.n_points,
                                 n_duplicates=found.n_duplicates, backend=found.backend,
                                 n_fixed=found.n_fixed, scale=found.scale)


class Neighbours(NamedTuple):
    """What :func:`neighbour_distances` found: ``dist`` (M, 2) exact distances of the kept rows (in the
    units of the points times ``scale``), ``keep`` (M,) their indices among the N points (all of them
    without dedup), and the bookkeeping of :class:`TwoNNResult`."""

    dist: torch.Tensor
    keep: torch.Tensor
    n_points: int
    n_duplicates: int
    backend: str
    n_fixed: int
    scale: float


def neighbour_distances(
    x: ArrayLike, *, dedup: bool = True, backend: Optional[str] = None, mask: Optional[ArrayLike] = None
) -> Neighbours:
    """The search of :func:`twonn` on one process: checks, the power-of-two scale, duplicates collapsed,
    the exact two nearest neighbours of the kept rows (the estimators and the paired bootstrap of
    :mod:`gelora.id.paired` start from it)."""
    xt = as_points(x, mask, check_finite=False)
    scale = power_of_two_scale(xt)  # 1.0 for NaN/Inf, which check_points rejects
    if scale != 1.0:
        xt = xt * scale
    # one pass over the points for the NaN check, the row hashes and the mean (with the C++ core)
    hashes, mean = check_points(xt, coef=hash_coef(xt.shape[1]) if dedup else None)
    n_points = xt.shape[0]
    n_dup = 0
    keep = torch.arange(n_points, device=xt.device)
    if dedup:
        keep, n_dup = unique_rows(xt, hashes)
        if n_dup:
            xt = xt[keep]
        if xt.shape[0] < 3:
            raise ValueError(f"only {xt.shape[0]} distinct point(s) among {n_points}; TwoNN needs at least 3")
    engine = select_backend(xt, backend)
    # the engines search the centred points; distances are re-ranked on the points as given
    xc, mean = centre_and_mean(xt, compute_dtype(xt), mean=None if n_dup else mean)
    dist, _, n_fixed = knn_exact(xc, 2, engine, points=xt, mean=mean)
    return Neighbours(dist, keep, n_points, int(n_dup), engine.name, n_fixed, scale)


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
