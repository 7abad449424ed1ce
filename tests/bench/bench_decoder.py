"""CTC decoders with one KenLM model, in the same run: dsstream's CTCDecoder
in its free and lexicon modes, pyctcdecode, torchaudio's flashlight-text
``ctc_decoder`` (lexicon mode: a word LM only works with a lexicon there), and
greedy.

Data: the LJ001 transcripts (real sentences, excluded from the sample LM) laid
out as CTC log-probabilities with realistic confusions (c/k, e/a, m/n, ...)
by ``tests/emissions.py``, seeded.  40 ms frames, as the sample model emits.
Every decoder is tuned the same way at each beam: a grid over the LM weight
and the word score on a dev split (LJ001 sentences 41-100), then measured
on the test split (sentences 1-40).  Grids are in natural-log units;
flashlight's KenLM scores are log10, so its weight is the grid's times ln 10.
Each measurement runs in its own process, with a fresh LM; the time is the
fastest of ``BENCH_REPEATS`` (3) runs, taken in turn across the decoders, so
that a noisy neighbour on a shared machine weighs on no decoder alone.
"peak MB" is that process's peak RSS minus its RSS before the decoder (and
its LM) was built.

Needs: ``pip install --no-deps pyctcdecode==0.5.0 pygtrie flashlight-text``
(``make bench`` does it), ``samples/asr/lm.arpa`` and ../shared/data/speech.
``BENCH_DECODERS`` (comma-separated names) and ``BENCH_BEAMS`` narrow the run.
"""

from __future__ import annotations

import json
import math
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
RESULTS = ROOT / "cache" / "bench" / "decoder.json"
FRAME_S = 0.04
TEST, DEV = slice(0, 40), slice(40, 100)
ALPHAS = (0.5, 0.8, 1.1, 1.4, 1.7, 2.0)  # LM weight, per ln p
BETAS = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0)  # word score, per word
BEAMS = tuple(int(b) for b in os.environ.get("BENCH_BEAMS", "10,32,100").split(","))
# Timed runs per decoder and beam, interleaved across decoders; the fastest
# counts (a shared machine's noise only ever adds time).
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def dataset(split: slice) -> tuple[list[str], list[np.ndarray]]:
    from emissions import emissions

    from dsstream.lm import normalize_sentence

    lines = TRANSCRIPTS.read_text(encoding="utf-8").splitlines()
    refs = [normalize_sentence(line.split("\t", 1)[1]) for line in lines]
    rng = np.random.default_rng(2026)  # every sentence's draw, so splits never shift
    mats = [emissions(r, rng, confusion=0.12, noise=1.2) for r in refs]
    return refs[split], mats[split]


def _ours(mode: str):
    def make(beam: int, alpha: float, beta: float, hotwords: int = 0):
        from dsstream.decoding import CTCDecoder
        from dsstream.decoding.lm import KenLM

        # A fresh model, as each peer loads its own: a path would share the
        # process's one (KenLM.shared) with its score cache warm from the last row.
        decoder = CTCDecoder(beam_width=beam, language_model=KenLM(LM), alpha=alpha, beta=beta,
                             mode=mode)  # fmt: skip
        words = [f"hotword{i}" for i in range(hotwords)]
        return lambda m: decoder.decode(m, hotwords=words or None).text

    return make


def _pyctcdecode(beam: int, alpha: float, beta: float, hotwords: int = 0):
    from pyctcdecode import build_ctcdecoder

    from dsstream.decoding import ENGLISH_CHARS
    from dsstream.decoding.lm import read_arpa_unigrams

    labels = ["", " ", *ENGLISH_CHARS.tokens[2:]]
    decoder = build_ctcdecoder(
        labels, str(LM), unigrams=read_arpa_unigrams(LM), alpha=alpha, beta=beta
    )
    words = [f"hotword{i}" for i in range(hotwords)] or None
    return lambda m: decoder.decode(m, beam_width=beam, hotwords=words).strip()


def _flashlight(beam: int, alpha: float, beta: float, hotwords: int = 0):
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
        lm_weight=alpha * math.log(10), word_score=beta, blank_token="<blank>", sil_token="|",
    )  # fmt: skip

    def run(m: np.ndarray) -> str:
        hyp = decoder(torch.from_numpy(m)[None])[0][0]
        return " ".join(hyp.words)

    return run


def _greedy(beam: int, alpha: float, beta: float, hotwords: int = 0):
    from dsstream.decoding import greedy_decode

    return greedy_decode


DECODERS = {"dsstream": _ours("free"), "dsstream-lexicon": _ours("lexicon"),
            "pyctcdecode": _pyctcdecode, "flashlight": _flashlight,
            "greedy": _greedy}  # fmt: skip
CHOSEN = [n for n in os.environ.get("BENCH_DECODERS", ",".join(DECODERS)).split(",") if n]


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


def _worker(name: str, beam: int, alpha: float, beta: float, hotwords: int,
            queue: mp.Queue) -> None:  # fmt: skip
    from dsstream.evaluation import cer, wer

    refs, mats = dataset(TEST)
    if name == "flashlight":  # torch itself is not the decoder's memory
        import torchaudio.models.decoder  # noqa: F401
    base_mb = _reset_peak()  # the interpreter, numpy and the data: not the decoder's
    decode = DECODERS[name](beam, alpha, beta, hotwords)
    decode(mats[0])  # warm up: LM load, caches
    t0 = time.perf_counter()
    hyps = [decode(m) for m in mats]
    seconds = time.perf_counter() - t0
    audio = sum(len(m) for m in mats) * FRAME_S
    peak_mb = _status_mb("VmHWM") - base_mb
    queue.put((wer(refs, hyps), cer(refs, hyps), seconds / audio, peak_mb))


def _in_process(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join()
    return result


def measure(name: str, beam: int, alpha: float = 0.5, beta: float = 1.0,
            hotwords: int = 0) -> tuple[float, float, float, float]:  # fmt: skip
    """(WER, CER, s per s of audio, peak MB) on the test split, in a fresh process."""
    return _in_process(_worker, name, beam, alpha, beta, hotwords)


def _grid_worker(name: str, beam: int, points: list, queue: mp.Queue) -> None:
    from dsstream.evaluation import wer

    refs, mats = dataset(DEV)
    out = []
    for alpha, beta in points:
        decode = DECODERS[name](beam, alpha, beta)
        out.append((alpha, beta, wer(refs, [decode(m) for m in mats])))
    queue.put(out)


def tune(name: str, beam: int) -> tuple[float, float, float]:
    """The grid point with the lowest dev WER (ties: the earlier point), on
    both cores: (alpha, beta, dev WER)."""
    from concurrent.futures import ThreadPoolExecutor

    points = [(a, b) for a in ALPHAS for b in BETAS]
    halves = [points[0::2], points[1::2]]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda h: _in_process(_grid_worker, name, beam, h), halves))
    scored = {(a, b): w for part in parts for a, b, w in part}
    best = min(points, key=lambda p: (scored[p], points.index(p)))
    return best[0], best[1], scored[best]


def test_bench_decoders():
    if not LM.is_file() or not TRANSCRIPTS.is_file():
        import pytest

        pytest.skip(f"needs {LM} and {TRANSCRIPTS}")
    refs, mats = dataset(TEST)
    audio = sum(len(m) for m in mats) * FRAME_S
    print(f"\ntest: {len(refs)} utterances, {audio:.0f} s of audio, {FRAME_S * 1000:.0f} ms frames")
    print(f"grid: alpha {ALPHAS} x beta {BETAS}, tuned on dev sentences 41-100")
    results: dict = {"beams": {}}
    if "greedy" in CHOSEN:
        g = measure("greedy", 1)
        results["greedy"] = g
        print(f"greedy                   -  {g[0]:6.2%}  {g[1]:6.2%}  {g[2]:9.5f}  {g[3]:7.0f}")
    print("decoder           beam  alpha  beta  dev WER   WER     CER    s/s audio  peak MB  "
          "speed vs flashlight")  # fmt: skip
    for beam in BEAMS:
        names = [n for n in CHOSEN if n != "greedy"]
        tuned = {name: tune(name, beam) for name in names}
        runs: dict[str, list] = {name: [] for name in names}
        for _ in range(REPEATS):
            for name in names:
                runs[name].append(measure(name, beam, *tuned[name][:2]))
        rows = {}
        for name in names:
            wer_, cer_, _, mb = runs[name][0]
            rows[name] = (*tuned[name], wer_, cer_, min(r[2] for r in runs[name]), mb)
        results["beams"][beam] = rows
        base = rows.get("flashlight", (0,) * 6)[5]
        for name, (a, b, d, w, c, sec, mb) in rows.items():
            ratio = f"{base / sec:8.1f}x" if base else ""
            print(f"{name:16s}  {beam:4d}  {a:5.1f}  {b:4.0f}  {d:6.2%}  {w:6.2%}  {c:6.2%}  "
                  f"{sec:9.5f}  {mb:7.0f}  {ratio}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    if "dsstream" not in CHOSEN:
        return
    best = results["beams"].get(32, {}).get("dsstream")
    alpha, beta = (best[0], best[1]) if best else (0.5, 1.0)
    print("\nhotwords (beam 32)  dsstream s/s   pyctcdecode s/s")
    for n in (0, 100, 1000):
        ours = measure("dsstream", 32, alpha, beta, n)[2]
        theirs = measure("pyctcdecode", 32, alpha, beta, n)[2] if n <= 100 else float("nan")
        print(f"{n:18d}  {ours:13.5f}  {theirs:15.5f}")
