"""Recipe step 5: write the model card ``samples/asr/MODEL.md`` from the measurements.

    python -m apps.asr.card [--data cache/asr] [--samples samples]

Reads the training checkpoint (history, steps), the data manifests (hours,
voices), ``<data>/eval.json`` (from ``apps.asr.evaluate``), the exported
artifact, and transcribes the shipped clips through the streaming pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from apps.asr.evaluate import DEFAULT_DECODER
from apps.asr.train import read_manifest
from dsstream.evaluation import wer
from engine.artifact import read_manifest as read_artifact

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["main"]


def _hours(rows: list[dict]) -> float:
    return sum(r["duration"] for r in rows) / 3600


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _score_row(name: str, scores: dict) -> str:
    cells = [_pct(scores.get(k)) for k in ("cer_greedy", "wer_greedy", "cer_lm", "wer_lm")]
    return f"| {name} | " + " | ".join(cells) + " |"


def _release_weights(weights: list[float]) -> str:
    if not weights:
        return "every voice release once per epoch"
    each = ", ".join(f"release {r} {w:g} times" for r, w in enumerate(weights, 1))
    return f"per epoch {each} (later releases once)"


# How the card words a training change (apps.asr.train's "changes").
_CHANGES: dict[str, Any] = {
    "release_weights": _release_weights,
    "dropout": "dropout {:g}",
    "vtlp": "vocal tract length perturbation on {:.0%} of the utterances",
    "eq": "a random microphone/channel response on {:.0%} of the utterances",
    "recovered": "training went on from the weights in {} (apps.asr.recover; a fresh optimizer)",
}

RELEASE_NAMES = {
    "1": "espeak-ng variants, flite, festival kal",
    "2": "festival diphone/MBROLA/HTS, RHVoice, SVOX Pico",
    "3": "MBROLA German, Greek, Romanian voices speaking English",
    "4": "MBROLA Afrikaans, French, Hungarian, Dutch, Polish, Swedish voices speaking English",
}


def _by_release(rows: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows:  # manifests made before release 2 have no "release": all are 1
        groups.setdefault(str(r.get("release", 1)), []).append(r)
    parts = []
    for release, mine in sorted(groups.items()):
        voices = len({r["speaker"] for r in mine})
        parts.append(f"\n  - release {release} ({RELEASE_NAMES.get(release, '?')}): {len(mine)} "
                     f"utterances, {_hours(mine):.1f} h, {voices} "
                     f"voice{'s' if voices != 1 else ''}")  # fmt: skip
    return "".join(parts)


def _run_notes(state: dict[str, Any]) -> str:
    """The card's sentences on how the run changed: data growth, recorded
    changes (apps.asr.train's "changes") and learning-rate annealings."""
    notes = ""
    if len(state.get("data", [])) > 1:
        notes = (
            "The training set grew during the run: "
            + "; ".join(
                f"from epoch {d['epoch']}, {d['utterances']} utterances ({d['hours']:.1f} h)"
                for d in state["data"]
            )
            + ".\n"
        )
    for change in state.get("changes", []):  # e.g. {"step": 8876, "dropout": 0.0}
        if change["step"] >= state["step"]:
            continue  # recorded when a run resumed, but no step trained with it
        words = [(_CHANGES.get(k, k + " {:g}"), v) for k, v in change.items() if k != "step"]
        what = ", ".join(w(v) if callable(w) else w.format(v) for w, v in words)
        notes += f"From step {change['step']}, {what}.\n"
    anneals = state.get("past_anneals", []) + ([state["anneal"]] if "anneal" in state else [])
    for a in anneals:
        notes += (
            f"From step {a['from_step']}, the learning rate fell linearly to zero"
            f" over {a['steps']} steps.\n"
        )
    return notes


def _quantization_words(made: dict[str, Any]) -> str:
    """The command and the method of the INT8 artifact's quantization, from its
    manifest's ``quantized_with`` (artifacts made before it: static, min/max)."""
    from apps.asr.quantize import OBSERVER_WORDS

    if made["mode"] == "dynamic":
        flags = " --mode dynamic"
    else:
        flags = "" if made["observer"] == "minmax" else f" --observer {made['observer']}"
    keep = made.get("keep_float", [])
    if keep:
        flags += f" --sensitivity {made.get('sensitivity', 8)} --keep-float {len(keep)}"
    command = f"`python -m apps.asr.quantize{flags} --out samples/asr/model-int8.ds`"
    if made["mode"] == "dynamic":
        how = "int8 weights per output channel, activations quantized per batch as they come"
    else:
        how = (f"int8 weights per output channel, activations per tensor from "
               f"{OBSERVER_WORDS[made['observer']]} over {made['calibration']} training "
               "utterances")  # fmt: skip
    if keep:
        how += f"; kept in float32, as the most sensitive: {', '.join(keep)}"
    kind = "Dynamic" if made["mode"] == "dynamic" else "Static"
    return f"{kind} post-training quantization ({command}): {how}."


def _int8_section(data: Path, artifact: Path, int8_path: Path) -> str:
    """The card's INT8 section: how the served INT8 artifact was made and its
    scores against the float model's, from the quantize step's record."""
    from apps.asr.quantize import record_path

    if not int8_path.is_file():
        return ""
    made = {"mode": "static", "observer": "minmax", "calibration": 256, "keep_float": []}
    made |= read_artifact(int8_path)[0].extra.get("quantized_with", {})
    record = record_path(data, made["mode"], made["observer"], len(made["keep_float"]))
    if not record.is_file():
        return ""
    q = json.loads(record.read_text())
    rows = []
    for key, label in (("held", "held-out voices"), ("lj", "LJ001 real speech")):
        for kind in ("float", "int8"):
            scores = {k[len(key) + 1 :]: v for k, v in q[kind].items() if k.startswith(key)}
            rows.append(_score_row(f"{label}, {'INT8' if kind == 'int8' else 'float32'}",
                                   scores))  # fmt: skip
    table = "\n".join(rows)
    size = int8_path.stat().st_size
    smaller = 1 - size / artifact.stat().st_size
    return f"""
## INT8 (`model-int8.ds`, the model served on CPU)

{_quantization_words(made)}
{size / 1e6:.1f} MB ({smaller:.0%} smaller); scored as the float model above (up to
{q.get("limit", "-")} held-out utterances, up to {q.get("lj_limit", "-")} LJ001 clips):

| set | CER greedy | WER greedy | CER with LM | WER with LM |
|---|---:|---:|---:|---:|
{table}
"""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    args = parser.parse_args(argv)
    from dsstream.local import transcribe
    from dsstream.pipelines.defaults import default_registry

    ckpt = torch.load(args.data / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    state, cfg = ckpt["state"], ckpt["config"]
    params = sum(v.numel() for v in ckpt["model"].values())
    train = read_manifest(args.data / "train.jsonl")
    valid = read_manifest(args.data / "valid.jsonl")
    report = json.loads((args.data / "eval.json").read_text())
    held, lj = report["held_out_voices"], report.get("lj001", {})
    artifact = args.samples / "asr" / "model.ds"
    # The chunk geometry the artifact streams with (apps.asr.export --chunk/--left).
    cfg = {**cfg, **read_artifact(artifact)[0].extra.get("model", {})}
    clips = args.samples / "asr" / "clips"
    refs = dict(line.split("\t") for line in (clips / "transcripts.tsv").read_text().splitlines())
    int8_path = args.samples / "asr" / "model-int8.ds"
    clip_rows = []
    for int8 in (False, True) if int8_path.is_file() else (False,):
        registry = default_registry(args.samples, int8=int8)
        for name, ref in sorted(refs.items()):
            hyp = transcribe(clips / name, registry=registry).text
            label = "INT8" if int8 else "float32"
            clip_rows.append(f"| {name} | {label} | {ref} | {hyp} | {_pct(wer([ref], [hyp]))} |")
    int8_section = _int8_section(args.data, artifact, int8_path)
    decoder = report.get("decoder", DEFAULT_DECODER)
    decoder_note = f"beam {decoder['beam_width']}, alpha {decoder['alpha']}, beta {decoder['beta']}"
    lj_test_row = ""
    if "lj001_test" in report:
        first = report["lj001_test"]["first_clip"]
        decoder_note += (
            f", chosen by `python -m apps.asr.tune` on LJ001's first {first - 1} clips and"
            " recorded in the artifact, where the streaming pipeline takes them from"
        )
        name = f"LJ001 clips {first}-{first - 1 + report['lj001_test']['n']}, not used to tune"
        lj_test_row = _score_row(name, report["lj001_test"]) + "\n"
    per_release = report.get("per_release", {})
    release_rows = "".join(
        _score_row(f"held-out voices, release {r} ({sc['n']} utt.)", sc) + "\n"
        for r, sc in per_release.items()
        if len(per_release) > 1
    )
    data_note = _run_notes(state)
    with_eq = any(c.get("eq") for c in state.get("changes", []))
    channel = " microphone/channel response," if with_eq else ""
    history = "\n".join(
        f"| {h['epoch']} | {h['step']} | {h['loss']:.3f} | {_pct(h['valid_cer'])} |"
        for h in state["history"]
    )
    card = f"""# Sample ASR model (`model.ds`)

A streaming CTC acoustic model over characters (a-z, apostrophe, word
delimiter, blank), trained from scratch by the recipe in `apps/asr` on
synthesized speech only. Made by `python -m apps.asr.prepare`,
`python -m apps.asr.train`, `python -m apps.asr.tune`, `python -m apps.asr.evaluate`,
`python -m apps.asr.export`, `python -m apps.asr.quantize`, `python -m apps.asr.card`.

## Model

- {params / 1e6:.2f} M parameters: conv subsampling x4, {cfg["layers"]} conformer-style blocks
  (d={cfg["d_model"]}, {cfg["heads"]} heads, causal conv kernel {cfg["conv_kernel"]}),
  chunked attention: chunk {cfg["chunk"]} frames ({cfg["chunk"] * 40} ms), left context
  {cfg["left"]} frames ({cfg["left"] * 0.04:g} s); a fixed-size streaming state per layer.
- Frontend: 80-dim log-mel, 25 ms / 10 ms, global mean/std in the manifest.
- Artifact: {artifact.stat().st_size / 1e6:.1f} MB (ONNX graph + exported program).

## Data

- Train: {len(train)} utterances, {_hours(train):.1f} h, {len({r["speaker"] for r in train})} voices
  (rate and pitch varied) with speed, gain, noise, babble, reverberation,{channel}
  telephone-band and SpecAugment augmentation:{_by_release(train)}
- Held-out voices (validation): {len(valid)} utterances, {_hours(valid):.1f} h,
  {len({r["speaker"] for r in valid})} voices never seen in training:{_by_release(valid)}

## Training

{state["epoch"]} epochs, {state["step"]} steps on 2 CPU cores.

Each epoch is scored on the first 200 held-out utterances (release 1 voices).
{data_note}
| epoch | step | train loss | held-out CER (greedy, 200 utt.) |
|---:|---:|---:|---:|
{history}

## Scores

| set | CER greedy | WER greedy | CER with LM | WER with LM |
|---|---:|---:|---:|---:|
{_score_row(f"held-out voices ({held['n']} utt.)", held)}
{release_rows}{_score_row(f"LJ001 real speech ({lj.get('n', 0)} clips)", lj)}
{lj_test_row}
The LM is `lm.arpa` (see LM.md), built without the held-out voices' sentences;
{decoder_note}. For reference,
CMU PocketSphinx 5 (its US English model and 27 MB LM) gets 27.3% WER (CER
13.6%) on the same 186 LJ001 clips, measured beside this model by
`tests/bench/bench_asr_peers.py`, at 6.6 times its CPU (docs/benchmarks.md).

Shipped clips (`clips/`: `heldout-espeak-david.flac` is espeak-ng's
en-gb-x-gbcwmd+david, a voice held out from training; `LJ001-0011.flac` is LJ
Speech 1.1, public domain), through the streaming pipeline
(`dsstream.transcribe`):

| clip | model | reference | recognized | WER |
|---|---|---|---|---:|
{chr(10).join(clip_rows)}
{int8_section}

## Limits

Trained on synthetic voices only: voices it never heard score far worse than
its training voices, and real speech (LJ001) is much harder than unseen
synthetic voices. What limits real speech, what has been measured to help (the
natural voices of release 2 and the random microphone/channel response; more
steps and the accented voices of releases 3 and 4 helped the synthetic voices,
not LJ001) and what would help next
is in docs/asr.md ("What limits real speech").

Some training voices have restrictive terms (MBROLA databases, RHVoice
evgeniy-eng: CC BY-NC-ND 4.0, the OALD lexicon of two festival voices); the
model holds none of their data, but see docs/asr.md ("The training voices'
terms") before selling a product built on it.
"""
    out = args.samples / "asr" / "MODEL.md"
    out.write_text(card)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
