"""Shared by the stages of ``benchmarks/gpu_check.sh``: the headline rows each stage appends to
``$OUT/gpu_check.csv``, the goals they are held to, and the summary table printed last.

Every row is ``stage, key, item, value, unit, goal, met, note``: ``key`` names a headline number (the
summary lists the expected keys that no stage wrote, e.g. after a timeout), ``met`` is ``yes``/``NO``
when a goal applies and blank otherwise (always blank in ``--cpu-smoke`` runs: tiny shapes on a CPU say
nothing about the goals). Rows are appended one at a time and flushed, so a stage killed by its time
limit leaves the rows it finished.

Command line (no torch import except for ``env``)::

    python3 benchmarks/_gpu_check.py env                         # versions, device, engines (stage 0)
    python3 benchmarks/_gpu_check.py status STAGE RC SECONDS LIMIT   # one row per stage
    python3 benchmarks/_gpu_check.py pytest LOG WHICH            # a pytest run's counts as a row
    python3 benchmarks/_gpu_check.py row STAGE KEY ITEM VALUE [NOTE]
    python3 benchmarks/_gpu_check.py lora CSV                    # lora_speed.py's target rows
    python3 benchmarks/_gpu_check.py summary                     # the table; gpu_check.json
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
COLUMNS = ["stage", "key", "item", "value", "unit", "goal", "met", "note"]

#: Headline numbers the summary expects, in the order of the stages (key: what it is).
EXPECTED = {
    "pytest_knn": "pytest -m gpu tests/test_gpu.py (Triton kNN engine vs float64 brute force)",
    "pytest_lora": "pytest -m gpu tests/test_lora.py (fused LoRA vs PEFT eager and float64)",
    "twonn_big_s": "TwoNN 1M x 4096 seconds (goal <= 15 s)",
    "twonn_big_x_torch": "TwoNN 1M speed-up over torch mm+topk (goal >= 3x)",
    "twonn_big_frac_gemm": "TwoNN 1M share of the GEMM rate, symmetric half (goal >= 70%)",
    "twonn_small_x_torch": "TwoNN 100k speed-up over torch mm+topk",
    "lora_r8": "fused LoRA fwd+bwd speed-up over PEFT, r=8 (goal >= 1.3x)",
    "lora_r16": "fused LoRA fwd+bwd speed-up over PEFT, r=16 (goal >= 1.3x)",
    "lora_r64": "fused LoRA fwd+bwd speed-up over PEFT, r=64 (goal >= 1.3x)",
    "profile_total_s": "7B-shaped profile, 100k tokens per layer (goal <= 180 s)",
}

#: LoRA target of the check: d = 4096, 2048 tokens, bf16, forward+backward (benchmarks/lora_speed.py GPU_TARGET).
LORA_GOAL = 1.3


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or (HERE / "results" / "gpu_check"))


def smoke() -> bool:
    return os.environ.get("GPU_CHECK_SMOKE", "0") == "1"


def csv_path() -> Path:
    return out_dir() / "gpu_check.csv"


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def add_row(stage: str, key: str, item: str, value, unit: str = "", goal: str = "",
            met: Optional[bool] = None, note: str = "") -> dict:
    """Append one headline row to ``$OUT/gpu_check.csv`` (header when new) and echo it."""
    path = csv_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if smoke():
        met = None
        note = ("smoke; " + note) if note else "smoke"
    row = dict(stage=stage, key=key, item=item, value=fmt(value), unit=unit, goal=goal,
               met="" if met is None else ("yes" if met else "NO"), note=note)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(f"[row] {stage} | {item}: {row['value']} {unit}" + (f" (goal {goal}: {row['met']})" if goal else "")
          + (f" [{note}]" if note else ""), flush=True)
    return row


def read_rows() -> List[dict]:
    path = csv_path()
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file in the same folder (no half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def cmd_env() -> int:
    import importlib.metadata
    import platform

    import torch

    stage = "0 setup"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    add_row(stage, "env:device", "device", dev)
    add_row(stage, "env:torch", "torch / CUDA", f"{torch.__version__} / {torch.version.cuda}")
    for mod in ("triton", "transformers", "peft", "accelerate"):
        try:  # the installed version, without importing the package (peft takes seconds)
            v = importlib.metadata.version(mod)
        except Exception as exc:  # noqa: BLE001 - report, do not stop
            v = f"missing ({type(exc).__name__})"
        add_row(stage, f"env:{mod}", mod, v)
    import gelora

    add_row(stage, "env:gelora", "gelora (imported from)", gelora.__version__, note=str(Path(gelora.__file__).parent))
    try:  # the engine registry is internal and may move; `python3 -m gelora.info` says the same
        from gelora.neighbours.engines import describe

        for name, usable, reasons, _ in describe():
            print(f"  knn backend {name:7s} usable={usable} {'; '.join(reasons)[:200]}")
    except Exception as exc:  # noqa: BLE001
        print(f"  knn backends: {type(exc).__name__}: {exc}")
    try:
        import gelora.lora as L

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        for name, usable, reasons, _ in L.describe_lora_backends(device, dt):
            print(f"  lora backend {name:7s} usable={usable} {'; '.join(reasons)[:200]}")
    except Exception as exc:  # noqa: BLE001
        print(f"  lora backends: {type(exc).__name__}: {exc}")
    try:
        from gelora.kernels import knn_top2 as kmod

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        c = kmod.default_config(dev, torch.float16, "ieee")
        cfg = f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
    except Exception as exc:  # noqa: BLE001 - no Triton here
        cfg = f"n/a ({type(exc).__name__})"
    tune = os.environ.get("GELORA_TRITON_AUTOTUNE", "1")
    add_row(stage, "env:triton_config", "Triton kNN tile config, fp16 tiles", cfg,
            note=f"GELORA_TRITON_AUTOTUNE={tune}; GELORA_TRITON_CONFIG={os.environ.get('GELORA_TRITON_CONFIG', '')!r}")
    return 0


def cmd_status(stage: str, rc: str, seconds: str, limit: str) -> int:
    rc_i = int(rc)
    what = {0: "ok", 124: "TIME LIMIT", 137: "KILLED (time limit)", 999: "skipped"}.get(rc_i, f"FAILED (exit {rc_i})")
    add_row(stage, f"status:{stage}", "stage status", what, note=f"{seconds} s of its {limit} s limit")
    return 0


PYTEST_RUNS = {"knn": ("1a knn tests", "tests/test_gpu.py"), "lora": ("1b lora tests", "tests/test_lora.py")}


def cmd_pytest(log: str, which: str) -> int:
    """One row for the pytest run of ``which`` in ``log`` (the text after its ``=== pytest WHICH`` marker):
    the counts of pytest's last line, or, when the run was cut off before it, the per-test results of
    ``-v`` counted so far."""
    stage, path = PYTEST_RUNS[which]
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    marker = f"=== pytest {which}"
    if marker in text:
        text = text[text.rindex(marker):]
    counts: Dict[str, int] = {}
    note = ""
    # "== 3 failed, 40 passed, 2 skipped in 61.2s ==" (the last line of a finished run)
    for line in reversed(text.splitlines()):
        m = re.search(r"((?:\d+ \w+(?:, )?)+) in ([\d.]+)s", line)
        if m:
            for n, what in re.findall(r"(\d+) (\w+)", m.group(1)):
                counts[what] = int(n)
            note = f"{m.group(2)} s"
            break
    if not counts:  # cut off (time limit): the results printed so far
        for what in re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text):
            counts[what.lower()] = counts.get(what.lower(), 0) + 1
        note = "INCOMPLETE (time limit or crash): the tests that finished"
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ran = counts.get("passed", 0) + failed
    value = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no result"
    complete = not note.startswith("INCOMPLETE")
    add_row(stage, f"pytest_{which}", f"pytest -m gpu {path}", value, goal="all pass",
            met=failed == 0 and ran > 0 and complete, note=note)
    for line in text.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            print("  " + line[:300])
    return 0


def cmd_row(stage: str, key: str, item: str, value: str, note: str = "") -> int:
    add_row(stage, key, item, value, note=note)
    return 0


def cmd_lora(path: str) -> int:
    p = Path(path)
    if not p.exists():
        print(f"no LoRA results at {p}")
        return 0
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["provider"] != "gelora" or row["mode"] != "fwd+bwd":
            continue
        same = ("d", "r", "tokens", "mode")
        peft = next((r for r in rows if r["provider"] == "peft" and all(r[k] == row[k] for k in same)), None)
        target = row["d"] == "4096" and row["tokens"] == "2048" and row["dtype"] == "bfloat16"
        x = float(row["vs_peft"])
        note = (f"d={row['d']} tokens={row['tokens']} {row['dtype']}; {float(row['ms']):.3g} ms vs PEFT "
                f"{float(peft['ms']) if peft else float('nan'):.3g} ms; peak {float(row['peak_mib']):.0f} MiB vs "
                f"{float(peft['peak_mib']) if peft else float('nan'):.0f}; err {float(row['err']):.1e}")
        add_row("3 lora", f"lora_r{row['r']}", f"fused LoRA fwd+bwd vs PEFT eager, r={row['r']}", x, unit="x",
                goal=f">= {LORA_GOAL}x" if target else "", met=(x >= LORA_GOAL) if target else None, note=note)
    return 0


def cmd_summary() -> int:
    rows = read_rows()
    out = out_dir()
    status = [r for r in rows if r["key"].startswith("status:")]
    body = [r for r in rows if not r["key"].startswith("status:")]
    have = {r["key"] for r in rows}
    missing = [k for k in EXPECTED if k not in have]
    goals = [r for r in body if r["met"]]
    met = sum(r["met"] == "yes" for r in goals)
    cols = ["stage", "item", "value", "unit", "goal", "met", "note"]
    table = [dict(r) for r in body] + [dict(stage="-", item=EXPECTED[k], value="not measured", unit="", goal="",
                                            met="", note="") for k in missing] + [dict(r) for r in status]
    for r in table:
        r["note"] = r["note"][:110]
        r["value"] = r["value"][:40]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in table)) if table else len(c) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in table]
    verdict = ("cpu smoke: goals not judged" if smoke() else
               f"{met} of {len(goals)} goals met" + (f"; not measured: {', '.join(missing)}" if missing else ""))
    write_json(out / "gpu_check.json", dict(when=time.strftime("%Y-%m-%dT%H:%M:%S"), smoke=smoke(), verdict=verdict,
                                            missing=missing, rows=rows))
    print()
    print("=" * 30 + " SUMMARY (gpu_check.csv; details: gpu_check.log, id_gpu.json, lora_speed.csv, "
          "profile_speed.json, pytest_gpu.log) " + "=" * 10)
    print("\n".join(lines))
    print(f"RESULT: {verdict}")
    return 0


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    table = {"env": cmd_env, "status": cmd_status, "pytest": cmd_pytest, "row": cmd_row, "lora": cmd_lora,
             "summary": cmd_summary}
    if cmd not in table:
        print(f"unknown command {cmd!r}; one of {sorted(table)}")
        return 2
    return table[cmd](*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
