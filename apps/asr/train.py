"""Recipe step 2: train the streaming CTC model on the prepared speech.

    python -m apps.asr.train [--data cache/asr] [--epochs 30] [--max-minutes 0]

Progress bar with loss and validation CER (greedy); a checkpoint every
``--checkpoint-minutes`` and at the end of each epoch (atomic replace), and a
run resumes from it after an interruption; seeds make runs repeatable.

``--qat`` fine-tunes the trained model (``ckpt/last.pt``) with INT8 fake
quantization (engine.quant: calibrated activation ranges, per-channel weights,
straight-through gradients) into ``ckpt/qat.pt``, e.g.
``python -m apps.asr.train --qat --epochs 1 --lr 1e-4 --warmup 50``; then
``python -m apps.asr.quantize --qat --out samples/asr/model-int8.ds``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from apps.asr.augment import AugmentConfig, augment_wave, spec_augment, vtlp
from apps.asr.model import AsrModel, ModelConfig, grow_depth
from dsstream.decoding import ENGLISH_CHARS
from dsstream.frontend import FbankConfig
from dsstream.frontend_torch import Fbank

ROOT = Path(__file__).resolve().parents[2]
INDEX = {t: i for i, t in enumerate(ENGLISH_CHARS.tokens)}
PRESETS = {
    "tiny": ModelConfig(d_model=32, layers=2, heads=2, conv_kernel=5, sub_channels=8),
    "small": ModelConfig(d_model=144, layers=6),
    "medium": ModelConfig(d_model=192, layers=10, sub_channels=96),
}


# Command-line flags that give an augmentation's probability per utterance.
_AUGMENT_PROBABILITIES = ("vtlp", "eq")


def encode(text: str) -> list[int]:
    """Characters to token ids; spaces are the word delimiter."""
    return [INDEX["|" if ch == " " else ch] for ch in text if ch == " " or ch in INDEX]


def decode_greedy(logp: torch.Tensor) -> str:
    best = logp.argmax(-1).tolist()
    out, prev = [], -1
    for tok in best:
        if tok != prev and tok != 0:
            out.append(" " if ENGLISH_CHARS.tokens[tok] == "|" else ENGLISH_CHARS.tokens[tok])
        prev = tok
    return " ".join("".join(out).split())


def read_manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_wave(path: str) -> np.ndarray:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == 16000, f"{path}: expected 16 kHz, got {rate}"
    return data.mean(axis=1)


def feature_stats(rows: list[dict[str, Any]], fbank: Fbank, count: int = 300) -> FbankConfig:
    """Global per-mel mean and std over a sample of training utterances."""
    feats = []
    for row in rows[:count]:
        with torch.no_grad():
            feats.append(fbank(torch.from_numpy(load_wave(row["path"]))[None])[0])
    allf = torch.cat(feats)
    return replace(fbank.config, mean=tuple(allf.mean(0).tolist()),
                   std=tuple(allf.std(0).clamp_min(1e-3).tolist()))  # fmt: skip


class SpeechSet(torch.utils.data.Dataset):
    def __init__(self, rows, fbank_cfg: FbankConfig, augment: AugmentConfig | None, seed: int):
        self.rows, self.fbank_cfg, self.augment, self.seed = rows, fbank_cfg, augment, seed
        self.epoch = 0
        self._fbank: Fbank | None = None
        self._babble: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self._fbank is None:  # built in the worker process
            self._fbank = Fbank(self.fbank_cfg)
        copy, i = divmod(i, len(self.rows))  # see epoch_indices
        row = self.rows[i]
        wave = load_wave(row["path"])
        # Copy 0 keeps the stream it always had; further copies get their own.
        rng = np.random.default_rng([self.seed, self.epoch, i, copy][: 4 if copy else 3])
        if self.augment is not None:
            if len(self._babble) < 8:
                self._babble.append(wave)
            wave = augment_wave(wave, rng, self.augment, self._babble)
        with torch.no_grad():
            feats = self._fbank(torch.from_numpy(wave)[None])[0]
        if self.augment is not None:
            # Drawn only when enabled, so runs without it keep their random streams.
            if self.augment.vtlp_prob and rng.random() < self.augment.vtlp_prob:
                feats = vtlp(feats, rng.uniform(*self.augment.vtlp_range), self.fbank_cfg)
            feats = spec_augment(feats, rng, self.augment)
        return feats, torch.tensor(encode(row["text"]), dtype=torch.long), row["text"]


def collate(items):
    feats, labels, texts = zip(*items)
    lengths = torch.tensor([f.shape[0] for f in feats])
    t = int(math.ceil(lengths.max().item() / 4) * 4)
    batch = torch.zeros(len(feats), t, feats[0].shape[1])
    for i, f in enumerate(feats):
        batch[i, : f.shape[0]] = f
    return batch, lengths, torch.cat(labels), torch.tensor([len(x) for x in labels]), list(texts)


def row_weight(row: dict[str, Any], weights: tuple[float, ...], real_weight: float) -> float:
    """How many times per epoch ``row`` comes: ``real_weight`` for real speech
    (rows with a ``corpus``, from apps.asr.corpora), else its voice release's
    entry of ``weights`` (1 past the end)."""
    if "corpus" in row:
        return real_weight
    release = int(row.get("release", 1))
    return weights[release - 1] if release <= len(weights) else 1.0


def epoch_indices(
    rows: list[dict[str, Any]],
    weights: tuple[float, ...],
    seed: int,
    epoch: int,
    real_weight: float = 1.0,
) -> list[int]:
    """The utterances one epoch trains on, each release (and real speech) weighted.

    ``weights[r - 1]`` is how many times release ``r``'s utterances come per
    epoch (releases past the end of ``weights`` count once), ``real_weight``
    how many times each real utterance comes: the whole part
    of a weight repeats every utterance, the fraction draws a seeded share
    that changes from epoch to epoch.  Index ``i + k * len(rows)`` is copy
    ``k`` of row ``i`` (``SpeechSet`` augments each copy differently)."""
    rng = random.Random(seed * 1000 + epoch + 1)
    out: list[int] = []
    for i, row in enumerate(rows):
        weight = row_weight(row, weights, real_weight)
        copies = int(weight) + (rng.random() < weight - int(weight))
        out.extend(i + k * len(rows) for k in range(copies))
    return out


def length_batches(
    rows, max_frames: int, seed: int, epoch: int, indices: list[int] | None = None
) -> list[list[int]]:
    """Batches of similar duration under a frame budget, in a seeded order; over
    ``indices`` (from ``epoch_indices``) when given, else every row once."""
    n = len(rows)
    order = sorted(range(n) if indices is None else indices, key=lambda i: rows[i % n]["duration"])
    batches, current, longest = [], [], 0.0
    for i in order:
        d = rows[i % n]["duration"] * 100
        if current and max(longest, d) * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest = [], 0.0
        current.append(i)
        longest = max(longest, d)
    if current:
        batches.append(current)
    random.Random(seed * 1000 + epoch).shuffle(batches)
    return batches


def spread(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` rows taken evenly across ``rows`` (every corpus and
    speaker of a manifest in file order, not just the first)."""
    if len(rows) <= limit:
        return list(rows)
    return [rows[i * len(rows) // limit] for i in range(limit)]


def evaluate(model: AsrModel, rows, fbank_cfg: FbankConfig, limit: int = 200) -> float:
    from dsstream.evaluation import cer

    model.eval()
    data = SpeechSet(spread(rows, limit), fbank_cfg, None, 0)
    refs, hyps = [], []
    with torch.no_grad():
        for i in range(len(data)):
            feats, _, text = data[i]
            t = int(math.ceil(feats.shape[0] / 4) * 4)
            feats = torch.nn.functional.pad(feats, (0, 0, 0, t - feats.shape[0]))
            hyps.append(decode_greedy(model(feats[None])[0]))
            refs.append(text)
    model.train()
    return cer(refs, hyps)


def load_checkpoint(path: Path) -> tuple[AsrModel, FbankConfig, dict[str, Any]]:
    """The trained model (eval mode, no dropout), its frontend config and the raw checkpoint."""
    ckpt = torch.load(path, weights_only=False)
    model = AsrModel(ModelConfig(**{**ckpt["config"], "dropout": 0.0}))
    model.load_state_dict(ckpt["model"])
    fbank = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["fbank"].items()}
    return model.eval(), FbankConfig(**fbank), ckpt


def save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # an interruption never leaves half a checkpoint


def load_qat_checkpoint(path: Path) -> tuple[torch.nn.Module, FbankConfig, dict[str, Any]]:
    """A QAT checkpoint (``--qat``) as the prepared model with its fake quantizers."""
    from engine.quant import QuantConfig, load_qat_state, prepare

    saved = torch.load(path, weights_only=False)
    model = AsrModel(ModelConfig(**{**saved["config"], "dropout": 0.0}))
    qmodel = prepare(model, QuantConfig(**saved["quant_config"]))
    qmodel.load_state_dict(saved["model"])
    load_qat_state(qmodel, saved["qat"])
    fbank = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["fbank"].items()}
    return qmodel.eval(), FbankConfig(**fbank), saved


def _start_qat(args: argparse.Namespace, last: Path, rows: list[dict[str, Any]]):
    """The float model from ``last`` wrapped for QAT and calibrated on training batches."""
    from engine.quant import QuantConfig, calibrate, enable_fake, prepare

    if not last.is_file():
        raise SystemExit(f"--qat fine-tunes a trained model: {last} not found")
    saved = torch.load(last, weights_only=False)
    model = AsrModel(ModelConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    fbank_cfg = FbankConfig(**saved["fbank"])
    config = QuantConfig()
    qmodel = prepare(model, config)
    calib = SpeechSet(rows, fbank_cfg, None, args.seed)
    batches = length_batches(rows, args.batch_frames, args.seed, 0)[:16]
    loader = torch.utils.data.DataLoader(calib, batch_sampler=batches, collate_fn=collate)
    calibrate(qmodel, ((feats, lengths) for feats, lengths, *_ in loader))
    enable_fake(qmodel)
    return qmodel, fbank_cfg, config, saved["state"]["step"], ModelConfig(**saved["config"])


def lr_at(step: int, peak: float, warmup: int, anneal: dict[str, int] | None = None) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then inverse-square-root
    decay; with ``anneal`` ({"from_step", "steps"}) the rate falls linearly from
    its value at ``from_step`` to zero over ``steps`` steps."""

    def noam(s: int) -> float:
        return peak * min((s + 1) / warmup, math.sqrt(warmup / (s + 1)))

    if anneal is None or step < anneal["from_step"]:
        return noam(step)
    left = 1.0 - (step - anneal["from_step"]) / anneal["steps"]
    return noam(anneal["from_step"]) * max(left, 0.0)


def _plan_anneal(
    state: dict[str, Any], args: argparse.Namespace, batches: int, done_in_epoch: int
) -> None:
    """Start, keep or renew the annealing in ``state`` at the start of an epoch.

    It is fixed in the state when it starts, so a resumed run keeps the same
    schedule.  Training past its end would run at a rate of zero: that takes a
    new ``--anneal-epochs``, which anneals again from the inverse-square-root
    rate at that step (a warm restart)."""
    anneal = state.get("anneal")
    if anneal is not None and state["epoch"] >= anneal["to_epoch"]:
        if not args.anneal_epochs:
            raise SystemExit(
                f"the learning rate annealed to zero at epoch {anneal['to_epoch']}; "
                "to train further, anneal again: --anneal-epochs N"
            )
        state.setdefault("past_anneals", []).append(state.pop("anneal"))
    if args.anneal_epochs and state["epoch"] >= args.epochs - args.anneal_epochs:
        state.setdefault("anneal", {
            "from_step": state["step"] - done_in_epoch,
            "steps": batches * (args.epochs - state["epoch"]),
            "to_epoch": args.epochs,
        })  # fmt: skip


def _last_change(changes: list[dict[str, Any]], name: str, default: Any) -> Any:
    """The value ``name`` was last set to in the run's changes (``default`` if never)."""
    return next((c[name] for c in reversed(changes) if name in c), default)


def _release_weights(
    args: argparse.Namespace, state: dict[str, Any], rows: list[dict[str, Any]]
) -> tuple[float, ...]:
    """``--release-weights`` checked against the data and recorded in the run's
    changes when they differ from what the run trained with (empty: all 1)."""
    weights = tuple(args.release_weights or ())
    releases = max((int(r.get("release", 1)) for r in rows), default=1)
    if len(weights) > releases:
        raise SystemExit(
            f"--release-weights gives {len(weights)} weights; the training data has "
            f"releases 1 to {releases}"
        )
    if all(w == 1.0 for w in weights):
        weights = ()
    changes = state.setdefault("changes", [])
    if list(weights) != _last_change(changes, "release_weights", []):
        changes.append({"step": state["step"], "release_weights": list(weights)})
    return weights


def _note_data(state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Record in the run's state when the training set changes (e.g. a new voice
    release prepared mid-run), so the model card can say what each epoch saw."""
    seen = state.setdefault("data", [])
    if not seen or seen[-1]["utterances"] != len(rows):
        hours = round(sum(r["duration"] for r in rows) / 3600, 2)
        seen.append({"epoch": state["epoch"], "utterances": len(rows), "hours": hours})


def training_sets(
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(training rows, validation rows, validation manifest's name).

    Training: the synthesized speech of ``train.jsonl`` (if prepared) and the
    real speech of ``real_train.jsonl`` (apps.asr.corpora; unless
    ``--no-real``).  Each epoch is scored on the real dev speakers when there
    are any (what the model is for), else on the held-out voices."""
    rows: list[dict[str, Any]] = []
    for name in ("train.jsonl",) + (() if args.no_real else ("real_train.jsonl",)):
        if (args.data / name).is_file():
            rows += read_manifest(args.data / name)
    if not rows:
        raise SystemExit(f"no training data in {args.data}: run python -m apps.asr.prepare "
                         "and/or python -m apps.asr.corpora first")  # fmt: skip
    names = [n for n in ((args.valid,) if args.valid else ("real_dev.jsonl", "valid.jsonl"))
             if (args.data / n).is_file()]  # fmt: skip
    if not names:
        raise SystemExit(f"no validation manifest in {args.data} (real_dev.jsonl or valid.jsonl)")
    for name in names:  # the first with rows (a tiny prepare may hold out no voice's utterance)
        if valid := read_manifest(args.data / name):
            return rows, valid, name
    return rows, [], names[-1]


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_rows, valid_rows, valid_name = training_sets(args)
    ckpt_dir = args.data / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / args.ckpt_name
    cfg = PRESETS[args.size]
    model: torch.nn.Module = AsrModel(cfg)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    qat_extra: dict[str, Any] = {}
    qat_saved: dict[str, Any] | None = None  # a QAT checkpoint being resumed
    if args.qat:
        from engine.quant import qat_state

        qat_path = ckpt_dir / "qat.pt"
        if qat_path.is_file() and not args.restart:
            model, fbank_cfg, qat_saved = load_qat_checkpoint(qat_path)
            model.train()
            state, qat_extra = qat_saved["state"], {"quant_config": qat_saved["quant_config"]}
            cfg = ModelConfig(**qat_saved["config"])
            print(f"resumed QAT at epoch {state['epoch']}, step {state['step']}")
        else:
            model, fbank_cfg, quant_config, from_step, cfg = _start_qat(args, last, train_rows)
            qat_extra = {"quant_config": quant_config.to_dict()}
            state["qat_from_step"] = from_step
        last = qat_path
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    if args.qat:
        if qat_saved is not None:
            opt.load_state_dict(qat_saved["optimizer"])
    elif args.init and not (last.is_file() and not args.restart):
        # A new run whose weights and architecture come from another checkpoint
        # (e.g. a pruned model from apps.asr.prune, fine-tuned here).
        saved = torch.load(args.init, weights_only=False)
        cfg = ModelConfig(**saved["config"])
        model = AsrModel(cfg)
        model.load_state_dict(saved["model"])
        if args.grow_layers:
            model = grow_depth(model, args.grow_layers)
            cfg = model.cfg
            state["grown"] = {"from_layers": saved["config"]["layers"], "layers": cfg.layers}
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
        fbank_cfg = FbankConfig(**saved["fbank"])
        state["init"] = str(args.init)
    elif last.is_file() and not args.restart:
        saved = torch.load(last, weights_only=False)
        cfg = ModelConfig(**saved["config"])  # the run's own architecture (pruned runs differ)
        model = AsrModel(cfg)
        model.load_state_dict(saved["model"])
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
        if "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
        else:  # recovered from an artifact (apps.asr.recover): no optimizer moments
            print("no optimizer state in the checkpoint: starting a fresh optimizer")
        fbank_cfg = FbankConfig(**saved["fbank"])
        state = saved["state"]
        print(f"resumed at epoch {state['epoch']}, step {state['step']}")
    else:
        fbank_cfg = feature_stats(train_rows, Fbank(FbankConfig()))
    if args.dropout is not None and not args.qat and args.dropout != cfg.dropout:
        # An underfitting model learns faster without dropout (and dropout's
        # random masks took ~20% of a CPU training step).
        cfg = replace(cfg, dropout=args.dropout)
        for module in model.modules():  # in place: the optimizer holds these parameters
            if isinstance(module, torch.nn.Dropout):
                module.p = args.dropout
        state.setdefault("changes", []).append({"step": state["step"], "dropout": args.dropout})
    _note_data(state, train_rows)
    schedule = partial(lr_at, peak=args.lr, warmup=args.warmup)

    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    changes = state.setdefault("changes", [])  # what each step trained with, for the card
    for name in _AUGMENT_PROBABILITIES:  # a run starts with each at 0
        value = getattr(args, name)
        if value != _last_change(changes, name, 0.0):
            changes.append({"step": state["step"], name: value})
    weights = _release_weights(args, state, train_rows)
    if args.real_weight != _last_change(changes, "real_weight", 1.0):
        changes.append({"step": state["step"], "real_weight": args.real_weight})
    augment = None if args.no_augment else AugmentConfig(vtlp_prob=args.vtlp, eq_prob=args.eq)
    data = SpeechSet(train_rows, fbank_cfg, augment, args.seed)
    started = time.monotonic()
    last_save = tick = started
    from tqdm import tqdm

    def checkpoint() -> None:
        extra = {**qat_extra, "qat": qat_state(model)} if args.qat else {}
        save(last, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "fbank": asdict(fbank_cfg), "config": cfg.to_dict(), "state": state, **extra,
        })  # fmt: skip

    while state["epoch"] < args.epochs:
        data.epoch = state["epoch"]
        indices = None
        if weights or args.real_weight != 1.0:
            indices = epoch_indices(
                train_rows, weights, args.seed, state["epoch"], args.real_weight
            )
        batches = length_batches(train_rows, args.batch_frames, args.seed, state["epoch"], indices)
        done_in_epoch = state.get("batch_in_epoch", 0)
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=batches[done_in_epoch:], collate_fn=collate,
            num_workers=args.workers, persistent_workers=False,
        )  # fmt: skip
        _plan_anneal(state, args, len(batches), done_in_epoch)
        bar = tqdm(loader, total=len(batches) - done_in_epoch, desc=f"epoch {state['epoch']}")
        for feats, lengths, labels, label_lengths, _ in bar:
            for group in opt.param_groups:
                group["lr"] = schedule(state["step"], anneal=state.get("anneal"))
            logp = model(feats, lengths)
            loss = ctc(logp.transpose(0, 1), labels, lengths // 4, label_lengths)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            state["step"] += 1
            state["batch_in_epoch"] = state.get("batch_in_epoch", 0) + 1
            bar.set_postfix(loss=f"{loss.item():.3f}", cer=state.get("cer", "-"))
            now = time.monotonic()
            # Wall time of the run across resumes, for the model card's training time.
            state["seconds"] = round(state.get("seconds", 0.0) + now - tick, 1)
            tick = now
            if now - last_save > args.checkpoint_minutes * 60:
                checkpoint()
                last_save = now
            if args.max_minutes and now - started > args.max_minutes * 60:
                checkpoint()
                print(
                    f"stopped after {args.max_minutes} min at step {state['step']}; rerun to resume"
                )
                return state
        state["cer"] = round(evaluate(model, valid_rows, fbank_cfg), 4)
        state["seconds"] = round(state.get("seconds", 0.0) + time.monotonic() - tick, 1)
        state["history"].append({
            "epoch": state["epoch"], "step": state["step"],
            "valid_cer": state["cer"], "loss": round(loss.item(), 4), "valid": valid_name,
        })  # fmt: skip
        print(f"epoch {state['epoch']}: validation CER {state['cer']:.2%}")
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        checkpoint()
        last_save = tick = time.monotonic()
    return state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr")
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=1000, help="steps")
    parser.add_argument("--batch-frames", type=int, default=12000, help="10 ms frames per batch")
    parser.add_argument("--workers", type=int, default=1, help="data loading processes")
    parser.add_argument("--threads", type=int, default=2, help="torch compute threads")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after")
    parser.add_argument(
        "--anneal-epochs", type=int, default=0,
        help="the last N epochs take the learning rate linearly to zero",
    )  # fmt: skip
    parser.add_argument("--dropout", type=float, help="change the run's dropout (default: keep it)")
    parser.add_argument(
        "--vtlp", type=float, default=0.0,
        help="probability of vocal tract length perturbation per utterance",
    )  # fmt: skip
    parser.add_argument(
        "--eq", type=float, default=0.5,
        help="probability of a random microphone/channel response per utterance"
        " (measured to help real speech: docs/asr.md)",
    )  # fmt: skip
    parser.add_argument(
        "--release-weights", type=float, nargs="+", metavar="W",
        help="times per epoch each voice release's utterances come (release 1 first; "
        "later releases 1); e.g. 0.5 1.5 halves release 1 and adds half of release 2 again",
    )  # fmt: skip
    parser.add_argument(
        "--real-weight", type=float, default=1.0, metavar="W",
        help="times per epoch each real utterance (apps.asr.corpora) comes",
    )  # fmt: skip
    parser.add_argument("--no-real", action="store_true", help="synthesized speech only")
    parser.add_argument("--valid", help="validation manifest in --data (default: "
                        "real_dev.jsonl if prepared, else valid.jsonl)")  # fmt: skip
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-name", default="last.pt", help="checkpoint file in <data>/ckpt")
    parser.add_argument("--init", type=Path, help="start a new run from this checkpoint's model")
    parser.add_argument(
        "--grow-layers", type=int, metavar="N",
        help="with --init: deepen the model to N blocks, the new ones inserted as identities"
        " (apps.asr.model.grow_depth), so the run starts from the init model's scores",
    )  # fmt: skip
    parser.add_argument(
        "--qat",
        action="store_true",
        help="INT8 quantization-aware fine-tuning of ckpt/last.pt into ckpt/qat.pt",
    )
    args = parser.parse_args(argv)
    if args.release_weights and (min(args.release_weights) < 0 or not any(args.release_weights)):
        parser.error(f"--release-weights must be >= 0, not all 0: got {args.release_weights}")
    if args.grow_layers is not None and not args.init:
        parser.error("--grow-layers deepens the --init model: give --init")
    if args.real_weight < 0:
        parser.error(f"--real-weight must be >= 0: got {args.real_weight}")
    for name in _AUGMENT_PROBABILITIES:
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(
                f"--{name} is a probability per utterance, 0 to 1: got {getattr(args, name)}"
            )
    return train(args)


if __name__ == "__main__":
    main()
