"""Recipe step 1: sentences and synthesized speech for the sample ASR model.

    python -m apps.asr.prepare [--hours 10 12 5 5] [--workers 2] [--out cache/asr] [--no-real]

Real speech first: the corpora of ../shared/data/speech are listed and split by
speaker (apps.asr.corpora: ``real_train``/``real_dev``/``real_test.jsonl``;
``--no-real`` leaves them out), then synthesized speech is made to go with them.

Sentences come from ../shared/data/text (never from the evaluation speech),
normalized to the model's vocabulary; each is spoken by a seeded choice among
the installed voices at a seeded rate and pitch.  The voices come in releases
(apps.asr.voices): release 1 is espeak-ng's voices and variants, flite and
festival's kal; release 2 the more natural festival diphone, MBROLA and HTS
voices, RHVoice and SVOX Pico; release 3 MBROLA's German, Greek and Romanian
voices speaking English through espeak-ng, and release 4 its Afrikaans,
French, Hungarian, Dutch, Polish and Swedish ones.  ``--hours`` gives each release's hours of
speech, in order, with its own sentences, none spoken twice.  Whole voices
are held out for validation.  Audio is
resampled to 16 kHz mono FLAC under ``<out>/audio``; ``<out>/train.jsonl``
and ``<out>/valid.jsonl`` list id, path, text, voice and duration.  Reruns
reuse a file made from the same sentence (stored in its FLAC comment), so an
interrupted run resumes.  Augmentation happens at
training time.

The spoken forms of the VQA question templates (every paraphrase with every
colour, ``--templates`` times each) are appended, so spoken questions in a VQA
session are recognized; appended last, they leave the other utterances' ids
and voices unchanged.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from apps.asr.lm import SHARED, corpus_files, evaluation_sentences
from apps.asr.voices import SynthesisError, Voice, catalogue, split_voices, synthesize

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
WORDS_PER_SECOND = 2.6  # measured over the catalogue's voices at rate 1.0
MEAN_WORDS = 11.0  # per selected sentence


def select_sentences(shared: Path, count: int, seed: int, min_words: int = 3,
                     max_words: int = 24) -> list[str]:  # fmt: skip
    """``count`` distinct normalized sentences, none from the evaluation speech."""
    from dsstream.lm import read_corpus

    excluded = evaluation_sentences(shared)
    pool: dict[str, None] = {}
    for path, one_per_line in corpus_files(shared):
        for sentence in read_corpus(path, one_per_line):
            n = len(sentence.split())
            if min_words <= n <= max_words and sentence not in excluded:
                pool[sentence] = None
    sentences = sorted(pool)
    random.Random(seed).shuffle(sentences)
    return sentences[:count]


def plan(
    sentences: list[str], voices: list[Voice], seed: int, first: int = 0, by: str = "engine"
) -> list[tuple[str, str, Voice]]:
    """(utterance id, text, voice) for every sentence, deterministically.

    ``by="engine"`` draws the engine first, uniformly, then a voice of it:
    espeak-ng has hundreds of voice variants, flite and festival a handful of
    more natural voices, and real speech is closer to the latter.
    ``by="speaker"`` draws a speaker uniformly (release 2, where every voice
    is a natural one and an engine may have only two).  Ids count from ``first``.
    """
    rng = random.Random(seed + 1 + first)
    groups: dict[str, list[Voice]] = {}
    for v in voices:
        groups.setdefault(v.engine if by == "engine" else v.speaker, []).append(v)
    keys = sorted(groups)
    return [
        (f"u{first + i:07d}", text, rng.choice(groups[rng.choice(keys)]))
        for i, text in enumerate(sentences)
    ]


DRAW_BY = {1: "engine", 2: "speaker"}  # release -> how plan() draws its voices


def plan_releases(
    sentences: list[str], extra: list[str], voices: list[Voice], hours: list[float], seed: int
) -> list[tuple[str, str, Voice]]:
    """Jobs of every release with hours: release r speaks its slice of ``sentences``
    (release 1's first, each release's count from its hours) followed by ``extra``
    (the VQA templates), its ids continuing after the previous release's."""
    jobs: list[tuple[str, str, Voice]] = []
    start = 0
    for release, h in enumerate(hours, start=1):
        count = sentence_count(h)
        texts, start = sentences[start : start + count], start + count
        mine = [v for v in voices if v.release == release]
        if mine and texts:
            by = DRAW_BY.get(release, "speaker")
            jobs += plan(texts + extra, mine, seed, first=len(jobs), by=by)
    return jobs


def sentence_count(hours: float) -> int:
    return int(hours * 3600 * WORDS_PER_SECOND / MEAN_WORDS)


def rendered_text(path: Path) -> str | None:
    """The sentence a rendered file was made from (its FLAC comment), or None when
    the file is missing or unreadable.  (Files are written whole: see _render.)"""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            return f.comment
    except RuntimeError:  # soundfile's LibsndfileError included
        return None


def _render(job: tuple[str, str, Voice, str]) -> dict | None:
    uid, text, voice, out_dir = job
    import soundfile as sf
    import torch
    import torchaudio

    out = Path(out_dir) / voice.speaker.replace("+", "_") / f"{uid}.flac"
    # Reuse only a file made from this very sentence: ids follow plan order, so a
    # rerun with other hours may give an id to another text.
    if rendered_text(out) != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "x.wav"
            try:
                synthesize(voice, text, wav)
            except SynthesisError:
                return None
            data, rate = sf.read(str(wav), dtype="float32", always_2d=True)
        audio = torch.from_numpy(data.mean(axis=1))
        if rate != RATE:
            audio = torchaudio.functional.resample(audio, rate, RATE)
        peak = float(audio.abs().max())
        if peak < 1e-4:
            return None  # silence: the synthesizer skipped the text
        part = out.with_suffix(".part")
        with sf.SoundFile(str(part), "w", RATE, 1, "PCM_16", format="FLAC") as f:
            f.comment = text
            f.write((audio / max(peak, 1.0)).numpy())
        part.replace(out)  # whole files only, even if the run is interrupted
    info = sf.info(str(out))
    return {"id": uid, "path": str(out), "text": text, "voice": voice.id,
            "speaker": voice.speaker, "release": voice.release,
            "duration": round(info.duration, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, nargs="+", default=[10.0, 12.0, 5.0, 5.0],
                        help="hours of speech per voice release, in order (a release "
                             "without hours is left out)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--templates", type=int, default=3,
                        help="times each VQA question form is spoken (0: none)")  # fmt: skip
    parser.add_argument("--no-real", action="store_true",
                        help="synthesized speech only (no apps.asr.corpora manifests)")  # fmt: skip
    args = parser.parse_args(argv)
    from tqdm import tqdm

    if not args.no_real:
        from apps.asr.corpora import prepare as prepare_real

        for split, corpora in prepare_real(args.shared, args.out, args.seed)["splits"].items():
            hours = sum(c["hours"] for c in corpora.values())
            print(f"real {split}: {sum(c['utterances'] for c in corpora.values())} utterances, "
                  f"{hours:.2f} h, {len(corpora)} corpora")  # fmt: skip

    from apps.vqa.scenes import all_template_texts

    voices = catalogue(args.seed)
    if not voices:
        raise SystemExit(
            "no synthesizer found: apt-get install espeak-ng flite festival (see docs/asr.md)"
        )
    train_speakers, valid_speakers = split_voices(voices, seed=args.seed)
    sentences = select_sentences(args.shared, sum(map(sentence_count, args.hours)), args.seed)
    templates = [t for t in all_template_texts() for _ in range(args.templates)]
    planned = plan_releases(sentences, templates, voices, args.hours, args.seed)
    jobs = [(u, t, v, str(args.out / "audio")) for u, t, v in planned]
    print(f"{len(voices)} voice settings of {len(train_speakers) + len(valid_speakers)} voices "
          f"({len(valid_speakers)} held out); {len(jobs)} utterances")  # fmt: skip
    rows = []
    # Spawned, not forked: a fork of a process whose OpenMP or other threads hold
    # a lock (torch has run in it, as in a test session) can hang in the child.
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in tqdm(pool.map(_render, jobs, chunksize=16), total=len(jobs), unit=" utt"):
            if row is not None:
                rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, speakers in (("train", train_speakers), ("valid", valid_speakers)):
        chosen = [r for r in rows if r["speaker"] in speakers]
        with open(args.out / f"{split}.jsonl", "w") as f:
            for r in chosen:
                f.write(json.dumps(r) + "\n")
        hours = sum(r["duration"] for r in chosen) / 3600
        print(f"{split}: {len(chosen)} utterances, {hours:.2f} h, "
              f"{len({r['speaker'] for r in chosen})} voices")  # fmt: skip


if __name__ == "__main__":
    main()
