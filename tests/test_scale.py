"""Scale invariance: TwoNN sees ratios of distances, so multiplying the points by a constant must not
change the estimate, on every engine, however far the values are from 1 (issue 14).

Multiplying by a power of two is exact in floating point, so for ``x * 2^k`` the expected answer is
that of ``x`` itself, bit for bit: the same neighbours, the distances times ``2^k``, the same ID. The
float64 reference (:func:`gelora.knn_reference`) fixes the ID of the unscaled points. The Triton
engine's case runs in the interpreter (``tests/test_triton_knn.py``, ``_check_scale``); the sharded
path is checked here on two gloo ranks. Also here: the argument checks of the same issue.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gelora
from gelora.neighbours.inputs import power_of_two_scale
from gelora.testing import assert_knn_match
from gelora.id.dedup import unique_rows
from gelora.id.estimate import id_from_distances

from conftest import free_port, init_gloo, usable_backends

CPU_ENGINES = ("cpp", "faiss", "torch")


def _engine(name: str) -> str:
    if name not in usable_backends("cpu"):
        pytest.skip(f"backend {name!r} is not usable here")
    return name


def _reference_id(x: torch.Tensor) -> float:
    """The MLE from the float64 reference distances of ``x`` (distinct rows, no ties expected)."""
    return id_from_distances(gelora.knn_reference(x, k=2)[0])["id"]


def _float32_id_tol(x: torch.Tensor) -> float:
    """Relative bound on |ID(float32 distances) - ID(float64 distances)| for the points ``x``.

    A distance computed directly in float32 (``sum((x - y)^2)``, then a square root) is within
    ``rel = gamma_{D+2} / 2 + u`` (relative) of the exact one, ``u = 2^-24``; so each ``log mu`` moves
    by at most ``~2 rel``, the sum ``S`` of the n logs by ``2 n rel``, and the MLE ``(n - 1) / S`` by
    that relative to ``S`` (to first order; doubled for the rest)."""
    d = x.shape[1]
    u = 2.0 ** -24
    rel = (d + 2) * u / (1 - (d + 2) * u) / 2 + u
    r = gelora.knn_reference(x, k=2)[0]
    s = float(torch.log(r[:, 1] / r[:, 0]).sum())
    return 2.0 * (2.0 * x.shape[0] * rel) / s


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------------
# The issue's table, rows 1 and 2
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [-100, 100])  # 2^-100 ~ 7.9e-31, 2^100 ~ 1.3e30
def test_power_of_two_scaling_keeps_the_id(engine, dtype, k):
    """``x * 2^k`` at the issue's magnitudes: the ID of ``x`` on every CPU engine, to 1e-12, and the
    float64 reference's ID (exact for float64 points; within the derived float32 bound otherwise)."""
    _engine(engine)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    base = gelora.twonn(x, backend=engine).id
    scaled = gelora.twonn(x * 2.0 ** k, backend=engine)
    assert scaled.backend == engine
    assert _rel(scaled.id, base) <= 1e-12, (scaled.id, base)
    ref = _reference_id(x)
    tol = 1e-12 if dtype == torch.float64 else _float32_id_tol(x)
    assert _rel(scaled.id, ref) <= tol, (scaled.id, ref, tol)
    # r1_mean is in the caller's units
    assert _rel(scaled.r1_mean, gelora.twonn(x, backend=engine).r1_mean * 2.0 ** k) <= 1e-12


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("factor", [1e-30, 1e30])
def test_issue_rows_as_written(engine, factor):
    """``torch.randn(300, 16) * 1e-30`` and ``* 1e30``, float32 (these raised before): the float64
    reference's ID of the same points within the derived float32 bound; in float64 the ID of the
    unscaled points to 1e-12 (multiplying by 1e±30 rounds each value by 1e-16 relative)."""
    _engine(engine)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g)
    xs = x * factor
    r = gelora.twonn(xs, backend=engine)
    ref = _reference_id(xs)
    assert _rel(r.id, ref) <= _float32_id_tol(xs), (r.id, ref)
    x64 = x.double()
    assert _rel(gelora.twonn(x64 * factor, backend=engine).id, _reference_id(x64)) <= 1e-12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(-120, 120),
    n=st.integers(4, 40),
    d=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    engine=st.sampled_from(CPU_ENGINES),
    seed=st.integers(0, 2**31 - 1),
)
def test_scaled_by_any_power_of_two(k, n, d, dtype, engine, seed):
    """``x * 2^k``, k in [-120, 120]: the same neighbours, the distances times ``2^k``, the same ID.

    float32 points lie on a 2^-12 grid (|x| < 2^4): ``x * 2^k`` is then exact for every k here, even
    where it is subnormal (2^-132 is a multiple of float32's smallest subnormal 2^-149), and
    ``2^120 * 2^4`` is far below float32's 2^128 (it is the squares that would overflow)."""
    if engine not in usable_backends("cpu"):
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).clamp(-15.0, 15.0)
    if dtype == torch.float32:
        x = torch.round(x * 2.0 ** 12) / 2.0 ** 12
    x = x.to(dtype)
    xs = x * 2.0 ** k
    assert torch.equal(xs * 2.0 ** -k, x)  # the scaling itself is exact
    d0, i0 = gelora.knn2(x, backend=engine)
    d1, i1 = gelora.knn2(xs, backend=engine)
    assert torch.equal(i1, i0)
    assert torch.equal(d1, d0 * 2.0 ** k)

    def outcome(points):
        try:
            return gelora.twonn(points, backend=engine).id
        except ValueError as exc:  # e.g. every point tied on a 1-D grid: the same error either way
            return str(exc)

    a, b = outcome(x), outcome(xs)
    if isinstance(a, float) and isinstance(b, float):
        assert _rel(b, a) <= 1e-12, (a, b)
    else:
        assert a == b


def test_distances_in_the_callers_units():
    """knn2 returns true distances (float32) and knn_reference float64 ones, scaled back from the
    search; float64 points at 2^900 have distances beyond float32, which knn2 returns as inf (with
    the right neighbours), and knn_reference keeps."""
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d0, i0 = gelora.knn_reference(x)
    for k in (-900, -100, 100, 900):
        dk, ik = gelora.knn_reference(x * 2.0 ** k)
        assert torch.equal(ik, i0) and torch.equal(dk, d0 * 2.0 ** k), k
    d1, i1 = gelora.knn2(x * 2.0 ** 900)
    assert torch.equal(i1, i0) and bool(torch.isinf(d1).all())
    d2, i2 = gelora.knn2(x * 2.0 ** -900)
    assert torch.equal(i2, i0) and bool((d2 == 0).all())
    # float32 points near float32's largest value: the squares overflow float32, the distances do not
    x32 = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    x32 = x32 / x32.abs().max() * 2.0 ** 125
    dd, ii = gelora.knn2(x32)
    assert bool(torch.isfinite(dd).all())
    assert_knn_match(x32.double(), dd, ii)


# ---------------------------------------------------------------------------------------------------
# float16 / bfloat16: squares out of their own range, computed in float32
# ---------------------------------------------------------------------------------------------------
def _half_points(dtype, top, seed=4):
    """Distinct (200, 8) points of ``dtype`` with ``max|x|`` ~ ``top``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(200, 8, generator=g).clamp(-3.9, 3.9) / 3.9 * top).to(dtype)
    return x[unique_rows(x)[0]]


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize(
    "dtype,top",
    [
        # float16 subnormals (below its smallest normal 6.1e-5): squares below float16's 6e-8
        (torch.float16, 6e-5 * 2.0 ** -4),
        # near float16's largest value 65504: squares far above it
        (torch.float16, 6e4),
        (torch.bfloat16, 1e-30),  # squares below float32's (and bfloat16's) smallest subnormal
        (torch.bfloat16, 1e30),   # squares above float32's largest value
    ],
)
def test_half_precision_at_the_edges_of_its_range(engine, dtype, top):
    _engine(engine)
    x = _half_points(dtype, top)
    assert x.shape[0] > 150
    sq = x[:2].float().square()
    assert not bool(torch.isfinite(sq.to(dtype)).all() and (sq.to(dtype) > 0).all())  # out of range
    dist, idx = gelora.knn2(x, backend=engine)
    assert_knn_match(x, dist, idx)
    r = gelora.twonn(x, backend=engine)
    ref = _reference_id(x)
    assert _rel(r.id, ref) <= _float32_id_tol(x), (r.id, ref)


# ---------------------------------------------------------------------------------------------------
# What keeps its error
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nan_and_inf_still_rejected_at_any_scale(bad, dtype):
    for factor in (1e-30, 1.0, 1e30):
        x = (torch.randn(50, 4, dtype=torch.float64) * factor).to(dtype)
        x[7, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            gelora.twonn(x)
        with pytest.raises(ValueError, match="NaN or Inf"):
            gelora.knn2(x)
        with pytest.raises(ValueError, match="NaN or Inf"):
            gelora.knn_reference(x)


def test_degenerate_data_keep_their_errors_when_scaled():
    """Tiny but degenerate data get the error of the degeneracy, not one of underflow."""
    cube = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float32)
    for k in (-100, 0, 100):
        with pytest.raises(ValueError, match=r"r1 == r2"):  # every point has three neighbours at 1
            gelora.twonn(cube * 2.0 ** k)
        with pytest.raises(ValueError, match="distinct point"):
            gelora.twonn(torch.ones(10, 3) * 2.0 ** k)


# ---------------------------------------------------------------------------------------------------
# The helper itself
# ---------------------------------------------------------------------------------------------------
def test_scale_only_outside_the_comfortable_range():
    """1.0 (no copy made by the callers) inside [2^-32, 2^32) for float32 distances (the engines),
    [2^-256, 2^256) for float64 ones (the reference); outside, a power of two that brings max|x| into
    [1/2, 1)."""
    def p(v, dtype=torch.float32, compute=torch.float32):
        return power_of_two_scale(torch.tensor([[v, -v / 4]], dtype=torch.float64).to(dtype), compute)

    for v in (1.0, 2.0 ** -32, 2.0 ** 32 * (1 - 2.0 ** -24), 3.0, -7.5):
        assert p(v) == 1.0, v
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for v in (2.0 ** -33, 2.0 ** 32, 1e-30, 1e30, -1e30):
            s = p(v, dtype)
            top = abs(float(torch.tensor(v, dtype=dtype))) * s
            assert s != 1.0 and math.log2(s).is_integer() and 0.5 <= top < 1.0, (v, dtype, s)
    # float64 points: the engines search them in float32 (FAISS, Triton) and are scaled as above;
    # the float64 reference has float64's range
    for v in (1e30, 1e-30):
        assert p(v, torch.float64, torch.float64) == 1.0
    assert p(2.0 ** -300, torch.float64, torch.float64) == 2.0 ** 299
    assert p(1e300, torch.float64, torch.float64) == 2.0 ** -997
    # the scale stays a normal number of the dtype of x (float32: 2^-126 .. 2^127), so multiplying by
    # it is exact: at the ends of float32's range max|x| lands near, not in, [1/2, 1)
    assert p(3e38) == 2.0 ** -126
    assert p(1e-40) == 2.0 ** 127  # 1e-40: a float32 subnormal (exponent -133)
    for v in (0.0, float("nan"), float("inf")):
        assert p(v) == 1.0
    # float16 points (computed in float32) never need a scale and are not even read
    assert power_of_two_scale(torch.empty(4, 3, dtype=torch.float16, device="meta")) == 1.0


# ---------------------------------------------------------------------------------------------------
# The issue's table, rows 3 and 4
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bootstrap", [-1, 1, 2.5, True])
def test_bad_bootstrap(bootstrap):
    x = torch.randn(50, 3)
    with pytest.raises(ValueError, match="bootstrap must be 0"):
        gelora.twonn(x, bootstrap=bootstrap)


def test_scale_curve_needs_enough_points():
    with pytest.raises(ValueError, match=r"5 distinct point\(s\); a curve needs at least 20"):
        gelora.id_scale_curve(torch.randn(5, 3))
    with pytest.raises(ValueError, match="max_levels"):
        gelora.id_scale_curve(torch.randn(50, 3), max_levels=0)
    c = gelora.id_scale_curve(torch.randn(5, 3), n_min=3)
    assert c.n == [5] and len(c.id) == 1


# ---------------------------------------------------------------------------------------------------
# Sharded: one scale for all ranks
# ---------------------------------------------------------------------------------------------------


def _worker(rank, world, port, outdir):
    init_gloo(rank, world, port)
    done = []
    try:
        from gelora.distributed import knn2_distributed, twonn_distributed

        x = torch.randn(120, 6, generator=torch.Generator().manual_seed(6))
        x[:60] *= 2.0 ** -10  # rank 0's shard: 2^10 smaller, so a scale per shard would differ
        mine = slice(rank * 60, (rank + 1) * 60)
        # unscaled (in range): the sharded result, which matches one process (tests/test_distributed.py)
        ref_d, ref_i = knn2_distributed(x[mine], k=2)
        ref = twonn_distributed(x[mine])
        assert _rel(ref.id, _reference_id(x)) <= _float32_id_tol(x)
        for k in (-100, 100):
            xs = x * 2.0 ** k
            assert torch.equal(xs * 2.0 ** -k, x)  # exact: no value of xs is subnormal
            d, i = knn2_distributed(xs[mine], k=2)
            assert torch.equal(i, ref_i) and torch.equal(d, ref_d * 2.0 ** k), k
            r = twonn_distributed(xs[mine])
            assert abs(r.id - ref.id) <= 1e-12 * ref.id, (r.id, ref.id)
            assert abs(r.r1_mean - ref.r1_mean * 2.0 ** k) <= 1e-12 * ref.r1_mean * 2.0 ** k
            done.append(k)
        with pytest.raises(ValueError, match="bootstrap"):
            twonn_distributed(x[rank * 60:(rank + 1) * 60], bootstrap=-1)
        done.append("bootstrap")
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(done, f)


def test_sharded_points_share_one_scale(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == [-100, 100, "bootstrap"]
