"""The kNN engine contract: what every engine (torch, C++, FAISS, Triton) declares and does.

An engine is fast, not exact: for every query row it returns ``kc`` *candidate* neighbours with
approximate squared distances and an error bound (:meth:`KnnBackend.search`, and
:meth:`KnnBackend.cross_search` for the distributed ring: queries against another shard). The shared
pipeline (:mod:`gelora.neighbours.pipeline`) re-ranks the candidates with directly computed distances
(:meth:`KnnBackend.rerank`) and certifies the result (:mod:`gelora.neighbours.certify`), so every engine is
exact. Every engine answers :meth:`KnnBackend.not_supported_reasons` (and
:meth:`KnnBackend.cross_reasons`), which selection (:mod:`gelora.neighbours.engines.registry`) reads.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch

from ..._registry import BackendUnavailable  # noqa: F401  (part of the contract's vocabulary)
from ..points import direct_sq_dist




class KnnBackend:
    """Base class of a k-nearest-neighbour candidate engine.

    Subclasses set :attr:`name`, override :meth:`_availability_reasons` (checked once: imports,
    compiled extensions) and :meth:`_input_reasons` (per input: device, dtype, size), and implement
    :meth:`search`; those that can serve the distributed ring implement :meth:`cross_search` and
    :meth:`cross_reasons`; :meth:`rerank` has a plain default.
    """

    name: str = "?"
    description: str = ""
    #: Candidates per row beyond k that the pipeline asks for at small k (more: fewer float64 fallbacks);
    #: at large k it asks for k // 16 (:meth:`candidates_for`).
    extra_candidates: int = 2
    #: The largest ``kc`` :meth:`search` supports (the Triton kernel keeps its candidates in registers),
    #: and so the largest k the engine serves (:meth:`candidates_for`).
    max_candidates: int = 1 << 30

    def candidates_for(self, k: int, n: int) -> int:
        """How many candidates per row the pipeline asks for when it needs ``k`` neighbours among ``n``
        points: ``k`` plus :attr:`extra_candidates`, at most ``n - 1`` and at most
        :attr:`max_candidates`. Near the cap ``kc`` may be as small as ``k``: the certificate compares the
        k-th re-ranked distance with the kc-th candidate value whatever kc is, so it still holds; rows it
        cannot certify then go to the exact fallback more often.

        The extra candidates are ``max(extra_candidates, k // 16)``: a row is certified when the gap between
        its k-th and kc-th distances exceeds the engine's error bound, and at large k the neighbour
        distances are dense. GRIDE's k = 64 on SmolLM2-135M block 12 (7,731 distinct tokens x 576, cpp
        engine, 2 threads): 2 extra candidates sent 1,205 rows to the fallback (gride 0.81 s), 4 send 10
        (0.59 s), 8 send 10 (0.54 s); on a 20k x 768 manifold, where 2 suffice, 4 and 8 cost 2% and 6% more
        (medians of 3). TwoNN's k = 2 keeps its 2.

        Raises:
            ValueError: ``k`` is above :attr:`max_candidates` (the reasons of :meth:`k_reasons`).
        """
        reasons = self.k_reasons(k)
        if reasons:
            raise ValueError(f"{self.name}: " + "; ".join(reasons))
        return min(n - 1, k + max(self.extra_candidates, k // 16), self.max_candidates)

    def k_reasons(self, k: int) -> List[str]:
        """Reasons this engine cannot give ``k`` neighbours per row (empty when it can)."""
        if k > self.max_candidates:
            return [f"the {self.name} engine keeps at most {self.max_candidates} candidates per row, so k <= "
                    f"{self.max_candidates}; k={k} asked"]
        return []

    def __init__(self) -> None:
        self._avail: Optional[List[str]] = None

    # -- declaration ---------------------------------------------------------------------------
    def _availability_reasons(self) -> List[str]:
        return []

    def _input_reasons(self, x: torch.Tensor) -> List[str]:
        return []

    def availability_reasons(self) -> List[str]:
        """Reasons this backend cannot run at all on this machine (empty when it can)."""
        if self._avail is None:
            try:
                self._avail = list(self._availability_reasons())
            except Exception as exc:  # noqa: BLE001 - a broken optional dependency is a reason
                self._avail = [f"availability check failed: {exc!r}"]
        return self._avail

    def not_supported_reasons(self, x: torch.Tensor, forced: bool = False, *, k: Optional[int] = None) -> List[str]:
        """Reasons this backend cannot handle ``x`` (empty list when it can).

        ``forced``: the user named this backend; an engine may then accept inputs it would not be
        picked for automatically (the Triton engine streams a CPU tensor through the GPU).
        ``k``: neighbours per row the job needs (:meth:`k_reasons`); None: not checked."""
        reasons = self.availability_reasons()
        if reasons:
            return list(reasons)
        return list(self._input_reasons(x)) + ([] if k is None else self.k_reasons(k))

    # -- work ----------------------------------------------------------------------------------
    def search(self, x: torch.Tensor, kc: int) -> "Candidates":
        """Candidate neighbours of every row of ``x`` among the other rows.

        Args:
            x: (N, D) centred points, contiguous, float32 (float64 when the input was float64), on the
                device of the user's input (an engine with its own tile precision, e.g. the Triton
                kernel's fp16 tiles, rounds them itself and reports the larger error bound).
            kc: number of candidates per row, ``1 <= kc <= N - 1``.

        Returns:
            :class:`Candidates`: ``d2`` (N, kc) approximate squared distances, ascending per row;
            ``idx`` (N, kc) int64 indices into ``x``, never the row itself; ``err``, the error bound
            (see :class:`Candidates`); ``sq``, the (N,) squared norms of the rows when the engine
            computed them on its way (None otherwise, and the pipeline computes them).
        """
        raise NotImplementedError

    def cross_reasons(self) -> List[str]:
        """Reasons this engine cannot run :meth:`cross_search` (empty when it can)."""
        return [f"the {self.name} engine has no cross search (queries against another shard, needed by "
                "the distributed ring)"]

    def cross_search(
        self, q: torch.Tensor, keys: torch.Tensor, kc: int, *, q_offset: int, k_offset: int,
        top: Optional[float] = None,
    ) -> "Candidates":
        """Candidate neighbours of the query rows ``q`` among the rows of ``keys`` (another shard, or the
        same one): the search of the distributed ring.

        Args:
            q: (M, D) centred query points; keys: (K, D) centred keys (same dtype and device).
            kc: candidates per row, ``1 <= kc <= K``.
            q_offset, k_offset: global indices of the first query and the first key; a key whose global
                index equals a query's is that query itself and is never its candidate.
            top: an upper bound on ``|value|`` over all shards, for engines that scale their tile
                operands (every rank must round the same way); None: from ``q`` and ``keys``.

        Returns:
            :class:`Candidates` with ``idx`` into ``keys`` (-1 and ``d2 = inf`` where a row has fewer
            than ``kc`` keys) and an ``err`` that holds for the keys of this call.
        """
        raise NotImplementedError(f"{self.name}: " + "; ".join(self.cross_reasons()))

    def rerank(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Direct squared distances ``sum((x[i] - x[cand[i, j]])^2)`` (no norm shortcut: equal rows give
        exactly 0), in the dtype of ``x`` (float32 or float64).

        Args:
            x: (N, D) the points the candidates were searched for (the pipeline passes the user's points,
                converted exactly to the search dtype, not the centred copy given to :meth:`search`).
            cand: (N, C) int64 indices into ``x``.

        Returns:
            (N, C) tensor of the dtype of ``x``. Engines with a faster kernel override this; the result
            must be the same computation (a rounded difference, its square, a sum of D terms).
        """
        return direct_sq_dist(x, None, cand, dtype=x.dtype)


class NormScaledError:
    """The rounding bound of a norm-shortcut engine, kept per pair instead of evaluated at the largest norm.

    An engine whose approximate squared distance is ``fl(|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>)`` errs on a
    pair by a bound that grows with *both* norms: ``|approx(i, j) - |x_i - x_j|^2| <= coef (sq[i] +
    |x_j|^2)``. Evaluated with the largest ``|x_j|`` of the data set (:meth:`rows` without argument), a
    few rows of huge norm (the "massive activations" of decoder hidden states) loosen every row's bound
    by orders of magnitude. The pipeline (:func:`gelora.neighbours.pipeline.knn_exact`) instead evaluates it, per row,
    at the largest norm a point can have and still compete for the row's neighbours
    (:func:`gelora.neighbours.certify.competitor_radius`), which is about ``|x_i| + r_k``.

    Attributes:
        sq: (N,) squared norms of the rows as the engine computed them (the tile operands' norms).
        coef: the factor of the bound (:func:`gelora.neighbours.engines.torch.gemm_error_coef`).
    """

    def __init__(self, sq: torch.Tensor, coef: float) -> None:
        self.sq = sq
        self.coef = float(coef)

    def rows(self, key_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N,) float64 bounds, row i's holding for every row j with ``|x_j| <= key_norm[i]`` (a tensor
        of (N,) or a scalar; default: the largest norm, so the bound holds for every j)."""
        sq = self.sq.to(torch.float64)
        if key_norm is None:
            key_sq = sq.max() if sq.numel() else sq.new_zeros(())
        else:
            key_sq = torch.as_tensor(key_norm, dtype=torch.float64, device=sq.device).square()
        return self.coef * (sq + key_sq)

    def to(self, device) -> "NormScaledError":
        return NormScaledError(self.sq.to(device), self.coef)


def error_rows(err, key_norm: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """The (N,) or 0-d float64 bound of an engine's ``err`` (see :meth:`KnnBackend.search`), for rows j
    with ``|x_j| <= key_norm`` where the engine's bound depends on it (:class:`NormScaledError`)."""
    if isinstance(err, NormScaledError):
        out = err.rows(key_norm)
    else:
        out = torch.as_tensor(err, dtype=torch.float64)
    return out if device is None else out.to(device)


class Candidates(NamedTuple):
    """What :meth:`KnnBackend.search` and :meth:`KnnBackend.cross_search` return.

    Attributes:
        d2: (N, kc) float32/float64 approximate squared distances, ascending per row.
        idx: (N, kc) int64 candidate indices (-1 where a cross search had fewer keys).
        err: the error bound: a scalar or (N,) tensor such that every key j that is *not* a candidate
            of row i has exact squared distance ``>= d2[i, -1] - err[i]`` (a bound on ``|approx -
            exact|`` for pairs up to the kc-th distance suffices; 0 for exact distances), or a
            :class:`NormScaledError`, a per-pair bound that the pipeline evaluates at the norms that
            can compete for a row's neighbours (what a norm-shortcut engine should return, so that
            outlier rows do not loosen every other row's certificate).
        sq: (N,) squared norms of the query rows as the engine computed them, or None.
    """

    d2: torch.Tensor
    idx: torch.Tensor
    err: Union[torch.Tensor, float, "NormScaledError"]
    sq: Optional[torch.Tensor] = None
