"""Build of the optional C kernels; the project metadata lives in pyproject.toml.

`eldric_p2p.engine._qkernels` (quantized matmul on GGUF blocks) is optional: where no C compiler exists the
install still succeeds and the engine falls back to its torch path. OpenMP is used when the compiler accepts
-fopenmp. No -march flag: the AVX2 kernels are compiled per function and chosen at run time.
"""

from __future__ import annotations

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(compiler, flags: list[str]) -> bool:
    """True when `compiler` compiles and links a small OpenMP program with `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, os.path.join(tmp, "omp_probe"), extra_postargs=flags)
        except Exception:  # any compiler or linker failure means "no"
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            omp = ["-fopenmp"] if _compiler_accepts(self.compiler, ["-fopenmp"]) else []
            for ext in self.extensions:
                ext.extra_compile_args = ["-O3", "-std=c11", *omp]
                ext.extra_link_args = [*omp]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "eldric_p2p.engine._qkernels",
            sources=["eldric_p2p/engine/_qkernels.c"],
            optional=True,
        )
    ]
    if sys.implementation.name == "cpython"
    else [],
    cmdclass={"build_ext": BuildExt},
)
