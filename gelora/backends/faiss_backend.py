"""FAISS backend: exact flat L2 index (``IndexFlatL2``, GPU index when faiss-gpu and CUDA are there).

Used as a fallback and as the outside reference in the benchmarks. FAISS returns squared distances
from the ``|x|^2 + |y|^2 - 2<x,y>`` shortcut; the shared pipeline re-ranks them directly.
"""
from __future__ import annotations

import importlib.util
from typing import List

import torch

from . import KnnBackend, register
from .torch_backend import gemm_error_model


def _faiss():
    import faiss  # noqa: PLC0415 - optional dependency

    return faiss


class FaissBackend(KnnBackend):
    name = "faiss"
    description = "FAISS IndexFlatL2 (exact, BLAS; GPU index with faiss-gpu)"

    def _availability_reasons(self) -> List[str]:
        if importlib.util.find_spec("faiss") is None:
            return ["faiss is not installed (pip install faiss-cpu, or faiss-gpu on CUDA machines)"]
        try:
            _faiss()
        except Exception as exc:  # noqa: BLE001
            return [f"faiss failed to import: {exc!r}"]
        return []

    def _input_reasons(self, x: torch.Tensor) -> List[str]:
        reasons = []
        if x.device.type == "cuda" and not hasattr(_faiss(), "StandardGpuResources"):
            reasons.append("input is on CUDA but this FAISS build has no GPU support")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {x.device.type} not supported")
        return reasons

    def search(self, x: torch.Tensor, kc: int, *, src_dtype=None):
        faiss = _faiss()
        d = x.shape[1]
        x32 = x.float().contiguous()
        if x.device.type == "cuda":
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatL2(res, d)
            xs = x32.cpu().numpy()
        else:
            index = faiss.IndexFlatL2(d)
            xs = x32.numpy()
        index.add(xs)
        # k = kc + 1: the point itself (or one of its duplicates) comes back among the results
        dd, ii = index.search(xs, kc + 1)
        dd = torch.from_numpy(dd)
        ii = torch.from_numpy(ii)
        own = ii == torch.arange(ii.shape[0]).unsqueeze(1)
        # drop the row itself by index; when it is not among the kc+1 (ties with duplicates), drop the last
        drop = torch.where(own.any(1), own.int().argmax(1), torch.full((ii.shape[0],), kc))
        keep = torch.ones_like(own)
        keep[torch.arange(ii.shape[0]), drop] = False
        cand_i = ii[keep].view(-1, kc)
        cand_d = dd[keep].view(-1, kc)
        dev = x.device
        err = gemm_error_model((x32 * x32).sum(1), d, torch.float32)
        return cand_d.to(dev), cand_i.to(dev), err.to(dev)


register(FaissBackend())
