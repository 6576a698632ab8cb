"""Timing and memory helpers of ``lora_speed.py``: interleaved medians, peak memory on CPU and CUDA,
saved-activation bytes, CSV rows and the final table.

Peak memory on the CPU. The CPU allocator keeps no statistics, so :class:`LiveBytes` counts them
itself: a ``TorchDispatchMode`` sees every aten op (forward and the autograd engine's backward ops),
adds the bytes of each *new* storage an op returns (outputs that alias an input storage, i.e. views
and in-place or ``out=`` results, are not new) and subtracts a storage's bytes once it has been freed
(checked through a weak storage reference before each op). The peak of that running sum is the
transient memory of the measured step on top of what existed before it (weights, inputs). It is the
same quantity ``torch.cuda.max_memory_allocated() - memory_allocated()`` gives on CUDA, minus the
caching allocator's rounding.

Saved activations: :func:`saved_bytes` counts the unique storages autograd packs for backward
(``torch.autograd.graph.saved_tensors_hooks``), the layer's weights excluded (saving them copies nothing).
"""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated by aten ops while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.current = 0
        self.peak = 0

    def _purge(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._purge()
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in inputs or key in self.live or st.nbytes() == 0:
                continue
            self.live[key] = (StorageWeakRef(st), st.nbytes())
            self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak transient bytes of one call of ``step`` (its own allocations, not what existed before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveBytes() as tracker:
        step()
    return tracker.peak


def saved_bytes(forward: Callable[[], object], params: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the activations autograd keeps for backward after ``forward()``: unique storages,
    those of ``params`` excluded (saving a weight, or a transposed view of it, copies nothing)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 1) -> Dict[str, dict]:
    """Time each callable ``repeats`` times, round-robin over the providers (so drifting machine load
    hits all of them alike); CUDA calls are bracketed by synchronisations. Returns per name
    ``{"median": s, "times": [...]}``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    out = {name: {"times": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out[name]["times"].append(time.perf_counter() - t0)
    for v in out.values():
        v["median"] = statistics.median(v["times"])
    return out


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` to ``path`` (header written when the file is new)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def mib(nbytes: float) -> float:
    return nbytes / 2 ** 20


def list_of_ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]
