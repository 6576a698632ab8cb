"""Row-aligned TwoNN ratios and the paired bootstrap (gelora.id.paired)."""
import math

import pytest
import torch

from conftest import subspace_points
from gelora import gride, knn_reference, twonn
from gelora.id.gride import gride_rows, solve_scores
from gelora.id.paired import (bootstrap_stderr, paired_bootstrap, paired_bootstrap_gride, paired_bootstrap_reference,
                              twonn_rows)

ESTIMATORS = ("mle", "mle_censored", "linear")


def _exp_log_mu(rates, n, seed=0):
    """(K, n) float64 log-ratios of K sets with exponential law of rate ``d`` (TwoNN's law for ID d)."""
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(len(rates), n, generator=g, dtype=torch.float64))
    return e / torch.tensor(rates, dtype=torch.float64).unsqueeze(1)


# --- twonn_rows ----------------------------------------------------------------------------------
def test_twonn_rows_matches_twonn_and_the_float64_reference():
    x = subspace_points(n=600, d=6, D=40, seed=1)
    res, lm = twonn_rows(x)
    ref = twonn(x)
    assert res.id == pytest.approx(ref.id, rel=1e-12) and abs(res.id - 6) < 1.0
    assert res.n_duplicates == 0 and res.n_used == ref.n_used and res.n_fixed == ref.n_fixed
    assert res.backend == ref.backend
    dist, _ = knn_reference(x.double())
    expected = torch.log(dist[:, 1] / dist[:, 0])
    assert lm.shape == (600,) and lm.dtype == torch.float64
    # the ratios of float32 distances, row by row, against the float64 search
    assert torch.allclose(lm, expected, rtol=0, atol=1e-5)
    assert (n_minus_1 := lm.numel() - 1) / float(lm.sum()) == pytest.approx(res.id, rel=1e-9), n_minus_1


def test_twonn_rows_duplicates_are_nan_after_their_first_copy():
    x = subspace_points(n=300, d=4, D=16, seed=2)
    x = torch.cat([x, x[:5], x[7:8]])  # rows 300..304 copy 0..4, row 305 copies 7
    res, lm = twonn_rows(x)
    ref = twonn(x)
    assert res.n_duplicates == 6 == ref.n_duplicates
    assert res.id == pytest.approx(ref.id, rel=1e-12)
    assert torch.isnan(lm[300:]).all() and torch.isfinite(lm[:300]).all()


def test_twonn_rows_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        twonn_rows(torch.ones(10, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        twonn_rows(torch.ones(2, 5, 3))
    x = subspace_points(n=50, d=2, D=4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        twonn_rows(x)


# --- the bootstrap ---------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("grouped", [False, True])
def test_fast_bootstrap_equals_the_reference(estimator, grouped):
    lm = _exp_log_mu([5.0, 8.0, 3.0], 97, seed=3)
    lm[0, 5] = float("nan")
    lm[1, 7:9] = float("nan")
    groups = torch.randint(0, 20, (97,), generator=torch.Generator().manual_seed(4)) if grouped else None
    fast = paired_bootstrap(lm, n_boot=70, seed=5, estimator=estimator, groups=groups)
    ref = paired_bootstrap_reference(lm, n_boot=70, seed=5, estimator=estimator, groups=groups)
    assert fast.shape == (70, 3) and torch.isfinite(fast).all()
    assert torch.allclose(fast, ref, rtol=1e-12, atol=0)


def test_bootstrap_is_centred_and_matches_the_analytic_error():
    # i.i.d. exponential log-ratios of rate 10: the MLE has standard error ~ 10 / sqrt(n)
    lm = _exp_log_mu([10.0], 4000, seed=6)
    rep = paired_bootstrap(lm, n_boot=800, seed=0)
    point = (lm.shape[1] - 1) / float(lm.sum())
    se = point / math.sqrt(lm.shape[1] - 2)
    assert abs(float(rep.mean()) - point) < 0.2 * se
    assert float(bootstrap_stderr(rep)[0]) == pytest.approx(se, rel=0.1)


def test_replicates_are_paired():
    # set 1 is set 0 with every ratio scaled by c: ID1 = ID0 / c in every replicate, so the difference
    # has exactly |1/c - 1| times the error of ID0; resampling the sets apart would not give that
    c = 1.25
    lm0 = _exp_log_mu([7.0], 1000, seed=7)
    rep = paired_bootstrap(torch.cat([lm0, lm0 * c]), n_boot=300, seed=1)
    assert torch.allclose(rep[:, 1], rep[:, 0] / c, rtol=1e-12)
    diff_sd = float((rep[:, 1] - rep[:, 0]).std())
    assert diff_sd == pytest.approx(abs(1 / c - 1) * float(rep[:, 0].std()), rel=1e-9)
    assert diff_sd < 0.3 * math.hypot(float(rep[:, 0].std()), float(rep[:, 1].std()))


def test_groups_resample_whole_sequences():
    # 200 distinct ratios, each repeated by the 5 points of one group: the information is that of 200
    # points, which the grouped bootstrap sees; resampling points one by one claims sqrt(5) too much
    base = _exp_log_mu([6.0], 200, seed=8)
    lm = base.repeat_interleave(5, dim=1)
    groups = torch.arange(200).repeat_interleave(5)
    se_g = float(bootstrap_stderr(paired_bootstrap(lm, n_boot=600, seed=2, groups=groups))[0])
    se_t = float(bootstrap_stderr(paired_bootstrap(lm, n_boot=600, seed=2))[0])
    analytic = 6.0 / math.sqrt(200)
    assert se_g == pytest.approx(analytic, rel=0.15)
    assert se_g / se_t == pytest.approx(math.sqrt(5), rel=0.15)


def test_seeded():
    lm = _exp_log_mu([4.0, 5.0], 300)
    a = paired_bootstrap(lm, n_boot=20, seed=9)
    assert torch.equal(a, paired_bootstrap(lm, n_boot=20, seed=9))
    assert not torch.equal(a, paired_bootstrap(lm, n_boot=20, seed=10))


def test_a_set_without_ratios_is_nan():
    lm = _exp_log_mu([4.0, 5.0], 50)
    lm[1] = float("nan")  # e.g. a 0-dimensional layer: no point has a ratio
    for est in ESTIMATORS:
        rep = paired_bootstrap(lm, n_boot=10, estimator=est)
        assert torch.isnan(rep[:, 1]).all() and torch.isfinite(rep[:, 0]).all()


def test_bootstrap_bad_input():
    lm = _exp_log_mu([4.0], 30)
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        paired_bootstrap(lm[0])
    with pytest.raises(ValueError, match="at least 3"):
        paired_bootstrap(lm[:, :2])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(lm, n_boot=1)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(lm, n_boot=True)
    with pytest.raises(ValueError, match="estimator"):
        paired_bootstrap(lm, estimator="mean")
    with pytest.raises(ValueError, match="discard_fraction"):
        paired_bootstrap(lm, estimator="linear", discard_fraction=1.0)
    bad = lm.clone()
    bad[0, 3] = -0.5
    with pytest.raises(ValueError, match=">= 0"):
        paired_bootstrap(bad)
    bad[0, 3] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap(bad)
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(lm, groups=torch.zeros(29, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(lm, groups=torch.zeros(30))


# --- GRIDE: row-aligned ratios and the paired bootstrap at one neighbour order ---------------------
def test_gride_rows_match_gride_and_its_cut():
    x = subspace_points(n=500, d=5, D=24, seed=11)
    x = torch.cat([x, x[:4]])  # rows 500..503 copy 0..3
    res, lm = gride_rows(x, range_max=32)
    ref = gride(x, range_max=32)
    assert torch.equal(res.ids, ref.ids) and torch.equal(res.stderr, ref.stderr) and res.n_duplicates == 4
    assert lm.shape == (504, 5) and torch.isnan(lm[500:]).all()
    # exactly the ratios that entered the estimate: the others are the outlier cut's
    assert (~torch.isnan(lm)).sum(0).tolist() == ref.n_used.tolist()
    kept = torch.log(ref.mu[:500])
    assert torch.equal(lm[:500][~torch.isnan(lm[:500])], kept[~torch.isnan(lm[:500])])
    # re-solving on the kept ratios gives the estimate (what a replicate that draws every point once does)
    for s in range(5):
        v = lm[:, s][~torch.isnan(lm[:, s])]
        d = solve_scores(v[:, None], torch.ones(v.numel(), 1, dtype=torch.float64), torch.tensor([2 ** s]))
        assert float(d[0]) == pytest.approx(float(ref.ids[s]), rel=1e-13)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        gride_rows(x[None])


@pytest.mark.parametrize("grouped", [False, True])
def test_gride_bootstrap_equals_the_reference(grouped):
    x = subspace_points(n=300, d=4, D=12, seed=12)
    _, lm = gride_rows(x, range_max=16)
    lm2 = torch.stack([lm[:, 2], lm[:, 2] * 1.5])  # n1 = 4, and a set of 2/3 the ID
    lm2[1, :3] = float("nan")
    groups = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(4)) if grouped else None
    fast = paired_bootstrap_gride(lm2, 4, n_boot=30, seed=5, groups=groups, start=[4.0, 2.7])
    ref = paired_bootstrap_reference(lm2, n_boot=30, seed=5, estimator="gride", n1=4, groups=groups)
    assert fast.shape == (30, 2) and torch.isfinite(fast).all()
    assert torch.allclose(fast, ref, rtol=1e-12, atol=0)
    # the same draws as the TwoNN bootstrap's (a profile's replicates pair across estimators too)
    assert not torch.allclose(fast[:, 0], fast[:, 1] * 1.5)  # GRIDE is not linear in the ratios


def test_gride_bootstrap_error_matches_the_analytic_one():
    x = subspace_points(n=3000, d=6, D=30, seed=13)
    res, lm = gride_rows(x, range_max=16)
    rep = paired_bootstrap_gride(lm[:, 2][None], 4, n_boot=300, seed=0, start=[float(res.ids[2])])
    assert abs(float(rep.mean()) - float(res.ids[2])) < 0.25 * float(res.stderr[2])
    assert float(bootstrap_stderr(rep)[0]) == pytest.approx(float(res.stderr[2]), rel=0.2)


def test_gride_bootstrap_bad_input_and_empty_sets():
    lm = _exp_log_mu([4.0, 5.0], 50)
    lm[1] = float("nan")
    rep = paired_bootstrap_gride(lm, 2, n_boot=10)
    assert torch.isnan(rep[:, 1]).all() and torch.isfinite(rep[:, 0]).all()
    with pytest.raises(ValueError, match="n1 must be an integer"):
        paired_bootstrap_gride(lm, 0, n_boot=10)
    with pytest.raises(ValueError, match="start has 1 entries for 2 sets"):
        paired_bootstrap_gride(lm, 2, n_boot=10, start=[1.0])
    with pytest.raises(ValueError, match="needs n1"):
        paired_bootstrap_reference(lm, n_boot=10, estimator="gride")


def test_gride_bootstrap_at_n1_1_is_the_twonn_mle_bootstrap():
    # at n1 = 1 GRIDE's score is (n - 1) / d - sum(l): TwoNN's MLE, replicate by replicate
    lm = _exp_log_mu([5.0, 8.0], 200, seed=14)
    lm[1, :4] = float("nan")
    groups = torch.arange(200) // 4
    a = paired_bootstrap_gride(lm, 1, n_boot=40, seed=3, groups=groups)
    b = paired_bootstrap(lm, n_boot=40, seed=3, groups=groups)
    assert torch.allclose(a, b, rtol=1e-12, atol=0)
