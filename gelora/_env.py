"""Every environment flag gelora reads, with one meaning each, and the one loader of the compiled core.

A module that needs a flag calls a function here; nothing else reads ``os.environ`` for ``GELORA_*`` or
``TRITON_INTERPRET``. Booleans accept ``1/true/yes/on/y`` and ``0/false/no/off/n/""`` (any case), as
Triton does for ``TRITON_INTERPRET``; anything else is an error that names the variable. This module
imports nothing of gelora (the kernels read it too, and setup.py loads it by path).

| variable | meaning | default |
|---|---|---|
| ``GELORA_BACKEND`` | force a kNN engine (``triton``, ``cpp``, ``faiss``, ``torch``) | first usable |
| ``GELORA_CHUNK_BYTES`` | working memory of the float64 recomputation and of the chunked mean | 1 GiB |
| ``GELORA_CACHE`` | folder of fetched corpora and converted models | ``~/.cache/gelora`` |
| ``GELORA_REQUIRE_EXT`` | a missing compiled core is an error (install, tests) instead of a skipped engine | off |
| ``GELORA_NO_EXT`` | build and load no compiled core | off |
| ``GELORA_BUILD_TYPE`` | CMake build type of the compiled core (read by setup.py) | ``Release`` |
| ``GELORA_ASAN`` | build the compiled core with AddressSanitizer (read by setup.py) | off |
| ``GELORA_TRITON_PRECISION`` | tile precision of the Triton kNN kernel (``fp16``, ``bf16``, ``tf32``, ``ieee``) | ``fp16`` |
| ``GELORA_TRITON_CHUNK_ROWS`` | rows per chunk of the Triton kNN search | from free memory |
| ``GELORA_TRITON_SYMMETRIC`` | compute each pair once in the Triton kNN kernel | on |
| ``GELORA_TRITON_AUTOTUNE`` | tune the Triton kNN tile config on large inputs | on |
| ``GELORA_TRITON_STREAM`` | let automatic selection stream CPU tensors through the GPU | off |
| ``GELORA_TRITON_CONFIG`` | pin the Triton kNN tile config (``BM,BN,BK,warps,stages``) | tuned |
| ``GELORA_LORA_BACKEND`` | force a fused-LoRA backend | first usable |
| ``GELORA_LORA_MERGE`` | CPU LoRA layer: ``auto``, ``always`` or ``never`` merge the weights | ``auto`` |
| ``GELORA_LORA_CPU_KERNEL`` | use the C++ LoRA kernels on the CPU | on |
| ``GELORA_LORA_TUNE`` | autotune the Triton LoRA kernels | on |
| ``GELORA_LORA_TUNE_MAX`` | tune over at most the first N configurations of each LoRA kernel (0: all) | 0 |
| ``TRITON_INTERPRET`` | Triton runs kernels in its CPU interpreter (read when the kernels are imported) | off |
"""
from __future__ import annotations

import os
from typing import Optional

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


def flag(name: str, default: bool = False) -> bool:
    """The boolean environment variable ``name`` (``default`` when unset).

    Raises:
        ValueError: a value that is neither true nor false, naming the variable.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: use 1/true/yes/on or 0/false/no/off")


def text(name: str, default: str = "") -> str:
    """The environment variable ``name`` stripped (``default`` when unset or blank)."""
    v = os.environ.get(name, "").strip()
    return v or default


def integer(name: str, default: Optional[int] = None, minimum: int = 0) -> Optional[int]:
    """The integer environment variable ``name`` (``default`` when unset); at least ``minimum``.

    Raises:
        ValueError: not an integer, or below ``minimum``.
    """
    raw = text(name)
    if not raw:
        return default
    try:
        v = int(float(raw))
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc
    if v < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return v


def triton_interpret() -> bool:
    """``TRITON_INTERPRET``: Triton builds kernels for its CPU interpreter (read when they are imported)."""
    return flag("TRITON_INTERPRET")


def require_ext() -> bool:
    """``GELORA_REQUIRE_EXT``: a compiled core that does not load is an error, not a skipped engine."""
    return flag("GELORA_REQUIRE_EXT")


def forced_backend() -> Optional[str]:
    """``GELORA_BACKEND``: the kNN engine forced by the environment, or None."""
    return text("GELORA_BACKEND") or None


_CORE: list = []


def core():
    """The compiled core ``gelora._C``, or None when it is not built or does not load (the reason is in
    :func:`core_error`). Loaded once; ``GELORA_NO_EXT`` leaves it unloaded."""
    if not _CORE:
        mod, err = None, None
        if flag("GELORA_NO_EXT"):
            err = "GELORA_NO_EXT is set"
        else:
            try:
                from . import _C as mod  # noqa: PLC0415 - optional compiled extension
            except ImportError as exc:
                err = str(exc)
        _CORE.extend([mod, err])
    return _CORE[0]


def core_error() -> Optional[str]:
    """Why :func:`core` is None (None when it loaded)."""
    core()
    return _CORE[1]
