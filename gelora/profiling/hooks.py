"""The hooks of a profile: forward hooks on the blocks (a pre-hook on block 0 for the embeddings) and on
the profiled linear modules pick the sampled rows of each batch (:class:`BatchSelection`: tokens, or one
pooled point per sequence, through the attention mask), start their copies to the host and hand them to
a writer thread, which stores them in half precision (:class:`Profiler`)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .contexts import sequence_keys
from .sampler import BottomKSampler
from .structure import TargetModule

log = logging.getLogger("gelora")

#: What a point is: every non-padding token, or one per sequence (masked mean, first or last real token).
POOLINGS = ("tokens", "mean", "cls", "last")
#: Largest finite float16 value; rows beyond it are kept in float32.
_FP16_MAX = 65504.0


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The hidden states a block or module receives: its first positional tensor, else ``hidden_states=``,
    else its first floating-point argument."""
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
    """The hidden states a block or module returns: a tensor, the first of a tuple, ``last_hidden_state``
    or ``hidden_states``."""
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



class BatchSelection:
    """Per-batch selection shared by all hooks: which flat positions / sequences enter the sample."""

    def __init__(
        self, mask: torch.Tensor, pooling: str, sampler: BottomKSampler, keys: Optional[np.ndarray] = None
    ) -> None:
        """``keys``: optional (B, T) uint64 context keys of the tokens (:func:`.contexts.token_keys`);
        a pooled point takes the key of its sequence (:func:`.contexts.sequence_keys`)."""
        b, t = mask.shape
        m = mask != 0
        self.shape = (b, t)
        self.mask = m
        if pooling == "tokens":
            flat = torch.nonzero(m.reshape(-1)).flatten()
            fk = None if keys is None else keys.reshape(-1)[flat.numpy()]
            acc, self.slots = sampler.plan(flat.numel(), fk)
            self.index = flat[acc]  # positions in the flattened (B*T) tokens
            self.seq = self.index // t  # the sequence (row of the batch) of each accepted point
        else:
            lengths = m.sum(dim=1)
            seqs = torch.nonzero(lengths > 0).flatten()
            sk = None if keys is None else sequence_keys(keys, mask)[seqs.numpy()]
            acc, self.slots = sampler.plan(seqs.numel(), sk)
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


class Profiler:
    """The hooks of one profile and the host samples they fill: ``stores`` by key (``"layer0"`` ..
    ``"layerL"``, ``"in:<module>"``, ``"out:<module>"``), all in the sampler's slot order.

    The driver sets :attr:`batch` before each forward pass; the hooks queue ``(key, host rows, CUDA
    event)`` in :attr:`pending`, and :meth:`write` (on the writer thread) stores them.
    """

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
        self.batch: Optional[BatchSelection] = None
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
