"""PEFT bridge: every module gets exactly its rank through PEFT itself, save/load round-trips ranks and
outputs, parameter counts equal the budget, and the three pattern pitfalls of PEFT are caught."""
from __future__ import annotations

import re

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from gelora.peft_bridge import adapter_ranks, lora_config, pattern_key, rank_costs, verify_lora_config  # noqa: E402
from gelora.ranks import allocate_ranks  # noqa: E402


from conftest import BUILDERS, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402,F401
IDS = [6.0, 9.3, 9.0, 13.5]  # bounds 5, 1, 6


def lora_param_count(pm) -> int:
    return sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n)


def randomize_lora(pm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_every_module_gets_its_rank(arch):
    m = BUILDERS[arch]()
    alloc = allocate_ranks(IDS)
    assert alloc.ranks == [5, 1, 6]
    cfg = lora_config(m, alloc)
    pm = peft.get_peft_model(m, cfg)
    got = adapter_ranks(pm)
    n_per_block = {"bert": 6, "llama": 7, "gpt2": 4}[arch]
    assert len(got) == 3 * n_per_block
    prefix = {"bert": "encoder.layer", "llama": "model.layers", "gpt2": "transformer.h"}[arch]
    for name, r in got.items():
        block = int(name[len(prefix) + 1 :].split(".")[0])
        assert r == alloc.ranks[block], name
        mod = pm.get_base_model().get_submodule(name)
        assert mod.r["default"] == r and mod.lora_B["default"].weight.shape[1] == r
        assert mod.scaling["default"] == pytest.approx(2.0)  # constant alpha / r


def test_per_module_allocation_reaches_peft():
    m = tiny_bert()
    names = [n for n, mod in m.named_modules() if n.endswith(("query", "value"))]
    ids = {n: (5.0, 5.0 + i) for i, n in enumerate(names)}
    alloc = allocate_ranks(ids)
    cfg = lora_config(m, alloc)
    pm = peft.get_peft_model(m, cfg)
    assert adapter_ranks(pm) == dict(zip(names, [1, 2, 3, 4, 5, 6]))


def test_per_module_profile_allocation_maps_by_block_and_name():
    from gelora.profiling.driver import profile_model

    m = tiny_llama()
    ids = torch.randint(3, 64, (12, 8), generator=torch.Generator().manual_seed(0))
    prof = profile_model(m, {"input_ids": ids}, max_tokens=96, modules=["q_proj", "down_proj"], progress=False)
    alloc = allocate_ranks(prof, per_module=True, budget="r4", cost=rank_costs(m, ["q_proj", "down_proj"],
                                                                               per_module=True))
    cfg = lora_config(m, alloc)
    pm = peft.get_peft_model(m, cfg)
    assert adapter_ranks(pm) == dict(zip(alloc.names, alloc.ranks))
    assert lora_param_count(pm) == alloc.params == alloc.budget - alloc.leftover


def test_budget_equals_uniform_rank_8_parameter_count():
    targets = ["query", "key", "value"]
    m = tiny_bert()
    cost = rank_costs(m, targets)
    assert cost == [3 * 64] * 3
    alloc = allocate_ranks(IDS, budget="r8", cost=cost)
    pm = peft.get_peft_model(tiny_bert(), lora_config(m, alloc, target_modules=targets))
    uniform = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=8, target_modules=targets))
    assert lora_param_count(pm) == alloc.params
    assert alloc.params + alloc.leftover == lora_param_count(uniform) == alloc.budget
    assert alloc.leftover == 0 and alloc.ranks == [10, 2, 12]  # bounds 5, 1, 6 doubled


def test_save_and_load_round_trip(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    alloc = allocate_ranks(IDS)
    cfg = lora_config(base, alloc, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(base, cfg)
    randomize_lora(pm)
    x = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(input_ids=x).logits
        plain = pm.get_base_model()
        with pm.disable_adapter():
            base_out = plain(input_ids=x).logits
    assert not torch.allclose(want, base_out)  # the adapter does something
    pm.save_pretrained(tmp_path / "adapter")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert adapter_ranks(loaded) == adapter_ranks(pm)
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    again = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert again.rank_pattern == cfg.rank_pattern and again.alpha_pattern == cfg.alpha_pattern


def test_keys_are_escaped_anchored_full_names():
    m = tiny_bert()
    cfg = lora_config(m, [2, 3, 4], target_modules=["query"])
    assert set(cfg.rank_pattern) == {"^" + re.escape(f"encoder.layer.{i}.attention.self.query") for i in range(3)}
    assert pattern_key("a.b", anchor=True) == r"^a\.b" and pattern_key("a.b", anchor=False) == r"a\.b"
    assert sorted(cfg.target_modules) == sorted(f"encoder.layer.{i}.attention.self.query" for i in range(3))


def test_unanchored_config_fits_a_wrapping_task_model():
    base = tiny_bert()
    clf = transformers.BertForSequenceClassification(base.config)
    cfg = lora_config(base, [2, 3, 4], target_modules=["query"], anchor=False)
    pm = peft.get_peft_model(transformers.BertForSequenceClassification(base.config), cfg)
    assert adapter_ranks(pm) == {f"bert.encoder.layer.{i}.attention.self.query": r for i, r in enumerate([2, 3, 4])}
    anchored = lora_config(base, [2, 3, 4], target_modules=["query"])
    expected = {f"bert.encoder.layer.{i}.attention.self.query": r for i, r in enumerate([2, 3, 4])}
    with pytest.raises(ValueError, match="matches no module"):
        verify_lora_config(clf, anchored, expected)
    # built on the task model itself, the anchored config is exact there
    pm2 = peft.get_peft_model(transformers.BertForSequenceClassification(base.config),
                              lora_config(clf, [2, 3, 4], target_modules=["query"]))
    assert adapter_ranks(pm2) == expected


def test_alpha_policies():
    m = tiny_llama()
    cs = peft.get_peft_model(tiny_llama(), lora_config(m, [1, 4, 8], target_modules=["q_proj"], scaling=0.5))
    ca = peft.get_peft_model(tiny_llama(), lora_config(m, [1, 4, 8], target_modules=["q_proj"],
                                                       alpha_policy="constant_alpha", lora_alpha=16))
    for i, r in enumerate([1, 4, 8]):
        name = f"model.layers.{i}.self_attn.q_proj"
        assert cs.get_base_model().get_submodule(name).scaling["default"] == pytest.approx(0.5)
        assert ca.get_base_model().get_submodule(name).scaling["default"] == pytest.approx(16 / r)


# ---------------------------------------------------------------------------------------------------
# The pitfalls of PEFT's pattern matching are caught
# ---------------------------------------------------------------------------------------------------
def _intended():
    return {f"encoder.layer.{i}.attention.self.query": r for i, r in enumerate([2, 3, 4])}


def _cfg(rank_pattern, target_modules=("query",)):
    return peft.LoraConfig(r=8, target_modules=list(target_modules), rank_pattern=rank_pattern)


def test_verify_catches_key_that_matches_nothing():
    m = tiny_bert()
    rp = {pattern_key(n): r for n, r in _intended().items()}
    rp["^encoder\\.layer\\.7\\.attention\\.self\\.query"] = 5  # no block 7: PEFT would ignore it silently
    with pytest.raises(ValueError, match="matches no module"):
        verify_lora_config(m, _cfg(rp), _intended())


def test_verify_catches_key_that_matches_several():
    m = tiny_bert()
    with pytest.raises(ValueError, match="matches 3 modules"):
        verify_lora_config(m, _cfg({"query": 2}), _intended())


def test_verify_catches_first_match_wins():
    m = tiny_bert()
    # the broad key comes first, so PEFT gives block 1 rank 2 instead of 3
    rp = {r"layer\.\d\.attention\.self\.query": 2, pattern_key("encoder.layer.1.attention.self.query"): 3,
          pattern_key("encoder.layer.2.attention.self.query"): 4}
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.query: PEFT would use rank 2"):
        verify_lora_config(m, _cfg(rp), _intended())


def test_verify_catches_unintended_targets_and_unescaped_names():
    m = tiny_bert()
    rp = {pattern_key(n): r for n, r in _intended().items()}
    with pytest.raises(ValueError, match="unintended module"):
        verify_lora_config(m, _cfg(rp, target_modules=["query", "key"]), _intended())
    with pytest.raises(ValueError, match="misses"):
        verify_lora_config(m, _cfg(rp, target_modules=["encoder.layer.0.attention.self.query"]), _intended())
    # an unescaped dot is "any character": it still matches here, but only escaped keys are exact
    loose = {n: r for n, r in _intended().items()}
    verify_lora_config(m, _cfg(loose), _intended())
    assert re.match(rf"(.*\.)?({'encoder.layer.0.attention.self.query'})$", "encoderXlayer.0.attention.self.query")
    assert not re.match(rf"(.*\.)?({pattern_key('encoder.layer.0.attention.self.query')})$",
                        "encoderXlayer.0.attention.self.query")


def test_lora_config_rejects_bad_ranks():
    m = tiny_bert()
    with pytest.raises(ValueError, match="2 per-block ranks for a model with 3 blocks"):
        lora_config(m, [1, 2])
    with pytest.raises(ValueError, match="positive integers"):
        lora_config(m, [1, 0, 2])
    with pytest.raises(ValueError, match="does not have"):
        lora_config(m, {"encoder.layer.9.attention.self.query": 4})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        lora_config(m, {"encoder.layer.0.attention": 4})
    with pytest.raises(TypeError, match="sets .*'r'"):
        lora_config(m, [1, 2, 3], r=4)
    with pytest.raises(ValueError, match="alpha_policy"):
        lora_config(m, [1, 2, 3], alpha_policy="sqrt")
