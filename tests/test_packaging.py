"""Packaging guards: the top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package
(which transformers imports), and the Triton kernels stay ``gelora.kernels.*`` in a source checkout, an
editable install and a wheel."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = ("knn_top2.py", "lora.py")


def _run_from_root(code: str) -> str:
    """``python -c code`` with the repository root as the working directory and first on ``sys.path``
    (as pytest, a notebook or ``python -c`` started in the checkout have it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_root_has_no_kernels_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package named `kernels`, which shadows Hugging "
        "Face's `kernels` (imported by transformers) for everything run from the repository root")


def test_transformers_and_peft_import_from_root():
    out = _run_from_root(
        "import transformers.activations, peft, importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec is not None else 'NONE')\n")
    origin = out.strip().splitlines()[-1]
    try:
        importlib.metadata.distribution("kernels")
        hub_installed = True
    except importlib.metadata.PackageNotFoundError:
        hub_installed = False
    if hub_installed:  # the installed distribution wins: a regular package, not the checkout's folder
        assert origin.endswith("__init__.py"), origin
        assert Path(origin).resolve().parent != (ROOT / "kernels").resolve(), origin
    else:  # without it, Python may at most see the folder as an empty namespace portion (no code runs)
        assert origin in {"NONE", "None"}, origin


@pytest.mark.parametrize("name", [f.removesuffix(".py") for f in KERNEL_FILES])
def test_kernels_are_gelora_kernels(name):
    out = _run_from_root(f"import os, gelora.kernels.{name} as m; print(os.path.realpath(m.__file__))")
    assert Path(out.strip()) == (ROOT / "kernels" / f"{name}.py").resolve()
    assert "import kernels" not in (ROOT / "kernels" / f"{name}.py").read_text()


def test_wheel_ships_gelora_kernels(tmp_path):
    """A wheel built from the sources (without the C++ core, to keep it quick) carries every package of
    gelora, the Triton kernels as ``gelora/kernels/*.py`` and no top-level ``kernels`` package."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                    "results", "gelora_out", ".cache", ".hypothesis", ".pytest_cache")
    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    env = dict(os.environ, GELORA_NO_EXT="1", PIP_NO_INPUT="1")
    env.pop("GELORA_REQUIRE_EXT", None)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gelora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in KERNEL_FILES:
        assert f"gelora/kernels/{f}" in names, sorted(names)
    assert not any(n.startswith("kernels/") for n in names), sorted(names)
    # every package of the source tree ships (setup.py lists them by hand)
    for init in (ROOT / "gelora").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, init
