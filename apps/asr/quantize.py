"""Recipe step: INT8 post-training quantization of the trained model, measured.

    python -m apps.asr.quantize [--mode static|dynamic] [--observer minmax|percentile|mse]
        [--calib 256] [--sweep 16,64,256,1024] [--sensitivity 8] [--keep-float 0]
        [--chunk 8] [--left 32] [--checkpoint ckpt/last.pt] [--out samples/asr/model-int8.ds]

Calibrates on training utterances (never the held-out voices), quantizes with
``engine.quant``, scores the INT8 model exactly as ``apps.asr.evaluate`` scores
the float one (CER/WER greedy and with the LM, held-out voices and LJ001), and
exports the streaming INT8 artifact.  ``--sweep`` reports accuracy against the
calibration count; ``--sensitivity N`` ranks layers by their quantization
error on N utterances, and ``--keep-float K`` keeps the K most sensitive layers
in float (mixed precision).  ``--qat`` takes the quantization-aware fine-tuned
model (``python -m apps.asr.train --qat``) instead of calibrating the float one.
Writes ``<data>/quant-<mode>-<observer>[-keepK].json`` (``quant-qat.json`` with ``--qat``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from apps.asr.evaluate import decoder_settings, evaluate
from apps.asr.export import (
    add_geometry_arguments,
    export_streaming,
    manifest_decoder,
    set_geometry,
)
from apps.asr.train import load_checkpoint, load_qat_checkpoint, load_wave, read_manifest
from dsstream.frontend_torch import Fbank

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["calibration_batches", "main", "record_path"]

# How the card words an observer's choice of each activation's range.
OBSERVER_WORDS = {
    "minmax": "min/max",
    "percentile": "the 99.99th percentile of |x|",
    "mse": "the clipping with the least quantize-dequantize error",
}


def record_path(data: Path, mode: str, observer: str, keep_float: int = 0) -> Path:
    """Where a quantization's measurements go (``<data>/quant-<mode>-<observer>[-keepK].json``);
    the artifact's manifest (``"quantized_with"``) names the one it was made by."""
    return data / (
        f"quant-{mode}-{observer}" + (f"-keep{keep_float}" if keep_float else "") + ".json"
    )


def calibration_batches(data: Path, fbank: Fbank, count: int, seed: int = 0) -> list[tuple]:
    """``count`` training utterances (seeded pick; synthesized and real speech
    alike, as the model trained on both) as ``(feats [1, T, mels],)``."""
    rows = [row for name in ("train.jsonl", "real_train.jsonl") if (data / name).is_file()
            for row in read_manifest(data / name)]  # fmt: skip
    pick = random.Random(seed).sample(rows, min(count, len(rows)))
    out = []
    with torch.no_grad():
        for row in pick:
            feats = fbank(torch.from_numpy(load_wave(row["path"]))[None])[0]
            t = int(math.ceil(max(feats.shape[0], 4) / 4) * 4)
            out.append((torch.nn.functional.pad(feats, (0, 0, 0, t - feats.shape[0]))[None],))
    return out


# The sets a quantization is scored on: key prefix -> where evaluate() reports it.
SUMMARY_SETS = {
    "held": ("held_out_voices",),
    "lj": ("lj001",),
    "realdev": ("real_dev", "all"),
    "realtest": ("real_test", "all"),
}


def _summary(report: dict[str, Any]) -> dict[str, float]:
    keys = ("cer_greedy", "wer_greedy", "cer_lm", "wer_lm")
    out = {}
    for prefix, path in SUMMARY_SETS.items():
        scores = report
        for part in path:
            scores = scores.get(part, {})
        out |= {f"{prefix}_{k}": scores[k] for k in keys if k in scores}
    return out


def _from_qat(args: argparse.Namespace, model: torch.nn.Module, fbank: Fbank) -> dict[str, Any]:
    from engine.quant import freeze

    qmodel, fbank_cfg, saved = load_qat_checkpoint(args.data / "ckpt" / "qat.pt")
    set_geometry(qmodel, args)
    result: dict[str, Any] = {"qat": saved["state"], "quant_config": saved["quant_config"]}
    for key, m in (("float", model), ("int8", freeze(qmodel))):
        result[key] = _summary(evaluate(m, fbank, args.data, args.lm, limit=args.limit,
                                        lj_limit=args.lj_limit))  # fmt: skip
        print(f"{key}:", result[key])
    if args.out:
        export_streaming(qmodel, fbank_cfg, args.out, extra={"quantization_aware_training": True})
        result["artifact_bytes"] = args.out.stat().st_size
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    (args.data / "quant-qat.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# A recipe's script (options, calibrate, score, export), read top to bottom;
# over ~60 lines.
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from engine.quant import QuantConfig, quantize, sensitivity

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--lm", type=Path, default=ROOT / "samples" / "asr" / "lm.arpa")
    parser.add_argument("--mode", choices=["static", "dynamic"], default="static")
    parser.add_argument("--observer", choices=["minmax", "percentile", "mse"], default="minmax")
    parser.add_argument("--calib", type=int, default=256, help="calibration utterances")
    parser.add_argument("--sweep", default="", help="comma-separated calibration counts")
    parser.add_argument("--sensitivity", type=int, default=0, help="utterances for the ranking")
    parser.add_argument("--keep-float", type=int, default=0, help="most sensitive layers kept")
    parser.add_argument("--limit", type=int, default=2000, help="validation utterances")
    parser.add_argument("--lj-limit", type=int, default=186)
    parser.add_argument("--out", type=Path, default=None, help="write the INT8 artifact here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qat", action="store_true", help="use ckpt/qat.pt (train --qat)")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    add_geometry_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, fbank_cfg, ckpt = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    set_geometry(model, args)  # calibrated, scored and exported at this chunk and left context
    fbank = Fbank(fbank_cfg)
    if args.qat:
        return _from_qat(args, model, fbank)

    tuned = decoder_settings(args.data)

    def score(m: torch.nn.Module) -> dict[str, float]:
        return _summary(evaluate(m, fbank, args.data, args.lm, tuned["beam_width"],
                                 tuned["alpha"], tuned["beta"], limit=args.limit,
                                 lj_limit=args.lj_limit, mode=tuned["mode"]))  # fmt: skip

    result: dict[str, Any] = {"mode": args.mode, "observer": args.observer,
                              "checkpoint_step": ckpt.get("state", {}).get("step"),
                              "calibration": args.calib, "limit": args.limit,
                              "lj_limit": args.lj_limit}  # fmt: skip
    result["float"] = score(model)
    print("float:", result["float"])
    skip: tuple[str, ...] = ()
    if args.sensitivity:
        ranking = sensitivity(model, calibration_batches(args.data, fbank, args.sensitivity),
                              QuantConfig(mode=args.mode, observer=args.observer))  # fmt: skip
        result["sensitivity"] = ranking
        print("most sensitive layers:", ranking[:5])
        skip = tuple(name for name, _ in ranking[: args.keep_float])
    config = QuantConfig(mode=args.mode, observer=args.observer, skip=skip)
    calib = calibration_batches(args.data, fbank, args.calib) if args.mode == "static" else []
    started = time.monotonic()
    qmodel = quantize(model, calib, config)
    result["quantize_seconds"] = round(time.monotonic() - started, 1)
    result["int8"] = score(qmodel)
    result["keep_float"] = list(skip)
    print("int8:", result["int8"])
    if args.sweep and args.mode == "static":
        result["sweep"] = {}
        for count in [int(c) for c in args.sweep.split(",")]:
            q = quantize(model, calibration_batches(args.data, fbank, count), config)
            result["sweep"][count] = score(q)
            print(f"calibration {count}:", result["sweep"][count])
    if args.out:
        made_with = {"mode": args.mode, "observer": args.observer, "keep_float": list(skip),
                     "sensitivity": args.sensitivity,
                     "calibration": args.calib if args.mode == "static" else 0}  # fmt: skip
        export_streaming(qmodel, fbank_cfg, args.out,
                         extra={"quantized_from_step": result["checkpoint_step"],
                                "quantized_with": made_with,
                                "decoder": manifest_decoder(args.data)})  # fmt: skip
        result["artifact_bytes"] = args.out.stat().st_size
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    record = record_path(args.data, args.mode, args.observer, len(skip))
    record.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
