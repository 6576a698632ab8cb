"""Levina-Bickel MLE over k neighbours: equal to scikit-dimension's MLE with the options of the same
formula, known dimensions, the duplicates policy, bad input."""
import warnings

import numpy as np
import pytest
import torch

import gelora
from conftest import subspace_points, usable_backends

CPU_BACKENDS = usable_backends("cpu")
RTOL = 1e-6  # float32 distances against scikit-learn's float64 ones

#: gelora's average -> scikit-dimension's ``comb``; the rest of skdim's defaults (dnoise=None,
#: neighborhood_based=True, integral_approximation="Haro" (unused without dnoise)) give the plain
#: Levina-Bickel local estimates (k - 1) / sum_j log(T_k / T_j)
COMB = {"harmonic": "mle", "mean": "mean", "median": "median"}


def _skdim_mle(x, k, comb, unbiased):
    skdim = pytest.importorskip("skdim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = skdim.id.MLE(unbiased=unbiased).fit(np.asarray(x, dtype=np.float64), n_neighbors=k, comb=comb)
    return est.dimension_, est.dimension_pw_


@pytest.fixture(scope="module")
def point_sets():
    """Three of skdim's BenchmarkManifolds and a flat 5-dimensional subspace, each with its k."""
    skdim = pytest.importorskip("skdim")
    pytest.importorskip("pandas")
    bm = skdim.datasets.BenchmarkManifolds(random_state=1)
    sets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, k in (("M1_Sphere", 20), ("M7_Roll", 5), ("M10b_Cubic", 40)):
            d, dim = (int(v) for v in bm.truth.loc[name].iloc[:2])
            sets.append((np.asarray(bm.generate(name, n=700, dim=dim, d=d), dtype=np.float64), k))
    sets.append((subspace_points(700, d=5, D=30, dtype=torch.float64).numpy(), 12))
    return sets


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("average", ["harmonic", "mean", "median"])
def test_equals_skdim_mle(point_sets, average, unbiased):
    """``gelora.mle_id(x, k=k, average=a, unbiased=u)`` ==
    ``skdim.id.MLE(unbiased=u).fit(x, n_neighbors=k, comb=COMB[a]).dimension_``."""
    for x, k in point_sets:
        res = gelora.mle_id(x, k=k, average=average, unbiased=unbiased)
        want, local = _skdim_mle(x, k, COMB[average], unbiased)
        assert res.id == pytest.approx(want, rel=RTOL)
        np.testing.assert_allclose(res.local_ids.numpy(), local, rtol=1e-5)  # one point: ~6e-7 seen
        assert res.n_used == x.shape[0] and res.k == k and res.stderr > 0


def test_harmonic_is_the_pooled_mle_and_knn_is_exact():
    """The MacKay-Ghahramani combination is (k - 1) M / sum(S_i), computed here from the float64 reference
    neighbours."""
    x = subspace_points(500, d=3, D=10, seed=5, dtype=torch.float64)
    dist, _ = gelora.knn_reference(x, k=10)
    s = torch.log(dist[:, -1:] / dist[:, :-1]).sum(1)
    res = gelora.mle_id(x, k=10)
    assert res.id == pytest.approx(9 * 500 / float(s.sum()), rel=1e-7)
    assert res.r_mean == pytest.approx(float(dist[:, -1].mean()), rel=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [2, 6])
def test_known_dimension(backend, d):
    res = gelora.mle_id(subspace_points(2000, d=d, D=32, seed=d), k=20, backend=backend)
    assert res.backend == backend
    assert abs(res.id - d) < 0.1 * d, res


def test_duplicates_collapsed_and_where_skdim_differs():
    x = subspace_points(600, d=4, D=16, seed=6, dtype=torch.float64)
    dup = torch.cat([x, x[:60]])
    res = gelora.mle_id(dup, k=10, average="mean")
    assert res.n_duplicates == 60 and res.n_points == 660
    want, _ = _skdim_mle(x.numpy(), 10, "mean", False)
    assert res.id == pytest.approx(want, rel=RTOL)
    raw, local = _skdim_mle(dup.numpy(), 10, "mean", False)
    # skdim: a copy at distance 0 (or ~1e-8 from scikit-learn's norm shortcut) gives m_i = 0 (or ~0.5)
    assert int((local < 1).sum()) == 120 and raw < 0.9 * want
    with pytest.warns(UserWarning, match="distance 0"):
        kept = gelora.mle_id(dup, k=10, average="mean", dedup=False)
    assert kept.n_zero == 120 and kept.n_used == 540 and bool(kept.local_ids[:60].isnan().all())


def test_tied_neighbourhoods():
    """A regular simplex: every point has all its neighbours at one distance, m_i = inf."""
    with pytest.raises(ValueError, match="unbounded"):
        gelora.mle_id(torch.eye(6), k=3)
    with pytest.raises(ValueError, match="infinite local estimate"):
        gelora.mle_id(torch.eye(6), k=3, average="mean")


def test_bad_input():
    x = subspace_points(30, d=2, D=5)
    for bad in (1, 0, -3, 2.0, True, None):
        with pytest.raises(ValueError, match="k must be an integer >= 2"):
            gelora.mle_id(x, k=bad)
    with pytest.raises(ValueError, match="k must be an integer >= 3"):
        gelora.mle_id(x, k=2, unbiased=True)
    with pytest.raises(ValueError, match=r"k=30 neighbours need at least k \+ 1 = 31 distinct points; got 30"):
        gelora.mle_id(x, k=30)
    with pytest.raises(ValueError, match="got 20"):
        gelora.mle_id(torch.cat([x[:20], x[:20]]), k=20)  # 40 rows, 20 distinct
    with pytest.raises(ValueError, match="average must be one of"):
        gelora.mle_id(x, k=5, average="geometric")
    xn = x.clone()
    xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gelora.mle_id(xn, k=5)
    with pytest.raises(ValueError, match="only 2 distinct point"):
        gelora.mle_id(torch.cat([x[:2]] * 5), k=1 + 1)
