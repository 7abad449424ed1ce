"""A training checkpoint from a streaming ``.ds`` artifact, to fine-tune the shipped model.

    python -m apps.asr.recover [samples/asr/model.ds] [--out cache/asr/ckpt/last.pt]

The sample model ships as an artifact, not as the recipe's checkpoint, so a
user who wants to train it further on their own speech (or a session whose
cache is gone) starts from the artifact.  Its program holds the weights after
the engine's graph passes: each LayerNorm's scale and shift were folded into
the Linear after it and then dropped.  The recovered model has those
LayerNorms at scale 1 and shift 0 with the folded Linear weights: the same
function, checked against the artifact's own program before it is written.
The training record comes from the manifest (the whole run state where the
artifact has it, else the per-epoch history); an artifact has no optimizer
moments, so training from it starts a fresh optimizer.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch

from apps.asr.model import AsrModel, ModelConfig, StreamingStep

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["checkpoint_from_artifact", "main"]

# The recovered model must match the artifact's program this closely (float32
# log-probs of a random chunk; folding rounds in float32, ~1e-6).
_MAX_ABS_ERROR = 1e-3


def _program_weights(path: Path) -> tuple[dict[str, Any], torch.export.ExportedProgram]:
    from engine.artifact import ArtifactError, read_manifest, read_member

    manifest, checksums = read_manifest(path)
    extra = manifest.extra
    if extra.get("task") != "asr" or "model" not in extra or "state" not in extra:
        raise ArtifactError(
            f"{path} is not a streaming ASR artifact of this recipe "
            "(its manifest needs task 'asr', the model config and the streaming state)"
        )
    if manifest.precision != "fp32" or "quantization" in extra:
        raise ArtifactError(
            f"{path} holds quantized weights; recover from the float32 artifact "
            "(model.ds): the float weights are what training goes on from"
        )
    program = read_member(path, "torch/program.pt2", checksums)
    return extra, torch.export.load(io.BytesIO(program))


def _recovered_state_dict(model: AsrModel, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The program's weights under the model's names; folded LayerNorms get scale 1, shift 0."""
    names = {k.removeprefix("model."): v for k, v in weights.items()}
    norms = {
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
        for p in ("weight", "bias")
    }  # fmt: skip
    unknown = sorted(set(names) - set(model.state_dict()))
    missing = sorted(set(model.state_dict()) - set(names) - norms)
    if unknown or missing:
        raise ValueError(
            f"the artifact's weights do not fit the model config: unknown {unknown[:5]}, "
            f"missing {missing[:5]}"
        )
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if key in names:
            out[key] = names[key].detach().clone()
        else:  # a LayerNorm whose affine was folded away
            out[key] = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
    return out


def _check_same_function(model: AsrModel, program: torch.export.ExportedProgram) -> float:
    step = StreamingStep(model.eval())
    torch.manual_seed(0)
    feats = torch.randn(2, 4 * model.cfg.chunk, model.cfg.n_mels)
    state = step.initial_state(2)
    with torch.no_grad():
        ours = step(feats, *state)[0]
        theirs = program.module()(feats, *state)[0]
    err = float((ours - theirs).abs().max())
    if not err <= _MAX_ABS_ERROR:
        raise ValueError(f"the recovered model differs from the artifact's program by {err:.2e}")
    return err


def checkpoint_from_artifact(path: Path) -> dict[str, Any]:
    """A checkpoint dict (``model``, ``config``, ``fbank``, ``state``; no ``optimizer``)
    that ``apps.asr.train`` resumes and the other recipe steps load."""
    extra, program = _program_weights(Path(path))
    cfg = ModelConfig(**{**extra["model"], "dropout": 0.0})
    model = AsrModel(cfg)
    model.load_state_dict(_recovered_state_dict(model, program.state_dict))
    err = _check_same_function(model, program)
    print(f"{path}: the recovered model matches its program to {err:.1e}")
    history = extra.get("training", [])
    state = dict(extra.get("training_state") or {})
    if not state:  # artifacts written before the whole run state was kept
        last = history[-1] if history else {"epoch": -1, "step": 0}
        state = {"epoch": last["epoch"] + 1, "step": last["step"], "history": history}
    # In the run's changes, so the card says where the optimizer started afresh.
    state["changes"] = [
        *state.get("changes", []),
        {"step": state["step"], "recovered": Path(path).name},
    ]
    return {
        "model": model.state_dict(),
        "config": extra["model"],
        "fbank": extra["frontend"],
        "state": state,
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, nargs="?", default=ROOT / "samples/asr/model.ds")
    parser.add_argument("--out", type=Path, default=ROOT / "cache/asr/ckpt/last.pt")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists (a run's checkpoint): pass --force to replace it")
    ckpt = checkpoint_from_artifact(args.artifact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from apps.asr.train import save

    save(args.out, ckpt)
    state = ckpt["state"]
    print(f"wrote {args.out}: epoch {state['epoch']}, step {state['step']}")
    return args.out


if __name__ == "__main__":
    main()
