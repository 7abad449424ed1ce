"""Recipe step: INT8 post-training quantization of the VQA model, measured.

    python -m apps.vqa.quantize [--mode static|dynamic] [--observer minmax] [--calib 256]
        [--sweep 8,32,128,512] [--out samples/vqa]

BatchNorm is folded into the convolutions first (eval mode), so the int8
weights are the ones that run.  Calibrates on training scenes (each with its
questions), reports test accuracy per question type for float and INT8, and
writes ``image-int8.ds`` and ``fuser-int8.ds`` to ``--out``.  Writes
``<data>/quant-<mode>-<observer>.json``.  ``--qat`` takes the
quantization-aware fine-tuned model (``python -m apps.vqa.train --qat``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apps.vqa.model import TRAINING_HEADS, fold_batchnorm
from apps.vqa.train import Split, accuracy, load_checkpoint, load_split

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["main"]


def _batches(split: Split, scenes: int, batch: int = 16) -> list[tuple]:
    scenes = min(scenes, len(split))
    return [split.batch(slice(i, min(i + batch, scenes)))[:2] for i in range(0, scenes, batch)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from apps.vqa.export import export_stages
    from engine.quant import QuantConfig, quantize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "vqa")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    parser.add_argument("--mode", choices=["static", "dynamic"], default="static")
    parser.add_argument("--observer", choices=["minmax", "percentile", "mse"], default="minmax")
    parser.add_argument("--calib", type=int, default=256, help="calibration scenes")
    parser.add_argument("--sweep", default="", help="comma-separated calibration scene counts")
    parser.add_argument("--out", type=Path, default=None, help="folder for the INT8 stages")
    parser.add_argument("--qat", action="store_true", help="use ckpt/qat.pt (train --qat)")
    args = parser.parse_args(argv)
    model, tok, _ = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    train, test = load_split(args.data / "train.npz", tok), load_split(args.data / "test.npz", tok)
    folded = fold_batchnorm(model)
    config = QuantConfig(mode=args.mode, observer=args.observer, skip=TRAINING_HEADS)
    result: dict[str, Any] = {"mode": args.mode, "observer": args.observer, "qat": args.qat}
    result["float"] = accuracy(folded, test)
    if args.qat:
        from apps.vqa.train import load_qat_checkpoint
        from engine.quant import freeze

        qmodel = freeze(load_qat_checkpoint(args.data / "ckpt" / "qat.pt")[0])
    else:
        qmodel = quantize(folded, _batches(train, args.calib), config)
    result["int8"] = accuracy(qmodel, test)
    for key in ("all", "non_relational", "relational"):
        print(f"{key:15s} float {result['float'][key]:.4f}  int8 {result['int8'][key]:.4f}")
    if args.sweep and args.mode == "static":
        result["sweep"] = {}
        for count in [int(c) for c in args.sweep.split(",")]:
            q = quantize(folded, _batches(train, count), config)
            result["sweep"][count] = accuracy(q, test)
            print(f"calibration {count} scenes: {result['sweep'][count]['all']:.4f}")
    if args.out:
        paths = export_stages(qmodel, tok, args.out, suffix="-int8")
        result["artifact_bytes"] = {p.name: p.stat().st_size for p in paths}
        print("wrote", ", ".join(f"{p} ({p.stat().st_size / 1e6:.2f} MB)" for p in paths))
    name = "quant-qat" if args.qat else f"quant-{args.mode}-{args.observer}"
    (args.data / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
