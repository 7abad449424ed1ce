"""Build the CUDA C++ kernels ahead of time (they also build on first use).

    python -m kernels.build [--verbose]

Needs nvcc (``CUDA_HOME``, or /usr/local/cuda); a GPU is not needed to build.
Prints where the extension was built.
"""

from __future__ import annotations

import argparse
import time

from kernels._build import build_dir, load_extension

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    started = time.monotonic()
    module = load_extension(verbose=args.verbose)
    print(f"built {module.__name__} in {build_dir()} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
