"""The points as the pipeline prepares and measures them: the float64 column mean, the centred copy
the engines search, and squared distances computed directly (no norm shortcut).

Centring comes first because the ``|x|^2 + |y|^2 - 2<x,y>`` shortcut that fast engines use loses
``~u * |x|^2`` absolute accuracy, so large offsets must go; the distances the pipeline reports are
computed directly from the points as given (:func:`direct_sq_dist`), so centring's rounding never enters
them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _env
from .inputs import cpu_core

#: Elements of one gathered (rows, kc, D) block in the direct re-rank on the CPU (~4 MiB of float32;
#: 256 rows x 4 x 768 measured fastest on a 2-core AVX2 box: 3 ms for 4096 x 4 x 768).
RERANK_CHUNK_ELEMS = 1 << 20


#: Bytes of working memory that the float64 recomputation of failing rows (:func:`gelora.neighbours.reference.reference_rows`) and
#: the mean of the points (:func:`column_mean`) may take beyond the input and its centred copy, whatever
#: N: float64 chunks of the points, the query rows and their distance tile. ``GELORA_CHUNK_BYTES``
#: overrides it (bytes; e.g. ``268435456`` for 256 MiB).
CHUNK_BYTES = 1 << 30


def chunk_bytes() -> int:
    """Bytes of working memory the float64 recomputation and the chunked mean may take beyond the input
    and its centred copy (``GELORA_CHUNK_BYTES``, at least 1 MiB; default :data:`CHUNK_BYTES`)."""
    v = _env.integer("GELORA_CHUNK_BYTES", CHUNK_BYTES, minimum=1 << 20)
    return int(v)


def column_mean(x: torch.Tensor) -> torch.Tensor:
    """(D,) float64 column mean of the (N, D) points ``x`` (any float dtype and device), summed chunk by
    chunk so that no float64 copy of all the points is made (a chunk of at most an eighth of
    :func:`chunk_bytes`)."""
    n, d = x.shape
    step = max(1, chunk_bytes() // (8 * 8 * max(1, d)))
    acc = torch.zeros(d, dtype=torch.float64, device=x.device)
    for s in range(0, n, step):
        acc += x[s : s + step].sum(dim=0, dtype=torch.float64)
    return acc / max(1, n)


def centre(
    x: torch.Tensor, compute_dtype: Optional[torch.dtype] = None, *, mean: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x - mean(x)`` with the mean taken in float64, returned in ``compute_dtype`` (default: float32,
    float64 for float64 input), contiguous, on the device of ``x``.

    ``mean``: the (D,) float64 column mean of ``x`` when the caller already has it (the C++ core's
    ``prepare_points`` returns it with the finiteness count and the row hashes), so the points are not
    read once more just for it; it must be the mean of exactly these rows.

    Every coordinate is one rounding of ``x - m~``, with ``m~`` the mean rounded to ``compute_dtype``
    (the same for every row): what :func:`centring_floor` accounts for."""
    return centre_and_mean(x, compute_dtype, mean=mean)[0]


def centre_and_mean(
    x: torch.Tensor, compute_dtype: Optional[torch.dtype] = None, *, mean: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`centre` and the (D,) float64 mean it subtracted (``mean`` itself when given; on the CPU
    for the C++ core, else on the device of ``x``), which the float64 recomputation of
    :func:`knn_exact` centres the points with."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    core = cpu_core(x) if x.dtype == compute_dtype else None
    if core is not None:
        arr = x.detach().contiguous().numpy()
        nt = torch.get_num_threads()
        if mean is None:
            _, m, _ = core.prepare_points(arr, n_threads=nt)
            mean = torch.from_numpy(m)
        else:
            mean = mean.detach().to("cpu", torch.float64).contiguous()
            m = mean.numpy()
        return torch.from_numpy(core.centre(arr, m, n_threads=nt)), mean
    if mean is None:
        mean = column_mean(x.detach())
    mean = mean.detach().to(device=x.device, dtype=torch.float64)
    xc = x.detach().to(compute_dtype, memory_format=torch.contiguous_format, copy=True)
    return xc.sub_(mean.to(compute_dtype)), mean


def direct_sq_dist(
    x: torch.Tensor,
    rows: Optional[torch.Tensor],
    cand: torch.Tensor,
    keys: Optional[torch.Tensor] = None,
    *,
    chunk_elems: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Squared distances ``sum((x[rows[i]] - keys[cand[i, j]])^2)`` computed directly (no norm shortcut).

    Args:
        x: (N, D) query points, any float dtype.
        rows: (M,) int64 indices of the query rows in ``x``; None: every row of ``x`` in order (M = N).
        cand: (M, C) int64 indices into ``keys``.
        keys: (K, D) points that ``cand`` indexes, any float dtype; default ``x`` itself (the
            distributed search passes the shard in hand).
        chunk_elems: elements of one gathered (rows, C, D) block; default cache-sized on the CPU and
            ``1 << 16`` rows on a GPU (the distributed search bounds it on every device).
        dtype: the dtype of the arithmetic; the gathered rows are converted to it chunk by chunk (no
            copy of all the points), exactly when it is at least as wide as theirs. Default: the dtype
            of ``x``, float32 for float16/bfloat16.

    Returns:
        (M, C) tensor of ``dtype``. A pair gets the same value whatever the chunking and whichever
        rows are asked with it (the same elementwise float operations and the same reduction).
    """
    if keys is None:
        keys = x
    if dtype is None:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    m = cand.shape[0]
    out = torch.empty(cand.shape, dtype=dtype, device=x.device)
    kc, d = cand.shape[1], x.shape[1]
    if chunk_elems is None:
        # small chunks keep the gathered (rows, C, D) block in cache: ~15x faster than one big gather
        step = max(1, RERANK_CHUNK_ELEMS // max(1, kc * d)) if x.device.type == "cpu" else 1 << 16
        if x.device.type != "cpu" and keys.dtype != dtype:
            # the gathered block and its converted copy together take the bytes of one block of dtype
            size = torch.empty(0, dtype=dtype).element_size()
            step = max(1, step * size // (size + keys.element_size()))
    else:
        step = max(1, chunk_elems // max(1, kc * d))
    for s in range(0, m, step):
        c = cand[s : s + step]
        g = torch.index_select(keys, 0, c.reshape(-1)).view(c.shape[0], kc, d)
        if g.dtype != dtype:
            g = g.to(dtype)
        q = x[s : s + step] if rows is None else torch.index_select(x, 0, rows[s : s + step])
        g.sub_(q.to(dtype).unsqueeze(1))
        out[s : s + step] = g.pow_(2).sum(dim=-1)
    return out
