"""Real transcribed English speech for the sample ASR model.

    python -m apps.asr.corpora [--out cache/asr] [--shared ../shared]

Reads the corpora in ``../shared/data/speech`` (Mini LibriSpeech, a
LibriSpeech sample, speechocean762, CMU AN4, a Common Voice sample; each
folder's ``transcripts.tsv`` is ``id<TAB>speaker<TAB>text``), normalizes each
transcript to the model's vocabulary (numbers spelled out, punctuation
dropped, AN4's spelled letters kept as one-letter words) and holds out whole
speakers of every corpus: a *dev* set, which choices may be made on
(checkpoints, the real-speech sampling weight, decoder settings), and a
*test* set, which is only reported.  Where a corpus has its own speaker split
(speechocean762, AN4), the held-out speakers come from its test side.

Writes ``<out>/real_train.jsonl``, ``real_dev.jsonl`` and ``real_test.jsonl``
(id, path, text, speaker, corpus, split, duration) and ``real_speakers.json``,
which names every held-out speaker per corpus.  ``lj001`` is never read here:
it is evaluation speech only.  The audio stays where it is (Ogg Opus, read at
16 kHz by soundfile); nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.asr.lm import SHARED

__all__ = ["CORPORA", "Corpus", "hold_out", "main", "normalize_transcript", "read_corpus"]

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Corpus:
    """One folder of ``../shared/data/speech`` and how many speakers it holds out."""

    name: str
    licence: str
    dev_speakers: int
    test_speakers: int
    # Draw the held-out speakers from the corpus's own test split (split.tsv).
    from_test_split: bool = False


# Held-out counts: enough utterances per corpus for a WER with a usable
# spread (LibriSpeech ~110 per speaker, speechocean762 20, AN4 13, Common
# Voice 1), few enough that training keeps most speakers.  The small
# LibriSpeech sample (4 speakers) gives one to test and none to dev.
CORPORA = (
    Corpus("librispeech-train-clean-5", "CC BY 4.0", dev_speakers=2, test_speakers=2),
    Corpus("librispeech-100-sample", "CC BY 4.0", dev_speakers=0, test_speakers=1),
    Corpus("speechocean762", "CC BY 4.0", dev_speakers=10, test_speakers=10, from_test_split=True),
    Corpus(
        "an4", "CMU AN4 licence (BSD-style)", dev_speakers=4, test_speakers=5, from_test_split=True
    ),  # fmt: skip
    Corpus("commonvoice-en-sample", "CC0 1.0", dev_speakers=20, test_speakers=20),
)


def normalize_transcript(text: str) -> str:
    """A corpus transcript as the model spells it: ``a-z'`` words, numbers in words.

    Every corpus goes through the one normalizer the LM and the synthesis
    prompts use (dsstream.lm.normalize_sentence), so a word is the same word
    everywhere; AN4's spelled letters ("p i t t s") stay one-letter words."""
    from dsstream.lm import normalize_sentence

    return normalize_sentence(text)


def read_corpus(folder: Path) -> list[dict[str, Any]]:
    """Every transcribed utterance of one corpus folder, in file order:
    id, path, raw text, speaker and (where the corpus has one) its own split."""
    own_split: dict[str, str] = {}
    if (folder / "split.tsv").is_file():
        for line in (folder / "split.tsv").read_text(encoding="utf-8").splitlines():
            uid, side = line.split("\t")
            own_split[uid] = side
    rows = []
    for n, line in enumerate((folder / "transcripts.tsv").read_text(encoding="utf-8").splitlines()):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{folder / 'transcripts.tsv'}:{n + 1}: expected id, speaker, text")
        uid, speaker, text = parts
        rows.append({"uid": uid, "path": str((folder / f"{uid}.opus").resolve()), "raw": text,
                     "speaker": speaker, "own_split": own_split.get(uid, "train")})  # fmt: skip
    return rows


def hold_out(corpus: Corpus, rows: list[dict[str, Any]], seed: int) -> dict[str, list[str]]:
    """The speakers of ``corpus`` held out as ``dev`` and ``test`` (seeded, sorted)."""
    pool = sorted({r["speaker"] for r in rows if not corpus.from_test_split
                   or r["own_split"] == "test"})  # fmt: skip
    need = corpus.dev_speakers + corpus.test_speakers
    if need > len(pool):
        raise ValueError(f"{corpus.name}: {need} held-out speakers asked, {len(pool)} available")
    random.Random(f"{seed}-{corpus.name}").shuffle(pool)
    return {"dev": sorted(pool[: corpus.dev_speakers]),
            "test": sorted(pool[corpus.dev_speakers : need])}  # fmt: skip


def _hours(rows: list[dict[str, Any]]) -> float:
    return sum(r["duration"] for r in rows) / 3600


def _duration(path: str) -> float:
    import soundfile as sf

    return round(sf.info(path).duration, 3)


def prepare(data: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """Write the real-speech manifests under ``out`` from ``data``/speech (the
    shared data folder); returns the held-out speakers and per-split counts."""
    speech = data / "speech"
    manifests: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    speakers: dict[str, Any] = {}
    for corpus in CORPORA:
        folder = speech / corpus.name
        if not (folder / "transcripts.tsv").is_file():
            raise SystemExit(f"{folder} is missing: the real-speech corpora come from "
                             "../shared/data/speech (see its README)")  # fmt: skip
        rows = read_corpus(folder)
        held = hold_out(corpus, rows, seed)
        speakers[corpus.name] = {**held, "licence": corpus.licence}
        side = {s: split for split in ("dev", "test") for s in held[split]}
        skipped = 0
        for r in rows:
            text = normalize_transcript(r["raw"])
            if not text:
                skipped += 1
                continue
            split = side.get(r["speaker"], "train")
            manifests[split].append({
                "id": f"{corpus.name}/{r['uid']}", "path": r["path"], "text": text,
                "speaker": f"{corpus.name}/{r['speaker']}", "corpus": corpus.name,
                "split": split, "duration": _duration(r["path"]),
            })  # fmt: skip
        speakers[corpus.name]["empty_transcripts"] = skipped
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"held_out": speakers, "splits": {}}
    for split, rows in manifests.items():
        with open(out / f"real_{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        summary["splits"][split] = {
            name: {"utterances": len(mine), "hours": round(_hours(mine), 3),
                   "speakers": len({r["speaker"] for r in mine})}
            for name in [c.name for c in CORPORA]
            if (mine := [r for r in rows if r["corpus"] == name])
        }  # fmt: skip
    (out / "real_speakers.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--shared", type=Path, default=SHARED,
                        help="the shared data folder (holding speech/)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = prepare(args.shared, args.out, args.seed)
    for split, corpora in summary["splits"].items():
        for name, c in corpora.items():
            print(f"{split:5s} {name:27s} {c['utterances']:5d} utt {c['hours']:6.2f} h "
                  f"{c['speakers']:4d} speakers")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
