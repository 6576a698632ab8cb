"""Triton CUDA backend (fused distance tiles + running top-k). Placeholder until the kernel lands."""
from __future__ import annotations

from typing import List

import torch

from . import KnnBackend, register


class TritonBackend(KnnBackend):
    name = "triton"
    description = "Triton kernel on CUDA (fused distances + top-k)"

    def _availability_reasons(self) -> List[str]:
        return ["the Triton kNN kernel is not part of this build yet"]

    def search(self, x: torch.Tensor, kc: int, *, src_dtype=None):
        raise NotImplementedError


register(TritonBackend())
