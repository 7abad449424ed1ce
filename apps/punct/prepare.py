"""Recipe step 1: label the text in ../shared/data/text for punctuation and case.

    python -m apps.punct.prepare [--text ../shared/data/text] [--out cache/punct]

Every document becomes the recognizer's words (numbers spelled out, as
:func:`dsstream.punctuation.labels_of` does) with the mark after each word and
its case.  Whole documents are held out: ``test`` for the reported scores,
``dev`` for choosing settings; the rest trains.  The LJ Speech sentences
(``ljspeech_sentences.txt``, LJ001 and LJ002 already left out by the data's
maker) are one stream, its last 1,000 sentences dev.  Writes
``<out>/{train,dev,test}.json.gz`` and ``<out>/split.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from dsstream.punctuation import labels_of

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["documents", "split_of", "prepare", "read_split", "main"]

# Test: a novel, Doyle's, whose short stories train (the closest a user's
# dictation of prose gets); dev: one of Austen's two (Emma trains).
TEST_BOOKS = ("The-Hound-of-the-Baskervilles_2852.txt",)
DEV_BOOKS = ("Pride-and-Prejudice_1342.txt",)
LJ_DEV_SENTENCES = 1000


def documents(text_dir: Path) -> Iterator[tuple[str, str]]:
    """(name, raw text) of every document, in a fixed order."""
    for folder in ("gutenberg", "nltk_inaugural", "nltk_state_union"):
        for path in sorted((text_dir / folder).glob("*.txt")):
            yield f"{folder}/{path.name}", path.read_text(encoding="utf-8", errors="replace")
    lines = (text_dir / "ljspeech_sentences.txt").read_text(encoding="utf-8").splitlines()
    yield "ljspeech/train", " ".join(lines[:-LJ_DEV_SENTENCES])
    yield "ljspeech/dev", " ".join(lines[-LJ_DEV_SENTENCES:])


def split_of(name: str) -> str:
    """Which split a document is in: every fifth speech (by year order) is
    test, the one after it dev; the named books; the LJ sentences' tail."""
    folder, _, file = name.partition("/")
    if folder == "gutenberg":
        return "test" if file in TEST_BOOKS else "dev" if file in DEV_BOOKS else "train"
    if folder == "ljspeech":
        return "dev" if file == "dev" else "train"
    year = int(file[:4])
    return {0: "test", 1: "dev"}.get(year % 5 if folder == "nltk_state_union" else
                                     (year - 1789) // 4 % 5, "train")  # fmt: skip


def prepare(text_dir: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "dev": [], "test": []}
    for name, text in documents(text_dir):
        doc = labels_of(text)
        splits[split_of(name)].append(
            {"name": name, "words": list(doc.words), "marks": list(doc.marks),
             "cases": list(doc.cases)}
        )  # fmt: skip
    summary: dict[str, Any] = {}
    for split, docs in splits.items():
        with gzip.open(out / f"{split}.json.gz", "wt") as f:
            json.dump(docs, f)
        summary[split] = {"documents": [d["name"] for d in docs],
                          "words": sum(len(d["words"]) for d in docs)}  # fmt: skip
    (out / "split.json").write_text(json.dumps(summary, indent=1))
    return summary


def read_split(data: Path, split: str) -> list[dict[str, Any]]:
    with gzip.open(data / f"{split}.json.gz", "rt") as f:
        docs: list[dict[str, Any]] = json.load(f)
    return docs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "text")
    parser.add_argument("--out", type=Path, default=ROOT / "cache" / "punct")
    args = parser.parse_args(argv)
    summary = prepare(args.text, args.out)
    for split, info in summary.items():
        print(f"{split}: {len(info['documents'])} documents, {info['words']:,} words")
    return summary


if __name__ == "__main__":
    main()
