"""Recipe step 4: export the two VQA stages as engine artifacts.

    python -m apps.vqa.export [--data cache/vqa] [--out samples/vqa]

``image.ds`` maps an image ``[B, 3, S, S]`` (RGB in [0, 1]) to every fuser
layer's cross-attention keys/values ``kv [B, layers, 2, tokens, d]``;
``fuser.ds`` maps question token ids ``[B, L]`` and ``kv`` to answer
probabilities ``[B, answers]``.  The fuser's manifest carries the tokenizer and
the answer list; the image manifest the image size and the kv geometry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.export import Dim

from apps.vqa.model import VqaModel
from apps.vqa.scenes import ANSWERS, all_template_texts
from dsstream.tokenizer import WordTokenizer

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["export_stages", "write_samples", "main"]


class _Fuser(torch.nn.Module):
    """One question per image row: ``tokens [B, L]``, ``kv`` -> probabilities ``[B, answers]``."""

    def __init__(self, model: VqaModel) -> None:
        super().__init__()
        self.question = model.question

    def forward(self, tokens: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.question(tokens[:, None], kv)[:, 0].softmax(-1)


def export_stages(
    model: VqaModel, tok: WordTokenizer, out: Path, suffix: str = ""
) -> tuple[Path, Path]:
    """Write ``image{suffix}.ds`` and ``fuser{suffix}.ds`` (a model quantized with
    engine.quant exports as INT8)."""
    from engine import convert

    model = model.eval()
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    grid = cfg.grid
    common = {"task": "vqa", "model": cfg.to_dict()}
    image = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    image_path = convert(
        model.image, (image,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},),
        input_names=["image"], output_names=["kv"], output=out / f"image{suffix}.ds",
        extra={**common, "stage": "image", "image_size": cfg.image_size,
               "kv_shape": [cfg.fuser_layers, 2, grid * grid, cfg.d_model]},
    )  # fmt: skip
    with torch.no_grad():
        kv = model.image(image)
    tokens = torch.randint(1, cfg.vocab, (2, 12))
    fuser_path = convert(
        _Fuser(model), (tokens, kv),
        dynamic_shapes=({0: Dim("batch", min=1, max=256), 1: Dim("length", min=1,
                         max=cfg.max_len)}, {0: Dim("batch", min=1, max=256)}),
        input_names=["tokens", "kv"], output_names=["probs"], output=out / f"fuser{suffix}.ds",
        extra={**common, "stage": "fuser", "answers": list(ANSWERS),
               "tokenizer": {"vocab": list(tok.vocab), "max_len": tok.max_len},
               "questions": all_template_texts()},
    )  # fmt: skip
    return image_path, fuser_path


def stamp_questions(folder: Path) -> list[Path]:
    """Add the question forms to fuser artifacts exported before they were
    recorded (the weights and graphs are copied as they are)."""
    from engine.artifact import update_extra

    paths = sorted(folder.glob("fuser*.ds"))
    for path in paths:
        update_extra(path, questions=all_template_texts())
    return paths


def write_samples(out: Path, count: int = 4, seed: int = 2026) -> Path:
    """A few scenes as PNG with every question type and its answer (``questions.tsv``)."""
    import random

    from apps.vqa.scenes import make_scene, questions, render

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = ["image\tquestion\ttype\tanswer"]
    for i in range(count):
        scene = make_scene(rng)
        name = f"scene{i}.png"
        render(scene).save(folder / name)
        lines += [f"{name}\t{qa.text}\t{qa.kind}\t{qa.answer}" for qa in questions(scene, rng, 1)]
    (folder / "questions.tsv").write_text("\n".join(lines) + "\n")
    return folder


def main(argv: list[str] | None = None) -> tuple[Path, ...]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "vqa")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "samples" / "vqa")
    parser.add_argument(
        "--stamp-questions", action="store_true",
        help="only add the question forms to the fuser artifacts in --out (no checkpoint needed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.stamp_questions:
        stamped = stamp_questions(args.out)
        for p in stamped:
            print(f"added {len(all_template_texts())} question forms to {p}")
        return tuple(stamped)
    from apps.vqa.train import load_checkpoint

    model, tok, _ = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    paths = export_stages(model, tok, args.out)
    write_samples(args.out)
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
    return paths


if __name__ == "__main__":
    main()
