"""LoRA ranks from intrinsic dimensions: the GeLoRA rule and a parameter-budget mode.

The rule (per block)
--------------------
A model with L blocks has L + 1 IDs ``d_0 .. d_L`` (``d_0``: the states entering block 0, i.e. the
embeddings; ``d_{i+1}``: the output of block i; the ``output_hidden_states`` convention). GeLoRA
bounds the rank a LoRA update of block i needs from below by the growth of the ID across the block::

    b_i = max(ceil(d_{i+1} - d_i), 0) + 1            for i = 0 .. L-1

(the ceiling of the ID difference, never below 0, plus one so that every block keeps an adapter).
With ``z > 0`` and standard errors, only the part of the difference beyond ``z`` standard errors of
the difference counts: ``ceil(d_{i+1} - d_i - z * sqrt(se_i^2 + se_{i+1}^2))``.

How certain a bound is
----------------------
A profile taken with a paired bootstrap (:attr:`gelora.profiling.results.ProfileResult.paired`; or
``replicates=`` with plain IDs) gives every ID difference a distribution: each replicate is a whole
profile, so the differences keep their pairing. The allocation reports, per entry, the probability of
each GeLoRA bound over the replicates (``bound_probs``), that of the bound it gives (``p_bound``) and
the paired standard error of the difference (``delta_stderr``). A bound whose probability is below
:data:`NOISE_P` is *decided by noise*: another sample of the same data would likely move it.

The paired rule (``rule="paired"``)
-----------------------------------
The paper's rule rounds twice: the ceiling of each difference, then (with a budget) the scaled
targets. The first rounding turns a growth of 0.01 against -0.01 into the bounds 2 and 1, and the
budget scale (about 3-7 at ``"r8"``) turns those into ranks 9 and 5. The paired rule keeps the bound
real-valued and counts only the growth the data support::

    b_i = 1 + max(delta_i - z * sd_i, 0)            (z = 2 unless given)

with ``sd_i`` the paired bootstrap standard error of ``delta_i``. The budget mode then rounds once, at
the end. Without a budget the ranks are ``ceil(b_i)``: the paper's bound of the discounted growth.
It needs the replicates (a profile with ``paired_bootstrap > 0``, or ``replicates=``).

Per module
----------
GeLoRA gives the same rank to every matrix of a block. Given the IDs of the input and the output of
each targeted linear module (``profile_model(..., modules=...)``), the same bound is applied to each
module on its own: ``b_m = max(ceil(d_out(m) - d_in(m)), 0) + 1``.

Budget mode
-----------
``budget`` (trainable parameters, or ``"r8"``: as many as uniform rank 8 on the same modules) turns
the bounds into ranks proportional to them that spend the budget: with ``c_i`` the parameters per
unit of rank of entry i (``sum of in + out features`` of its modules), find the scale ``s`` with
``sum_i c_i * clip(s * b_i, min_rank, max_rank) = budget``, take the integer parts of the targets
``t_i = clip(s * b_i)``, then round up the targets with the largest remainders ``t_i - floor(t_i)``
while the budget allows (largest-remainder rounding). Every rank is the floor or the ceiling of its
target, the total never exceeds the budget, and the unspent parameters are reported as ``leftover``
(less than the cost of rounding up any entry that was rounded down).

Alpha policy
------------
The ranks say nothing about ``lora_alpha``; :func:`gelora.peft_bridge.lora_config` sets it. By default
the scaling ``alpha / r`` is the same in every layer (``alpha_i = scaling * r_i``), so a layer's update
size does not depend on its rank; ``alpha_policy="constant_alpha"`` keeps one ``lora_alpha`` for all
layers instead (PEFT's behaviour without ``alpha_pattern``: low-rank layers get larger scalings).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

RULES = ("gelora", "paired", "uniform")
#: ``z`` of ``rule="paired"`` when none is given: growth beyond 2 paired standard errors counts.
PAIRED_Z = 2.0
#: A bound whose probability over the bootstrap replicates is below this is decided by noise.
NOISE_P = 0.9
#: Differences closer than this above an integer are rounded down (ceil(2.0000000001) is 2, not 3).
_CEIL_EPS = 1e-9

Budget = Union[None, int, str]


@dataclass
class RankAllocation:
    """Ranks for blocks (``per_module=False``) or for modules.

    Attributes:
        names: ``"block 0"``, ... or full module names.
        ranks: integer rank of each entry.
        lower_bounds: the rule's bounds ``b`` (before scaling to a budget and clamping); integers for
            ``"gelora"`` and ``"uniform"``, reals for ``"paired"``.
        deltas: the ID differences the bounds come from (output minus input).
        cost: trainable parameters per unit of rank of each entry (1 when unknown).
        params: ``sum(cost * ranks)``.
        budget: the budget in parameters (None: no budget).
        leftover: ``budget - params`` (None without a budget).
        blocks: block index of each entry.
        rels: module name inside the block (per module), else None.
        z: the significance threshold used by the rule.
        targets: the real-valued proportional targets ``clip(s * b_i)`` of the budget mode (the
            clamped bounds without a budget); every rank is the floor or the ceiling of its target.
        gelora_bounds: the paper's integer bounds (with ``z`` under ``rule="gelora"``, else z = 0).
        n_boot, bootstrap_unit: the paired bootstrap the next four come from (0 / None: none given,
            and the lists are empty).
        delta_stderr: paired bootstrap standard error of each ID difference.
        bound_probs: per entry ``{bound: probability}`` of the paper's bound over the replicates.
        p_bound: probability of the bound in ``gelora_bounds``.
        bound_ci95: 2.5% and 97.5% quantiles of the rule's own bound over the replicates.
    """

    names: List[str]
    ranks: List[int]
    lower_bounds: List[int]
    deltas: List[float]
    cost: List[int]
    params: int
    rule: str
    min_rank: int
    max_rank: Optional[int]
    per_module: bool = False
    budget: Optional[int] = None
    leftover: Optional[int] = None
    blocks: List[int] = field(default_factory=list)
    rels: List[Optional[str]] = field(default_factory=list)
    z: float = 0.0
    targets: List[float] = field(default_factory=list)
    gelora_bounds: List[int] = field(default_factory=list)
    n_boot: int = 0
    bootstrap_unit: Optional[str] = None
    delta_stderr: List[float] = field(default_factory=list)
    bound_probs: List[Dict[int, float]] = field(default_factory=list)
    p_bound: List[float] = field(default_factory=list)
    bound_ci95: List[Tuple[float, float]] = field(default_factory=list)

    def noisy(self, threshold: float = NOISE_P) -> List[int]:
        """Indices of the entries whose paper bound has a probability below ``threshold`` (empty
        without a bootstrap)."""
        return [i for i, p in enumerate(self.p_bound) if p < threshold]

    def as_dict(self) -> Dict[str, int]:
        """``{name: rank}``."""
        return dict(zip(self.names, self.ranks))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return {
            "names": list(self.names),
            "ranks": list(self.ranks),
            "lower_bounds": [b if isinstance(b, int) else float(b) for b in self.lower_bounds],
            "deltas": [float(d) for d in self.deltas],
            "cost": list(self.cost),
            "params": self.params,
            "budget": self.budget,
            "leftover": self.leftover,
            "rule": self.rule,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "per_module": self.per_module,
            "blocks": list(self.blocks),
            "rels": list(self.rels),
            "z": self.z,
            "targets": [float(x) for x in self.targets],
            "gelora_bounds": list(self.gelora_bounds),
            "n_boot": self.n_boot,
            "bootstrap_unit": self.bootstrap_unit,
            "delta_stderr": [float(x) for x in self.delta_stderr],
            "bound_probs": [{str(k): float(v) for k, v in p.items()} for p in self.bound_probs],
            "p_bound": [float(x) for x in self.p_bound],
            "bound_ci95": [[float(a), float(b)] for a, b in self.bound_ci95],
            "noisy": self.noisy(),
            "noise_p": NOISE_P,
        }


def gelora_bound(delta: float, *, se: float = 0.0, z: float = 0.0) -> int:
    """``max(ceil(delta - z * se), 0) + 1``: the GeLoRA lower bound for an ID growth ``delta``."""
    if not math.isfinite(delta):
        raise ValueError(f"ID difference must be finite, got {delta}")
    return max(math.ceil(delta - z * se - _CEIL_EPS), 0) + 1


def parse_budget(budget: Budget, cost: Sequence[int]) -> Optional[int]:
    """Budget in parameters: an int, ``None``/``"none"``, or ``"rN"``/``"rank:N"``/``"uniform:N"`` (as
    many parameters as rank N on every entry: ``N * sum(cost)``); a digit string is a parameter count."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise TypeError("budget must be an int or a string like 'r8'")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        return budget
    if isinstance(budget, str):
        s = budget.strip().lower()
        if s in ("", "none"):
            return None
        if s.isdigit():
            return int(s)
        m = re.fullmatch(r"(?:r|rank:|uniform:)(\d+)", s)
        if m:
            return int(m.group(1)) * int(sum(cost))
    raise ValueError(f"budget must be a parameter count or 'rN' (uniform rank N), got {budget!r}")


def _solve_scale(bounds: Sequence[int], cost: Sequence[int], budget: int, lo_r: int, hi_r: Optional[int]) -> List[float]:
    """Targets ``t_i = clip(s * b_i, lo_r, hi_r)`` with ``sum c_i t_i <= budget`` as large as possible."""
    def targets(s: float) -> List[float]:
        out = []
        for b in bounds:
            t = max(float(lo_r), s * b)
            if hi_r is not None:
                t = min(t, float(hi_r))
            out.append(t)
        return out

    def spend(s: float) -> float:
        return sum(c * t for c, t in zip(cost, targets(s)))

    lo, hi = 0.0, 1.0
    while spend(hi) < budget:
        if hi_r is not None and all(t >= hi_r for t in targets(hi)):
            return targets(hi)
        hi *= 2.0
        if hi > 1e18:
            break
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if spend(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return targets(lo)


def _fit_budget(
    bounds: Sequence[int], cost: Sequence[int], budget: int, min_rank: int, max_rank: Optional[int]
) -> Tuple[List[int], int, List[float]]:
    floor_cost = sum(c * min_rank for c in cost)
    if budget < floor_cost:
        raise ValueError(
            f"budget of {budget} parameters is too small: min_rank={min_rank} on every entry needs {floor_cost}"
        )
    t = _solve_scale(bounds, cost, budget, min_rank, max_rank)
    ranks = [max(min_rank, int(math.floor(x + 1e-9))) for x in t]
    # the float scale may overshoot by rounding noise: take ranks back, smallest remainder first
    while sum(c * r for c, r in zip(cost, ranks)) > budget:
        cands = [i for i, r in enumerate(ranks) if r > min_rank]
        i = min(cands, key=lambda j: (t[j] - ranks[j], -j))
        ranks[i] -= 1
    left = budget - sum(c * r for c, r in zip(cost, ranks))
    # largest remainder: round up the targets furthest above their rank, while the budget allows;
    # a rank never passes the ceiling of its target, so the proportions hold to within one rank
    order = sorted(range(len(t)), key=lambda j: (-(t[j] - ranks[j]), j))
    for i in order:
        if ranks[i] < math.ceil(t[i] - 1e-9) and cost[i] <= left:
            ranks[i] += 1
            left -= cost[i]
    return ranks, left, t


def _replicate_stats(
    reps: torch.Tensor, se: Sequence[float], z_gelora: float
) -> Tuple[List[float], List[Dict[int, float]], torch.Tensor]:
    """Per column of (B, E) replicate differences: the paired standard error, the distribution of the
    paper's bound, and the (B, E) replicate bounds (NaN where a replicate is not finite)."""
    sds: List[float] = []
    probs: List[Dict[int, float]] = []
    bounds = torch.full_like(reps, float("nan"))
    for e in range(reps.shape[1]):
        col = reps[:, e]
        ok = torch.isfinite(col)
        f = col[ok]
        if f.numel() < 2:
            raise ValueError(f"entry {e}: fewer than 2 finite bootstrap replicates of its ID difference")
        sds.append(float(f.std(unbiased=True)))
        b = torch.clamp(torch.ceil(f - z_gelora * se[e] - _CEIL_EPS), min=0) + 1
        bounds[ok, e] = b
        vals, counts = torch.unique(b, return_counts=True)
        probs.append({int(v): float(c) / f.numel() for v, c in zip(vals.tolist(), counts.tolist())})
    return sds, probs, bounds


def _quantiles(col: torch.Tensor) -> Tuple[float, float]:
    f = col[torch.isfinite(col)]
    q = torch.quantile(f, torch.tensor([0.025, 0.975], dtype=f.dtype))
    return float(q[0]), float(q[1])


def _check_rule(rule: str, min_rank: int, max_rank: Optional[int], z: Optional[float]) -> float:
    """Checks the rule and the clamps; returns ``z`` (its default for the rule when None)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an integer >= 1, got {min_rank!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < min_rank):
        raise ValueError(f"max_rank must be an integer >= min_rank={min_rank}, got {max_rank!r}")
    if z is None:
        z = PAIRED_Z if rule == "paired" else 0.0
    z = float(z)
    if not z >= 0:
        raise ValueError(f"z must be >= 0, got {z}")
    return z


@dataclass
class _Entries:
    """What ranks are allocated to: a name, an ID difference (output minus input) and its unpaired
    standard error per entry, and the (B, E) replicate differences of a paired bootstrap (or None)."""

    names: List[str]
    deltas: List[float]
    ses: List[float]
    blocks: List[int]
    rels: List[Optional[str]]
    per_module: bool
    reps: Optional[torch.Tensor] = None
    unit: Optional[str] = None


def _module_entries(pairs: Mapping[str, Tuple[float, float, float, float]], blocks: List[int],
                    rels: List[Optional[str]], reps: Optional[torch.Tensor] = None,
                    unit: Optional[str] = None) -> _Entries:
    """Per-module entries from ``{name: (d_in, d_out, se_in, se_out)}``."""
    names = list(pairs)
    if not names:
        raise ValueError("no modules to allocate ranks to")
    deltas, ses = [], []
    for k, (a, b, sa, sb) in pairs.items():
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"{k}: IDs must be finite, got ({a}, {b})")
        deltas.append(b - a)
        ses.append(math.hypot(sa, sb))
    return _Entries(names, deltas, ses, blocks, rels, True, reps, unit)


def _mapping_entries(ids: Mapping[str, Any]) -> _Entries:
    """Per-module entries from ``{name: (d_in, d_out)}`` or ``{name: (d_in, d_out, se_in, se_out)}``."""
    pairs: Dict[str, Tuple[float, float, float, float]] = {}
    for k, v in ids.items():
        v = tuple(float(x) for x in v)
        if len(v) not in (2, 4):
            raise ValueError(f"{k}: expected (d_in, d_out) or (d_in, d_out, se_in, se_out), got {v}")
        pairs[k] = v if len(v) == 4 else (v[0], v[1], 0.0, 0.0)
    return _module_entries(pairs, [-1] * len(pairs), [None] * len(pairs))


def _profile_module_entries(modules: Any, paired: Any, unit: Optional[str], replicates: Any) -> _Entries:
    """Per-module entries of a profile taken with ``modules=``; the replicate differences of each
    module's output and input sets from the profile's paired bootstrap."""
    if not modules:
        raise ValueError("per_module=True needs a profile taken with modules=...")
    if replicates is not None:
        raise ValueError("replicates= is for per-block IDs; per module they come from the profile")
    pairs = {k: (m.id_in, m.id_out, m.stderr_in, m.stderr_out) for k, m in modules.items()}
    reps = None
    if paired is not None:
        reps = (paired.columns([m.out_key for m in modules.values()])
                - paired.columns([m.in_key for m in modules.values()]))
    return _module_entries(pairs, [m.block for m in modules.values()], [m.rel for m in modules.values()],
                           reps, unit)


def _block_entries(ids: Any, stderr: Optional[Sequence[float]], replicates: Any, unit: Optional[str]) -> _Entries:
    """Per-block entries from the L + 1 layer IDs: block i grows the ID from ``d_i`` to ``d_{i+1}``."""
    try:
        d = [float(x) for x in ids]
    except TypeError as exc:
        raise TypeError(f"ids must be a sequence of L + 1 floats, a mapping or a ProfileResult, "
                        f"got {type(ids).__name__}") from exc
    if len(d) < 2:
        raise ValueError(f"need the IDs of at least 2 layers (L + 1 for L blocks), got {len(d)}")
    bad = [i for i, x in enumerate(d) if not math.isfinite(x)]
    if bad:
        raise ValueError(f"IDs must be finite; layer(s) {bad} are not")
    se = [float(x) for x in stderr] if stderr is not None else [0.0] * len(d)
    if len(se) != len(d):
        raise ValueError(f"stderr has {len(se)} entries for {len(d)} IDs")
    names = [f"block {i}" for i in range(len(d) - 1)]
    deltas = [d[i + 1] - d[i] for i in range(len(d) - 1)]
    ses = [math.hypot(se[i], se[i + 1]) for i in range(len(d) - 1)]
    reps = None
    if replicates is not None:
        r = torch.as_tensor(replicates, dtype=torch.float64)
        if r.dim() != 2 or r.shape[1] != len(d) or r.shape[0] < 2:
            raise ValueError(f"replicates must be (B >= 2, {len(d)}) replicate IDs, got {tuple(r.shape)}")
        reps = r[:, 1:] - r[:, :-1]
    return _Entries(names, deltas, ses, list(range(len(d) - 1)), [None] * len(names), False, reps, unit)


def _entries(ids: Any, stderr: Optional[Sequence[float]], per_module: Optional[bool], replicates: Any) -> _Entries:
    """The entries of :func:`allocate_ranks`' ``ids``: a ProfileResult (its paired bootstrap supplies the
    replicates unless ``replicates=`` is given), a mapping of module IDs, or a sequence of layer IDs."""
    unit: Optional[str] = None
    if hasattr(ids, "ids") and hasattr(ids, "stderr"):  # ProfileResult
        paired = getattr(ids, "paired", None)
        if paired is not None and getattr(paired, "replicates", None) is not None:
            unit = paired.unit
        else:
            paired = None
        if per_module:
            return _profile_module_entries(getattr(ids, "modules", None), paired, unit, replicates)
        if stderr is None:
            stderr = list(ids.stderr)
        if replicates is None and paired is not None:
            replicates = paired.columns(paired.keys[: len(ids.ids)])
        elif replicates is not None:
            unit = None
        ids = list(ids.ids)
    elif isinstance(ids, Mapping):
        if replicates is not None:
            raise ValueError("replicates= is for per-block IDs, not a mapping of module IDs")
        return _mapping_entries(ids)
    return _block_entries(ids, stderr, replicates, unit)


@dataclass
class _Bounds:
    """The rule's bounds of every entry, the paper's integer bounds, and what the replicates say of them
    (empty lists without replicates)."""

    bounds: List[Any]
    gelora: List[int]
    sds: List[float] = field(default_factory=list)
    probs: List[Dict[int, float]] = field(default_factory=list)
    p_bound: List[float] = field(default_factory=list)
    ci: List[Tuple[float, float]] = field(default_factory=list)


def _rule_bounds(rule: str, z: float, e: _Entries) -> _Bounds:
    """The bounds of ``rule``: the paper's (``z`` unpaired standard errors off), the paired one (``z``
    paired standard errors off, real-valued) or 1; with replicates, each paper bound's probability and the
    95% interval of the rule's bound.

    Raises:
        ValueError: ``rule="paired"`` without replicates.
    """
    z_gelora = z if rule == "gelora" else 0.0
    out = _Bounds(bounds=[], gelora=[gelora_bound(dl, se=s, z=z_gelora) for dl, s in zip(e.deltas, e.ses)])
    if e.reps is not None:
        out.sds, out.probs, rep_bounds = _replicate_stats(e.reps, e.ses, z_gelora)
        out.p_bound = [p.get(b, 0.0) for p, b in zip(out.probs, out.gelora)]
        if rule == "paired":
            rep_bounds = 1.0 + torch.clamp(e.reps - z * torch.tensor(out.sds, dtype=torch.float64), min=0.0)
        elif rule == "uniform":
            rep_bounds = torch.ones_like(e.reps)
        out.ci = [_quantiles(rep_bounds[:, i]) for i in range(e.reps.shape[1])]
    elif rule == "paired":
        raise ValueError("rule='paired' needs the paired bootstrap: a profile taken with paired_bootstrap > 0, "
                         "or replicates= of the IDs")
    if rule == "gelora":
        out.bounds = list(out.gelora)
    elif rule == "paired":
        out.bounds = [1.0 + max(dl - z * sd, 0.0) for dl, sd in zip(e.deltas, out.sds)]
    else:
        out.bounds = [1] * len(e.names)
    return out


def _costs(cost: Union[None, Sequence[int], Mapping[str, int]], names: List[str]) -> List[int]:
    """Parameters per unit of rank of each entry (1 when ``cost`` is None)."""
    if cost is None:
        c = [1] * len(names)
    elif isinstance(cost, Mapping):
        missing = [n for n in names if n not in cost]
        if missing:
            raise ValueError(f"cost has no entry for {missing[:4]}")
        c = [int(cost[n]) for n in names]
    else:
        c = [int(x) for x in cost]
        if len(c) != len(names):
            raise ValueError(f"cost has {len(c)} entries for {len(names)} ranks")
    if any(x < 1 for x in c):
        raise ValueError("cost entries must be positive integers")
    return c


def _ranks(bounds: Sequence[Any], c: List[int], budget: Budget, min_rank: int, max_rank: Optional[int]
           ) -> Tuple[Optional[int], List[int], Optional[int], List[float]]:
    """``(budget in parameters, ranks, leftover, targets)``: without a budget the bounds rounded up and
    clamped, with one the proportional fit of :func:`_fit_budget`."""
    b_params = parse_budget(budget, c)
    if b_params is None:
        ints = [max(math.ceil(b - _CEIL_EPS), 1) for b in bounds]
        ranks = [max(min_rank, b) if max_rank is None else min(max(min_rank, b), max_rank) for b in ints]
        return None, ranks, None, [float(r) for r in ranks]
    ranks, left, targets = _fit_budget(bounds, c, b_params, min_rank, max_rank)
    return b_params, ranks, left, targets


def allocate_ranks(
    ids: Any,
    *,
    rule: str = "gelora",
    budget: Budget = None,
    min_rank: int = 1,
    max_rank: Optional[int] = None,
    cost: Union[None, Sequence[int], Mapping[str, int]] = None,
    stderr: Optional[Sequence[float]] = None,
    z: Optional[float] = None,
    per_module: Optional[bool] = None,
    replicates: Optional[torch.Tensor] = None,
) -> RankAllocation:
    """LoRA ranks from intrinsic dimensions (see the module docstring for the rules and the budget mode).

    Args:
        ids: the L + 1 layer IDs ``[d_0, ..., d_L]`` (list, tensor or a
            :class:`gelora.profiling.results.ProfileResult`) for L per-block ranks; or a mapping
            ``{module name: (d_in, d_out)}`` (or a ProfileResult with ``per_module=True``) for per-module ranks.
        rule: ``"gelora"`` (the paper's bound), ``"paired"`` (the real-valued bound of the growth beyond
            ``z`` paired standard errors; needs replicates) or ``"uniform"`` (bound 1 everywhere: with a
            budget, the uniform allocation of the same budget).
        budget: trainable parameters to spend, ``"rN"`` for the parameters of uniform rank N, or None
            (then the ranks are the bounds, rounded up and clamped to ``[min_rank, max_rank]``).
        min_rank, max_rank: clamps (``max_rank=None``: no upper clamp).
        cost: parameters per unit of rank of each entry (a sequence, or a mapping by name); e.g.
            :func:`gelora.peft_bridge.rank_costs`. Default 1 (the budget then counts rank units).
        stderr: standard errors of ``ids`` (taken from a ProfileResult automatically), used by
            ``rule="gelora"`` with ``z``.
        z: count only the part of each ID difference beyond ``z`` standard errors: for ``"gelora"``
            the unpaired ``sqrt(se_i^2 + se_{i+1}^2)`` (default 0: the plain rule), for ``"paired"`` the
            paired bootstrap one (default :data:`PAIRED_Z`).
        per_module: with a ProfileResult, allocate per profiled module instead of per block.
        replicates: (B, L + 1) bootstrap replicates of ``ids`` whose rows are whole profiles (paired);
            taken from a ProfileResult's ``paired`` bootstrap automatically (per block and per module).

    Returns:
        :class:`RankAllocation`, with the bound probabilities when replicates are available.

    Raises:
        ValueError: fewer than 2 IDs, non-finite IDs, bad clamps, a budget below ``min_rank`` everywhere,
            replicates of the wrong shape, or ``rule="paired"`` without replicates.
    """
    z = _check_rule(rule, min_rank, max_rank, z)
    e = _entries(ids, stderr, per_module, replicates)
    bd = _rule_bounds(rule, z, e)
    c = _costs(cost, e.names)
    b_params, ranks, left, targets = _ranks(bd.bounds, c, budget, min_rank, max_rank)
    return RankAllocation(
        names=e.names, ranks=ranks, lower_bounds=bd.bounds, deltas=e.deltas, cost=c,
        params=sum(ci * r for ci, r in zip(c, ranks)), rule=rule, min_rank=min_rank, max_rank=max_rank,
        per_module=e.per_module, budget=b_params, leftover=left, blocks=e.blocks, rels=e.rels, z=z,
        targets=targets, gelora_bounds=bd.gelora, n_boot=0 if e.reps is None else int(e.reps.shape[0]),
        bootstrap_unit=e.unit if e.reps is not None else None, delta_stderr=bd.sds, bound_probs=bd.probs,
        p_bound=bd.p_bound, bound_ci95=bd.ci,
    )
