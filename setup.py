"""Build the optional C statistics kernel (gradprobe/_kernel.c); everything else is in pyproject.toml.

The kernel is optional: without a C compiler the build skips it and gradprobe computes the same
statistics with PyTorch operations (slower; docs/performance.md).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else [
    "-O3",
    # reductions vectorise only when additions may be reordered (results stay float64-exact to
    # rounding); no -ffinite-math-only: NaN and inf are data here
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
]

setup(
    ext_modules=[
        Extension(
            "gradprobe._kernel",
            ["gradprobe/_kernel.c"],
            extra_compile_args=flags,
            # dlopen/dlsym find torch's OpenMP runtime (in libc itself from glibc 2.34 on)
            libraries=["dl"] if sys.platform.startswith("linux") else [],
            optional=True,
        )
    ]
)
