"""Build of the optional compiled decoder core; metadata lives in pyproject.toml.

The extension is optional: without a C++ compiler the install still succeeds
and dsstream.decoding falls back to the pure-Python search, with a warning.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "dsstream.decoding._native",
            ["dsstream/decoding/_native.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
