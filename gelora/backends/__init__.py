"""Nearest-neighbour backends: declared, checked, explainable.

Every backend answers :meth:`KnnBackend.not_supported_reasons` for a given input; selection walks
:data:`PRIORITY` and takes the first backend with no reasons. ``backend="name"`` (or the environment
variable ``GELORA_BACKEND``) forces one; it is still checked, and a forced backend that cannot run raises
:class:`BackendUnavailable` with its reasons. When nothing fits, the error lists every backend's reasons.

The contract of a backend is deliberately small (see :meth:`KnnBackend.search`): return, for every
row, ``kc`` *candidate* neighbours with approximate squared distances and an error bound. The shared
pipeline in :mod:`gelora.knn` then re-ranks the candidates with directly computed distances and
certifies the result, so a backend only has to be fast, and every backend is exact.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import torch

log = logging.getLogger("gelora")

#: Order in which ``backend=None`` tries the backends (first usable one wins).
PRIORITY = ("triton", "cpp", "faiss", "torch")


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run on this input; the message lists why."""


class KnnBackend:
    """Base class of a k-nearest-neighbour candidate engine.

    Subclasses set :attr:`name`, override :meth:`_availability_reasons` (checked once: imports,
    compiled extensions) and :meth:`_input_reasons` (per input: device, dtype, size), and implement
    :meth:`search`.
    """

    name: str = "?"
    description: str = ""
    #: Candidates per row beyond k that the pipeline asks for (more: fewer float64 fallbacks).
    extra_candidates: int = 2

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

    def not_supported_reasons(self, x: torch.Tensor, forced: bool = False) -> List[str]:
        """Reasons this backend cannot handle ``x`` (empty list when it can).

        ``forced``: the user named this backend; an engine may then accept inputs it would not be
        picked for automatically (the Triton engine streams a CPU tensor through the GPU)."""
        reasons = self.availability_reasons()
        if reasons:
            return list(reasons)
        return list(self._input_reasons(x))

    # -- work ----------------------------------------------------------------------------------
    def search(
        self, x: torch.Tensor, kc: int, *, src_dtype: Optional[torch.dtype] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate neighbours of every row of ``x`` among the other rows.

        Args:
            x: (N, D) centred points, contiguous, float32 (float64 when the input was float64), on the
                device of the user's input.
            kc: number of candidates per row, ``1 <= kc <= N - 1``.
            src_dtype: dtype of the user's input before centring (e.g. bfloat16 hidden states); an
                engine may compute its tiles in that precision and report the larger error bound.

        Returns:
            cand_d2: (N, kc) float32/float64 approximate *squared* distances, ascending per row.
            cand_idx: (N, kc) int64 indices into ``x``; never the row itself.
            err: scalar or (N,) tensor such that every row j that is *not* a candidate of row i has
                exact squared distance ``>= cand_d2[i, -1] - err[i]`` (used to certify that no
                neighbour was missed; a bound on ``|approx - exact|`` for pairs up to the kc-th
                distance suffices). Zero for a backend that computes exact distances. Or a
                :class:`NormScaledError`, a per-pair bound that the pipeline evaluates at the norms
                that can compete for a row's neighbours (what a norm-shortcut engine should return:
                outlier rows then do not loosen every other row's certificate).
        """
        raise NotImplementedError

    def search_with_norms(
        self, x: torch.Tensor, kc: int, *, src_dtype: Optional[torch.dtype] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`search` plus the (N,) squared row norms of ``x`` when the engine computed them on its
        way (None otherwise, and the pipeline computes them): they enter the centring term of the
        certification (:func:`gelora.knn.centring_floor`), so an engine that has them saves a pass."""
        return (*self.search(x, kc, src_dtype=src_dtype), None)


class NormScaledError:
    """The rounding bound of a norm-shortcut engine, kept per pair instead of evaluated at the largest norm.

    An engine whose approximate squared distance is ``fl(|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>)`` errs on a
    pair by a bound that grows with *both* norms: ``|approx(i, j) - |x_i - x_j|^2| <= coef (sq[i] +
    |x_j|^2)``. Evaluated with the largest ``|x_j|`` of the data set (:meth:`rows` without argument), a
    few rows of huge norm (the "massive activations" of decoder hidden states) loosen every row's bound
    by orders of magnitude. The pipeline (:func:`gelora.knn.knn_exact`) instead evaluates it, per row,
    at the largest norm a point can have and still compete for the row's neighbours
    (:func:`gelora.knn.competitor_radius`), which is about ``|x_i| + r_k``.

    Attributes:
        sq: (N,) squared norms of the rows as the engine computed them (the tile operands' norms).
        coef: the factor of the bound (:func:`gelora.backends.torch_backend.gemm_error_coef`).
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


_REGISTRY: Dict[str, KnnBackend] = {}


def register(backend: KnnBackend) -> KnnBackend:
    _REGISTRY[backend.name] = backend
    return backend


def _ensure_registered() -> None:
    if all(n in _REGISTRY for n in PRIORITY):
        return
    # Imports are cheap: each module defers its heavy optional imports to availability checks.
    from . import cpp_backend, faiss_backend, torch_backend, triton_backend  # noqa: F401


def all_backends() -> Dict[str, KnnBackend]:
    _ensure_registered()
    return {name: _REGISTRY[name] for name in PRIORITY if name in _REGISTRY}


def get_backend(name: str) -> KnnBackend:
    backends = all_backends()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(backends)}")
    return backends[name]


_logged_fallbacks: set = set()


def select_backend(x: torch.Tensor, backend: Optional[str] = None) -> KnnBackend:
    """Pick the backend for ``x``: the forced one (argument or ``GELORA_BACKEND``), else the first usable.

    Raises:
        BackendUnavailable: the forced backend cannot run on ``x``, or no backend can.
    """
    forced = backend or os.environ.get("GELORA_BACKEND") or None
    if forced is not None:
        b = get_backend(forced)
        reasons = b.not_supported_reasons(x, forced=True)
        if reasons:
            raise BackendUnavailable(f"backend {forced!r} cannot run here: " + "; ".join(reasons))
        return b
    skipped = {}
    for name, b in all_backends().items():
        reasons = b.not_supported_reasons(x)
        if not reasons:
            if skipped:
                key = (name, tuple(skipped))
                if key not in _logged_fallbacks:
                    _logged_fallbacks.add(key)
                    log.info(
                        "gelora: using backend %r (%s)", name,
                        "; ".join(f"{k}: {v[0]}" for k, v in skipped.items()),
                    )
            return b
        skipped[name] = reasons
    raise BackendUnavailable(
        "no kNN backend can run on this input: "
        + " | ".join(f"{k}: {'; '.join(v)}" for k, v in skipped.items())
    )


def describe() -> List[Tuple[str, bool, List[str], str]]:
    """(name, usable, reasons, description) for every backend, on this machine, for CPU float32 input
    and, where CUDA is present, for CUDA input."""
    rows = []
    probes = [torch.zeros(8, 4)]
    if torch.cuda.is_available():
        probes.append(torch.zeros(8, 4, device="cuda"))
    for name, b in all_backends().items():
        reasons: List[str] = []
        usable = False
        for p in probes:
            r = b.not_supported_reasons(p)
            if not r:
                usable = True
                reasons = [f"usable on {p.device.type}"] + (reasons or [])
            else:
                reasons += [f"{p.device.type}: {m}" for m in r]
        rows.append((name, usable, reasons, b.description))
    return rows
