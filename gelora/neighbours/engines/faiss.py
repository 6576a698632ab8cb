"""FAISS backend: exact flat L2 index (``IndexFlatL2``, GPU index when faiss-gpu and CUDA are there).

Used as a fallback and as the outside reference in the benchmarks. FAISS returns squared distances
from the ``|x|^2 + |y|^2 - 2<x,y>`` shortcut; the shared pipeline re-ranks them directly.
"""
from __future__ import annotations

import importlib.util
from typing import List

import torch

from .base import Candidates, KnnBackend
from .registry import register
from .torch import gemm_error_model


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

    def search(self, x: torch.Tensor, kc: int) -> Candidates:
        return self.cross_search(x, x, kc, q_offset=0, k_offset=0)

    def cross_reasons(self) -> List[str]:
        return []

    def cross_search(self, q, keys, kc, *, q_offset, k_offset, top=None) -> Candidates:
        """See :meth:`KnnBackend.cross_search` (and :meth:`KnnBackend.search`: the keys are the queries):
        an ``IndexFlatL2`` of the keys, searched for ``kc + 1`` neighbours so that the query itself
        (by global index) can be dropped."""
        faiss = _faiss()
        d = q.shape[1]
        k32 = keys.float().contiguous()
        q32 = k32 if q is keys else q.float().contiguous()
        if q.device.type == "cuda":
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatL2(res, d)
        else:
            index = faiss.IndexFlatL2(d)
        index.add(k32.cpu().numpy())
        m = keys.shape[0]
        kq = min(kc + 1, m)
        dd, ii = index.search(q32.cpu().numpy(), kq)
        dd = torch.from_numpy(dd).to(torch.float32)
        ii = torch.from_numpy(ii)
        n = ii.shape[0]
        own = ii == (torch.arange(n) + (q_offset - k_offset)).unsqueeze(1)
        # drop the row itself by index; when it is not among the kc+1 (ties with duplicates, or a
        # query that is not in this shard), drop the last
        drop = torch.where(own.any(1), own.int().argmax(1), torch.full((n,), kq - 1))
        keep = torch.ones_like(own)
        keep[torch.arange(n), drop] = False
        width = kq - 1
        cand_i = ii[keep].view(n, width)
        cand_d = dd[keep].view(n, width)
        if width < kc:  # fewer keys than kc + 1: pad
            pad = kc - width
            cand_d = torch.cat([cand_d, torch.full((n, pad), float("inf"))], 1)
            cand_i = torch.cat([cand_i, torch.full((n, pad), -1, dtype=torch.int64)], 1)
        cand_i = torch.where(cand_i < 0, torch.full_like(cand_i, -1), cand_i)
        cand_d = torch.where(cand_i < 0, torch.full_like(cand_d, float("inf")), cand_d)
        dev = q.device
        sq = (q32 * q32).sum(1)
        return Candidates(cand_d.to(dev), cand_i.to(dev), gemm_error_model(sq, d, torch.float32).to(dev), sq)


register(FaissBackend())
