"""``--dry-run``: the cells a run would do (done or pending) and an estimate of its duration.

The estimate is built from a step time measured here, now, at the configured threads: per task, a
uniform LoRA model at the pilot budget trains ``measure_steps`` steps on real batches (the median of all
but the first is kept) and predicts 128 validation examples. A pending cell then costs

    process start + data + steps * step_s * factor(method) + evaluated examples * eval_s

with the method factors of the single-task run (docs/e2e_results.md, full run, eager layers: head-only
training took 43.3 s against 82.1 s for uniform LoRA, AdaLoRA 0.549 s against 0.536 s per step), and
each preparation unit the seconds a smoke run of the suite measured on SNLI at load 5.5 (block profile
with the paired bootstrap 40 s, per-module profile 92 s, EVA's SVD 21 s). Main cells of a task whose pilot has not run yet are
counted at the pilot's step count (an upper bound: the rule never picks more). A cell that will be the copy
of a twin's run (``runner.twin_of``) costs nothing.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional

from .methods import prep_units
from .runner import SuiteConfig, decide, main_cells, pilot_cells, preps_file, read_jsonl, twin_of
from .tasks import get_task

STEP_FACTOR = {"head": 43.3 / 82.1, "adalora": 0.549 / 0.536}
# measured on SNLI (1,000 pairs, paired bootstrap of 1,000 replicates), 1 thread, load average 5.5
PREP_S = {"profile": 40.0, "profile_pm": 92.3, "eva": 21.3}
START_S = 30.0  # a fresh process (Python, torch, transformers, peft, the weights): ~5 s idle, 20-80 s at load 4.5-6


def measure(cfg: SuiteConfig, task_name: str, measure_steps: int = 6) -> Dict[str, float]:
    """Seconds per training step (uniform LoRA at the pilot budget: forward, backward, AdamW) and per
    evaluated example."""
    from e2e_quality import set_threads

    from .methods import build
    from .model import collate, predict
    from .train import load_encoded

    set_threads(cfg.threads)
    task, opts = get_task(task_name), cfg.opts()
    t = time.perf_counter()
    data = load_encoded(task, opts)
    data_s = time.perf_counter() - t
    model, _ = build("uniform", task, 0, cfg.pilot_budget, None, measure_steps, opts)
    times: List[float] = []
    import torch

    regression = task.kind == "regression"
    enc, y = data["enc"]["train"], data["splits"]["train"].labels
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for s in range(measure_steps):
        idx = list(range(s * cfg.batch_size, (s + 1) * cfg.batch_size))
        idx = [i % len(enc) for i in idx]
        ts = time.perf_counter()
        out = model(**collate([enc[i] for i in idx], [y[i] for i in idx], regression))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - ts)
    val = data["enc"]["validation"][:128]
    te = time.perf_counter()
    predict(model, val, regression, cfg.eval_batch_size)
    eval_s = (time.perf_counter() - te) / max(1, len(val))
    return {"step_s": statistics.median(times[1:] or times), "eval_s_per_example": eval_s, "data_s": data_s,
            "n_val": len(data["splits"]["validation"]), "n_test": len(data["splits"]["test"])}


def estimate(cfg: SuiteConfig, measured: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """Cells (with status) and the seconds the pending ones should take."""
    from pathlib import Path

    records = read_jsonl(Path(cfg.results))
    preps = {r["key"]: r for r in read_jsonl(preps_file(Path(cfg.results)))}
    done = {r.get("key") for r in records}
    decisions = {}
    for t in cfg.tasks:
        d = decide(cfg, t, records)
        decisions[t] = d or {"lr": cfg.lr.get(t, cfg.pilot_lrs[0]), "steps": cfg.steps.get(t, cfg.pilot_steps[t]),
                             "rule": "pilot pending: upper bound"}
    start = START_S if cfg.isolate else 0.0
    rows: List[Dict[str, Any]] = []
    for c in pilot_cells(cfg) + main_cells(cfg, decisions):
        m = measured[c.task]
        n_eval = (m["n_val"] * (c.steps // cfg.pilot_eval_every + 1) if c.phase == "pilot"
                  else m["n_val"] + m["n_test"])
        sec = (start + m["data_s"] + c.steps * m["step_s"] * STEP_FACTOR.get(c.method, 1.0)
               + n_eval * m["eval_s_per_example"])
        copy = twin_of(cfg, preps, c) is not None  # the copy of a twin's run
        rows.append({"cell": c, "done": c.key in done, "est_s": 0.0 if c.key in done or copy else sec})
    scale = min(1.0, cfg.profile_texts / 1000)
    prep_s = 0.0
    for t in cfg.tasks:
        for unit, _ in prep_units(cfg.methods, cfg.budgets):
            prep_s += start + PREP_S[unit] * scale
    return {"rows": rows, "decisions": decisions, "prep_s": prep_s,
            "total_s": sum(r["est_s"] for r in rows) + prep_s,
            "per_seed_s": {s: sum(r["est_s"] for r in rows if r["cell"].phase == "main" and r["cell"].seed == s)
                           for s in cfg.seeds},
            "pilot_s": sum(r["est_s"] for r in rows if r["cell"].phase == "pilot")}


def dry_run(cfg: SuiteConfig, log=print, step_s: Optional[float] = None) -> Dict[str, Any]:
    """Print the cells and the estimate; ``step_s`` given: no measurement (every task at that step time)."""
    measured = {}
    for t in cfg.tasks:
        if step_s is None:
            measured[t] = measure(cfg, t)
        else:
            sp = get_task(t)
            measured[t] = {"step_s": step_s, "eval_s_per_example": step_s / (3 * cfg.batch_size), "data_s": 3.0,
                           "n_val": sp.n_val, "n_test": sp.n_test}
        log(f"{t}: {measured[t]['step_s']:.3f} s per training step, {1000 * measured[t]['eval_s_per_example']:.1f} "
            f"ms per evaluated example ({cfg.threads} thread{'s' if cfg.threads > 1 else ''})")
    est = estimate(cfg, measured)
    for r in est["rows"]:
        c = r["cell"]
        log(f"{'done   ' if r['done'] else 'pending'} {c.phase:5s} {c.task:13s} {c.budget or '-':3s} {c.method:13s} "
            f"seed {c.seed} lr {c.lr:g} steps {c.steps:5d}  ~{r['est_s'] / 60:5.1f} min")
    for t, d in est["decisions"].items():
        log(f"{t}: lr {d['lr']:g}, {d['steps']} steps ({d['rule']})")
    n_done = sum(r["done"] for r in est["rows"])
    log(f"{len(est['rows'])} cells, {n_done} done; preparation units ~{est['prep_s'] / 60:.0f} min; pilot "
        f"~{est['pilot_s'] / 3600:.1f} h; per seed " + ", ".join(f"{s}: ~{v / 3600:.1f} h" for s, v in
                                                                  est["per_seed_s"].items()))
    wall = est["total_s"] / cfg.workers
    log(f"estimated time left: ~{est['total_s'] / 3600:.1f} h of cells at {cfg.threads} thread(s) each; with "
        f"{cfg.workers} worker(s) ~{wall / 3600:.1f} h ({wall / 86400:.2f} days) if the machine has "
        f"{cfg.workers * cfg.threads} free cores")
    est["measured"] = measured
    return est
