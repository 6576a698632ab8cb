"""TwoNN estimator: exact neighbours, agreement with DADApy and scikit-dimension, duplicates policy."""
import warnings

import numpy as np
import pytest
import torch

import gelora
from conftest import subspace_points, usable_backends
from gelora.testing import assert_knn_match

CPU_BACKENDS = usable_backends("cpu")


def _outside(name: str):
    """DADApy or scikit-dimension for the agreement tests only (skipped without them; the exactness
    tests of this file need neither)."""
    return pytest.importorskip(name)


def _dadapy_id(x: np.ndarray, algorithm: str) -> float:
    dadapy = _outside("dadapy")
    data = dadapy.Data(coordinates=np.asarray(x, dtype=np.float64), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(data.compute_id_2NN(algorithm=algorithm)[0])


def _skdim_id(x: np.ndarray, method: str = "linear") -> float:
    skdim = _outside("skdim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skdim.id.TwoNN(method=method).fit(np.asarray(x, dtype=np.float64)).dimension_)


# ------------------------------------------------------------------------------------------------
# neighbours
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(3, 1), (4, 59), (97, 3), (1025, 17), (300, 4097)])
def test_knn2_matches_reference(backend, n, d):
    g = torch.Generator().manual_seed(n * 7 + d)
    x = torch.randn(n, d, generator=g) * 3 + 10
    dist, idx = gelora.knn2(x, backend=backend)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64 and dist.shape == (n, 2)
    assert bool((dist[:, 0] <= dist[:, 1]).all())
    assert_knn_match(x, dist, idx)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn2_duplicates_exact_zero_and_never_self(backend):
    x = subspace_points(400, d=3, D=20, offset=100.0)
    x = torch.cat([x, x[:50], x[:10]])  # rows 0..9 appear three times, 10..49 twice
    dist, idx = gelora.knn2(x, backend=backend)
    assert bool((dist[:50, 0] == 0).all()), "a duplicate must be found at distance exactly 0"
    assert bool((dist[:10, 1] == 0).all())
    assert not bool((idx == torch.arange(x.shape[0]).unsqueeze(1)).any())
    assert_knn_match(x, dist, idx)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn2_noncontiguous_and_numpy(backend):
    base = torch.randn(500, 64, dtype=torch.float64)
    x = base[::2, ::3]  # non-contiguous view
    assert not x.is_contiguous()
    d1, i1 = gelora.knn2(x, backend=backend)
    assert_knn_match(x.contiguous(), d1, i1)
    d2, i2 = gelora.knn2(np.asfortranarray(x.numpy()), backend=backend)
    assert torch.equal(i1, i2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs(dtype):
    x = subspace_points(800, d=6, D=32).to(dtype)
    dist, idx = gelora.knn2(x)
    # neighbours of the points as given (the rounded values), exactly
    assert_knn_match(x.double(), dist, idx)


@pytest.mark.parametrize("mode", ["plain", "mean", "xc"])
def test_float64_recomputation_is_streamed_and_exact(monkeypatch, mode):
    """Failing rows are recomputed against float64 chunks of the points (no float64 copy of all of
    them): the answer does not depend on the chunking (several row blocks and ragged chunks against
    one block and one chunk, bit for bit), the distances are the direct float64 ones of the points as
    given, and exact ties (a row present three times) are broken by index. ``mode``: "plain" already
    centred points, nothing else; "mean" the points as given with their float64 mean; "xc" the points,
    their float32 centred copy and the mean (what knn_exact passes)."""
    from gelora.neighbours import points, reference

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1500, 97, generator=g) * 3 + 40

    def args(pts):
        if mode == "plain":
            return points.centre(pts), {}
        xc, mean = points.centre_and_mean(pts)
        return pts, (dict(xc=xc, mean=mean) if mode == "xc" else dict(mean=mean))

    xs, kw = args(x)
    rows = torch.randperm(1500, generator=g)[:300]
    for k in (1, 2, 5):
        want = reference.reference_rows(xs, rows, k, **kw)  # default: one block, one chunk here
        with monkeypatch.context() as m:
            m.setattr(reference, "STREAM_CHUNK_ELEMS", 97 * 113)
            m.setattr(reference, "chunk_bytes", lambda: 8 * 97 * 4 * 64)  # 64-row blocks, 79-row chunks
            got = reference.reference_rows(xs, rows, k, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # squared float64 distances of the points given, directly, and the brute-force ones
        assert torch.equal(got[0], points.direct_sq_dist(xs, rows, got[1], dtype=torch.float64))
        bd, bi = _brute_knn(xs, k)
        torch.testing.assert_close(got[0].sqrt(), bd[rows], rtol=1e-13, atol=0.0)
    # rows[:3] appear three times (two neighbours at exactly 0: a tie), rows[3:9] twice (no tie)
    xd, kw = args(torch.cat([x, x[rows[:9]], x[rows[:3]]]))
    d, i = reference.reference_rows(xd, rows[:9], 2, **kw)
    assert bool((d[:3] == 0).all()) and bool((d[3:, 0] == 0).all())
    assert torch.equal(i[3:, 0], torch.arange(1503, 1509))
    assert torch.equal(i[:3], torch.stack([torch.arange(1500, 1503), torch.arange(1509, 1512)], 1))


def _far_clusters(n=600, d=64, seed=1):
    """Two tight clusters (spread 1e-3) 1e4 apart: the float64 shortcut's rounding (~1e-16 * |x|^2 ~
    1e-7) is not small against the neighbour distances (~1e-4 squared), so it cannot rank them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 1e-3
    x[: n // 2] += 1e4
    return x


def _brute_knn(x, k):
    """k-NN of the points as given by direct differences over all pairs in float64 (ties by index)."""
    x64 = x.double()
    d2 = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    d2.fill_diagonal_(float("inf"))
    val, idx = torch.sort(d2, dim=1, stable=True)
    return val[:, :k].sqrt(), idx[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_exact_where_the_float64_shortcut_cannot_rank(dtype, monkeypatch):
    """Rows whose neighbours the float64 shortcut cannot separate fail the reference's certification
    and get a brute-force search: the distances are the brute-force ones bit for bit (the old
    reference got some up to 1% wrong here), the indices are at those distances."""
    from gelora.neighbours import points, reference

    x = _far_clusters().to(dtype)
    want_d, _ = _brute_knn(x, 2)
    calls = []
    brute = reference._brute_rows
    monkeypatch.setattr(reference, "_brute_rows", lambda *a: calls.append(a[1].numel()) or brute(*a))
    dist, idx = gelora.knn_reference(x, 2)
    assert sum(calls) > 0, "the far clusters must fail the float64 certification"
    assert torch.equal(dist, want_d)
    assert torch.equal(points.direct_sq_dist(x.double(), None, idx).sqrt(), want_d)
    assert not bool((idx == torch.arange(x.shape[0]).unsqueeze(1)).any())
    assert bool((idx[:, 0] != idx[:, 1]).all())
    # a few rows, and the brute force in small blocks
    rows = torch.arange(0, 600, 37)
    monkeypatch.setattr(reference, "BRUTE_CHUNK_ELEMS", 64 * 37)
    calls.clear()
    d, i = reference.reference_rows(x, rows, 2, mean=x.double().mean(0))
    assert sum(calls) > 0
    assert torch.equal(d.sqrt(), want_d[rows])
    assert torch.equal(points.direct_sq_dist(x, rows, i, dtype=torch.float64).sqrt(), want_d[rows])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_twonn_exact_on_far_clusters(backend):
    """float64 points end to end: every row the engine cannot certify goes to the exact reference, so
    the ratios are those of the brute-force distances exactly."""
    from gelora.id.estimate import id_from_distances

    x = _far_clusters().double()
    want = id_from_distances(_brute_knn(x, 2)[0])
    res = gelora.twonn(x, backend=backend)
    assert res.n_fixed > 0
    assert torch.equal(res.mu, want["mu"]) and res.id == want["id"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_far_clusters_distances_of_the_points_given(backend):
    """float32 points, two tight clusters 1e4 apart: centring into float32 puts the cluster at 0 near
    -5e3, on a ~4.9e-4 grid, comparable to its neighbour distances (~5e-3), so distances of the
    centred points are off by up to ~20% (mu up to 0.027 off). The engines search the centred points,
    but the re-rank and the float64 recomputation use the points as given and the certification
    accounts for the centring's rounding: the ratios are those of the brute-force float64 distances of
    the points to float32 accuracy, and the neighbours are at the brute-force distances."""
    from gelora.neighbours import points
    from gelora.id.estimate import id_from_distances

    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g) * 1e-3
    x[:300] += 1e4
    keep, _ = gelora.unique_rows(x)  # the +1e4 cluster lies on float32's 2^-10 grid: dedup as twonn does
    want = id_from_distances(_brute_knn(x[keep], 2)[0])
    res = gelora.twonn(x, backend=backend)
    assert res.n_points == 600 and res.n_duplicates == 600 - keep.numel()
    assert res.n_fixed > 0
    torch.testing.assert_close(res.mu, want["mu"], rtol=1e-5, atol=0.0)
    assert res.id == pytest.approx(want["id"], rel=1e-5)
    # the distances of the centred float32 points are not those (what the pipeline used to return)
    xu = x[keep]
    xc = points.centre(xu)
    wrong = id_from_distances(_brute_knn(xc, 2)[0])
    assert float((wrong["mu"] - want["mu"]).abs().max()) > 1e-3
    # knn2: distances of the points given, indices at those distances
    dist, idx = gelora.knn2(xu, backend=backend)
    want_d, _ = _brute_knn(xu, 2)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-6, atol=0.0)
    at = points.direct_sq_dist(xu, None, idx, dtype=torch.float64).sqrt()
    torch.testing.assert_close(at, want_d, rtol=1e-6, atol=0.0)


def test_smallest_by_index_is_the_stable_sort():
    from gelora.neighbours.reference import _smallest_by_index

    g = torch.Generator().manual_seed(14)
    for trial in range(60):
        m, n = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(3, 300, (1,), generator=g))
        k = int(torch.randint(1, min(n, 6), (1,), generator=g))
        hi = int(torch.randint(1, 40, (1,), generator=g))
        d2 = torch.randint(0, hi, (m, n), generator=g).double()  # ties, few or many
        if trial % 3 == 0:
            d2 = torch.rand(m, n, generator=g, dtype=torch.float64)
        d2[:, int(torch.randint(0, n, (1,), generator=g))] = float("inf")
        val, idx = _smallest_by_index(d2, k)
        sv, si = torch.sort(d2, dim=1, stable=True)
        assert torch.equal(val, sv[:, :k]) and torch.equal(idx, si[:, :k]), trial


def test_direct_sq_dist_against_separate_keys():
    """Queries against a separate key set (the distributed shards), any chunking: the same values."""
    from gelora.neighbours.points import direct_sq_dist

    g = torch.Generator().manual_seed(12)
    q = torch.randn(70, 33, generator=g, dtype=torch.float64)
    keys = torch.randn(50, 33, generator=g, dtype=torch.float64)
    cand = torch.randint(0, 50, (70, 4), generator=g)
    want = ((keys[cand] - q.unsqueeze(1)) ** 2).sum(-1)
    torch.testing.assert_close(direct_sq_dist(q, None, cand, keys), want, rtol=1e-14, atol=0.0)
    assert torch.equal(direct_sq_dist(q, None, cand, keys, chunk_elems=33 * 4 * 3),
                       direct_sq_dist(q, None, cand, keys))
    both = torch.cat([q, keys])
    assert torch.equal(direct_sq_dist(both, torch.arange(70), cand + 70), direct_sq_dist(q, None, cand, keys))
    # narrower points converted exactly a chunk at a time: the values of a converted copy
    for src, dt in ((torch.float32, torch.float64), (torch.float16, None), (torch.bfloat16, torch.float32)):
        qs, ks = q.to(src), keys.to(src)
        wide = dt or torch.float32
        got = direct_sq_dist(qs, None, cand, ks, dtype=dt, chunk_elems=33 * 4 * 5)
        assert got.dtype == wide
        assert torch.equal(got, direct_sq_dist(qs.to(wide), None, cand, ks.to(wide)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_centre_with_a_given_mean_is_centre(dtype):
    """``centre(x, mean=...)`` with the float64 column mean (what the C++ core's one pass over the
    points returns) is bitwise ``centre(x)``, so a caller that has the mean need not read x again."""
    from gelora.neighbours.inputs import cpu_core
    from gelora.neighbours.points import centre

    x = (torch.randn(257, 45, generator=torch.Generator().manual_seed(13)) * 2 + 7).to(dtype)
    for cdt in (torch.float32, torch.float64):
        core = cpu_core(x) if x.dtype == cdt else None
        if core is not None:
            mean = torch.from_numpy(core.prepare_points(x.numpy(), n_threads=torch.get_num_threads())[1])
        else:
            mean = x.mean(dim=0, dtype=torch.float64)
        assert torch.equal(centre(x, cdt, mean=mean), centre(x, cdt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dedup,dups", [(True, 0), (True, 40), (False, 0)])
def test_twonn_reads_the_points_once_and_matches_the_separate_passes(dtype, dedup, dups, monkeypatch):
    """With the C++ core, one ``prepare_points`` pass gives twonn the NaN check, the row hashes and the
    mean (a second one only for the mean of the rows left after removing duplicates), and the result is
    bit for bit that of the separate passes (as_points, unique_rows, centre)."""
    from gelora.neighbours import pipeline, points
    from gelora.neighbours.inputs import as_points, cpu_core
    from gelora.id.estimate import id_from_distances

    x = subspace_points(700, d=6, D=48, offset=3.0, seed=4, dtype=dtype)
    if dups:
        x = torch.cat([x, x[:dups]])
    core = cpu_core(x)
    if core is None:
        pytest.skip("needs the C++ core")
    # the separate passes, as before
    xt = as_points(x)
    if dedup:
        keep, n_dup = gelora.unique_rows(xt)
        assert n_dup == dups
        xt = xt[keep]
    engine = gelora.neighbours.engines.select_backend(xt, None)
    xc, mean = points.centre_and_mean(xt, pipeline.compute_dtype(xt))
    dist, _, _ = pipeline.knn_exact(xc, 2, engine, points=xt, mean=mean)
    want = id_from_distances(dist)
    calls = []
    prep = core.prepare_points

    def counted(arr, coef=None, **kw):
        calls.append(coef is not None)  # with hashes or not
        return prep(arr, coef, **kw)

    monkeypatch.setattr(core, "prepare_points", counted)
    res = gelora.twonn(x, dedup=dedup)
    assert calls == ([dedup] if not dups else [True, False])
    assert torch.equal(res.mu, want["mu"]) and res.id == want["id"]


def test_3d_input_flattens_tokens():
    x = subspace_points(600, d=5, D=24)
    r3 = gelora.twonn(x.reshape(6, 100, 24))
    r2 = gelora.twonn(x)
    assert r3.id == r2.id and r3.n_points == 600


# ------------------------------------------------------------------------------------------------
# estimators vs outside implementations
# ------------------------------------------------------------------------------------------------
MANIFOLDS = ["M1_Sphere", "M7_Roll", "M9_Affine", "M5a_Helix1d", "M10a_Cubic", "M12_Norm"]


@pytest.fixture(scope="module")
def manifolds():
    skdim = _outside("skdim")
    bm = skdim.datasets.BenchmarkManifolds(random_state=0)
    truth = bm.truth
    out = {}
    for name in MANIFOLDS:
        d = int(truth.loc[name, "Intrinsic Dimension"])
        dim = int(truth.loc[name, "Number of variables"])
        out[name] = (np.asarray(bm.generate(name=name, n=1500, dim=dim, d=d)), d)
    return out


@pytest.mark.parametrize("name", MANIFOLDS)
def test_matches_dadapy_and_skdim_on_benchmark_manifolds(manifolds, name):
    x, true_d = manifolds[name]
    mle = gelora.twonn(x, estimator="mle")
    lin = gelora.twonn(x, estimator="linear")
    assert mle.n_duplicates == 0
    assert mle.id == pytest.approx(_dadapy_id(x, "ml"), rel=1e-6)
    assert lin.id == pytest.approx(_dadapy_id(x, "base"), rel=1e-6)
    assert lin.id == pytest.approx(_skdim_id(x, "linear"), rel=1e-6)
    assert gelora.twonn(x, estimator="mle_censored").id == pytest.approx(_skdim_id(x, "mle"), rel=1e-6)
    # and the estimate is near the truth (TwoNN is biased low at high ID and small N: 14.5 for the 20-dim M9_Affine at N=1500)
    assert 0.65 * true_d - 0.3 < mle.id < 1.2 * true_d + 0.3, (mle.id, true_d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree(backend):
    x = subspace_points(3000, d=10, D=128)
    ref = gelora.twonn(x, backend="torch").id
    assert gelora.twonn(x, backend=backend).id == pytest.approx(ref, rel=1e-6)


def test_stderr_and_bootstrap():
    x = subspace_points(4000, d=8, D=64)
    r = gelora.twonn(x)
    assert r.stderr == pytest.approx(r.id / np.sqrt(r.n_used - 2))
    b = gelora.twonn(x, bootstrap=200, seed=1)
    assert b.bootstrap_ids.shape == (200,)
    # the bootstrap error of the MLE agrees with the analytic one to within sampling noise
    assert 0.7 < b.stderr / r.stderr < 1.4
    lo, hi = b.ci95
    assert lo < r.id < hi
    # a different seed gives other replicates; the same seed the same ones
    assert torch.equal(gelora.twonn(x, bootstrap=200, seed=1).bootstrap_ids, b.bootstrap_ids)


def test_scale_curve():
    x = subspace_points(4096, d=6, D=40)
    curve = gelora.id_scale_curve(x, n_min=256)
    assert curve.n == [4096, 2048, 1024, 512, 256]
    assert curve.repeats == [1, 2, 4, 8, 16]
    assert all(abs(v - 6) < 1.0 for v in curve.id), curve.id
    assert all(e > 0 for e in curve.stderr)


# ------------------------------------------------------------------------------------------------
# duplicates and ties
# ------------------------------------------------------------------------------------------------
def test_duplicates_do_not_move_the_id():
    """5000 points of an 8-dim subspace in D=64 (offset +5), 20% duplicated rows: within 2% of clean."""
    x = subspace_points(5000, d=8, D=64, offset=5.0, seed=3)
    g = torch.Generator().manual_seed(1)
    dup = x[torch.randint(0, 5000, (1250,), generator=g)]
    xd = torch.cat([x, dup])[torch.randperm(6250, generator=g)]  # 1250 of 6250 rows = 20% copies
    clean = gelora.twonn(x)
    dirty = gelora.twonn(xd)
    assert dirty.n_duplicates == 1250 and dirty.n_points == 6250
    assert abs(dirty.id - clean.id) / clean.id < 0.02
    # the linear estimator too
    assert abs(gelora.twonn(xd, estimator="linear").id / gelora.twonn(x, estimator="linear").id - 1) < 0.02
    # dedup=False is the raw estimator: r1 == 0 points are dropped, with a warning
    with pytest.warns(UserWarning, match="r1 == 0"):
        raw = gelora.twonn(xd, dedup=False)
    assert raw.n_zero_r1 > 0 and np.isfinite(raw.id)


def test_unique_rows_signed_zero_and_collisions():
    x = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    keep, n_dup = gelora.unique_rows(x)
    assert keep.tolist() == [0, 2, 4] and n_dup == 2
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        keep, n_dup = gelora.unique_rows(x.to(dt))
        assert keep.tolist() == [0, 2, 4]


def test_unique_rows_hash_collision_falls_back_to_the_exact_path():
    """Distinct rows whose hashes collide (here every hash forced equal) are not merged: the verification
    sees the mismatch and the exact path keeps the first occurrence of every distinct row."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 7, generator=g)
    x = torch.cat([base, base[[3, 9, 9, 40]]])
    keep, n_dup = gelora.unique_rows(x, torch.zeros(x.shape[0], dtype=torch.int64))
    assert keep.tolist() == list(range(50)) and n_dup == 4
    # and with the real hashes the same answer
    keep2, n_dup2 = gelora.unique_rows(x)
    assert torch.equal(keep, keep2) and n_dup2 == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_reference_is_the_brute_force_on_ordinary_data(dtype):
    """The float64 reference against plain float64 brute force (all pairwise direct differences) on
    ordinary data: offset Gaussian points, k = 1, 3, 7."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(700, 33, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    x64 = x.double()
    d2 = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist")
    d2.fill_diagonal_(float("inf"))
    want_d, want_i = torch.sort(d2, dim=1, stable=True)
    for k in (1, 3, 7):
        dist, idx = gelora.knn_reference(x, k)
        torch.testing.assert_close(dist, want_d[:, :k], rtol=1e-13, atol=0.0)
        assert torch.equal(idx, want_i[:, :k])


def test_result_is_float_convertible():
    x = subspace_points(500, d=4, D=16)
    r = gelora.twonn(x)
    assert float(r) == r.id == gelora.estimate_id(x)
    assert r.mu.shape == (500,) and bool((r.mu >= 1).all())


_PEAK_SCRIPT = r"""
import resource, sys, torch
torch.set_num_threads(1)
from gelora.neighbours import points, reference
n, d = 1_000_000, 64
x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:100]
mean = points.column_mean(x)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d2, idx = reference.reference_rows(x, rows, 2, mean=mean)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# spot check against brute force for a few rows
bd, bi = reference.brute_knn(x[rows[:3]], x, 2, rows[:3])
assert torch.equal(d2[:3], bd), (d2[:3], bd)
print("EXTRA_KB", peak - base)
"""


def test_float64_recomputation_memory_is_bounded(tmp_path):
    """1M x 64 float32 points, 100 failing rows, a 64 MiB chunk budget: the float64 recomputation's peak
    extra memory stays within the budget plus a little (a float64 copy of the points alone is 512 MB)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, GELORA_CHUNK_BYTES=str(64 << 20), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    extra_mb = int(out.stdout.split("EXTRA_KB")[1]) / 1024
    assert extra_mb < 64 + 48, extra_mb


def test_column_mean_and_inputs_untouched():
    """The chunked float64 mean is the mean, and no search modifies the caller's points (float64 points
    are centred in copies, never in place)."""
    from gelora.neighbours import points, reference

    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, 13, generator=g, dtype=torch.float64) * 5 + 1e3
    keep = x.clone()
    torch.testing.assert_close(points.column_mean(x), x.mean(0), rtol=1e-14, atol=0.0)
    gelora.knn_reference(x, 2)
    reference.reference_rows(x, torch.arange(0, 700, 7), 3, mean=x.mean(0))
    gelora.twonn(x)
    gelora.knn2(x, backend="torch")
    assert torch.equal(x, keep)
