"""Injection into PEFT: :func:`fuse_lora` swaps PEFT's LoRA linear layers for fused ones (one module class,
``FusedLoraLinear``, sibling projections grouped into one launch), :func:`unfuse_lora` undoes it; modules
the fused op cannot serve (dropout, DoRA and other variants, ``lora_bias``, Conv1D and quantized bases)
are left alone with the reason in the report."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .backends import _FLOAT_DTYPES
from .config import DEFAULT_SIBLING_NAMES, LoraFuseConfig, LoraFuseReport
from .functions import lora_grouped_linear, lora_linear

log = logging.getLogger("gelora")


@dataclass(eq=False)
class _FusedState:
    adapter: str
    config: LoraFuseConfig
    group: Optional["_SiblingGroup"] = None


class _SiblingGroup:
    """Projections of one parent that read the same input: the first one called runs the grouped
    launch for every member that can fuse on that input and parks the others' outputs, which they
    take when called with the very same tensor (same object, same version, same grad mode)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members = list(members)
        self.enabled = True
        self._pending = None  # (x, version, grad_enabled, {member: output})

    def run(self, member: nn.Module, x: torch.Tensor, dt: torch.dtype) -> Optional[torch.Tensor]:
        pending = self._pending
        if pending is not None:
            px, version, grad_mode, outs = pending
            if px is x and x._version == version and grad_mode == torch.is_grad_enabled() and member in outs:
                out = outs.pop(member)
                if not outs:
                    self._pending = None
                return out
            # somebody's output was never picked up: these siblings do not read one input in turn
            self._pending = None
            self.enabled = False
            log.info("gelora: sibling projections %s do not share one input; grouping switched off",
                     [type(m).__name__ for m in self.members])
            return None
        members = [member] + [m for m in self.members if m is not member and m._gelora_dtype(x) == dt]
        if len(members) < 2:
            return None
        ys = _run_fused(members, x, dt, single=False)
        self._pending = (x, x._version, torch.is_grad_enabled(), dict(zip(members[1:], ys[1:])))
        return ys[0]


def _compute_dtype(module: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """dtype the base GEMM of ``module`` would run in on ``x`` (autocast's, else x's); None when PEFT's
    own forward must handle the call (x and the base weight disagree without autocast)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return dt if dt in _FLOAT_DTYPES else None
    if x.dtype != module.get_base_layer().weight.dtype:
        return None
    return x.dtype


def _layer_tensors(module, adapter, dt):
    base = module.get_base_layer()
    w = base.weight.to(dt)
    b = None if base.bias is None else base.bias.to(dt)
    a = module.lora_A[adapter].weight.to(dt)
    bb = module.lora_B[adapter].weight.to(dt)
    return w, b, a, bb, float(module.scaling[adapter])


def _other_adapters(module, x, y):
    """Add the active adapters other than the fused one, exactly as PEFT's forward does."""
    st: _FusedState = module._gelora_state
    out_dtype = y.dtype
    for name in module.active_adapters:
        if name == st.adapter or name not in module.lora_A.keys():
            continue
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        cast = getattr(module, "_cast_input_dtype", None)  # PEFT >= 0.14 (honours its opt-out)
        xa = cast(x, lora_A.weight.dtype) if cast is not None else x.to(lora_A.weight.dtype)
        y = y + lora_B(lora_A(module.lora_dropout[name](xa))) * module.scaling[name]
    return y.to(out_dtype)


def _run_fused(modules, x, dt, single: bool):
    st: _FusedState = modules[0]._gelora_state
    cfg = st.config
    ops_name = cfg.backend
    xc = x.to(dt)
    tensors = [_layer_tensors(m, m._gelora_state.adapter, dt) for m in modules]
    autocast_on = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast_on else _nullcontext():
        if single:
            w, b, a, bb, s = tensors[0]
            ys = [lora_linear(xc, w, b, a, bb, s, backend=ops_name, recompute_shrink=cfg.recompute_shrink)]
        else:
            ws, bs, a_s, b_s, ss = (list(v) for v in zip(*tensors))
            ys = lora_grouped_linear(xc, ws, bs, a_s, b_s, ss, backend=ops_name,
                                     recompute_shrink=cfg.recompute_shrink)
    return [_other_adapters(m, x, y) for m, y in zip(modules, ys)]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
    """The compute dtype when this call can take the fused path, else None (PEFT's forward runs).
    Checked on every call; cheap attribute tests."""
    st: Optional[_FusedState] = self.__dict__.get("_gelora_state")
    if st is None or self.disable_adapters or self.merged:
        return None
    adapter = st.adapter
    active = self.active_adapters
    if adapter not in active or adapter not in self.lora_A.keys():
        return None
    for name in active:  # other active adapters are added eagerly, unless they are a LoRA variant
        if _is_variant(self, name):
            return None
    drop = self.lora_dropout[adapter]
    if not isinstance(drop, nn.Identity) and not (isinstance(drop, nn.Dropout) and
                                                   (drop.p == 0 or not drop.training)):
        return None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return None
    if x.shape[-1] != self.in_features:
        return None
    # a forced backend that cannot run is not a reason to fall back: lora_linear raises its reasons
    return _compute_dtype(self, x)


@functools.lru_cache(maxsize=1)
def _fused_class():
    """``FusedLoraLinear``: PEFT's LoRA ``Linear`` with the fused forward (created on first use so that
    ``import gelora`` does not import PEFT)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class FusedLoraLinear(PeftLoraLinear):
        """PEFT LoRA ``Linear`` running its fused adapter through :func:`lora_linear`.

        Never constructed directly: :func:`fuse_lora` switches the class of an existing PEFT module
        (parameters, buffers, hooks and state-dict keys stay as they are) and :func:`unfuse_lora`
        switches it back. Calls the fused path cannot serve (adapter disabled or merged, fused adapter
        not active, dropout in training, extra arguments, input and base weight of different dtypes
        without autocast) run PEFT's forward.

        Dtypes: the fused adapter computes in the base layer's dtype (autocast's under autocast); an
        adapter kept in fp32 next to a bf16 base (PEFT's ``autocast_adapter_dtype``) is cast to bf16 for
        the fused GEMM, its gradients arrive in fp32. PEFT instead upcasts the input to fp32 for the
        LoRA branch, a full (M, K) fp32 copy; results agree within bf16 rounding.
        """

        _gelora_dtype = _fused_dtype

        def forward(self, x, *args, **kwargs):
            dt = None if (args or kwargs) else self._gelora_dtype(x)
            if dt is None:
                return super().forward(x, *args, **kwargs)
            group = self._gelora_state.group
            if group is not None and group.enabled:
                y = group.run(self, x, dt)
                if y is not None:
                    return y
            return _run_fused([self], x, dt, single=True)[0]

        def __repr__(self) -> str:
            return "gelora.fused_" + super().__repr__()

    FusedLoraLinear.__module__ = __name__
    FusedLoraLinear.__qualname__ = "FusedLoraLinear"
    return FusedLoraLinear


def __getattr__(name):  # PEP 562: gelora.lora.FusedLoraLinear (pickle finds the class here)
    if name == "FusedLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_variant(module, adapter: str) -> bool:
    """DoRA and the other variants (``lora_variant`` since PEFT 0.15, ``use_dora`` before)."""
    return adapter in getattr(module, "lora_variant", {}) or bool(getattr(module, "use_dora", {}).get(adapter))


def _skip_reason(module, adapter: Optional[str]) -> Optional[str]:
    if adapter is None:
        return "no active adapter"
    if adapter not in module.lora_A.keys():
        return f"no adapter named {adapter!r} (has {sorted(module.lora_A.keys())})"
    if _is_variant(module, adapter):
        kind = type(getattr(module, "lora_variant", {}).get(adapter, "DoRA")).__name__
        return f"adapter {adapter!r} is a LoRA variant ({kind}); not fused"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True is not fused"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D base layer) is not fused"
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not torch.nn.Linear"
    return None


def fuse_lora(model: nn.Module, *, adapter_name: Optional[str] = None, backend: Optional[str] = None,
              recompute_shrink: bool = False, group_siblings: bool = False,
              sibling_names: Sequence[Sequence[str]] = DEFAULT_SIBLING_NAMES) -> LoraFuseReport:
    """Switch PEFT's LoRA ``Linear`` modules of ``model`` to the fused forward, in place.

    Each module keeps its parameters (``lora_A``/``lora_B`` weights are the same tensors, so
    optimizers, ``save_pretrained``, ``merge_and_unload`` and adapter switching keep working) and
    reads its rank, scale (``rank_pattern``, ``alpha_pattern`` and rsLoRA are already folded into
    PEFT's ``r``/``scaling``) and active adapters on every call. Only the fused adapter takes the fused
    path; other active adapters are added eagerly, and a call where it is not active runs PEFT's
    forward. Undo with :func:`unfuse_lora`.

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers).
        adapter_name, backend, recompute_shrink, group_siblings, sibling_names: see
            :class:`LoraFuseConfig`.

    Returns:
        A :class:`LoraFuseReport`. Modules already fused are reported as skipped.
    """
    cfg = LoraFuseConfig(adapter_name=adapter_name, backend=backend, recompute_shrink=recompute_shrink,
                         group_siblings=group_siblings,
                         sibling_names=tuple(tuple(g) for g in sibling_names))
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.layer import LoraLayer

    fused_cls = _fused_class()
    report = LoraFuseReport()
    fused_modules: Dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if type(mod) is fused_cls:
            report.skipped[name] = "already fused (unfuse_lora first to change options)"
            continue
        if type(mod) is not PeftLoraLinear:
            if isinstance(mod, LoraLayer):
                report.skipped[name] = f"{type(mod).__name__} is not a plain PEFT LoRA Linear"
            continue
        active = list(mod.active_adapters)
        adapter = cfg.adapter_name if cfg.adapter_name is not None else (active[0] if active else None)
        reason = _skip_reason(mod, adapter)
        if reason is not None:
            report.skipped[name] = reason
            continue
        drop = mod.lora_dropout[adapter]
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            report.notes[name] = (f"lora_dropout={drop.p}: training calls run PEFT's eager path "
                                  "(dropout is not fused); eval calls are fused")
        mod.__class__ = fused_cls
        mod._gelora_state = _FusedState(adapter=adapter, config=cfg)
        fused_modules[name] = mod
        report.fused.append(name)
    if cfg.group_siblings:
        report.groups = _make_groups(fused_modules, cfg.sibling_names)
    return report


def _make_groups(fused: Dict[str, nn.Module], sibling_names) -> List[Tuple[str, ...]]:
    by_parent: Dict[str, Dict[str, str]] = {}
    for name in fused:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = name
    groups = []
    for parent, children in by_parent.items():
        for names in sibling_names:
            full = [children[c] for c in names if c in children]
            if len(full) < 2:
                continue
            mods = [fused[f] for f in full]
            w0 = mods[0].get_base_layer().weight
            same = all(m.in_features == mods[0].in_features
                       and m.get_base_layer().weight.dtype == w0.dtype
                       and m.get_base_layer().weight.device == w0.device for m in mods)
            if not same:
                continue
            grp = _SiblingGroup(mods)
            for m in mods:
                m._gelora_state.group = grp
            groups.append(tuple(full))
    return groups


def unfuse_lora(model: nn.Module) -> List[str]:
    """Undo :func:`fuse_lora`: every fused module becomes PEFT's LoRA ``Linear`` again (same
    parameters). Returns the names of the modules switched back."""
    fused_cls = _fused_class()
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    names = []
    for name, mod in model.named_modules():
        if type(mod) is fused_cls:
            mod.__class__ = PeftLoraLinear
            mod.__dict__.pop("_gelora_state", None)
            names.append(name)
    return names
