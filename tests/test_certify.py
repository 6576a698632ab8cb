"""The per-row, outlier-aware certification of the exact kNN pipeline (:func:`gelora.neighbours._uncertified`).

A few rows of huge norm ("massive activations" of decoder hidden states) must fail alone: the other
rows' bounds use the norms that can compete for their neighbours (:func:`gelora.neighbours.competitor_radius`),
not the largest norm of the data. And the bound stays rigorous: an engine that errs by as much as its
declared bound allows, in the worst direction, never makes the pipeline return a wrong neighbour.
"""
import pytest
import torch

import gelora
from gelora.neighbours import certify, pipeline, points, reference
from gelora.neighbours.engines import Candidates, KnnBackend, NormScaledError, error_rows
from gelora.id.estimate import id_from_distances

from conftest import usable_backends

CPU_BACKENDS = usable_backends("cpu")


def _brute(x: torch.Tensor, k: int):
    """float64 direct squared distances (no shortcut), self at +inf, and the k smallest."""
    x64 = x.double()
    d2 = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").square_()
    d2.fill_diagonal_(float("inf"))
    v, i = torch.sort(d2, dim=1, stable=True)
    return d2, v[:, :k], i[:, :k]


def _outlier_data(n=2000, D=64, d=6, frac=0.005, spike=3000.0, spread=False, seed=0):
    """A d-dimensional subspace plus noise, with ``frac`` of the rows given one coordinate ``+spike``
    (the same coordinate for all: a tight outlier cluster like a decoder's BOS states, or a random one
    per row with ``spread``)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    basis = torch.linalg.qr(torch.randn(D, d, generator=g)).Q
    x = z @ basis.T + 0.05 * torch.randn(n, D, generator=g)
    m = max(1, int(n * frac))
    rows = torch.randperm(n, generator=g)[:m]
    cols = torch.randint(0, D, (m,), generator=g) if spread else torch.full((m,), 7)
    x[rows, cols] += spike
    return x, m


def test_competitor_radius_excludes_only_points_that_cannot_compete():
    """Every point beyond a row's window is at least the row's k-th distance away (float64 brute
    force, on the points as given, with the centring's rounding in float32)."""
    x, _ = _outlier_data(n=400, D=32, frac=0.02)
    k = 2
    xc, _ = points.centre_and_mean(x, torch.float32)
    d2, kth, _ = _brute(x, k)
    nb = certify.norm_bounds(torch.linalg.vector_norm(xc, dim=1).square_(), 32)
    w = certify.competitor_radius(nb, kth[:, -1], 32, torch.float32)
    beyond = torch.linalg.vector_norm(xc.double(), dim=1).unsqueeze(0) > w.unsqueeze(1)
    assert bool((d2[beyond] >= kth[:, -1].unsqueeze(1).expand_as(d2)[beyond]).all())
    # the window is about |x_i| + r_k: for the ordinary rows it excludes every outlier
    ordinary = nb < 100
    assert int(ordinary.sum()) >= 0.9 * x.shape[0]
    assert bool(beyond[ordinary][:, ~ordinary].all())
    assert float(w[ordinary].max()) < 100


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spread", [False, True])
def test_outlier_rows_fail_alone(backend, spread):
    """0.5% of the rows with one coordinate +3000: the float64 recomputation takes the outlier rows and
    at most 1% of the others (it used to take all of them), and the ratios are the brute-force ones."""
    x, m = _outlier_data(spread=spread)
    _, want_d2, _ = _brute(x, 2)
    want = id_from_distances(want_d2.sqrt())
    res = gelora.twonn(x, backend=backend)
    assert res.n_fixed <= m + 0.01 * x.shape[0], (res.n_fixed, m)
    torch.testing.assert_close(res.mu, want["mu"], rtol=1e-5, atol=0.0)
    assert res.id == pytest.approx(want["id"], rel=1e-5)


class _AdversarialEngine(KnnBackend):
    """An engine that errs by as much as its declared :class:`NormScaledError` allows, in the worst
    direction: true neighbours look farther, every other point nearer. ``coef`` is large on purpose,
    so that wrong candidates are common."""

    name = "adversarial"

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = coef

    def search(self, x, kc):
        x64 = x.double()
        sq = (x64 * x64).sum(1)
        d2 = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
        room = 0.999 * self.coef * (sq[:, None] + sq[None, :])
        near = torch.zeros_like(d2, dtype=torch.bool)
        near.scatter_(1, torch.topk(d2 + torch.diag(torch.full_like(sq, float("inf"))), 3, dim=1,
                                    largest=False).indices, True)
        apx = torch.where(near, d2 + room, d2 - room)
        apx.fill_diagonal_(float("inf"))
        cd, ci = torch.topk(apx, kc, dim=1, largest=False)
        return Candidates(cd.to(x.dtype), ci, NormScaledError(sq.to(x.dtype), self.coef), sq.to(x.dtype))


@pytest.mark.parametrize("coef", [1e-4, 1e-3])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_certificate_catches_every_wrong_neighbour(coef, k):
    """With candidates as wrong as the declared bound allows, the pipeline's answer is still the
    brute-force one (rows the certificate cannot vouch for go to the float64 reference), with outlier
    rows in the data; and the certificate did have to work (some rows were recomputed)."""
    x, _ = _outlier_data(n=300, D=16, frac=0.02, spike=300.0, seed=2)
    x[1] = x[2]  # a duplicate pair: distance 0, the self excluded by index
    xc, mean = points.centre_and_mean(x, torch.float32)
    dist, idx, n_fixed = pipeline.knn_exact(xc, k, _AdversarialEngine(coef), points=x, mean=mean)
    d2, want_d2, _ = _brute(x, k)
    assert n_fixed > 0
    torch.testing.assert_close(dist.double() ** 2, want_d2, rtol=2e-6, atol=1e-9)
    # indices at their distances (ties may be broken either way), never the row itself
    at = torch.gather(d2, 1, idx)
    torch.testing.assert_close(at, want_d2, rtol=2e-6, atol=1e-9)


def test_error_rows_forms():
    """A tensor bound is used as it is; a per-pair bound is evaluated at the given key norm, and at the
    largest norm when none is given."""
    sq = torch.tensor([1.0, 4.0, 1e6])
    e = NormScaledError(sq, 0.5)
    assert torch.equal(error_rows(e), 0.5 * (sq.double() + 1e6))
    w = torch.tensor([2.0, 3.0, 1000.0], dtype=torch.float64)
    assert torch.equal(error_rows(e, w), 0.5 * (sq.double() + w * w))
    assert torch.equal(error_rows(torch.tensor(0.25)), torch.tensor(0.25, dtype=torch.float64))


@pytest.mark.parametrize("centred", [True, False])
def test_norm_shell_rows_are_exact_for_outliers(centred):
    """The outlier rows (huge norm, tight cluster, with duplicates among them) are searched in their
    norm shell: the answer is the brute-force one (ties by index, never the row itself) for every row
    searched there."""
    x, m = _outlier_data(n=3000, D=24, frac=0.01, spike=3000.0, seed=4)
    big = torch.nonzero(torch.linalg.vector_norm(x, dim=1) > 1000).flatten()
    x[big[1]] = x[big[0]]  # a duplicate pair among the outliers
    small = torch.nonzero(torch.linalg.vector_norm(x, dim=1) < 1000).flatten()[:5]
    rows = torch.cat([big, small])
    k = 3
    d2_all, want_d2, want_i = _brute(x, k)
    if centred:
        xc, _ = points.centre_and_mean(x, torch.float32)
    else:
        xc = x
    kth = want_d2[rows, -1].float() * (1 + 1e-6)  # what the re-rank would have found, rounded up
    done, sd2, si = reference.norm_shell_rows(x, xc, rows, k, kth, centred)
    assert set(range(big.numel())) <= set(done.tolist()), done
    got = rows[done]
    torch.testing.assert_close(sd2, want_d2[got], rtol=1e-12, atol=0.0)
    assert torch.equal(si, want_i[got])  # ties (the duplicate pair's equal distances) by index
    assert bool((si != got.unsqueeze(1)).all())


def test_norm_shell_leaves_wide_shells_to_the_reference():
    """Ordinary rows of concentrated norms have shells holding most points: the elementwise shell search
    would cost far more than the reference's GEMM, so those rows are left to it (it took 10x longer on
    MiniLM token states when it did not)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4000, 3, generator=g) @ torch.randn(3, 24, generator=g) + 3.0  # shells of ~5-25%
    xc, _ = points.centre_and_mean(x, torch.float32)
    rows = torch.arange(0, 4000, 97)
    _, want_d2, _ = _brute(x, 2)
    done, _, _ = reference.norm_shell_rows(x, xc, rows, 2, want_d2[rows, -1].float() * (1 + 1e-6), True)
    assert done.numel() <= 0.1 * rows.numel(), done  # (a row at the edge of the norm range may qualify)
