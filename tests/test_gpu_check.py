"""``benchmarks/gpu_check.sh --cpu-smoke``: the one prepared GPU check, run on tiny shapes on the CPU so that
the script cannot rot while no GPU is at hand (its stages, their time limits, the files under ``$OUT`` and
the summary table printed last). It says nothing about the GPU itself: the kernels there, the timings and
the goals are only checked when the script runs on a CUDA machine.

One run of the script (about 30-50 s on two busy cores, most of it imports: torch and peft in five
processes) is shared by the tests below through a module-scoped fixture.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.interpreter  # stage 2 runs the Triton kernel under TRITON_INTERPRET=1

#: Headline rows every run writes (benchmarks/_gpu_check.py EXPECTED), and the stages.
HEADLINE = ["pytest_knn", "pytest_lora", "twonn_big_s", "twonn_big_x_torch", "twonn_big_frac_gemm",
            "twonn_small_x_torch", "lora_r8", "lora_r16", "lora_r64", "profile_total_s"]
NUMERIC = HEADLINE[2:]
STAGES = ["0 setup", "1a knn tests", "2 twonn", "3 lora", "4 profile"]  # 1b (test_lora.py) is not run in smoke


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    for var in ("TRITON_INTERPRET", "GELORA_TRITON_CONFIG", "GELORA_LORA_TUNE", "GELORA_LORA_TUNE_MAX"):
        env.pop(var, None)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return dict(out=out, proc=proc, seconds=time.perf_counter() - t0)


def test_every_stage_runs_and_passes(smoke):
    proc = smoke["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader((smoke["out"] / "gpu_check.csv").open()))
    status = {r["stage"]: r["value"] for r in rows if r["key"].startswith("status:")}
    assert status == {s: "ok" for s in STAGES}, status
    assert smoke["seconds"] < 240, f"the smoke run took {smoke['seconds']:.0f} s"


def test_summary_table_is_printed_last(smoke):
    text = smoke["proc"].stdout
    assert "SUMMARY" in text
    tail = text[text.rindex("SUMMARY"):]
    lines = tail.strip().splitlines()
    assert lines[-1].startswith("RESULT: cpu smoke"), lines[-3:]
    for stage in STAGES:
        assert re.search(rf"^{re.escape(stage)}\s+stage status\s+ok", tail, re.M), stage
    for item in ("gelora.twonn", "speed-up over torch mm+topk", "fused LoRA fwd+bwd vs PEFT eager, r=64",
                 "profile_model", "pytest -m gpu"):
        assert item in tail, item
    assert "not measured" not in tail


def test_results_on_disk(smoke):
    out = smoke["out"]
    files = sorted(p.name for p in out.iterdir())
    # the device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-'
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    for name in ("gpu_check.csv", "gpu_check.json", "gpu_check.log", "pytest_gpu.log", "id_gpu.json",
                 "lora_speed.csv", "profile_speed.json"):
        assert name in files, (name, files)
    rows = list(csv.DictReader((out / "gpu_check.csv").open()))
    keys = {r["key"]: r for r in rows}
    for key in HEADLINE:
        assert key in keys, key
    for key in NUMERIC:
        float(keys[key]["value"])  # a number, not "failed"
    assert all(r["met"] == "" for r in rows), "a smoke run must not judge the GPU goals"
    assert "passed" not in keys["pytest_knn"]["value"] and "skipped" in keys["pytest_knn"]["value"]
    assert keys["pytest_lora"]["value"] == "not run"
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["smoke"] is True and summary["missing"] == [] and len(summary["rows"]) == len(rows)
    id_gpu = json.loads((out / "id_gpu.json").read_text())
    providers = {(r["shape"], r["provider"]) for r in id_gpu["rows"]}
    assert {p for _, p in providers} >= {"torch-mm-topk"} and any(p.startswith("gelora-") for _, p in providers)
    assert any("massive" in s for s, _ in providers)
    if "slice" in id_gpu["info"]:  # Triton importable: the slice and the A/B ran in the interpreter
        assert id_gpu["info"]["slices"] and "ab" in id_gpu["info"]
        assert "skipped" in id_gpu["info"]["ncu"]
    prof = json.loads((out / "profile_speed.json").read_text())
    assert set(prof["timings"]) >= {"forward", "estimate", "total"} and len(prof["ids"]) == 3
    log = (out / "gpu_check.log").read_text()
    assert "SUMMARY" in log and "== 4 profile" in log
