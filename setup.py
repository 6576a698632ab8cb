"""Build script: the pure-Python package plus the optional C++ core ``gelora._C``.

The C++ core is built with CMake (the pybind11 ``cmake_example`` pattern) and needs neither torch nor
a GPU. When CMake or pybind11 is missing, or the build fails, the package still installs and
``import gelora`` falls back to the other backends; set ``GELORA_REQUIRE_EXT=1`` to turn that into an
error (CI does), or ``GELORA_NO_EXT=1`` to skip the extension on purpose.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[], optional=True)
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _load_env():
    """gelora/_env.py, the one reader of gelora's flags, loaded by path (it imports nothing of gelora, and
    the package is not installed yet)."""
    spec = importlib.util.spec_from_file_location("_gelora_env", ROOT / "gelora" / "_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ENV = _load_env()


class CMakeBuild(build_ext):
    """Builds ``gelora._C`` with CMake; a failed optional build leaves no output behind."""

    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            self._build(ext)
        except Exception as exc:  # noqa: BLE001 - any build failure degrades to the other backends
            if ENV.flag("GELORA_REQUIRE_EXT"):
                raise
            print(f"warning: gelora C++ core not built ({exc}); the torch/FAISS/Triton backends remain",
                  file=sys.stderr)

    def _build(self, ext: CMakeExtension) -> None:
        if ENV.flag("GELORA_NO_EXT"):
            raise RuntimeError("GELORA_NO_EXT is set")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        import pybind11  # noqa: F401  (raises ImportError when absent)

        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cfg = ENV.text("GELORA_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if ENV.flag("GELORA_ASAN"):
            cmake_args.append("-DGELORA_ASAN=ON")
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [a for a in os.environ["CMAKE_ARGS"].split(" ") if a]
        build_args = ["--config", cfg, "-j", str(os.cpu_count() or 2)]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", *build_args], cwd=build_temp, check=True)


setup(
    # gelora/kernels is a link to the top-level kernels/ folder (no __init__.py there: a regular package
    # named `kernels` at the root would shadow Hugging Face's `kernels`, which transformers imports)
    packages=["gelora", "gelora.id", "gelora.neighbours", "gelora.neighbours.engines", "gelora.profiling", "gelora.lora",
              "gelora.kernels"],
    ext_modules=[CMakeExtension("gelora._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
