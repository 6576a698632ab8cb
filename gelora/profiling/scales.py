"""GRIDE in a profile (``profile_model(..., estimator="gride")``): the scale curve of every sample, the one
neighbour order ``n1`` that every ID of the profile is read at, and the ratios at that order in slot
order for the paired bootstrap.

One neighbour order for the whole profile
-----------------------------------------
GRIDE (:func:`gelora.gride`) gives each point set an ID per neighbour order n1 = 1, 2, 4, ... (n2 = 2 n1).
The rank rule compares IDs across layers (and a module's output with its input), so they are all read
at the same n1: an ID difference then measures the block, not a change of scale. ``scale=`` fixes it;
by default it is the plateau of the layer curves (:func:`plateau`).

Why the plateau (Denti, Doimo, Laio, Mira 2022; Facco et al. 2017): at the smallest orders the
neighbours of a point sit inside the noise of the representation, which fills all directions and
raises the ID (TwoNN, n1 = 1, is the most exposed); at large orders the neighbourhood reaches the
curvature and the changes of density of the manifold, and the ID drifts again. The ID of the data is
read where the curve is flat. "Flat" is measured against the noise of the curve itself: for the
consecutive orders ``(n1[s], n1[s + 1])`` of every layer the change ``delta = id[s + 1] - id[s]`` is
divided by ``sqrt(se[s]^2 + se[s + 1]^2)``; the plateau is the pair with the smallest mean of the
squared ratios over the layers, and the profile reads its IDs at the smaller order of that pair (the
start of the plateau: the smallest neighbourhood past the noise, so the least curvature). The two
errors are not independent (the ratios share their points), so this is a yardstick that makes orders
with different errors comparable, not a test. Module samples are read at the layers' n1 and do not
vote, so that the layer IDs do not depend on which modules were profiled (only orders that every
sample reaches are candidates).

Bootstrap: the ratios at the chosen order, with the outlier cut of the full sample, in slot order
(:func:`gelora.id.gride.gride_rows`); :func:`gelora.id.paired.paired_bootstrap_gride` re-maximises the
likelihood of each set on the drawn points.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..id.dedup import unique_rows
from ..id.gride import GrideResult, gride_rows

#: The estimator name of GRIDE in :func:`gelora.profiling.driver.profile_model`.
GRIDE = "gride"


class AtScale(NamedTuple):
    """One point set's GRIDE estimate at the profile's neighbour order (what the driver reads of an
    estimate), with its whole curve."""

    id: float
    stderr: float
    n_points: int
    n_duplicates: int
    backend: str
    curve: GrideResult


def check_scale(scale: Any, range_max: Any, estimator: str) -> None:
    """Raises ValueError for a ``scale`` or ``range_max`` that the estimator cannot use: ``scale`` with a
    TwoNN estimator, not a power of two, or beyond the curve (``2 * scale > range_max``)."""
    if scale is not None and estimator != GRIDE:
        raise ValueError(f"scale={scale!r} is the neighbour order of GRIDE; estimator={estimator!r} (TwoNN) has "
                         "none: pass estimator='gride' or leave scale=None")
    if isinstance(range_max, bool) or not isinstance(range_max, numbers.Integral) or range_max < 2:
        raise ValueError(f"range_max must be an integer >= 2, got {range_max!r}")
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1 or scale & (scale - 1):
        raise ValueError(f"scale must be a power of two (the neighbour order n1 = 1, 2, 4, ...), got {scale!r}")
    if 2 * scale > range_max:
        top = 1 << (int(range_max).bit_length() - 2)
        raise ValueError(f"scale={scale} is beyond the curve: with range_max={range_max} the neighbour orders "
                         f"go up to n1 = {top} (n2 = 2 n1 <= range_max); raise range_max to {2 * scale}")


def estimate_set(x: torch.Tensor, device: torch.device, what: str, *, range_max: int,
                 backend: Optional[str]) -> Tuple[GrideResult, Optional[torch.Tensor]]:
    """The GRIDE curve of one sample and its ratios in slot order (N, S) (None for a 0-dimensional set:
    one or two distinct points, reported as ID 0 at every order, with a warning)."""
    if x.numel() == 0 or x.shape[0] < 3:
        raise ValueError(f"{what}: only {x.shape[0] if x.dim() else 0} point(s) collected; GRIDE needs at least 3")
    try:
        return gride_rows(x.to(device), range_max=range_max, backend=backend)
    except ValueError as exc:
        keep, n_dup = unique_rows(x)
        if keep.numel() >= 3:
            raise ValueError(f"{what}: {exc}") from exc
    warnings.warn(f"{what}: the {x.shape[0]} sampled points are {keep.numel()} distinct point(s); "
                  "its intrinsic dimension is reported as 0", stacklevel=5)  # the caller of profile_model
    n1 = 2 ** torch.arange(int(range_max).bit_length() - 1)
    zero = torch.zeros(n1.numel(), dtype=torch.float64)
    ints = torch.zeros(n1.numel(), dtype=torch.int64)
    res = GrideResult(ids=zero, stderr=zero.clone(), scales=zero.clone(), n1=n1, n_used=ints, n_zero=ints.clone(),
                      n_points=int(x.shape[0]), n_duplicates=int(n_dup), backend="none", range_max=int(range_max))
    return res, None


def plateau(curves: Sequence[GrideResult], n_orders: Optional[int] = None) -> Tuple[int, List[float]]:
    """The neighbour order at the start of the flattest stretch of the curves (see the module docstring)
    and the score of every pair of consecutive orders (mean squared change in units of its error).

    Only orders that every curve reaches count (and at most the first ``n_orders``: those that other
    samples read at the same order reach); 0-dimensional sets (backend ``"none"``) are left out.
    With a single common order (tiny samples) that order is returned and the scores are empty."""
    live = [c for c in curves if c.backend != "none"] or list(curves)
    n_common = min([c.n1.numel() for c in live] + ([n_orders] if n_orders else []))
    if n_common < 2:
        return 1, []
    z2 = torch.zeros(n_common - 1, dtype=torch.float64)
    for c in live:
        ids, se = c.ids[:n_common], c.stderr[:n_common]
        var = se[1:] ** 2 + se[:-1] ** 2
        z2 += torch.where(var > 0, (ids[1:] - ids[:-1]) ** 2 / var.clamp_min(1e-300), 0.0)
    z2 /= len(live)
    best = int(torch.argmin(z2))  # the first of equal minima: the smaller order
    return int(live[0].n1[best]), z2.tolist()


def read_at(res: GrideResult, n1: int, what: str) -> AtScale:
    """The estimate of a curve at order ``n1``; ValueError when the sample was too small to reach it."""
    hit = (res.n1 == n1).nonzero().flatten()
    if not hit.numel():
        raise ValueError(f"{what}: scale n1={n1} is beyond its curve (n1 up to {int(res.n1[-1])}: "
                         f"{res.n_points - res.n_duplicates} distinct points); choose a smaller scale")
    i = int(hit[0])
    return AtScale(float(res.ids[i]), float(res.stderr[i]), res.n_points, res.n_duplicates, res.backend, res)


class GrideProfile(NamedTuple):
    """The GRIDE estimates of a profile's samples: ``results`` (key -> :class:`AtScale`), ``log_mu``
    (key -> (N,) ratios at ``n1`` in slot order, or None; empty without ``rows``), ``n1``, ``choice``
    (``"given"`` or ``"plateau"``) and the plateau ``scores``."""

    results: Dict[str, AtScale]
    log_mu: Dict[str, Optional[torch.Tensor]]
    n1: int
    choice: str
    scores: List[float]


def estimate_gride(samples: Dict[str, torch.Tensor], layer_keys: Sequence[str], *, device: torch.device,
                   range_max: int, scale: Optional[int], backend: Optional[str], rows: bool,
                   names: Optional[Dict[str, str]] = None, progress: Any = None) -> GrideProfile:
    """GRIDE curves of every sample (layers and modules), the order they are all read at (``scale``, or
    the plateau of the curves of ``layer_keys``) and, with ``rows``, the slot-ordered ratios at it.

    Args:
        samples: key -> (N, D) sampled points (the same slots in every sample).
        layer_keys: the keys of the layers (the plateau is theirs).
        names: key -> the name used in errors (default: the key). progress: an optional wrapper of the
            key iterator (a tqdm bar).

    Raises:
        ValueError: a sample with fewer than 3 points, or whose curve does not reach ``scale``.
    """
    names = names or {}
    curves: Dict[str, GrideResult] = {}
    ratios: Dict[str, Optional[torch.Tensor]] = {}
    keys = list(samples)
    for k in (progress(keys) if progress is not None else keys):
        curves[k], ratios[k] = estimate_set(samples[k], device, names.get(k, k), range_max=range_max, backend=backend)
    if scale is None:  # the layers' plateau, among the orders that every sample reaches
        reach = min(c.n1.numel() for c in curves.values() if c.backend != "none") \
            if any(c.backend != "none" for c in curves.values()) else None
        n1, scores = plateau([curves[k] for k in layer_keys], reach)
        choice = "plateau"
    else:
        n1, scores, choice = int(scale), [], "given"
    results = {k: read_at(c, n1, names.get(k, k)) for k, c in curves.items()}
    log_mu: Dict[str, Optional[torch.Tensor]] = {}
    if rows:
        s = int(math.log2(n1))
        log_mu = {k: None if r is None else r[:, s].contiguous() for k, r in ratios.items()}
    return GrideProfile(results, log_mu, n1, choice, scores)
