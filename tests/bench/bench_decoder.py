"""CTC decoders with one KenLM model, in the same run: dsstream's CTCDecoder,
pyctcdecode, torchaudio's flashlight-text ``ctc_decoder`` (lexicon mode: a word
LM only works with a lexicon there), and greedy.

Data: the LJ001 transcripts (real sentences, excluded from the sample LM) laid
out as CTC log-probabilities with realistic confusions (c/k, e/a, m/n, ...)
by ``tests/emissions.py``, seeded.  40 ms frames, as the sample model emits.
Each (decoder, beam) runs in its own process; "peak MB" is that process's
peak RSS minus its RSS before the decoder (and its LM) was built.

Needs: ``pip install --no-deps pyctcdecode==0.5.0 pygtrie flashlight-text``
(``make bench`` does it), ``samples/asr/lm.arpa`` and ../shared/data/speech.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

LM = ROOT / "samples" / "asr" / "lm.arpa"
TRANSCRIPTS = ROOT.parent / "shared" / "data" / "speech" / "lj001" / "transcripts.tsv"
FRAME_S = 0.04
ALPHA, BETA = 0.5, 1.0
N_UTTERANCES = int(os.environ.get("BENCH_UTTERANCES", "40"))


def dataset() -> tuple[list[str], list[np.ndarray]]:
    from emissions import emissions

    from dsstream.lm import normalize_sentence

    lines = TRANSCRIPTS.read_text(encoding="utf-8").splitlines()[:N_UTTERANCES]
    refs = [normalize_sentence(line.split("\t", 1)[1]) for line in lines]
    rng = np.random.default_rng(2026)
    mats = [emissions(r, rng, confusion=0.12, noise=1.2) for r in refs]
    return refs, mats


def _ours(beam: int, hotwords: int):
    from dsstream.decoding import CTCDecoder
    from dsstream.decoding.lm import KenLM

    # A fresh model, as each peer loads its own: a path would share the process's
    # one (KenLM.shared) with its score cache warm from the previous rows.
    decoder = CTCDecoder(beam_width=beam, language_model=KenLM(LM), alpha=ALPHA, beta=BETA)
    words = [f"hotword{i}" for i in range(hotwords)]
    return lambda m: decoder.decode(m, hotwords=words or None).text


def _pyctcdecode(beam: int, hotwords: int):
    from pyctcdecode import build_ctcdecoder

    from dsstream.decoding import ENGLISH_CHARS
    from dsstream.decoding.lm import read_arpa_unigrams

    labels = ["", " ", *ENGLISH_CHARS.tokens[2:]]
    decoder = build_ctcdecoder(
        labels, str(LM), unigrams=read_arpa_unigrams(LM), alpha=ALPHA, beta=BETA
    )
    words = [f"hotword{i}" for i in range(hotwords)] or None
    return lambda m: decoder.decode(m, beam_width=beam, hotwords=words).strip()


def _flashlight(beam: int, hotwords: int):
    import tempfile

    import torch
    from torchaudio.models.decoder import ctc_decoder

    from dsstream.decoding import ENGLISH_CHARS
    from dsstream.decoding.lm import read_arpa_unigrams

    lexicon = Path(tempfile.mkdtemp()) / "lexicon.txt"
    with open(lexicon, "w") as f:
        for word in read_arpa_unigrams(LM):
            f.write(f"{word}\t{' '.join(word)} |\n")
    decoder = ctc_decoder(
        lexicon=str(lexicon), tokens=list(ENGLISH_CHARS.tokens), lm=str(LM), beam_size=beam,
        lm_weight=ALPHA, word_score=BETA, blank_token="<blank>", sil_token="|",
    )  # fmt: skip

    def run(m: np.ndarray) -> str:
        hyp = decoder(torch.from_numpy(m)[None])[0][0]
        return " ".join(hyp.words)

    return run


def _greedy(beam: int, hotwords: int):
    from dsstream.decoding import greedy_decode

    return greedy_decode


DECODERS = {"dsstream": _ours, "pyctcdecode": _pyctcdecode, "flashlight": _flashlight,
            "greedy": _greedy}  # fmt: skip


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> float:
    """Reset the peak RSS (Linux clear_refs 5) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _worker(name: str, beam: int, hotwords: int, queue: mp.Queue) -> None:
    from dsstream.evaluation import cer, wer

    refs, mats = dataset()
    if name == "flashlight":  # torch itself is not the decoder's memory
        import torchaudio.models.decoder  # noqa: F401
    base_mb = _reset_peak()  # the interpreter, numpy and the data: not the decoder's
    decode = DECODERS[name](beam, hotwords)
    decode(mats[0])  # warm up: LM load, caches
    t0 = time.perf_counter()
    hyps = [decode(m) for m in mats]
    seconds = time.perf_counter() - t0
    audio = sum(len(m) for m in mats) * FRAME_S
    peak_mb = _status_mb("VmHWM") - base_mb
    queue.put((wer(refs, hyps), cer(refs, hyps), seconds / audio, peak_mb))


def measure(name: str, beam: int, hotwords: int = 0) -> tuple[float, float, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(name, beam, hotwords, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join()
    return result


def test_bench_decoders():
    if not LM.is_file() or not TRANSCRIPTS.is_file():
        import pytest

        pytest.skip(f"needs {LM} and {TRANSCRIPTS}")
    refs, mats = dataset()
    audio = sum(len(m) for m in mats) * FRAME_S
    print(f"\n{len(refs)} utterances, {audio:.0f} s of audio at {FRAME_S * 1000:.0f} ms frames")
    print("decoder      beam   WER     CER    s/s audio   peak MB   speed vs pyctcdecode")
    g = measure("greedy", 1)
    print(f"greedy          -  {g[0]:6.2%}  {g[1]:6.2%}  {g[2]:9.5f}  {g[3]:7.0f}")
    for beam in (10, 32, 100):
        rows = {name: measure(name, beam) for name in ("dsstream", "pyctcdecode", "flashlight")}
        base = rows["pyctcdecode"][2]
        for name, (w, c, s, mb) in rows.items():
            print(
                f"{name:11s}  {beam:4d}  {w:6.2%}  {c:6.2%}  {s:9.5f}  {mb:10.0f}  {base / s:8.1f}x"
            )
    print("\nhotwords (beam 32)  dsstream s/s   pyctcdecode s/s")
    for n in (0, 100, 1000):
        ours = measure("dsstream", 32, n)[2]
        theirs = measure("pyctcdecode", 32, n)[2] if n <= 100 else float("nan")
        print(f"{n:18d}  {ours:13.5f}  {theirs:15.5f}")
