"""Layer-wise intrinsic-dimension profile of a transformers model.

:func:`profile_model` runs a model over a text corpus (or pre-tokenised batches) and estimates, with
:func:`gelora.twonn`, the intrinsic dimension (ID) of the hidden states entering and leaving every
transformer block. Layer indices follow the ``output_hidden_states`` convention of transformers:
index 0 is the input of block 0 (the embeddings), index ``i + 1`` the output of block ``i``; a model
with L blocks gives L + 1 IDs. (For decoders whose base model applies a final norm, transformers'
last ``hidden_states`` entry is the *normed* output of the last block; the profile keeps the raw block
output, the representation that an adapter in the last block changes.)

How states are collected
------------------------
* Forward hooks on the blocks (a pre-hook on block 0 for the embeddings); they are removed in a
  ``finally`` block, the model runs under ``torch.no_grad`` in eval mode and every module's
  ``training`` flag is restored afterwards.
* Padding never enters the estimate: points are taken through the attention mask. ``pooling``
  picks what a point is: ``"tokens"`` (every non-padding token), ``"mean"`` (the masked mean of a
  sequence), ``"cls"`` (its first non-padding token, BERT's ``[CLS]``) or ``"last"`` (its last
  non-padding token, the usual sentence summary of a decoder).
* Memory is bounded by ``max_tokens`` points per layer, not by the data: every point gets an i.i.d.
  uniform key from a seeded generator and each layer keeps the ``max_tokens`` points with the
  smallest keys (bottom-k reservoir sampling, a uniform sample without replacement of everything
  seen). The keys are drawn before the forward pass, so a hook copies to the host only the rows that
  enter the sample, and all layers keep the *same* tokens: the layer-to-layer ID differences that
  drive the rank rule are then measured on paired samples.
* Samples are stored on the host in half precision: the model's dtype when it is float16/bfloat16,
  else float16 (a layer whose values overflow float16 is kept in float32 instead).
* A background thread receives the device-to-host copies (pinned buffers and CUDA events on a GPU)
  and writes them into the samples while the next batches run. With ``estimate_every=k`` a second
  thread estimates the layer IDs every k batches on a copy of the sample so far (on a side CUDA
  stream when the estimates run on a GPU) while the forward passes go on
  (``ProfileResult.history``), so a long run shows whether its estimates have settled. One such
  estimate runs at a time: if the previous one is still running when the next is due, the loop waits
  for it, so choose k so that an estimate takes less than k batches. The copy costs the layer samples'
  memory once more while it lives.
* Models dispatched by accelerate (``device_map="auto"``, CPU or disk offload) work unchanged: the
  hooks see each block's output on its execution device.

Per-module profiles
-------------------
``modules=`` (PEFT ``target_modules`` syntax, see :func:`resolve_target_modules`) additionally
profiles the input and the output of each such linear module inside the blocks (modules that receive
the very same input tensor, such as q/k/v, share one sample), for per-module rank allocation with
:func:`gelora.ranks.allocate_ranks`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .id.dedup import unique_rows
from .id.estimate import ESTIMATORS, TwoNNResult
from .id.paired import bootstrap_stderr, paired_bootstrap, twonn_rows
from .id.twonn import twonn

log = logging.getLogger("gelora")

POOLINGS = ("tokens", "mean", "cls", "last")
BOOTSTRAP_UNITS = ("sequence", "token")
#: Largest finite float16 value; rows beyond it are kept in float32.
_FP16_MAX = 65504.0
#: Batches whose host copies may be in flight at once before the loop waits for the writer thread.
_MAX_IN_FLIGHT = 2

TargetSpec = Union[None, str, Sequence[str]]


# ---------------------------------------------------------------------------------------------------
# Model structure: transformer blocks and LoRA-able linear modules
# ---------------------------------------------------------------------------------------------------
def _config_num_layers(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            v = getattr(c, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def find_blocks(model: nn.Module, blocks: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The transformer blocks of ``model``: ``(path, ModuleList)``, e.g. ``("encoder.layer", ...)`` for
    BERT, ``("model.layers", ...)`` for a Llama causal LM, ``("transformer.h", ...)`` for GPT-2.

    Without ``blocks``, the blocks are the ``nn.ModuleList`` of identical modules with the most
    parameters, restricted to lists of ``config.num_hidden_layers`` entries when the config says so.

    Raises:
        ValueError: ``blocks`` names no ``ModuleList``, or no list of blocks is found.
    """
    if blocks is not None:
        try:
            ml = model.get_submodule(blocks)
        except AttributeError as exc:
            raise ValueError(f"blocks={blocks!r}: no such submodule in {type(model).__name__}") from exc
        if not isinstance(ml, nn.ModuleList) or len(ml) == 0:
            raise ValueError(f"blocks={blocks!r} is a {type(ml).__name__}, not a non-empty nn.ModuleList")
        return blocks, ml
    n_layers = _config_num_layers(model)
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, name, mod)
    if best is None:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__} (an nn.ModuleList of "
            f"{n_layers if n_layers else 'identical'} blocks); pass blocks='path.to.layers'"
        )
    return best[1], best[2]


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear layer with a transposed (in, out) weight
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def is_lora_linear(mod: nn.Module) -> bool:
    """True for the modules the PEFT bridge adapts: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def linear_features(mod: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D`` (a LoRA of rank r on it has
    ``r * (in + out)`` parameters)."""
    if isinstance(mod, nn.Linear):
        return int(mod.in_features), int(mod.out_features)
    if _is_conv1d(mod):
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    raise TypeError(f"{type(mod).__name__} is not a linear module")


@dataclass(frozen=True)
class TargetModule:
    """A linear module inside block ``block``: full ``name`` and the ``rel`` name within the block."""

    name: str
    block: int
    rel: str
    in_features: int
    out_features: int

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features


def _matches(spec: TargetSpec, name: str) -> bool:
    """PEFT's ``target_modules`` semantics: a string is a regex that must match the full name, a list
    matches a name equal to an entry or ending with ``"." + entry``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_target_modules(
    model: nn.Module, target_modules: TargetSpec = None, *, blocks: Optional[str] = None
) -> List[TargetModule]:
    """The linear modules inside the transformer blocks that ``target_modules`` selects, in model order.

    Args:
        target_modules: ``None`` or ``"all-linear"``: every ``nn.Linear``/``Conv1D`` inside the blocks;
            a list of names (``["query", "value"]``, matched as PEFT does: equal to, or a ``.``-suffix
            of, the full module name); or a regex string matched against the full name.
        blocks: path of the block list (see :func:`find_blocks`).

    Raises:
        ValueError: nothing matched inside the blocks, or a matched module is not linear.
    """
    path, ml = find_blocks(model, blocks)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        target_modules = None
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be non-empty strings, got {target_modules!r}")
    block_of = {}
    for i, blk in enumerate(ml):
        prefix = f"{path}.{i}." if path else f"{i}."
        for rel, mod in blk.named_modules():
            if rel:
                block_of[prefix + rel] = (i, rel)
    out: List[TargetModule] = []
    outside: List[str] = []
    not_linear: List[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if target_modules is None:
            if name in block_of and is_lora_linear(mod):
                i, rel = block_of[name]
                out.append(TargetModule(name, i, rel, *linear_features(mod)))
            continue
        if not _matches(target_modules, name):
            continue
        if name not in block_of:
            outside.append(name)
        elif not is_lora_linear(mod):
            not_linear.append(f"{name} ({type(mod).__name__})")
        else:
            i, rel = block_of[name]
            out.append(TargetModule(name, i, rel, *linear_features(mod)))
    if not_linear:
        raise ValueError("target_modules selects modules that are not nn.Linear/Conv1D: " + ", ".join(not_linear[:8]))
    if outside:
        warnings.warn(
            f"target_modules={target_modules!r} also matches {len(outside)} module(s) outside the "
            f"transformer blocks ({', '.join(outside[:4])}); they get no per-layer rank and are left out",
            stacklevel=2,
        )
    if not out:
        rels = sorted({rel.rsplit(".", 1)[-1] for rel, m in ml[0].named_modules() if rel and is_lora_linear(m)})
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear module inside the blocks '{path}'; "
            f"the linear modules of a block are named {rels}"
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Sampling and host storage
# ---------------------------------------------------------------------------------------------------
class BottomKSampler:
    """Uniform sample without replacement of at most ``capacity`` points from a stream.

    Every point gets an i.i.d. U(0, 1) key (float64, seeded generator on the CPU); the sample is the
    ``capacity`` points with the smallest keys, which is a uniform random subset of all points seen.
    :meth:`plan` is called before the points exist (only their count is needed), so the caller copies
    just the accepted points.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 3:
            raise ValueError(f"capacity must be at least 3, got {capacity}")
        self.capacity = int(capacity)
        self.keys = torch.empty(0, dtype=torch.float64)
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.n_seen = 0

    @property
    def size(self) -> int:
        return int(self.keys.numel())

    def plan(self, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Admit ``m`` new points.

        Returns:
            accepted: (a,) int64 ascending indices in ``[0, m)`` of the new points that enter the sample.
            slots: (a,) int64 ascending sample slots they go to (evicted or still empty slots).
        """
        empty = torch.empty(0, dtype=torch.int64)
        if m <= 0:
            return empty, empty
        u = torch.rand(m, generator=self.gen, dtype=torch.float64)
        self.n_seen += m
        n, cap = self.size, self.capacity
        thr = math.inf if n < cap else float(self.keys.max())
        cand = torch.nonzero(u < thr).flatten()
        if cand.numel() == 0:
            return empty, empty
        ck = u[cand]
        if n + cand.numel() <= cap:
            self.keys = torch.cat([self.keys, ck])
            return cand, torch.arange(n, n + cand.numel(), dtype=torch.int64)
        allk = torch.cat([self.keys, ck])
        kept = torch.zeros(allk.numel(), dtype=torch.bool)
        kept[torch.topk(allk, cap, largest=False).indices] = True
        res_kept, cand_kept = kept[:n], kept[n:]
        slots = torch.cat([torch.nonzero(~res_kept).flatten(), torch.arange(n, cap, dtype=torch.int64)])
        accepted = cand[cand_kept]
        keys = torch.empty(cap, dtype=torch.float64)
        keys[:n] = self.keys
        keys[slots] = ck[cand_kept]
        self.keys = keys
        return accepted, slots


class _Store:
    """Host sample of one point set: a (capacity, D) buffer of half-precision rows."""

    def __init__(self, capacity: int, dtype: Optional[torch.dtype]) -> None:
        self.capacity = capacity
        self.dtype = dtype
        self.buf: Optional[torch.Tensor] = None
        self.n = 0

    def write(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        if rows.shape[0] != slots.numel():
            raise RuntimeError(f"internal: {rows.shape[0]} rows for {slots.numel()} slots")
        if rows.shape[0] == 0:
            return
        if self.buf is None:
            dt = self.dtype or (rows.dtype if rows.dtype in (torch.float16, torch.bfloat16) else torch.float16)
            self.buf = torch.empty((self.capacity, rows.shape[1]), dtype=dt)
        elif rows.shape[1] != self.buf.shape[1]:
            raise ValueError(f"hidden size changed from {self.buf.shape[1]} to {rows.shape[1]} between batches")
        if self.buf.dtype == torch.float16 and rows.dtype not in (torch.float16,):
            if rows.numel() and float(rows.abs().max()) > _FP16_MAX:
                log.info("gelora: values beyond the float16 range; keeping this layer in float32")
                self.buf = self.buf.float()
        self.buf[slots] = rows.to(self.buf.dtype)
        self.n = max(self.n, int(slots.max()) + 1)

    def points(self) -> torch.Tensor:
        if self.buf is None or self.n == 0:
            return torch.empty(0, 0)
        return self.buf[: self.n]

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def _pad_right(seqs: List[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _as_tensor_batch(b: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    if "input_ids" not in b:
        raise ValueError(f"a batch must contain 'input_ids'; got keys {sorted(b)}")
    out = {}
    for k, v in b.items():
        if v is None:
            continue
        out[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    ids = out["input_ids"]
    if ids.dim() == 1:
        out = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) and v.dim() == 1 else v) for k, v in out.items()}
        ids = out["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(ids.shape)}")
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(ids)
    elif tuple(out["attention_mask"].shape) != tuple(ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(out['attention_mask'].shape)} != input_ids shape {tuple(ids.shape)}"
        )
    return out


def make_batches(
    data: Any, tokenizer: Any = None, *, batch_size: int = 16, max_length: int = 128
) -> Tuple[Iterable[Dict[str, torch.Tensor]], Optional[int], Dict[str, Any]]:
    """Turn ``data`` into an iterable of model batches (``input_ids``, ``attention_mask``, ...).

    ``data`` may be a list of strings (tokenised with ``tokenizer``, truncated to ``max_length``
    tokens, sorted by length, longest first, and right-padded: causal models see every real token at
    its true position), a (B, T) tensor of token ids, one mapping of tensors (a ``BatchEncoding``)
    that is split into batches, or an iterable of such mappings (a ``DataLoader``), used as is.

    Returns:
        (batches, number of batches or None, info dict with ``n_sequences`` when known).

    Raises:
        TypeError / ValueError: unsupported or empty data, or texts without a tokenizer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, (str, bytes)):
        raise TypeError("data is a single string; pass a list of texts")
    if isinstance(data, torch.Tensor):
        data = {"input_ids": data}
    if isinstance(data, Mapping):
        full = _as_tensor_batch(data)
        n = full["input_ids"].shape[0]
        if n == 0:
            raise ValueError("data contains no sequences")
        idx = list(range(0, n, batch_size))

        def gen_split() -> Iterator[Dict[str, torch.Tensor]]:
            for s in idx:
                yield {k: v[s : s + batch_size] for k, v in full.items()}

        return gen_split(), len(idx), {"n_sequences": n}
    if isinstance(data, Sequence) and len(data) > 0 and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise TypeError("data is a list of texts: pass tokenizer= (or pre-tokenised batches)")
        texts = [t for t in data if t.strip()]
        if not texts:
            raise ValueError("every text is empty")
        enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
        seqs = [list(s) for s in enc["input_ids"] if len(s) > 0]
        if not seqs:
            raise ValueError("the tokenizer produced no tokens for these texts")
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
        starts = list(range(0, len(order), batch_size))

        def gen_texts() -> Iterator[Dict[str, torch.Tensor]]:
            for s in starts:
                yield _pad_right([seqs[i] for i in order[s : s + batch_size]], pad_id)

        n_tok = sum(len(s) for s in seqs)
        return gen_texts(), len(starts), {"n_sequences": len(seqs), "n_tokens": n_tok, "n_texts": len(data)}
    if isinstance(data, Sequence) and len(data) == 0:
        raise ValueError("data is empty")
    if isinstance(data, Iterable):
        try:
            n_b = len(data)  # type: ignore[arg-type]
        except TypeError:
            n_b = None

        def gen_iter() -> Iterator[Dict[str, torch.Tensor]]:
            for b in data:
                if not isinstance(b, Mapping):
                    raise TypeError(f"each batch must be a mapping with 'input_ids', got {type(b).__name__}")
                yield _as_tensor_batch(b)

        return gen_iter(), n_b, {}
    raise TypeError(f"unsupported data type {type(data).__name__}")


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
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

    @property
    def in_key(self) -> str:
        """Key of the module's input sample (shared with ``input_shared_with``) in the profile's bootstrap."""
        return f"in:{self.input_shared_with or self.name}"

    @property
    def out_key(self) -> str:
        """Key of the module's output sample in the profile's bootstrap."""
        return f"out:{self.name}"

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


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

    def run(self) -> torch.Tensor:
        """Draw the replicates (the same for the same seed) and store them in :attr:`replicates`."""
        rep = paired_bootstrap(self.log_mu, n_boot=self.n_boot, seed=self.seed, estimator=self.estimator,
                               discard_fraction=self.discard_fraction,
                               groups=self.groups if self.unit == "sequence" else None)
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
                              discard_fraction=self.discard_fraction)
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
                "n_points": int(self.log_mu.shape[1]), "keys": list(self.keys), "fixed": dict(self.fixed)}


@dataclass
class ProfileResult:
    """Result of :func:`profile_model`.

    Attributes:
        layers: L + 1 names: ``"embeddings"`` (input of block 0), then ``"block 0"`` ... ``"block L-1"``
            (block outputs).
        ids, stderr: TwoNN ID of each layer and its standard error (L + 1 floats each).
        n_points: points in each layer's sample (at most ``max_tokens``).
        n_duplicates: exact duplicate rows collapsed by the estimator (e.g. ``[CLS]`` at layer 0).
        n_seen: points offered to the sampler (non-padding tokens, or sequences when pooled).
        n_sequences: sequences run through the model.
        modules: per-module profiles by full module name (when ``modules=`` was given).
        timings: seconds: ``forward`` (batches through the model, hooks included), ``wait`` (for the
            writer thread), ``estimate`` (final TwoNN), ``total``; ``tokens_per_s``.
        history: with ``estimate_every``: ``{"batch", "n_seen", "ids"}`` snapshots taken in the background.
        twonn: the full :class:`gelora.TwoNNResult` of each layer.
        samples: with ``keep_samples=True``, each layer's sampled points, (n_points, D) on the host in
            the storage dtype (row order is the sampler's slot order).
        paired: the paired bootstrap of all the IDs (``paired_bootstrap > 0``), which
            :func:`gelora.ranks.allocate_ranks` turns into the probability of each bound.
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

    @property
    def n_blocks(self) -> int:
        return len(self.ids) - 1

    @property
    def backend(self) -> str:
        return self.twonn[0].backend if self.twonn else ""

    @property
    def n_fixed(self) -> List[int]:
        """Per layer, the rows whose neighbours the exactness certificate sent to the float64 path
        (:attr:`gelora.TwoNNResult.n_fixed`; many of them mean a slow estimate, not a wrong one).
        ``-1``: not counted (with ``paired_bootstrap`` the estimates go through :func:`gelora.knn2`,
        which does not return it)."""
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
        }


# ---------------------------------------------------------------------------------------------------
# The profiler
# ---------------------------------------------------------------------------------------------------
def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor):
        return h
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


def _output_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    h = getattr(out, "last_hidden_state", None)
    if isinstance(h, torch.Tensor):
        return h
    if isinstance(out, Mapping) and isinstance(out.get("hidden_states"), torch.Tensor):
        return out["hidden_states"]
    return None


def _input_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the execution device of the input embeddings (accelerate hooks), else
    the device of their weight, else of the first non-meta parameter."""
    emb = None
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None:
        hook = getattr(emb, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.device.type != "meta":
            return w.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


class _Batch:
    """Per-batch selection shared by all hooks: which flat positions / sequences enter the sample."""

    def __init__(self, mask: torch.Tensor, pooling: str, sampler: BottomKSampler) -> None:
        b, t = mask.shape
        m = mask != 0
        self.shape = (b, t)
        self.mask = m
        if pooling == "tokens":
            flat = torch.nonzero(m.reshape(-1)).flatten()
            acc, self.slots = sampler.plan(flat.numel())
            self.index = flat[acc]  # positions in the flattened (B*T) tokens
            self.seq = self.index // t  # the sequence (row of the batch) of each accepted point
        else:
            lengths = m.sum(dim=1)
            seqs = torch.nonzero(lengths > 0).flatten()
            acc, self.slots = sampler.plan(seqs.numel())
            sel = seqs[acc]
            self.seq = sel
            if pooling == "mean":
                self.index = sel  # sequences
            elif pooling == "cls":
                first = m.int().argmax(dim=1)
                self.index = sel * t + first[sel]
            else:  # last
                last = t - 1 - m.flip(1).int().argmax(dim=1)
                self.index = sel * t + last[sel]
        self.pooling = pooling
        self.n_points = int(m.sum()) if pooling == "tokens" else int((m.sum(1) > 0).sum())
        self._dev: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_accepted(self) -> int:
        return int(self.index.numel())

    def select(self, h: torch.Tensor) -> torch.Tensor:
        """(n_accepted, D) rows of the (B, T, D) states ``h``, on the device of ``h``."""
        if h.dim() != 3 or tuple(h.shape[:2]) != self.shape:
            raise ValueError(
                f"expected hidden states of shape (batch, seq_len, D) = {self.shape + ('D',)}, got {tuple(h.shape)}"
            )
        dev = h.device
        if dev not in self._dev:
            self._dev[dev] = (self.index.to(dev), self.mask.to(dev))
        idx, m = self._dev[dev]
        if self.pooling == "mean":
            w = m[idx].to(torch.float32).unsqueeze(-1)
            return (h[idx].to(torch.float32) * w).sum(dim=1) / w.sum(dim=1)
        return h.reshape(-1, h.shape[-1]).index_select(0, idx)


class _Profiler:
    def __init__(
        self,
        model: nn.Module,
        *,
        max_tokens: int,
        pooling: str,
        seed: int,
        store_dtype: Optional[torch.dtype],
        modules: Optional[List[TargetModule]],
        blocks_path: str,
        blocks: nn.ModuleList,
    ) -> None:
        self.model = model
        self.pooling = pooling
        self.sampler = BottomKSampler(max_tokens, seed)
        self.blocks = blocks
        self.blocks_path = blocks_path
        self.n_layers = len(blocks) + 1
        self.layer_keys = [f"layer{i}" for i in range(self.n_layers)]
        self.stores: Dict[str, _Store] = {k: _Store(max_tokens, store_dtype) for k in self.layer_keys}
        #: sequence (in the order the data were run) that the point in each sample slot came from
        self.slot_seq = torch.full((max_tokens,), -1, dtype=torch.int64)
        self.modules = modules or []
        self.mod_in_key: Dict[str, str] = {}
        self.shared: Dict[str, str] = {}
        for tm in self.modules:
            self.stores[f"in:{tm.name}"] = _Store(max_tokens, store_dtype)
            self.stores[f"out:{tm.name}"] = _Store(max_tokens, store_dtype)
        self.batch: Optional[_Batch] = None
        self.pending: List[Tuple[str, torch.Tensor, Any]] = []
        self.first_batch = True
        self._seen_inputs: Dict[int, List[Tuple[torch.Tensor, str]]] = {}
        self.handles: List[Any] = []

    # -- hooks ----------------------------------------------------------------------------------
    def _grab(self, key: str, h: Optional[torch.Tensor]) -> None:
        batch = self.batch
        if batch is None:
            return
        if h is None:
            raise RuntimeError(f"{key}: the hooked module returned no tensor")
        if batch.n_accepted == 0:
            return
        rows = batch.select(h.detach())
        if rows.device.type == "cuda":
            dst = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            dst.copy_(rows, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(rows.device))
            self.pending.append((key, dst, ev))
        else:
            self.pending.append((key, rows.to("cpu"), None))

    def install(self) -> None:
        blocks = self.blocks
        self.handles.append(
            blocks[0].register_forward_pre_hook(
                lambda mod, args, kwargs: self._grab("layer0", _first_tensor(args, kwargs)), with_kwargs=True
            )
        )
        for i, blk in enumerate(blocks):
            key = f"layer{i + 1}"
            self.handles.append(
                blk.register_forward_hook(lambda mod, args, out, key=key: self._grab(key, _output_tensor(out)))
            )
        if not self.modules:
            return
        # Modules fed the very same tensor object (q/k/v, gate/up) share the input sample; identity is
        # decided on the first batch, within one block, while the block keeps the tensors alive.
        for i, blk in enumerate(blocks):
            self.handles.append(blk.register_forward_hook(lambda mod, args, out, i=i: self._forget_inputs(i)))
        for tm in self.modules:
            mod = self.model.get_submodule(tm.name)
            self.handles.append(
                mod.register_forward_pre_hook(
                    lambda m, args, kwargs, tm=tm: self._module_input(tm, _first_tensor(args, kwargs)),
                    with_kwargs=True,
                )
            )
            self.handles.append(
                mod.register_forward_hook(lambda m, args, out, tm=tm: self._grab(f"out:{tm.name}", _output_tensor(out)))
            )

    def _forget_inputs(self, block: int) -> None:
        self._seen_inputs.pop(block, None)

    def _module_input(self, tm: TargetModule, x: Optional[torch.Tensor]) -> None:
        if self.first_batch:
            seen = self._seen_inputs.setdefault(tm.block, [])
            for t, owner in seen:
                if t is x:
                    self.shared[tm.name] = owner
                    break
            else:
                seen.append((x, tm.name))
        owner = self.shared.get(tm.name)
        self.mod_in_key[tm.name] = f"in:{owner or tm.name}"
        if owner is None:
            self._grab(f"in:{tm.name}", x)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._seen_inputs.clear()

    # -- writer side (background thread) ---------------------------------------------------------
    def write(self, pending: List[Tuple[str, torch.Tensor, Any]], slots: torch.Tensor) -> None:
        for key, rows, ev in pending:
            if ev is not None:
                ev.synchronize()
            self.stores[key].write(rows, slots)


def _estimate(x: torch.Tensor, device: torch.device, what: str, rows: bool = False, **kw: Any) -> Any:
    """The TwoNN result of one sample; with ``rows=True`` ``(result, log_mu)``, the ratios in slot order
    (:func:`gelora.id.paired.twonn_rows`; ``log_mu`` is None for a 0-dimensional set)."""
    if x.numel() == 0 or x.shape[0] < 3:
        raise ValueError(f"{what}: only {x.shape[0] if x.dim() else 0} point(s) collected; TwoNN needs at least 3")
    try:
        if rows:
            return twonn_rows(x.to(device), **kw)
        return twonn(x.to(device), **kw)
    except ValueError as exc:
        keep, n_dup = unique_rows(x)
        if keep.numel() >= 3:
            raise ValueError(f"{what}: {exc}") from exc
    # One or two distinct points (e.g. the [CLS] embedding of every sequence): a 0-dimensional set.
    warnings.warn(f"{what}: the {x.shape[0]} sampled points are {keep.numel()} distinct point(s); "
                  "its intrinsic dimension is reported as 0", stacklevel=3)
    res = TwoNNResult(id=0.0, stderr=0.0, n_points=int(x.shape[0]), n_used=0, n_duplicates=int(n_dup),
                      estimator=str(kw.get("estimator", "mle")), backend="none",
                      discard_fraction=float(kw.get("discard_fraction", 0.1)))
    return (res, None) if rows else res


def profile_model(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 10_000,
    pooling: str = "tokens",
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    modules: TargetSpec = None,
    blocks: Optional[str] = None,
    store_dtype: Optional[torch.dtype] = None,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    bootstrap: int = 0,
    backend: Optional[str] = None,
    id_device: Union[None, str, torch.device] = None,
    estimate_every: int = 0,
    progress: bool = True,
    forward_kwargs: Optional[Dict[str, Any]] = None,
    keep_samples: bool = False,
    paired_bootstrap: int = 1000,
    bootstrap_unit: str = "sequence",
) -> ProfileResult:
    """Estimate the intrinsic dimension of the hidden states entering and leaving every block.

    Args:
        model: a transformers model (encoder or decoder; a ``*ForCausalLM``/``*ForSequenceClassification``
            wrapper runs its base model, so no vocabulary-sized logits are computed). It may be
            dispatched by accelerate (``device_map="auto"``, offloading) and be in bfloat16.
        data: texts (with ``tokenizer``), a (B, T) tensor of ids, a ``BatchEncoding``, or an iterable
            of batches; see :func:`make_batches`.
        tokenizer: needed for texts.
        max_tokens: sample size per layer (points kept; memory is ``(L + 1) * max_tokens * D`` half
            floats on the host).
        pooling: ``"tokens"``, ``"mean"``, ``"cls"`` or ``"last"`` (see the module docstring).
        batch_size, max_length: batching and truncation of texts.
        seed: seed of the sampler (and of the bootstrap).
        modules: also profile the input and output of these linear modules (``target_modules`` syntax,
            ``"all-linear"`` for all of them); ``None``: blocks only.
        blocks: path of the block ``ModuleList`` when it is not found automatically.
        store_dtype: host dtype of the samples (default: the model's half dtype, else float16).
        estimator, discard_fraction, bootstrap, backend: passed to :func:`gelora.twonn`.
        id_device: where the estimates run (default: the model's CUDA device if it has one, else CPU).
        estimate_every: estimate the layer IDs in the background every this many batches (0: never).
        progress: show tqdm progress bars.
        forward_kwargs: extra keyword arguments for every forward call.
        keep_samples: keep the sampled points of every layer in ``ProfileResult.samples``.
        paired_bootstrap: replicates of the paired bootstrap of all the IDs (``ProfileResult.paired``,
            see :mod:`gelora.id.paired`; 0: none). The estimates then keep their ratios in slot order
            and go through :func:`gelora.id.paired.twonn_rows` (same IDs and ``n_fixed``).
        bootstrap_unit: what a replicate resamples: ``"sequence"`` (every sampled point of a drawn
            sequence; tokens of one sequence are not independent) or ``"token"`` (points one by one).
            The same for pooled points (one point per sequence).

    Returns:
        :class:`ProfileResult`.

    Raises:
        ValueError: bad arguments, no data, too few points in a layer.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(max_tokens, int) or max_tokens < 3:
        raise ValueError(f"max_tokens must be an integer >= 3, got {max_tokens!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimate_every < 0:
        raise ValueError(f"estimate_every must be >= 0, got {estimate_every}")
    if isinstance(paired_bootstrap, bool) or not isinstance(paired_bootstrap, int) or paired_bootstrap < 0 \
            or paired_bootstrap == 1:
        raise ValueError(f"paired_bootstrap must be 0 (none) or a number of replicates >= 2, got {paired_bootstrap!r}")
    if bootstrap_unit not in BOOTSTRAP_UNITS:
        raise ValueError(f"bootstrap_unit must be one of {BOOTSTRAP_UNITS}, got {bootstrap_unit!r}")
    if store_dtype is not None and store_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"store_dtype must be float16, bfloat16 or float32, got {store_dtype}")
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    blocks_path, ml = find_blocks(model, blocks)
    targets = resolve_target_modules(model, modules, blocks=blocks) if modules is not None else None
    runner = getattr(model, "base_model", model)
    if not isinstance(runner, nn.Module) or not any(m is ml for m in runner.modules()):
        runner = model
    in_dev = _input_device(model)
    if id_device is None:
        id_dev = in_dev if in_dev.type == "cuda" else torch.device("cpu")
    else:
        id_dev = torch.device(id_device)
    batches, n_batches, info = make_batches(data, tokenizer, batch_size=batch_size, max_length=max_length)
    fkw = dict(forward_kwargs or {})
    cfg = getattr(model, "config", None)
    if getattr(cfg, "use_cache", None) is not None and "use_cache" not in fkw:
        fkw["use_cache"] = False
    est_kw = dict(estimator=estimator, discard_fraction=discard_fraction, bootstrap=bootstrap, seed=seed,
                  backend=backend)

    prof = _Profiler(model, max_tokens=max_tokens, pooling=pooling, seed=seed, store_dtype=store_dtype,
                     modules=targets, blocks_path=blocks_path, blocks=ml)
    flags = [(m, m.training) for m in model.modules()]
    history: List[Dict[str, Any]] = []
    side_stream = torch.cuda.Stream(device=id_dev) if id_dev.type == "cuda" else None

    def clone_layers() -> List[torch.Tensor]:
        # runs on the writer thread, in order after the writes of the batches before it
        return [prof.stores[k].points().clone() for k in prof.layer_keys]

    def snapshot(batch_no: int, n_seen: int, clone: Future) -> None:
        # runs on the estimator thread while the writer and the forward passes go on
        xs = clone.result()
        ctx = torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            ids = []
            for i, x in enumerate(xs):
                ids.append(_estimate(x, id_dev, f"layer {i}", **est_kw).id if x.shape[0] >= 3 else float("nan"))
        history.append({"batch": batch_no, "n_seen": n_seen, "ids": ids})

    n_seq = 0
    t_fwd = t_wait = 0.0
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gelora-writer")
    estimator_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gelora-estimate")
    futures: List[Future] = []
    snap: Optional[Future] = None
    bar = tqdm(total=n_batches, desc="gelora profile", unit="batch", disable=not progress, leave=False)
    try:
        model.eval()
        prof.install()
        with torch.no_grad():
            for b_no, batch in enumerate(batches, start=1):
                t0 = time.perf_counter()
                mask = batch["attention_mask"]
                sel = _Batch(mask, pooling, prof.sampler)
                prof.batch = sel
                prof.pending = []
                inputs = {k: (v.to(in_dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                runner(**inputs, **fkw)
                prof.first_batch = False
                pending, prof.pending, prof.batch = prof.pending, [], None
                futures.append(executor.submit(prof.write, pending, sel.slots))
                prof.slot_seq[sel.slots] = n_seq + sel.seq
                n_seq += int(mask.shape[0])
                t1 = time.perf_counter()
                t_fwd += t1 - t0
                if estimate_every and b_no % estimate_every == 0:
                    if snap is not None:  # one estimate at a time: wait for the previous one
                        snap.result()
                    clone = executor.submit(clone_layers)
                    snap = estimator_pool.submit(snapshot, b_no, prof.sampler.n_seen, clone)
                while len(futures) > _MAX_IN_FLIGHT:
                    futures.pop(0).result()
                t_wait += time.perf_counter() - t1
                bar.update(1)
                post = {"points": prof.sampler.n_seen}
                if history:
                    post["mean ID"] = f"{sum(history[-1]['ids']) / len(history[-1]['ids']):.1f}"
                bar.set_postfix(post, refresh=False)
            t1 = time.perf_counter()
            for f in futures:
                f.result()
            futures.clear()
            if snap is not None:
                snap.result()
            t_wait += time.perf_counter() - t1
    finally:
        bar.close()
        prof.remove()
        prof.batch = None
        for f in futures:
            f.cancel()
        executor.shutdown(wait=True)
        estimator_pool.shutdown(wait=True)
        for m, flag in flags:
            m.training = flag

    if prof.sampler.n_seen == 0:
        raise ValueError("the data contained no non-padding tokens")

    t_est0 = time.perf_counter()
    keys = list(prof.layer_keys)
    if targets:
        keys += [k for k in prof.stores if k.startswith(("in:", "out:")) and prof.stores[k].n > 0]
    results: Dict[str, TwoNNResult] = {}
    log_mu: Dict[str, Optional[torch.Tensor]] = {}
    with torch.no_grad():
        for k in tqdm(keys, desc="gelora TwoNN", unit="set", disable=not progress, leave=False):
            what = f"layer {k[5:]}" if k.startswith("layer") else k
            if paired_bootstrap:
                results[k], log_mu[k] = _estimate(prof.stores[k].points(), id_dev, what, rows=True, **est_kw)
            else:
                results[k] = _estimate(prof.stores[k].points(), id_dev, what, **est_kw)
    t_est = time.perf_counter() - t_est0
    t_boot0 = time.perf_counter()
    paired = None
    if paired_bootstrap:
        n_rows = prof.stores[keys[0]].n
        if any(prof.stores[k].n != n_rows for k in keys):
            raise RuntimeError("internal: the samples of the layers hold different numbers of slots")
        lm = torch.stack([log_mu[k] if log_mu[k] is not None
                          else torch.full((n_rows,), float("nan"), dtype=torch.float64) for k in keys])
        paired = PairedBootstrap(keys=keys, log_mu=lm, groups=prof.slot_seq[:n_rows].clone(),
                                 fixed={k: 0.0 for k in keys if log_mu[k] is None}, unit=bootstrap_unit,
                                 n_boot=paired_bootstrap, seed=seed, estimator=estimator,
                                 discard_fraction=discard_fraction)
        paired.run()
    t_boot = time.perf_counter() - t_boot0

    layer_res = [results[k] for k in prof.layer_keys]
    mod_profiles: Dict[str, ModuleProfile] = {}
    for tm in targets or []:
        rin = results[prof.mod_in_key.get(tm.name, f"in:{tm.name}")]
        rout = results[f"out:{tm.name}"]
        mod_profiles[tm.name] = ModuleProfile(
            name=tm.name, block=tm.block, rel=tm.rel, in_features=tm.in_features, out_features=tm.out_features,
            id_in=rin.id, stderr_in=rin.stderr, id_out=rout.id, stderr_out=rout.stderr,
            n_points=rout.n_points, input_shared_with=prof.shared.get(tm.name),
        )
    total = time.perf_counter() - t_start
    n_seen = prof.sampler.n_seen
    names = ["embeddings"] + [f"block {i}" for i in range(len(ml))]
    return ProfileResult(
        layers=names,
        ids=[r.id for r in layer_res],
        stderr=[r.stderr for r in layer_res],
        n_points=[r.n_points for r in layer_res],
        n_duplicates=[r.n_duplicates for r in layer_res],
        n_seen=n_seen,
        n_sequences=n_seq,
        pooling=pooling,
        max_tokens=max_tokens,
        seed=seed,
        estimator=estimator,
        blocks_path=blocks_path,
        store_dtypes=[str(prof.stores[k].buf.dtype).replace("torch.", "") if prof.stores[k].buf is not None
                      else "none" for k in prof.layer_keys],
        host_bytes=sum(s.nbytes for s in prof.stores.values()),
        modules=mod_profiles,
        timings={
            "forward": t_fwd,
            "wait": t_wait,
            "estimate": t_est,
            "bootstrap": t_boot,
            "total": total,
            "points_per_s": n_seen / max(t_fwd + t_wait, 1e-9),
        },
        history=history,
        samples=[prof.stores[k].points() for k in prof.layer_keys] if keep_samples else None,
        model_name=str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        twonn=layer_res,
        paired=paired,
    )

