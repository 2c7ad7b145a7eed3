"""Build of the optional C kernels; the project metadata lives in pyproject.toml.

`eldric_p2p.engine._qkernels` (quantized matmul on GGUF blocks) is optional: where no C compiler exists (or
the build fails) the install still succeeds and the engine falls back to its torch path. No -march flag: the
AVX2 kernels are compiled per function with target attributes and chosen at run time, so one build runs on any
x86-64. Threads are a small pthread pool inside the module (no OpenMP runtime to clash with torch's).
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = ["-O3", "-std=c11", "-pthread"]
                if ext.name.endswith("_ggmlops"):
                    ext.extra_compile_args.append("-ffp-contract=off")  # only the fused operations it spells out
                ext.extra_link_args = ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "eldric_p2p.engine._qkernels",
            sources=["eldric_p2p/engine/_qkernels.c"],
            optional=True,
        ),
        Extension(
            "eldric_p2p.engine._ggmlops",
            sources=["eldric_p2p/engine/_ggmlops.c"],
            optional=True,
            libraries=["m"],
        ),
    ]
    if sys.implementation.name == "cpython"
    else [],
    cmdclass={"build_ext": BuildExt},
)
