"""Rank allocation: the GeLoRA rule, exact budget accounting, clamps, per-module input, bad input."""
from __future__ import annotations

import math
import random

import pytest
import torch

from gelora.profiling.results import ModuleProfile, PairedBootstrap, ProfileResult
from gelora.ranks import NOISE_P, PAIRED_Z, allocate_ranks, gelora_bound, parse_budget


# ---------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------
def test_rule_l_plus_one_ids_give_l_ranks():
    ids = [10.0, 12.5, 12.5, 11.0, 14.0, 14.2]
    a = allocate_ranks(ids)
    # deltas 2.5, 0, -1.5, 3.0, 0.2 -> ceil 3, 0, (negative -> 0), 3, 1 -> plus one
    assert a.ranks == [4, 1, 1, 4, 2]
    assert a.lower_bounds == a.ranks and a.names == [f"block {i}" for i in range(5)]
    assert a.deltas == pytest.approx([2.5, 0.0, -1.5, 3.0, 0.2])
    assert a.params == sum(a.ranks) and a.budget is None and a.leftover is None


def test_rule_ignores_rounding_noise_above_integers():
    # 1.3 - 0.3 = 1.0000000000000002 in binary floating point: the bound is ceil(1) + 1 = 2, not 3
    assert gelora_bound(1.3 - 0.3) == 2
    assert allocate_ranks([0.3, 1.3]).ranks == [2]
    assert gelora_bound(1.000001) == 3


def test_rule_with_error_bars():
    ids, se = [10.0, 12.5, 13.0], [0.2, 0.2, 0.2]
    plain = allocate_ranks(ids, stderr=se)
    strict = allocate_ranks(ids, stderr=se, z=2.0)
    # z * sqrt(se^2 + se^2) = 0.566: 2.5 -> 1.934 -> 2 (+1 = 3); 0.5 -> -0.066 -> 0 (+1 = 1)
    assert plain.ranks == [4, 2] and strict.ranks == [3, 1]


def test_min_max_clamps_without_budget():
    a = allocate_ranks([0.0, 30.0, 30.0, 31.0], min_rank=2, max_rank=16)
    assert a.lower_bounds == [31, 1, 2] and a.ranks == [16, 2, 2]


def test_profile_result_input_uses_its_stderr():
    res = ProfileResult(layers=["embeddings", "block 0", "block 1"], ids=[5.0, 9.0, 8.0], stderr=[1.0, 1.0, 1.0],
                        n_points=[10] * 3, n_duplicates=[0] * 3, n_seen=10, n_sequences=2, pooling="tokens",
                        max_tokens=10, seed=0, estimator="mle", blocks_path="encoder.layer",
                        store_dtypes=["float16"] * 3, host_bytes=0)
    assert allocate_ranks(res).ranks == [5, 1]
    assert allocate_ranks(res, z=1.0).ranks == [4, 1]  # 4 - sqrt(2) = 2.59 -> 3 + 1


# ---------------------------------------------------------------------------------------------------
# Budget mode
# ---------------------------------------------------------------------------------------------------
def test_budget_proportional_exact():
    a = allocate_ranks([3.0, 5.2, 4.0, 7.5], budget="r8", cost=[384, 384, 384])
    # bounds 4, 1, 5 (sum 10) scaled to 24 rank units: 9.6, 2.4, 12 -> 9, 2, 12 + the largest remainder
    assert a.lower_bounds == [4, 1, 5] and a.ranks == [10, 2, 12]
    assert a.budget == 24 * 384 == a.params and a.leftover == 0


def test_uniform_rule_reproduces_uniform_rank():
    a = allocate_ranks([1.0, 9.0, 2.0, 5.0], rule="uniform", budget="r8", cost=[100, 100, 100])
    assert a.ranks == [8, 8, 8] and a.leftover == 0


def test_max_rank_redistributes():
    # bounds 10, 1, 1 with max_rank 4 and 9 rank units: 4 + 2s = 9 -> 2.5 each -> 4, 3, 2 (tie: first)
    a = allocate_ranks([0.0, 9.0, 9.0, 9.0], budget=9, max_rank=4)
    assert a.lower_bounds == [10, 1, 1] and a.ranks == [4, 3, 2] and a.leftover == 0


def test_budget_above_max_everywhere_reports_leftover():
    a = allocate_ranks([0.0, 3.0, 5.0], budget=100, max_rank=4, cost=[3, 5])
    assert a.ranks == [4, 4] and a.params == 32 and a.leftover == 68


def test_budget_too_small():
    with pytest.raises(ValueError, match="too small.*needs 20"):
        allocate_ranks([0.0, 1.0, 2.0], budget=19, min_rank=2, cost=[5, 5])


@pytest.mark.parametrize("seed", range(40))
def test_budget_properties_random(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    ids = [rng.uniform(5, 40) for _ in range(n + 1)]
    cost = [rng.choice([96, 384, 1152, 3 * 384 + 5]) for _ in range(n)]
    min_rank = rng.choice([1, 1, 2])
    max_rank = rng.choice([None, None, 6, 32])
    budget = rng.randint(min_rank * sum(cost), 40 * sum(cost))
    a = allocate_ranks(ids, budget=budget, cost=cost, min_rank=min_rank, max_rank=max_rank)
    # exact accounting, never above the budget
    assert a.params == sum(c * r for c, r in zip(cost, a.ranks)) and a.params <= budget
    assert a.leftover == budget - a.params
    assert all(isinstance(r, int) and r >= min_rank and (max_rank is None or r <= max_rank) for r in a.ranks)
    # largest remainder: every rank is the floor or the ceiling of its target...
    assert all(math.floor(t - 1e-9) <= r <= math.ceil(t - 1e-9) or r == min_rank for r, t in zip(a.ranks, a.targets))
    # ...and nothing rounded down could still be rounded up within the budget
    assert all(c > a.leftover for c, r, t in zip(cost, a.ranks, a.targets) if r < math.ceil(t - 1e-9))
    # the targets keep the proportions of the bounds (scale s) wherever they are not clamped
    free = [i for i, t in enumerate(a.targets) if t > min_rank and (max_rank is None or t < max_rank)]
    if free:
        s = a.targets[free[0]] / a.lower_bounds[free[0]]
        assert all(a.targets[i] == pytest.approx(s * a.lower_bounds[i]) for i in free)


def test_parse_budget():
    assert parse_budget(None, [1, 2]) is None
    assert parse_budget("none", [1, 2]) is None
    assert parse_budget(123, [1]) == 123
    assert parse_budget("456", [1]) == 456
    assert parse_budget("r8", [10, 20]) == 240
    assert parse_budget("rank:2", [10, 20]) == 60
    assert parse_budget("uniform:3", [10, 20]) == 90
    with pytest.raises(ValueError, match="rN"):
        parse_budget("eight", [1])
    with pytest.raises(ValueError, match=">= 0"):
        parse_budget(-1, [1])


# ---------------------------------------------------------------------------------------------------
# Per module
# ---------------------------------------------------------------------------------------------------
def test_per_module_mapping():
    ids = {"l.0.q": (10.0, 13.2), "l.0.v": (10.0, 9.0), "l.1.q": (12.0, 12.0, 0.1, 0.1)}
    a = allocate_ranks(ids)
    assert a.per_module and a.names == list(ids) and a.ranks == [5, 1, 1]
    b = allocate_ranks(ids, budget="r4", cost={"l.0.q": 10, "l.0.v": 10, "l.1.q": 20})
    assert b.params <= 160 and b.ranks[0] > b.ranks[1] and b.params + b.leftover == 160


def test_per_module_from_profile():
    mods = {
        f"encoder.layer.{b}.{rel}": ModuleProfile(name=f"encoder.layer.{b}.{rel}", block=b, rel=rel, in_features=8,
                                                  out_features=8, id_in=5.0, stderr_in=0.1, id_out=5.0 + b + k,
                                                  stderr_out=0.1, n_points=100)
        for b in range(2) for k, rel in enumerate(["attention.self.query", "attention.self.value"])
    }
    res = ProfileResult(layers=["embeddings", "block 0", "block 1"], ids=[5.0, 6.0, 7.0], stderr=[0.1] * 3,
                        n_points=[100] * 3, n_duplicates=[0] * 3, n_seen=100, n_sequences=5, pooling="tokens",
                        max_tokens=100, seed=0, estimator="mle", blocks_path="encoder.layer",
                        store_dtypes=["float16"] * 3, host_bytes=0, modules=mods)
    a = allocate_ranks(res, per_module=True)
    assert a.per_module and a.ranks == [1, 2, 2, 3] and a.blocks == [0, 0, 1, 1]
    assert a.rels == ["attention.self.query", "attention.self.value"] * 2
    with pytest.raises(ValueError, match="modules="):
        allocate_ranks(ProfileResult(**{**res.__dict__, "modules": {}}), per_module=True)


# ---------------------------------------------------------------------------------------------------
# How certain a bound is, and the paired rule
# ---------------------------------------------------------------------------------------------------
def _replicates(ids, deltas_noise, n=400, seed=0):
    """(n, L + 1) replicate profiles: ``ids`` moved by a shared offset per replicate (which cancels in
    the differences) plus, per block, independent noise of the given sizes on the output layer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(ids, dtype=torch.float64)
    shared = torch.randn(n, 1, generator=g, dtype=torch.float64) * 0.5
    own = torch.randn(n, len(ids), generator=g, dtype=torch.float64)
    steps = torch.cat([torch.zeros(n, 1, dtype=torch.float64),
                       own[:, 1:] * torch.tensor(deltas_noise, dtype=torch.float64)], dim=1)
    return ids + shared + torch.cumsum(steps, dim=1)


def test_bound_probabilities_from_paired_replicates():
    ids = [10.0, 12.5, 12.5, 12.0, 12.9]  # deltas 2.5, 0.0, -0.5, 0.9
    reps = _replicates(ids, [0.05, 0.05, 0.05, 0.2])
    a = allocate_ranks(ids, replicates=reps)
    plain = allocate_ranks(ids)
    # the rule and its bounds do not change; the replicates only report how certain they are
    assert a.ranks == plain.ranks == a.gelora_bounds == a.lower_bounds == [4, 1, 1, 2]
    assert a.n_boot == 400 and a.bootstrap_unit is None
    d = reps[:, 1:] - reps[:, :-1]
    assert a.delta_stderr == pytest.approx(d.std(0).tolist(), rel=1e-12)
    # the shared offset (sd 0.5) cancels: the paired errors are those of the differences alone
    assert a.delta_stderr[0] < 0.07 and float(reps[:, 1].std()) > 0.4
    # block 0: 2.5 +/- 0.05 is bound 4 in every replicate; block 1 sits on 0: bound 1 or 2 by a coin flip
    assert a.bound_probs[0] == {4: 1.0} and a.p_bound[0] == 1.0
    assert set(a.bound_probs[1]) == {1, 2} and a.bound_probs[1][1] == pytest.approx(0.5, abs=0.08)
    assert a.p_bound[1] == a.bound_probs[1][1]
    assert sum(a.bound_probs[3].values()) == pytest.approx(1.0)
    # 0.9 +/- 0.2 is bound 2 with probability P(delta <= 1) = 0.69
    assert a.p_bound[3] == pytest.approx(0.69, abs=0.07)
    assert a.noisy() == [1, 3] and a.noisy(0.4) == []
    lo, hi = a.bound_ci95[3]
    assert lo == 2 and hi == 3
    js = a.to_dict()
    assert js["bound_probs"][0] == {"4": 1.0} and js["noisy"] == [1, 3] and js["noise_p"] == NOISE_P


def test_bound_probabilities_follow_the_rule_z():
    ids, se = [10.0, 10.3], [0.1, 0.1]
    reps = _replicates(ids, [0.005])
    assert allocate_ranks(ids, stderr=se, replicates=reps).bound_probs == [{2: 1.0}]
    # with z = 2 the unpaired margin 0.283 leaves 0.017 +/- 0.005 of growth: still bound 2; z = 3 removes it
    assert allocate_ranks(ids, stderr=se, z=2.0, replicates=reps).bound_probs == [{2: 1.0}]
    assert allocate_ranks(ids, stderr=se, z=3.0, replicates=reps).bound_probs == [{1: 1.0}]


def test_paired_rule():
    ids = [10.0, 12.5, 12.5, 12.0, 12.9]
    reps = _replicates(ids, [0.05, 0.05, 0.05, 0.2])
    a = allocate_ranks(ids, rule="paired", replicates=reps)
    sd = a.delta_stderr
    expected = [1 + max(dl - PAIRED_Z * s, 0.0) for dl, s in zip(a.deltas, sd)]
    assert a.rule == "paired" and a.z == PAIRED_Z and a.lower_bounds == pytest.approx(expected, rel=1e-12)
    # without a budget the ranks are the ceilings of the real bounds (2.5 - 2 * 0.07 -> 3.36 -> 4)
    assert a.ranks == [math.ceil(b) for b in expected] == [4, 1, 1, 2]
    # the paper's bounds (z = 0) and their probabilities are still reported
    assert a.gelora_bounds == [4, 1, 1, 2] and a.p_bound[0] == 1.0
    z0 = allocate_ranks(ids, rule="paired", z=0.0, replicates=reps)
    assert z0.lower_bounds == pytest.approx([3.5, 1.0, 1.0, 1.9])
    # with a budget the real bounds are scaled and rounded once
    b = allocate_ranks(ids, rule="paired", z=0.0, replicates=reps, budget=40)
    assert b.params == 40 and b.targets == pytest.approx([40 * x / 7.4 for x in [3.5, 1.0, 1.0, 1.9]])
    lo, hi = a.bound_ci95[0]
    assert lo < expected[0] < hi and hi - lo < 0.3


def test_paired_rule_is_stable_where_the_paper_rule_flips():
    # two samples of one model: the growth of block 1 is 0.02 in one and -0.02 in the other, with a
    # paired error of 0.05; the paper's ceiling makes that rank 2 against 1 before a budget scales it
    a_ids, b_ids = [10.0, 11.0, 11.02, 12.5], [10.0, 11.0, 10.98, 12.5]
    noise = [0.05, 0.05, 0.05]
    ga = allocate_ranks(a_ids, budget="r8", replicates=_replicates(a_ids, noise, seed=1))
    gb = allocate_ranks(b_ids, budget="r8", replicates=_replicates(b_ids, noise, seed=2))
    pa = allocate_ranks(a_ids, rule="paired", budget="r8", replicates=_replicates(a_ids, noise, seed=1))
    pb = allocate_ranks(b_ids, rule="paired", budget="r8", replicates=_replicates(b_ids, noise, seed=2))
    assert abs(ga.ranks[1] - gb.ranks[1]) > 1 and ga.p_bound[1] < NOISE_P
    assert max(abs(x - y) for x, y in zip(pa.ranks, pb.ranks)) <= 1


def _profile_with_modules(paired=True):
    mods = {
        f"encoder.layer.{b}.{rel}": ModuleProfile(name=f"encoder.layer.{b}.{rel}", block=b, rel=rel, in_features=8,
                                                  out_features=8, id_in=5.0, stderr_in=0.1, id_out=5.0 + b + k,
                                                  stderr_out=0.1, n_points=100,
                                                  input_shared_with=None if k == 0 else f"encoder.layer.{b}.attention.self.query")
        for b in range(2) for k, rel in enumerate(["attention.self.query", "attention.self.value"])
    }
    keys = ["layer0", "layer1", "layer2"]
    for name in mods:
        if name.endswith("query"):
            keys.append(f"in:{name}")
        keys.append(f"out:{name}")
    point = {"layer0": 5.0, "layer1": 6.0, "layer2": 7.0}
    for mp in mods.values():
        point[mp.in_key], point[mp.out_key] = mp.id_in, mp.id_out
    g = torch.Generator().manual_seed(3)
    reps = torch.tensor([point[k] for k in keys], dtype=torch.float64) + \
        0.05 * torch.randn(300, len(keys), generator=g, dtype=torch.float64)
    pb = PairedBootstrap(keys=keys, log_mu=torch.empty(len(keys), 0), groups=torch.empty(0, dtype=torch.long),
                         fixed={}, unit="sequence", n_boot=300, seed=0, replicates=reps) if paired else None
    return ProfileResult(layers=["embeddings", "block 0", "block 1"], ids=[5.0, 6.0, 7.0], stderr=[0.1] * 3,
                         n_points=[100] * 3, n_duplicates=[0] * 3, n_seen=100, n_sequences=5, pooling="tokens",
                         max_tokens=100, seed=0, estimator="mle", blocks_path="encoder.layer",
                         store_dtypes=["float16"] * 3, host_bytes=0, modules=mods, paired=pb), reps, keys


def test_per_module_bound_probabilities_and_paired_rule():
    res, reps, keys = _profile_with_modules()
    a = allocate_ranks(res, per_module=True)
    assert a.ranks == [1, 2, 2, 3] and a.bootstrap_unit == "sequence" and a.n_boot == 300
    # the difference of each module is its output column minus its (shared) input column
    for i, (name, mp) in enumerate(res.modules.items()):
        d = reps[:, keys.index(mp.out_key)] - reps[:, keys.index(mp.in_key)]
        assert a.delta_stderr[i] == pytest.approx(float(d.std()), rel=1e-12)
    # block 0 query: growth 0 +/- 0.07, the others 1, 1, 2 (+/- 0.07): bound flips on 0 and on 1
    assert set(a.bound_probs[0]) == {1, 2} and min(a.p_bound) < NOISE_P
    p = allocate_ranks(res, per_module=True, rule="paired")
    assert p.lower_bounds == pytest.approx([1 + max(dl - 2 * s, 0) for dl, s in zip(p.deltas, p.delta_stderr)])
    assert p.ranks == [1, 2, 2, 3] and p.lower_bounds[1] < 2 and p.lower_bounds[0] == 1.0
    blocks = allocate_ranks(res)
    assert blocks.delta_stderr and blocks.bound_probs and blocks.bootstrap_unit == "sequence"
    # a profile without the bootstrap: no probabilities, and the paired rule says what it needs
    bare, _, _ = _profile_with_modules(paired=False)
    assert allocate_ranks(bare, per_module=True).bound_probs == []
    with pytest.raises(ValueError, match="paired_bootstrap"):
        allocate_ranks(bare, rule="paired")


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        allocate_ranks([3.0])
    with pytest.raises(ValueError, match="finite"):
        allocate_ranks([3.0, math.nan, 4.0])
    with pytest.raises(ValueError, match="rule"):
        allocate_ranks([1.0, 2.0], rule="adaptive")
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks([1.0, 2.0], min_rank=0)
    with pytest.raises(ValueError, match="max_rank"):
        allocate_ranks([1.0, 2.0], min_rank=4, max_rank=2)
    with pytest.raises(ValueError, match="cost has 1 entries for 2"):
        allocate_ranks([1.0, 2.0, 3.0], cost=[5])
    with pytest.raises(ValueError, match="positive"):
        allocate_ranks([1.0, 2.0], cost=[0])
    with pytest.raises(ValueError, match="stderr"):
        allocate_ranks([1.0, 2.0], stderr=[0.1])
    with pytest.raises(TypeError, match="ids must be"):
        allocate_ranks(5.0)
    with pytest.raises(ValueError, match="replicates must be"):
        allocate_ranks([1.0, 2.0, 3.0], replicates=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="replicates must be"):
        allocate_ranks([1.0, 2.0], replicates=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mapping"):
        allocate_ranks({"a": (1.0, 2.0)}, replicates=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="needs the paired bootstrap"):
        allocate_ranks([1.0, 2.0], rule="paired")
    with pytest.raises(ValueError, match="z must be"):
        allocate_ranks([1.0, 2.0], z=-1.0)
    with pytest.raises(ValueError, match="fewer than 2 finite"):
        allocate_ranks([1.0, 2.0], replicates=torch.full((5, 2), math.nan))
