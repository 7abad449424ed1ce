"""Recipe step 2: train the punctuation model on the prepared text.

    python -m apps.punct.train [--data cache/punct] [--epochs 4] [--threads 1]

Each epoch cuts the training documents into finals afresh (a new seed:
:func:`apps.punct.finals.finals`) and trains on every final after its
context words (one in ten with less context, as at a stream's start);
the loss is cross-entropy of the final's marks and cases.  After each epoch
the dev documents are scored; the best epoch is kept in ``ckpt/best.pt``.
A checkpoint (``ckpt/last.pt``, atomic) each epoch; a run resumes from it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from apps.punct.evaluate import score_documents
from apps.punct.finals import FinalsConfig, Labeller, finals
from apps.punct.model import PunctConfig, PunctModel
from apps.punct.prepare import read_split
from dsstream.punctuation import MARKS, PunctVocab, label_windows

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["build_vocab", "samples", "batches", "torch_labeller", "load_checkpoint", "main"]


def build_vocab(docs: Sequence[dict[str, Any]], size: int, min_count: int = 2) -> PunctVocab:
    """The ``size - 2`` most frequent training words seen ``min_count`` times."""
    counts = Counter(w for d in docs for w in d["words"])
    words = [w for w, n in counts.most_common(size - 2) if n >= min_count]
    return PunctVocab(tuple(words))


def samples(
    docs: Sequence[dict[str, Any]], vocab: PunctVocab, cfg: PunctConfig, rng: random.Random,
    finals_cfg: FinalsConfig | None = None,
) -> list[tuple[list[int], list[int], list[int], int]]:  # fmt: skip
    """(token ids, marks, cases, context length) of every final of the documents.

    ``finals_cfg`` None: each stretch of 1,000 words is cut with its own
    pause habits, a final ending at 30% to 90% of sentence ends and 10% to
    40% of commas, so the model learns sentence ends inside a final from the
    words alone (cut always at 75% of them, it learned to write periods only
    at a final's end)."""
    out = []
    for doc in docs:
        ids = vocab.ids(doc["words"])
        spans = []
        for b in range(0, len(ids), 1000):
            cut = finals_cfg or replace(
                FinalsConfig(), at_sentence=rng.uniform(0.3, 0.9), at_comma=rng.uniform(0.1, 0.4)
            )
            spans += [(b + s, b + e) for s, e in finals(doc["marks"][b : b + 1000], rng, cut)]
        for s, e in spans:
            e = min(e, s + cfg.max_len - cfg.context)
            ctx = cfg.context if rng.random() > 0.1 else rng.randint(0, cfg.context)
            c0 = max(0, s - ctx)
            out.append((ids[c0:e], doc["marks"][s:e], doc["cases"][s:e], s - c0))
    return out


def _tensors(items: Sequence[tuple[list[int], list[int], list[int], int]]):
    t = max(len(i[0]) for i in items)
    tokens = torch.zeros(len(items), t, dtype=torch.long)
    segment = torch.zeros(len(items), t, dtype=torch.long)
    marks = torch.full((len(items), t), -100, dtype=torch.long)
    cases = torch.full((len(items), t), -100, dtype=torch.long)
    for row, (ids, m, c, k) in enumerate(items):
        tokens[row, : len(ids)] = torch.tensor(ids)
        segment[row, k : len(ids)] = 1
        segment[row, len(ids) - 1] = 2  # the final's last word: a pause follows
        marks[row, k : len(ids)] = torch.tensor(m)
        cases[row, k : len(ids)] = torch.tensor(c)
    return tokens, segment, marks, cases


def batches(items: list, size: int, rng: random.Random) -> list[list]:
    """Shuffled batches of similar lengths (sorted within pools of 50 batches)."""
    rng.shuffle(items)
    pool = size * 50
    out = []
    for i in range(0, len(items), pool):
        chunk = sorted(items[i : i + pool], key=lambda x: len(x[0]))
        out += [chunk[j : j + size] for j in range(0, len(chunk), size)]
    rng.shuffle(out)
    return out


def torch_labeller(
    model: PunctModel, vocab: PunctVocab, batch: int = 128, none_scale: float = 1.0
) -> Labeller:
    """Finals labelled by the torch model, many per forward pass (the
    no-mark probability scaled by ``none_scale``, as the artifact's manifest says)."""
    scale = torch.tensor([none_scale] + [1.0] * (len(MARKS) - 1))

    cfg = model.cfg

    def run(tokens, segment):  # one window, as the artifact runs it
        m, c = model(torch.from_numpy(tokens), torch.from_numpy(segment))
        return (m.softmax(-1) * scale)[0].numpy(), c[0].numpy()

    def label(pieces):
        model.eval()
        items = [(vocab.ids([*ctx[-cfg.context :], *words]), [0] * len(words),
                  [0] * len(words), len(ctx[-cfg.context :])) for ctx, words in pieces]  # fmt: skip
        out: list = [None] * len(items)
        short = [i for i, item in enumerate(items) if len(item[0]) <= cfg.max_len]
        with torch.no_grad():
            for i in range(0, len(short), batch):
                part = [items[j] for j in short[i : i + batch]]
                tokens, segment, _, _ = _tensors(part)
                m, c = model(tokens, segment)
                m, c = (m.softmax(-1) * scale).argmax(-1), c.argmax(-1)
                for row, (ids, _, _, k) in enumerate(part):
                    out[short[i + row]] = (m[row, k : len(ids)].tolist(),
                                           c[row, k : len(ids)].tolist())  # fmt: skip
            for j, item in enumerate(items):  # longer than a window: windowed
                if out[j] is None:
                    ctx, words = pieces[j]
                    out[j] = label_windows(run, vocab, ctx, words, cfg.max_len, cfg.context)
        return out

    return label


def save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[PunctModel, PunctVocab, dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = PunctConfig(**state["config"])
    model = PunctModel(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), PunctVocab(tuple(state["vocab"])), state


def dev_scores(model: PunctModel, vocab: PunctVocab, dev: list, max_words: int) -> dict[str, Any]:
    label = torch_labeller(model, vocab)
    return score_documents(dev, label, model.cfg.context, max_words=max_words)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ckpt = args.data / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    train_docs, dev = read_split(args.data, "train"), read_split(args.data, "dev")
    last = ckpt / "last.pt"
    if last.is_file() and not args.restart:
        model, vocab, state = load_checkpoint(last)
        model.train()
        print(f"resumed after epoch {state['epoch']}")
    else:
        vocab = build_vocab(train_docs, args.vocab)
        cfg = replace(PunctConfig(), vocab=len(vocab), d_model=args.d_model, layers=args.layers)
        model = PunctModel(cfg)
        state = {"epoch": 0, "step": 0, "history": [], "best": -1.0, "seconds": 0.0}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    from tqdm import tqdm

    total = args.epochs * args.steps_hint
    while state["epoch"] < args.epochs:
        rng = random.Random(args.seed + state["epoch"])
        plan = batches(samples(train_docs, vocab, model.cfg, rng), args.batch, rng)
        model.train()
        t0 = time.time()
        for items in tqdm(plan, desc=f"epoch {state['epoch']}", mininterval=30):
            lr = (
                args.lr
                * min(1.0, (state["step"] + 1) / 300)
                * max(0.05, 1 - state["step"] / max(total, state["step"] + 1))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            tokens, segment, marks, cases = _tensors(items)
            m, c = model(tokens, segment)
            loss = F.cross_entropy(m.flatten(0, 1), marks.flatten()) + F.cross_entropy(
                c.flatten(0, 1), cases.flatten()
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state["step"] += 1
        state["seconds"] += time.time() - t0
        dev_result = dev_scores(model, vocab, dev, args.dev_words)
        marks_f1, caps_f1 = dev_result["all marks"]["f1"], dev_result["capitals"]["f1"]
        print(f"epoch {state['epoch']}: dev marks F1 {marks_f1:.4f}, capitals F1 {caps_f1:.4f}")
        state["history"].append({"epoch": state["epoch"], "step": state["step"],
                                 "dev": dev_result, "minutes": state["seconds"] / 60})  # fmt: skip
        state["epoch"] += 1
        full = {**state, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "config": model.cfg.to_dict(), "vocab": list(vocab.words)}  # fmt: skip
        if marks_f1 + caps_f1 > state["best"]:
            state["best"] = full["best"] = marks_f1 + caps_f1
            save(ckpt / "best.pt", full)
        save(last, full)
    (args.data / "train.json").write_text(
        json.dumps({k: v for k, v in state.items() if k != "optimizer"}, indent=1, default=str)
    )
    return state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "punct")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int, default=16002)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dev-words", type=int, default=20000, help="words scored per dev document"
    )
    parser.add_argument(
        "--steps-hint", type=int, default=1500, help="steps per epoch, for the LR decay"
    )
    parser.add_argument("--restart", action="store_true")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
