"""TwoNN estimates of point sets that share their points, and their paired bootstrap.

The layers of a profile hold the *same* tokens (the sampler keeps one slot order for every layer, see
:mod:`gelora.profiling`), so the ID difference between two layers is a paired comparison: the tokens
that make one layer's estimate high tend to make its neighbour's high too, and the difference varies
less than the two standard errors suggest. The standard TwoNN bootstrap resamples the per-point
ratios ``mu = r2 / r1`` with the nearest neighbours held fixed (no new neighbour search per
replicate); the paired version draws one set of token indices per replicate and uses it in every
layer, so each replicate gives a whole profile and the differences keep their pairing.

Row-aligned ratios
------------------
:func:`twonn_rows` is :func:`gelora.twonn` with the ratios kept in the order of the rows:
``log_mu[j]`` belongs to row ``j`` of the input. It runs the same search
(:func:`gelora.id.twonn.neighbour_distances`) and the same estimate, so its result is the one
:func:`gelora.twonn` gives on the same points, ``n_fixed`` included.

Duplicates
----------
Exact duplicate rows are collapsed as :func:`gelora.twonn` does (``dedup=True``): the first
occurrence of each distinct row carries the ratio of that point and the later copies get ``NaN``.
Duplicates differ between layers (at a decoder's embeddings every repeat of a word is one point; in
later layers only repeated sequence prefixes are), so a token can count in one layer and not in
another. A replicate draws token indices; each layer uses the drawn tokens that carry a ratio in that
layer, as often as they were drawn. A distinct point thus enters a replicate as often as its first
token was drawn (once on average), as it enters the point estimate once: the replicates are
centred on the estimate of the distinct points, whatever the multiplicity of each.

GRIDE
-----
:func:`paired_bootstrap_gride` does the same for GRIDE at one neighbour order n1 (the ratios
``r_2n1 / r_n1`` of :func:`gelora.id.gride.gride_rows`): the same draws, and each replicate re-maximises
every set's likelihood on the drawn ratios (a weighted Newton solve, started at the set's estimate).
The outlier cut of :func:`gelora.gride` stays that of the full sample, as the neighbours do: the ratios
it removed are ``NaN`` in the input. At n1 = 1 the replicates are those of the TwoNN MLE.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .estimate import ESTIMATORS, TwoNNResult, id_from_distances, result_from_distances
from .twonn import neighbour_distances

#: Replicates per chunk of the count matrix (chunk bytes: this times the points times 8).
_CHUNK = 64


def twonn_rows(
    x: torch.Tensor,
    *,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    bootstrap: int = 0,
    seed: int = 0,
    backend: Optional[str] = None,
) -> Tuple[TwoNNResult, torch.Tensor]:
    """TwoNN estimate of the rows of ``x`` and the ratio of every row, in row order.

    Args:
        x: (N, D) float tensor (float16, bfloat16, float32 or float64; any device a backend supports).
        estimator, discard_fraction, bootstrap, seed, backend: as for :func:`gelora.twonn`.

    Returns:
        (result, log_mu): ``result`` as :func:`gelora.twonn` gives it (duplicates collapsed);
        ``log_mu`` (N,) float64 on the CPU, ``log(r2 / r1)`` of each
        row, ``NaN`` for a row that is a later copy of an earlier one (see the module docstring).

    Raises:
        ValueError: fewer than 3 distinct rows, NaN/Inf, or what :func:`gelora.twonn` raises.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    found = neighbour_distances(x, dedup=True, backend=backend)
    out = result_from_distances(found.dist, estimator=estimator, discard_fraction=discard_fraction,
                                bootstrap=bootstrap, seed=seed, dedup=True, n_points=found.n_points,
                                n_duplicates=found.n_duplicates, backend=found.backend,
                                n_fixed=found.n_fixed, scale=found.scale)
    r = found.dist.to(torch.float64).cpu()
    lm = torch.full((n,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        kept = torch.where(r[:, 0] > 0, torch.log(r[:, 1] / r[:, 0]), torch.full_like(r[:, 0], float("nan")))
    lm[found.keep.cpu()] = kept
    return out, lm


def _check(log_mu: torch.Tensor, n_boot: int, estimator: str, discard_fraction: float) -> torch.Tensor:
    if not isinstance(log_mu, torch.Tensor) or log_mu.dim() != 2:
        raise ValueError("log_mu must be a (K, N) tensor: the ratios of K point sets over the same N points")
    if log_mu.shape[1] < 3:
        raise ValueError(f"log_mu has {log_mu.shape[1]} point(s); the bootstrap needs at least 3")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (0.0 <= float(discard_fraction) < 1.0):
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    lm = log_mu.detach().to("cpu", torch.float64)
    if bool(torch.isinf(lm).any()) or bool((lm < 0).any()):
        raise ValueError("log_mu must hold log(r2 / r1) >= 0 (finite) or NaN for points without a ratio")
    return lm


def _weights(n_boot: int, n: int, seed: int, groups: Optional[torch.Tensor]):
    """Chunks of (b, n) float64 draw counts of the n points, the same for a given seed.

    Without ``groups`` each replicate draws n point indices with replacement; with ``groups`` it draws
    as many groups as there are, with replacement, and a point counts as often as its group was drawn.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if groups is None:
        n_units, inverse = n, None
    else:
        _, inverse = torch.unique(groups, return_inverse=True)
        n_units = int(inverse.max()) + 1
    for s in range(0, n_boot, _CHUNK):
        draws = torch.randint(0, n_units, (min(_CHUNK, n_boot - s), n_units), generator=gen)
        w = torch.zeros(draws.shape, dtype=torch.float64)
        w.scatter_add_(1, draws, torch.ones_like(w))
        yield (w if inverse is None else w[:, inverse]), draws, inverse


def _fit_weighted(x: torch.Tensor, w: torch.Tensor, estimator: str, discard_fraction: float) -> torch.Tensor:
    """Row-wise ``_fit`` of :mod:`gelora.twonn` on weighted ratios: ``x`` (m,) ascending ``log mu``,
    ``w`` (b, m) integer counts (value ``x[j]`` appears ``w[:, j]`` times in replicate b).

    The sorted replicate is ``x`` with repeats, so its first ``n_keep`` values are the prefix of ``x``
    whose cumulative count reaches ``n_keep``; the linear fit's plotting positions ``-log(1 - i / n)``
    are summed over the ranks each value occupies (differences of their cumulative sum)."""
    c = torch.cumsum(w, dim=1)
    n = c[:, -1]
    n_keep = torch.floor(n * (1.0 - float(discard_fraction)))
    if estimator == "mle_censored":
        # the n_keep smallest: every copy of x[:at] and n_keep - c[at - 1] copies of x[at]
        at = torch.searchsorted(c, n_keep.clamp_min(1).unsqueeze(1)).clamp_max(x.numel() - 1)
        sx = torch.cumsum(w * x, dim=1)
        below = (at - 1).clamp_min(0)
        has = (at > 0).squeeze(1)
        s_below = torch.where(has, torch.gather(sx, 1, below).squeeze(1), torch.zeros_like(n))
        c_below = torch.where(has, torch.gather(c, 1, below).squeeze(1), torch.zeros_like(n))
        last = x[at.squeeze(1)]
        kept_sum = s_below + (n_keep - c_below) * last
        out = (n_keep - 1) / (kept_sum + (n - n_keep) * last)
        return torch.where((n_keep >= 2) & torch.isfinite(out), out, torch.full_like(out, float("nan")))
    # linear: the plotting positions summed over the ranks each value occupies among the n_keep smallest
    upto = torch.minimum(c, n_keep.unsqueeze(1))
    before = torch.minimum(c - w, n_keep.unsqueeze(1))
    m = int(n_keep.max()) if n_keep.numel() else 0
    i = torch.arange(0, m + 1, dtype=torch.float64).unsqueeze(0)
    y = -torch.log1p(-i / n.clamp_min(1).unsqueeze(1))
    y[:, 0] = 0.0
    g = torch.cumsum(y, dim=1)  # g[:, k] = sum of the first k plotting positions
    gy = torch.gather(g, 1, upto.long()) - torch.gather(g, 1, before.long())
    out = (gy @ x.unsqueeze(1)).squeeze(1) / ((upto - before) @ (x * x))
    return torch.where((n_keep >= 2) & torch.isfinite(out), out, torch.full_like(out, float("nan")))


def _check_groups(groups: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if groups is None:
        return None
    g = torch.as_tensor(groups).to("cpu")
    if g.dim() != 1 or g.numel() != n or g.dtype.is_floating_point or g.dtype == torch.bool:
        raise ValueError(f"groups must be an (N,) = ({n},) integer tensor, got {tuple(g.shape)} {g.dtype}")
    return g.long()


def paired_bootstrap(
    log_mu: torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    groups: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bootstrap replicates of the TwoNN IDs of K point sets that share their N points.

    Every replicate draws N point indices with replacement, once for all sets, and re-fits each set's
    estimate on the ratios of the drawn points (a point drawn k times counts k times; points with a
    ``NaN`` ratio in a set are skipped in that set). The neighbours are not searched again. With
    ``groups`` (e.g. the sequence each token came from) the draws are whole groups: points of one
    group enter and leave a replicate together, which keeps the dependence between them.

    Args:
        log_mu: (K, N) float ``log(r2 / r1)`` of each point in each set, aligned by point (column j is
            the same point in every set), ``NaN`` where a set has no ratio for the point (a collapsed
            duplicate; see the module docstring). E.g. stacked :func:`twonn_rows` outputs.
        n_boot: replicates (>= 2).
        seed: seed of the draws (the same seed gives the same replicates).
        estimator, discard_fraction: as for :func:`gelora.twonn`; the MLE is a matrix product of the
            draw counts with the ratios, the others weight each set's sorted ratios by the counts.
        groups: optional (N,) integer group of each point (the resampling unit; None: the point).

    Returns:
        (n_boot, K) float64 replicate IDs; ``NaN`` where a replicate drew fewer than 3 points with a
        ratio in a set (or only ratios of 1).

    Raises:
        ValueError: a ``log_mu`` that is not (K, N) with N >= 3, negative or infinite ratios, a bad
            ``n_boot``, ``estimator``, ``discard_fraction`` or ``groups``.
    """
    lm = _check(log_mu, n_boot, estimator, discard_fraction)
    k, n = lm.shape
    g = _check_groups(groups, n)
    valid = ~torch.isnan(lm)
    out = []
    if estimator == "mle":
        vals = torch.where(valid, lm, torch.zeros_like(lm)).T.contiguous()  # (N, K)
        present = valid.to(torch.float64).T.contiguous()
        for w, _, _ in _weights(n_boot, n, seed, g):
            s, m = w @ vals, w @ present
            ids = (m - 1) / s
            # fewer than 3 drawn points, or all drawn ratios 1 (undefined, as in id_from_distances)
            out.append(torch.where((m >= 3) & (s > 0), ids, torch.full_like(ids, float("nan"))))
        return torch.cat(out)
    orders = []
    for j in range(k):
        idx = torch.nonzero(valid[j]).flatten()
        xs, o = torch.sort(lm[j, idx])
        orders.append((xs, idx[o]))
    for w, _, _ in _weights(n_boot, n, seed, g):
        cols = []
        for xs, idx in orders:
            wj = w[:, idx]
            if xs.numel() == 0:
                cols.append(torch.full((w.shape[0],), float("nan"), dtype=torch.float64))
                continue
            ids = _fit_weighted(xs, wj, estimator, discard_fraction)
            m = wj.sum(dim=1)
            cols.append(torch.where(m >= 3, ids, torch.full_like(ids, float("nan"))))
        out.append(torch.stack(cols, dim=1))
    return torch.cat(out)


def paired_bootstrap_gride(
    log_mu: torch.Tensor,
    n1: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Optional[torch.Tensor] = None,
    start: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Bootstrap replicates of the GRIDE IDs (:func:`gelora.gride`) of K point sets that share their N
    points, at one neighbour order ``n1`` (``n2 = 2 n1``).

    The draws are those of :func:`paired_bootstrap` (the same seed and groups draw the same points);
    each replicate re-maximises every set's GRIDE likelihood on the ratios of the drawn points, a point
    drawn k times counting k times. The neighbours are not searched again, and the outlier cut stays that
    of the full sample (``log_mu`` holds only the ratios that entered its estimate, see
    :func:`gelora.id.gride.gride_rows`), so a replicate that draws every point once gives the estimate.

    Args:
        log_mu: (K, N) float ``log(r_n2 / r_n1)`` at this ``n1`` of each point in each set, aligned by
            point, ``NaN`` where a set has no (kept) ratio for the point.
        n1: the neighbour order (an int >= 1).
        n_boot, seed, groups: as for :func:`paired_bootstrap`.
        start: optional (K,) estimates of the full sets, where each replicate's Newton iteration starts.

    Returns:
        (n_boot, K) float64 replicate IDs; ``NaN`` where a replicate drew fewer than 3 points with a
        ratio in a set (or only ratios of 1).

    Raises:
        ValueError: as :func:`paired_bootstrap`; ``n1`` not an int >= 1, a ``start`` of the wrong length.
    """
    from .gride import solve_scores

    lm = _check(log_mu, n_boot, "mle", 0.0)
    k, n = lm.shape
    g = _check_groups(groups, n)
    if isinstance(n1, bool) or not isinstance(n1, int) or n1 < 1:
        raise ValueError(f"n1 must be an integer >= 1, got {n1!r}")
    if start is not None and len(start) != k:
        raise ValueError(f"start has {len(start)} entries for {k} sets")
    valid = ~torch.isnan(lm)
    cols = [(torch.nonzero(valid[j]).flatten(), lm[j, valid[j]]) for j in range(k)]
    out = []
    for w, _, _ in _weights(n_boot, n, seed, g):
        b = w.shape[0]
        reps = torch.full((b, k), float("nan"), dtype=torch.float64)
        orders = torch.full((b,), n1, dtype=torch.int64)
        for j, (idx, lj) in enumerate(cols):
            wj = w[:, idx].T.contiguous()  # (m, b) counts
            ok = (wj.sum(0) >= 3) & ((wj * lj[:, None]).sum(0) > 0)
            if not bool(ok.any()):
                continue
            wj = torch.where(ok, wj, 1.0)  # solvable stand-ins for the columns reported as NaN
            s0 = None if start is None else torch.full((b,), float(start[j]), dtype=torch.float64)
            d = solve_scores(lj[:, None].expand(-1, b), wj, orders, start=s0)
            reps[:, j] = torch.where(ok, d, float("nan"))
        out.append(reps)
    return torch.cat(out)


def paired_bootstrap_reference(
    log_mu: torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    groups: Optional[torch.Tensor] = None,
    n1: Optional[int] = None,
) -> torch.Tensor:
    """:func:`paired_bootstrap` one replicate and one set at a time: the drawn points listed with their
    repeats and passed to :func:`gelora.twonn.id_from_distances` (the same draws; slow, for tests).
    With ``estimator="gride"`` and ``n1``: :func:`paired_bootstrap_gride`'s, the listed ratios passed to
    :func:`gelora.id.gride.solve_scores` unweighted."""
    from .gride import solve_scores

    gride = estimator == "gride"
    if gride and n1 is None:
        raise ValueError("estimator='gride' needs n1")
    lm = _check(log_mu, n_boot, "mle" if gride else estimator, discard_fraction)
    k, n = lm.shape
    g = _check_groups(groups, n)
    rows = []
    for _, draws, inverse in _weights(n_boot, n, seed, g):
        for d in draws:
            if inverse is not None:  # every point of every drawn group, repeats included
                d = torch.cat([torch.nonzero(inverse == u).flatten() for u in d.tolist()])
            row = []
            for j in range(k):
                v = lm[j][d]
                v = v[~torch.isnan(v)]
                if v.numel() < 3 or (gride and float(v.sum()) <= 0):
                    row.append(float("nan"))
                    continue
                if gride:
                    ones = torch.ones(v.numel(), 1, dtype=torch.bool)
                    row.append(float(solve_scores(v[:, None], ones, torch.tensor([int(n1)]))[0]))
                    continue
                dist = torch.stack([torch.ones_like(v), torch.exp(v)], dim=1)
                try:
                    row.append(id_from_distances(dist, estimator=estimator, discard_fraction=discard_fraction)["id"])
                except ValueError:  # all ratios 1, or too few left after the discarded tail
                    row.append(float("nan"))
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def bootstrap_stderr(replicates: torch.Tensor) -> torch.Tensor:
    """(K,) standard deviation over the finite replicates of each column of an (B, K) tensor."""
    out = []
    for col in replicates.T:
        c = col[torch.isfinite(col)]
        out.append(float(c.std(unbiased=True)) if c.numel() >= 2 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def replicate_differences(replicates: torch.Tensor, pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """(B, P) differences ``replicates[:, out] - replicates[:, in]`` for each ``(in, out)`` pair."""
    if not pairs:
        return torch.empty(replicates.shape[0], 0, dtype=torch.float64)
    i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    o = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return replicates[:, o] - replicates[:, i]
