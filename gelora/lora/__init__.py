"""Fused variable-rank LoRA for training with GeLoRA's per-layer ranks: the op and its equations
(:mod:`.functions`, where the module docstring says what is fused and when fusing stops paying off), its
backends (:mod:`.backends`), the configuration (:mod:`.config`) and the injection into PEFT
(:mod:`.inject`: :func:`fuse_lora`, :func:`unfuse_lora`)."""
from .backends import (LORA_BACKENDS, PRIORITY, TorchLoraBackend, TritonLoraBackend,  # noqa: F401
                       describe_lora_backends, select_lora_backend)
from .config import DEFAULT_SIBLING_NAMES, LoraFuseConfig, LoraFuseReport
from .functions import LoraGroupedLinearFunction, LoraLinearFunction, lora_grouped_linear, lora_linear
from .inject import fuse_lora, unfuse_lora
from ..kernels.lora import lora_grouped_reference, lora_linear_reference

__all__ = [
    "DEFAULT_SIBLING_NAMES",
    "LoraFuseConfig",
    "LoraFuseReport",
    "LoraGroupedLinearFunction",
    "LoraLinearFunction",
    "describe_lora_backends",
    "fuse_lora",
    "lora_grouped_linear",
    "lora_grouped_reference",
    "lora_linear",
    "lora_linear_reference",
    "select_lora_backend",
    "unfuse_lora",
]


def __getattr__(name):  # PEP 562: gelora.lora.FusedLoraLinear, the class fuse_lora puts into a model
    if name == "FusedLoraLinear":
        from .inject import _fused_class

        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
