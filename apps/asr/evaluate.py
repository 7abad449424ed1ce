"""Recipe step 3: score the trained model.

    python -m apps.asr.evaluate [--data cache/asr] [--lm samples/asr/lm.arpa]

CER and WER, greedy and with the LM (beam search + KenLM), per held-out voice
and per voice release (apps.asr.voices); per corpus on the real speakers
held out by apps.asr.corpora (``real_dev``: what choices were made on;
``real_test``: never chosen on); and on the real speech of
../shared/data/speech/lj001, at 16 kHz and through 8 kHz (the telephone
path: down to 8 kHz and back up, as the pipeline resamples an 8 kHz caller).
Writes ``<data>/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.asr.lm import SHARED
from apps.asr.train import decode_greedy, load_checkpoint, load_wave, read_manifest
from dsstream.evaluation import cer, wer
from dsstream.frontend_torch import Fbank
from dsstream.lm import normalize_sentence

ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "DEFAULT_DECODER", "decoder_settings", "evaluate", "main", "real_sets", "score",
    "score_groups", "telephone_rate", "transcripts",
]  # fmt: skip

# The decoder settings when apps.asr.tune has not chosen any (<data>/decoder.json).
DEFAULT_DECODER = {"beam_width": 32, "alpha": 0.5, "beta": 1.0, "mode": "free"}


def decoder_settings(data: Path, mode: str | None = None) -> dict[str, Any]:
    """The ``beam_width``, ``alpha``, ``beta`` and ``mode`` chosen by
    ``apps.asr.tune`` in ``<data>/decoder.json``, else :data:`DEFAULT_DECODER`;
    ``modes``, each search mode's tuned ``alpha`` and ``beta``; and ``lj_dev``,
    how many LJ001 clips they were chosen on (0 without a choice).  ``mode``:
    that mode's settings instead of the chosen one's."""
    path = data / "decoder.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    out = {k: saved.get(k, v) for k, v in DEFAULT_DECODER.items()}
    modes = saved.get("modes", {out["mode"]: {"alpha": out["alpha"], "beta": out["beta"]}})
    out["modes"] = {m: {"alpha": v["alpha"], "beta": v["beta"]} for m, v in modes.items()}
    if mode is not None:
        if mode not in out["modes"]:
            raise ValueError(f"{path} has no tuned settings for mode {mode!r}")
        out |= {"mode": mode, **out["modes"][mode]}
    return out | {"lj_dev": saved.get("lj_dev", 0)}


def _logp(model: torch.nn.Module, fbank: Fbank, wave: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        feats = fbank(torch.from_numpy(wave)[None])[0]
        t = int(math.ceil(max(feats.shape[0], 4) / 4) * 4)
        feats = torch.nn.functional.pad(feats, (0, 0, 0, t - feats.shape[0]))
        return model(feats[None])[0].numpy()


def transcripts(mats: list[np.ndarray], decoder: Any) -> dict[str, list[str]]:
    """Each utterance's transcript from its log-probabilities ``mats`` (each
    [frames, tokens]): ``"greedy"``, and ``"lm"`` (the beam search with the
    LM) when ``decoder`` is given.  Decoded once per set, and ``score`` takes
    its groups (corpus, voice, release) from it instead of decoding again."""
    out = {"greedy": [decode_greedy(torch.from_numpy(m)) for m in mats]}
    if decoder is not None:
        out["lm"] = [r.text for r in decoder.decode_batch(mats)]
    return out


def score(
    refs: list[str], hyps: dict[str, list[str]], idx: Sequence[int] | None = None
) -> dict[str, float]:
    """CER and WER of each kind of transcript in ``hyps`` (``transcripts``)
    against ``refs``, over the utterances ``idx`` (default: all)."""
    take = range(len(refs)) if idx is None else idx
    picked = [refs[i] for i in take]
    out: dict[str, float] = {"n": len(picked)}
    for kind, texts in hyps.items():
        mine = [texts[i] for i in take]
        out |= {f"cer_{kind}": cer(picked, mine), f"wer_{kind}": wer(picked, mine)}
    return {k: round(v, 4) for k, v in out.items()}


def telephone_rate(wave: np.ndarray, rate: int = 8000) -> np.ndarray:
    """16 kHz ``wave`` as an 8 kHz caller's: down to ``rate`` and back to 16 kHz
    with torchaudio's resampler (which the streaming resampler equals)."""
    import torchaudio

    x = torchaudio.functional.resample(torch.from_numpy(wave), 16000, rate)
    return torchaudio.functional.resample(x, rate, 16000).numpy()


def real_sets(data: Path) -> dict[str, list[dict[str, Any]]]:
    """The held-out real speakers' utterances (apps.asr.corpora): ``dev`` and
    ``test``, each empty when not prepared."""
    out = {}
    for split in ("dev", "test"):
        path = data / f"real_{split}.jsonl"
        out[split] = read_manifest(path) if path.is_file() else []
    return out


def score_groups(
    rows: list[dict[str, Any]], mats: list[np.ndarray], key: str, decoder: Any
) -> dict[str, Any]:
    """``score`` over all ``rows`` (as ``"all"``) and per value of ``row[key]``,
    each utterance decoded once."""
    refs, hyps = [r["text"] for r in rows], transcripts(mats, decoder)
    return {"all": score(refs, hyps)} | _score_by(refs, hyps, [str(r[key]) for r in rows])


def _score_by(refs: list[str], hyps: dict[str, list[str]], labels: list[str]) -> dict[str, Any]:
    """``score`` per label, over the utterances that carry it."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    return {name: score(refs, hyps, idx) for name, idx in sorted(groups.items())}


def lj_set(limit: int) -> list[tuple[str, str]]:
    folder = SHARED / "speech" / "lj001"
    lines = (folder / "transcripts.tsv").read_text(encoding="utf-8").splitlines()[:limit]
    return [(str(folder / f"{line.split(chr(9))[0]}.flac"), normalize_sentence(line.split("\t")[1]))
            for line in lines]  # fmt: skip


def evaluate(
    model: torch.nn.Module,
    fbank: Fbank,
    data: Path,
    lm: Path | None,
    beam: int = 32,
    alpha: float = 0.5,
    beta: float = 1.0,
    limit: int = 2000,
    lj_limit: int = 186,
    lj_dev: int = 0,
    mode: str = "free",
) -> dict[str, Any]:
    """CER/WER greedy and with the LM, overall and per held-out voice, and on LJ001
    (also on its clips past the first ``lj_dev``, those ``apps.asr.tune`` did not see)."""
    decoder = None
    if lm is not None and lm.is_file():
        from dsstream.decoding import CTCDecoder

        decoder = CTCDecoder(beam_width=beam, language_model=lm, alpha=alpha, beta=beta,
                             mode=mode)  # fmt: skip
    valid = data / "valid.jsonl"
    rows = read_manifest(valid)[:limit] if valid.is_file() else []
    report: dict[str, Any] = {}
    if rows:
        refs = [r["text"] for r in rows]
        hyps = transcripts([_logp(model, fbank, load_wave(r["path"])) for r in rows], decoder)
        report["held_out_voices"] = score(refs, hyps)
        report["per_release"] = _score_by(refs, hyps, [str(r.get("release", 1)) for r in rows])
        report["per_voice"] = _score_by(refs, hyps, [r["speaker"] for r in rows])
    for split, real in real_sets(data).items():
        if real:
            real_mats = [_logp(model, fbank, load_wave(r["path"])) for r in real]
            report[f"real_{split}"] = score_groups(real, real_mats, "corpus", decoder)
    if (SHARED / "speech" / "lj001").is_dir() and lj_limit:
        pairs = lj_set(lj_limit)
        lj_refs = [t for _, t in pairs]
        lj_hyps = transcripts([_logp(model, fbank, load_wave(p)) for p, _ in pairs], decoder)
        report["lj001"] = score(lj_refs, lj_hyps)
        if 0 < lj_dev < len(pairs):
            report["lj001_test"] = score(lj_refs, lj_hyps, range(lj_dev, len(pairs)))
            report["lj001_test"]["first_clip"] = lj_dev + 1
        tel_mats = [_logp(model, fbank, telephone_rate(load_wave(p))) for p, _ in pairs]
        report["lj001_8k"] = score(lj_refs, transcripts(tel_mats, decoder))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--lm", type=Path, default=ROOT / "samples" / "asr" / "lm.arpa")
    parser.add_argument("--beam", type=int, help="default: <data>/decoder.json's, else 32")
    parser.add_argument("--alpha", type=float, help="LM weight; default as --beam, else 0.5")
    parser.add_argument("--beta", type=float, help="word bonus; default as --beam, else 1.0")
    parser.add_argument("--mode", choices=("free", "lexicon"),
                        help="decoder search mode, with its tuned alpha and beta; default as "
                        "--beam, else free")  # fmt: skip
    parser.add_argument("--limit", type=int, default=5000, help="validation utterances")
    parser.add_argument("--lj-limit", type=int, default=186, help="LJ001 clips")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    parser.add_argument("--report", type=Path, help="default: <data>/eval.json")
    args = parser.parse_args(argv)
    model, fbank_cfg, _ = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    try:
        tuned = decoder_settings(args.data, args.mode)
    except ValueError as exc:
        parser.error(f"{exc}: run apps.asr.tune with --modes free,lexicon")
    given = {"beam_width": args.beam, "alpha": args.alpha, "beta": args.beta}
    settings = {k: tuned[k] if v is None else v for k, v in given.items()}
    settings["mode"] = tuned["mode"]
    report = evaluate(model, Fbank(fbank_cfg), args.data, args.lm, settings["beam_width"],
                      settings["alpha"], settings["beta"], args.limit, args.lj_limit,
                      tuned["lj_dev"], settings["mode"])  # fmt: skip
    report["decoder"] = settings
    (args.report or args.data / "eval.json").write_text(json.dumps(report, indent=2))
    held_out = [("", report["held_out_voices"])] if "held_out_voices" in report else []
    for name, held in held_out + [(f" (release {r})", s) for r, s in report["per_release"].items()]:
        print(f"held-out voices{name}: CER {held['cer_greedy']:.2%} greedy"
              + (f", WER {held['wer_lm']:.2%} with LM" if "wer_lm" in held else ""))  # fmt: skip
    lines = [
        (f"real {split[5:]} speakers, {corpus}", s)
        for split in ("real_dev", "real_test")
        for corpus, s in report.get(split, {}).items()
    ]
    lines += [(name, report[key]) for key, name in (
        ("lj001", "LJ001 real speech"),
        ("lj001_test", "LJ001 past the tuning clips"),
        ("lj001_8k", "LJ001 through 8 kHz"),
    ) if key in report]  # fmt: skip
    for name, s in lines:
        print(f"{name}: WER {s['wer_greedy']:.2%} greedy"
              + (f", {s['wer_lm']:.2%} with LM" if "wer_lm" in s else ""))  # fmt: skip
    return report


if __name__ == "__main__":
    main()
