"""gelora.distributed: sharded exact kNN / TwoNN on 2 CPU processes (gloo) against one process.

Each test spawns two ranks with ``torch.multiprocessing.spawn``; the ranks run the checks below on
their shard and compare with ``gelora.twonn`` / ``gelora.knn_reference`` of the concatenated points,
which every rank can compute on these small sets. A failing assertion in a rank fails the spawn (and
the test, with the rank's traceback); each rank also writes the names of the checks it passed, and the
test asserts that both ranks ran all of them and returned the same ID.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, init_gloo

WORLD = 2




def _points(n=301, d=40, seed=0, intrinsic=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, intrinsic, generator=g) @ torch.randn(intrinsic, d, generator=g) + 2.0
    x[100] = x[250]  # duplicate across the 120 / 181 split
    x[7] = x[200]    # another one
    x[8] = x[9]      # and one inside rank 0
    return x


def _check_knn(dist_, idx, x, k):
    """Tie-aware: distances equal the float64 reference; each index is a distinct other point at the
    distance reported for it."""
    import gelora

    rd, _ = gelora.knn_reference(x, k=k)
    assert torch.allclose(dist_.double(), rd, rtol=1e-5, atol=1e-6), (dist_.double() - rd).abs().max()
    xc = x.double() - x.double().mean(0)
    at = (xc[idx] - xc.unsqueeze(1)).pow(2).sum(-1).sqrt()
    assert torch.allclose(at, rd, rtol=1e-5, atol=1e-6)
    assert bool((idx != torch.arange(x.shape[0]).unsqueeze(1)).all())
    s = torch.sort(idx, 1).values
    assert bool((s[:, 1:] != s[:, :-1]).all())


def _far_clusters(n, d, dtype, seed):
    """Two tight clusters (spread 1e-3) 1e4 apart (the mean halfway between)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * 1e-3
    x[: n // 2] += 1e4
    return x


def _brute_dist(x):
    """(N, 2) nearest-neighbour distances of the points as given, by float64 direct differences."""
    x64 = x.double()
    d2 = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    d2.fill_diagonal_(float("inf"))
    return torch.sort(d2, dim=1).values[:, :2].sqrt()


def _same_result(a, b, rtol=1e-9):
    assert abs(a.id - b.id) <= rtol * abs(b.id), (a.id, b.id)
    assert a.n_points == b.n_points and a.n_duplicates == b.n_duplicates, (a, b)
    assert a.n_used == b.n_used and a.n_zero_r1 == b.n_zero_r1 and a.n_ties == b.n_ties, (a, b)


def _worker(rank, world, port, outdir, backend):
    init_gloo(rank, world, port)
    done = []
    try:
        import gelora
        from gelora.distributed import knn2_distributed, twonn_distributed
        from gelora.id.estimate import id_from_distances

        x = _points()
        cuts = [0, 120, x.shape[0]]
        xl = x[cuts[rank]:cuts[rank + 1]]

        # kNN with global indices, gathered on every rank and local only
        d, i = knn2_distributed(xl, k=3, backend=backend)
        _check_knn(d, i, x, 3)
        dl, il = knn2_distributed(xl, k=3, backend=backend, gather=False)
        assert torch.equal(dl, d[cuts[rank]:cuts[rank + 1]]) and torch.equal(il, i[cuts[rank]:cuts[rank + 1]])
        done.append("knn")

        # TwoNN: duplicates inside a rank and across ranks, same as one process
        ref = gelora.twonn(x, backend="torch")
        res = twonn_distributed(xl, backend=backend)
        assert res.n_duplicates == 3, res.n_duplicates
        _same_result(res, ref)
        # the forced engine, else the first with a cross search (the C++ core has none)
        from gelora.neighbours.engines import select_backend

        assert res.backend == (backend or select_backend(xl, need=("cross",)).name)
        ids = {"mle": res.id}
        done.append("twonn")

        if backend is None:
            # other estimators, no dedup (the r1 = 0 points are dropped with a warning, as in twonn)
            for est in ("linear", "mle_censored"):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    r = twonn_distributed(xl, estimator=est, dedup=False)
                assert any("r1 == 0" in str(m.message) for m in w)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _same_result(r, gelora.twonn(x, estimator=est, dedup=False, backend="torch"))
                ids[est] = r.id
            done.append("estimators")

            # float64 input
            _same_result(twonn_distributed(xl.double()), gelora.twonn(x.double(), backend="torch"))
            done.append("float64")

            # an empty shard: rank 0 holds nothing
            xe = x if rank == 1 else x[:0]
            _same_result(twonn_distributed(xe), ref)
            de, ie = knn2_distributed(xe, k=2)
            _check_knn(de, ie, x, 2)
            done.append("empty_shard")

            # an explicit process group
            grp = dist.new_group(list(range(world)))
            _same_result(twonn_distributed(xl, group=grp), ref)
            done.append("group")

            # (B, T, D) hidden states with an attention mask
            h = x[:300].reshape(2, 150, 40)
            m = torch.ones(2, 150, dtype=torch.bool)
            m[:, 140:] = False
            hl, ml = h[rank:rank + 1], m[rank:rank + 1]
            _same_result(twonn_distributed(hl, mask=ml), gelora.twonn(h, mask=m, backend="torch"))
            done.append("mask")

            # far-off clusters: float32 products cannot separate the neighbours, so every row is
            # recomputed in float64 (the second ring pass) and the result is still exact
            g = torch.Generator().manual_seed(5)
            far = torch.randn(80, 16, generator=g) * 1e-3
            far[:40] += 1e4
            far[40:] -= 1e4
            fl = far[rank * 40:(rank + 1) * 40]
            d2, i2 = knn2_distributed(fl, k=2)
            _check_knn(d2, i2, far, 2)
            rf = twonn_distributed(fl)
            assert rf.n_fixed > 0, rf.n_fixed
            _same_result(rf, gelora.twonn(far, backend="torch"), rtol=1e-6)
            done.append("float64_fallback")

            # massive activations: 1% of the rows with one coordinate +3000 (a tight cluster, on both
            # ranks): the per-row window keeps the other rows certified in the sharded search too
            g = torch.Generator().manual_seed(6)
            xo = torch.randn(600, 4, generator=g) @ torch.randn(4, 24, generator=g)
            xo += 0.05 * torch.randn(600, 24, generator=g)
            xo[torch.randperm(600, generator=g)[:6], 5] += 3000.0
            ro = twonn_distributed(xo[rank * 300:(rank + 1) * 300])
            assert ro.n_fixed <= 6 + 6, ro.n_fixed
            _same_result(ro, gelora.twonn(xo, backend="torch"), rtol=1e-6)
            done.append("outliers")

            # float64 far clusters: rows even the float64 shortcut cannot rank get the brute-force
            # ring pass; distances are those of the points given, as in one process, bit for bit
            import gelora.distributed as gd
            from gelora.neighbours.points import direct_sq_dist

            calls = []
            brute = gd.brute_knn
            gd.brute_knn = lambda *a, **kw: calls.append(a[0].shape[0]) or brute(*a, **kw)
            try:
                # (the uncertified float64 shortcut got mu up to 6e-4 off here)
                xf = _far_clusters(400, 64, torch.float64, seed=1)
                xfl = xf[[0, 190, 400][rank]:[0, 190, 400][rank + 1]]
                rf = twonn_distributed(xfl)
                ref64 = gelora.twonn(xf, backend="torch")
                assert torch.equal(rf.mu, ref64.mu) and rf.id == ref64.id, (rf.id, ref64.id)
                assert torch.equal(rf.mu, id_from_distances(_brute_dist(xf))["mu"])
                assert rf.n_fixed > 0
                df, i_f = knn2_distributed(xfl, k=2)
                dref, _ = gelora.knn2(xf, backend="torch")
                assert torch.equal(df, dref)
                kd, _ = gelora.knn_reference(xf, k=2)
                assert torch.equal(direct_sq_dist(xf, None, i_f).sqrt(), kd)
                assert bool((i_f != torch.arange(400).unsqueeze(1)).all()) and bool((i_f[:, 0] != i_f[:, 1]).all())
            finally:
                gd.brute_knn = brute
            n_brute = torch.tensor([sum(calls)], dtype=torch.int64)
            dist.all_reduce(n_brute)
            assert int(n_brute) > 0, "the far clusters must fail the float64 certification"

            # float32 far clusters: centring into float32 rounds the cluster at 0 (near -5e3 after
            # centring) onto a ~4.9e-4 grid; the distances are still those of the points given
            x32 = _far_clusters(200, 16, torch.float32, seed=8)
            r32 = twonn_distributed(x32[rank * 100:(rank + 1) * 100])
            keep, _ = gelora.unique_rows(x32)
            want = id_from_distances(_brute_dist(x32[keep]))
            torch.testing.assert_close(r32.mu, want["mu"], rtol=1e-5, atol=0.0)
            done.append("far_exact")

            # a forced engine runs, or raises on every rank with its reasons: never a silent substitute
            # (the C++ core has no cross search, so the ring cannot use it)
            from gelora import BackendUnavailable
            from gelora.neighbours.engines import all_backends

            with pytest.raises(BackendUnavailable, match="'cpp' cannot run here"):
                twonn_distributed(xl, backend="cpp")
            for name in ("faiss", "torch"):
                if name in all_backends() and not all_backends()[name].not_supported_reasons(xl):
                    rn = twonn_distributed(xl, backend=name)
                    assert rn.backend == name
                    _same_result(rn, ref)
            done.append("forced")

            # bad input on one rank raises on every rank (no hang)
            bad = xl.clone()
            if rank == 1:
                bad[3, 2] = float("nan")
            with pytest.raises((ValueError, RuntimeError), match="NaN|another rank"):
                twonn_distributed(bad)
            with pytest.raises(ValueError, match="estimator"):
                twonn_distributed(xl, estimator="nope")
            # mismatched D across ranks
            with pytest.raises(ValueError, match="same dimension"):
                twonn_distributed(xl if rank == 0 else xl[:, :30])
            done.append("bad_input")
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"done": done, "ids": ids}, f)


def _spawn(tmp_path, backend):
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path), backend), nprocs=WORLD, join=True)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out


def test_sharded_knn_and_twonn_match_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = _spawn(tmp_path, None)
    expected = ["knn", "twonn", "estimators", "float64", "empty_shard", "group", "mask",
                "float64_fallback", "outliers", "far_exact", "forced", "bad_input"]
    for r in out:
        assert r["done"] == expected, r["done"]
    assert out[0]["ids"] == out[1]["ids"]  # bit-identical on every rank
    assert 4.0 < out[0]["ids"]["mle"] < 6.5


@pytest.mark.interpreter
def test_sharded_with_triton_kernel_in_interpreter(tmp_path, monkeypatch):
    """The Triton cross search (rows-only launches against each shard) in the CPU interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    out = _spawn(tmp_path, "triton")
    for r in out:
        assert r["done"] == ["knn", "twonn"], r["done"]
    assert out[0]["ids"] == out[1]["ids"]


def test_needs_an_initialised_group():
    from gelora.distributed import twonn_distributed

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        twonn_distributed(torch.randn(10, 3))
