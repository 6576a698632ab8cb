"""GRIDE: equal to DADApy's return_id_scaling_gride and scikit-dimension's GRIDE, the solver against a
bracketing root finder, known dimensions, the duplicates policy, bad input."""
import warnings

import numpy as np
import pytest
import torch

import gelora
from conftest import subspace_points, usable_backends
from gelora.id.gride import gride_from_distances, solve_scores

CPU_BACKENDS = usable_backends("cpu")
RTOL = 1e-6  # float32 distances (relative rounding ~6e-8) against DADApy's float64 ones: ~1e-7 seen


def _dadapy_gride(x: np.ndarray, range_max: int = 64):
    dadapy = pytest.importorskip("dadapy")
    data = dadapy.Data(coordinates=np.array(x, dtype=np.float64), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data.return_id_scaling_gride(range_max=range_max)


def _skdim_gride(x: np.ndarray, range_max: int = 64):
    skdim = pytest.importorskip("skdim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skdim.id.GRIDE(multiscale=True, range_max=range_max).fit(np.asarray(x, dtype=np.float64))


@pytest.fixture(scope="module")
def manifolds():
    skdim = pytest.importorskip("skdim")
    pytest.importorskip("pandas")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = skdim.datasets.BenchmarkManifolds(random_state=0).generate(n=500)
    return {name: np.unique(np.asarray(x, dtype=np.float64), axis=0) for name, x in data.items()}


# ------------------------------------------------------------------------------------------------
# agreement with DADApy and scikit-dimension
# ------------------------------------------------------------------------------------------------
def test_equals_dadapy_on_benchmark_manifolds(manifolds):
    """Every manifold of skdim's BenchmarkManifolds (Hein, Campadelli): ids, errors and scales."""
    assert len(manifolds) >= 20
    for name, x in manifolds.items():
        res = gelora.gride(x)
        ids, err, rs = _dadapy_gride(x)
        assert res.n_duplicates == 0 and res.ids.shape == (6,), name
        assert res.n1.tolist() == [1, 2, 4, 8, 16, 32]
        np.testing.assert_allclose(res.ids.numpy(), ids, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(res.stderr.numpy(), err, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(res.scales.numpy(), rs, rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("range_max", [2, 5, 100])
def test_equals_dadapy_at_other_ranges(range_max):
    x = subspace_points(700, d=4, D=30, offset=3.0, dtype=torch.float64).numpy()
    res = gelora.gride(x, range_max=range_max)
    ids, err, rs = _dadapy_gride(x, range_max)
    assert res.n1.numel() == len(ids)
    np.testing.assert_allclose(res.ids.numpy(), ids, rtol=RTOL)
    np.testing.assert_allclose(res.stderr.numpy(), err, rtol=RTOL)
    np.testing.assert_allclose(res.scales.numpy(), rs, rtol=RTOL)


def test_agrees_with_skdim_gride(manifolds):
    """skdim.id.GRIDE(multiscale=True, range_max=64): the same IDs; the same errors where the outlier
    cut removed nothing (skdim counts only the kept ratios in the information, DADApy and gelora all)."""
    for name in ("M1_Sphere", "M5a_Helix1d", "M7_Roll", "M10b_Cubic", "Mp3_Paraboloid", "M13b_Spiral"):
        x = manifolds[name]
        res = gelora.gride(x)
        sk = _skdim_gride(x)
        assert sk.scales_.tolist() == res.n1.tolist()
        np.testing.assert_allclose(res.ids.numpy(), sk.dimension_scales_, rtol=RTOL, err_msg=name)
        full = (res.n_used == x.shape[0]).numpy()
        np.testing.assert_allclose(res.stderr.numpy()[full], sk.error_scales_[full], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(res.stderr.numpy(), sk.error_scales_, rtol=1e-2, err_msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree_and_float32_input(backend):
    x = subspace_points(900, d=6, D=48, offset=20.0)  # float32 points far from the origin
    res = gelora.gride(x, backend=backend, range_max=32)
    assert res.backend == backend
    ids, err, rs = _dadapy_gride(x.numpy(), 32)
    np.testing.assert_allclose(res.ids.numpy(), ids, rtol=RTOL)
    np.testing.assert_allclose(res.scales.numpy(), rs, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# the solver and known dimensions
# ------------------------------------------------------------------------------------------------
def _score(d, lm, n1):
    n2 = 2 * n1
    return (lm.size - 1) / d + (n2 - n1 - 1) * np.sum(lm / -np.expm1(-d * lm)) - (n2 - 1) * lm.sum()


def test_solver_roots_match_brentq_and_twonn():
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = np.random.default_rng(1)
    n1 = torch.tensor([1, 2, 4, 16, 128])
    lm = np.stack([np.log1p(g.pareto(7.0 / n, size=400)) for n in n1.tolist()], axis=1)
    got = solve_scores(torch.from_numpy(lm), torch.ones(lm.shape, dtype=torch.bool), n1).numpy()
    for s, n in enumerate(n1.tolist()):
        want = scipy_opt.brentq(_score, 1e-6, 1e6, args=(lm[:, s], n), xtol=1e-14, rtol=1e-14)
        assert got[s] == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx((lm.shape[0] - 1) / lm[:, 0].sum(), rel=1e-14)  # TwoNN's MLE at n1 = 1


def test_solver_ties_take_the_limit_and_mask_is_ignored():
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = np.random.default_rng(2)
    lm = np.log1p(g.pareto(2.0, size=(300, 1)))
    lm[:20] = 0.0  # ties: l / (1 - exp(-d l)) -> 1 / d
    used = torch.ones(lm.shape, dtype=torch.bool)
    used[-30:] = False  # left out: must not count
    got = float(solve_scores(torch.from_numpy(lm) * used, used, torch.tensor([4]))[0])
    kept = lm[:-30, 0]

    def score(d):
        pos = kept[kept > 0]
        return (kept.size - 1) / d + 3 * (np.sum(pos / -np.expm1(-d * pos)) + (kept == 0).sum() / d) \
            - 7 * kept.sum()

    assert got == pytest.approx(scipy_opt.brentq(score, 1e-6, 1e6, xtol=1e-14, rtol=1e-14), rel=1e-12)


@pytest.mark.parametrize("d", [2, 5, 9])
def test_known_dimension_of_a_flat_subspace(d):
    res = gelora.gride(subspace_points(3000, d=d, D=40, seed=d), range_max=16)
    assert np.all(np.abs(res.ids.numpy() - d) < 0.12 * d + 0.2), res.ids
    assert bool((res.stderr > 0).all()) and bool((res.scales[1:] > res.scales[:-1]).all())


def test_units_mask_and_tokens():
    x = subspace_points(600, d=3, D=16, seed=3)
    ref = gelora.gride(x, range_max=16)
    tiny = gelora.gride(x * 1e-30, range_max=16)  # searched scaled by a power of two
    np.testing.assert_allclose(tiny.ids.numpy(), ref.ids.numpy(), rtol=RTOL)
    np.testing.assert_allclose(tiny.scales.numpy(), ref.scales.numpy() * 1e-30, rtol=1e-6)
    mask = torch.ones(6, 100, dtype=torch.bool)
    mask[:, 90:] = False
    junk = torch.cat([x.reshape(6, 100, 16)[:, :90], torch.full((6, 10, 16), 7e3)], dim=1)
    masked = gelora.gride(junk, mask=mask, range_max=16)
    keep = mask.reshape(-1)
    np.testing.assert_allclose(masked.ids.numpy(), gelora.gride(x[keep], range_max=16).ids.numpy(), rtol=1e-12)
    assert masked.n_points == 540 and masked.id_at(4) == float(masked.ids[2])
    with pytest.raises(ValueError, match="not among the scales"):
        masked.id_at(3)


# ------------------------------------------------------------------------------------------------
# duplicates and bad input
# ------------------------------------------------------------------------------------------------
def test_duplicates_collapsed_and_where_dadapy_differs():
    x = subspace_points(800, d=4, D=24, seed=4, dtype=torch.float64)
    dup = torch.cat([x, x[:200], x[:100]])  # 300 extra copies
    res = gelora.gride(dup, range_max=16)
    assert res.n_duplicates == 300 and res.n_points == 1100
    ids, err, rs = _dadapy_gride(x.numpy(), 16)
    np.testing.assert_allclose(res.ids.numpy(), ids, rtol=RTOL)
    raw_ids, _, _ = _dadapy_gride(dup.numpy(), 16)
    # DADApy on the raw data: the 200 points with one copy have r1 = eps, mu ~ 1e15, too many (18%) for its
    # outlier cut, and drag the ID towards 0
    assert raw_ids[0] < 0.2 * ids[0]
    with pytest.warns(UserWarning, match="r_n1 == 0"):
        raw = gelora.gride(dup, range_max=16, dedup=False)
    assert raw.n_zero.tolist() == [500, 300, 0, 0] and raw.n_duplicates == 0  # copies of 200 rows, 100 of them twice


def test_bad_input():
    x = subspace_points(50, d=2, D=5)
    for bad in (1, 0, -4, 2.5, True, "64"):
        with pytest.raises(ValueError, match="range_max must be an integer >= 2"):
            gelora.gride(x, range_max=bad)
    xn = x.clone()
    xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gelora.gride(xn)
    xi = x.clone()
    xi[7, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gelora.gride(xi)
    with pytest.raises(ValueError, match="only 2 distinct point"):
        gelora.gride(torch.cat([x[:2]] * 10))
    with pytest.raises(ValueError, match="every ratio r_n2 / r_n1 is 1"):
        gelora.gride(torch.eye(4))  # a regular simplex: every neighbour at the same distance
    with pytest.raises(ValueError, match="at least 2 neighbours"):
        gride_from_distances(torch.ones(5, 1))
    with pytest.raises(ValueError, match="2-D"):
        gelora.gride(torch.ones(5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_points_give_the_cpu_curve():
    """The search and the estimator on the GPU (the Triton engine when it is usable), the same curve."""
    x = subspace_points(3000, d=7, D=96, seed=7)
    cpu = gelora.gride(x)
    for backend in usable_backends("cuda"):
        gpu = gelora.gride(x.cuda(), backend=backend)
        np.testing.assert_allclose(gpu.ids.numpy(), cpu.ids.numpy(), rtol=RTOL)
        np.testing.assert_allclose(gpu.stderr.numpy(), cpu.stderr.numpy(), rtol=RTOL)
        m = gelora.mle_id(x.cuda(), k=20, backend=backend)
        assert m.id == pytest.approx(gelora.mle_id(x, k=20).id, rel=RTOL)
