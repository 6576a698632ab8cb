"""The Triton kNN engine on a CUDA device (marker ``gpu``; skipped without CUDA or Triton).

Covers what the CPU interpreter cannot: tensor-core tiles (fp16, bf16, tf32) against float64
brute force on the device, the error bound under the tensor cores' real rounding, the symmetric
tiles' column lists (a race would show as a moving result), chunking, streaming from pinned host
memory, and the pipeline end to end. Every point set has a duplicated row; ``massive`` adds the
massive activations of LLM hidden states (Sun et al. 2024): a few rows with one coordinate +3000, one
of them repeated like a first token, which set the fp16 operand scale for every row. Shapes stay at a
few thousand rows (seconds, plus compilation). ``benchmarks/gpu_check.sh`` runs this file first.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def _triton():
    pytest.importorskip("triton")
    from gelora.neighbours.engines import all_backends

    all_backends()


def _points(n, d, kind="manifold", seed=0, dtype=torch.float32, dup=True, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    if kind in ("manifold", "massive"):
        z = torch.randn(n, 8, device=device, generator=g)
        x = torch.tanh(z @ torch.randn(8, 64, device=device, generator=g)) @ \
            torch.randn(64, d, device=device, generator=g) + 3.0
        if kind == "massive":  # a few rows with one huge coordinate; row 1 repeats row 0 (a first token)
            rows = torch.tensor([0, n // 3, (2 * n) // 3], device=device)
            x[rows, min(1, d - 1)] += 3000.0
            x[1] = x[0]
    elif kind == "outlier":
        x = torch.randn(n, d, device=device, generator=g)
        x[0] *= 1000.0
    elif kind == "lattice":
        x = torch.randint(0, 3, (n, d), device=device, generator=g).float()
    else:
        raise ValueError(kind)
    if dup:
        x[5] = x[7]
    return x.to(dtype)


def _exact(xc: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), N) float64 exact squared distances (self at +inf), direct differences in blocks."""
    x64 = xc.double()
    n, d = x64.shape
    out = torch.empty(rows.numel(), n, dtype=torch.float64, device=xc.device)
    step = max(1, (256 << 20) // (8 * n * d))
    for s in range(0, rows.numel(), step):
        r = rows[s:s + step]
        out[s:s + step] = (x64[r].unsqueeze(1) - x64.unsqueeze(0)).pow(2).sum(-1)
        out[torch.arange(s, s + r.numel(), device=xc.device), r] = float("inf")
    return out


def _check_candidates(xc, d2, idx, err, rows, what):
    exact = _exact(xc, rows)
    n = xc.shape[0]
    e = err[rows].double()
    at = torch.gather(exact, 1, idx[rows])
    assert bool((idx[rows] >= 0).all()) and bool((idx[rows] != rows[:, None]).all()), what
    dev = (d2[rows].double() - at).abs()
    ratio = float((dev / e[:, None]).max())
    assert ratio <= 1.0, f"{what}: |approx - exact| exceeds the bound (ratio {ratio:.3f})"
    non = torch.ones(rows.numel(), n, dtype=torch.bool, device=xc.device)
    non.scatter_(1, idx[rows], False)
    non[torch.arange(rows.numel(), device=xc.device), rows] = False
    floor = d2[rows, -1].double() - e
    assert not bool(((exact < floor[:, None]) & non).any()), f"{what}: a non-candidate below the floor"
    return ratio


def _check_neighbours(x, dist, idx, ref, what):
    """Exact 2-NN against the float64 reference, tolerating ties: the distances match, the float64
    distance to each returned neighbour is the reference distance of its rank, and no row is its own
    neighbour (a duplicate is a neighbour at distance 0)."""
    x64 = x.double()
    assert torch.allclose(dist.double(), ref, rtol=1e-5, atol=1e-5), \
        f"{what}: max |dist - ref| = {float((dist.double() - ref).abs().max()):.3g}"
    at = torch.stack([(x64[idx[:, j]] - x64).pow(2).sum(-1).sqrt() for j in range(idx.shape[1])], 1)
    assert torch.allclose(at, ref, rtol=1e-5, atol=1e-5), f"{what}: a returned index is not at the reference distance"
    own = idx == torch.arange(x.shape[0], device=idx.device)[:, None]
    assert not bool(own.any()), f"{what}: a row is its own neighbour"


@pytest.mark.parametrize("precision", ["fp16", "bf16", "tf32", "ieee"])
@pytest.mark.parametrize("kind", ["manifold", "outlier", "lattice", "massive"])
def test_candidates_and_bound_on_device(precision, kind):
    from gelora.neighbours.engines.triton import triton_candidates
    from gelora.neighbours.points import centre

    n, d = (1025, 59) if kind in ("outlier", "lattice") else (4097, 768)
    xc = centre(_points(n, d, kind))
    d2, idx, err = triton_candidates(xc, 4, precision=precision)
    rows = torch.arange(0, n, max(1, n // 1024), device="cuda")
    if kind == "massive":  # every massive row and both copies of the repeated one
        rows = torch.unique(torch.cat([rows, torch.tensor([0, 1, n // 3, (2 * n) // 3], device="cuda")]))
    _check_candidates(xc, d2, idx, err, rows, f"{kind} {precision}")


def test_symmetric_chunked_streamed_agree_and_are_deterministic():
    from gelora.neighbours.engines.triton import triton_candidates
    from gelora.neighbours.points import centre

    xc = centre(_points(20000, 256, seed=1))
    runs = [triton_candidates(xc, 4) for _ in range(3)]
    for r in runs[1:]:  # a race in the column lists would move the result between runs
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])
    d_rows, i_rows, e_rows = triton_candidates(xc, 4, symmetric=False)
    d_chunk, i_chunk, e_chunk = triton_candidates(xc, 4, chunk_rows=6000)
    tol = runs[0][2].max().item()
    for d, what in ((d_rows, "rows-only"), (d_chunk, "chunked")):
        assert torch.allclose(d, runs[0][0], rtol=0, atol=tol), what
    rows = torch.arange(0, 20000, 97, device="cuda")
    for d, i, e, what in ((*runs[0], "symmetric"), (d_rows, i_rows, e_rows, "rows-only"),
                          (d_chunk, i_chunk, e_chunk, "chunked")):
        _check_candidates(xc, d, i, e, rows, what)
    # a pinned host tensor streams through the GPU and gives the device result
    host = xc.cpu().pin_memory()
    d_h, i_h, e_h = triton_candidates(host, 4, chunk_rows=7000)
    assert d_h.device.type == "cpu"
    assert torch.allclose(d_h, runs[0][0].cpu(), rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["manifold", "massive"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_pipeline_matches_reference(dtype, kind):
    import gelora

    x = _points(5000, 384, kind, dtype=dtype, seed=2)
    dist, idx = gelora.knn2(x, backend="triton")
    rd, _ = gelora.knn_reference(x, k=2)
    _check_neighbours(x, dist, idx, rd, f"{kind} {dtype}")
    r_t = gelora.twonn(x, backend="triton")
    r_r = gelora.twonn(x, backend="torch")
    assert r_t.backend == "triton" and abs(r_t.id - r_r.id) <= 1e-6 * r_r.id, (r_t.id, r_r.id)
    assert r_t.n_duplicates == r_r.n_duplicates == (2 if kind == "massive" else 1)
    assert r_t.n_fixed <= 5 + (4 if kind == "massive" else 0), r_t.n_fixed


def test_host_input_is_streamed(monkeypatch):
    import gelora
    from gelora.neighbours.engines import get_backend

    b = get_backend("triton")
    x = _points(6000, 128, seed=3, dup=False).cpu()
    assert b.not_supported_reasons(x), "an ordinary CPU tensor must not be picked automatically"
    assert b.not_supported_reasons(x, forced=True) == []
    xp = x.pin_memory()
    assert b.not_supported_reasons(xp) == []
    ref = gelora.twonn(x, backend="torch")
    r = gelora.twonn(xp, backend="triton")  # pinned, no duplicates: the tensor reaches selection as is
    assert r.backend == "triton" and abs(r.id - ref.id) <= 1e-6 * ref.id
    xd = _points(6000, 128, seed=3).cpu()  # with a duplicate row: dedup makes a copy (not pinned)
    monkeypatch.setenv("GELORA_TRITON_STREAM", "1")
    r = gelora.twonn(xd, backend="triton")
    assert r.backend == "triton" and r.n_duplicates == 1
    assert abs(r.id - gelora.twonn(xd, backend="torch").id) <= 1e-6 * r.id


def test_large_bf16_rarely_falls_back():
    import gelora

    x = _points(200_000, 1024, dtype=torch.bfloat16, seed=4)
    r = gelora.twonn(x, backend="triton")
    assert r.n_fixed <= 200, r.n_fixed  # at most 0.1% of rows recomputed in float64
    assert 4.0 < r.id < 12.0, r.id


@pytest.mark.parametrize("kind", ["manifold", "massive"])
@pytest.mark.parametrize("k", [17, 64])
def test_large_k_on_device(k, kind):
    """gelora.knn at GRIDE's k = 64 (66 candidates: the narrow-tile kernel variants, compiled for this GPU)
    against the float64 brute force, tie-aware, in bf16 and float32."""
    import gelora
    from gelora.testing import assert_knn_match

    for dtype in (torch.bfloat16, torch.float32):
        x = _points(3000, 384, kind, dtype=dtype, seed=4)
        dist, idx = gelora.knn(x, k, backend="triton")
        assert dist.shape == (3000, k) and dist.device.type == "cuda"
        assert_knn_match(x.double().cpu(), dist.cpu(), idx.cpu())
