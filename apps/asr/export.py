"""Recipe step 4: write the streaming ``.ds`` artifact for the server.

    python -m apps.asr.export [--data cache/asr] [--out samples/asr/model.ds]

The artifact holds the streaming step (one chunk plus explicit state, see
``apps.asr.model.StreamingStep``) for both backends, and in its manifest the
vocabulary, the frontend configuration with its normalization statistics, the
model configuration and the chunk geometry, so a pipeline needs nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from apps.asr.model import AsrModel, StreamingStep
from dsstream.decoding import ENGLISH_CHARS
from dsstream.frontend import FbankConfig

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["export_streaming", "main"]


def export_streaming(
    model: AsrModel, fbank: FbankConfig, out: Path, extra: dict[str, Any] | None = None
) -> Path:
    """Convert ``model``'s streaming step to ``out`` with its metadata."""
    from engine import StateSpec, convert

    model = model.eval()
    step = StreamingStep(model)
    cfg = model.cfg
    example = (torch.randn(2, 4 * cfg.chunk, cfg.n_mels), *step.initial_state(2))
    names = list(StreamingStep.STATE)
    metadata = {
        "task": "asr",
        "vocabulary": list(ENGLISH_CHARS.tokens),
        "blank_id": ENGLISH_CHARS.blank_id,
        "frontend": fbank.to_dict(),
        "model": cfg.to_dict(),
        "chunk_feature_frames": 4 * cfg.chunk,  # 10 ms feature frames per step
        "frame_shift_s": 0.04,  # seconds per output frame
        **(extra or {}),
    }
    return convert(
        step,
        example,
        dynamic_shapes=tuple({0: Dim("batch", min=1, max=256)} for _ in example),
        input_names=["feats", *names],
        output_names=["logp", *[f"new_{n}" for n in names]],
        output=out,
        state=[StateSpec(n, n, f"new_{n}") for n in names],
        extra=metadata,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "samples" / "asr" / "model.ds")
    args = parser.parse_args(argv)
    from apps.asr.train import load_checkpoint

    model, fbank, ckpt = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = export_streaming(model, fbank, args.out, {"training": ckpt["state"].get("history", [])})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


if __name__ == "__main__":
    main()
