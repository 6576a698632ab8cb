"""PEFT bridge: a ``peft.LoraConfig`` whose ranks are exactly the allocated ones.

PEFT resolves ``rank_pattern``/``alpha_pattern`` per module with ``re.match(rf"(.*\\.)?({key})$", name)``
over the keys in order: keys are suffix regexes, the first matching key wins, and a key that matches
nothing is ignored (PEFT only warns). Short keys such as ``"layer.1.query"`` therefore silently hit
the wrong modules, unescaped dots match any character, and a broad key placed first shadows the
specific ones after it. :func:`lora_config` avoids all three:

* every key is the full module name, regex-escaped, and anchored with ``^`` (``anchor=True``), so it
  can only match that one name; ``target_modules`` lists the full names of the targeted modules;
* after building the config it checks it with PEFT's own matching (:func:`verify_lora_config`): the
  modules PEFT will adapt are exactly the intended ones, every key matches exactly one module of the
  model, and the key PEFT picks for every module (first match) gives the intended rank and alpha.
  Anything else raises ``ValueError``.

``anchor=False`` writes the escaped full names without ``^``: they still match one module of this
model, and also the same module under a wrapper prefix (a config made on ``BertModel`` applied to
``BertForSequenceClassification``, whose names start with ``bert.``).

Alpha policy (``alpha_policy``): ``"constant_scaling"`` (default) sets ``alpha = scaling * r`` per
module, so ``alpha / r`` is the same everywhere; ``"constant_alpha"`` uses one ``lora_alpha`` for all
modules (no ``alpha_pattern``), PEFT's default behaviour, under which low ranks get larger scalings.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from .profiling.structure import TargetModule, TargetSpec, find_blocks, is_conv1d, resolve_target_modules
from .ranks import RankAllocation

ALPHA_POLICIES = ("constant_scaling", "constant_alpha")
_RESERVED = ("r", "target_modules", "rank_pattern", "alpha_pattern", "lora_alpha")


def pattern_key(name: str, anchor: bool = True) -> str:
    """The ``rank_pattern``/``alpha_pattern`` key of the module called ``name`` (escaped, anchored)."""
    return ("^" if anchor else "") + re.escape(name)


def _peft_key_matches(key: str, name: str) -> bool:
    # PEFT's rule (peft.utils.other.get_pattern_key)
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _get_pattern_key(keys: Sequence[str], name: str) -> str:
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # older PEFT: the same rule, spelled out
        for k in keys:
            if _peft_key_matches(k, name):
                return k
        return name
    return get_pattern_key(list(keys), name)


def _targeted_by(config: Any, name: str) -> bool:
    try:
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:
        tm = config.target_modules
        if isinstance(tm, str):
            return re.fullmatch(tm, name) is not None
        return any(name == t or name.endswith("." + t) for t in tm)
    return bool(check_target_module_exists(config, name))


def rank_costs(
    model: nn.Module,
    target_modules: TargetSpec = None,
    *,
    per_module: bool = False,
    blocks: Optional[str] = None,
) -> Union[List[int], Dict[str, int]]:
    """Trainable LoRA parameters per unit of rank: per block (a list of L ints, the sum of
    ``in_features + out_features`` over the block's targeted modules) or per module (a dict by full
    name). ``sum(cost * rank)`` is then the adapter's parameter count (biases off)."""
    targets = resolve_target_modules(model, target_modules, blocks=blocks)
    if per_module:
        return {t.name: t.params_per_rank for t in targets}
    _, ml = find_blocks(model, blocks)
    out = [0] * len(ml)
    for t in targets:
        out[t.block] += t.params_per_rank
    return out


def _intended_ranks(
    model: nn.Module, ranks: Any, target_modules: TargetSpec, blocks: Optional[str]
) -> Dict[str, int]:
    """``{full module name: rank}`` for the model, from any accepted form of ``ranks``."""
    _, ml = find_blocks(model, blocks)
    n_blocks = len(ml)
    if isinstance(ranks, RankAllocation) and ranks.per_module:
        if all(b >= 0 for b in ranks.blocks) and all(r is not None for r in ranks.rels):
            by_pos = {(b, r): k for b, r, k in zip(ranks.blocks, ranks.rels, ranks.ranks)}
            spec: TargetSpec = target_modules
            if spec is None:
                rel_names = sorted({r for r in ranks.rels if r})
                spec = rel_names
            targets = resolve_target_modules(model, spec, blocks=blocks)
            out = {}
            missing = []
            for t in targets:
                if (t.block, t.rel) in by_pos:
                    out[t.name] = by_pos.pop((t.block, t.rel))
                else:
                    missing.append(t.name)
            if missing or by_pos:
                raise ValueError(
                    "the per-module allocation and the model's target modules differ: "
                    f"no rank for {missing[:4]}; no module for {[f'block {b}: {r}' for b, r in list(by_pos)[:4]]}"
                )
            return out
        ranks = ranks.as_dict()
    if isinstance(ranks, Mapping):
        names = {n for n, _ in model.named_modules()}
        unknown = [k for k in ranks if k not in names]
        if unknown:
            raise ValueError(f"ranks name modules that the model does not have: {unknown[:4]}")
        out = {}
        for k, v in ranks.items():
            if isinstance(v, bool) or int(v) != v or int(v) < 1:
                raise ValueError(f"rank of {k} must be a positive integer, got {v!r}")
            out[k] = int(v)
        if target_modules is not None:
            wanted = {t.name for t in resolve_target_modules(model, target_modules, blocks=blocks)}
            if wanted != set(out):
                raise ValueError(
                    f"target_modules selects {len(wanted)} modules but ranks name {len(out)}: "
                    f"missing {sorted(wanted - set(out))[:4]}, extra {sorted(set(out) - wanted)[:4]}"
                )
        for k in out:
            if not (isinstance(model.get_submodule(k), nn.Linear) or is_conv1d(model.get_submodule(k))):
                raise ValueError(f"{k} is not an nn.Linear/Conv1D module")
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))
    per_block = list(ranks.ranks) if isinstance(ranks, RankAllocation) else list(ranks)
    if len(per_block) != n_blocks:
        raise ValueError(f"got {len(per_block)} per-block ranks for a model with {n_blocks} blocks")
    for r in per_block:
        if isinstance(r, bool) or int(r) != r or int(r) < 1:
            raise ValueError(f"ranks must be positive integers, got {per_block}")
    targets: List[TargetModule] = resolve_target_modules(model, target_modules, blocks=blocks)
    return {t.name: int(per_block[t.block]) for t in targets}


def verify_lora_config(
    model: nn.Module,
    config: Any,
    ranks: Mapping[str, int],
    alphas: Optional[Mapping[str, float]] = None,
) -> None:
    """Check, with PEFT's own matching rules, that ``config`` gives exactly ``ranks`` (and ``alphas``).

    * the modules PEFT targets are exactly the keys of ``ranks``;
    * every ``rank_pattern``/``alpha_pattern`` key matches exactly one module name of ``model``, and
      that module is a targeted one;
    * for every targeted module, the first matching key (PEFT's choice) yields the intended rank/alpha.

    Raises:
        ValueError: listing every violation found.
    """
    names = [n for n, _ in model.named_modules() if n]
    problems: List[str] = []
    targeted = {n for n in names if _targeted_by(config, n)}
    wanted = set(ranks)
    if targeted != wanted:
        extra, miss = sorted(targeted - wanted), sorted(wanted - targeted)
        if extra:
            problems.append(f"target_modules also selects {len(extra)} unintended module(s): {extra[:4]}")
        if miss:
            problems.append(f"target_modules misses {len(miss)} intended module(s): {miss[:4]}")
    for attr in ("rank_pattern", "alpha_pattern"):
        pat = getattr(config, attr, None) or {}
        for key in pat:
            try:
                hits = [n for n in names if _peft_key_matches(key, n)]
            except re.error as exc:
                problems.append(f"{attr} key {key!r} is not a valid regex ({exc})")
                continue
            if not hits:
                problems.append(f"{attr} key {key!r} matches no module of the model (PEFT would ignore it)")
            elif len(hits) > 1:
                problems.append(f"{attr} key {key!r} matches {len(hits)} modules ({hits[:3]}...), not one")
            elif hits[0] not in wanted:
                problems.append(f"{attr} key {key!r} matches {hits[0]}, which is not a targeted module")
    rp = getattr(config, "rank_pattern", None) or {}
    ap = getattr(config, "alpha_pattern", None) or {}
    for n, r in ranks.items():
        k = _get_pattern_key(list(rp), n)
        got = rp.get(k, config.r)
        if got != r:
            problems.append(f"{n}: PEFT would use rank {got} (key {k!r}), intended {r}")
        if alphas is not None:
            ka = _get_pattern_key(list(ap), n)
            ga = ap.get(ka, config.lora_alpha)
            if float(ga) != float(alphas[n]):
                problems.append(f"{n}: PEFT would use lora_alpha {ga} (key {ka!r}), intended {alphas[n]}")
    if problems:
        raise ValueError("LoRA config does not give the intended ranks:\n  " + "\n  ".join(problems))


def lora_config(
    model: nn.Module,
    ranks: Any,
    *,
    target_modules: TargetSpec = None,
    alpha_policy: str = "constant_scaling",
    scaling: float = 2.0,
    lora_alpha: Optional[float] = None,
    anchor: bool = True,
    blocks: Optional[str] = None,
    **lora_kwargs: Any,
):
    """A ``peft.LoraConfig`` that gives every targeted module of ``model`` its allocated rank.

    Args:
        model: the model the adapter will be added to (module names are taken from it).
        ranks: a :class:`gelora.ranks.RankAllocation` (per block or per module), a sequence of L
            per-block ranks, or a mapping ``{full module name: rank}``.
        target_modules: the modules to adapt (see :func:`gelora.profiling.structure.resolve_target_modules`;
            default: every linear module inside the blocks; for a per-module allocation: its modules).
        alpha_policy: ``"constant_scaling"`` (``alpha = scaling * r``) or ``"constant_alpha"``
            (``lora_alpha`` everywhere, default 16).
        scaling: ``alpha / r`` under ``"constant_scaling"``.
        lora_alpha: the common alpha under ``"constant_alpha"``.
        anchor: prefix keys with ``^`` (exact names only; see the module docstring).
        blocks: path of the blocks when they are not found automatically.
        **lora_kwargs: any other ``LoraConfig`` field (``lora_dropout``, ``task_type``,
            ``modules_to_save``, ...); ``r``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``
            and ``lora_alpha`` are set here.

    Returns:
        ``peft.LoraConfig`` with ``target_modules`` (full names), ``rank_pattern`` and, under constant
        scaling, ``alpha_pattern`` (escaped, anchored full names), checked by :func:`verify_lora_config`.

    Raises:
        ValueError: ranks that do not fit the model, or a config that PEFT would resolve differently.
    """
    from peft import LoraConfig

    if alpha_policy not in ALPHA_POLICIES:
        raise ValueError(f"alpha_policy must be one of {ALPHA_POLICIES}, got {alpha_policy!r}")
    clash = [k for k in _RESERVED if k in lora_kwargs]
    if clash:
        raise TypeError(f"lora_config sets {clash} itself; pass ranks/target_modules/alpha_policy instead")
    if not (scaling > 0):
        raise ValueError(f"scaling must be > 0, got {scaling}")
    intended = _intended_ranks(model, ranks, target_modules, blocks)
    if not intended:
        raise ValueError("no module to adapt")
    r_default = Counter(intended.values()).most_common(1)[0][0]

    def alpha_of(r: int) -> Union[int, float]:
        a = scaling * r
        return int(a) if float(a).is_integer() else float(a)

    if alpha_policy == "constant_scaling":
        alphas = {n: alpha_of(r) for n, r in intended.items()}
        alpha_default = alpha_of(r_default)
        alpha_pattern = {pattern_key(n, anchor): a for n, a in alphas.items()}
    else:
        a = 16 if lora_alpha is None else lora_alpha
        alphas = {n: a for n in intended}
        alpha_default = a
        alpha_pattern = {}
    if any(is_conv1d(model.get_submodule(n)) for n in intended):
        lora_kwargs.setdefault("fan_in_fan_out", True)
    cfg = LoraConfig(
        r=r_default,
        lora_alpha=alpha_default,
        target_modules=list(intended),
        rank_pattern={pattern_key(n, anchor): r for n, r in intended.items()},
        alpha_pattern=alpha_pattern,
        **lora_kwargs,
    )
    verify_lora_config(model, cfg, intended, alphas)
    return cfg


def adapter_ranks(peft_model: nn.Module, adapter_name: str = "default") -> Dict[str, int]:
    """``{module name (relative to the base model): rank}`` of the LoRA layers of a PEFT model,
    read from the layers themselves (shape of ``lora_A``), for checks after ``get_peft_model``/loading."""
    base = peft_model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    out = {}
    for name, mod in base.named_modules():
        la = getattr(mod, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and adapter_name in la:
            out[name] = int(la[adapter_name].weight.shape[0])
    return out
