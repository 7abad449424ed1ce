"""N-gram language models: text normalization and Kneser-Ney estimation to ARPA."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from dsstream.lm.builder import NGramModel, build_lm, write_arpa
from dsstream.lm.normalize import normalize_corpus, normalize_sentence, split_sentences

__all__ = [
    "NGramModel",
    "build_lm",
    "build_arpa",
    "write_arpa",
    "read_corpus",
    "normalize_sentence",
    "normalize_corpus",
    "split_sentences",
]


def read_corpus(path: str | Path, one_per_line: bool = False) -> Iterator[str]:
    """Normalized sentences of a text file (prose, or one sentence per line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from normalize_corpus(f, prose=not one_per_line)


def build_arpa(
    inputs: Sequence[str | Path],
    output: str | Path,
    order: int = 3,
    prune_thresholds: Sequence[int] = (),
    one_per_line: bool = False,
    exclude: Iterable[str] = (),
    progress: bool = True,
) -> NGramModel:
    """Normalize ``inputs``, estimate a modified Kneser-Ney model, write ARPA.

    ``exclude``: normalized sentences to leave out (e.g. evaluation text).
    """
    from tqdm import tqdm

    excluded = set(exclude)

    def sentences() -> Iterator[list[str]]:
        for path in inputs:
            for sentence in read_corpus(path, one_per_line):
                if sentence not in excluded:
                    yield sentence.split()

    stream = tqdm(sentences(), desc="counting", unit=" sentences", disable=not progress)
    model = build_lm(stream, order, prune_thresholds)
    write_arpa(model, output)
    return model
