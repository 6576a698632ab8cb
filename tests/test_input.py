"""Bad input gets a clear error, never a crash or a silent NaN."""
import numpy as np
import pytest
import torch

import gelora
from conftest import subspace_points


def test_nan_and_inf_rejected():
    x = subspace_points(200)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gelora.twonn(x)
    x = subspace_points(200)
    x[7, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gelora.knn2(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_check_points_one_pass(dtype):
    """check_points: the NaN count of as_points, and from the same pass (C++ core) the row hashes and
    the float64 mean; (None, None) where the core does not apply."""
    from gelora.neighbours.inputs import check_points, cpu_core
    from gelora.id.dedup import hash_coef

    x = (subspace_points(300, d=4, D=12) * 3).to(dtype)
    h, mean = check_points(x, coef=hash_coef(12))
    if cpu_core(x) is None:
        assert h is None and mean is None
    else:
        assert h.dtype == torch.int64 and h.shape == (300,)
        torch.testing.assert_close(mean, x.double().mean(0), rtol=1e-12, atol=1e-12)
        assert check_points(x)[0] is None
        # the hashes unique_rows would compute, so duplicates are found from them
        xd = torch.cat([x, x[:5]])
        hd, _ = check_points(xd, coef=hash_coef(12))
        assert torch.equal(hd[300:], hd[:5])
        assert gelora.unique_rows(xd, hd)[1] == 5 and torch.equal(gelora.unique_rows(xd, hd)[0],
                                                                  gelora.unique_rows(xd)[0])
    x[4, 2] = float("nan")
    x[9, 0] = float("-inf")
    with pytest.raises(ValueError, match="pts: 2 row"):
        check_points(x, "pts")


@pytest.mark.parametrize("shape", [(2, 5), (1, 3), (2, 1, 4)])
def test_too_few_points(shape):
    with pytest.raises(ValueError, match="at least 3"):
        gelora.twonn(torch.randn(*shape))


def test_too_few_distinct_points():
    x = torch.ones(50, 4)
    x[0] = 2.0
    with pytest.raises(ValueError, match="distinct point"):
        gelora.twonn(x)


@pytest.mark.parametrize("x", [torch.randn(10), torch.randn(2, 3, 4, 5), torch.tensor(1.0)])
def test_wrong_rank(x):
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        gelora.twonn(x)


@pytest.mark.parametrize("shape", [(0, 4), (5, 0), (0, 3, 4)])
def test_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        gelora.twonn(torch.randn(*shape))


@pytest.mark.parametrize("x", [
    torch.randint(0, 5, (20, 3)),
    np.arange(60).reshape(20, 3),
    torch.randn(20, 3, dtype=torch.complex64),
    np.zeros((20, 3), dtype=np.complex128),
    torch.ones(20, 3, dtype=torch.bool),
])
def test_bad_dtypes(x):
    with pytest.raises(TypeError, match="dtype"):
        gelora.twonn(x)


def test_not_an_array():
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        gelora.twonn([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]])


def test_mask_shape_mismatch():
    x = torch.randn(2, 50, 8)
    with pytest.raises(ValueError, match="mask: shape"):
        gelora.twonn(x, mask=torch.ones(2, 49, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        gelora.twonn(x, mask=torch.ones(2, 50))


def test_mask_selects_tokens():
    x = subspace_points(300, d=4, D=16).reshape(3, 100, 16)
    mask = torch.zeros(3, 100, dtype=torch.long)
    mask[:, :60] = 1
    padded = x.clone()
    padded[mask == 0] = float("nan")  # padding content must never be read
    r = gelora.twonn(padded, mask=mask)
    ref = gelora.twonn(x[:, :60].reshape(-1, 16))
    assert r.n_points == 180
    assert r.id == pytest.approx(ref.id, rel=1e-12)


def test_bad_estimator_and_fraction():
    x = subspace_points(100)
    with pytest.raises(ValueError, match="estimator"):
        gelora.twonn(x, estimator="ols")
    with pytest.raises(ValueError, match="discard_fraction"):
        gelora.twonn(x, estimator="linear", discard_fraction=1.0)


def test_unknown_and_unavailable_backend():
    x = subspace_points(100)
    with pytest.raises(ValueError, match="unknown kNN backend"):
        gelora.twonn(x, backend="cuvs")
    from gelora.neighbours.engines import all_backends

    missing = [n for n, b in all_backends().items() if b.not_supported_reasons(x)]
    for name in missing:
        with pytest.raises(gelora.BackendUnavailable, match=name):
            gelora.twonn(x, backend=name)


def test_env_forces_backend(monkeypatch):
    x = subspace_points(100)
    monkeypatch.setenv("GELORA_BACKEND", "torch")
    assert gelora.twonn(x).backend == "torch"


def test_lattice_ties_are_undefined_not_nan():
    # a regular 1-D grid: every interior point has r1 == r2 -> mu == 1 everywhere but the ends
    x = torch.arange(30, dtype=torch.float64).unsqueeze(1)
    r = gelora.twonn(x)
    assert np.isfinite(r.id) and r.n_ties == 28
    # a regular simplex: all pairwise distances equal, mu == 1 for every point
    with pytest.raises(ValueError, match="undefined"):
        gelora.twonn(torch.eye(5))
