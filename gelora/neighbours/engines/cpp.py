"""C++ core backend (``gelora._C``): symmetric distance tiles, pybind11 + OpenMP, CPU tensors.

The distance matrix of a point set with itself is symmetric, so one tile (I, J), I <= J, feeds the
top-k lists of the rows of I *and* of J: half the arithmetic of a query/database engine such as FAISS
flat. The tile products come from a register-blocked FMA kernel (AVX-512, AVX2+FMA or portable,
chosen at run time), and the norm addition, the self exclusion (by index) and the top-k selection run
in its epilogue on the registers, so no distance tile is ever written to memory (``csrc/``).

The dot products are sequential sums of products (FMA where the CPU has it) in the dtype of the
(centred) input, spilled between chunks of 128-512 terms, which the probabilistic ``sqrt(D) u |x| |y|``
model of :func:`gemm_error_model` covers as it does a BLAS GEMM; the shared pipeline re-ranks and
certifies the candidates.
"""
from __future__ import annotations

from typing import List

import torch

from ... import _env
from .base import Candidates, KnnBackend
from .registry import register
from .torch import gemm_error_model


def _core():
    core = _env.core()
    if core is None:
        raise ImportError(_env.core_error())
    return core


class CppBackend(KnnBackend):
    name = "cpp"
    description = "C++ core (OpenMP, symmetric tiles, fused top-k epilogue; AVX-512/AVX2/portable kernels)"

    def _availability_reasons(self) -> List[str]:
        try:
            _core()
        except ImportError as exc:
            return [
                f"the C++ core gelora._C is not built or does not load ({exc}); it needs cmake, pybind11 and "
                "a C++17 compiler at install time (GELORA_REQUIRE_EXT=1 pip install -e . shows the build error)"
            ]
        return []

    def _input_reasons(self, x: torch.Tensor) -> List[str]:
        if x.device.type != "cpu":
            return [f"input is on {x.device.type}; the C++ core takes CPU tensors only"]
        return []

    def search(self, x: torch.Tensor, kc: int) -> Candidates:
        """See :meth:`gelora.neighbours.engines.base.KnnBackend.search`. ``x`` (N, D) float32/float64 on the
        CPU; other float dtypes are computed in float32. Uses ``torch.get_num_threads()`` threads. The
        (N,) squared norms the core computed for its tiles come back too (no second pass)."""
        work = x.detach()
        if work.dtype not in (torch.float32, torch.float64):
            work = work.float()
        arr = work.contiguous().numpy()
        d2, idx, sq, _ = _core().knn_candidates(arr, int(kc), n_threads=torch.get_num_threads())
        sq = torch.from_numpy(sq)
        return Candidates(torch.from_numpy(d2), torch.from_numpy(idx),
                          gemm_error_model(sq, arr.shape[1], work.dtype), sq)

    def cross_reasons(self) -> List[str]:
        return ["the C++ core searches a point set against itself only (symmetric tiles); the "
                "distributed ring needs queries against another shard: use backend='torch' or 'faiss'"]

    def rerank(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Direct squared distances ``sum((x[i] - x[cand[i, j]])^2)`` in the dtype of ``x`` (no norm
        shortcut: equal rows give exactly 0), computed by the C++ core.

        Args:
            x: (N, D) float32/float64 CPU tensor: the points the candidates were searched for (the
                pipeline passes the user's points, not their centred copy given to :meth:`search`).
            cand: (N, C) int64 indices into ``x``.

        Returns:
            (N, C) tensor of the dtype of ``x``.
        """
        arr = x.detach().contiguous().numpy()
        idx = cand.detach().to(torch.int64).contiguous().numpy()
        return torch.from_numpy(_core().direct_sq_dist(arr, idx, n_threads=torch.get_num_threads()))


register(CppBackend())
