"""KenLM's binary format for an ARPA model: loads by mapping the file
(about a millisecond against half a second to parse the sample LM's 21 MB
ARPA), with the same scores (a trie without quantization stores the ARPA's
floats as they are; tested on the shipped pair).

The conversion is KenLM's own ``build_binary`` tool, which the ``kenlm``
Python package does not install; it compiles from KenLM's source without
Boost (``pip download --no-binary :all: --no-deps kenlm``, unpack, run
``compile_query_only.sh``: about 30 s on 2 cores, ``bin/build_binary``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from dsstream.decoding.lm import read_arpa_unigrams, vocab_sidecar

__all__ = ["write_binary", "vocab_sidecar"]


def write_binary(arpa: str | Path, out: str | Path, build_binary: str = "build_binary") -> Path:
    """``arpa`` as a KenLM trie binary at ``out``, with its unigrams in
    ``<out>.vocab`` (a binary model does not list its words)."""
    tool = shutil.which(build_binary)
    if tool is None:
        raise FileNotFoundError(
            f"KenLM's build_binary not found ({build_binary!r}); compile it from KenLM's "
            "source with compile_query_only.sh (see dsstream.lm.binary)"
        )
    out = Path(out)
    run = subprocess.run([tool, "trie", str(arpa), str(out)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"build_binary failed on {arpa}: {run.stderr.strip()[-500:]}")
    vocab_sidecar(out).write_text("\n".join(read_arpa_unigrams(arpa)) + "\n", encoding="utf-8")
    return out
