"""gelora: GeLoRA (Geometric Low-Rank Adaptation) made fast.

* :func:`estimate_id` / :func:`twonn`: exact TwoNN intrinsic dimension of (N, D) or (B, T, D) states.
* :func:`knn2`: exact two nearest neighbours with a choice of engines (Triton, C++, FAISS, torch).

``python -m gelora.info`` lists the engines and why one is not usable.
"""
from __future__ import annotations

import logging as _logging

from .backends import BackendUnavailable
from .knn import knn2, knn_reference
from .twonn import ScaleCurve, TwoNNResult, estimate_id, id_scale_curve, twonn, unique_rows

__version__ = "0.1.0"

_logging.getLogger("gelora").addHandler(_logging.NullHandler())

__all__ = [
    "BackendUnavailable",
    "ScaleCurve",
    "TwoNNResult",
    "estimate_id",
    "id_scale_curve",
    "knn2",
    "knn_reference",
    "twonn",
    "unique_rows",
]
