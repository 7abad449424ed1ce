"""Recipe step: structured pruning of the ASR model's feed-forward channels,
measured as a speed/accuracy curve.

    python -m apps.asr.prune [--amounts 0.3,0.5] [--limit 400] [--lj-limit 60]

For each amount: prune every feed-forward block to the same hidden size (the
least important channels by weight norm, engine.prune), score it (CER/WER as
``apps.asr.evaluate``), time the exported streaming step with ONNX Runtime
(1 and 64 sessions per call), and save ``<data>/ckpt/pruned-<pct>.pt``.
Fine-tune a pruned model with the training recipe, then score it again::

    python -m apps.asr.train --init cache/asr/ckpt/pruned-30.pt \\
        --ckpt-name pruned-30-ft.pt --epochs 1 --lr 3e-4 --warmup 100

Writes ``<data>/prune.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.asr.evaluate import evaluate
from apps.asr.export import export_streaming
from apps.asr.model import AsrModel, FeedForward
from apps.asr.quantize import _summary
from apps.asr.train import load_checkpoint, save
from dsstream.frontend_torch import Fbank

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ffn_pairs", "step_latency_ms", "main"]


def ffn_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Every feed-forward block's (expand, project) Linear pair."""
    return [(f"{n}.net.1", f"{n}.net.4") for n, m in model.named_modules()
            if isinstance(m, FeedForward)]  # fmt: skip


def step_latency_ms(model: AsrModel, fbank_cfg: Any, batches=(1, 64)) -> dict[str, float]:
    """Median ONNX Runtime latency of one streaming step, per sessions-per-call."""
    from engine import InferenceEngine
    from engine.artifact import read_manifest
    from engine.stats import median_ms

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_streaming(model, fbank_cfg, Path(tmp) / "m.ds")
        engine = InferenceEngine(path, backend="onnx")
        manifest, _ = read_manifest(path)
        for batch in batches:
            feeds = [np.zeros([batch if isinstance(d, str) else d for d in spec.shape],
                              dtype=np.dtype(spec.dtype)) for spec in manifest.inputs]  # fmt: skip
            ms = median_ms(lambda feeds=feeds: engine.infer(feeds), 20)
            out[f"step_ms_b{batch}"] = round(ms, 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from engine.prune import hidden_size, prune_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    parser.add_argument("--lm", type=Path, default=ROOT / "samples" / "asr" / "lm.arpa")
    parser.add_argument("--amounts", default="0.3,0.5")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--lj-limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt_path = args.checkpoint or args.data / "ckpt" / "last.pt"
    model, fbank_cfg, ckpt = load_checkpoint(ckpt_path)
    fbank = Fbank(fbank_cfg)

    def measure(m: AsrModel) -> dict[str, Any]:
        scores = _summary(evaluate(m, fbank, args.data, args.lm, limit=args.limit,
                                   lj_limit=args.lj_limit))  # fmt: skip
        return {"parameters": sum(p.numel() for p in m.parameters()), **scores,
                **step_latency_ms(m, fbank_cfg)}  # fmt: skip

    rows = [{"amount": 0.0, "checkpoint": str(ckpt_path), **measure(model)}]
    print(rows[0])
    for amount in [float(a) for a in args.amounts.split(",") if a]:
        pruned, _ = prune_pairs(model, ffn_pairs(model), amount)
        hidden = hidden_size(amount, model.cfg.ff_dim or model.cfg.ff_mult * model.cfg.d_model)
        cfg = replace(model.cfg, ff_dim=hidden)
        rebuilt = AsrModel(cfg)  # the same weights in a model its config describes
        rebuilt.load_state_dict(pruned.state_dict())
        rows.append({"amount": amount, "ff_dim": hidden, **measure(rebuilt.eval())})
        print(rows[-1])
        out = args.data / "ckpt" / f"pruned-{round(amount * 100)}.pt"
        save(out, {"model": rebuilt.state_dict(), "config": cfg.to_dict(),
                   "fbank": asdict(fbank_cfg), "state": {"pruned_from": str(ckpt_path),
                   "amount": amount, "step": ckpt["state"]["step"]}})  # fmt: skip
    (args.data / "prune.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
