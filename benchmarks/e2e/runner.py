"""The resumable runner: cells in seed-major order, one JSON line per finished cell, reruns skip them.

Phases, in order:

1. **pilot** (per task): uniform LoRA at ``pilot_budget`` (r8), seed 0, one cell per learning rate of
   ``pilot_lrs``, ``pilot_steps[task]`` steps, the validation metric every ``pilot_eval_every`` steps.
2. **decision** (per task, from the pilot's validation curves only; see :func:`decide`): the learning
   rate is the one whose smoothed curve peaks highest; the steps are the first checkpoint where that
   curve comes within ``tol`` of its peak (rounded up to 50). ``--lr``/``--steps`` override it.
3. **main**: for seed in seeds: for task: head, then for budget: for method. A partial run therefore
   already compares every method on the seeds it has.

With ``workers`` > 1, that many cells run at once (each in its own process with ``threads`` threads), taken
in the same order, except that a task's main cells may start while another task's pilot still runs (a
worker never waits for a pilot that is not its task's). Records are appended as cells finish.

Each cell gets a key (phase, task, budget, method, seed, learning rate, and a hash of every setting that
changes its result); a rerun skips every cell whose key is in the results file. The preparation units
(ID profiles, EVA's SVD) are kept in a second file (``<results>_preps.jsonl``, EVA states in
``<results>_eva/``) and reused the same way. A lock file stops two runners on one results file.

A main cell whose method would train exactly the model of an earlier method's cell (two rank-built methods,
:data:`~e2e.methods.RANK_BUILT`, that allocated the same ranks; same task, budget, seed and setting) is not
trained again: once that *twin* is finished, the cell's record is a copy of its results with ``same_as``
naming the twin (a cell runs deterministically on the CPU: the twin's losses are reproduced bit for bit).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .methods import METHODS, RANK_BUILT, budget_rank, get_method
from .tasks import TASKS, get_task

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
DEFAULT_RESULTS = BENCH / "results" / "e2e_suite.jsonl"


@dataclass
class SuiteConfig:
    """Everything the cells depend on; checked on construction."""

    tasks: Tuple[str, ...] = tuple(TASKS)
    budgets: Tuple[str, ...] = ("r2", "r8")
    methods: Tuple[str, ...] = tuple(METHODS)
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    batch_size: int = 16
    max_length: int = 64
    eval_batch_size: int = 64
    warmup: float = 0.06
    clip: float = 1.0
    lr: Dict[str, float] = field(default_factory=dict)  # per task: skips the pilot's choice
    steps: Dict[str, int] = field(default_factory=dict)
    pilot_lrs: Tuple[float, ...] = (5e-4, 1e-3, 2e-3, 4e-3)
    pilot_budget: str = "r8"
    pilot_steps: Dict[str, int] = field(default_factory=lambda: {"snli": 2000, "vader_movie": 1200,
                                                                 "vader_ratings": 1500})
    pilot_eval_every: int = 100
    tol: Dict[str, float] = field(default_factory=lambda: {"acc": 0.005, "pearson": 0.005})
    profile_texts: int = 1000
    max_tokens: int = 10_000
    paired_bootstrap: int = 1000
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    split_seed: int = 0
    limit: Optional[int] = None
    threads: int = 1
    workers: int = 1  # cells at once (not part of any cell's setting)
    isolate: bool = True
    cache: Optional[str] = None
    download: bool = True
    results: str = str(DEFAULT_RESULTS)
    quick: bool = False

    def __post_init__(self) -> None:
        for name, known in (("tasks", TASKS), ("methods", METHODS)):
            vals = tuple(getattr(self, name))
            setattr(self, name, vals)
            bad = [v for v in vals if v not in known]
            if bad or not vals or len(set(vals)) != len(vals):
                raise ValueError(f"{name} must be distinct names out of {list(known)}, got {list(vals)}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for b in (*self.budgets, self.pilot_budget):
            budget_rank(b)
        for name in ("batch_size", "max_length", "eval_batch_size", "pilot_eval_every", "profile_texts",
                     "threads", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.pilot_lrs or any(not (x > 0) for x in (*self.pilot_lrs, *self.lr.values())):
            raise ValueError("learning rates must be > 0")
        missing = [t for t in self.tasks if t not in self.pilot_steps and t not in self.steps]
        if missing or any(v < 1 for v in (*self.steps.values(), *self.pilot_steps.values())):
            raise ValueError(f"every task needs positive pilot steps or --steps; missing: {missing}")
        if not (0 <= self.warmup < 1) or not (self.clip > 0):
            raise ValueError("need 0 <= warmup < 1 and clip > 0")
        if self.workers > 1 and not self.isolate:
            raise ValueError("workers > 1 needs isolated cells (one process per cell)")

    def opts(self) -> Dict[str, Any]:
        """What a cell's process needs (JSON-ready)."""
        keys = ("batch_size", "max_length", "eval_batch_size", "warmup", "clip", "split_seed", "limit",
                "cache", "download", "max_tokens", "paired_bootstrap", "eva_rho", "eva_tau", "profile_texts")
        return {**{k: getattr(self, k) for k in keys}, "profile_seed": self.split_seed}


#: smoke run: every task, method and code path on a few dozen examples (not a measurement of anything).
QUICK = dict(budgets=("r2",), seeds=(0,), batch_size=4, max_length=24, eval_batch_size=32, limit=36,
             pilot_lrs=(1e-3, 3e-3), pilot_steps={"snli": 2, "vader_movie": 2, "vader_ratings": 2},
             pilot_eval_every=1, profile_texts=24, max_tokens=300, paired_bootstrap=50, eva_tau=0.9,
             isolate=False, quick=True)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prep_setting(cfg: SuiteConfig, task: str) -> str:
    o = cfg.opts()
    return _hash([task, o["split_seed"], o["limit"], o["max_length"], o["profile_texts"], o["max_tokens"],
                  o["paired_bootstrap"], o["eva_rho"], o["eva_tau"]])


def train_setting(cfg: SuiteConfig, task: str, steps: int, lr: float) -> str:
    o = cfg.opts()
    return _hash([prep_setting(cfg, task), steps, lr, o["batch_size"], o["warmup"], o["clip"]])


@dataclass(frozen=True)
class Cell:
    phase: str  # "pilot" | "main"
    task: str
    budget: Optional[str]  # None: head only
    method: str
    seed: int
    lr: float
    steps: int
    setting: str

    @property
    def key(self) -> str:
        return f"{self.phase}|{self.task}|{self.budget or '-'}|{self.method}|{self.seed}|{self.lr:g}|{self.setting}"


def pilot_cells(cfg: SuiteConfig) -> List[Cell]:
    out = []
    for t in cfg.tasks:
        if t in cfg.lr and t in cfg.steps:
            continue
        for lr in cfg.pilot_lrs:
            steps = cfg.pilot_steps[t]
            out.append(Cell("pilot", t, cfg.pilot_budget, "uniform", 0, lr, steps,
                            _hash([train_setting(cfg, t, steps, lr), cfg.pilot_eval_every])))
    return out


def main_cells(cfg: SuiteConfig, decisions: Dict[str, Dict[str, Any]]) -> List[Cell]:
    """Seed-major: every task, budget and method of seed 0, then seed 1, ... (tasks without a
    decision yet are left out)."""
    out = []
    for seed in cfg.seeds:
        for t in cfg.tasks:
            d = decisions.get(t)
            if d is None:
                continue
            s = train_setting(cfg, t, d["steps"], d["lr"])
            if "head" in cfg.methods:
                out.append(Cell("main", t, None, "head", seed, d["lr"], d["steps"], s))
            for b in cfg.budgets:
                out += [Cell("main", t, b, m, seed, d["lr"], d["steps"], s) for m in cfg.methods if m != "head"]
    return out


# ---------------------------------------------------------------------------------------------------
# The pilot's decision
# ---------------------------------------------------------------------------------------------------
def smooth(values: List[float]) -> List[float]:
    """Centred moving average over 3 checkpoints (2 at the ends)."""
    return [sum(values[max(0, i - 1):i + 2]) / len(values[max(0, i - 1):i + 2]) for i in range(len(values))]


def decide(cfg: SuiteConfig, task: str, records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Learning rate and steps of ``task`` from its pilot records (None until every pilot cell is in).

    Rule, on the validation metric only: smooth each curve (3 checkpoints); the learning rate is the one
    whose smoothed curve peaks highest (a diverged, NaN curve never wins); the steps are the first
    checkpoint at which that smoothed curve is within ``tol`` of its peak, at least two checkpoints,
    rounded up to a multiple of 50.
    """
    if task in cfg.lr and task in cfg.steps:
        return {"lr": cfg.lr[task], "steps": cfg.steps[task], "rule": "given"}
    want = {c.key for c in pilot_cells(cfg) if c.task == task}
    got = [r for r in records if r.get("key") in want]
    if len({r["key"] for r in got}) < len(want):
        return None
    metric = get_task(task).primary
    best = None
    table = []
    for r in sorted(got, key=lambda r: r["lr"]):
        sm = smooth([c[metric] for c in r["curve"]])
        peak = max((v for v in sm if v == v), default=float("-inf"))
        table.append({"lr": r["lr"], "peak": peak, "curve": [c[metric] for c in r["curve"]]})
        if best is None or peak > best[0]:
            best = (peak, r, sm)
    peak, rec, sm = best
    if not math.isfinite(peak):
        raise RuntimeError(f"{task}: every pilot curve diverged (no finite validation {metric}); "
                           "pick smaller --pilot learning rates or give --lr and --steps")
    tol = cfg.tol.get(metric, 0.005)
    first = next(i for i, v in enumerate(sm) if v >= peak - tol)
    steps = rec["curve"][first]["step"]
    # never fewer than two checkpoints (and 3 steps: AdaLoRA needs a budgeting phase)
    steps = max(steps, 2 * cfg.pilot_eval_every, 3)
    steps = steps if cfg.quick else min(rec["steps"], -(-steps // 50) * 50)
    out = {"lr": cfg.lr.get(task, rec["lr"]), "steps": cfg.steps.get(task, steps), "rule": "pilot",
           "metric": metric, "peak": peak, "tol": tol, "pilot": table}
    return out


# ---------------------------------------------------------------------------------------------------
# The results files
# ---------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Every complete JSON line of ``path`` (a line cut by an interruption is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: Path, rec: Dict[str, Any]) -> None:
    """One line, flushed and synced, so a finished cell survives an interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(rec, default=str, separators=(",", ":"))
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # an earlier interrupted write may have left a partial line
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def git_commit() -> Dict[str, Any]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # the results folder is the run's own output (its files are committed): appending to it is not a change
    dirty = [ln for ln in git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)benchmarks/results").splitlines()]
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(dirty)}


class Lock:
    """An exclusive lock on ``<results>.lock`` (a second runner on the same file fails at once)."""

    def __init__(self, results: Path) -> None:
        self.path = results.with_suffix(results.suffix + ".lock")

    def __enter__(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.f.close()
            raise RuntimeError(f"another run holds {self.path}; wait for it or stop it first") from exc
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


# ---------------------------------------------------------------------------------------------------
# Jobs: one preparation unit or one cell, in this process or in a fresh one
# ---------------------------------------------------------------------------------------------------
def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Run a ``prep`` or ``cell`` job here (threads set first); returns its result."""
    from e2e_quality import peak_rss_mib, reset_peak_rss, set_threads

    set_threads(job["threads"])
    if job["kind"] == "cell":
        from .train import run_cell

        return run_cell(job)
    from .methods import run_prep
    from .model import collate
    from .train import load_encoded

    reset_peak_rss()
    task, opts = get_task(job["task"]), job["opts"]
    enc = load_encoded(task, opts)["enc"]["train"][:opts["profile_texts"]]
    batches = [collate(enc[i:i + 16]) for i in range(0, len(enc), 16)]
    eva_path = Path(job["eva_path"]) if job.get("eva_path") else None
    budgets = [job["budget"]] if job["budget"] else job["budgets"]
    res = run_prep(job["unit"], budgets, task, batches, opts, eva_path)
    res.update(n_profile_texts=len(enc), peak_rss_mib=peak_rss_mib())
    return res


_CHILDREN: set = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _stop_children() -> None:
    """Kill every running cell process and start no new one (an interrupt reaches the main thread only;
    a worker between a preparation and its cell would otherwise start the cell after the kill)."""
    with _CHILDREN_LOCK:
        _STOPPING.set()
        for proc in list(_CHILDREN):
            if proc.poll() is None:
                proc.kill()


def _run_isolated(job: Dict[str, Any]) -> Dict[str, Any]:
    """``job`` in a fresh Python process (its peak RSS is its own); the child is stopped if we are."""
    with tempfile.TemporaryDirectory(prefix="e2e_suite_") as tmp:
        jin, jout = Path(tmp) / "job.json", Path(tmp) / "out.json"
        jin.write_text(json.dumps(job, default=str))
        n = str(job["threads"])
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        with _CHILDREN_LOCK:
            if _STOPPING.is_set():
                raise RuntimeError(f"{job['kind']} job {job.get('key')} not started: the run is stopping")
            proc = subprocess.Popen([sys.executable, str(BENCH / "e2e_suite.py"), "--job", str(jin), "--job-out",
                                     str(jout)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            _CHILDREN.add(proc)
        try:
            out, _ = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
        if proc.returncode != 0 or not jout.exists():
            raise RuntimeError(f"{job['kind']} job {job.get('key')} failed (exit {proc.returncode}):\n{out[-4000:]}")
        return json.loads(jout.read_text())


def _job(cfg: SuiteConfig, job: Dict[str, Any]) -> Dict[str, Any]:
    job = dict(job, threads=cfg.threads, opts=cfg.opts())
    t = time.perf_counter()
    res = _run_isolated(job) if cfg.isolate else run_job(json.loads(json.dumps(job, default=str)))
    res["wall_s"] = time.perf_counter() - t
    return res


#: the libraries whose release changes what a cell computes (PEFT's EVA and AdaLoRA, the model, the kernels)
VERSIONED = ("torch", "transformers", "peft")


class VersionMismatch(RuntimeError):
    """The environment's libraries are not the ones the results file's cells ran with."""


def version_mismatch(records: List[Dict[str, Any]], current: Dict[str, Any]) -> Optional[str]:
    """Why running cells here would compare methods across library releases: the versions of
    :data:`VERSIONED` in ``current`` that no record of the results file has (None when they agree, or
    when there are no records). The message names the pip pins that restore the recorded ones."""
    seen: Dict[str, Dict[str, int]] = {}
    for r in records:
        for k, v in (r.get("versions") or {}).items():
            if k in VERSIONED and v:
                counts = seen.setdefault(k, {})
                counts[v] = counts.get(v, 0) + 1
    off = {k: vs for k, vs in seen.items() if current.get(k) not in vs}
    if not off:
        return None
    recorded = ", ".join(f"{k} {' / '.join(sorted(vs))}" for k, vs in off.items())
    here = ", ".join(f"{k} {current.get(k)}" for k in off)
    pins = " ".join(f"'{k}=={max(vs, key=vs.get).split('+')[0]}'" for k, vs in off.items())
    return f"the finished cells ran with {recorded}, this environment has {here} (the recorded ones: pip install {pins})"


def _stamp(commit: Dict[str, Any]) -> Dict[str, Any]:
    from e2e_quality import versions

    v = versions()
    return {**commit, "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "versions": {k: v.get(k) for k in ("torch", "transformers", "peft", "gelora")}}


def preps_file(results: Path) -> Path:
    """The preparation units' records beside ``results``."""
    return results.with_name(results.stem + "_preps.jsonl")


@dataclass
class _Run:
    """What the cells of one run share: the files, the records so far and the locks that guard them."""

    cfg: SuiteConfig
    results: Path
    records: List[Dict[str, Any]]
    commit: Dict[str, Any]
    log: Any
    preps: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    lock: Any = field(default_factory=threading.Lock)  # records, preps, files, log
    prep_locks: Dict[str, Any] = field(default_factory=dict)

    @property
    def preps_path(self) -> Path:
        return preps_file(self.results)

    @property
    def eva_dir(self) -> Path:
        return self.results.with_name(self.results.stem + "_eva")

    def record(self, key: str) -> Optional[Dict[str, Any]]:
        """The finished record of ``key`` (None: not finished); the caller holds ``lock``."""
        return next((r for r in self.records if r["key"] == key), None)

    def prep_lock(self, key: str):
        with self.lock:
            return self.prep_locks.setdefault(key, threading.Lock())

    def append(self, path: Path, rec: Dict[str, Any], line: Optional[str] = None) -> None:
        with self.lock:
            append_jsonl(path, rec)
            if line:
                self.log(line)


def prep_key(cfg: SuiteConfig, task: str, unit: str, budget: Optional[str]) -> str:
    return f"{task}|{unit}|{budget or '-'}|{prep_setting(cfg, task)}"


def ensure_prep(run: _Run, task: str, unit: str, budget: Optional[str]) -> Dict[str, Any]:
    """The preparation unit's record (from the preps file, or run now and appended; once per key even
    when two cells ask for it at the same time). EVA's state is a file beside the preps file, found by name
    (the results folder may have moved to another machine); a unit whose file is missing is run again."""
    cfg = run.cfg
    key = prep_key(cfg, task, unit, budget)
    eva = run.eva_dir / f"{key.replace('|', '_')}.pt"
    with run.prep_lock(key):
        if key in run.preps and unit == "eva" and not eva.exists():
            run.log(f"prep  {task:13s} {unit:10s} {budget or '':3s} state {eva} is missing: running it again")
            with run.lock:
                del run.preps[key]
        if key not in run.preps:
            res = _job(cfg, {"kind": "prep", "key": key, "task": task, "unit": unit, "budget": budget,
                             "budgets": list(cfg.budgets), "eva_path": str(eva) if unit == "eva" else None})
            rec = {"key": key, "task": task, "unit": unit, "budget": budget, **_stamp(run.commit), **res}
            run.append(run.preps_path, rec, f"prep  {task:13s} {unit:10s} {budget or '':3s} "
                                            f"{res['prep_s']:7.1f} s  (wall {res['wall_s']:.1f} s)")
            with run.lock:
                run.preps[key] = rec
        return run.preps[key]


def _cell_job(cfg: SuiteConfig, cell: Cell, prep: Optional[Dict[str, Any]],
              eva_dir: Optional[Path] = None) -> Dict[str, Any]:
    alloc = None
    if prep is not None:
        alloc = dict(prep["allocations"][cell.method][cell.budget])
        if alloc.get("eva_state") and eva_dir is not None:  # the file of that name beside the preps file now
            alloc["eva_state"] = str(eva_dir / Path(alloc["eva_state"]).name)
    return {"kind": "cell", "key": cell.key, "phase": cell.phase, "task": cell.task, "budget": cell.budget,
            "method": cell.method, "seed": cell.seed, "lr": cell.lr, "steps": cell.steps, "alloc": alloc,
            "eval_every": cfg.pilot_eval_every}


def planned_ranks(cfg: SuiteConfig, preps: Dict[str, Dict[str, Any]], cell: Cell) -> Optional[Dict[str, int]]:
    """The ranks a main cell of a rank-built method will train, known before it runs: its preparation's
    allocation (once ``preps`` holds that unit), or rank N on every module for uniform (the modules of any
    allocation of the task at hand). None when not known or not rank-built."""
    if cell.phase != "main" or cell.method not in RANK_BUILT:
        return None
    if cell.method == "uniform":
        for name in RANK_BUILT[1:]:
            got = planned_ranks(cfg, preps, dataclasses.replace(cell, method=name))
            if got is not None:
                return {n: budget_rank(cell.budget) for n in got}
        return None
    prep = preps.get(prep_key(cfg, cell.task, get_method(cell.method).prep, None))
    alloc = prep["allocations"].get(cell.method, {}).get(cell.budget) if prep else None
    return dict(alloc["ranks"]) if alloc else None


def twin_of(cfg: SuiteConfig, preps: Dict[str, Dict[str, Any]], cell: Cell) -> Optional[Cell]:
    """The cell of the first earlier rank-built method (in :data:`RANK_BUILT` order, among
    ``cfg.methods``) that plans the same ranks as ``cell`` for its task, budget, seed and setting: it trains
    the same model on the same batches, so ``cell`` needs no run of its own. None when there is none or the
    ranks are not known yet."""
    mine = planned_ranks(cfg, preps, cell)
    if mine is None:
        return None
    for name in RANK_BUILT[:RANK_BUILT.index(cell.method)]:
        other = dataclasses.replace(cell, method=name)
        if name in cfg.methods and planned_ranks(cfg, preps, other) == mine:
            return other
    return None


#: what a copy takes from its twin's record (the rest is the cell's own: key, method, stamp; run_one adds the
#: costs of its own preparation)
_COPIED = ("val", "test", "ranks", "lora_params_trainable", "lora_params_effective", "head_params", "other_trainable",
           "ranks_start", "n_train", "loss_first", "loss_last", "losses_every10", "cost", "workers")


def copy_twin(run: _Run, cell: Cell, twin: Dict[str, Any]) -> Dict[str, Any]:
    """The record of ``cell`` as a copy of its finished twin's record (``same_as``: the twin's key; the
    training costs are the twin's; ``wall_s``: the seconds the copy took)."""
    t = time.perf_counter()
    if twin["ranks"] != planned_ranks(run.cfg, run.preps, cell):
        raise RuntimeError(f"{cell.key}: its twin {twin['key']} trained other ranks than it plans")
    rec = {**dataclasses.asdict(cell), "key": cell.key, "batch_size": run.cfg.batch_size, "threads": run.cfg.threads,
           **_stamp(run.commit), **json.loads(json.dumps({k: twin[k] for k in _COPIED if k in twin})),
           "same_as": twin["key"]}
    rec["wall_s"] = time.perf_counter() - t
    return rec


def run_one(run: _Run, cell: Cell) -> Dict[str, Any]:
    """Prepare (if needed), run (or copy from a finished twin) and append one cell; returns its record."""
    cfg = run.cfg
    unit = get_method(cell.method).prep
    prep = None
    if unit and cell.phase == "main":
        prep = ensure_prep(run, cell.task, unit, cell.budget if unit == "eva" else None)
    t = time.perf_counter()
    with run.lock:
        twin = twin_of(cfg, run.preps, cell)
        twin_rec = run.record(twin.key) if twin is not None else None
    if twin_rec is not None:
        rec = copy_twin(run, cell, twin_rec)
    else:
        res = _job(cfg, _cell_job(cfg, cell, prep, run.eva_dir))
        rec = {**dataclasses.asdict(cell), "key": cell.key, "batch_size": cfg.batch_size, "threads": cfg.threads,
               "workers": cfg.workers, **_stamp(run.commit), **res}
    if prep is not None:
        rec["cost"].update(prep_unit=prep["unit"], prep_s=prep["prep_s"], prep_peak_rss_mib=prep["peak_rss_mib"],
                           prep_alloc_s=prep["allocations"][cell.method][cell.budget]["alloc_s"])
    run.append(run.results, rec, f"{cell.phase:5s} {cell.task:13s} {cell.budget or '-':3s} {cell.method:13s} "
                                 f"seed {cell.seed} lr {cell.lr:g} {cell.steps} steps  "
                                 f"{time.perf_counter() - t:6.1f} s  {_describe(rec)}"
                                 + (f"  (copy of {twin.method}: the same ranks)" if twin_rec is not None else ""))
    with run.lock:
        run.records.append(rec)
    return rec


def _describe(rec: Dict[str, Any]) -> str:
    if rec["phase"] == "pilot":
        c = rec["curve"][-1] if rec["curve"] else {}
        return "val " + " ".join(f"{k} {v:.4f}" for k, v in c.items() if k != "step")
    return "val " + " ".join(f"{k} {v:.4f}" for k, v in rec["val"].items()) + " | test " + " ".join(
        f"{k} {v:.4f}" for k, v in rec["test"].items())


def expected_s(records: List[Dict[str, Any]], cell: Cell, workers: int) -> Optional[float]:
    """Expected wall seconds of ``cell``: its steps times the median seconds per step (wall, start-up
    and evaluation included) of the finished cells of its task, phase and kind (head only or LoRA), run
    with the same number of workers, then relaxing the phase, the workers and the task in that order;
    plus 10 %. A pilot cell evaluates every ``pilot_eval_every`` steps, so a main cell estimated from one
    comes out long, which errs on the safe side. Copies of twins do not count (they train nothing). None when
    nothing has finished yet."""
    done = [r for r in records if r.get("wall_s") and r.get("steps") and not r.get("same_as")]
    head = cell.method == "head"
    tiers = (
        lambda r: r["task"] == cell.task and r["phase"] == cell.phase and (r["method"] == "head") == head
        and r.get("workers", 1) == workers,
        lambda r: r["task"] == cell.task and (r["method"] == "head") == head and r.get("workers", 1) == workers,
        lambda r: r["task"] == cell.task and (r["method"] == "head") == head,
        lambda r: r["task"] == cell.task,
        lambda r: True,
    )
    for keep in tiers:
        rates = [r["wall_s"] / r["steps"] for r in done if keep(r)]
        if rates:
            return 1.1 * cell.steps * statistics.median(rates)
    return None


class _Order:
    """Which cell comes next: every pilot cell first, then the main cells, seed-major, of the tasks whose
    pilot is decided. A task's main cells become eligible the moment its last pilot cell is in, so a worker
    that would wait for another task's pilot runs main cells of the decided tasks instead; a newly decided
    task's cells then come before the later seeds of the others. A decision is logged when it appears."""

    def __init__(self, run: _Run):
        self.run, self.cfg = run, run.cfg
        self.taken: set = set()
        self.decisions: Dict[str, Optional[Dict[str, Any]]] = {}
        self.done_at_start = {r["key"] for r in run.records}

    def decide_all(self) -> Dict[str, Optional[Dict[str, Any]]]:
        with self.run.lock:
            records = list(self.run.records)
        for t in self.cfg.tasks:
            if self.decisions.get(t) is None:
                d = decide(self.cfg, t, records)  # RuntimeError when every pilot curve of t diverged
                if d is not None:
                    self.run.log(f"{t}: lr {d['lr']:g}, {d['steps']} steps ({d['rule']})")
                self.decisions[t] = d
        return self.decisions

    def cells(self) -> List[Cell]:
        """Every cell known now (the pilot, and the main cells of the decided tasks), in order."""
        return pilot_cells(self.cfg) + main_cells(self.cfg, self.decide_all())

    def twin_running(self, cell: Cell, done: set) -> bool:
        """Whether ``cell``'s twin (:func:`twin_of`) is taken and not finished: the cell waits for it, and
        is then a copy, instead of training the same model beside it."""
        with self.run.lock:
            twin = twin_of(self.cfg, self.run.preps, cell)
        return twin is not None and twin.key in self.taken and twin.key not in done

    def next(self, fits=None, take: bool = True) -> Optional[Cell]:
        """The first cell not done and not taken yet for which ``fits(cell)`` holds (None: none is
        eligible now), taken unless ``take`` is False. A cell that does not fit, or whose twin is
        running, is passed over for a later one."""
        with self.run.lock:
            done = {r["key"] for r in self.run.records}
        for c in self.cells():
            if (c.key not in done and c.key not in self.taken and not self.twin_running(c, done)
                    and (fits is None or fits(c))):
                if take:
                    self.taken.add(c.key)
                return c
        return None


def _run_cells(run: _Run, order: _Order, past_deadline, fits=None) -> Tuple[int, bool]:
    """Run the cells ``order`` gives, ``cfg.workers`` at a time; no new cell once ``past_deadline()``
    (checked after each finished cell), and only cells for which ``fits(cell)`` holds. A failed cell (or a
    pilot whose every curve diverged) stops new ones; the running ones finish (and are kept), then the
    error is raised. An interrupt kills the running cells' processes. Returns (cells run, stopped: a
    deadline left cells undone)."""
    ran, stop, errors = 0, False, []
    passed_over = False
    with ThreadPoolExecutor(max_workers=run.cfg.workers, thread_name_prefix="cell") as pool:
        live: set = set()
        try:
            while True:
                while not (stop or errors) and len(live) < run.cfg.workers:
                    try:
                        cell = order.next(fits)
                    except RuntimeError as exc:
                        errors.append(exc)
                        break
                    if cell is None:  # nothing eligible now (a pilot still runs, or nothing fits)
                        passed_over = passed_over or (fits is not None and order.next(take=False) is not None)
                        break
                    live.add(pool.submit(run_one, run, cell))
                if not live:
                    break
                finished, live = wait(live, return_when=FIRST_COMPLETED)
                for f in finished:
                    if f.exception() is not None:
                        errors.append(f.exception())
                    else:
                        ran += 1
                stop = stop or past_deadline()
        except BaseException:
            _stop_children()
            raise
    if errors:
        raise errors[0]
    return ran, stop or passed_over


def run_suite(cfg: SuiteConfig, *, log=print, max_hours: Optional[float] = None,
              finish_within: Optional[float] = None, allow_version_change: bool = False) -> Dict[str, Any]:
    """Run every pending cell in order (pilot, then main seed-major, see :class:`_Order`), ``cfg.workers``
    at a time; start no cell once ``max_hours`` have passed (the running ones finish), and, with
    ``finish_within``, only cells expected (:func:`expected_s`) to finish within that many hours of the
    start: a cell that would not is passed over for a shorter one that would. Returns counts of cells run
    and skipped and the decisions.

    Raises:
        VersionMismatch: torch, transformers or PEFT is not a release the finished cells ran with
            (unless ``allow_version_change``: then it is logged and the records show it).
    """
    results = Path(cfg.results)
    t0 = time.perf_counter()
    _STOPPING.clear()
    with Lock(results):
        records = read_jsonl(results)
        from e2e_quality import versions

        why = version_mismatch(records, versions())
        if why and not allow_version_change:
            raise VersionMismatch(f"{why}: new cells would be compared with them across releases; install the "
                                  "recorded ones, or pass --allow-version-change")
        if why:
            log(f"note: {why}; running anyway (--allow-version-change)")
        run = _Run(cfg, results, records, git_commit(), log)
        run.preps.update((r["key"], r) for r in read_jsonl(run.preps_path))
        if run.commit["dirty"]:
            log("note: the working tree has uncommitted changes; the records say so (dirty: true)")

        def past_deadline() -> bool:
            return max_hours is not None and time.perf_counter() - t0 > 3600 * max_hours

        def fits(cell: Cell) -> bool:
            with run.lock:
                twin = twin_of(cfg, run.preps, cell)
                copy = twin is not None and run.record(twin.key) is not None
                need = 0.0 if copy else expected_s(run.records, cell, cfg.workers)
            left = 3600 * finish_within - (time.perf_counter() - t0)
            return left > 0 and (need is None or need <= left)

        order = _Order(run)
        ran, stop = _run_cells(run, order, past_deadline, fits if finish_within is not None else None)
        skipped = sum(c.key in order.done_at_start for c in order.cells())
        for t, d in order.decide_all().items():
            if d is None:
                log(f"{t}: pilot incomplete")
    return {"ran": ran, "skipped": skipped, "decisions": dict(order.decisions), "stopped_early": stop,
            "wall_s": time.perf_counter() - t0}


def install_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C: the running cell's child is stopped, finished cells stay."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
