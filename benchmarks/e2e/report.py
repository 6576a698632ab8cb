"""The report of the suite, from the results file as it stands (partial runs included).

Per task and budget: the test metrics of every method (mean +/- sample std over the seeds it has, and
how many), the validation metric, and the paired difference from uniform LoRA (same seeds, same
batches, same head initialisation) with a 95 % Student-t interval over the seeds; a verdict from that
interval (win: above 0, loss: below 0, tie: it holds 0; no spread: every seed gave the same difference,
which makes no interval and no test), and whether a win or loss also holds under
Holm's correction over every comparison of the report (two-sided t-test p-values); the same verdicts
in words, and which GeLoRA variants trained the same ranks (the same runs). The GLUE-style average over tasks (the mean of
the primary test metric, in points: accuracy % for the classifications, 100 x Pearson for the
regression) is taken per seed over the seeds that have every task, then treated the same way. Costs
per method: preparation (ID profile / EVA's SVD) seconds, allocation seconds, median step time, peak
RSS of the training and the preparation processes.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .methods import METHODS
from .runner import smooth
from .tasks import get_task

BEGIN, END = "<!-- e2e_suite:begin -->", "<!-- e2e_suite:end -->"
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion ``z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2)``, within
    0.001 of the exact value)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz;
    the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic ``t`` with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def mean_ci(xs: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample std, n, the 95 % t interval of the mean and the two-sided p-value of "the mean is 0"
    (None below 2 values). Equal values (sd 0; the metrics are discrete, so 2 seeds can differ from uniform
    by the same amount) give a zero-width interval and no test: they say nothing about the spread."""
    xs = [float(x) for x in xs]
    n = len(xs)
    finite = all(math.isfinite(x) for x in xs)  # statistics.stdev fails on a NaN (a diverged cell's metric)
    m = statistics.mean(xs) if xs and finite else float("nan")
    sd = (statistics.stdev(xs) if finite else float("nan")) if n > 1 else None
    if sd is not None and sd <= 1e-9 * (1.0 + abs(m)):  # equal up to rounding (73.6 - 73.45 vs 74.1 - 73.95)
        sd = 0.0
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else None
    p = None
    if n > 1 and finite:  # a NaN metric (a diverged cell): no test
        p = None if sd == 0 else t_pvalue(m / (sd / math.sqrt(n)), n - 1)
    return {"mean": m, "sd": sd, "n": n, "lo": None if half is None else m - half,
            "hi": None if half is None else m + half, "p": p}


def holm(ps: Sequence[float], alpha: float = 0.05) -> List[bool]:
    """Holm's step-down procedure: which of the hypotheses with p-values ``ps`` are rejected with the
    family-wise error rate held at ``alpha``."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out = [False] * len(ps)
    for k, i in enumerate(order):
        if ps[i] > alpha / (len(ps) - k):
            break
        out[i] = True
    return out


def verdict(ci: Dict[str, Any]) -> str:
    if ci["lo"] is None:
        return "n < 2"
    if not (math.isfinite(ci["lo"]) and math.isfinite(ci["hi"])):
        return "undefined"
    if ci["sd"] == 0:
        return "no spread"
    return "win" if ci["lo"] > 0 else "loss" if ci["hi"] < 0 else "tie"


def _points(task: str, metric: str, v: float) -> float:
    """Metrics in points: x 100 (accuracy %, F1 %, 100 x correlation); RMSE as it is."""
    return v if metric == "rmse" else 100 * v


def main_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Main cells, the last record of each key; when a task has several settings (steps, lr), the
    setting with the most records (reported)."""
    by_key = {r["key"]: r for r in records if r.get("phase") == "main"}
    out = list(by_key.values())
    best: Dict[str, str] = {}
    for t in {r["task"] for r in out}:
        counts: Dict[str, int] = {}
        for r in out:
            if r["task"] == t:
                counts[r["setting"]] = counts.get(r["setting"], 0) + 1
        best[t] = max(counts, key=counts.get)
    return [r for r in out if r["setting"] == best[r["task"]]]


def _cells(recs: List[Dict[str, Any]], task: str, budget: Optional[str], method: str) -> Dict[int, Dict[str, Any]]:
    b = None if method == "head" else budget
    return {r["seed"]: r for r in recs if r["task"] == task and r["method"] == method and r["budget"] == b}


def summarize(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Rows per (task, budget, method) and the average over tasks per (budget, method)."""
    recs = main_records(records)
    tasks = [t for t in dict.fromkeys(r["task"] for r in recs)]
    budgets = sorted({r["budget"] for r in recs if r["budget"]}, key=lambda b: int(b[1:]))
    methods = [m for m in METHODS if any(r["method"] == m for r in recs)]
    rows, avg = [], []
    for b in budgets:
        for t in tasks:
            task = get_task(t)
            uni = _cells(recs, t, b, "uniform")
            if not any(_cells(recs, t, b, m) for m in methods if m != "head"):
                continue  # no LoRA cell of this task at this budget yet: no table of the head alone
            for m in methods:
                cells = _cells(recs, t, b, m)
                if not cells:
                    continue
                row = {"task": t, "budget": b, "method": m, "seeds": sorted(cells), "primary": task.primary}
                for metric in task.metrics:
                    row[metric] = mean_ci([_points(t, metric, c["test"][metric]) for c in cells.values()])
                row["val"] = mean_ci([_points(t, task.primary, c["val"][task.primary]) for c in cells.values()])
                common = sorted(set(cells) & set(uni))
                if m != "uniform" and common:
                    row["diff"] = mean_ci([_points(t, task.primary, cells[s]["test"][task.primary]
                                                   - uni[s]["test"][task.primary]) for s in common])
                rows.append(row)
        uni = _average_over_tasks(recs, tasks, b, "uniform")
        for m in methods:
            per_seed = _average_over_tasks(recs, tasks, b, m)
            if not per_seed or not uni:
                continue
            row = {"budget": b, "method": m, "seeds": sorted(per_seed), "score": mean_ci(list(per_seed.values()))}
            common = sorted(set(per_seed) & set(uni))
            if m != "uniform" and common:
                row["diff"] = mean_ci([per_seed[s] - uni[s] for s in common])
            avg.append(row)
    out = {"rows": rows, "average": avg, "cost": cost_rows(recs, methods), "tasks": tasks, "budgets": budgets,
           "n_records": len(recs), "same_ranks": _same_ranks(recs)}
    out["verdicts"] = _verdict_cells(out)
    return out


def _average_over_tasks(recs, tasks, budget, method) -> Dict[int, float]:
    """Per seed with every task: the mean over tasks of the primary test metric in points."""
    by_task = {t: _cells(recs, t, budget, method) for t in tasks}
    seeds = set.intersection(*(set(c) for c in by_task.values())) if by_task else set()
    return {s: statistics.mean(_points(t, get_task(t).primary, by_task[t][s]["test"][get_task(t).primary])
                               for t in tasks) for s in sorted(seeds)}


def cost_rows(recs: List[Dict[str, Any]], methods: List[str]) -> List[Dict[str, Any]]:
    """Per method: the costs of the cells it trained (a copy of a twin's run, ``same_as``, carries the
    twin's costs and is counted apart, as ``copies``)."""
    out = []
    for m in methods:
        mine = [r for r in recs if r["method"] == m]
        trained = [r for r in mine if not r.get("same_as")]
        rr = trained or mine  # only copies: their twins' costs
        c = [r["cost"] for r in rr]
        preps = {(r["task"], r["cost"].get("prep_unit"), r["budget"] if m == "eva" else None): r["cost"]
                 for r in rr if "prep_s" in r["cost"]}
        out.append({
            "method": m, "cells": len(trained), "copies": len(mine) - len(trained),
            "prep_s": statistics.mean(p["prep_s"] for p in preps.values()) if preps else 0.0,
            "alloc_s": statistics.mean(x.get("prep_alloc_s", 0.0) + x["alloc_s"] for x in c),
            "step_s": statistics.median(x["step_s_median"] for x in c),
            # cells that share the machine step more slowly: the medians per number of cells run at once
            "step_s_by_workers": {w: statistics.median(r["cost"]["step_s_median"] for r in rr
                                                       if r.get("workers", 1) == w)
                                  for w in sorted({r.get("workers", 1) for r in rr})},
            "train_s": statistics.mean(x["train_s"] for x in c),
            "peak_rss_mib": max(x["peak_rss_mib"] for x in c),
            "prep_peak_rss_mib": max((p["prep_peak_rss_mib"] for p in preps.values()), default=None),
            "lora_params": sorted({r["lora_params_effective"] for r in rr}),
        })
    return out


# ---------------------------------------------------------------------------------------------------
# Markdown, plot, the docs section
# ---------------------------------------------------------------------------------------------------
def _pm(ci: Optional[Dict[str, Any]], digits: int = 2) -> str:
    if ci is None:
        return "-"
    return f"{ci['mean']:.{digits}f}" + ("" if ci["sd"] is None else f" ± {ci['sd']:.{digits}f}")


def _diff(ci: Optional[Dict[str, Any]]) -> str:
    if ci is None:
        return ""
    if ci["lo"] is None:
        return f"{ci['mean']:+.2f} (n = 1)"
    return f"{ci['mean']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}] {verdict(ci)}"


def _verdict_cells(summary: Dict[str, Any]) -> Dict[tuple, Dict[str, Any]]:
    """Every comparison with uniform, by (task or "average", budget, method): the paired difference and,
    for the ones with an interval (n >= 2), whether they hold under Holm's correction over all of them
    (the family is every comparison with an interval: each task and budget, and the averages)."""
    cell = {(r["task"], r["budget"], r["method"]): {"diff": r["diff"]} for r in summary["rows"] if r.get("diff")}
    cell.update({("average", r["budget"], r["method"]): {"diff": r["diff"]} for r in summary["average"]
                 if r.get("diff")})
    tested = [k for k, c in cell.items() if c["diff"]["p"] is not None]
    for k, keep in zip(tested, holm([cell[k]["diff"]["p"] for k in tested])):
        cell[k]["holm"] = keep
    return cell


def verdict_markdown(summary: Dict[str, Any]) -> List[str]:
    """The answer at a glance: one row per method other than uniform, one column per (task, budget) and
    the average over tasks per budget; a cell is the paired difference from uniform (points) and its
    verdict. Each interval is a 95 % interval of its own comparison; a win or loss that also holds under
    Holm's correction over the whole table is starred (with 5 methods x 8 columns, about 2 of 40
    uncorrected "wins"/"losses" are expected by chance alone)."""
    cols = [(t, b) for b in summary["budgets"] for t in summary["tasks"]]
    cols += [("average", b) for b in summary["budgets"]]
    cell = summary["verdicts"]
    methods = [m for m in dict.fromkeys(r["method"] for r in summary["rows"]) if m not in ("uniform", "head")]
    if not methods:
        return []

    def one(c: Optional[Dict[str, Any]]) -> str:
        if c is None:
            return "-"
        ci = c["diff"]
        if ci["lo"] is None:
            return f"{ci['mean']:+.2f} (n = {ci['n']})"
        v = verdict(ci)
        return f"{ci['mean']:+.2f} (n = {ci['n']}) {v}" + ("*" if c.get("holm") and v != "tie" else "")

    lines = ["", "### Verdicts: difference from uniform LoRA in points (paired by seed; verdict from the 95 % "
             "interval of each comparison; * it also holds with Holm's correction over every comparison of the "
             "table)", "",
             "| method | " + " | ".join(f"{t} {b}" for t, b in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(one(cell.get((t, b, m))) for t, b in cols) + " |")
    return lines


def _same_ranks(recs: List[Dict[str, Any]]) -> List[str]:
    """Where two GeLoRA variants trained the same ranks on a task and budget (they differ only in their
    ranks, so the same seeds then make the same runs: their differences from uniform are one measurement,
    not two). ``recs``: the main records."""
    ranks: Dict[tuple, set] = {}
    for r in recs:
        if r["method"].startswith("gelora") and r.get("ranks"):
            ranks.setdefault((r["task"], r["budget"], r["method"]), set()).add(tuple(sorted(r["ranks"].items())))
    alike: Dict[tuple, List[str]] = {}  # (task, budget, the one set of ranks) -> methods, in METHODS order
    for (t, b, m), rk in sorted(ranks.items(), key=lambda kv: list(METHODS).index(kv[0][2])):
        if len(rk) == 1:
            alike.setdefault((t, b, next(iter(rk))), []).append(m)
    return [f"`{m}` trained the same ranks as `{ms[0]}` on {t} {b}" for (t, b, _), ms in alike.items() for m in ms[1:]]


def words_markdown(summary: Dict[str, Any]) -> List[str]:
    """The verdicts in words, per method: wins, ties and losses over the tasks and budgets with an interval,
    which of them hold under Holm's correction, and how far the ties' intervals reach."""
    cell = summary["verdicts"]
    methods = [m for m in dict.fromkeys(r["method"] for r in summary["rows"]) if m not in ("uniform", "head")]
    lines = []
    for m in methods:
        done = {k: c for k, c in cell.items() if k[2] == m and k[0] != "average" and c["diff"]["lo"] is not None}
        if not done:
            continue
        by = {v: [k for k, c in done.items() if verdict(c["diff"]) == v] for v in ("win", "tie", "loss")}
        text = f"- `{m}`: {len(by['win'])} win(s), {len(by['tie'])} tie(s), {len(by['loss'])} loss(es) in " \
               f"{len(done)} task/budget comparison(s) with 2+ seeds"
        named = []
        for v in ("win", "loss"):
            for k in by[v]:
                d = done[k]["diff"]
                named.append(f"{v} on {k[0]} {k[1]}: {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
                             + (", holds under Holm" if done[k].get("holm") else ", not under Holm"))
        named += [f"no verdict on {k[0]} {k[1]} (a NaN metric)" for k, c in done.items()
                  if verdict(c["diff"]) == "undefined"]
        named += [f"no verdict on {k[0]} {k[1]}: the same difference on every seed, no spread to test"
                  for k, c in done.items() if verdict(c["diff"]) == "no spread"]
        if named:
            text += " (" + "; ".join(named) + ")"
        if by["tie"]:
            lo = min(done[k]["diff"]["lo"] for k in by["tie"])
            hi = max(done[k]["diff"]["hi"] for k in by["tie"])
            text += f"; the ties' intervals lie within [{lo:+.2f}, {hi:+.2f}] points"
        avg = [(k[1], c["diff"]) for k, c in cell.items() if k[0] == "average" and k[2] == m and c["diff"]["lo"] is not None]
        if avg:
            text += "; average over tasks: " + ", ".join(
                f"{b} {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {verdict(d)}" for b, d in avg)
        lines.append(text + ".")
    same = summary["same_ranks"]
    if not lines and not same:
        return []
    if not lines:
        lines.append("- No comparison has 2 seeds yet.")
    if same:
        lines.append("- " + "; ".join(same) + ": with the same seeds these are the same runs (a finished run is "
                     "not repeated: its copy names it in `same_as`).")
    return ["", "### In words (from the table above, for the comparisons with 2 or more seeds)", ""] + lines


def pilot_rows(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per finished pilot cell (validation only), by task and learning rate: the steps it ran,
    the highest value of its smoothed validation curve (the decision's smoothing) and the checkpoint
    where it is, the last checkpoint's value and the cell's wall time."""
    out = []
    for r in records:
        if r.get("phase") != "pilot" or not r.get("curve"):
            continue
        metric = get_task(r["task"]).primary
        vals = [c[metric] for c in r["curve"]]
        sm = smooth(vals)
        best = max(range(len(sm)), key=lambda i: sm[i] if sm[i] == sm[i] else -math.inf)
        out.append({"task": r["task"], "lr": r["lr"], "steps": r["steps"], "metric": metric, "peak": sm[best],
                    "peak_step": r["curve"][best]["step"], "last": vals[-1], "wall_s": r.get("wall_s")})
    return sorted(out, key=lambda p: (p["task"], p["lr"]))


def pilot_markdown(rows: List[Dict[str, Any]]) -> List[str]:
    """The pilot's table (empty without pilot cells)."""
    if not rows:
        return []
    lines = ["", "### Pilot (uniform LoRA r8, seed 0, validation split only)", "",
             "| task | lr | steps | highest smoothed val (at step) | val at the last step | wall s |",
             "|---|---|---|---|---|---|"]
    for p in rows:
        wall = "-" if p["wall_s"] is None else f"{p['wall_s']:.0f}"
        lines.append(f"| {p['task']} | {p['lr']:g} | {p['steps']} | {p['metric']} {p['peak']:.4f} "
                     f"({p['peak_step']}) | {p['last']:.4f} | {wall} |")
    return lines


def _decision_lines(decisions: Dict[str, Any]) -> List[str]:
    return [f"- `{t}`: lr {d['lr']:g}, {d['steps']} steps ({d['rule']})" if d else
            f"- `{t}`: pilot not complete" for t, d in decisions.items()]


def progress_markdown(records: List[Dict[str, Any]], decisions: Dict[str, Any]) -> str:
    """The section while no main cell is finished: what the pilot has so far."""
    rows = pilot_rows(records)
    lines = [f"No main cell finished yet; {len(rows)} pilot cell(s) finished. The learning rate and steps "
             "per task, once its pilot is complete:", ""]
    return "\n".join(lines + _decision_lines(decisions) + pilot_markdown(rows))


def markdown(summary: Dict[str, Any], decisions: Dict[str, Any], png: Optional[str],
             pilot: Sequence[Dict[str, Any]] = ()) -> str:
    """The docs section: averages, per task and budget, costs (partial results say so)."""
    lines = []
    seeds_all = sorted({s for r in summary["rows"] for s in r["seeds"]})
    lines.append(f"{summary['n_records']} finished main cells; seeds present: {seeds_all}. `n` is the number of "
                 "seeds of each row. Differences are paired by seed, in points, with the 95 % t interval "
                 "over the seeds; *win*/*loss*: the interval lies above/below 0, *tie*: it holds 0, *no spread*: "
                 "every seed gave the same difference (the metrics are discrete), which makes no interval.")
    lines.append("")
    lines += _decision_lines(decisions)
    lines += verdict_markdown(summary)
    lines += words_markdown(summary)
    over = ", ".join(summary["tasks"])
    lines += ["", f"### Average over tasks (GLUE-style: accuracy % and 100 x Pearson, seeds with every task; "
              f"{len(summary['tasks'])} task(s) with main cells so far: {over})", "",
              "| budget | method | n | score | vs uniform [95% CI] |", "|---|---|---|---|---|"]
    for r in summary["average"]:
        lines.append(f"| {r['budget']} | {r['method']} | {len(r['seeds'])} | {_pm(r['score'])} | "
                     f"{_diff(r.get('diff'))} |")
    for b in summary["budgets"]:
        for t in summary["tasks"]:
            task = get_task(t)
            rows = [r for r in summary["rows"] if r["task"] == t and r["budget"] == b]
            if not rows:
                continue
            names = [f"test {m}" for m in task.metrics]
            lines += ["", f"### {t}, budget {b}", "",
                      "| method | n | " + " | ".join(names) + f" | val {task.primary} | "
                      f"vs uniform ({task.primary}) [95% CI] |",
                      "|---|---|" + "---|" * (len(names) + 2)]
            for r in rows:
                lines.append(f"| {r['method']} | {len(r['seeds'])} | "
                             + " | ".join(_pm(r[m], 3 if m == "rmse" else 2) for m in task.metrics)
                             + f" | {_pm(r['val'])} | {_diff(r.get('diff'))} |")
    lines += ["", "### Cost per method (all cells)", "",
              "| method | cells | LoRA params | prep s | alloc s | s/step (median; by cells at once) | train s | "
              "peak RSS MiB train / prep |",
              "|---|---|---|---|---|---|---|---|"]
    for c in summary["cost"]:
        rss_p = "-" if c["prep_peak_rss_mib"] is None else f"{c['prep_peak_rss_mib']:.0f}"
        by_w = "; ".join(f"{w}: {v:.3f}" for w, v in c["step_s_by_workers"].items())
        copies = f" (+{c['copies']} copies)" if c.get("copies") else ""
        lines.append(f"| {c['method']} | {c['cells']}{copies} | {', '.join(f'{p:,}' for p in c['lora_params'])} | "
                     f"{c['prep_s']:.1f} | {c['alloc_s']:.2f} | {c['step_s']:.3f} ({by_w}) | {c['train_s']:.0f} | "
                     f"{c['peak_rss_mib']:.0f} / {rss_p} |")
    lines += pilot_markdown(list(pilot))
    if png:
        lines += ["", f"![paired differences from uniform LoRA]({png})"]
    return "\n".join(lines)


def plot(summary: Dict[str, Any], path: Path) -> Optional[str]:
    """Per budget (rows) and task (+ the average, columns): each method's paired difference from uniform
    with its 95 % interval. Returns None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc}"
    cols = summary["tasks"] + ["average"]
    budgets = summary["budgets"] or ["-"]
    fig, axes = plt.subplots(len(budgets), len(cols), figsize=(3.4 * len(cols), 0.6 + 2.4 * len(budgets)),
                             squeeze=False, sharey=True)
    methods = [m for m in METHODS if m != "uniform"]
    for i, b in enumerate(budgets):
        for j, t in enumerate(cols):
            ax = axes[i][j]
            rows = (summary["average"] if t == "average" else summary["rows"])
            for k, m in enumerate(methods):
                r = next((r for r in rows if r["budget"] == b and r["method"] == m and r.get("task", t) == t), None)
                d = r.get("diff") if r else None
                if d is None:
                    continue
                lo, hi = (d["lo"], d["hi"]) if d["lo"] is not None else (d["mean"], d["mean"])
                ax.errorbar([d["mean"]], [k], xerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o", capsize=3,
                            color=f"C{k}")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(methods, fontsize=8)
            ax.set_title(f"{t}, {b}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(budgets) - 1:
                ax.set_xlabel("vs uniform (points), 95% CI", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_section(doc: Path, text: str) -> None:
    """Put ``text`` between the suite's markers in ``doc`` (appended under a heading the first time)."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## Multi-task suite: results\n\n" + block + "\n"
    doc.write_text(new, encoding="utf-8")


def report(records: List[Dict[str, Any]], decisions: Dict[str, Any], *, doc: Optional[Path],
           png: Optional[Path], log=print) -> Dict[str, Any]:
    """Summarise ``records``; write the plot and the docs section when paths are given; log the markdown."""
    summary = summarize(records)
    if not summary["rows"]:
        text = progress_markdown(records, decisions)
        if doc is not None:
            write_section(doc, text)
        log(text)
        summary["plot"] = "no plot: no finished main cells yet"
        return summary
    err = plot(summary, png) if png else "no plot asked"
    rel = None
    if png and not err:  # the page links the plot beside it by its name
        rel = png.name if doc is not None and png.parent.resolve() == doc.parent.resolve() else str(png)
    text = markdown(summary, decisions, rel, pilot_rows(records))
    if doc is not None:
        write_section(doc, text)
    log(text)
    summary["plot"] = err or str(png)
    return summary
