"""gelora.knn(x, k): exact k nearest neighbours on every engine, against the float64 brute force.

Every engine usable on the CPU here (the C++ core, FAISS, torch; Triton under the interpreter in
tests/test_triton_knn.py) for k in {1, 2, 3, 17, 64} on awkward shapes (97 x 59, 1025 x 33), data with
duplicates, and rows with a massive activation (one coordinate +3000, as decoder hidden states have):
distances allclose to :func:`gelora.knn_reference`, indices compared as sets among ties
(:func:`gelora.testing.assert_knn_match`). Then the limits: bad k, an engine that keeps fewer
candidates than k (skipped, or refused naming its limit), and an engine that keeps k but fewer than
its extra candidates (the certificate still holds).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gelora
from gelora.neighbours import pipeline
from gelora.neighbours.engines import get_backend, select_backend
from gelora.neighbours.engines.base import Candidates, KnnBackend
from gelora.neighbours.points import centre_and_mean, direct_sq_dist
from gelora.testing import assert_knn_match

KS = (1, 2, 3, 17, 64)


def _data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(17)
    if kind == "97x59":
        return torch.randn(97, 59, generator=g) + 3.0
    if kind == "1025x33":  # a 6-dimensional manifold, shifted: known structure, no exact ties
        return torch.randn(1025, 6, generator=g) @ torch.randn(6, 33, generator=g) + 5.0
    if kind == "duplicates":  # groups of 2, 3 and 70 identical rows (more twins than k = 64)
        x = torch.randn(300, 24, generator=g)
        x[10] = x[11]
        x[20:23] = x[22]
        x[100:170] = x[99]
        return x
    if kind == "outliers":  # a tight cluster plus 4 rows with one coordinate at +3000
        x = torch.randn(400, 4, generator=g) @ torch.randn(4, 48, generator=g) * 0.1
        x[torch.tensor([0, 57, 130, 399]), 7] += 3000.0
        return x
    raise ValueError(kind)


def _tol(x: torch.Tensor, k: int) -> float:
    """Absolute distance tolerance: twice what PyTorch's own float32 path (the torch engine) errs by
    against the float64 reference on the same data (float32 centring and re-rank alone cost ~ulp of
    the coordinates), plus a relative floor."""
    ref, _ = gelora.knn_reference(x, k)
    got, _ = gelora.knn(x, k, backend="torch")
    return 2.0 * float((got.double() - ref).abs().max()) + 1e-6 * float(ref.median()) + 1e-12


@pytest.mark.parametrize("kind", ["97x59", "1025x33", "duplicates", "outliers"])
def test_every_engine_matches_brute_force(kind, cpu_backends):
    x = _data(kind)
    for k in KS:
        tol = _tol(x, k)
        for name in cpu_backends:
            dist, idx = gelora.knn(x, k, backend=name)
            assert dist.shape == (x.shape[0], k) and dist.dtype == torch.float32, name
            assert idx.dtype == torch.int64, name
            assert bool((dist[:, 1:] >= dist[:, :-1]).all()), f"{name} k={k}: not ascending"
            assert_knn_match(x, dist, idx, atol=tol)


def test_duplicates_are_neighbours_at_zero(cpu_backends):
    """70 identical rows: each has its 64 nearest at distance exactly 0, never itself."""
    x = _data("duplicates")
    group = torch.arange(99, 170)
    for name in cpu_backends:
        dist, idx = gelora.knn(x, 64, backend=name)
        assert bool((dist[group] == 0).all()), name
        assert bool(torch.isin(idx[group], group).all()), name
        assert not bool((idx == torch.arange(300)[:, None]).any()), name


def test_knn2_is_knn_with_k_2():
    x = _data("1025x33")
    for name in ("cpp", "torch"):
        d1, i1 = gelora.knn(x, 2, backend=name)
        d2, i2 = gelora.knn2(x, backend=name)
        assert torch.equal(d1, d2) and torch.equal(i1, i2)
        d3, i3 = gelora.knn2(x, k=17, backend=name)
        d4, i4 = gelora.knn(x, 17, backend=name)
        assert torch.equal(d3, d4) and torch.equal(i3, i4)


def test_public_name_and_mask():
    assert gelora.knn is pipeline.knn
    x = _data("97x59").reshape(1, 97, 59).repeat(2, 1, 1)
    x[1] += 1.0
    mask = torch.ones(2, 97, dtype=torch.bool)
    mask[0, ::3] = False
    dist, idx = gelora.knn(x, 5, mask=mask, backend="torch")
    kept = x.reshape(-1, 59)[mask.reshape(-1)]
    want_d, want_i = gelora.knn(kept, 5, backend="torch")
    assert torch.equal(dist, want_d) and torch.equal(idx, want_i)


def test_numpy_input_and_numpy_k():
    x = _data("97x59").numpy()
    dist, idx = gelora.knn(x, np.int64(3))
    assert_knn_match(x, dist, idx)


def test_bad_k():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be at least 1"):
        gelora.knn(x, 0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        gelora.knn(x, -3)
    for bad in (2.0, True, "3", None):
        with pytest.raises(TypeError, match="k must be an integer"):
            gelora.knn(x, bad)
    with pytest.raises(ValueError, match=r"10 usable point\(s\); k=10 neighbours per point need at least 11"):
        gelora.knn(x, 10)
    # counted after the mask: 6 tokens are left
    mask = torch.tensor([True] * 6 + [False] * 4)
    with pytest.raises(ValueError, match=r"6 usable point\(s\); k=6"):
        gelora.knn(x, 6, mask=mask)
    gelora.knn(x, 5, mask=mask)
    # duplicates count as points: 9 copies of one row and one other row give 9 neighbours each
    dup = torch.zeros(10, 3)
    dup[9, 0] = 1.0
    dist, idx = gelora.knn(dup, 9)
    assert bool((dist[:9, :8] == 0).all()) and bool((dist[:9, 8] == 1).all())
    with pytest.raises(TypeError, match="k must be an integer"):
        gelora.knn2(x, k=1.5)
    with pytest.raises(ValueError, match="k must be at least 1"):
        gelora.knn_reference(x, 0)


def test_engine_limit_is_a_reason(monkeypatch):
    """An engine that keeps fewer candidates than k: its not_supported_reasons say so, automatic
    selection skips it, and forcing it raises with the limit."""
    cpp = get_backend("cpp")
    monkeypatch.setattr(cpp, "max_candidates", 8)
    x = _data("97x59")
    reasons = cpp.not_supported_reasons(x, k=17)
    assert reasons and "at most 8 candidates per row" in reasons[0] and "k=17" in reasons[0]
    assert cpp.not_supported_reasons(x, k=8) == []
    with pytest.raises(gelora.BackendUnavailable, match="'cpp'.*at most 8 candidates per row, so k <= 8"):
        gelora.knn(x, 17, backend="cpp")
    assert select_backend(x, k=17).name != "cpp"
    assert select_backend(x, k=8).name == "cpp"
    dist, idx = gelora.knn(x, 17)
    assert_knn_match(x, dist, idx)


class NoisyEngine(KnnBackend):
    """A candidate engine that errs as much as it says it may: every approximate squared distance is
    the exact one moved by a deterministic amount in ``[-delta, delta]``, and ``err = delta``. Its top
    candidates are often in the wrong order near the k-th, so only the certificate and the fallback
    can make the answer exact."""

    name = "noisy"

    def __init__(self, delta: float, max_candidates: int) -> None:
        super().__init__()
        self.delta = delta
        self.max_candidates = max_candidates

    def search(self, x, kc):
        x64 = x.double()
        d2 = torch.cdist(x64, x64).square()
        g = torch.Generator().manual_seed(3)
        d2 = d2 + self.delta * (2 * torch.rand(d2.shape, generator=g, dtype=torch.float64) - 1)
        d2.fill_diagonal_(float("inf"))
        v, i = torch.topk(d2, kc, dim=1, largest=False, sorted=True)
        return Candidates(v.to(x.dtype), i, self.delta * 1.001)


@pytest.mark.parametrize("cap_extra", [0, 1, 2])
def test_capped_candidates_stay_exact(cap_extra):
    """An engine that keeps k candidates (or k + 1) but not all its extra ones: the pipeline asks for
    what it can keep and certifies with that kc-th candidate, whatever kc is; rows it cannot certify
    are recomputed, so the answer is exact although the engine's own top k are not."""
    k = 17
    x = _data("1025x33")
    xc, mean = centre_and_mean(x, torch.float32)
    ref, _ = gelora.knn_reference(x, k)
    gap = float((ref[:, 1:] ** 2 - ref[:, :-1] ** 2).median())
    eng = NoisyEngine(delta=4 * gap, max_candidates=k + cap_extra)
    assert eng.candidates_for(k, x.shape[0]) == k + cap_extra
    with pytest.raises(ValueError, match=f"at most {k + cap_extra} candidates per row"):
        eng.candidates_for(k + cap_extra + 1, x.shape[0])
    # the engine alone is wrong in many rows ...
    raw = eng.search(xc, k).idx
    exact_d = direct_sq_dist(x.double(), torch.arange(x.shape[0]), raw).sqrt()
    wrong = (torch.sort(exact_d, 1).values - ref).abs().amax(1) > 1e-6 * float(ref.median())
    assert int(wrong.sum()) > 50
    # ... the pipeline is not
    dist, idx, n_fixed = pipeline.knn_exact(xc, k, eng, points=x, mean=mean)
    assert n_fixed >= int(wrong.sum()) // 2
    assert_knn_match(x, dist, idx, atol=_tol(x, k))


def test_triton_limit_matches_kernel():
    """The Triton engine's declared limit is the kernel's, and k = 64 fits with its extra candidates."""
    from gelora.neighbours.engines.triton import MAX_KC, TritonBackend

    assert TritonBackend.max_candidates == MAX_KC
    assert TritonBackend().candidates_for(64, 10_000) == 68  # k // 16 extra at large k
    assert TritonBackend().candidates_for(2, 10_000) == 4 and TritonBackend().candidates_for(17, 10_000) == 19
    assert TritonBackend().candidates_for(MAX_KC - 3, 10_000) == MAX_KC  # capped: fewer extra, still exact
    assert TritonBackend().k_reasons(MAX_KC + 1)
    try:
        from gelora.kernels import knn_top2
    except Exception as exc:  # noqa: BLE001 - no triton here
        pytest.skip(f"triton is not importable: {exc!r}")
    assert knn_top2.MAX_KC == MAX_KC
