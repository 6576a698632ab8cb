"""The kNN engines: :mod:`.base` (the contract), :mod:`.registry` (selection), one module per engine
(:mod:`.triton`, :mod:`.cpp`, :mod:`.faiss`, :mod:`.torch`; registered on first use)."""
from .base import BackendUnavailable, Candidates, KnnBackend, NormScaledError, error_rows
from .registry import PRIORITY, all_backends, describe, get_backend, register, select_backend

__all__ = ["BackendUnavailable", "Candidates", "KnnBackend", "NormScaledError", "PRIORITY", "all_backends",
           "describe", "error_rows", "get_backend", "register", "select_backend"]
