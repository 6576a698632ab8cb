"""Checks shared by the test-suite and the benchmarks (kept in the package so they cannot drift apart)."""
from __future__ import annotations

from typing import Optional

import torch

from .neighbours.inputs import ArrayLike, as_points
from .neighbours.points import centre, direct_sq_dist
from .neighbours.reference import knn_reference


def assert_knn_match(
    x: ArrayLike,
    dist: torch.Tensor,
    idx: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: Optional[float] = None,
) -> None:
    """Assert that (dist, idx) are exact k nearest neighbours of every row of ``x``, modulo ties.

    Tie-aware: ``dist`` must match the float64 reference, and the float64 distance from each row to
    each returned index must equal the reference distance at that rank (so a different index is
    accepted only when it is at exactly the same distance); no row may return itself or the same
    neighbour twice.

    Args:
        x: (N, D) points.
        dist: (N, k) distances under test; idx: (N, k) int64 indices under test.
        rtol: relative tolerance on distances (1e-5 suits float32 engines on centred data).
        atol: absolute tolerance; default ``1e-6 * median reference distance``.
    """
    ref_d, _ = knn_reference(x, k=idx.shape[1])
    dist = dist.detach().to("cpu", torch.float64)
    idx = idx.detach().to("cpu")
    if atol is None:
        atol = 1e-6 * float(ref_d.median()) + 1e-12
    n = ref_d.shape[0]
    assert dist.shape == ref_d.shape, f"dist shape {tuple(dist.shape)} != {tuple(ref_d.shape)}"
    assert idx.dtype == torch.int64, f"idx dtype {idx.dtype}"
    rows = torch.arange(n)
    assert not bool((idx == rows.unsqueeze(1)).any()), "a row returned itself as a neighbour"
    if idx.shape[1] > 1:
        s = torch.sort(idx, dim=1).values
        assert not bool((s[:, 1:] == s[:, :-1]).any()), "a row returned the same neighbour twice"
    torch.testing.assert_close(dist, ref_d, rtol=rtol, atol=atol)
    xc = centre(as_points(x, min_points=2), torch.float64)
    true_d = direct_sq_dist(xc, rows, idx).clamp_min(0).sqrt()
    torch.testing.assert_close(true_d, ref_d, rtol=rtol, atol=atol,
                               msg=lambda m: "returned indices are not at the reference distances "
                               "(not a tie): " + m)
