"""The layering of docs/architecture.md, checked: no import cycles (every module imports first in a fresh
set of gelora modules), a light ``import gelora``, and one reader of the environment flags."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "gelora"


def _modules():
    mods = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    # gelora/kernels is a link to the top-level kernels/ folder (which rglob does not follow)
    mods += [f"gelora.kernels.{p.stem}" for p in sorted((ROOT / "kernels").glob("*.py"))]
    return mods


_FIRST = r"""
import importlib, sys, traceback
import torch  # loaded once; the gelora modules are dropped between tries
bad = []
for m in sys.argv[1:]:
    for name in [k for k in sys.modules if k == "gelora" or k.startswith("gelora.")]:
        del sys.modules[name]
    try:
        importlib.import_module(m)
    except ModuleNotFoundError as exc:
        if exc.name not in ("triton",):  # optional: the Triton kernels need it, nothing else does
            bad.append(m + ": " + repr(exc))
    except Exception:
        bad.append(m + ": " + traceback.format_exc().strip().splitlines()[-1])
print("BAD" if bad else "OK")
print("\n".join(bad))
"""


def test_every_module_imports_first():
    """Each module of the package imports on its own, first, with no other gelora module loaded: an
    import cycle (or an ``__init__`` that imports upwards) fails here."""
    mods = _modules()
    assert "gelora.neighbours.pipeline" in mods and "gelora.id.twonn" in mods and "gelora.kernels.knn_top2" in mods
    assert {f"gelora.profiling.{m}" for m in ("structure", "contexts", "sampler", "hooks", "results", "scales", "driver")} <= set(mods)
    out = subprocess.run([sys.executable, "-c", _FIRST, *mods], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK"), out.stdout


def test_import_gelora_is_light():
    code = ("import sys, gelora; gelora.__version__; "
            "print(sorted(m for m in ('triton', 'transformers', 'peft', 'gelora.lora', 'gelora.profiling') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
    # and every public name resolves
    import gelora

    for name in gelora.__all__:
        assert getattr(gelora, name) is not None, name


def test_flags_are_read_in_one_module():
    """``GELORA_*`` and ``TRITON_INTERPRET`` are read through gelora/_env.py only."""
    pat = re.compile(r"""environ(\.get)?\s*[\[(]\s*["'](GELORA_|TRITON_INTERPRET)""")
    offenders = []
    for p in list(PKG.rglob("*.py")) + list((ROOT / "kernels").glob("*.py")):
        if p.name == "_env.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pat.search(line):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_env_flags_have_one_meaning(monkeypatch):
    import pytest

    from gelora import _env

    for v, want in (("1", True), ("true", True), ("ON", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", v)
        assert _env.triton_interpret() is want, v
    monkeypatch.setenv("GELORA_TRITON_SYMMETRIC", "maybe")
    with pytest.raises(ValueError, match="GELORA_TRITON_SYMMETRIC"):
        _env.flag("GELORA_TRITON_SYMMETRIC", True)
    monkeypatch.setenv("GELORA_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="GELORA_CHUNK_BYTES"):
        _env.integer("GELORA_CHUNK_BYTES")


#: docs/architecture.md, "Who may import whom", for the model-facing layers: the gelora modules (or
#: packages) each may import from
_ALLOWED = {
    "gelora.profiling.structure": (),
    "gelora.profiling.contexts": (),
    "gelora.profiling.sampler": ("gelora.profiling.contexts",),
    "gelora.profiling.results": ("gelora.id",),
    "gelora.profiling.hooks": ("gelora.profiling.contexts", "gelora.profiling.sampler", "gelora.profiling.structure"),
    "gelora.profiling.scales": ("gelora.id",),
    "gelora.profiling.driver": ("gelora.id", "gelora.profiling"),
    "gelora.ranks": ("gelora.profiling.results",),
    "gelora.peft_bridge": ("gelora.ranks", "gelora.profiling.structure"),
}


def _gelora_imports(modname: str):
    """``(module, names)`` of every gelora import in a module (top level or inside functions)."""
    path = ROOT.joinpath(*modname.split(".")).with_suffix(".py")
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = modname.split(".")[: -node.level] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod == "gelora" or mod.startswith("gelora."):
                out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "gelora"]
    return out


def test_profiling_ranks_and_bridge_import_downwards_and_public_names_only():
    bad = []
    for modname, allowed in _ALLOWED.items():
        for mod, names in _gelora_imports(modname):
            if not any(mod == a or mod.startswith(a + ".") for a in allowed):
                bad.append(f"{modname} imports {mod}")
            bad += [f"{modname} imports the private {mod}.{n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)
    # the checker sees relative imports, inside functions too
    assert ("gelora.id.twonn", ["twonn"]) in _gelora_imports("gelora.profiling.driver")
    assert any(m == "gelora.profiling.driver" for m, _ in _gelora_imports("gelora.cli"))
