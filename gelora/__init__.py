"""gelora: GeLoRA (Geometric Low-Rank Adaptation) made fast.

* :func:`estimate_id` / :func:`twonn`: exact TwoNN intrinsic dimension of (N, D) or (B, T, D) states.
* :func:`gride`: the GRIDE ID at neighbour orders 1, 2, 4, ... (the ID as a function of scale);
  :func:`mle_id`: the Levina-Bickel / MacKay-Ghahramani maximum-likelihood ID over k neighbours.
* :func:`knn`: exact k nearest neighbours with a choice of engines (Triton, C++, FAISS, torch);
  :func:`knn2`: the same with k = 2 (TwoNN's two) and a distributed search.
* :func:`profile_model`: per-layer IDs of a transformers model; :func:`allocate_ranks`: GeLoRA ranks;
  :func:`lora_config`: a PEFT ``LoraConfig`` with verified ``rank_pattern``/``alpha_pattern``.
* :func:`fuse_lora`: swap PEFT LoRA layers for fused variable-rank ones (Triton on CUDA, torch on CPU).

``python -m gelora.info`` lists the engines and why one is not usable.
"""
from __future__ import annotations

import importlib
import logging as _logging

__version__ = "0.1.0"

_logging.getLogger("gelora").addHandler(_logging.NullHandler())

#: public name -> module that defines it; imported on first use (PEP 562), so that ``import gelora``
#: imports neither Triton nor transformers nor peft until they are used
_PUBLIC = {
    "BackendUnavailable": "gelora._registry",
    "knn": "gelora.neighbours.pipeline",
    "knn2": "gelora.neighbours.pipeline",
    "knn_reference": "gelora.neighbours.reference",
    "TwoNNResult": "gelora.id.estimate",
    "unique_rows": "gelora.id.dedup",
    "ScaleCurve": "gelora.id.twonn",
    "estimate_id": "gelora.id.twonn",
    "id_scale_curve": "gelora.id.twonn",
    "twonn": "gelora.id.twonn",
    "GrideResult": "gelora.id.gride",
    "gride": "gelora.id.gride",
    "MleResult": "gelora.id.mle",
    "mle_id": "gelora.id.mle",
    "knn2_distributed": "gelora.distributed",
    "twonn_distributed": "gelora.distributed",
    "ModuleProfile": "gelora.profiling.results",
    "ProfileResult": "gelora.profiling.results",
    "profile_model": "gelora.profiling.driver",
    "RankAllocation": "gelora.ranks",
    "allocate_ranks": "gelora.ranks",
    "adapter_ranks": "gelora.peft_bridge",
    "lora_config": "gelora.peft_bridge",
    "rank_costs": "gelora.peft_bridge",
    "verify_lora_config": "gelora.peft_bridge",
    "LoraFuseConfig": "gelora.lora",
    "LoraFuseReport": "gelora.lora",
    "LoraGroupedLinearFunction": "gelora.lora",
    "LoraLinearFunction": "gelora.lora",
    "fuse_lora": "gelora.lora",
    "lora_grouped_linear": "gelora.lora",
    "lora_linear": "gelora.lora",
    "unfuse_lora": "gelora.lora",
    "DataUnavailable": "gelora.data",
    "TextCorpus": "gelora.data",
    "load_texts": "gelora.data",
    "vader_movie_sentences": "gelora.data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    mod = _PUBLIC.get(name)
    if mod is None:
        raise AttributeError(f"module 'gelora' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
