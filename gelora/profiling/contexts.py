"""Which sampled tokens are the same point: keys of the context a hidden state depends on.

A token's hidden state is a function of the tokens the model lets it see: in a causal decoder its
prefix (the token ids up to and including it, at their positions), in a bidirectional encoder its whole
sequence and its position. Two tokens with the same context have the same state in exact arithmetic
(the first token of every sentence that starts with "The", the shared prefix of two prompts). Run in
batches of different shapes, the two copies differ by float rounding only (about 1e-6 relative), so
the sample holds a pair of near-duplicates whose TwoNN ratio ``r2 / r1`` is as large as 1e7. A handful
of such ratios carry a fifth of the MLE's sum of log-ratios and make the ID move between samples.
Bitwise-equal duplicates are collapsed by the estimator (:mod:`gelora.id.dedup`); these are not, so
the sampler keeps one point per context instead: a uniform sample of the distinct contexts, which is
what collapsing exact duplicates does on exact states.

Keys are 64-bit hashes (splitmix64 of a rolling hash over the token ids, the attention mask and the
token types, where given). Two different contexts share a key with probability about ``n^2 / 2^65``
(1e-6 for 10^7 tokens); the only effect of such a collision would be one token fewer in the sample.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: ``profile_model(contexts=...)``: "auto" picks "prefix" for causal models, else "sequence"
CONTEXTS = ("auto", "prefix", "sequence", "none")


def mix64(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (a bijection with full avalanche; wraps mod 2^64)."""
    h = np.atleast_1d(np.asarray(h, dtype=np.uint64))  # arrays wrap silently; numpy scalars warn
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def uniform_from_keys(keys: np.ndarray, seed: int) -> np.ndarray:
    """float64 in [0, 1) from each key, i.i.d. uniform across distinct keys for a given ``seed`` and
    the same value for equal keys (53 bits of ``mix64(key ^ mix64(seed))``)."""
    s = mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
    return (mix64(np.asarray(keys, dtype=np.uint64) ^ s) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def is_causal(model: nn.Module) -> bool:
    """True when the model's attention is causal: every submodule that declares ``is_causal`` (the
    attention modules of transformers 5) says True, or, with none declaring it, ``config.is_decoder``.
    False (whole-sequence contexts) is the safe answer: it can only miss duplicates, never merge two
    different states."""
    flags = [bool(m.is_causal) for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return all(flags)
    return bool(getattr(getattr(model, "config", None), "is_decoder", False))


def prefix_keys(input_ids: torch.Tensor, mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> np.ndarray:
    """(B, T) uint64 keys of every prefix ``row[: t + 1]`` (ids, mask and token types, at their positions)."""
    ids = input_ids.detach().to("cpu", torch.int64).numpy().astype(np.uint64)
    m = mask.detach().to("cpu", torch.int64).numpy().astype(np.uint64)
    tt = (np.zeros_like(ids) if token_type_ids is None
          else token_type_ids.detach().to("cpu", torch.int64).numpy().astype(np.uint64))
    tok = mix64(ids * np.uint64(4) + m + tt * np.uint64(0x100000001) + np.uint64(1))
    b, t = ids.shape
    keys = np.empty((b, t), dtype=np.uint64)
    h = np.full(b, _GOLDEN, dtype=np.uint64)
    for j in range(t):
        h = mix64(h * np.uint64(0x100000001B3) ^ tok[:, j])
        keys[:, j] = h
    return keys


def sequence_keys(prefix: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """(B,) uint64 key of each whole sequence, trailing padding trimmed (a right-padded sequence has
    the same key in every batch): the prefix key at its last real token (0 for an empty row)."""
    m = mask.detach().to("cpu").numpy() != 0
    b, t = m.shape
    last = t - 1 - np.argmax(m[:, ::-1], axis=1)
    out = prefix[np.arange(b), last].copy()
    out[~m.any(axis=1)] = 0
    return out


def token_keys(
    input_ids: torch.Tensor, mask: torch.Tensor, *, causal: bool, token_type_ids: Optional[torch.Tensor] = None
) -> np.ndarray:
    """(B, T) uint64 context key of every token: its prefix (``causal``), else its whole sequence and
    its position."""
    pre = prefix_keys(input_ids, mask, token_type_ids)
    if causal:
        return pre
    seq = sequence_keys(pre, mask)
    pos = mix64(np.arange(pre.shape[1], dtype=np.uint64) + _GOLDEN)
    return mix64(seq[:, None] ^ pos[None, :])
