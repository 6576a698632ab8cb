"""gelora: GeLoRA (Geometric Low-Rank Adaptation) made fast.

* :func:`estimate_id` / :func:`twonn`: exact TwoNN intrinsic dimension of (N, D) or (B, T, D) states.
* :func:`knn2`: exact two nearest neighbours with a choice of engines (Triton, C++, FAISS, torch).
* :func:`profile_model`: per-layer IDs of a transformers model; :func:`allocate_ranks`: GeLoRA ranks;
  :func:`lora_config`: a PEFT ``LoraConfig`` with verified ``rank_pattern``/``alpha_pattern``.
* :func:`fuse_lora`: swap PEFT LoRA layers for fused variable-rank ones (Triton on CUDA, torch on CPU).

``python -m gelora.info`` lists the engines and why one is not usable.
"""
from __future__ import annotations

import logging as _logging

from .backends import BackendUnavailable
from .knn import knn2, knn_reference
from .twonn import ScaleCurve, TwoNNResult, estimate_id, id_scale_curve, twonn, unique_rows
from .profile import ModuleProfile, ProfileResult, profile_model
from .ranks import RankAllocation, allocate_ranks
from .peft_bridge import adapter_ranks, lora_config, rank_costs, verify_lora_config
from .distributed import knn2_distributed, twonn_distributed
from .lora import (
    LoraFuseConfig,
    LoraFuseReport,
    LoraGroupedLinearFunction,
    LoraLinearFunction,
    fuse_lora,
    lora_grouped_linear,
    lora_linear,
    unfuse_lora,
)
from .data import DataUnavailable, TextCorpus, load_texts, vader_movie_sentences

__version__ = "0.1.0"

_logging.getLogger("gelora").addHandler(_logging.NullHandler())

__all__ = [
    "BackendUnavailable",
    "DataUnavailable",
    "LoraFuseConfig",
    "LoraFuseReport",
    "LoraGroupedLinearFunction",
    "LoraLinearFunction",
    "ModuleProfile",
    "ProfileResult",
    "RankAllocation",
    "TextCorpus",
    "adapter_ranks",
    "allocate_ranks",
    "load_texts",
    "lora_config",
    "profile_model",
    "rank_costs",
    "vader_movie_sentences",
    "verify_lora_config",
    "ScaleCurve",
    "TwoNNResult",
    "estimate_id",
    "fuse_lora",
    "lora_grouped_linear",
    "lora_linear",
    "unfuse_lora",
    "id_scale_curve",
    "knn2",
    "knn2_distributed",
    "twonn_distributed",
    "knn_reference",
    "twonn",
    "unique_rows",
]
