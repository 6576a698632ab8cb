"""Exact kNN and TwoNN over points sharded across the ranks of a ``torch.distributed`` process group.

Every rank holds a shard ``x_local`` of the points (the global order is rank 0's rows, then rank 1's,
...). Queries stay where they are; the key shards travel around a ring (``batch_isend_irecv`` to the
next rank, from the previous one, the next transfer overlapping the current search), so each rank
holds at most two shards at a time: memory O(N_local D), never the whole set, never O(N^2).

The ring carries the points as given. For every shard that passes, a rank centres it with the global
mean, searches its own centred points against it with the engine's cross search (the one engine of
:func:`gelora.neighbours.engines.select_backend` with ``need=("cross",)``, the same on every rank: Triton,
FAISS or torch; a forced engine without a cross search, such as the C++ core, raises), re-ranks the
candidates of that shard with distances computed directly from the points as given (not the centred
copies, as :func:`gelora.neighbours.pipeline.knn_exact`) while the shard's vectors are there, and keeps the best ``k``
over all shards. Certification is the one of :func:`gelora.neighbours.pipeline.knn_exact`, per shard: a shard's
non-candidates are at least its ``kc``-th candidate value minus the error bound away (and the
centring's rounding, :func:`gelora.neighbours.certify.centring_floor`), and a row whose k-th distance is above the
smallest such floor is recomputed in float64 in a second ring pass (rare: only when some rank has such
rows), certified in turn, with a brute-force third pass for the rows even float64's shortcut cannot
rank (:func:`_float64_rows`).

:func:`twonn_distributed` adds what the single-process :func:`gelora.twonn` does first: exact
duplicate rows are collapsed across ranks (first occurrence in the global order wins, using
:func:`gelora.id.dedup.unique_rows` on the local shard against each earlier shard), the points are
centred with the global mean (one ``all_reduce``), and the estimate is computed by
:func:`gelora.id.estimate.id_from_distances` on the gathered (N, 2) distances, so every rank returns the
same :class:`gelora.TwoNNResult`, equal to the single-process result on the concatenated points.

Points far from 1 are scaled by a power of two first, as :func:`gelora.knn2` and :func:`gelora.twonn`
scale them (:func:`gelora.neighbours.inputs.power_of_two_scale`), with one scale for all ranks (an ``all_reduce``
of the largest ``|value|``); distances and ``r1_mean`` come back in the units of the points.

Collectives run on CPU tensors for gloo and CUDA tensors for NCCL; rows are sent as raw bytes, so
every dtype travels unchanged. Every rank must call these functions with the same arguments (and
the same dtype and D); a bad input on one rank raises on every rank (no hang).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._registry import BackendUnavailable
from .id.dedup import unique_rows
from .id.estimate import TwoNNResult, check_estimator, result_from_distances
from .neighbours.certify import centring_floor, competitor_radius, float64_floor, norm_bounds
from .neighbours.engines.base import KnnBackend, error_rows
from .neighbours.engines.registry import PRIORITY, select_backend
from .neighbours.inputs import ArrayLike, as_points, power_of_two_scale, to_tensor, unscale_distances
from .neighbours.points import direct_sq_dist
from .neighbours.reference import EXTRA_CANDIDATES, brute_knn

__all__ = ["knn2_distributed", "twonn_distributed"]

#: Elements of one gathered (rows, kc, D) block of the direct re-rank, on every device (the default GPU
#: chunk of :func:`gelora.neighbours.points.direct_sq_dist`, 1 << 16 rows, is a multi-GiB temporary for a large shard).
RERANK_ELEMS = 1 << 22


# ---------------------------------------------------------------------------------------------------
# Process-group plumbing
# ---------------------------------------------------------------------------------------------------
class _Group:
    def __init__(self, group) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first "
                               "(or use gelora.twonn / gelora.knn2 on one process)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            self.comm = torch.device("cuda", torch.cuda.current_device())
        else:
            self.comm = torch.device("cpu")

    def global_rank(self, r: int) -> int:
        if self.group is None:
            return r
        return dist.get_global_rank(self.group, r)

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        c = t.to(self.comm).clone()
        dist.all_reduce(c, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return c.to(t.device)

    def all_gather_sizes(self, n: int) -> List[int]:
        t = torch.tensor([n], dtype=torch.int64, device=self.comm)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return [int(v) for v in out]

    def all_gather_rows(self, t: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Concatenate every rank's (n_r, ...) ``t`` in rank order (on ``t``'s device)."""
        top = max(sizes)
        raw = _as_bytes(t)
        pad = torch.zeros((top,) + tuple(raw.shape[1:]), dtype=torch.uint8, device=self.comm)
        pad[: raw.shape[0]] = raw.to(self.comm)
        out = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(out, pad, group=self.group)
        rows = torch.cat([o[:s] for o, s in zip(out, sizes)])
        return _from_bytes(rows.to(t.device), t.dtype, t.shape[1:])

    def agree(self, error: Optional[BaseException]) -> None:
        """Raise on every rank when any rank hit ``error`` (keeps the ranks in step)."""
        bad = self.all_reduce(torch.tensor([0 if error is None else 1], dtype=torch.int64))
        if error is not None:
            raise error
        if int(bad) > 0:
            raise RuntimeError("another rank of the process group rejected its input (see its error)")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) tensor -> (n, bytes_per_row) uint8 (any dtype travels unchanged)."""
    width = t.element_size() * math.prod(t.shape[1:])
    if t.numel() == 0:
        return torch.empty((t.shape[0], width), dtype=torch.uint8, device=t.device)
    return t.contiguous().reshape(t.shape[0], -1).view(torch.uint8)


def _from_bytes(raw: torch.Tensor, dtype: torch.dtype, tail) -> torch.Tensor:
    n = raw.shape[0]
    if raw.numel() == 0:
        return torch.empty((n,) + tuple(tail), dtype=dtype, device=raw.device)
    return raw.contiguous().view(dtype).reshape((n,) + tuple(tail))


def _ring(g: _Group, payload: torch.Tensor, sizes: List[int],
          fn: Callable[[int, torch.Tensor], None]) -> None:
    """Call ``fn(owner, shard)`` for every rank's (sizes[owner], ...) ``payload``, own shard first.

    The shard travels from rank r to rank r + 1; the transfer of the next shard overlaps ``fn``.
    """
    tail = tuple(payload.shape[1:])
    cur = _as_bytes(payload).to(g.comm)
    width = cur.shape[1]
    for step in range(g.world):
        owner = (g.rank - step) % g.world
        reqs = []
        if step + 1 < g.world:
            src = (g.rank - step - 1) % g.world
            nxt = torch.empty((sizes[src], width), dtype=torch.uint8, device=g.comm)
            ops = [dist.P2POp(dist.isend, cur, g.global_rank((g.rank + 1) % g.world), g.group),
                   dist.P2POp(dist.irecv, nxt, g.global_rank((g.rank - 1) % g.world), g.group)]
            reqs = dist.batch_isend_irecv(ops)
        fn(owner, _from_bytes(cur.to(payload.device), payload.dtype, tail))
        for r in reqs:
            r.wait()
        if step + 1 < g.world:
            cur = nxt


def _local_points(x: ArrayLike, mask: Optional[ArrayLike]) -> Tuple[Optional[torch.Tensor], Optional[Exception]]:
    """``as_points`` on the shard, allowing an empty shard (another rank may hold all the points)."""
    try:
        t = to_tensor(x)
        if t.dim() in (2, 3) and t.shape[-1] > 0 and t.numel() == 0 and mask is None:
            if not t.is_floating_point():
                raise TypeError(f"x: dtype {t.dtype} is not supported; use a floating dtype")
            return t.reshape(0, t.shape[-1]), None
        return as_points(t, mask, min_points=1), None
    except (TypeError, ValueError) as exc:
        return None, exc


_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _check_shapes(g: _Group, x: torch.Tensor) -> None:
    mine = torch.tensor([x.shape[1], _DTYPE_CODE.get(x.dtype, 0)], dtype=torch.int64, device=g.comm)
    out = [torch.empty_like(mine) for _ in range(g.world)]
    dist.all_gather(out, mine, group=g.group)
    if any(int(o[0]) != x.shape[1] or int(o[1]) != int(mine[1]) for o in out):
        raise ValueError("every rank must pass points of the same dimension D and dtype; got "
                         + ", ".join(f"rank {r}: D={int(o[0])} dtype#{int(o[1])}" for r, o in enumerate(out)))


def _merge(best_d, best_i, new_d, new_i, k):
    """Keep the k smallest (distance, global index) pairs per row (ties broken by the index)."""
    d = torch.cat([best_d, new_d], 1)
    i = torch.cat([best_i, new_i], 1)
    o = torch.argsort(i, dim=1, stable=True)
    d, i = torch.gather(d, 1, o), torch.gather(i, 1, o)
    o = torch.argsort(d, dim=1, stable=True)[:, :k]
    return torch.gather(d, 1, o), torch.gather(i, 1, o)


def _knn_sharded(g: _Group, xt: torch.Tensor, xc: torch.Tensor, mean: torch.Tensor, sizes: List[int], k: int,
                 engine: KnnBackend) -> Tuple[torch.Tensor, torch.Tensor, int, str]:
    """k nearest neighbours (global indices) of the local rows ``xt`` among all ranks' rows.

    ``xc`` is the local shard centred with the global float64 ``mean`` (:func:`_centre_global`). The
    ring carries the points as given; every rank centres a shard it receives the same way, searches
    the centred copy with its engine, and re-ranks the candidates with direct distances of the points
    as given (as :func:`gelora.neighbours.pipeline.knn_exact`, whose certification it repeats per shard, with the
    centring term of :func:`gelora.neighbours.certify.centring_floor`).

    Returns squared distances (n_local, k) (float32, float64 for float64 points), indices
    (n_local, k) int64, the number of rows recomputed in float64 on all ranks, and the engine used.
    """
    n, d = xc.shape
    offsets = [sum(sizes[:r]) for r in range(g.world)]
    my_off = offsets[g.rank]
    total = sum(sizes)
    kc = engine.candidates_for(k, total)
    cdt = xc.dtype
    m_c = mean.to(device=xc.device, dtype=cdt)
    # one bound on |value| for all ranks: engines that round their operands (the Triton tiles) then
    # round every shard alike
    local_top = torch.tensor([float(xc.abs().max()) if xc.numel() else 0.0], dtype=torch.float64)
    top = float(g.all_reduce(local_top, dist.ReduceOp.MAX))
    name = engine.name
    # upper bounds on the norms of the local centred rows, for the centring term
    q_norm = norm_bounds(torch.linalg.vector_norm(xc, dim=1).square_(), d) if n else None

    inf = float("inf")
    best_d = torch.full((n, k), inf, dtype=cdt, device=xc.device)
    best_i = torch.full((n, k), -1, dtype=torch.int64, device=xc.device)
    # per shard with non-candidates: (kc-th approximate distances, error bound, largest key norm)
    shards = []

    def visit(owner: int, keys: torch.Tensor) -> None:
        nonlocal best_d, best_i
        if n == 0 or keys.shape[0] == 0:
            return
        k_off = offsets[owner]
        own = owner == g.rank
        avail = keys.shape[0] - (1 if own else 0)
        kcs = min(kc, avail)
        if kcs <= 0:
            return
        # the shard centred as _centre_global centres every rank's points (bit for bit)
        keys_c = xc if own else (keys.to(cdt) - m_c).contiguous()
        d_apx, i_loc, err, _ = engine.cross_search(xc, keys_c, kcs, q_offset=my_off, k_offset=k_off, top=top)
        # -1 marks a missing candidate: any valid index stands in, the result is masked below
        exact = direct_sq_dist(xt, None, i_loc.clamp_min(0), keys, chunk_elems=RERANK_ELEMS, dtype=cdt)
        exact = torch.where(i_loc >= 0, exact, torch.full_like(exact, inf))
        gidx = torch.where(i_loc >= 0, i_loc + k_off, i_loc)
        best_d, best_i = _merge(best_d, best_i, exact, gidx, k)
        if kcs < avail:  # some keys of this shard are not candidates: bound them from below at the end
            k_norm = norm_bounds(torch.linalg.vector_norm(keys_c, dim=1).square_(), d).max()
            shards.append((d_apx[:, -1].to(torch.float64), err, k_norm))

    _ring(g, xt, sizes, visit)

    if n:
        # the certification of gelora.neighbours.certify.uncertified_rows, per shard: a key beyond the row's window
        # (competitor_radius) cannot undercut its k-th distance, every other key's error is bounded at
        # the window, so a few outlier rows on any rank do not loosen the other rows' bounds
        kth = best_d[:, -1].to(torch.float64)
        win = competitor_radius(q_norm, kth, d, cdt)
        floor = torch.full((n,), inf, dtype=torch.float64, device=xc.device)
        for cand_last, err, k_norm in shards:
            w = torch.minimum(win, k_norm)
            f = cand_last - error_rows(err, w, device=xc.device)
            floor = torch.minimum(floor, centring_floor(f, q_norm, w, cdt, d))
        bad = torch.nonzero(~(kth <= floor)).flatten()
    else:
        bad = torch.empty(0, dtype=torch.int64, device=xc.device)
    n_bad = int(g.all_reduce(torch.tensor([bad.numel()], dtype=torch.int64)))
    if n_bad:
        fd, fi = _float64_rows(g, xt, mean, bad, sizes, offsets, k)
        best_d = best_d.clone()
        best_d[bad] = fd.to(best_d.dtype)
        best_i[bad] = fi
    return best_d, best_i, n_bad, name


def _brute_rows(g: _Group, xt: torch.Tensor, bq: torch.Tensor, bq_glob: torch.Tensor, sizes, offsets,
                k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 k-NN (squared distances, global indices) of the float64 rows ``bq`` (global indices
    ``bq_glob``, excluded from their own results) by brute-force direct differences against every shard
    (:func:`gelora.neighbours.reference.brute_knn`) over the ring. Every rank takes part, rows or not."""
    inf = float("inf")
    bd = torch.full((bq.shape[0], k), inf, dtype=torch.float64, device=xt.device)
    bi = torch.full((bq.shape[0], k), -1, dtype=torch.int64, device=xt.device)

    def brute(owner: int, keys: torch.Tensor) -> None:
        nonlocal bd, bi
        if bq.shape[0] == 0 or keys.shape[0] == 0:
            return
        self_cols = bq_glob - offsets[owner]
        self_cols = torch.where((self_cols >= 0) & (self_cols < keys.shape[0]), self_cols,
                                torch.full_like(self_cols, -1))
        sd, si = brute_knn(bq, keys, min(k, keys.shape[0]), self_cols)
        # a row's own key (excluded at inf) can only be among these when the shard is that small
        si = torch.where(sd == inf, torch.full_like(si, -1), si + offsets[owner])
        bd, bi = _merge(bd, bi, sd, si, k)

    _ring(g, xt, sizes, brute)
    return bd, bi


def _float64_rows(g: _Group, xt: torch.Tensor, mean: torch.Tensor, rows: torch.Tensor, sizes, offsets, k):
    """Exact float64 k-NN (squared distances, global indices) of the local rows ``rows`` of the points
    ``xt`` against every shard: :func:`gelora.neighbours.reference.reference_rows` over the ring.

    A second ring pass finds float64 shortcut candidates per shard (the points centred in float64 with
    the global ``mean``), re-ranks them by direct float64 distances of the points as given, and bounds
    each shard's non-candidates from below (:func:`gelora.neighbours.certify.float64_floor`, with the shard's largest
    norm). Rows whose k-th distance is not below the smallest such floor (points far from the mean
    relative to their neighbour distances, where even float64 cannot rank through the shortcut) get a
    third ring pass on every rank: a brute-force direct-difference search against every shard
    (:func:`gelora.neighbours.reference.brute_knn`), which replaces their answer where the distances differ. Ties by
    global index. Every rank takes part in both passes, rows or not.
    """
    q = xt[rows].to(torch.float64)
    qc = q - mean.to(device=q.device, dtype=torch.float64)
    m, d = q.shape
    sq = (qc * qc).sum(1)
    dev = xt.device
    inf = float("inf")
    best_d = torch.full((m, k), inf, dtype=torch.float64, device=dev)
    best_i = torch.full((m, k), -1, dtype=torch.int64, device=dev)
    floor = torch.full((m,), inf, dtype=torch.float64, device=dev)
    q_glob = rows + offsets[g.rank]
    mean64 = mean.to(device=dev, dtype=torch.float64)

    def visit(owner: int, keys: torch.Tensor) -> None:
        nonlocal best_d, best_i, floor
        if m == 0 or keys.shape[0] == 0:
            return
        kk = keys.to(torch.float64) - mean64
        sk = (kk * kk).sum(1)
        sk_max = sk.max()
        kg = torch.arange(kk.shape[0], device=dev) + offsets[owner]
        own = owner == g.rank
        c = min(kk.shape[0], k + EXTRA_CANDIDATES)
        avail = kk.shape[0] - (1 if own else 0)
        block = max(1, (64 << 20) // max(1, 8 * kk.shape[0]))
        for s in range(0, m, block):
            e = min(m, s + block)
            d2 = sq[s:e].unsqueeze(1) + sk.unsqueeze(0) - 2.0 * (qc[s:e] @ kk.T)
            d2[q_glob[s:e].unsqueeze(1) == kg.unsqueeze(0)] = inf
            ad, cand = torch.topk(d2, c, dim=1, largest=False)
            del d2
            exact = direct_sq_dist(q[s:e], None, cand, keys, chunk_elems=RERANK_ELEMS, dtype=torch.float64)
            exact = torch.where(ad == inf, torch.full_like(exact, inf), exact)
            nd, ni = _merge(best_d[s:e], best_i[s:e], exact, cand + offsets[owner], k)
            best_d[s:e] = nd
            best_i[s:e] = ni
            if c < avail:  # some keys of this shard are not candidates: bound them from below
                f = float64_floor(ad[:, -1], sq[s:e], sk_max, d, torch.float64)
                floor[s:e] = torch.minimum(floor[s:e], f)

    _ring(g, xt, sizes, visit)

    # "not <" also catches NaN
    unsure = torch.nonzero(~(best_d[:, -1] < floor)).flatten()
    n_unsure = int(g.all_reduce(torch.tensor([unsure.numel()], dtype=torch.int64)))
    if n_unsure:
        bd, bi = _brute_rows(g, xt, q[unsure], q_glob[unsure], sizes, offsets, k)
        # where the candidates already had the k smallest distances (a tie with a non-candidate),
        # their indices are as good: keep them (as gelora.neighbours.reference.reference_rows does)
        wrong = (bd != best_d[unsure]).any(dim=1)
        best_d[unsure[wrong]] = bd[wrong]
        best_i[unsure[wrong]] = bi[wrong]
    return best_d, best_i


def _select(g: _Group, xt: torch.Tensor, backend: Optional[str], k: int) -> KnnBackend:
    """The engine of the ring, the same on every rank: the forced one, else the first that can search this
    rank's shard and cross-search others (:func:`gelora.neighbours.engines.select_backend` with
    ``need=("cross",)``). A forced engine that cannot, or ranks that would pick different engines,
    raise on every rank."""
    error = None
    engine = None
    try:
        engine = select_backend(xt, backend, need=("cross",), k=k)
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    g.agree(error)
    code = torch.tensor([PRIORITY.index(engine.name)], dtype=torch.int64)
    lo = int(g.all_reduce(code.clone(), dist.ReduceOp.MIN))
    hi = int(g.all_reduce(code.clone(), dist.ReduceOp.MAX))
    if lo != hi:
        raise BackendUnavailable(f"the ranks chose different kNN engines ({PRIORITY[lo]} ... {PRIORITY[hi]}); "
                                 "force one with backend=")
    return engine


def _agreed_scale(g: _Group, x: torch.Tensor) -> float:
    """:func:`gelora.neighbours.inputs.power_of_two_scale` of all ranks' points together: the largest ``|value|``
    over the ranks (one ``all_reduce`` of the max), so that every rank scales by the same power of two
    (a rank scaling its shard alone would change the distances between shards)."""
    def reduce(top: float) -> float:
        return float(g.all_reduce(torch.tensor([top], dtype=torch.float64), dist.ReduceOp.MAX))

    return power_of_two_scale(x, reduce=reduce)


def _centre_global(g: _Group, x: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x - mean`` with the mean of all ranks' rows taken in float64 (as :func:`gelora.neighbours.points.centre`),
    and that (D,) float64 mean (the same on every rank)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.sum(dim=0, dtype=torch.float64) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64,
                                                                         device=x.device)
    mean = g.all_reduce(s) / total
    return (x.to(cdt) - mean.to(device=x.device, dtype=cdt)).contiguous(), mean


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
def knn2_distributed(
    x_local: ArrayLike,
    k: int = 2,
    group=None,
    *,
    backend: Optional[str] = None,
    gather: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of the points of all ranks (global indices), like :func:`gelora.knn2`
    on the concatenation of every rank's ``x_local`` in rank order.

    Args:
        x_local: (n_r, D) or (B, T, D) shard of this rank (tensor/array; may be empty on some ranks).
        k: neighbours per point.
        group: process group (default: the world group).
        backend: force the engine of the cross searches (one with a cross search: ``"triton"``,
            ``"faiss"``, ``"torch"``); default: the first usable one. A forced engine that cannot run,
            or has no cross search, raises :class:`gelora.BackendUnavailable` on every rank.
        gather: return the (N, k) result of all points on every rank (default) or only this rank's rows.

    Returns:
        dist: (N, k) float32 distances (not squared), ascending; idx: (N, k) int64 global indices.
    """
    g = _Group(group)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    xt, err = _local_points(x_local, None)
    g.agree(err)
    _check_shapes(g, xt)
    sizes = g.all_gather_sizes(xt.shape[0])
    total = sum(sizes)
    if total < k + 1:
        raise ValueError(f"x: {total} point(s) over all ranks; k={k} needs at least {k + 1}")
    engine = _select(g, xt, backend, k)
    scale = _agreed_scale(g, xt)
    if scale != 1.0:
        xt = xt * scale
    xc, mean = _centre_global(g, xt, total)
    d2, idx, _, _ = _knn_sharded(g, xt, xc, mean, sizes, k, engine)
    dist_ = unscale_distances(d2.clamp_min(0).sqrt(), scale).float()
    if gather:
        dist_ = g.all_gather_rows(dist_, sizes)
        idx = g.all_gather_rows(idx, sizes)
    return dist_, idx


def twonn_distributed(
    x_local: ArrayLike,
    group=None,
    *,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    dedup: bool = True,
    backend: Optional[str] = None,
    mask: Optional[ArrayLike] = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> TwoNNResult:
    """Exact TwoNN intrinsic dimension of the points of all ranks; the same result on every rank.

    Arguments as :func:`gelora.twonn` (``x_local`` and ``mask`` are this rank's shard), plus ``group``
    (default: the world group). Equal to ``gelora.twonn`` of the concatenated shards (rank order).
    """
    g = _Group(group)
    error: Optional[BaseException] = None
    try:
        check_estimator(estimator, discard_fraction, bootstrap)
    except ValueError as exc:
        error = exc
    xt, perr = _local_points(x_local, mask)
    g.agree(error or perr)
    _check_shapes(g, xt)
    n_points = sum(g.all_gather_sizes(xt.shape[0]))
    scale = _agreed_scale(g, xt)
    if scale != 1.0:
        xt = xt * scale

    if dedup:
        if xt.shape[0]:
            keep, _ = unique_rows(xt)
            xt = xt[keep]
        xt = _drop_earlier_duplicates(g, xt)
    sizes = g.all_gather_sizes(xt.shape[0])
    total = sum(sizes)
    n_dup = n_points - total
    if total < 3:
        raise ValueError(f"only {total} distinct point(s) among {n_points} over all ranks; TwoNN needs at least 3")
    engine = _select(g, xt, backend, 2)
    xc, mean = _centre_global(g, xt, total)
    d2, _, n_fixed, used = _knn_sharded(g, xt, xc, mean, sizes, 2, engine)
    dist_all = g.all_gather_rows(d2.clamp_min(0).sqrt(), sizes)
    return result_from_distances(dist_all, estimator=estimator, discard_fraction=discard_fraction,
                                 bootstrap=bootstrap, seed=seed, dedup=dedup, n_points=n_points,
                                 n_duplicates=n_dup, backend=used, n_fixed=n_fixed, scale=scale)


def _drop_earlier_duplicates(g: _Group, xt: torch.Tensor) -> torch.Tensor:
    """Drop local rows that equal a row of an earlier rank (bit-exact, as :func:`unique_rows`)."""
    if g.world == 1:
        return xt
    sizes = g.all_gather_sizes(xt.shape[0])
    dup = torch.zeros(xt.shape[0], dtype=torch.bool, device=xt.device)

    def visit(owner: int, rows: torch.Tensor) -> None:
        if owner >= g.rank or rows.shape[0] == 0 or xt.shape[0] == 0:
            return
        keep, _ = unique_rows(torch.cat([rows, xt]))
        first = torch.zeros(rows.shape[0] + xt.shape[0], dtype=torch.bool, device=xt.device)
        first[keep] = True
        dup.logical_or_(~first[rows.shape[0]:])

    _ring(g, xt, sizes, visit)
    return xt[~dup]
