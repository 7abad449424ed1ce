"""Recipe step 4: export the punctuation model through the engine, float and INT8, measured.

    python -m apps.punct.export [--data cache/punct] [--checkpoint ckpt/best.pt]
        [--out samples/punct] [--calib 512]

Chooses the decision rule on the dev documents: the no-mark probability is
scaled before the argmax by the factor (``--scales``) with the best F1 of
all marks, recorded in the artifacts' manifests.  Writes ``punct-float.ds``
and ``punct-int8.ds`` (engine.quant, static, calibrated on training finals),
scores both on the dev documents and times them per final, and ships as
``punct.ds`` the one that measures better: INT8 where it is faster at dev
scores within half a point of float's, else float.  The choice and the
numbers go to ``<data>/export.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from apps.punct.evaluate import artifact_labeller, cost, score_documents
from apps.punct.model import Probabilities, PunctModel
from apps.punct.prepare import read_split
from apps.punct.train import _tensors, load_checkpoint, samples, torch_labeller
from dsstream.punctuation import CASES, MARKS, Punctuator, PunctVocab

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["export", "calibration", "choose_scale", "measure", "main"]


def export(model: torch.nn.Module, vocab: PunctVocab, cfg: Any, path: Path) -> Path:
    """``model`` (a PunctModel, or its quantized copy) as an engine artifact:
    ``tokens``, ``segment [B, T]`` -> ``marks [B, T, 5]``, ``cases [B, T, 3]``."""
    from engine import convert

    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = torch.randint(2, len(vocab), (2, 24))
    segment = torch.zeros(2, 24, dtype=torch.long)
    segment[:, 8:] = 1
    dims = {0: Dim("batch", min=1, max=16), 1: Dim("length", min=1, max=cfg.max_len)}
    return convert(
        Probabilities(model).eval(), (tokens, segment), dynamic_shapes=(dims, dims),
        input_names=["tokens", "segment"], output_names=["marks", "cases"], output=path,
        extra={"task": "punctuation", "vocab": list(vocab.words), "max_len": cfg.max_len,
               "context": cfg.context, "marks": list(MARKS), "cases": list(CASES),
               "model": cfg.to_dict()},
    )  # fmt: skip


def calibration(data: Path, vocab: PunctVocab, cfg: Any, count: int) -> list[tuple]:
    rng = random.Random(1)
    items = samples(read_split(data, "train")[:20], vocab, cfg, rng)
    rng.shuffle(items)
    items = items[:count]
    return [_tensors(items[i : i + 32])[:2] for i in range(0, len(items), 32)]


def choose_scale(model: PunctModel, vocab: PunctVocab, dev: list, scales: list[float],
                 max_words: int) -> tuple[float, dict[float, float]]:  # fmt: skip
    """The no-mark scale with the best dev F1 of all marks (ties: the larger)."""
    f1 = {}
    for scale in scales:
        result = score_documents(dev, torch_labeller(model, vocab, none_scale=scale),
                                 model.cfg.context, max_words=max_words)  # fmt: skip
        f1[scale] = result["all marks"]["f1"]
        print(f"no-mark scale {scale}: dev F1 of all marks {f1[scale]:.4f}")
    return max(sorted(f1, reverse=True), key=lambda k: f1[k]), f1


def measure(path: Path, dev: list, max_words: int) -> dict[str, Any]:
    punctuator = Punctuator(path)
    times: list[float] = []
    result = score_documents(dev, artifact_labeller(punctuator, times), punctuator.context,
                             max_words=max_words)  # fmt: skip
    punctuator.close()
    return {"all marks f1": result["all marks"]["f1"], "capitals f1": result["capitals"]["f1"],
            "mean_ms": cost(times)["mean_ms"], "bytes": path.stat().st_size}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from engine.artifact import update_extra
    from engine.quant import QuantConfig, quantize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "punct")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/best.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "samples" / "punct")
    parser.add_argument("--calib", type=int, default=512, help="calibration finals")
    parser.add_argument("--dev-words", type=int, default=8000, help="words scored per dev document")
    parser.add_argument("--scales", default="1,0.8,0.6,0.5,0.4,0.3,0.2")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, vocab, _ = load_checkpoint(args.checkpoint or args.data / "ckpt" / "best.pt")
    cfg: Any = model.cfg
    work = args.data / "export"
    dev = read_split(args.data, "dev")
    scales = [float(x) for x in args.scales.split(",")]
    scale, scale_f1 = choose_scale(model, vocab, dev, scales, args.dev_words)
    float_path = export(model, vocab, cfg, work / "punct-float.ds")
    qmodel = quantize(model, calibration(args.data, vocab, cfg, args.calib),
                      QuantConfig(mode="static", skip=("marks", "cases")))  # fmt: skip
    int8_path = export(qmodel, vocab, cfg, work / "punct-int8.ds")
    for path in (float_path, int8_path):
        update_extra(path, none_scale=scale)
    result: dict[str, Any] = {"none_scale": scale, "scales": scale_f1,
                              "float": measure(float_path, dev, args.dev_words),
                              "int8": measure(int8_path, dev, args.dev_words)}  # fmt: skip
    f, q = result["float"], result["int8"]
    drop = (f["all marks f1"] - q["all marks f1"]) + (f["capitals f1"] - q["capitals f1"])
    result["shipped"] = "int8" if q["mean_ms"] < f["mean_ms"] and drop < 0.005 else "float"
    for name in ("float", "int8"):
        r = result[name]
        print(f"{name}: dev marks F1 {r['all marks f1']:.4f} capitals F1 {r['capitals f1']:.4f} "
              f"{r['mean_ms']:.3f} ms/final {r['bytes'] / 1e6:.2f} MB")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(int8_path if result["shipped"] == "int8" else float_path,
                    args.out / "punct.ds")  # fmt: skip
    print(f"shipped {result['shipped']} as {args.out / 'punct.ds'}")
    (args.data / "export.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
