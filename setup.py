"""Thin driver: configures and builds the CMake project so that `pip install --no-build-isolation -e .` (or
`python setup.py build_ext --inplace`) produces `epmoe._C`. CMakeLists.txt is the one build definition."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        # CMake always writes _C next to the package sources (what an editable install imports); a regular wheel
        # build then copies it to setuptools' build folder.
        source_dir = ROOT / "python" / "epmoe"
        build_dir = Path(os.environ.get("EPMOE_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DEPMOE_OUTPUT_DIR={source_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('EPMOE_BUILD_TYPE', 'Release')}",
        ]
        subprocess.check_call(configure)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        built = source_dir / target.name
        if target != built:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, target)


setup(ext_modules=[CMakeExtension("epmoe._C")], cmdclass={"build_ext": CMakeBuild})
