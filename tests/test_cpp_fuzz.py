"""Property-based fuzzing of the C++ core (hypothesis): random shapes, dtypes, blockings, thread
counts and instruction sets, with duplicates, integer lattices (exact ties) and non-contiguous views,
against the float64 reference."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gelora
from gelora.testing import assert_knn_match

from conftest import import_core  # noqa: E402

_C = import_core()

from test_cpp_core import check_candidates, derived_atol  # noqa: E402

ISAS = _C.info()["isas"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def point_sets(draw, max_n=90, max_d=70):
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["gauss", "lattice", "offset", "tiny-scale"]))
    if kind == "gauss":
        x = rng.standard_normal((n, d))
    elif kind == "lattice":  # small integers: many exactly equal distances
        x = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    elif kind == "offset":  # far from the origin: the norm shortcut loses digits
        x = rng.standard_normal((n, d)) * 0.1 + 50.0
    else:
        x = rng.standard_normal((n, d)) * 1e-3
    n_dup = draw(st.integers(0, n // 2))
    if n_dup:
        src = rng.integers(0, n, size=n_dup)
        dst = rng.integers(0, n, size=n_dup)
        x[dst] = x[src]
    return x.astype(dtype)


@settings(FUZZ, max_examples=300)
@given(
    x=point_sets(),
    kc_frac=st.floats(0.0, 1.0),
    isa=st.sampled_from(ISAS),
    threads=st.integers(1, 3),
    block_rows=st.sampled_from([0, 1, 24, 50]),
    block_cols=st.sampled_from([0, 1, 16, 40]),
    depth=st.sampled_from([0, 1, 7, 32]),
    prepack=st.sampled_from([-1, 0, 1]),
    private_lists=st.sampled_from([-1, 0, 1]),
)
def test_fuzz_core_candidates(x, kc_frac, isa, threads, block_rows, block_cols, depth, prepack, private_lists):
    n = x.shape[0]
    kc = 1 + int(kc_frac * (n - 2))
    d2, idx, sq, plan = _C.knn_candidates(x, kc, isa=isa, n_threads=threads, block_rows=block_rows,
                                          block_cols=block_cols, depth=depth, prepack=prepack,
                                          private_lists=private_lists)
    assert plan["isa"] == isa
    check_candidates(x, kc, d2, idx, sq)


@FUZZ
@given(
    x=point_sets(max_n=70, max_d=40),
    k=st.integers(1, 3),
    view=st.sampled_from(["contiguous", "fortran", "col-stride", "row-stride"]),
)
def test_fuzz_pipeline(x, k, view):
    if view == "fortran":
        x = np.asfortranarray(x)
    elif view == "col-stride":
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif view == "row-stride":
        x = np.repeat(x, 2, axis=0)[::2]
    n = x.shape[0]
    if n < k + 1:
        k = n - 1
    t = torch.from_numpy(x)
    dist, idx = gelora.knn2(t, k=k, backend="cpp")
    assert_knn_match(t, dist, idx, atol=derived_atol(t, k))
    dup = (np.abs(x[:, None, :] - x[None, :, :]).max(-1) == 0) & ~np.eye(n, dtype=bool)
    has_twin = dup.any(1)
    # exact duplicates: distance exactly 0 through the whole pipeline
    assert (dist[torch.from_numpy(has_twin), 0] == 0).all()
