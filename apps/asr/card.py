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
    sets = (("held", "held-out voices"), ("lj", "LJ001 real speech"),
            ("realdev", "real dev speakers"), ("realtest", "real test speakers"))  # fmt: skip
    for key, label in sets:
        for kind in ("float", "int8"):
            scores = {k[len(key) + 1 :]: v for k, v in q[kind].items() if k.startswith(key + "_")}
            if not scores:
                continue
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


# Credits the corpora's licences ask for (../shared/data/README.md).
ATTRIBUTION = """- LibriSpeech ASR corpus (c) 2014 Vassil Panayotov, with Guoguo Chen, Daniel
  Povey and Sanjeev Khudanpur ("Librispeech: an ASR corpus based on public
  domain audio books", ICASSP 2015); audio from LibriVox volunteers. CC BY 4.0
  (https://creativecommons.org/licenses/by/4.0/). Changes: FLAC re-encoded to
  Opus 24 kbit/s, transcripts lowercased and normalized, subsets selected
  (Mini LibriSpeech train-clean-5; 8 chapters of train-clean-100).
- speechocean762, by Junbo Zhang, Zhiwen Zhang, Yongqing Wang, Zhiyong Yan,
  Qiong Song, Yukai Huang, Ke Li, Daniel Povey and Yujun Wang ("speechocean762:
  An Open-Source Non-native English Speech Corpus For Pronunciation
  Assessment", Interspeech 2021). CC BY 4.0. Changes: WAV re-encoded to Opus
  24 kbit/s, transcripts lowercased, scores and untranscribed audio left out.
- CMU AN4 alphanumeric database, Carnegie Mellon University (c. 1991), under
  its BSD-style licence (free for any purpose; copyright notice kept in
  ../shared/data/speech/an4/LICENSE).
- Mozilla Common Voice 6.1 English, a sample of 100 clips, CC0 1.0."""

CORPUS_NOTES = {
    "librispeech-train-clean-5": "read audiobooks",
    "librispeech-100-sample": "read audiobooks",
    "speechocean762": "Mandarin-L1 adults and children reading English",
    "an4": "spelled words, numbers, commands",
    "commonvoice-en-sample": "various speakers and microphones",
}


def _real_data(data: Path) -> tuple[str, str]:
    """(the card's lines on the real training speech, on the held-out speakers)."""
    from apps.asr.corpora import CORPORA

    path = data / "real_speakers.json"
    if not path.is_file():
        return "", ""
    summary = json.loads(path.read_text())
    splits, held = summary["splits"], summary["held_out"]
    train_lines, held_lines = [], []
    for corpus in CORPORA:
        t = splits["train"].get(corpus.name)
        if t:
            train_lines.append(
                f"\n  - {corpus.name} ({CORPUS_NOTES.get(corpus.name, '')}; {corpus.licence}): "
                f"{t['utterances']} utterances, {t['hours']:.2f} h, {t['speakers']} speakers"
            )
        for split in ("dev", "test"):
            if held[corpus.name][split]:
                # Common Voice's ids are 128-character hashes: their first 8 name them here.
                names = ", ".join(s if len(s) <= 16 else s[:8] for s in held[corpus.name][split])
                h = splits[split][corpus.name]
                held_lines.append(f"\n  - {corpus.name}, {split}: {h['utterances']} utterances, "
                                  f"{h['hours']:.2f} h; speakers {names}")  # fmt: skip
    return "".join(train_lines), "".join(held_lines)


def _real_score_rows(report: dict[str, Any]) -> str:
    rows = []
    for split, words in (("real_test", "test"), ("real_dev", "dev")):
        for corpus, scores in report.get(split, {}).items():
            name = "all corpora" if corpus == "all" else corpus
            rows.append(_score_row(f"real {words} speakers, {name} ({scores['n']} utt.)", scores))
    return "".join(r + "\n" for r in rows)


def _peer_rows(data: Path) -> str:
    """The streaming pipeline against PocketSphinx on the same sets, from the
    peers bench's record (tests/bench/bench_asr_peers.py), if it has run."""
    path = data / "peers.json"
    if not path.is_file():
        return ""
    rows = []
    for name, by in json.loads(path.read_text()).items():
        ours, theirs = by.get("dsstream, INT8 (served)"), by.get("pocketsphinx, whole utterance")
        if ours and theirs:
            cells = [_pct(ours["wer"]), _pct(theirs["wer"]), f"{ours['cpu']:.3f}",
                     f"{theirs['cpu']:.3f}"]  # fmt: skip
            rows.append(f"| {name} ({ours['n']} utt.) | " + " | ".join(cells) + " |")
    return (
        "\nThe served INT8 model through the whole streaming pipeline (Silero VAD"
        " endpointing, the beam search with the LM) against CMU PocketSphinx 5"
        " (its US English model and 27 MB LM) on the same utterances, measured in"
        " one run by `tests/bench/bench_asr_peers.py` (CPU s per s of audio):\n\n"
        "| set | WER, this model | WER, PocketSphinx | CPU, this model | CPU, PocketSphinx |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )


# The runs a checkpoint's weights came through: (checkpoint file name, its run state).
Lineage = list[tuple[str, dict[str, Any]]]


def _lineage(state: dict[str, Any]) -> Lineage:
    """The runs the model's weights came through before this one, newest
    first: each checkpoint's ``init`` names the one its run started from."""
    runs: Lineage = []
    while "init" in state:
        path = Path(state["init"])
        path = path if path.is_absolute() else ROOT / path
        if not path.is_file() or len(runs) > 16:
            break
        state = torch.load(path, map_location="cpu", weights_only=False)["state"]
        runs.append((path.name, state))
    return runs


def _real_run(state: dict[str, Any]) -> bool:
    return any(h.get("valid") == "real_dev.jsonl" for h in state.get("history", []))


def _init_words(state: dict[str, Any], lineage: Lineage) -> str:
    """Where the run's weights started: the chain of runs before it
    (``_lineage(state)``), or scratch."""
    if "init" not in state:
        return "trained from scratch"
    words, link = [], "initialized from"
    if "grown" in state:
        link = (f"grown from {state['grown']['from_layers']} to {state['grown']['layers']} blocks"
                " (new blocks inserted as identities) from")  # fmt: skip
    for name, prior in lineage or [(Path(state["init"]).name, {})]:
        what = ""
        if prior:
            data = "real and synthesized speech" if _real_run(prior) else "synthesized speech only"
            what = f" ({prior['epoch']} epochs, {prior['step']} steps on {data})"
        words.append(f"{link} `{name}`{what}")
        link = "itself grown from" if "grown" in prior else "itself initialized from"
    return ", ".join(words) + ", then trained"


def _history_rows(state: dict[str, Any], name: str, lineage: Lineage) -> str:
    """Validation after each epoch of this run and of the runs before it
    (``lineage``) that were scored on the real dev speakers, oldest first."""
    runs = [(n, s) for n, s in reversed(lineage) if _real_run(s)] + [(name, state)]
    return "\n".join(
        f"| `{n}` | {h['epoch']} | {h['step']} | {h['loss']:.3f} | {_pct(h['valid_cer'])} |"
        for n, s in runs
        for h in s["history"]
    )


def _time_words(state: dict[str, Any]) -> str:
    """The run's wall time, where it recorded one (apps.asr.train since 2026-12-07)."""
    if "seconds" not in state:
        return ""
    return f" ({state['seconds'] / 3600:.1f} h of wall time)"


def _clip_rows(samples: Path) -> list[str]:
    """The shipped clips through the streaming pipeline, float32 and INT8."""
    from dsstream.local import transcribe
    from dsstream.pipelines.defaults import default_registry

    clips = samples / "asr" / "clips"
    refs = dict(line.split("\t") for line in (clips / "transcripts.tsv").read_text().splitlines())
    rows = []
    for int8 in (False, True) if (samples / "asr" / "model-int8.ds").is_file() else (False,):
        registry = default_registry(samples, int8=int8)
        for name, ref in sorted(refs.items()):
            hyp = transcribe(clips / name, registry=registry).text
            label = "INT8" if int8 else "float32"
            rows.append(f"| {name} | {label} | {ref} | {hyp} | {_pct(wer([ref], [hyp]))} |")
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    args = parser.parse_args(argv)
    path = args.checkpoint or args.data / "ckpt" / "last.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state, cfg = ckpt["state"], ckpt["config"]
    params = sum(v.numel() for v in ckpt["model"].values())
    train = read_manifest(args.data / "train.jsonl")
    valid = read_manifest(args.data / "valid.jsonl")
    report = json.loads((args.data / "eval.json").read_text())
    artifact = args.samples / "asr" / "model.ds"
    # The chunk geometry the artifact streams with (apps.asr.export --chunk/--left).
    cfg = {**cfg, **read_artifact(artifact)[0].extra.get("model", {})}
    lineage = _lineage(state)  # loads each ancestor checkpoint once
    card = CARD.format(
        params=params / 1e6, cfg=cfg, mb=artifact.stat().st_size / 1e6,
        chunk_ms=cfg["chunk"] * 40, left_s=cfg["left"] * 0.04,
        init=_init_words(state, lineage),
        **_data_fields(args.data, train, valid, state, path.name, lineage),
        **_score_fields(args.data, report), clip_rows="\n".join(_clip_rows(args.samples)),
        int8_section=_int8_section(args.data, artifact, args.samples / "asr" / "model-int8.ds"),
    )  # fmt: skip
    out = args.samples / "asr" / "MODEL.md"
    out.write_text(card)
    print(f"wrote {out}")
    return out


def _data_fields(
    data: Path, train: list[dict], valid: list[dict], state: dict, name: str, lineage: Lineage
) -> dict[str, Any]:
    real_train, real_held = _real_data(data)
    with_eq = any(c.get("eq") for c in state.get("changes", []))
    valid_sets = {h.get("valid", "valid.jsonl") for h in state["history"]}
    scored_on = (
        "the real dev speakers (200 utterances across every corpus)"
        if valid_sets == {"real_dev.jsonl"}
        else "the first 200 held-out utterances (release 1 voices)"
    )
    return {
        "real_train": real_train, "real_held": real_held, "train_n": len(train),
        "train_h": _hours(train), "train_voices": len({r["speaker"] for r in train}),
        "train_releases": _by_release(train), "valid_n": len(valid), "valid_h": _hours(valid),
        "valid_voices": len({r["speaker"] for r in valid}), "valid_releases": _by_release(valid),
        "channel": " microphone/channel response," if with_eq else "",
        "epochs": state["epoch"], "steps": state["step"], "scored_on": scored_on,
        "notes": _run_notes(state), "history": _history_rows(state, name, lineage),
        "run": name, "time": _time_words(state),
    }  # fmt: skip


def _score_fields(data: Path, report: dict[str, Any]) -> dict[str, Any]:
    decoder = report.get("decoder", DEFAULT_DECODER)
    decoder_note = f"beam {decoder['beam_width']}, alpha {decoder['alpha']}, beta {decoder['beta']}"
    lj_test_row = ""
    if "lj001_test" in report:
        first = report["lj001_test"]["first_clip"]
        decoder_note += (
            f", chosen by `python -m apps.asr.tune` on LJ001's first {first - 1} clips"
            " and the real dev speakers, and recorded in the artifact, where the"
            " streaming pipeline takes them from"
        )
        name = f"LJ001 clips {first}-{first - 1 + report['lj001_test']['n']}, not used to tune"
        lj_test_row = _score_row(name, report["lj001_test"]) + "\n"
    decoder_note += _modes_note(data)
    held, lj = report.get("held_out_voices", {}), report.get("lj001", {})
    per_release = report.get("per_release", {})
    rows = _real_score_rows(report)
    rows += _score_row(f"LJ001 real speech ({lj.get('n', 0)} clips)", lj) + "\n" + lj_test_row
    if "lj001_8k" in report:
        rows += _score_row("LJ001 through 8 kHz (telephone rate)", report["lj001_8k"]) + "\n"
    rows += _score_row(f"held-out synthetic voices ({held.get('n', 0)} utt.)", held) + "\n"
    rows += "".join(
        _score_row(f"held-out voices, release {r} ({sc['n']} utt.)", sc) + "\n"
        for r, sc in per_release.items()
        if len(per_release) > 1
    )
    return {"score_rows": rows, "decoder_note": decoder_note, "peer_rows": _peer_rows(data)}


def _modes_note(data: Path) -> str:
    """How the search mode the pipeline does not use by default scored on the
    same dev set, from apps.asr.tune's record."""
    path = data / "decoder.json"
    tuned = json.loads(path.read_text()) if path.is_file() else {}
    modes, chosen = tuned.get("modes", {}), tuned.get("mode", "free")
    others = [(m, v) for m, v in modes.items() if m != chosen and "wer" in v]
    if not others or "wer" not in modes.get(chosen, {}):
        return ""
    notes = [f"{m} mode (`decoder_mode`) scored {_pct(v['wer'])} at alpha {v['alpha']}, "
             f"beta {v['beta']}" for m, v in others]  # fmt: skip
    tie = ""
    if tuned.get("free_kept_by_tolerance"):
        tie = (f", within the {tuned.get('tolerance', 1.0):g}-point tolerance, so the free"
               " search, which can write words outside the LM, stays the default")  # fmt: skip
    return (
        f". The {chosen} search was chosen by measurement: {_pct(modes[chosen]['wer'])} "
        f'WER on the dev set, where {"; ".join(notes)}{tie} (docs/asr.md, "Lexicon mode")'
    )


CARD = (
    """# Sample ASR model (`model.ds`)

A streaming CTC acoustic model over characters (a-z, apostrophe, word
delimiter, blank), {init} on real English speech (five freely licensed
corpora) mixed with synthesized speech, by the recipe in `apps/asr`:
`python -m apps.asr.corpora`, `python -m apps.asr.prepare`,
`python -m apps.asr.train`, `python -m apps.asr.tune`, `python -m apps.asr.evaluate`,
`python -m apps.asr.export`, `python -m apps.asr.quantize`, `python -m apps.asr.card`
(docs/asr.md).

## Model

- {params:.2f} M parameters: conv subsampling x4, {cfg[layers]} conformer-style blocks
  (d={cfg[d_model]}, {cfg[heads]} heads, causal conv kernel {cfg[conv_kernel]}),
  chunked attention: chunk {cfg[chunk]} frames ({chunk_ms} ms), left context
  {cfg[left]} frames ({left_s:g} s); a fixed-size streaming state per layer.
- Frontend: 80-dim log-mel, 25 ms / 10 ms, global mean/std in the manifest.
- Artifact: {mb:.1f} MB (ONNX graph + exported program).

## Data

All speech trains with speed (0.9/1.0/1.1), gain, noise, babble,
reverberation,{channel} telephone-band and SpecAugment augmentation.

- Real speech (`../shared/data/speech`, Ogg Opus at 24 kbit/s; whole speakers
  held out, below):{real_train}
- Synthesized speech: {train_n} utterances, {train_h:.1f} h, {train_voices} voices
  (rate and pitch varied):{train_releases}
- Held-out real speakers (never trained on; `dev` chose checkpoints and
  decoder settings, `test` was only measured; the names are the corpora's own
  speaker ids, also in `cache/asr/real_speakers.json`):{real_held}
- Held-out synthetic voices: {valid_n} utterances, {valid_h:.1f} h,
  {valid_voices} voices never seen in training:{valid_releases}
- Never trained on: LJ Speech (LJ001 is evaluation only).

## Training

This run (`{run}`): {epochs} epochs, {steps} steps on 2 CPU cores{time}.
Each epoch is scored on {scored_on}.
{notes}
| run | epoch | step | train loss | validation CER (greedy) |
|---|---:|---:|---:|---:|
{history}

## Scores

Whole utterances through the model (`python -m apps.asr.evaluate`). The real
speakers' audio is lossy (Opus 24 kbit/s); LJ001 is lossless.

| set | CER greedy | WER greedy | CER with LM | WER with LM |
|---|---:|---:|---:|---:|
{score_rows}
The LM is `lm.arpa` (see LM.md); {decoder_note}.
{peer_rows}
Shipped clips (`clips/`: `heldout-espeak-david.flac` is espeak-ng's
en-gb-x-gbcwmd+david, a voice held out from training; `LJ001-0011.flac` is LJ
Speech 1.1, public domain), through the streaming pipeline
(`dsstream.transcribe`):

| clip | model | reference | recognized | WER |
|---|---|---|---|---:|
{clip_rows}
{int8_section}

## Attribution

The weights were trained on these corpora; their licences ask for credit:

"""
    + ATTRIBUTION
    + """

## Limits

About 12 hours of real speech and a {params:.1f} M-parameter model trained on 2 CPU
cores: what limits it and what would help next is in docs/asr.md ("What
limits real speech"). Some synthesized training voices have restrictive
terms (MBROLA databases, RHVoice evgeniy-eng: CC BY-NC-ND 4.0, the OALD
lexicon of two festival voices); the model holds none of their data, but see
docs/asr.md ("The training voices' terms") before selling a product built on it.
"""
)


if __name__ == "__main__":
    main()
