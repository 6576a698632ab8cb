"""Model structure: the transformer blocks of a model, the LoRA-able linear modules inside them (PEFT's
``target_modules`` syntax) and the device the input ids go to. Nothing here runs the model."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

TargetSpec = Union[None, str, Sequence[str]]


def _config_num_layers(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            v = getattr(c, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def find_blocks(model: nn.Module, blocks: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The transformer blocks of ``model``: ``(path, ModuleList)``, e.g. ``("encoder.layer", ...)`` for
    BERT, ``("model.layers", ...)`` for a Llama causal LM, ``("transformer.h", ...)`` for GPT-2.

    Without ``blocks``, the blocks are the ``nn.ModuleList`` of identical modules with the most
    parameters, restricted to lists of ``config.num_hidden_layers`` entries when the config says so.

    Raises:
        ValueError: ``blocks`` names no ``ModuleList``, or no list of blocks is found.
    """
    if blocks is not None:
        try:
            ml = model.get_submodule(blocks)
        except AttributeError as exc:
            raise ValueError(f"blocks={blocks!r}: no such submodule in {type(model).__name__}") from exc
        if not isinstance(ml, nn.ModuleList) or len(ml) == 0:
            raise ValueError(f"blocks={blocks!r} is a {type(ml).__name__}, not a non-empty nn.ModuleList")
        return blocks, ml
    n_layers = _config_num_layers(model)
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, name, mod)
    if best is None:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__} (an nn.ModuleList of "
            f"{n_layers if n_layers else 'identical'} blocks); pass blocks='path.to.layers'"
        )
    return best[1], best[2]


def is_conv1d(mod: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): a linear layer with a transposed ``(in, out)`` weight."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def is_lora_linear(mod: nn.Module) -> bool:
    """True for the modules the PEFT bridge adapts: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def linear_features(mod: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D`` (a LoRA of rank r on it has
    ``r * (in + out)`` parameters)."""
    if isinstance(mod, nn.Linear):
        return int(mod.in_features), int(mod.out_features)
    if is_conv1d(mod):
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    raise TypeError(f"{type(mod).__name__} is not a linear module")


@dataclass(frozen=True)
class TargetModule:
    """A linear module inside block ``block``: full ``name`` and the ``rel`` name within the block."""

    name: str
    block: int
    rel: str
    in_features: int
    out_features: int

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features


def _matches(spec: TargetSpec, name: str) -> bool:
    """PEFT's ``target_modules`` semantics: a string is a regex that must match the full name, a list
    matches a name equal to an entry or ending with ``"." + entry``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_target_modules(
    model: nn.Module, target_modules: TargetSpec = None, *, blocks: Optional[str] = None
) -> List[TargetModule]:
    """The linear modules inside the transformer blocks that ``target_modules`` selects, in model order.

    Args:
        target_modules: ``None`` or ``"all-linear"``: every ``nn.Linear``/``Conv1D`` inside the blocks;
            a list of names (``["query", "value"]``, matched as PEFT does: equal to, or a ``.``-suffix
            of, the full module name); or a regex string matched against the full name.
        blocks: path of the block list (see :func:`find_blocks`).

    Raises:
        ValueError: nothing matched inside the blocks, or a matched module is not linear.
    """
    path, ml = find_blocks(model, blocks)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        target_modules = None
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be non-empty strings, got {target_modules!r}")
    block_of = {}
    for i, blk in enumerate(ml):
        prefix = f"{path}.{i}." if path else f"{i}."
        for rel, mod in blk.named_modules():
            if rel:
                block_of[prefix + rel] = (i, rel)
    out: List[TargetModule] = []
    outside: List[str] = []
    not_linear: List[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if target_modules is None:
            if name in block_of and is_lora_linear(mod):
                i, rel = block_of[name]
                out.append(TargetModule(name, i, rel, *linear_features(mod)))
            continue
        if not _matches(target_modules, name):
            continue
        if name not in block_of:
            outside.append(name)
        elif not is_lora_linear(mod):
            not_linear.append(f"{name} ({type(mod).__name__})")
        else:
            i, rel = block_of[name]
            out.append(TargetModule(name, i, rel, *linear_features(mod)))
    if not_linear:
        raise ValueError("target_modules selects modules that are not nn.Linear/Conv1D: " + ", ".join(not_linear[:8]))
    if outside:
        warnings.warn(
            f"target_modules={target_modules!r} also matches {len(outside)} module(s) outside the "
            f"transformer blocks ({', '.join(outside[:4])}); they get no per-layer rank and are left out",
            stacklevel=2,
        )
    if not out:
        rels = sorted({rel.rsplit(".", 1)[-1] for rel, m in ml[0].named_modules() if rel and is_lora_linear(m)})
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear module inside the blocks '{path}'; "
            f"the linear modules of a block are named {rels}"
        )
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the execution device of the input embeddings (accelerate hooks), else
    the device of their weight, else of the first non-meta parameter."""
    emb = None
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None:
        hook = getattr(emb, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.device.type != "meta":
            return w.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
