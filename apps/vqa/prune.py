"""Recipe step: structured pruning of the VQA model's feed-forward channels,
with fine-tuning, measured as a speed/accuracy curve.

    python -m apps.vqa.prune [--amounts 0.3,0.5,0.7] [--finetune-steps 300]

For each amount: prune every feed-forward block's hidden channels (the least
important by weight norm, engine.prune), score on the test scenes, fine-tune,
score again, export both stages and time them with ONNX Runtime.  Writes
``<data>/prune.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.vqa.model import FeedForward, VqaModel
from apps.vqa.train import Split, accuracy, load_checkpoint, load_split, objective, recalibrate

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ffn_pairs", "finetune", "main"]


def ffn_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Every feed-forward block's (up, down) Linear pair."""
    return [
        (f"{n}.up", f"{n}.down") for n, m in model.named_modules() if isinstance(m, FeedForward)
    ]


def finetune(model: VqaModel, split: Split, steps: int, lr: float, batch: int = 32) -> VqaModel:
    """A few steps of the training objective (:func:`apps.vqa.train.objective`,
    cosine-decayed ``lr``), then BN recalibration."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(split), (batch,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / max(1, steps)))
        loss = objective(model, split, idx)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate(model, split)
    return model.eval()


def _latency_ms(model: VqaModel, tok: Any) -> dict[str, float]:
    from apps.vqa.export import export_stages
    from engine import InferenceEngine
    from engine.stats import median_ms

    with tempfile.TemporaryDirectory() as tmp:
        image_path, fuser_path = export_stages(model, tok, Path(tmp))
        image_engine, fuser_engine = InferenceEngine(image_path), InferenceEngine(fuser_path)
        image = np.random.default_rng(0).random((1, 3, 75, 75), dtype=np.float32)
        kv = image_engine.infer([image])["kv"]
        tokens = np.random.default_rng(1).integers(1, 40, (18, 12)).astype(np.int64)
        kv18 = np.repeat(kv, 18, 0)
        calls = {
            "image_ms": lambda: image_engine.infer([image]),
            "questions18_ms": lambda: fuser_engine.infer([tokens, kv18]),
        }
        return {name: round(median_ms(fn, 30), 3) for name, fn in calls.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from engine.prune import prune_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "vqa")
    parser.add_argument("--amounts", default="0.3,0.5,0.7")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, _ = load_checkpoint(args.data / "ckpt" / "last.pt")
    train, test = load_split(args.data / "train.npz", tok), load_split(args.data / "test.npz", tok)
    # Parameters of the exported stages (the scene-parsing head only trains).
    head = sum(p.numel() for p in model.cells.parameters())
    params = sum(p.numel() for p in model.parameters()) - head
    rows = [{"amount": 0.0, "parameters": params, "accuracy": accuracy(model, test)["all"],
             **_latency_ms(model, tok)}]  # fmt: skip
    print(rows[0])
    for amount in [float(a) for a in args.amounts.split(",")]:
        pruned, report = prune_pairs(model, ffn_pairs(model), amount)
        before = accuracy(pruned, test)["all"]
        pruned = finetune(pruned, train, args.finetune_steps, args.lr)
        row = {"amount": amount, "parameters": report["parameters"][1] - head,
               "accuracy_pruned": before, "accuracy": accuracy(pruned, test)["all"],
               **_latency_ms(pruned, tok)}  # fmt: skip
        rows.append(row)
        print(row)
    (args.data / "prune.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
