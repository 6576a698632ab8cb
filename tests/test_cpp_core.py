"""The C++ core (gelora._C) and the ``cpp`` backend against the float64 reference.

Two levels:
* the raw core ``_C.knn_candidates``: its candidates must be the kc nearest neighbours up to the
  rounding its error bound allows (sorted exact distances of the candidates within 2 * err of the
  reference, the approximate distances within err of the exact ones), on every instruction set this
  CPU runs and with blockings small enough to exercise several phases, strips and K chunks;
* the whole pipeline with ``backend="cpp"``: exact neighbours, modulo ties (gelora.testing).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gelora
from gelora.neighbours.engines import cpp as cpp_backend
from gelora.neighbours.engines import get_backend, select_backend
from gelora.neighbours.engines.torch import gemm_error_bound
from gelora.testing import assert_knn_match

from conftest import import_core  # noqa: E402

_C = import_core()

ISAS = _C.info()["isas"]
DTYPES = [np.float32, np.float64]


def points(n, d, dtype=np.float32, seed=0, offset=0.0):
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, d)) + offset).astype(dtype)


def exact_sq(x: np.ndarray) -> np.ndarray:
    """(n, n) float64 squared distances computed directly (no norm shortcut), +inf on the diagonal."""
    xd = x.astype(np.float64)
    n = xd.shape[0]
    d2 = np.empty((n, n))
    step = max(1, (1 << 21) // max(1, n * xd.shape[1]))
    for s in range(0, n, step):
        d2[s:s + step] = ((xd[s:s + step, None, :] - xd[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return d2


def check_candidates(x: np.ndarray, kc: int, d2: np.ndarray, idx: np.ndarray, sq: np.ndarray) -> None:
    """The contract of KnnBackend.search for the raw core, with the error bound of its tiles."""
    n = x.shape[0]
    assert d2.shape == (n, kc) and idx.shape == (n, kc)
    assert d2.dtype == x.dtype and idx.dtype == np.int64
    assert ((idx >= 0) & (idx < n)).all(), "index out of range"
    assert not (idx == np.arange(n)[:, None]).any(), "a row is its own candidate"
    s = np.sort(idx, axis=1)
    assert not (s[:, 1:] == s[:, :-1]).any(), "a candidate appears twice in a row"
    assert (np.diff(d2, axis=1) >= 0).all(), "candidates are not ascending"
    np.testing.assert_allclose(sq, (x.astype(np.float64) ** 2).sum(1), rtol=1e-5 if x.dtype == np.float32 else 1e-12)
    err = gemm_error_bound(torch.from_numpy(sq), x.shape[1], torch.from_numpy(x).dtype).double().numpy()
    full = exact_sq(x)
    ex = np.take_along_axis(full, idx, axis=1)
    # the approximate distances are within the bound of the exact ones
    assert (np.abs(d2.astype(np.float64) - ex) <= err[:, None]).all(), np.abs(d2 - ex).max()
    # nothing nearer was missed: the s-th exact candidate distance exceeds the true s-th by at most 2 err
    ref = np.sort(full, axis=1)[:, :kc]
    got = np.sort(ex, axis=1)
    assert (got - ref <= 2 * err[:, None]).all(), (got - ref).max()


# --------------------------------------------------------------------------------------------------
# raw core
# --------------------------------------------------------------------------------------------------
SHAPES = [(3, 1), (3, 59), (3, 4097), (4, 1), (4, 59), (4, 4097), (97, 1), (97, 59), (97, 4097),
          (1025, 1), (1025, 59)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
def test_core_matches_reference(n, d, dtype, isa):
    x = points(n, d, dtype, seed=n * 7 + d)
    kc = min(n - 1, 4)
    d2, idx, sq, plan = _C.knn_candidates(x, kc, isa=isa)
    assert plan["isa"] == isa
    check_candidates(x, kc, d2, idx, sq)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("prepack", [0, 1], ids=["pack-per-task", "prepacked"])
@pytest.mark.parametrize("private_lists", [0, 1], ids=["phased", "private-lists"])
@pytest.mark.parametrize(
    "blocking",
    [dict(block_rows=1, block_cols=1, depth=1),  # rounded up to one register tile, one K step
     dict(block_rows=50, block_cols=40, depth=16),
     dict(block_rows=200, block_cols=100, depth=100)],
    ids=["tiny", "small", "medium"],
)
def test_core_blockings_and_threads(isa, threads, prepack, private_lists, blocking):
    """Many row blocks, strips and K chunks, both schedules: the per-thread lists, their merge and the
    partial sums."""
    x = points(301, 37, np.float32, seed=threads, offset=1.0)
    d2, idx, sq, plan = _C.knn_candidates(x, 5, isa=isa, n_threads=threads, prepack=prepack,
                                          private_lists=private_lists, **blocking)
    assert plan["threads"] == threads and plan["depth"] <= 37
    assert plan["prepack"] == bool(prepack) and plan["private_lists"] == bool(private_lists)
    check_candidates(x, 5, d2, idx, sq)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_core_all_candidates(dtype):
    """kc = n - 1: every other row is a candidate, in ascending order."""
    x = points(40, 9, dtype, seed=3)
    d2, idx, sq, _ = _C.knn_candidates(x, 39)
    check_candidates(x, 39, d2, idx, sq)
    assert (np.sort(idx, 1) == np.array([[j for j in range(40) if j != i] for i in range(40)])).all()


@pytest.mark.parametrize("isa", ISAS)
def test_core_duplicates_are_candidates(isa):
    """Exact duplicates: each copy is a candidate of the other at (approximately) 0, never itself."""
    x = points(200, 33, np.float32, seed=5, offset=3.0)
    x[100:150] = x[:50]          # 50 pairs
    x[150:160] = x[0]            # row 0 has 11 more copies
    d2, idx, sq, _ = _C.knn_candidates(x, 3, isa=isa, block_rows=48, block_cols=32)
    check_candidates(x, 3, d2, idx, sq)
    for i in range(1, 50):
        assert i + 100 in idx[i] and i in idx[i + 100]
    copies = {0, 100, *range(150, 160)}
    for i in copies:
        assert set(idx[i]) <= copies - {i}


@pytest.mark.parametrize("threads,private_lists", [(1, 1), (2, 1), (2, 0)], ids=["1t", "2t-private", "2t-phased"])
@pytest.mark.parametrize("kc", [16, 17, 66])
def test_core_long_lists(kc, threads, private_lists):
    """Candidate lists above SORTED_MAX_KC = 16 are heaps (sorted at the end): points on a line, so
    that a column's offers arrive nearest last and every one enters the list (the worst order for a
    sorted list), and a random cloud; against the brute force, with both schedules and their merges."""
    line = np.zeros((260, 3), np.float32)
    line[:, 0] = np.arange(260)[::-1] * 0.5
    line[:, 1] = (np.arange(260) % 7) * 1e-3  # no exact ties
    for x in (line, points(300, 29, np.float32, seed=kc)):
        d2, idx, sq, _ = _C.knn_candidates(x, kc, n_threads=threads, private_lists=private_lists,
                                           block_rows=48, block_cols=32)
        check_candidates(x, kc, d2, idx, sq)


@pytest.mark.parametrize("threads", [1, 2])
def test_core_heap_ties_by_index(threads):
    """Heap lists come out with equal distances ascending by index: 120 identical rows (all distances
    equal) give 20 distinct other rows each, in increasing order."""
    x = np.ones((120, 8), np.float32)
    d2, idx, sq, _ = _C.knn_candidates(x, 20, n_threads=threads, block_rows=24, block_cols=16)
    check_candidates(x, 20, d2, idx, sq)
    assert (d2 == d2[0, 0]).all()
    assert (np.diff(idx, axis=1) > 0).all()


def test_core_preallocated_outputs():
    x = points(64, 8)
    out_d2 = np.empty((64, 3), np.float32)
    out_idx = np.empty((64, 3), np.int64)
    d2, idx, _, _ = _C.knn_candidates(x, 3, out_d2=out_d2, out_idx=out_idx)
    assert d2 is out_d2 and idx is out_idx
    check_candidates(x, 3, out_d2, out_idx, (x.astype(np.float64) ** 2).sum(1))


def test_direct_sq_dist():
    x = points(50, 70, np.float32, seed=2)
    x[7] = x[3]
    cand = np.random.default_rng(0).integers(0, 50, size=(50, 6))
    cand[3, 0] = 7
    got = _C.direct_sq_dist(x, cand)
    want = ((x[:, None, :].astype(np.float64) - x[cand].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got[3, 0] == 0.0
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(_C.direct_sq_dist(x64, cand), want, rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_prepare_points_and_centre_match_torch(dtype):
    """The one-pass row hash equals the linear hash of gelora.unique_rows (bits of x + 0 times odd
    coefficients, modulo 2^64), the mean is the float64 column mean, and the centring is bitwise
    torch's ``x - mean.to(x.dtype)``."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(333, 45, generator=g, dtype=torch.float64) * 3 + 10).to(dtype)
    x[5] = x[17]
    x[8, 3] = -0.0
    x[9] = x[8]
    x[9, 3] = 0.0  # equal to row 8 up to the sign of zero: same hash
    coef = torch.randint(1, 2**62, (45,), generator=g, dtype=torch.int64) | 1
    view = torch.int32 if dtype == torch.float32 else torch.int64
    h, mean, bad = _C.prepare_points(x.numpy(), coef.numpy())
    want = (x + 0.0).view(view).to(torch.int64) @ coef
    assert bad == 0 and torch.equal(torch.from_numpy(h), want)
    assert h[5] == h[17] and h[8] == h[9] and len(set(h.tolist())) == 331
    torch.testing.assert_close(torch.from_numpy(mean), x.double().mean(0), rtol=1e-15, atol=1e-13)
    torch_mean = x.double().mean(0)
    xc = _C.centre(x.numpy(), torch_mean.numpy())
    assert torch.equal(torch.from_numpy(xc), x - torch_mean.to(dtype))
    inplace = x.numpy().copy()
    assert _C.centre(inplace, mean, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, _C.centre(x.numpy(), mean))
    h2, _, _ = _C.prepare_points(x.numpy())
    assert h2 is None
    y = x.numpy().copy()
    y[3, 0] = np.nan
    y[7, 44] = -np.inf
    y[200, :] = np.inf
    assert _C.prepare_points(y)[2] == 3


def test_prepare_points_and_centre_bad_inputs():
    x = points(10, 4)
    with pytest.raises(ValueError, match="coef: shape"):
        _C.prepare_points(x, np.ones(5, np.int64))
    with pytest.raises(TypeError, match="coef: dtype"):
        _C.prepare_points(x, np.ones(4, np.int32))
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.prepare_points(x.astype(np.float16))
    with pytest.raises(ValueError, match="at least 1 row"):
        _C.prepare_points(np.empty((0, 4), np.float32))
    with pytest.raises(ValueError, match="mean: shape"):
        _C.centre(x, np.zeros(3))
    with pytest.raises(TypeError, match="mean: dtype"):
        _C.centre(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="out: shape"):
        _C.centre(x, np.zeros(4), out=np.empty((10, 5), np.float32))
    with pytest.raises(TypeError, match="out: dtype"):
        _C.centre(x, np.zeros(4), out=np.empty((10, 4), np.float64))
    with pytest.raises(ValueError, match="overlaps x"):
        big = np.zeros((11, 4), np.float32)
        _C.centre(big[:10], np.zeros(4), out=big[1:])
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.centre(np.asfortranarray(x), np.zeros(4))


def test_info():
    info = _C.info()
    assert info["isas"][-1] == "generic" and info["max_threads"] >= 1
    assert set(info["tiles"]) == set(info["isas"])


# --------------------------------------------------------------------------------------------------
# bad input to the raw functions: clear exceptions, never a crash
# --------------------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    x = points(10, 4)
    with pytest.raises(ValueError, match="2-D"):
        _C.knn_candidates(x[0], 2)
    with pytest.raises(ValueError, match="2-D"):
        _C.knn_candidates(x[None], 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.knn_candidates(x.astype(np.int32), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.knn_candidates(x.astype(np.float16), 2)
    with pytest.raises(TypeError):
        _C.knn_candidates([[1.0, 2.0], [3.0, 4.0]], 1)
    with pytest.raises(ValueError, match="kc=10 is out of range"):
        _C.knn_candidates(x, 10)
    with pytest.raises(ValueError, match="kc=0 is out of range"):
        _C.knn_candidates(x, 0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        _C.knn_candidates(x[:1], 1)
    with pytest.raises(ValueError, match="at least one column"):
        _C.knn_candidates(np.empty((5, 0), np.float32), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.knn_candidates(np.asfortranarray(x), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.knn_candidates(points(10, 8)[:, ::2], 2)
    with pytest.raises(ValueError, match="isa 'sse9'"):
        _C.knn_candidates(x, 2, isa="sse9")
    with pytest.raises(ValueError, match="n_threads"):
        _C.knn_candidates(x, 2, n_threads=-1)
    with pytest.raises(ValueError, match="block_rows"):
        _C.knn_candidates(x, 2, block_rows=-4)
    with pytest.raises(ValueError, match="prepack"):
        _C.knn_candidates(x, 2, prepack=2)
    with pytest.raises(ValueError, match="private_lists"):
        _C.knn_candidates(x, 2, private_lists=-2)


def test_bad_output_buffers_raise():
    x = points(10, 4)
    with pytest.raises(ValueError, match="out_d2: shape"):
        _C.knn_candidates(x, 2, out_d2=np.empty((10, 3), np.float32))
    with pytest.raises(TypeError, match="out_d2: dtype"):
        _C.knn_candidates(x, 2, out_d2=np.empty((10, 2), np.float64))
    with pytest.raises(ValueError, match="out_idx: shape"):
        _C.knn_candidates(x, 2, out_idx=np.empty((9, 2), np.int64))
    with pytest.raises(TypeError, match="out_idx: dtype"):
        _C.knn_candidates(x, 2, out_idx=np.empty((10, 2), np.int32))
    with pytest.raises(ValueError, match="out_idx: expected a 2-D"):
        _C.knn_candidates(x, 2, out_idx=np.empty(20, np.int64))
    ro = np.empty((10, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _C.knn_candidates(x, 2, out_d2=ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.knn_candidates(x, 2, out_d2=np.empty((2, 10), np.float32).T)
    with pytest.raises(ValueError, match="must not share memory"):
        _C.knn_candidates(x, 4, out_d2=x)
    both = np.empty(40, np.int64)
    with pytest.raises(ValueError, match="must not share memory"):
        _C.knn_candidates(x, 2, out_d2=both.view(np.float32)[:20].reshape(10, 2), out_idx=both[:20].reshape(10, 2))


def test_non_finite_raises():
    x = points(10, 4)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3 has a non-finite squared norm"):
        _C.knn_candidates(x, 2)
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        _C.knn_candidates(x, 2)
    big = points(10, 4) * np.float32(1e20)  # finite, but |x|^2 overflows float32
    with pytest.raises(ValueError, match="overflow"):
        _C.knn_candidates(big, 2)
    # |x|^2 = 1e38 is finite in float32, but |x|^2 + |y|^2 + 2|<x, y>| is not: rejected as well
    edge = np.zeros((10, 4), np.float32)
    edge[:, 0] = np.float32(1e19) * np.linspace(0.5, 1.0, 10, dtype=np.float32)
    with pytest.raises(ValueError, match="row 9 .*overflow"):
        _C.knn_candidates(edge, 2)
    np.testing.assert_array_equal(_C.knn_candidates(edge * np.float32(0.5), 1)[1][:, 0] >= 0, True)


def test_direct_sq_dist_bad_inputs():
    x = points(10, 4)
    with pytest.raises(IndexError, match=r"cand\[2, 1\] = 10"):
        bad = np.zeros((10, 3), np.int64)
        bad[2, 1] = 10
        _C.direct_sq_dist(x, bad)
    with pytest.raises(IndexError, match="-1"):
        _C.direct_sq_dist(x, -np.ones((10, 3), np.int64))
    with pytest.raises(ValueError, match="does not match the 10 rows"):
        _C.direct_sq_dist(x, np.zeros((9, 3), np.int64))
    with pytest.raises(TypeError, match="int64"):
        _C.direct_sq_dist(x, np.zeros((10, 3), np.int32))
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.direct_sq_dist(x.astype(np.int64), np.zeros((10, 3), np.int64))


# --------------------------------------------------------------------------------------------------
# the backend and the whole pipeline
# --------------------------------------------------------------------------------------------------
def test_backend_declares_cpu_only():
    b = get_backend("cpp")
    assert b.not_supported_reasons(torch.zeros(8, 4)) == []
    meta = torch.zeros(8, 4, device="meta")
    reasons = b.not_supported_reasons(meta)
    assert reasons and "CPU tensors only" in reasons[0]
    with pytest.raises(gelora.BackendUnavailable, match="CPU tensors only"):
        select_backend(meta, "cpp")


def derived_atol(x, k):
    """Twice the distance error of PyTorch's own float32 path (the torch backend) against the float64
    reference, on the same data (float32 centring alone costs ~ulp(|x|) per coordinate)."""
    ref_d, _ = gelora.knn_reference(x, k=k)
    torch_d, _ = gelora.knn2(x, k=k, backend="torch")
    return 2.0 * float((torch_d.double() - ref_d).abs().max()) + 1e-6 * float(ref_d.median()) + 1e-12


@pytest.mark.parametrize("n,d", [(3, 1), (4, 59), (97, 59), (97, 4097), (1025, 1), (1025, 59)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_pipeline_matches_reference(n, d, dtype):
    g = torch.Generator().manual_seed(n + d)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) + 4.0).to(dtype)
    k = min(2, n - 1)
    dist, idx = gelora.knn2(x, k=k, backend="cpp")
    assert_knn_match(x, dist, idx, atol=derived_atol(x, k))


@pytest.mark.parametrize(
    "make",
    [lambda x: x[:, ::2], lambda x: x[::3], lambda x: x.T.contiguous().T, lambda x: x[:, 1:]],
    ids=["col-stride", "row-stride", "fortran", "offset"],
)
def test_pipeline_non_contiguous(make):
    base = torch.randn(400, 62, generator=torch.Generator().manual_seed(1))
    x = make(base)
    assert not x.is_contiguous() or x.storage_offset() > 0
    dist, idx = gelora.knn2(x, k=2, backend="cpp")
    assert_knn_match(x, dist, idx)
    # numpy views too
    xn = make(torch.from_numpy(base.numpy().copy())).numpy()
    dist, idx = gelora.knn2(xn, k=2, backend="cpp")
    assert_knn_match(xn, dist, idx)


def test_pipeline_duplicates_exactly_zero():
    """Exact duplicate rows come back at distance exactly 0 (the direct re-rank), with the twin as
    neighbour, also with a large offset where the norm shortcut would give a fake nonzero."""
    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(2)) * 0.01 + 100.0
    x[200:250] = x[:50]
    dist, idx = gelora.knn2(x, k=2, backend="cpp")
    assert_knn_match(x, dist, idx)
    for i in range(50):
        assert dist[i, 0].item() == 0.0 and idx[i, 0].item() == i + 200
        assert dist[i + 200, 0].item() == 0.0 and idx[i + 200, 0].item() == i
    assert (dist[50:200, 0] > 0).all()
    with pytest.warns(UserWarning, match="dropped 100 point"):
        res = gelora.twonn(x, backend="cpp", dedup=False)
    assert res.n_zero_r1 == 100 and res.backend == "cpp"


def test_twonn_known_dimension():
    """Points on a 5-dimensional subspace of R^64: the cpp engine gives the reference's estimate."""
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(64, 5, generator=g, dtype=torch.float64)).Q
    x = (torch.randn(3000, 5, generator=g, dtype=torch.float64) @ basis.T + 2.0).float()
    res = gelora.twonn(x, backend="cpp")
    ref = gelora.twonn(x, backend="torch")
    assert res.backend == "cpp" and res.n_fixed == 0
    # same neighbours; the float32 direct distances differ in summation order (and FMA contraction):
    # each within ~D u of the exact one, so each log ratio within ~2 D u (~8e-6), the mean far less
    assert abs(res.id - ref.id) < 1e-6 * ref.id
    assert 4.5 < res.id < 5.5


# --------------------------------------------------------------------------------------------------
# AddressSanitizer (deselected by default: pytest -m asan)
# --------------------------------------------------------------------------------------------------
@pytest.mark.asan
def test_asan_build_runs_clean():
    """Builds the core with -fsanitize=address into a temporary directory and runs it (asan_check.sh)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed for the AddressSanitizer build")
    script = Path(__file__).with_name("asan_check.sh")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "ASAN CHECK PASSED" in out and "'asan': True" in out, out[-3000:]


def test_backend_rerank_matches_pipeline_direct_distances():
    """The C++ re-rank gives the pipeline's direct distances (exactly 0 for duplicates)."""
    from gelora.neighbours.points import centre, direct_sq_dist

    x = centre(torch.randn(300, 97, generator=torch.Generator().manual_seed(6)) + 20.0)
    x[200] = x[10]
    b = get_backend("cpp")
    cand = b.search(x, 4).idx
    got = b.rerank(x, cand)
    want = direct_sq_dist(x, torch.arange(300), cand)
    assert got.dtype == torch.float32 and got.shape == (300, 4)
    # two summation orders of 97 non-negative float32 terms: each within 97 u of the exact sum
    torch.testing.assert_close(got, want, rtol=2 * 97 * 2.0**-24, atol=0.0)
    assert got[10, 0] == 0 and got[200, 0] == 0
    x64 = x.double()
    torch.testing.assert_close(b.rerank(x64, cand), direct_sq_dist(x64, torch.arange(300), cand),
                               rtol=2 * 97 * 2.0**-53, atol=0.0)


def test_backend_reason_without_extension(monkeypatch):
    """Without a loadable gelora._C the backend says why (and how to see the build error)."""
    from gelora import _env

    # the one loader's cached result, as a machine without the built core has it
    monkeypatch.setattr(_env, "_CORE", [None, "No module named 'gelora._C'"])
    fresh = cpp_backend.CppBackend()
    reasons = fresh.not_supported_reasons(torch.zeros(8, 4))
    assert len(reasons) == 1 and "gelora._C is not built" in reasons[0] and "GELORA_REQUIRE_EXT" in reasons[0]
