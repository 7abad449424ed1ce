"""Recipe step 3: score punctuation and capitals, beside the simple baseline.

    python -m apps.punct.evaluate [--data cache/punct] [--artifact samples/punct/punct.ds]
        [--split test] [--lj001 ../shared/data/speech/lj001]

Per-mark precision, recall and F1 (. , ? !), all marks together, and
capitalization F1, on the held-out documents cut into finals as a recognizer
cuts speech (:mod:`apps.punct.finals`, fixed seed) and on LJ001's reference
transcripts, their marks and capitals removed, each clip one final and all
of them as one final (read without a pause: sentence ends from the words
alone); beside the
baseline (a period at each final's end, a capital after it).  Also the cost:
milliseconds per final on this CPU through the engine.  Writes
``<data>/eval-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

from apps.punct.finals import FinalsConfig, Labeller, baseline, finals, label_document
from apps.punct.prepare import read_split
from dsstream.punctuation import MARKS, Labelled, Punctuator, labels_of

ROOT = Path(__file__).resolve().parents[2]
SEED = 7  # the cut into finals of the scored text

__all__ = ["scores", "score_documents", "lj001_document", "artifact_labeller", "main"]


def _prf(hits: int, guessed: int, true: int) -> dict[str, float]:
    p = hits / guessed if guessed else 0.0
    r = hits / true if true else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "count": true}  # fmt: skip


def scores(
    ref_marks: Sequence[int], ref_cases: Sequence[int],
    hyp_marks: Sequence[int], hyp_cases: Sequence[int],
) -> dict[str, Any]:  # fmt: skip
    """Per-mark P/R/F1, all marks (a hit: the same mark after the same word),
    and capitalization (a hit: a word not in lower case, in the same case)."""
    out: dict[str, Any] = {}
    for k in range(1, len(MARKS)):
        out[MARKS[k]] = _prf(
            sum(r == h == k for r, h in zip(ref_marks, hyp_marks)),
            sum(h == k for h in hyp_marks), sum(r == k for r in ref_marks),
        )  # fmt: skip
    out["all marks"] = _prf(
        sum(r == h != 0 for r, h in zip(ref_marks, hyp_marks)),
        sum(h != 0 for h in hyp_marks), sum(r != 0 for r in ref_marks),
    )  # fmt: skip
    out["capitals"] = _prf(
        sum(r == h != 0 for r, h in zip(ref_cases, hyp_cases)),
        sum(h != 0 for h in hyp_cases), sum(r != 0 for r in ref_cases),
    )  # fmt: skip
    return out


def score_documents(
    docs: Sequence[dict[str, Any]], labeller: Labeller | None, context: int,
    cfg: FinalsConfig = FinalsConfig(), seed: int = SEED, max_words: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Scores over documents cut into finals (``labeller`` None: the baseline);
    ``spans`` given in a document are its finals as they were."""
    rng = random.Random(seed)
    refs: tuple[list[int], list[int]] = ([], [])
    hyps: tuple[list[int], list[int]] = ([], [])
    for doc in docs:
        n = len(doc["words"]) if max_words is None else min(len(doc["words"]), max_words)
        words, marks = doc["words"][:n], doc["marks"][:n]
        spans = doc.get("spans") or finals(marks, rng, cfg)
        if labeller is None:
            m, c = baseline(words, spans)
        else:
            m, c = label_document(words, spans, labeller, context)
        refs[0].extend(marks)
        refs[1].extend(doc["cases"][:n])
        hyps[0].extend(m)
        hyps[1].extend(c)
    return scores(refs[0], refs[1], hyps[0], hyps[1])


def lj001_document(folder: Path) -> dict[str, Any]:
    """LJ001's reference transcripts as one document whose finals are the clips."""
    words: list[str] = []
    marks: list[int] = []
    cases: list[int] = []
    spans = []
    for line in (folder / "transcripts.tsv").read_text(encoding="utf-8").splitlines():
        text = line.split("\t")[-1]
        clip: Labelled = labels_of(text)
        if clip.words:
            spans.append((len(words), len(words) + len(clip.words)))
            words += clip.words
            marks += clip.marks
            cases += clip.cases
    return {"name": "lj001", "words": words, "marks": marks, "cases": cases, "spans": spans}


def artifact_labeller(punctuator: Punctuator, times: list[float] | None = None) -> Labeller:
    """Finals labelled one at a time through the engine, as a server does
    (``times`` collects each final's seconds)."""

    def label(
        pieces: list[tuple[Sequence[str], Sequence[str]]],
    ) -> list[tuple[list[int], list[int]]]:
        out = []
        for ctx, words in pieces:
            t0 = time.perf_counter()
            out.append(punctuator.label(list(ctx), list(words)))
            if times is not None:
                times.append(time.perf_counter() - t0)
        return out

    return label


def cost(times: list[float]) -> dict[str, float]:
    """Count, mean, median and p95 in ms of per-final times given in seconds."""
    ms = sorted(t * 1000 for t in times)
    return {
        "finals": len(ms),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "p50_ms": round(ms[len(ms) // 2], 3),
        "p95_ms": round(ms[int(len(ms) * 0.95)], 3),
    }


def evaluate_artifact(path: Path, data: Path, split: str, lj001: Path) -> dict[str, Any]:
    punctuator = Punctuator(path)
    times: list[float] = []
    label = artifact_labeller(punctuator, times)
    docs = read_split(data, split)
    lj = [lj001_document(lj001)]
    # The same text read without a pause: one final, its sentence ends from the words alone.
    unpaused = [{**lj[0], "spans": [(0, len(lj[0]["words"]))]}]
    result: dict[str, Any] = {"artifact": str(path), "split": split}
    for name, sets in ((split, docs), ("lj001", lj), ("lj001 unpaused", unpaused)):
        result[name] = {"model": score_documents(sets, label, punctuator.context),
                        "baseline": score_documents(sets, None, punctuator.context)}  # fmt: skip
    result["cost"] = cost(times)
    result["words"] = {split: sum(len(d["words"]) for d in docs), "lj001": len(lj[0]["words"])}
    punctuator.close()
    return result


def _print(result: dict[str, Any]) -> None:
    for name in (result["split"], "lj001", "lj001 unpaused"):
        print(f"{name}:")
        for key in (*MARKS[1:], "all marks", "capitals"):
            m, b = result[name]["model"][key], result[name]["baseline"][key]
            print(f"  {key:9s} model P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f}"
                  f"   baseline F1 {b['f1']:.3f}  (n={m['count']})")  # fmt: skip
    c = result["cost"]
    print(f"cost: {c['mean_ms']} ms per final (p95 {c['p95_ms']}), {c['finals']} finals")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "punct")
    parser.add_argument("--artifact", type=Path, default=ROOT / "samples" / "punct" / "punct.ds")
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--lj001", type=Path,
                        default=ROOT.parent / "shared" / "data" / "speech" / "lj001")  # fmt: skip
    args = parser.parse_args(argv)
    result = evaluate_artifact(args.artifact, args.data, args.split, args.lj001)
    _print(result)
    name = args.artifact.stem
    (args.data / f"eval-{name}-{args.split}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
