"""Question: does a second sample of the same data give the same LoRA ranks, and what does it cost to
know (and to make sure)?

Two disjoint samples of 1,000 VADER movie-review sentences (a seeded shuffle of all 10,605, then the
first and the second 1,000; the profile's sampler seed is the sample's index) are profiled with the
``gelora profile`` defaults (10,000 tokens per layer, MLE, paired bootstrap of 1,000 replicates over
sequences) on all-MiniLM-L6-v2 (6 blocks) and SmolLM2-135M (30 blocks). Ranks are allocated with the
budget ``r8`` (the parameters of uniform rank 8) on q/k/v/o, per block and per module, with

  gelora            the paper's rule, max(ceil(d_{i+1} - d_i), 0) + 1 (the default)
  gelora z=2        the same with the existing z option (growth beyond 2 unpaired standard errors)
  paired z=2        1 + max(delta - 2 * paired sd, 0), real-valued until the budget rounds (rule="paired")
  paired z=1, z=0   the same rule with a smaller margin (z=0: only the ceiling removed)
  paired z=2 token  rule="paired" with errors from a bootstrap over tokens instead of sequences

and the share of entries whose rank differs by more than 1 between the two samples is reported
(goal for the stable rule: <= 5% on both models). Also reported:

* calibration: for every block (module), the difference of its ID growth between the two samples
  divided by the two bootstrap errors combined; the root mean square of these z values is about 1 if
  the bootstrap errors are honest, above 1 if they claim too much (one value per unit: sequence, token);
* the cost: the bootstrap's seconds, plus the estimate path that keeps the ratios in row order
  (``twonn_rows`` against ``twonn`` on three layers of sample A, interleaved medians), plus the
  allocation's extra time, as a share of the profile's time without them (goal: <= 20%);
* the same rules on the censored MLE (``estimator="mle_censored"``, refitted from the same ratios, as
  ``profile_model(..., estimator="mle_censored")`` would give them), which drops the largest 10% of the
  ratios. Before the profiler kept one point per token context (``contexts="auto"``), near-duplicate
  copies of one state (the same prefix in two sentences, rounded apart) had ratios of up to 1e7 and
  made the MLE's IDs move between samples; ``--contexts none`` measures that behaviour again.

Threads: 1 (``--threads``), set before torch starts its pools. Rows go to
benchmarks/results/rank_stability.csv and a JSON with the ranks of both samples next to it.

    python benchmarks/rank_stability.py                       # both models, blocks and modules (~20 min)
    python benchmarks/rank_stability.py --models minilm --no-modules   # about 1 minute
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from _util import append_csv, format_table, interleaved_medians, machine_line, set_threads  # noqa: E402

TARGETS = {"minilm": ["query", "key", "value", "attention.output.dense"],
           "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"]}
RULES = [  # (label, allocate_ranks keywords, bootstrap unit of the errors)
    ("gelora", dict(rule="gelora"), "sequence"),
    ("gelora z=2", dict(rule="gelora", z=2.0), "sequence"),
    ("paired z=2", dict(rule="paired"), "sequence"),
    ("paired z=1", dict(rule="paired", z=1.0), "sequence"),
    ("paired z=0", dict(rule="paired", z=0.0), "sequence"),
    ("paired z=2 token", dict(rule="paired"), "token"),
]


def load(name: str):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from gelora.data import minilm_model_dir, smollm2_model_dir

    if name == "minilm":
        path = minilm_model_dir()
        label = "all-MiniLM-L6-v2"
    else:
        path = smollm2_model_dir()
        label = "SmolLM2-135M"
    return label, AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def disjoint_samples(n: int, seed: int):
    from gelora.data import vader_movie_sentences

    texts = vader_movie_sentences(None).texts
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [[texts[i] for i in order[k * n:(k + 1) * n]] for k in range(2)]


def compare(a, b):
    d = [abs(x - y) for x, y in zip(a.ranks, b.ranks)]
    return {"entries": len(d), "diff_gt1": sum(x > 1 for x in d), "share_gt1": sum(x > 1 for x in d) / len(d),
            "changed": sum(x > 0 for x in d), "max_diff": max(d),
            "bound_flips": sum(x != y for x, y in zip(a.gelora_bounds, b.gelora_bounds)),
            "noisy_a": len(a.noisy()), "noisy_b": len(b.noisy())}


def rms_z(a, b) -> float:
    z = [(x - y) / math.hypot(sx, sy) for x, y, sx, sy in zip(a.deltas, b.deltas, a.delta_stderr, b.delta_stderr)]
    return math.sqrt(sum(v * v for v in z) / len(z))


def with_unit(prof, unit: str):
    """The profile with its bootstrap redrawn over ``unit`` (the same ratios, seed and size)."""
    import dataclasses

    if prof.paired.unit == unit:
        return prof
    return dataclasses.replace(prof, paired=prof.paired.resampled(unit=unit))


def refit(prof, estimator: str):
    """The profile with every ID (layers and modules) refitted by ``estimator`` from the same ratios, and
    its bootstrap redrawn with it: what ``profile_model(..., estimator=estimator)`` gives, without a second
    forward pass and neighbour search (a ProfileResult copy)."""
    import dataclasses

    import torch

    from gelora.id.estimate import id_from_distances

    fit = {}
    for key, row in zip(prof.paired.keys, prof.paired.log_mu):
        v = row[torch.isfinite(row)]
        if key in prof.paired.fixed:
            fit[key] = (prof.paired.fixed[key], 0.0)
            continue
        r = id_from_distances(torch.stack([torch.ones_like(v), torch.exp(v)], 1), estimator=estimator)
        fit[key] = (r["id"], r["stderr"])
    n = len(prof.ids)
    mods = {k: dataclasses.replace(m, id_in=fit[m.in_key][0], stderr_in=fit[m.in_key][1], id_out=fit[m.out_key][0],
                                   stderr_out=fit[m.out_key][1]) for k, m in prof.modules.items()}
    pb = dataclasses.replace(prof.paired, estimator=estimator, replicates=None)
    t0 = time.perf_counter()
    pb.run()
    timings = {**prof.timings, "bootstrap": time.perf_counter() - t0}
    return dataclasses.replace(prof, ids=[fit[f"layer{i}"][0] for i in range(n)],
                               stderr=[fit[f"layer{i}"][1] for i in range(n)], modules=mods, paired=pb,
                               estimator=estimator, timings=timings)


def estimate_path_ratio(prof_samples, repeats: int):
    """Median seconds of twonn_rows / twonn on three layers (first, middle, last), interleaved."""
    from gelora.id.paired import twonn_rows
    from gelora.id.twonn import twonn

    xs = [prof_samples[i] for i in (0, len(prof_samples) // 2, len(prof_samples) - 1)]
    fns = {"twonn": lambda: [twonn(x) for x in xs], "twonn_rows": lambda: [twonn_rows(x) for x in xs]}
    t = interleaved_medians(fns, repeats=repeats)
    return t["twonn_rows"]["median"] / t["twonn"]["median"], t["twonn"]["median"], t["twonn_rows"]["median"]


def alloc_seconds(prof, per_module: bool, cost, repeats: int = 5) -> float:
    """Median extra seconds of an allocation with the bootstrap over one without it."""
    import dataclasses

    from gelora.ranks import allocate_ranks

    bare = dataclasses.replace(prof, paired=None)
    fns = {"with": lambda: allocate_ranks(prof, budget="r8", cost=cost, per_module=per_module),
           "without": lambda: allocate_ranks(bare, budget="r8", cost=cost, per_module=per_module)}
    t = interleaved_medians(fns, repeats=repeats)
    return max(0.0, t["with"]["median"] - t["without"]["median"])


def run_model(name: str, args, rows: list, cost_rows: list, calib_rows: list, ranks_out: dict) -> None:
    from gelora.peft_bridge import rank_costs
    from gelora.profiling.driver import profile_model
    from gelora.ranks import allocate_ranks

    label, model, tok = load(name)
    samples = disjoint_samples(args.n_texts, args.split_seed)
    targets = TARGETS[name]
    levels = [("block", False, rank_costs(model, targets))]
    if args.modules:
        levels.append(("module", True, rank_costs(model, targets, per_module=True)))
    for level, per_module, cost in levels:
        profs = []
        for k, texts in enumerate(samples):
            t0 = time.perf_counter()
            prof = profile_model(model, texts, tokenizer=tok, seed=k, max_tokens=args.max_tokens, batch_size=32,
                                 paired_bootstrap=args.n_boot, modules=targets if per_module else None,
                                 keep_samples=(k == 0), progress=False, contexts=args.contexts)
            wall = time.perf_counter() - t0
            print(f"  {label} {level} sample {'AB'[k]}: {wall:.1f} s {dict((k2, round(v, 2)) for k2, v in prof.timings.items())}",
                  flush=True)
            profs.append(prof)
        # the cost: bootstrap + row-aligned estimate path + allocation, over the profile without them
        ratio, t_plain, t_rows = estimate_path_ratio(profs[0].samples, args.repeats)
        profs[0].samples = None

        def add_cost(est, ps):
            for k, prof in enumerate(ps):
                tm = prof.timings
                extra_est = tm["estimate"] * (1 - 1 / ratio)
                extra_alloc = alloc_seconds(prof, per_module, cost)
                extra = tm["bootstrap"] + extra_est + extra_alloc
                base = tm["total"] - profs[k].timings["bootstrap"] - extra_est
                cost_rows.append({"model": label, "level": level, "estimator": est, "sample": "AB"[k],
                                  "sets": len(prof.paired.keys), "profile_s": base, "forward_s": tm["forward"],
                                  "estimate_s": tm["estimate"], "bootstrap_s": tm["bootstrap"],
                                  "rows_path_ratio": ratio, "alloc_extra_s": extra_alloc, "extra_s": extra,
                                  "cost_share": extra / base})
        # calibration of the bootstrap errors: between-sample z of the growths
        for unit in ("sequence", "token"):
            a, b = (allocate_ranks(with_unit(p, unit), budget="r8", cost=cost, per_module=per_module) for p in profs)
            calib_rows.append({"model": label, "level": level, "estimator": "mle", "unit": unit,
                               "entries": len(a.ranks), "rms_z": rms_z(a, b),
                               "median_sd": statistics.median(a.delta_stderr + b.delta_stderr)})
        # the rules
        variants = [("mle", profs)]
        if args.censored:
            variants.append(("mle_censored", [refit(p, "mle_censored") for p in profs]))
        for est, ps in variants:
            add_cost(est, ps)
            if est != "mle":
                for unit in ("sequence", "token"):
                    a, b = (allocate_ranks(with_unit(p, unit), budget="r8", cost=cost, per_module=per_module)
                            for p in ps)
                    calib_rows.append({"model": label, "level": level, "estimator": est, "unit": unit,
                                       "entries": len(a.ranks), "rms_z": rms_z(a, b),
                                       "median_sd": statistics.median(a.delta_stderr + b.delta_stderr)})
            for rule_label, kw, unit in RULES:
                a, b = (allocate_ranks(with_unit(p, unit), budget="r8", cost=cost, per_module=per_module, **kw)
                        for p in ps)
                row = {"model": label, "level": level, "estimator": est, "rule": rule_label, **compare(a, b)}
                rows.append(row)
                ranks_out[f"{label}/{level}/{est}/{rule_label}"] = {"A": a.ranks, "B": b.ranks,
                                                                    "bounds_A": a.lower_bounds, "bounds_B": b.lower_bounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--n-texts", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=10_000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--split-seed", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-modules", dest="modules", action="store_false")
    ap.add_argument("--no-censored", dest="censored", action="store_false")
    ap.add_argument("--contexts", default="auto", choices=["auto", "prefix", "sequence", "none"],
                    help="profile_model(contexts=...): which tokens are one point (default auto)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(machine_line(args.threads), flush=True)
    rows, cost_rows, calib_rows, ranks_out = [], [], [], {}
    for name in args.models.split(","):
        run_model(name.strip(), args, rows, cost_rows, calib_rows, ranks_out)
    out = Path(args.out)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    append_csv(out / "rank_stability.csv", [{"time": stamp, "threads": args.threads, **r} for r in rows])
    append_csv(out / "rank_stability_cost.csv", [{"time": stamp, "threads": args.threads, **r} for r in cost_rows])
    (out / "rank_stability_ranks.json").write_text(json.dumps(ranks_out, indent=1) + "\n")
    print("\ncost of the stability (bootstrap + row-aligned estimates + allocation) over the profile without it")
    print(format_table(cost_rows, ["model", "level", "estimator", "sample", "sets", "profile_s", "forward_s", "estimate_s",
                                   "bootstrap_s", "rows_path_ratio", "alloc_extra_s", "cost_share"],
                       floatfmt="{:.3g}"))
    print("\ncalibration: rms of the between-sample z of the growths (about 1: honest errors)")
    print(format_table(calib_rows, ["model", "level", "estimator", "unit", "entries", "rms_z", "median_sd"]))
    print(f"\nranks of two disjoint samples of {args.n_texts} sentences, budget r8 on q/k/v/o: entries whose rank "
          "differs by more than 1")
    print(format_table(rows, ["model", "level", "estimator", "rule", "entries", "diff_gt1", "share_gt1", "max_diff",
                              "changed", "bound_flips", "noisy_a", "noisy_b"], floatfmt="{:.2f}"))


if __name__ == "__main__":
    main()
