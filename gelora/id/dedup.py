"""Exact duplicate rows: hashed, verified, collapsed (the duplicates policy of :mod:`gelora.id.estimate`).

A decoder's first token has the same hidden state in every sequence, and padding or repeated tokens
give more copies; duplicates have ``r1 = 0`` (an infinite ``mu``), so :func:`gelora.twonn` collapses
them first. Rows are hashed with a random integer projection of their bits (the C++ core does it in
the same pass as the finiteness check and the mean), grouped by hash, and equal hashes are verified
row by row, so a hash collision never merges distinct rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..neighbours.inputs import cpu_core

# ---------------------------------------------------------------------------------------------------
# Duplicates
# ---------------------------------------------------------------------------------------------------
#: Elements hashed per chunk (bounds the int64 temporary: 64 MiB).
HASH_CHUNK_ELEMS = 1 << 23


_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def hash_coef(d: int) -> torch.Tensor:
    """The (d,) int64 CPU coefficients (odd, fixed seed) of the row hash of :func:`unique_rows`."""
    gen = torch.Generator(device="cpu").manual_seed(0x6E10)
    return torch.randint(1, 2**62, (d,), generator=gen, dtype=torch.int64) | 1


def unique_rows(x: torch.Tensor, hashes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """Indices of the first occurrence of every distinct row of ``x`` (bit-exact, ``-0.0 == 0.0``).

    Rows are hashed with a random 64-bit linear hash of their bit patterns (one pass, O(N D)), equal
    hashes are verified element-wise, and a collision falls back to ``torch.unique(dim=0)``.

    Args:
        x: (N, D) float tensor.
        hashes: (N,) int64 hashes of the rows of ``x`` with :func:`hash_coef` when the caller has them
            (:func:`gelora.neighbours.inputs.check_points` returns them from its pass over the points).

    Returns:
        keep: (M,) int64 sorted indices of the rows to keep; n_duplicates = N - M.
    """
    n, d = x.shape
    core = cpu_core(x)
    if hashes is not None:
        h = hashes.to(x.device)
    elif core is not None:
        h = torch.from_numpy(core.prepare_points(x.detach().contiguous().numpy(), hash_coef(d).numpy(),
                                                 n_threads=torch.get_num_threads())[0])
    else:
        coef = hash_coef(d).to(x.device)
        h = torch.empty(n, dtype=torch.int64, device=x.device)
        step = max(1, HASH_CHUNK_ELEMS // d)
        for s in range(0, n, step):
            bits = (x[s : s + step] + 0.0).view(_INT_VIEW[x.dtype]).to(torch.int64)
            # a linear hash of the row's bit pattern, wrapping modulo 2^64 (integer mv on the CPU is ~10x
            # faster than mul + sum; CUDA has no integer mv)
            h[s : s + step] = bits @ coef if x.device.type == "cpu" else (bits * coef).sum(dim=1)
    uniq, inverse = torch.unique(h, return_inverse=True)
    if uniq.numel() == n:
        return torch.arange(n, device=x.device), 0
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=x.device), reduce="amin")
    rep = first[inverse]
    later = torch.nonzero(rep != torch.arange(n, device=x.device)).flatten()
    same = (x[later] == x[rep[later]]).all(dim=1)
    if not bool(same.all()):  # a hash collision between distinct rows: exact (slower) path
        _, inv = torch.unique(x + 0.0, dim=0, return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), n, dtype=torch.int64, device=x.device)
        first.scatter_reduce_(0, inv, torch.arange(n, device=x.device), reduce="amin")
    keep = torch.sort(first).values
    return keep, n - keep.numel()
