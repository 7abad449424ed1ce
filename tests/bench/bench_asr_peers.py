"""Recognizers on real speech, in the same run: dsstream's sample model through
its streaming pipeline (``dsstream.transcribe``: resampling, Silero VAD
endpointing, the streaming model, the beam search with the sample LM at the
settings recorded in the artifact) against CMU PocketSphinx 5 with its
bundled US English acoustic model, dictionary and LM (the recognizer the
sample model's issue names as the reference), fed whole utterances and fed
100 ms pieces as a live stream.

Data: LJ Speech's LJ001 clips in ../shared/data/speech (one US reader,
22.05 kHz; ``BENCH_LJ_CLIPS`` of them, all 186 by default), the same clips
through an 8 kHz telephone rate (each recognizer gets 8 kHz samples and
resamples them itself), and the real speakers that apps.asr.corpora holds
out of training (its dev and test speakers of each corpus; Ogg Opus at 24
kbit/s, so lossy), whole utterances only.  Both take the same float
samples; each recognizer's time is the CPU time of this process (every
thread) while it works, its own resampling to 16 kHz included, per second
of audio.  One recognizer runs at a time.  ``BENCH_ASR_SETS`` (comma-separated
prefixes: ``lj001``, ``lj001-8k``, ``dev``, ``test``) picks sets; the scores
are also written to ``BENCH_ASR_PEERS_JSON`` (default
``cache/asr/peers.json``), which ``apps.asr.card`` puts on the model card.

Needs: ``pip install pocketsphinx==5.1.1`` (``make bench`` does it; its
wheel carries the model) and ../shared/data/speech.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LJ001 = ROOT.parent / "shared" / "data" / "speech" / "lj001"
N_CLIPS = int(os.environ.get("BENCH_LJ_CLIPS", "186"))
SETS = os.environ.get("BENCH_ASR_SETS", "lj001,dev,test").split(",")
OUT = Path(os.environ.get("BENCH_ASR_PEERS_JSON", ROOT / "cache" / "asr" / "peers.json"))
PIECE_S = 0.1  # a live client's frame

Recognizer = Callable[[np.ndarray, int], str]
Set = tuple[list[str], list[tuple[np.ndarray, int]]]


def clips() -> tuple[list[str], list[tuple[np.ndarray, int]]]:
    from dsstream.lm import normalize_sentence

    lines = (LJ001 / "transcripts.tsv").read_text(encoding="utf-8").splitlines()[:N_CLIPS]
    refs, audio = [], []
    for line in lines:
        name, text = line.split("\t", 1)
        samples, rate = sf.read(LJ001 / f"{name}.flac", dtype="float32")
        refs.append(normalize_sentence(text))
        audio.append((samples, rate))
    return refs, audio


def at_8k(audio: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, int]]:
    """The clips as an 8 kHz caller sends them."""
    import torch
    import torchaudio

    return [(torchaudio.functional.resample(torch.from_numpy(x), rate, 8000).numpy(), 8000)
            for x, rate in audio]  # fmt: skip


def real_sets(tmp: Path) -> dict[str, Set]:
    """``"<split> <corpus>"`` -> the held-out real speakers' utterances, split as
    apps.asr.corpora splits them for training (dev and test speakers)."""
    from apps.asr.corpora import prepare

    prepare(ROOT.parent / "shared" / "data", tmp, seed=0)
    out: dict[str, Set] = {}
    for split in ("dev", "test"):
        for line in (tmp / f"real_{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            refs, audio = out.setdefault(f"{split} {row['corpus']}", ([], []))
            samples, rate = sf.read(row["path"], dtype="float32")
            refs.append(row["text"])
            audio.append((samples, rate))
    return out


def bench_sets(tmp: Path) -> dict[str, Set]:
    """The sets ``BENCH_ASR_SETS`` picks, in a fixed order."""
    found: dict[str, Set] = {}
    refs, audio = clips()
    found["lj001"], found["lj001-8k"] = (refs, audio), (refs, at_8k(audio))
    found |= real_sets(tmp)
    return {name: s for name, s in found.items() if any(name.startswith(p) for p in SETS)}


def dsstream_recognizer(int8: bool) -> Recognizer:
    import dsstream
    from dsstream.pipelines.defaults import default_registry

    registry = default_registry(int8=int8)
    return lambda samples, rate: dsstream.transcribe(samples, rate, registry=registry).text


def _pcm16(samples: np.ndarray, rate: int) -> bytes:
    import torch
    import torchaudio

    x = torch.from_numpy(samples)
    if rate != 16000:
        x = torchaudio.functional.resample(x, rate, 16000)
    return (x.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes()


def pocketsphinx_recognizer(streaming: bool) -> Recognizer:
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=16000, logfn=os.devnull)
    piece = int(16000 * PIECE_S) * 2  # bytes of 16-bit samples

    def recognize(samples: np.ndarray, rate: int) -> str:
        pcm = _pcm16(samples, rate)
        decoder.start_utt()
        if streaming:
            for i in range(0, len(pcm), piece):
                decoder.process_raw(pcm[i : i + piece], False, False)
        else:
            decoder.process_raw(pcm, False, True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    return recognize


def run(recognize: Recognizer, audio: list[tuple[np.ndarray, int]]) -> tuple[list[str], float]:
    """Hypotheses (normalized as the references) and CPU seconds per second of audio."""
    from dsstream.lm import normalize_sentence

    recognize(*audio[0])  # loads the models and warms the caches; not timed
    hyps, cpu = [], 0.0
    for samples, rate in audio:
        start = time.process_time()
        text = recognize(samples, rate)
        cpu += time.process_time() - start
        hyps.append(normalize_sentence(text))
    return hyps, cpu / sum(len(s) / r for s, r in audio)


def test_bench_asr_against_pocketsphinx_on_real_speech(tmp_path):
    pytest.importorskip("pocketsphinx", reason="pip install pocketsphinx==5.1.1")
    if not (LJ001 / "transcripts.tsv").is_file():
        pytest.skip(f"{LJ001} is not there")
    from dsstream.evaluation import cer, wer

    recognizers = {
        "dsstream, INT8 (served)": dsstream_recognizer(int8=True),
        "dsstream, float32": dsstream_recognizer(int8=False),
        "pocketsphinx, whole utterance": pocketsphinx_recognizer(streaming=False),
        "pocketsphinx, 100 ms pieces": pocketsphinx_recognizer(streaming=True),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, (refs, audio) in bench_sets(tmp_path).items():
        seconds = sum(len(s) / r for s, r in audio)
        print(f"\n{set_name}: {len(refs)} utterances, {seconds:.0f} s of real speech; "
              f"{sys.platform}")  # fmt: skip
        print("recognizer                        WER      CER   CPU s per s of audio")
        for name, recognize in recognizers.items():
            if "pieces" in name and set_name != "lj001":
                continue  # live feeding measured once: it scores as whole utterances
            hyps, cpu = run(recognize, audio)
            scores = {"wer": wer(refs, hyps), "cer": cer(refs, hyps), "cpu": cpu, "n": len(refs)}
            results.setdefault(set_name, {})[name] = scores
            print(f"{name:30s} {scores['wer']:7.1%}  {scores['cer']:7.1%}  {cpu:10.3f}")
        ours = results[set_name]["dsstream, INT8 (served)"]
        theirs = results[set_name]["pocketsphinx, whole utterance"]
        print(f"dsstream INT8 / pocketsphinx (whole): WER x{ours['wer'] / theirs['wer']:.2f}, "
              f"CPU x{ours['cpu'] / theirs['cpu']:.2f}")  # fmt: skip
        # After every set: a long run stopped part way keeps what it measured.
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2))
        print(f"wrote {OUT}")
