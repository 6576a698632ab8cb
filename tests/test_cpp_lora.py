"""The C++ LoRA weight-gradient kernel (``gelora._C.lora_grad``) against a float64 reference, on every
instruction set this build and CPU carry, at shapes that hit every tile edge: ranks below, at and above
the vector width (1, 3, 8, 16, 17, 64, 256), feature counts that are not multiples of the vector
width or of the 3-vector panel, token counts below one block, one block and a ragged last block.

Tolerance: each output is a sum of products of length at most L = max(k, n) (S, T) followed by a
reduction over m tokens (dA, dB), so by the random-sign rounding model (Higham, 2nd ed., section 3.1)
its error is a few ``sqrt(L + m) eps`` of ``sum |terms|``; we bound by ``8 sqrt(L + m) eps`` times the
reference computed on absolute values, which also holds for adversarial cancellation in a sum."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import import_core

C = import_core()
ISAS = C.info()["isas"]
EPS32 = float(np.finfo(np.float32).eps)


def reference(x, dy, a, b, s):
    x, dy, a, b = (v.astype(np.float64) for v in (x, dy, a, b))
    S, T = s * x @ a.T, s * dy @ b
    return T.T @ x, dy.T @ S, T


def abs_reference(x, dy, a, b, s):
    return reference(*(np.abs(v) for v in (x, dy, a, b)), abs(s))


def make(m, k, n, r, seed):
    g = np.random.default_rng(seed)
    f = lambda *sh: g.standard_normal(sh).astype(np.float32)  # noqa: E731
    return f(m, k), f(m, n), f(r, k) / np.sqrt(k), f(n, r)


def check(got, x, dy, a, b, s):
    ref, ref_abs = reference(x, dy, a, b, s), abs_reference(x, dy, a, b, s)
    m, k = x.shape
    bound_scale = 8 * np.sqrt(max(k, dy.shape[1]) + m) * EPS32
    for name, gv, rv, ra in zip(("dA", "dB", "T"), got, ref, ref_abs):
        assert gv.shape == rv.shape, f"{name}: shape {gv.shape} vs {rv.shape}"
        err = np.abs(gv.astype(np.float64) - rv)
        tol = bound_scale * ra + 1e-30
        assert np.all(err <= tol), f"{name}: worst error/bound {float(np.max(err / tol)):.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n,r", [
    (1, 1, 1, 1), (5, 3, 2, 1), (37, 19, 23, 3), (64, 48, 48, 8), (97, 59, 33, 16), (300, 100, 70, 17),
    (129, 64, 130, 64), (40, 33, 47, 256), (600, 17, 211, 5),
])
def test_matches_float64(isa, m, k, n, r):
    x, dy, a, b = make(m, k, n, r, seed=m + k + n + r)
    da, db, t, plan = C.lora_grad(x, dy, a, b, 0.75, want_t=True, isa=isa)
    assert plan["isa"] == isa and plan["rank_pad"] >= r
    check((da, db, t), x, dy, a, b, 0.75)


@pytest.mark.parametrize("block_rows,n_threads", [(8, 1), (8, 2), (16, 2), (24, 2), (1000, 2)])
def test_blocking_and_threads_do_not_change_results_beyond_rounding(block_rows, n_threads):
    x, dy, a, b = make(203, 40, 52, 12, seed=1)
    da, db, t, plan = C.lora_grad(x, dy, a, b, -1.5, want_t=True, block_rows=block_rows, n_threads=n_threads)
    assert plan["block_rows"] == block_rows
    if C.info()["openmp"]:  # explicit threads are honoured up to one per token block
        assert plan["threads"] == min(n_threads, -(-203 // block_rows))
    check((da, db, t), x, dy, a, b, -1.5)


def test_automatic_threads_follow_the_work():
    small = C.lora_grad(*make(64, 64, 64, 4, seed=4), 1.0)[3]
    assert small["threads"] == 1  # ~1 MFLOP: one thread, no team to wake
    big = C.lora_grad(*make(2048, 256, 256, 16, seed=5), 1.0)[3]
    if C.info()["openmp"] and C.info()["max_threads"] > 1:
        assert big["threads"] > 1


def test_t_is_optional_and_zero_inputs_give_zero():
    x, dy, a, b = make(20, 10, 12, 4, seed=2)
    da, db, t, _ = C.lora_grad(x, dy, a, b, 1.0)
    assert t is None
    da0, db0, t0, _ = C.lora_grad(x, np.zeros_like(dy), a, np.zeros_like(b), 1.0, want_t=True)
    assert not da0.any() and not t0.any()
    assert np.array_equal(db0, np.zeros_like(db0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,r", [(1, 1, 1), (37, 19, 3), (130, 100, 17), (64, 33, 256), (300, 64, 16)])
def test_shrink_matches_float64(isa, m, k, r):
    g = np.random.default_rng(m + k + r)
    x = g.standard_normal((m, k)).astype(np.float32)
    a = g.standard_normal((r, k)).astype(np.float32)
    scale = (g.random(r) + 0.5).astype(np.float32)
    s, plan = C.lora_shrink(x, a, scale, isa=isa)
    assert plan["isa"] == isa and s.shape == (m, r)
    sa = scale.astype(np.float64)[:, None] * a
    ref = x.astype(np.float64) @ sa.T
    bound = 8 * np.sqrt(k) * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(sa).T) + 1e-30
    assert np.all(np.abs(s - ref) <= bound)
    with pytest.raises(ValueError, match="scale"):
        C.lora_shrink(x, a, scale[:-1] if r > 1 else np.ones(2, np.float32))


def test_bad_input():
    x, dy, a, b = make(8, 6, 5, 2, seed=3)
    with pytest.raises(TypeError, match="float32"):
        C.lora_grad(x.astype(np.float64), dy, a, b, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.lora_grad(np.asfortranarray(x), dy, a, b, 1.0)
    with pytest.raises(ValueError, match="rows"):
        C.lora_grad(x, dy[:-1], a, b, 1.0)
    with pytest.raises(ValueError, match="a: shape"):
        C.lora_grad(x, dy, np.ascontiguousarray(a[:, :-1]), b, 1.0)
    with pytest.raises(ValueError, match="b: shape"):
        C.lora_grad(x, dy, a, np.ascontiguousarray(b[:, :1]), 1.0)
    with pytest.raises(ValueError, match="rank"):
        C.lora_grad(x, dy, a[:0], np.zeros((5, 0), np.float32), 1.0)
    with pytest.raises(ValueError, match="finite"):
        C.lora_grad(x, dy, a, b, float("nan"))
    with pytest.raises(ValueError, match="isa"):
        C.lora_grad(x, dy, a, b, 1.0, isa="sse9")
    with pytest.raises(ValueError, match="2-D"):
        C.lora_grad(x[0], dy, a, b, 1.0)
