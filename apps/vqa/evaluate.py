"""Recipe step 3: accuracy on the held-out test scenes, per question type.

    python -m apps.vqa.evaluate [--data cache/vqa] [--checkpoint PATH]

Non-relational and relational accuracy are reported separately, as in the
Sort-of-CLEVR paper; writes ``<data>/eval.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apps.vqa.train import accuracy, load_checkpoint, load_split

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "vqa")
    parser.add_argument("--checkpoint", type=Path, help="default: <data>/ckpt/last.pt")
    args = parser.parse_args(argv)
    model, tok, ckpt = load_checkpoint(args.checkpoint or args.data / "ckpt" / "last.pt")
    test = load_split(args.data / "test.npz", tok)
    scores = {k: round(v, 4) for k, v in accuracy(model, test).items()}
    result = {
        "test_scenes": len(test),
        "test_questions": int(test.answers.numel()),
        "accuracy": scores,
        "epochs": ckpt["state"]["epoch"],
        "training_seconds": round(ckpt["state"].get("seconds", 0.0)),
    }
    (args.data / "eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
