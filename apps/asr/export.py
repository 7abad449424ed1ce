"""Recipe step 4: write the streaming ``.ds`` artifact for the server.

    python -m apps.asr.export [--data cache/asr] [--out samples/asr/model.ds]
        [--chunk 8] [--left 32]

The artifact holds the streaming step (one chunk plus explicit state, see
``apps.asr.model.StreamingStep``) for both backends, and in its manifest the
vocabulary, the frontend configuration with its normalization statistics, the
model configuration and the chunk geometry, so a pipeline needs nothing else.
``--chunk`` and ``--left`` (encoder frames of 40 ms) set the chunk and the
attention's left context of the exported model, by default those it was
trained with: a larger chunk waits longer for each step and sees more of it
(accuracy against latency, measured in docs/asr.md); the left context sets
the size of the per-layer key/value state.  ``--decoder-only`` records a
retuned decoder (``apps.asr.tune``'s ``decoder.json``) in an existing
artifact without exporting it again.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from apps.asr.model import AsrModel, StreamingStep
from dsstream.decoding import ENGLISH_CHARS
from dsstream.frontend import FbankConfig

ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "export_streaming",
    "export_ctc",
    "manifest_decoder",
    "add_geometry_arguments",
    "set_geometry",
    "main",
]


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


class _LogProbs(torch.nn.Module):
    """Whatever the model returns (a tensor, or a tuple led by one) as CTC log-probs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.log_softmax(-1)


def export_ctc(
    model: torch.nn.Module,
    vocabulary: list[str],
    out: Path,
    input_kind: str = "waveform",
    frontend: FbankConfig | None = None,
    frame_shift_s: float = 0.02,
    blank_id: int = 0,
    max_seconds: float = 30.0,
) -> Path:
    """Bring your own CTC model: any ``nn.Module`` mapping a waveform ``[B, samples]``
    (16 kHz) or features ``[B, frames, mels]`` (from ``frontend``) to ``[B, T, V]``
    logits or log-probs, exported as a whole-utterance ``.ds`` with the same
    metadata keys as the streaming artifact."""
    from engine import convert

    if input_kind not in ("waveform", "features"):
        raise ValueError("input_kind must be 'waveform' or 'features'")
    if input_kind == "features" and frontend is None:
        raise ValueError("a features model needs its frontend config")
    if input_kind == "waveform":
        example = torch.randn(2, 16000)
        dims = {0: Dim("batch", max=64), 1: Dim("samples", min=4000, max=int(16000 * max_seconds))}
    else:
        assert frontend is not None
        example = torch.randn(2, 100, frontend.n_mels)
        dims = {0: Dim("batch", max=64), 1: Dim("frames", min=16, max=int(100 * max_seconds))}
    metadata = {
        "task": "asr",
        "streaming": False,
        "input": input_kind,
        "vocabulary": list(vocabulary),
        "blank_id": blank_id,
        "frontend": frontend.to_dict() if frontend is not None else None,
        "frame_shift_s": frame_shift_s,
    }
    return convert(_LogProbs(model.eval()), (example,), dynamic_shapes=(dims,),
                   input_names=[input_kind], output_names=["logp"], output=out,
                   extra=metadata)  # fmt: skip


def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """``--chunk`` and ``--left`` (encoder frames of 40 ms, at least 1; default: as trained)."""
    from dsstream.cli import positive_int

    parser.add_argument(
        "--chunk", type=positive_int, help="encoder frames per step (default: trained)"
    )
    parser.add_argument(
        "--left", type=positive_int, help="left context, encoder frames (default: trained)"
    )


def set_geometry(model: AsrModel, args: argparse.Namespace) -> None:
    """The chunk and left context of ``args`` on ``model`` (those it has where unset)."""
    model.cfg = replace(model.cfg, chunk=args.chunk or model.cfg.chunk,
                        left=args.left or model.cfg.left)  # fmt: skip


def manifest_decoder(data: Path) -> dict[str, Any]:
    """The decoder settings for the manifest (the streaming pipeline's defaults):
    ``apps.asr.tune``'s choice, else evaluate's defaults."""
    from apps.asr.evaluate import decoder_settings

    return {k: v for k, v in decoder_settings(data).items() if k != "lj_dev"}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "samples" / "asr" / "model.ds")
    parser.add_argument(
        "--decoder-only", action="store_true",
        help="only record <data>/decoder.json's settings (apps.asr.tune) in the existing "
             "artifact --out, its weights untouched (a retuned decoder, no new export)",
    )  # fmt: skip
    add_geometry_arguments(parser)
    args = parser.parse_args(argv)
    if args.decoder_only:
        from engine.artifact import update_extra

        if not args.out.is_file():
            parser.error(f"--decoder-only: no artifact at {args.out}")
        path = update_extra(args.out, decoder=manifest_decoder(args.data))
        print(f"recorded the decoder settings in {path}: {manifest_decoder(args.data)}")
        return path
    from apps.asr.train import load_checkpoint

    model, fbank, ckpt = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    set_geometry(model, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = ckpt["state"]
    # The whole run state, so apps.asr.recover gives back a checkpoint that resumes
    # where this one stands and that the card can describe.
    extra = {"training": state.get("history", []), "training_state": state,
             "decoder": manifest_decoder(args.data)}  # fmt: skip
    path = export_streaming(model, fbank, args.out, extra)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


if __name__ == "__main__":
    main()
