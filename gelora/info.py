"""``python -m gelora.info`` / ``gelora info``: every kNN backend, whether it is usable here, and why not."""
from __future__ import annotations

import importlib.util
import platform
import sys

from . import _env


def _version(mod: str) -> str:
    if importlib.util.find_spec(mod) is None:
        return "not installed"
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "installed"))
    except Exception as exc:  # noqa: BLE001
        return f"import failed: {exc!r}"


def report() -> str:
    import torch

    import gelora
    from gelora.neighbours.engines.registry import describe

    lines = [
        f"gelora {gelora.__version__}  python {platform.python_version()}  torch {torch.__version__}"
        f"  ({torch.get_num_threads()} threads)",
        f"cuda: {'yes, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}",
    ]
    for mod in ("triton", "faiss", "transformers", "peft", "numpy"):
        lines.append(f"{mod}: {_version(mod)}")
    lines.append("")
    lines.append("backends (in the order backend=None tries them):")
    for name, usable, reasons, desc in describe():
        mark = "usable " if usable else "missing"
        lines.append(f"  {name:7s} {mark}  {desc}")
        for r in reasons:
            lines.append(f"           - {r}")
    from gelora.lora import describe_lora_backends

    lines.append("")
    lines.append("fused LoRA backends (for this machine's default device):")
    for name, usable, reasons, desc in describe_lora_backends():
        lines.append(f"  {name:7s} {'usable ' if usable else 'missing'}  {desc}")
        for r in reasons:
            lines.append(f"           - {r}")
    core = _env.core()
    isa = core.info()["isas"][0] if core is not None and hasattr(core, "lora_grad") else None
    lines.append("  CPU float32 weight gradients: " + (f"one-pass C++ kernel ({isa})" if isa else
                                                      "BLAS calls (gelora._C is not built)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
