"""Builds the CPU extensions always and the CUDA extensions when nvcc is found.

Source lists and flags live in lenkernels/_build.py, shared with the build-on-first-use path.
"""

import os
import runpy
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
build = runpy.run_path(str(HERE / "lenkernels" / "_build.py"))


class BuildExt(build_ext):
    """Compiles each module with the exact commands of lenkernels/_build.py (g++ or nvcc), in parallel."""

    def build_extensions(self):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(self.build_extension, self.extensions))

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        sources = [Path(s).resolve() for s in ext.sources]
        if ext.name.split(".")[-1].startswith("_cuda_"):
            cmd = build["cuda_compile_command"](ext.name, sources, output, build["find_nvcc"]())
        else:
            cmd = build["cpu_compile_command"](ext.name, sources, output)
        print(" ".join(cmd))
        subprocess.check_call(cmd)


def _relative(sources):
    return [str(Path(s).resolve().relative_to(HERE)) for s in sources]


def extensions():
    modules = dict(build["cpu_modules"]())
    if os.environ.get("LENKERNELS_SKIP_CUDA") != "1" and build["find_nvcc"]():
        modules.update(build["cuda_modules"]())
    return [Extension(f"lenkernels.{name}", _relative(srcs)) for name, srcs in modules.items()]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
