"""The methods the suite compares, at one parameter budget each (``rN``: the LoRA parameters of uniform
rank N on the target modules, query/key/value/attention-output of every block: 24 modules of 384 x 384).

============== ===========================================================================================
head           the head only (no adapter); the floor, once per task
uniform        LoRA rank N on every target module
gelora         the paper's rule per block, ``allocate_ranks(profile, rule="gelora", budget=...)``: bounds
               ``max(ceil(d_{i+1} - d_i), 0) + 1`` scaled to spend the budget
gelora_paired  the noise-aware rule, ``rule="paired"``: ``b_i = 1 + max(delta_i - 2 sd_i, 0)`` with ``sd_i``
               the paired bootstrap error of the block's ID growth (docs/profiling.md), then the budget
gelora_pm      the paper's rule per module (each module's input and output IDs), same budget
eva            PEFT's EVA (``init_lora_weights="eva"``, ``rho`` 2): SVD of each module's inputs initialises
               ``lora_A`` and moves ranks between modules (rank sum = the uniform one)
adalora        PEFT's AdaLoRA, ``init_r`` = ceil(1.5 N) pruned to ``target_r`` = N on average
============== ===========================================================================================

Every method trains the head too; ``alpha / r`` is 2 everywhere (GeLoRA ``constant_scaling``, EVA
``adjust_scaling_factors``, AdaLoRA ``lora_alpha = 2 init_r``); LoRA dropout 0.

What runs before training, once per task (it does not depend on the training seed), is a *preparation
unit*: ``profile`` (one block profile with the paired bootstrap serves gelora and gelora_paired at every
budget), ``profile_pm`` (the per-module profile of gelora_pm), ``eva`` (one SVD pass per budget). They
read the first ``profile_texts`` training examples only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

TARGETS = ["query", "key", "value", "attention.output.dense"]


@dataclass(frozen=True)
class Method:
    name: str
    prep: Optional[str]  # the preparation unit it needs: None, "profile", "profile_pm", "eva"
    rule: Optional[str] = None  # allocate_ranks rule
    per_module: bool = False
    about: str = ""


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("head", None, about="head only (floor)"),
    Method("uniform", None, about="LoRA rank N everywhere"),
    Method("gelora", "profile", "gelora", about="GeLoRA per block, the paper's rule"),
    Method("gelora_paired", "profile", "paired", about="GeLoRA per block, growth beyond 2 paired errors"),
    Method("gelora_pm", "profile_pm", "gelora", True, about="GeLoRA per module, the paper's rule"),
    Method("eva", "eva", about="PEFT EVA (SVD init, rank redistribution)"),
    Method("adalora", None, about="PEFT AdaLoRA (init 1.5N pruned to N)"),
)}


#: the methods whose model is ``lora_config(ranks)`` alone (see :func:`build`): two of them that allocate the
#: same ranks train the same model with the same seed, i.e. the same run
RANK_BUILT = ("uniform", "gelora", "gelora_paired", "gelora_pm")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods are {list(METHODS)}")
    return METHODS[name]


def budget_rank(budget: str) -> int:
    """N of ``"rN"``."""
    if not (isinstance(budget, str) and budget.startswith("r") and budget[1:].isdigit() and int(budget[1:]) >= 1):
        raise ValueError(f"a budget is 'rN' (the parameters of uniform rank N), got {budget!r}")
    return int(budget[1:])


def adalora_init_r(rank: int) -> int:
    return int(math.ceil(1.5 * rank))


def adalora_schedule(steps: int, tinit: float = 0.1, tfinal: float = 0.25) -> Dict[str, int]:
    """AdaLoRA's ``tinit``/``tfinal`` (fractions of the steps) in steps, with ``tinit < total - tfinal``."""
    t0 = int(round(tinit * steps))
    t1 = max(1, int(round(tfinal * steps)))
    if t0 >= steps - t1:
        t0 = max(0, steps - t1 - 1)
    return {"tinit": t0, "tfinal": t1, "total_step": steps, "deltaT": 1}


def target_names(model) -> List[str]:
    from gelora.profiling.structure import resolve_target_modules

    return [t.name for t in resolve_target_modules(model, TARGETS)]


def budget_params(model, rank: int) -> int:
    from gelora.profiling.structure import resolve_target_modules

    return rank * sum(t.params_per_rank for t in resolve_target_modules(model, TARGETS))


def _eva_config(rank: int, rho: float, tau: float):
    from peft import EvaConfig, LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS),
                      init_lora_weights="eva",
                      eva_config=EvaConfig(rho=rho, tau=tau, use_label_mask=False, adjust_scaling_factors=True))


# ---------------------------------------------------------------------------------------------------
# Preparation units
# ---------------------------------------------------------------------------------------------------
def prep_units(methods: Sequence[str], budgets: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``(unit, budget)`` pairs the methods need (budget None: one unit serves every budget)."""
    out: List[Tuple[str, Optional[str]]] = []
    for m in methods:
        u = get_method(m).prep
        for key in ([(u, b) for b in budgets] if u == "eva" else [(u, None)]) if u else []:
            if key not in out:
                out.append(key)
    return out


def _ranks_from_config(lcfg, names: Sequence[str]) -> Dict[str, int]:
    from e2e_quality import re_unescape

    by_name = {re_unescape(k): int(v) for k, v in lcfg.rank_pattern.items()}
    return {n: by_name[n] for n in names}


def run_prep(unit: str, budgets: Sequence[str], task, batches: List[Dict[str, Any]], opts: Dict[str, Any],
             eva_path: Optional[Path] = None) -> Dict[str, Any]:
    """Run one preparation unit on ``batches`` (padded training batches) and allocate every budget.

    ``opts``: ``max_tokens``, ``paired_bootstrap``, ``profile_seed``, ``eva_rho``, ``eva_tau``.
    Returns ``{"prep_s", "allocations": {method: {budget: {"ranks", "alloc_s", ...}}}, ...}``."""
    from .model import load_model

    model = load_model(task.n_outputs, task.kind == "regression", 0)
    names = target_names(model)
    if unit == "eva":
        return _run_eva(model, names, budgets[0], batches, opts, eva_path)
    from gelora.peft_bridge import lora_config, rank_costs
    from gelora.profiling.driver import profile_model
    from gelora.ranks import allocate_ranks

    per_module = unit == "profile_pm"
    t = time.perf_counter()
    prof = profile_model(model.bert, batches, max_tokens=opts["max_tokens"], pooling="tokens",
                         seed=opts["profile_seed"], modules=TARGETS if per_module else None, progress=False,
                         paired_bootstrap=opts["paired_bootstrap"])
    out: Dict[str, Any] = {"prep_s": time.perf_counter() - t, "allocations": {},
                           "profile": {k: v for k, v in prof.to_dict().items() if k != "history"}}
    cost = rank_costs(model.bert, TARGETS, per_module=per_module)
    for m in (x for x in METHODS.values() if x.prep == unit):
        out["allocations"][m.name] = {}
        for b in budgets:
            t = time.perf_counter()
            bp = budget_params(model, budget_rank(b))
            alloc = allocate_ranks(prof, rule=m.rule, budget=bp, cost=cost, per_module=per_module)
            lcfg = lora_config(model, alloc, target_modules=TARGETS, lora_dropout=0.0)
            out["allocations"][m.name][b] = {"ranks": _ranks_from_config(lcfg, names),
                                             "alloc_s": time.perf_counter() - t, "budget_params": bp,
                                             "allocation": alloc.to_dict()}
    return out


def _run_eva(model, names, budget: str, batches, opts, eva_path: Optional[Path]) -> Dict[str, Any]:
    import torch
    from peft import get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict

    bp = budget_params(model, budget_rank(budget))
    torch.manual_seed(0)
    pm = get_peft_model(model, _eva_config(budget_rank(budget), opts["eva_rho"], opts["eva_tau"]),
                        low_cpu_mem_usage=True)
    t = time.perf_counter()
    sd = get_eva_state_dict(pm, dataloader=batches, show_progress_bar=False)
    prep_s = time.perf_counter() - t
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    eva_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, eva_path)
    prefix = "base_model.model."
    got = {k[len(prefix):] if k.startswith(prefix) else k: int(v.shape[0]) for k, v in sd.items()}
    return {"prep_s": prep_s, "eva_state": str(eva_path), "eva_batches": len(batches),
            "allocations": {"eva": {budget: {"ranks": {n: got.get(n, 0) for n in names}, "alloc_s": 0.0,
                                             "budget_params": bp,
                                             "eva_state": str(eva_path)}}}}


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def build(method: str, task, seed: int, budget: Optional[str], alloc: Optional[Dict[str, Any]], steps: int,
          opts: Dict[str, Any]):
    """``(model, target names)``: the model of ``method`` for ``seed``, adapters in place, head
    trainable, the rest frozen. ``alloc``: the method's allocation at ``budget`` from its preparation."""
    import torch

    from .model import load_model

    model = load_model(task.n_outputs, task.kind == "regression", seed)
    names = target_names(model)
    torch.manual_seed(seed)
    if method == "head":
        for p in model.bert.parameters():
            p.requires_grad_(False)
        return model, names
    from peft import get_peft_model

    from gelora.peft_bridge import lora_config

    rank = budget_rank(budget)
    if method in RANK_BUILT:
        ranks = {n: rank for n in names} if method == "uniform" else alloc["ranks"]
        pm = get_peft_model(model, lora_config(model, ranks, target_modules=TARGETS, lora_dropout=0.0))
    elif method == "eva":
        from peft import initialize_lora_eva_weights

        pm = get_peft_model(model, _eva_config(rank, opts["eva_rho"], opts["eva_tau"]), low_cpu_mem_usage=True)
        initialize_lora_eva_weights(pm, eva_state_dict=torch.load(alloc["eva_state"]), show_progress_bar=False)
    elif method == "adalora":
        from peft import AdaLoraConfig

        init_r = adalora_init_r(rank)
        pm = get_peft_model(model, AdaLoraConfig(
            init_r=init_r, target_r=rank, lora_alpha=2 * init_r, lora_dropout=0.0, target_modules=list(TARGETS),
            beta1=0.85, beta2=0.85, orth_reg_weight=0.5, **adalora_schedule(steps)))
    else:
        raise ValueError(f"unknown method {method!r}")
    for p in pm.get_base_model().classifier.parameters():
        p.requires_grad_(True)
    return pm, names
