"""The Levina-Bickel maximum-likelihood ID over k neighbours (Levina, Bickel, NIPS 2004), with the
MacKay-Ghahramani combination of the local estimates (MacKay, Ghahramani, 2005) as the default.

Around every point the k nearest-neighbour distances ``T_1 <= ... <= T_k`` of a locally uniform
d-dimensional sample give the local estimate

    m_i = (k - 1) / S_i,   S_i = sum_{j=1}^{k-1} log(T_k / T_j)

(``k - 2`` in place of ``k - 1`` with ``unbiased=True``: ``S_i`` is Gamma(k - 1, d), so ``(k - 2) / S_i``
is unbiased). The global ID combines them (``average=``):

* ``"harmonic"`` (default): ``1 / mean(1 / m_i) = (k - 1) M / sum(S_i)``, MacKay and Ghahramani's
  correction: the maximum-likelihood estimate of the pooled log-ratios (averaging the m_i themselves
  weights the upward bias of each small-sample inverse). scikit-dimension ``MLE(...).fit(x, comb="mle")``.
* ``"mean"``: ``mean(m_i)``, Levina and Bickel's average. scikit-dimension ``comb="mean"``.
* ``"median"``: ``median(m_i)``. scikit-dimension ``comb="median"`` (for an even M numpy's middle mean).

Both equal scikit-dimension's ``MLE(unbiased=...)`` with its defaults otherwise (``dnoise=None``,
``neighborhood_based=True``) and ``n_neighbors=k``. ``stderr`` is the standard error of the combination
over the M points treated as independent (their neighbourhoods overlap, so it is a lower bound): for
``"harmonic"`` by the delta method from the spread of ``S_i``, for ``"mean"`` ``std(m_i) / sqrt(M)``, for
``"median"`` ``1.2533 std(m_i) / sqrt(M)``.

Duplicates: with ``dedup=True`` (default) duplicate rows are collapsed first (:mod:`gelora.id.dedup`). A
duplicate has ``T_1 = 0``, so ``S_i`` is infinite and scikit-dimension's ``m_i = 0`` (about 0.5 where
scikit-learn's norm shortcut leaves ~1e-8 for the copy; NaN when all k neighbours are copies), which
pulls its average down (tests/test_mle.py); with ``dedup=False`` gelora drops those points
(counted in ``n_zero``, with a warning). A point whose k neighbours are equidistant (``S_i = 0``,
lattices) has ``m_i = inf``: it adds nothing to the harmonic combination and makes ``"mean"`` raise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..neighbours.inputs import ArrayLike
from .kneighbours import check_int, search_k

AVERAGES = ("harmonic", "mean", "median")


@dataclass(frozen=True)
class MleResult:
    """Result of :func:`mle_id`.

    Attributes:
        id: the ID estimate; stderr: its standard error (see the module docstring).
        k: neighbours per point. average, unbiased: how the local estimates were made and combined.
        n_points: points after the mask; n_used: points whose local estimate entered;
        n_duplicates: rows collapsed as exact duplicates; n_zero: points dropped for ``T_1 = 0``
            (``dedup=False`` only); backend: the kNN engine.
        r_mean: mean distance to the k-th neighbour (the scale of the estimate), in the units of ``x``.
        local_ids: (M,) float64 local estimates ``m_i`` on the host (NaN for dropped points).
    """

    id: float
    stderr: float
    k: int
    average: str
    unbiased: bool
    n_points: int
    n_used: int
    n_duplicates: int
    n_zero: int
    backend: str
    r_mean: float
    local_ids: Optional[torch.Tensor] = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.id)


def mle_id(
    x: ArrayLike,
    *,
    k: int = 20,
    average: str = "harmonic",
    unbiased: bool = False,
    dedup: bool = True,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
) -> MleResult:
    """Levina-Bickel maximum-likelihood intrinsic dimension over ``k`` neighbours (module docstring).

    Args:
        x: (N, D) points or (B, T, D) hidden states (flattened to tokens); torch tensor or numpy array,
            float16, bfloat16, float32 or float64, on any device a backend supports.
        k: neighbours per point, an int >= 2 below the number of (distinct) points (scikit-dimension's
            ``n_neighbors``; its default is 20).
        average: ``"harmonic"`` (MacKay-Ghahramani, default), ``"mean"`` (Levina-Bickel) or ``"median"``.
        unbiased: ``k - 2`` in place of ``k - 1`` in the local estimates.
        dedup: collapse exact duplicate rows first. backend: force a kNN engine. mask: (B, T) token mask.

    Raises:
        TypeError: unsupported dtype or input type.
        ValueError: ``k`` not an int >= 2 (>= 3 with ``unbiased``), ``k`` not below the number of
            (distinct) points, an unknown ``average``, NaN/Inf, bad shape, fewer than 3 (distinct)
            points, infinite local estimates with ``average="mean"``.
        gelora.BackendUnavailable: a forced backend cannot run on this input.
    """
    k = check_int(k, "k", 3 if unbiased else 2)
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    found = search_k(x, k, dedup=dedup, backend=backend, mask=mask, what="mle_id")
    res = mle_from_distances(found.dist, average=average, unbiased=unbiased, dedup=dedup)
    return MleResult(id=res["id"], stderr=res["stderr"], k=k, average=average, unbiased=bool(unbiased),
                     n_points=found.n_points, n_used=res["n_used"], n_duplicates=found.n_duplicates,
                     n_zero=res["n_zero"], backend=found.backend, r_mean=res["r_mean"] / found.scale,
                     local_ids=res["local_ids"])


def mle_from_distances(dist: torch.Tensor, *, average: str = "harmonic", unbiased: bool = False,
                       dedup: bool = True) -> dict:
    """The estimate of :func:`mle_id` from (M, k) ascending neighbour distances (float64 on their device).

    Returns:
        dict with ``id``, ``stderr``, ``n_used``, ``n_zero``, ``r_mean`` and ``local_ids`` (M,) on the host.
    """
    m, k = dist.shape
    r = dist.to(torch.float64)
    ok = r[:, 0] > 0
    n_zero = int((~ok).sum())
    if n_zero:
        how = "distinct rows at distance 0 in float32" if dedup else \
            "exact duplicates; pass dedup=True to collapse them instead"
        warnings.warn(f"mle_id: dropped {n_zero} point(s) with a neighbour at distance 0 ({how})", stacklevel=3)
    rk = r[ok, -1:]
    s = torch.log(rk / r[ok, :-1]).sum(1)  # (M',) S_i
    n = s.numel()
    if n < 2:
        raise ValueError(f"mle_id: {n} point(s) without a neighbour at distance 0; need at least 2")
    kfac = k - 2 if unbiased else k - 1
    local = kfac / s
    if average == "harmonic":
        if float(s.sum()) <= 0:
            raise ValueError("mle_id: every point has its k neighbours at one distance; the ID is unbounded")
        est = kfac / float(s.mean())
        stderr = est * float(s.std()) / (float(s.mean()) * math.sqrt(n))
    else:
        if not bool(torch.isfinite(local).all()):
            raise ValueError(f"mle_id: {int((~torch.isfinite(local)).sum())} point(s) have their k neighbours "
                             f"at one distance (an infinite local estimate); average={average!r} needs "
                             "finite ones: use average='harmonic'")
        srt = torch.sort(local).values
        est = float(local.mean()) if average == "mean" else float((srt[(n - 1) // 2] + srt[n // 2]) / 2)
        stderr = float(local.std()) / math.sqrt(n) * (1.0 if average == "mean" else math.sqrt(math.pi / 2))
    full = torch.full((m,), float("nan"), dtype=torch.float64, device=dist.device)
    full[ok] = local
    return dict(id=est, stderr=stderr, n_used=n, n_zero=n_zero, r_mean=float(rk.mean()),
                local_ids=full.cpu())
