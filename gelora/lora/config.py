"""Configuration and report of :func:`gelora.fuse_lora` (dataclasses that validate themselves)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .backends import LORA_BACKENDS

#: Names of sibling projections that read the same input (grouped when ``group_siblings=True``).
DEFAULT_SIBLING_NAMES: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


@dataclass
class LoraFuseConfig:
    """Options of :func:`fuse_lora` (validated on construction).

    Attributes:
        adapter_name: adapter to fuse; None: each module's first active adapter.
        backend: "triton", "torch" or None (automatic per call, see :func:`select_lora_backend`).
        recompute_shrink: recompute ``S = s x A^T`` in backward instead of keeping it.
        group_siblings: run sibling projections that read the same input (``sibling_names``, same
            parent module) as one grouped launch. The first sibling called computes all of them and the
            others pick their output up; if a sibling is ever called with a different input (say
            cross-attention), grouping switches itself off for that group. Off by default: with
            non-reentrant activation checkpointing that stops recomputation early, it can change the
            set of saved tensors between forward and recomputation.
        sibling_names: tuples of child names that form a group.
    """

    adapter_name: Optional[str] = None
    backend: Optional[str] = None
    recompute_shrink: bool = False
    group_siblings: bool = False
    sibling_names: Tuple[Tuple[str, ...], ...] = DEFAULT_SIBLING_NAMES

    def __post_init__(self) -> None:
        if self.backend is not None:
            LORA_BACKENDS.get(self.backend)  # ValueError naming the known ones
        if self.adapter_name is not None and not isinstance(self.adapter_name, str):
            raise TypeError(f"adapter_name must be a string or None, got {type(self.adapter_name).__name__}")
        names = tuple(tuple(group) for group in self.sibling_names)
        for group in names:
            if len(group) < 2 or not all(isinstance(n, str) and n for n in group):
                raise ValueError(f"each sibling group needs two or more names, got {group!r}")
        self.sibling_names = names
        self.recompute_shrink = bool(self.recompute_shrink)
        self.group_siblings = bool(self.group_siblings)


@dataclass
class LoraFuseReport:
    """What :func:`fuse_lora` did: ``fused`` module names, ``skipped`` {name: reason}, ``groups`` of
    sibling names sharing a launch, ``notes`` {name: remark} (e.g. dropout falls back in training)."""

    fused: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    groups: List[Tuple[str, ...]] = field(default_factory=list)
    notes: Dict[str, str] = field(default_factory=dict)
