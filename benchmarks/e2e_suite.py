"""Question: at the same number of trainable LoRA parameters, does GeLoRA fine-tune better than uniform
LoRA, PEFT's EVA and AdaLoRA, across tasks of different kinds, with intervals over 5 seeds?

Tasks (benchmarks/e2e/tasks.py): SNLI pairs (3 classes), VADER movie sentences (binary), VADER ratings
of all four sentence sets (regression). Budgets: the LoRA parameters of uniform rank 2 and 8 on
q/k/v/o of every block of all-MiniLM-L6-v2. Methods (benchmarks/e2e/methods.py): head only, uniform,
gelora, gelora_paired, gelora_pm, eva, adalora. The runner (benchmarks/e2e/runner.py) first pilots the
learning rate and the steps on uniform LoRA and the validation split, then runs every (task, budget,
method, seed) cell, seed-major, appending one JSON line per finished cell to
benchmarks/results/e2e_suite.jsonl; a rerun skips the finished cells, so the suite runs in pieces.

    python benchmarks/e2e_suite.py --fetch        # fetch and extract the corpora once (pip, into the cache)
    python benchmarks/e2e_suite.py --dry-run      # the cells, their status, a measured estimate of the time
    python benchmarks/e2e_suite.py                # run (or resume) the suite at 1 thread
    python benchmarks/e2e_suite.py --max-hours 8  # ... and start no cell after 8 hours
    python benchmarks/e2e_suite.py --finish-within 2.5  # ... only cells expected to end within 2.5 h
    python benchmarks/e2e_suite.py --workers 2    # two cells at once (each its own process, 1 thread)
    python benchmarks/e2e_suite.py --report       # docs/e2e_results.md section + docs/e2e_suite.png
    python benchmarks/e2e_suite.py --quick        # smoke run: every task and method, a few steps (< 1 min)
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0 if p == str(HERE) else 1, p)

from e2e import runner  # noqa: E402

QUICK_RESULTS = HERE / "results" / "e2e_suite_quick.jsonl"


def _per_task(spec: Optional[str], cast) -> Dict[str, Any]:
    """``task=value,task=value`` (or one bare value for every task: key ``*``)."""
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        k, sep, v = item.partition("=")
        out[k.strip() if sep else "*"] = cast(v if sep else k)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the cells and estimate the time; run nothing")
    mode.add_argument("--report", action="store_true", help="write the report from the results file")
    mode.add_argument("--fetch", action="store_true", help="fetch and extract the corpora into the cache")
    p.add_argument("--quick", action="store_true", help="smoke run (results: benchmarks/results/e2e_suite_quick.jsonl)")
    p.add_argument("--tasks", help="comma list (default: all)")
    p.add_argument("--budgets", help="comma list of rN (default r2,r8)")
    p.add_argument("--methods", help="comma list (default: all)")
    p.add_argument("--seeds", help="comma list (default 0,1,2,3,4)")
    p.add_argument("--lr", help="task=LR,... (skips the pilot's choice for those tasks)")
    p.add_argument("--steps", help="task=N,... (with --lr for the same task: no pilot for it)")
    p.add_argument("--threads", type=int, help="torch threads per cell (default 1)")
    p.add_argument("--workers", type=int, help="cells at once, each its own process (default 1; at most the "
                                               "free cores / threads)")
    p.add_argument("--limit", type=int, help="a seeded subset of this many examples per task")
    p.add_argument("--results", help="results file (JSON lines)")
    p.add_argument("--cache", help="corpus cache folder (default $GELORA_CACHE or ~/.cache/gelora)")
    p.add_argument("--no-download", action="store_true", help="fail instead of fetching a corpus")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", default=None,
                     help="run the cells in this process (default with --quick)")
    iso.add_argument("--isolate", dest="isolate", action="store_true",
                     help="one fresh process per cell (default: its peak RSS is its own)")
    p.add_argument("--max-hours", type=float, help="start no cell after this many hours (running ones finish)")
    p.add_argument("--finish-within", type=float, metavar="H",
                   help="start only cells expected to finish within H hours of the start (from the finished "
                        "cells' seconds per step, +10 %%); a longer one is passed over for a shorter one")
    p.add_argument("--allow-version-change", action="store_true",
                   help="run although torch, transformers or PEFT is not a release the finished cells ran with "
                        "(by default the run stops and names the pip pins of the recorded ones)")
    p.add_argument("--step-s", type=float, help="--dry-run: assume this step time instead of measuring")
    p.add_argument("--doc", default=str(ROOT / "docs" / "e2e_results.md"), help="--report: the page to update")
    p.add_argument("--png", default=str(ROOT / "docs" / "e2e_suite.png"), help="--report: the plot")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--job-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> runner.SuiteConfig:
    kw: Dict[str, Any] = dict(runner.QUICK) if a.quick else {}
    tasks = tuple(x.strip() for x in a.tasks.split(",")) if a.tasks else tuple(runner.TASKS)
    for name, cast in (("tasks", str), ("budgets", str), ("methods", str), ("seeds", int)):
        v = getattr(a, name)
        if v:
            kw[name] = tuple(cast(x.strip()) for x in v.split(",") if x.strip())
    for name, cast in (("lr", float), ("steps", int)):
        d = _per_task(getattr(a, name), cast)
        if "*" in d:
            d = {t: d["*"] for t in tasks}
        if d:
            kw[name] = d
    for name in ("threads", "workers", "limit", "cache"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    kw["results"] = a.results or str(QUICK_RESULTS if a.quick else runner.DEFAULT_RESULTS)
    if a.no_download:
        kw["download"] = False
    if a.isolate is not None:
        kw["isolate"] = a.isolate
    return runner.SuiteConfig(**kw)


def _job_main(a: argparse.Namespace) -> int:
    try:
        res = runner.run_job(json.loads(Path(a.job).read_text()))
    except Exception:  # noqa: BLE001 - the parent shows the child's traceback
        traceback.print_exc()
        return 1
    Path(a.job_out).write_text(json.dumps(res, default=str))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    if a.job:
        return _job_main(a)
    from gelora.data import DataUnavailable

    try:
        cfg = config_from_args(a)
    except ValueError as exc:
        print(f"e2e_suite: {exc}", file=sys.stderr)
        return 2
    try:
        if a.fetch:
            from e2e.sources import fetch_all

            print(fetch_all(cfg.cache))
        elif a.dry_run:
            from e2e.estimate import dry_run

            dry_run(cfg, step_s=a.step_s)
        elif a.report:
            from e2e.report import report

            recs = runner.read_jsonl(Path(cfg.results))
            decisions = {t: runner.decide(cfg, t, recs) for t in cfg.tasks}
            report(recs, decisions, doc=Path(a.doc) if a.doc else None, png=Path(a.png) if a.png else None)
        else:
            runner.install_sigterm()
            out = runner.run_suite(cfg, max_hours=a.max_hours, finish_within=a.finish_within,
                                   allow_version_change=a.allow_version_change)
            print(f"{out['ran']} cells run, {out['skipped']} already done, {out['wall_s']:.0f} s"
                  + ("; stopped at the time limit, cells left" if out["stopped_early"] else ""))
    except DataUnavailable as exc:
        print(f"e2e_suite: a corpus is not available: {exc}", file=sys.stderr)
        return 1
    except runner.VersionMismatch as exc:
        print(f"e2e_suite: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "another run holds" not in str(exc):
            raise
        print(f"e2e_suite: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e2e_suite: interrupted; the finished cells are in the results file, a rerun resumes",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
