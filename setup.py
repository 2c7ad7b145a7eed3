"""Build of the optional C kernels; the project metadata lives in pyproject.toml.

`eldric_p2p.engine._qkernels` (quantized matmul on GGUF blocks) is optional: where no C compiler exists (or
the build fails) the install still succeeds and the engine falls back to its torch path. No -march flag: the
AVX2 kernels are compiled per function with target attributes and chosen at run time, so one build runs on any
x86-64. Threads are a small pthread pool inside the module (no OpenMP runtime to clash with torch's).
On Linux, `eldric_p2p.net.relay._ksplice` (the relay's TCP lane copied by the kernel with splice(2)) is
optional the same way: without it the relay copies the lane in its event loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# the kernels and ops, included by both extensions' .c files
HEADERS = sorted(str(p) for p in Path("eldric_p2p/engine/csrc").glob("*.h"))


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                # -ffp-contract=off: only the fused multiply-adds the code spells out (llama.cpp's order)
                ext.extra_compile_args = ["-O3", "-std=c11", "-pthread", "-ffp-contract=off"]
                ext.extra_link_args = ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "eldric_p2p.engine._qkernels",
            sources=["eldric_p2p/engine/_qkernels.c"],
            depends=HEADERS,
            optional=True,
            libraries=["m"],
        ),
        Extension(
            "eldric_p2p.engine._ggmlops",
            sources=["eldric_p2p/engine/_ggmlops.c"],
            depends=HEADERS,
            optional=True,
            libraries=["m"],
        ),
    ]
    + (
        # the relay's TCP lane spliced by the kernel (net/relay/ksplice.py); without it the loop copies
        [
            Extension(
                "eldric_p2p.net.relay._ksplice", sources=["eldric_p2p/net/relay/_ksplice.c"], optional=True
            )
        ]
        if sys.platform.startswith("linux")
        else []
    )
    if sys.implementation.name == "cpython"
    else [],
    cmdclass={"build_ext": BuildExt},
)
