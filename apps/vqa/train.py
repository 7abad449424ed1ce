"""Recipe step 2: train the VQA model on the prepared scenes.

    python -m apps.vqa.train [--data cache/vqa] [--epochs 20] [--max-minutes 0]

Batches hold whole scenes with all their questions, so each image is encoded
once per step.  The loss is the answers' cross-entropy plus ``--aux`` (default
1) times the scene-parsing loss on the image tokens (:mod:`apps.vqa.parse`),
which is what lets the fuser learn to find objects at all.  A progress bar
shows loss and accuracy; a checkpoint is written every
``--checkpoint-minutes`` and after each epoch (atomic replace) and a run
resumes from it; seeds make runs repeatable.

``--qat`` fine-tunes the trained model (``ckpt/last.pt``, BatchNorm folded into
the convolutions) with INT8 fake quantization into ``ckpt/qat.pt``, e.g.
``python -m apps.vqa.train --qat --epochs 1 --lr 1e-4``; then
``python -m apps.vqa.quantize --qat --out samples/vqa``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from apps.vqa.model import TRAINING_HEADS, VqaConfig, VqaModel, fold_batchnorm, param_count
from apps.vqa.parse import cell_targets, parse_loss
from apps.vqa.scenes import ANSWERS, TEMPLATES
from dsstream.tokenizer import WordTokenizer

ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "Split",
    "load_split",
    "recalibrate",
    "accuracy",
    "objective",
    "load_checkpoint",
    "load_qat_checkpoint",
    "train",
    "main",
]


class Split:
    """A prepared split as tensors grouped by scene: ``tokens [N, Q, L]``, ``answers [N, Q]``."""

    def __init__(self, data: dict[str, np.ndarray], tok: WordTokenizer) -> None:
        n = len(data["images"])
        per = len(data["texts"]) // n
        assert (data["image_index"] == np.repeat(np.arange(n), per)).all(), "questions not grouped"
        self.images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()  # uint8
        self.tokens = torch.from_numpy(tok.batch(list(data["texts"]))).reshape(n, per, -1)
        self.answers = torch.from_numpy(data["answers"]).reshape(n, per)
        self.kinds = np.asarray(data["kinds"]).reshape(n, per)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = self.images[idx].float() / 255.0
        tokens = self.tokens[idx]
        used = int((tokens != 0).sum(-1).max())  # trim padding to the longest question
        return images, tokens[..., :used], self.answers[idx]


def load_split(path: Path, tok: WordTokenizer) -> Split:
    with np.load(path) as f:
        return Split({k: f[k] for k in f.files}, tok)


@torch.no_grad()
def recalibrate(model: VqaModel, split: Split, images: int = 2048, batch: int = 64) -> None:
    """Recompute BatchNorm statistics exactly (a cumulative average) on training images:
    the running averages trail weights that move fast, and eval mode then suffers."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
        m.train()
    for i in range(0, min(images, len(split)), batch):
        model.image(split.batch(slice(i, i + batch))[0])
    for m, (momentum, training) in zip(norms, saved):
        m.momentum = momentum
        m.train(training)


@torch.no_grad()
def accuracy(model: VqaModel, split: Split, batch: int = 64) -> dict[str, float]:
    """Accuracy overall, non-relational, relational and per question type (eval mode)."""
    model.eval()
    preds = []
    for i in range(0, len(split), batch):
        images, tokens, _ = split.batch(slice(i, i + batch))
        preds.append(model(images, tokens).argmax(-1))
    right = (torch.cat(preds) == split.answers).numpy()
    out = {"all": float(right.mean())}
    relational = np.vectorize(lambda k: TEMPLATES[k][0])(split.kinds)
    out["non_relational"] = float(right[~relational].mean())
    out["relational"] = float(right[relational].mean())
    for kind in TEMPLATES:
        out[kind] = float(right[split.kinds == kind].mean())
    return out


def load_checkpoint(path: Path) -> tuple[VqaModel, WordTokenizer, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = VqaModel(VqaConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    tok = WordTokenizer(tuple(ckpt["tokenizer"]["vocab"]), ckpt["tokenizer"]["max_len"])
    return model.eval(), tok, ckpt


def objective(
    model: VqaModel, split: Split, idx: torch.Tensor, aux: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The training loss on scenes ``idx``: answer cross-entropy plus ``aux`` times
    the scene-parsing loss (:mod:`apps.vqa.parse`).  Returns the loss, the answer
    logits ``[B, Q, answers]``, the answers ``[B, Q]`` and the parse head's
    neighbour-shape accuracy."""
    images, tokens, answers = split.batch(idx)
    logits, cells = model.forward_with_cells(images, tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answers.flatten())
    targets = cell_targets(split.images[idx], model.cfg.grid, model.cfg.stride)
    parse, parsed = parse_loss(cells, targets)
    return loss + aux * parse, logits, answers, float(parsed)


def _quant_config() -> Any:
    from engine.quant import QuantConfig

    return QuantConfig(skip=TRAINING_HEADS)


def _qat_model(model: VqaModel, saved: dict[str, Any] | None, calib: Split | None) -> VqaModel:
    """``model`` (float weights) with BN folded and fake quantizers: restored from a
    QAT checkpoint (``saved``) or calibrated on ``calib``."""
    from engine.quant import QuantConfig, calibrate, enable_fake, load_qat_state, prepare

    if saved is not None:
        qmodel = prepare(fold_batchnorm(model), QuantConfig(**saved["quant_config"]))
        qmodel.load_state_dict(saved["model"])
        return load_qat_state(qmodel, saved["qat"])
    assert calib is not None
    qmodel = prepare(fold_batchnorm(model), _quant_config())
    calibrate(
        qmodel, [calib.batch(slice(i, i + 16))[:2] for i in range(0, min(256, len(calib)), 16)]
    )
    return enable_fake(qmodel)


def load_qat_checkpoint(path: Path) -> tuple[VqaModel, WordTokenizer, dict[str, Any]]:
    """A QAT checkpoint (``--qat``) as the model with its fake quantizers."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = _qat_model(VqaModel(VqaConfig(**ckpt["config"])), ckpt, None)
    tok = WordTokenizer(tuple(ckpt["tokenizer"]["vocab"]), ckpt["tokenizer"]["max_len"])
    return model.eval(), tok, ckpt


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    info = json.loads((args.data / "tokenizer.json").read_text())
    tok = WordTokenizer(tuple(info["vocab"]), info["max_len"])
    train_set = load_split(args.data / "train.npz", tok)
    valid_set = load_split(args.data / "valid.npz", tok)
    cfg = VqaConfig(image_size=train_set.images.shape[-1], vocab=len(tok.vocab),
                    max_len=tok.max_len, answers=len(ANSWERS), d_model=args.d_model,
                    gated=args.gated, fuser_layers=args.fuser_layers,
                    image_layers=args.image_layers)  # fmt: skip
    model = VqaModel(cfg)
    ckpt_path = args.data / "ckpt" / ("qat.pt" if args.qat else "last.pt")
    resume = ckpt_path.exists() and not args.restart
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume else None
    qat_extra: dict[str, Any] = {}
    if args.qat:
        float_path = args.data / "ckpt" / "last.pt"
        if not float_path.exists():
            raise SystemExit(f"--qat fine-tunes a trained model: {float_path} not found")
        base = torch.load(float_path, map_location="cpu", weights_only=False)
        cfg = VqaConfig(**base["config"])
        model = VqaModel(cfg)
        model.load_state_dict(base["model"])
        model = _qat_model(model, saved, None if resume else train_set)
        qat_extra = {"quant_config": saved["quant_config"] if saved else _quant_config().to_dict()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    steps_per_epoch = math.ceil(len(train_set) / args.batch)
    total = steps_per_epoch * args.epochs
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0}
    if saved is not None:
        if not args.qat:  # a QAT model got its weights in _qat_model
            model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resumed at epoch {state['epoch']}, step {state['step']}")

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))

    def checkpoint() -> None:
        from engine.quant import qat_state

        extra = {**qat_extra, "qat": qat_state(model)} if args.qat else {}
        _save(ckpt_path, {
            **extra,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
            "config": cfg.to_dict(), "tokenizer": {"vocab": tok.vocab, "max_len": tok.max_len},
            "args": {k: str(v) for k, v in vars(args).items()},
        })  # fmt: skip

    started = time.monotonic()
    last_ckpt = started
    print(f"model: {param_count(model):,} parameters; {len(train_set)} scenes per epoch")
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(epoch))
        done_in_epoch = state["step"] - epoch * steps_per_epoch
        bar = tqdm(range(done_in_epoch, steps_per_epoch), desc=f"epoch {epoch}",
                   initial=done_in_epoch, total=steps_per_epoch)  # fmt: skip
        model.train()
        for b in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"])
            batch = order[b * args.batch : (b + 1) * args.batch]
            loss, logits, answers, parsed = objective(model, train_set, batch, args.aux)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state["step"] += 1
            acc = float((logits.argmax(-1) == answers).float().mean())
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", relations=f"{parsed:.3f}")
            now = time.monotonic()
            if now - last_ckpt > args.checkpoint_minutes * 60:
                state["seconds"] += now - last_ckpt
                last_ckpt = now
                checkpoint()
            if args.max_minutes and now - started > args.max_minutes * 60:
                state["seconds"] += now - last_ckpt
                recalibrate(model, train_set)
                checkpoint()
                print(f"stopped after {args.max_minutes:g} minutes; run again to resume")
                return state
        recalibrate(model, train_set)
        valid = accuracy(model, valid_set)
        state["epoch"] += 1
        state["history"].append({"epoch": epoch, "step": state["step"], **valid})
        now = time.monotonic()
        state["seconds"] += now - last_ckpt
        last_ckpt = now
        checkpoint()
        print(f"epoch {epoch}: valid accuracy {valid['all']:.4f} (non-relational "
              f"{valid['non_relational']:.4f}, relational {valid['relational']:.4f})")  # fmt: skip
    return state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "vqa")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="scenes per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="steps")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--fuser-layers", type=int, default=3)
    parser.add_argument("--image-layers", type=int, default=2)
    parser.add_argument("--gated", action="store_true", help="Flamingo-style tanh gates")
    parser.add_argument(
        "--aux",
        type=float,
        default=1.0,
        help="weight of the scene-parsing objective on the image tokens (0: off)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--max-minutes", type=float, default=0.0)
    parser.add_argument("--restart", action="store_true")
    parser.add_argument(
        "--qat",
        action="store_true",
        help="INT8 quantization-aware fine-tuning of ckpt/last.pt into ckpt/qat.pt",
    )
    parser.add_argument("--seed", type=int, default=0)
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
