"""Recipe step 1: generate Sort-of-CLEVR splits (seeded) into cache/vqa/.

    python -m apps.vqa.prepare [--train 10000] [--valid 500] [--test 2000] [--size 75]

Each split is an ``.npz`` with ``images`` uint8 ``[N, S, S, 3]`` and, per
question, its text, type, answer id and image index; plus ``tokenizer.json``
(the word vocabulary of every template paraphrase).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from apps.vqa.scenes import ANSWERS, all_template_texts, make_scene, questions, render
from dsstream.tokenizer import WordTokenizer

ROOT = Path(__file__).resolve().parents[2]
SEEDS = {"train": 1, "valid": 2, "test": 3}

__all__ = ["make_split", "tokenizer", "main"]


def tokenizer() -> WordTokenizer:
    """The question vocabulary: every word of every paraphrase."""
    return WordTokenizer.build(all_template_texts(), max_len=16)


def make_split(count: int, seed: int, size: int = 75, per_type: int = 3) -> dict[str, np.ndarray]:
    rng = random.Random(seed)
    images = np.zeros((count, size, size, 3), np.uint8)
    texts, kinds, answers, index = [], [], [], []
    for i in tqdm(range(count), desc=f"scenes (seed {seed})", leave=False):
        scene = make_scene(rng, size)
        images[i] = np.asarray(render(scene))
        for qa in questions(scene, rng, per_type):
            texts.append(qa.text)
            kinds.append(qa.kind)
            answers.append(ANSWERS.index(qa.answer))
            index.append(i)
    return {
        "images": images,
        "texts": np.array(texts),
        "kinds": np.array(kinds),
        "answers": np.array(answers, np.int64),
        "image_index": np.array(index, np.int64),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "cache" / "vqa")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--size", type=int, default=75, help="image side in pixels")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        data = make_split(getattr(args, split), SEEDS[split], args.size)
        np.savez_compressed(args.out / f"{split}.npz", **data)
        print(f"{split}: {len(data['images'])} scenes, {len(data['texts'])} questions")
    tok = tokenizer()
    (args.out / "tokenizer.json").write_text(
        json.dumps({"vocab": tok.vocab, "max_len": tok.max_len})
    )
    return args.out


if __name__ == "__main__":
    main()
