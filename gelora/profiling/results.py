"""What a profile returns: :class:`ProfileResult` (the per-layer IDs), :class:`ModuleProfile` (the IDs of a
linear module's input and output) and :class:`PairedBootstrap` (one bootstrap of every ID of a profile over
the shared points); :func:`gelora.ranks.allocate_ranks` reads them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..id.estimate import TwoNNResult
from ..id.gride import GrideResult
from ..id.paired import bootstrap_stderr, paired_bootstrap, paired_bootstrap_gride

#: What a replicate of the paired bootstrap resamples: whole sequences, or points one by one.
BOOTSTRAP_UNITS = ("sequence", "token")


@dataclass
class ScaleCurve:
    """The GRIDE curve of one point set (:class:`gelora.GrideResult` as plain lists): the ID and its standard
    error at each neighbour order ``n1`` (``n2 = 2 n1``), and ``scales``, the mean distance of the
    neighbours involved (in the units of the hidden states)."""

    n1: List[int]
    ids: List[float]
    stderr: List[float]
    scales: List[float]

    @classmethod
    def from_gride(cls, res: GrideResult) -> "ScaleCurve":
        return cls(n1=[int(v) for v in res.n1], ids=[float(v) for v in res.ids],
                   stderr=[float(v) for v in res.stderr], scales=[float(v) for v in res.scales])

    def index(self, n1: int) -> int:
        """Position of neighbour order ``n1`` in the curve (ValueError when it is not there)."""
        if n1 not in self.n1:
            raise ValueError(f"n1={n1} is not on the curve (n1 = {self.n1})")
        return self.n1.index(n1)

    def to_dict(self) -> Dict[str, Any]:
        return {"n1": list(self.n1), "ids": list(self.ids), "stderr": list(self.stderr), "scales": list(self.scales)}


@dataclass
class ModuleProfile:
    """IDs of the input and the output of one linear module (``block``, ``rel`` inside it)."""

    name: str
    block: int
    rel: str
    in_features: int
    out_features: int
    id_in: float
    stderr_in: float
    id_out: float
    stderr_out: float
    n_points: int
    input_shared_with: Optional[str] = None
    #: GRIDE profiles: the whole curve of the input and of the output sample (ids are read at the profile's n1)
    curve_in: Optional[ScaleCurve] = None
    curve_out: Optional[ScaleCurve] = None

    @property
    def in_key(self) -> str:
        """Key of the module's input sample (shared with ``input_shared_with``) in the profile's bootstrap."""
        return f"in:{self.input_shared_with or self.name}"

    @property
    def out_key(self) -> str:
        """Key of the module's output sample in the profile's bootstrap."""
        return f"out:{self.name}"

    def to_dict(self) -> Dict[str, Any]:
        out = dict(self.__dict__)
        for k in ("curve_in", "curve_out"):
            out[k] = None if out[k] is None else out[k].to_dict()
        return out


@dataclass
class PairedBootstrap:
    """Paired bootstrap of every ID of a profile (:func:`gelora.id.paired.paired_bootstrap`).

    All samples of a profile hold the same points in the same slots, so one replicate resamples the
    points once for every set and gives a whole profile; an ID difference then keeps its pairing.

    Attributes:
        keys: the K point sets: ``"layer0"`` .. ``"layerL"``, then ``"in:<module>"``/``"out:<module>"``.
        log_mu: (K, N) float64 ``log(r2 / r1)`` of every slot in every set, ``NaN`` where a set has no
            ratio for the slot (a collapsed duplicate).
        groups: (N,) int64 sequence of every slot (the unit of ``unit="sequence"``).
        fixed: sets whose ID is not estimated from ratios (0-dimensional: fewer than 3 distinct
            points) and the value every replicate gives them.
        unit: ``"sequence"`` or ``"token"``. n_boot, seed, estimator, discard_fraction: the replicates'.
        n1, start: with ``estimator="gride"``, the neighbour order of the ratios in ``log_mu`` (only those
            that entered the estimate: the outlier cut stays that of the full sample) and the K estimates
            each replicate's solver starts from (:func:`gelora.id.paired.paired_bootstrap_gride`).
        replicates: (n_boot, K) float64 replicate IDs (after :meth:`run`).
    """

    keys: List[str]
    log_mu: torch.Tensor = field(repr=False)
    groups: torch.Tensor = field(repr=False)
    fixed: Dict[str, float]
    unit: str
    n_boot: int
    seed: int
    estimator: str = "mle"
    discard_fraction: float = 0.1
    replicates: Optional[torch.Tensor] = field(default=None, repr=False)
    n1: Optional[int] = None
    start: Optional[List[float]] = None

    def run(self) -> torch.Tensor:
        """Draw the replicates (the same for the same seed) and store them in :attr:`replicates`."""
        groups = self.groups if self.unit == "sequence" else None
        if self.estimator == "gride":
            if self.n1 is None:
                raise ValueError("a GRIDE bootstrap needs its neighbour order n1")
            rep = paired_bootstrap_gride(self.log_mu, self.n1, n_boot=self.n_boot, seed=self.seed, groups=groups,
                                         start=self.start)
        else:
            rep = paired_bootstrap(self.log_mu, n_boot=self.n_boot, seed=self.seed, estimator=self.estimator,
                                   discard_fraction=self.discard_fraction, groups=groups)
        for k, v in self.fixed.items():
            rep[:, self.keys.index(k)] = v
        self.replicates = rep
        return rep

    def resampled(self, *, n_boot: Optional[int] = None, seed: Optional[int] = None,
                  unit: Optional[str] = None) -> "PairedBootstrap":
        """A new bootstrap of the same ratios (another size, seed or unit), already run."""
        if unit is not None and unit not in BOOTSTRAP_UNITS:
            raise ValueError(f"unit must be one of {BOOTSTRAP_UNITS}, got {unit!r}")
        out = PairedBootstrap(keys=list(self.keys), log_mu=self.log_mu, groups=self.groups, fixed=dict(self.fixed),
                              unit=unit or self.unit, n_boot=n_boot or self.n_boot,
                              seed=self.seed if seed is None else seed, estimator=self.estimator,
                              discard_fraction=self.discard_fraction, n1=self.n1, start=self.start)
        out.run()
        return out

    @property
    def n_units(self) -> int:
        """Units a replicate draws: distinct sequences, or points."""
        return int(torch.unique(self.groups).numel()) if self.unit == "sequence" else int(self.log_mu.shape[1])

    def columns(self, keys: Sequence[str]) -> torch.Tensor:
        """(n_boot, len(keys)) replicate IDs of these sets."""
        if self.replicates is None:
            raise RuntimeError("the bootstrap has not been run")
        return self.replicates[:, [self.keys.index(k) for k in keys]]

    def stderr(self, keys: Optional[Sequence[str]] = None) -> List[float]:
        """Bootstrap standard error of the ID of each set."""
        return bootstrap_stderr(self.columns(keys or self.keys)).tolist()

    def to_dict(self) -> Dict[str, Any]:
        return {"n_boot": self.n_boot, "unit": self.unit, "n_units": self.n_units, "seed": self.seed,
                "n_points": int(self.log_mu.shape[1]), "keys": list(self.keys), "fixed": dict(self.fixed),
                "estimator": self.estimator, "n1": self.n1}


@dataclass
class ProfileResult:
    """Result of :func:`profile_model`.

    Attributes:
        layers: L + 1 names: ``"embeddings"`` (input of block 0), then ``"block 0"`` ... ``"block L-1"``
            (block outputs).
        ids, stderr: ID of each layer and its standard error (L + 1 floats each): TwoNN's, or with
            ``estimator="gride"`` GRIDE's at the neighbour order :attr:`scale`.
        n_points: points in each layer's sample (at most ``max_tokens``).
        n_duplicates: exact duplicate rows collapsed by the estimator (e.g. ``[CLS]`` at layer 0).
        n_seen: points offered to the sampler (non-padding tokens, or sequences when pooled).
        n_repeats: of those, points not admitted because a point of the same context was in the sample
            (``contexts``: ``"prefix"``, ``"sequence"`` or ``"none"``; :mod:`gelora.profiling.contexts`).
        n_sequences: sequences run through the model.
        modules: per-module profiles by full module name (when ``modules=`` was given).
        timings: seconds: ``forward`` (batches through the model, hooks included), ``wait`` (for the
            writer thread), ``estimate`` (final TwoNN or GRIDE), ``total``; ``tokens_per_s``.
        history: with ``estimate_every``: ``{"batch", "n_seen", "ids"}`` snapshots taken in the background
            (GRIDE: also ``"n1"``, the order of that snapshot's IDs).
        twonn: the full :class:`gelora.TwoNNResult` of each layer.
        samples: with ``keep_samples=True``, each layer's sampled points, (n_points, D) on the host in
            the storage dtype (row order is the sampler's slot order).
        paired: the paired bootstrap of all the IDs (``paired_bootstrap > 0``), which
            :func:`gelora.ranks.allocate_ranks` turns into the probability of each bound.
        scale, scale_choice, range_max: GRIDE profiles: the neighbour order ``n1`` that every ID of the
            profile is read at, ``"given"`` (``scale=``) or ``"plateau"``
            (:func:`gelora.profiling.scales.plateau`), and the largest ``n2`` of the curves.
        plateau_scores: GRIDE profiles: per pair of consecutive orders ``(n1[s], n1[s + 1])`` the mean over
            the layers of the squared change of the ID in units of its standard error.
        curves: GRIDE profiles: the whole curve of each layer (:class:`ScaleCurve`).
        gride: GRIDE profiles: the full :class:`gelora.GrideResult` of each layer.
    """

    layers: List[str]
    ids: List[float]
    stderr: List[float]
    n_points: List[int]
    n_duplicates: List[int]
    n_seen: int
    n_sequences: int
    pooling: str
    max_tokens: int
    seed: int
    estimator: str
    blocks_path: str
    store_dtypes: List[str]
    host_bytes: int
    modules: Dict[str, ModuleProfile] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    model_name: str = ""
    twonn: List[TwoNNResult] = field(default_factory=list, repr=False)
    samples: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    paired: Optional[PairedBootstrap] = field(default=None, repr=False)
    n_repeats: int = 0
    contexts: str = "none"
    scale: Optional[int] = None
    scale_choice: str = ""
    range_max: Optional[int] = None
    plateau_scores: List[float] = field(default_factory=list)
    curves: List[ScaleCurve] = field(default_factory=list)
    gride: List[GrideResult] = field(default_factory=list, repr=False)

    @property
    def n_blocks(self) -> int:
        return len(self.ids) - 1

    @property
    def backend(self) -> str:
        runs = self.twonn or self.gride
        return next((r.backend for r in runs if r.backend != "none"), runs[0].backend) if runs else ""

    @property
    def n_fixed(self) -> List[int]:
        """Per layer, the rows whose neighbours the exactness certificate sent to the float64 path
        (:attr:`gelora.TwoNNResult.n_fixed`; many of them mean a slow estimate, not a wrong one).
        ``-1``: not counted (with ``paired_bootstrap`` the estimates go through :func:`gelora.knn2`,
        which does not return it, and GRIDE's search does not count them)."""
        if self.gride:
            return [-1] * len(self.ids)
        return [int(r.n_fixed) for r in self.twonn] if self.twonn else [0] * len(self.ids)

    def summary(self) -> str:
        """A plain-text table: layer, ID +/- stderr, sampled points, duplicates, rows recomputed in float64
        (``-``: not counted)."""
        rows = [f"{'layer':<12} {'ID':>8} {'+/-':>6} {'points':>8} {'dups':>6} {'fp64':>6}"]
        for name, d, e, n, k, f in zip(self.layers, self.ids, self.stderr, self.n_points, self.n_duplicates,
                                       self.n_fixed):
            rows.append(f"{name:<12} {d:8.2f} {e:6.2f} {n:8d} {k:6d} {f if f >= 0 else '-':>6}")
        return "\n".join(rows)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (no tensors)."""
        return {
            "layers": list(self.layers),
            "ids": [float(v) for v in self.ids],
            "stderr": [float(v) for v in self.stderr],
            "n_points": list(self.n_points),
            "n_duplicates": list(self.n_duplicates),
            "n_fixed": self.n_fixed,
            "n_seen": self.n_seen,
            "n_repeats": self.n_repeats,
            "contexts": self.contexts,
            "n_sequences": self.n_sequences,
            "pooling": self.pooling,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "estimator": self.estimator,
            "backend": self.backend,
            "blocks_path": self.blocks_path,
            "store_dtypes": list(self.store_dtypes),
            "host_bytes": self.host_bytes,
            "modules": {k: m.to_dict() for k, m in self.modules.items()},
            "timings": dict(self.timings),
            "history": list(self.history),
            "model_name": self.model_name,
            "paired_bootstrap": None if self.paired is None else {
                **self.paired.to_dict(), "stderr_layers": self.paired.stderr(self.paired.keys[: len(self.ids)])},
            "scale": None if self.scale is None else {
                "n1": self.scale, "n2": 2 * self.scale, "choice": self.scale_choice, "range_max": self.range_max,
                "plateau_scores": [float(v) for v in self.plateau_scores]},
            "curves": [c.to_dict() for c in self.curves] if self.curves else None,
        }
