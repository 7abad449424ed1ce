"""Recipe step 5: write the model card ``samples/punct/MODEL.md`` from the measurements.

    python -m apps.punct.card [--data cache/punct] [--out samples/punct]

Reads the training record (``train.json``), the split (``split.json``), the
export's choice (``export.json``) and the held-out scores
(``eval-punct-test.json``, from ``apps.punct.evaluate``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dsstream.punctuation import MARKS

ROOT = Path(__file__).resolve().parents[2]
KEYS = (*MARKS[1:], "all marks", "capitals")

__all__ = ["card", "main"]


def _table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| | model P | model R | model F1 | baseline F1 | count |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in KEYS:
        m, b = result["model"][key], result["baseline"][key]
        if m["count"]:
            lines.append(f"| {key} | {m['precision']:.3f} | {m['recall']:.3f} | "
                         f"**{m['f1']:.3f}** | {b['f1']:.3f} | {m['count']:,} |")  # fmt: skip
    return lines


def card(data: Path, out: Path) -> str:
    train = json.loads((data / "train.json").read_text())
    split = json.loads((data / "split.json").read_text())
    export = json.loads((data / "export.json").read_text())
    ev = json.loads((data / "eval-punct-test.json").read_text())
    from engine import read_manifest

    cfg = read_manifest(out / "punct.ds")[0].extra["model"]
    best = max(
        train["history"], key=lambda h: h["dev"]["all marks"]["f1"] + h["dev"]["capitals"]["f1"]
    )
    shipped = export["shipped"]
    f, q = export["float"], export["int8"]
    size = (out / "punct.ds").stat().st_size / 1e6
    by_scale = sorted(export["scales"].items(), key=lambda kv: -float(kv[0]))
    scales = ", ".join(f"{k} → {v:.3f}" for k, v in by_scale)
    lines = [
        "# Sample punctuation model (`punct.ds`)",
        "",
        "Restores `. , ? !` and capitals in recognized text, one final at a time",
        "(docs/punctuation.md). Made by `python -m apps.punct.prepare`, `python -m",
        f"apps.punct.train` ({len(train['history'])} epochs, {train['step']:,} steps,",
        f"{train['seconds'] / 60:.0f} minutes of training on 2 CPU cores),",
        "`python -m apps.punct.export` and `python -m apps.punct.evaluate`.",
        "",
        "## Model",
        "",
        f"- {cfg['layers']} pre-norm self-attention blocks, width {cfg['d_model']}, "
        f"{cfg['heads']} heads; word embeddings",
        f"  for {cfg['vocab'] - 2:,} words (others unknown); up to {cfg['max_len']} words per "
        f"pass, {cfg['context']} of them context.",
        f"- Shipped: **{shipped.upper()}** ({size:.1f} MB), chosen by measurement on the dev text:",
        f"  float {f['mean_ms']:.2f} ms per final, dev F1 (all marks) {f['all marks f1']:.3f},",
        f"  capitals {f['capitals f1']:.3f}; INT8 {q['mean_ms']:.2f} ms, "
        f"{q['all marks f1']:.3f}, {q['capitals f1']:.3f}.",
        f"- Decision rule: the no-mark probability scaled by {export['none_scale']} before the",
        f"  argmax (chosen on dev, F1 of all marks by scale: {scales}).",
        f"- Kept epoch: {best['epoch']} (dev F1 all marks {best['dev']['all marks']['f1']:.3f}, "
        f"capitals {best['dev']['capitals']['f1']:.3f}).",
        "",
        "## Data",
        "",
        "The public-domain text of `../shared/data/text` (Gutenberg novels, US inaugural and",
        "State of the Union addresses, LJ Speech sentences without LJ001/LJ002), whole",
        "documents held out:",
        "",
        "| split | documents | words |",
        "|---|---:|---:|",
    ]
    for name in ("train", "dev", "test"):
        lines.append(f"| {name} | {len(split[name]['documents'])} | {split[name]['words']:,} |")
    lines += [
        "",
        f"Test documents: {', '.join(split['test']['documents'][:4])}, … (all in "
        "`cache/punct/split.json`).",
        "",
        "## Scores",
        "",
        f"Held-out test documents ({ev['words']['test']:,} words), cut into finals as a",
        "recognizer cuts speech (docs/punctuation.md), against the baseline: a period at",
        "each final's end and a capital after it.",
        "",
        *_table(ev["test"]),
        "",
        f"LJ001's reference transcripts ({ev['words']['lj001']:,} words, each clip one final,",
        "marks and capitals removed):",
        "",
        *_table(ev["lj001"]),
        "",
        "The same text as one final, as if read without a pause (sentence ends and",
        "capitals from the words alone; the baseline has one period, at the end):",
        "",
        *_table(ev["lj001 unpaused"]),
        "",
        f"Cost: {ev['cost']['mean_ms']:.2f} ms per final on average (p95 "
        f"{ev['cost']['p95_ms']:.2f} ms) through the engine",
        f"(ONNX Runtime, one thread), {ev['cost']['finals']:,} finals; 2 vCPU Intel Xeon",
        "(AVX-512 VNNI). `make bench` (tests/bench/bench_punctuation.py) compares the",
        "backends.",
        "",
    ]
    text = "\n".join(lines)
    (out / "MODEL.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "punct")
    parser.add_argument("--out", type=Path, default=ROOT / "samples" / "punct")
    args = parser.parse_args(argv)
    text = card(args.data, args.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
