"""C++ core backend (``gelora._C``: pybind11 + OpenMP, symmetric tiles). Placeholder until the core lands."""
from __future__ import annotations

from typing import List

import torch

from . import KnnBackend, register


class CppBackend(KnnBackend):
    name = "cpp"
    description = "C++ core (OpenMP, symmetric tiles)"

    def _availability_reasons(self) -> List[str]:
        return ["the C++ core is not part of this build yet"]

    def search(self, x: torch.Tensor, kc: int, *, src_dtype=None):
        raise NotImplementedError


register(CppBackend())
