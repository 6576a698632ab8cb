"""The registry of the kNN engines (:data:`KNN`, a :class:`gelora._registry.Registry`) and selection.

:data:`PRIORITY`: Triton on CUDA, the C++ core, FAISS, torch. ``backend="name"`` or ``GELORA_BACKEND``
forces one; it is still checked, and a forced engine that cannot run raises
:class:`gelora.BackendUnavailable` with its reasons. ``need`` adds a capability to the check
(``"cross"``: the distributed ring's cross search): an engine without it is skipped, or refused when
forced, never silently replaced.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..._registry import Registry
from .base import KnnBackend

#: Order in which ``backend=None`` tries the kNN engines (first usable one wins).
PRIORITY = ("triton", "cpp", "faiss", "torch")


KNN = Registry("kNN", PRIORITY, ["gelora.neighbours.engines." + m for m in ("triton", "cpp", "faiss", "torch")],
               "GELORA_BACKEND")


def register(backend: KnnBackend) -> KnnBackend:
    """Add a kNN engine to :data:`KNN` (each engine module calls it on import)."""
    return KNN.register(backend)


def all_backends() -> Dict[str, KnnBackend]:
    """The kNN engines, in priority order."""
    return KNN.all()


def get_backend(name: str) -> KnnBackend:
    return KNN.get(name)


def select_backend(
    x: torch.Tensor, backend: Optional[str] = None, *, need: Sequence[str] = (), k: Optional[int] = None
) -> KnnBackend:
    """Pick the kNN engine for ``x``: the forced one (argument or ``GELORA_BACKEND``), else the first usable.

    Args:
        need: capabilities the job needs besides searching ``x``: ``"cross"`` (the distributed ring).
        k: neighbours per row the job asks for; an engine that cannot keep ``k`` candidates per row
            (:attr:`KnnBackend.max_candidates`, :meth:`KnnBackend.k_reasons`) is skipped, or refused
            with its limit when forced. One that keeps ``k`` but not all of its extra candidates runs
            with fewer (:meth:`KnnBackend.candidates_for`).

    Raises:
        BackendUnavailable: the forced engine cannot run on ``x`` (or lacks a needed capability), or
            no engine can.
    """
    def reasons_of(b: KnnBackend, forced: bool) -> List[str]:
        r = b.not_supported_reasons(x, forced=forced, k=k)
        if not r and "cross" in need:
            r = b.cross_reasons()
        return r

    return KNN.select(reasons_of, backend)


def describe() -> List[Tuple[str, bool, List[str], str]]:
    """(name, usable, reasons, description) for every kNN engine, on this machine, for CPU float32 input
    and, where CUDA is present, for CUDA input."""
    rows = []
    probes = [torch.zeros(8, 4)]
    if torch.cuda.is_available():
        probes.append(torch.zeros(8, 4, device="cuda"))
    for name, b in all_backends().items():
        reasons: List[str] = []
        usable = False
        for p in probes:
            r = b.not_supported_reasons(p)
            if not r:
                usable = True
                reasons = [f"usable on {p.device.type}"] + (reasons or [])
            else:
                reasons += [f"{p.device.type}: {m}" for m in r]
        if usable and b.cross_reasons():
            reasons.append("no cross search: not used by the distributed ring")
        rows.append((name, usable, reasons, b.description))
    return rows
