"""What enters a profile: model batches from texts, token ids or a data loader (right-padded, with an
attention mask), and the bottom-k sampler that keeps a uniform sample of at most ``max_tokens`` points."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .contexts import uniform_from_keys


class BottomKSampler:
    """Uniform sample without replacement of at most ``capacity`` points from a stream.

    Every point gets an i.i.d. U(0, 1) key (float64, seeded generator on the CPU); the sample is the
    ``capacity`` points with the smallest keys, which is a uniform random subset of all points seen.
    :meth:`plan` is called before the points exist (only their count is needed), so the caller copies
    just the accepted points. With context keys (:mod:`gelora.profiling.contexts`) a point's key is a
    hash of its context and the seed instead, and a context already in the sample is not admitted again:
    the sample is then a uniform subset of the distinct contexts.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 3:
            raise ValueError(f"capacity must be at least 3, got {capacity}")
        self.capacity = int(capacity)
        self.keys = torch.empty(0, dtype=torch.float64)
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.seed = int(seed)
        self.n_seen = 0
        #: points not admitted because their context key was already in the sample or in the batch
        self.n_repeats = 0
        self.sample_keys: Optional[np.ndarray] = None  # uint64 context key of each slot (keyed plans)

    @property
    def size(self) -> int:
        return int(self.keys.numel())

    def plan(self, m: int, keys: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Admit ``m`` new points.

        Args:
            m: number of new points.
            keys: optional (m,) uint64 context keys. Equal contexts then draw the same sampling key, and
                a point whose context is already in the sample (or earlier in this batch) is not
                admitted. Without keys every point is distinct.

        Returns:
            accepted: (a,) int64 ascending indices in ``[0, m)`` of the new points that enter the sample.
            slots: (a,) int64 ascending sample slots they go to (evicted or still empty slots).
        """
        empty = torch.empty(0, dtype=torch.int64)
        if m <= 0:
            return empty, empty
        bk = None if keys is None else np.asarray(keys, dtype=np.uint64).reshape(-1)
        u = torch.rand(m, generator=self.gen, dtype=torch.float64) if bk is None else self._keyed_draw(bk, m)
        self.n_seen += m
        n, cap = self.size, self.capacity
        thr = math.inf if n < cap else float(self.keys.max())
        cand = torch.nonzero(u < thr).flatten()
        if cand.numel() == 0:
            return empty, empty
        ck = u[cand]
        if n + cand.numel() <= cap:
            self.keys = torch.cat([self.keys, ck])
            slots = torch.arange(n, n + cand.numel(), dtype=torch.int64)
            self._set_sample_keys(bk, cand, slots)
            return cand, slots
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
        self._set_sample_keys(bk, accepted, slots)
        return accepted, slots

    def _keyed_draw(self, keys: np.ndarray, m: int) -> torch.Tensor:
        """Sampling keys from context keys; ``inf`` (never admitted) for a context already in the sample or
        earlier in the batch. A context seen before and not in the sample had a key above the threshold,
        which only falls, so it stays out without being remembered."""
        if keys.shape[0] != m:
            raise ValueError(f"{keys.shape[0]} context keys for {m} points")
        fresh = np.zeros(m, dtype=bool)
        fresh[np.unique(keys, return_index=True)[1]] = True
        if self.sample_keys is not None and self.size:
            fresh &= ~np.isin(keys, self.sample_keys[: self.size])
        self.n_repeats += int(m - fresh.sum())
        return torch.from_numpy(np.where(fresh, uniform_from_keys(keys, self.seed), np.inf))

    def _set_sample_keys(self, bk: Optional[np.ndarray], accepted: torch.Tensor, slots: torch.Tensor) -> None:
        if bk is None:
            return
        if self.sample_keys is None:
            self.sample_keys = np.zeros(self.capacity, dtype=np.uint64)
        self.sample_keys[slots.numpy()] = bk[accepted.numpy()]


def pad_right(seqs: List[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    """A right-padded batch of token-id lists: ``input_ids`` (B, T) int64 (``pad_id`` after the end of each
    sequence) and ``attention_mask`` (B, T) int64 (1 on real tokens), T the longest sequence."""
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


def _text_batches(
    data: Sequence[str], tokenizer: Any, *, batch_size: int, max_length: int
) -> Tuple[Iterable[Dict[str, torch.Tensor]], Optional[int], Dict[str, Any]]:
    """Texts tokenised, truncated to ``max_length``, longest first, right-padded with the tokenizer's pad
    (else end-of-sequence, else 0) token; see :func:`make_batches`."""
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
            yield pad_right([seqs[i] for i in order[s : s + batch_size]], pad_id)

    n_tok = sum(len(s) for s in seqs)
    return gen_texts(), len(starts), {"n_sequences": len(seqs), "n_tokens": n_tok, "n_texts": len(data)}


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
        return _text_batches(data, tokenizer, batch_size=batch_size, max_length=max_length)
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
