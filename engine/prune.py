"""Structured channel pruning: remove whole hidden channels between two layers.

A *pair* is an expanding layer and the layer that reads its output, with only
channel-wise operations between them (an activation, dropout): a transformer
feed-forward block's ``Linear(d, h)`` and ``Linear(h, d)``, or a Conv's output
channels and the next Conv's input channels.  Pruning keeps the ``1 - amount``
most important hidden channels of each pair, so both layers shrink and the
model runs faster without sparse kernels.

Importance (per hidden channel ``c``): ``"l2"`` is ``||W_up[c]|| * ||W_down[:, c]||``
(the channel's weight in and out); ``"activation"`` adds the mean ``|output|``
of the channel over calibration batches.  Fine-tune after pruning to recover
accuracy (the sample recipes do: apps/*/prune.py).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = ["channel_importance", "prune_pair", "prune_pairs", "hidden_size"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _weight(layer: nn.Module) -> torch.Tensor:
    return layer.get_parameter("weight").detach()


def _out_rows(layer: nn.Module) -> torch.Tensor:
    w = _weight(layer)
    return w.reshape(w.shape[0], -1)  # [out, ...]


def _in_cols(layer: nn.Module) -> torch.Tensor:
    w = _weight(layer)
    return w.transpose(0, 1).reshape(w.shape[1], -1)  # [in, ...]


def _check_pair(up: nn.Module, down: nn.Module, names: tuple[str, str]) -> None:
    if not isinstance(up, _LAYERS) or not isinstance(down, _LAYERS):
        raise TypeError(f"pair {names}: only Linear, Conv1d and Conv2d can be pruned")
    if getattr(down, "groups", 1) != 1 or getattr(up, "groups", 1) != 1:
        raise ValueError(f"pair {names}: grouped convolutions are not supported")
    if up.weight.shape[0] != down.weight.shape[1]:
        raise ValueError(
            f"pair {names}: {names[0]} gives {up.weight.shape[0]} channels but {names[1]} "
            f"reads {down.weight.shape[1]}; a pair must be adjacent"
        )


def channel_importance(up: nn.Module, down: nn.Module) -> torch.Tensor:
    """``[hidden]``: weight norm into the channel times weight norm out of it."""
    return _out_rows(up).norm(dim=1) * _in_cols(down).norm(dim=1)


def hidden_size(amount: float, hidden: int) -> int:
    """Channels kept when pruning ``amount`` (0..1) of ``hidden``; at least one."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must lie in [0, 1), got {amount}")
    return max(1, round(hidden * (1.0 - amount)))


def prune_pair(up: nn.Module, down: nn.Module, keep: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """New ``up`` and ``down`` holding only the hidden channels ``keep`` (sorted ids)."""
    keep = keep.sort().values
    new_up, new_down = copy.deepcopy(up), copy.deepcopy(down)
    new_up.weight = nn.Parameter(_weight(up)[keep].clone())
    bias = getattr(up, "bias", None)
    if bias is not None:
        new_up.bias = nn.Parameter(bias.detach()[keep].clone())
    new_down.weight = nn.Parameter(_weight(down)[:, keep].clone())
    for layer, attr, n in ((new_up, "out", len(keep)), (new_down, "in", len(keep))):
        if isinstance(layer, nn.Linear):
            setattr(layer, f"{attr}_features", n)
        else:
            setattr(layer, f"{attr}_channels", n)
    return new_up, new_down


def _activation_scores(model: nn.Module, ups: list[nn.Module], batches) -> list[torch.Tensor]:
    sums: list[torch.Tensor | None] = [None] * len(ups)

    def hook(i):
        channel = -1 if isinstance(ups[i], nn.Linear) else 1  # where the hidden channels are

        def record(_module, _inputs, out):
            dims = [d for d in range(out.dim()) if d != channel % out.dim()]
            mean = out.detach().abs().mean(dim=dims)
            prev = sums[i]
            sums[i] = mean if prev is None else prev + mean

        return record

    handles = [u.register_forward_hook(hook(i)) for i, u in enumerate(ups)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        for h in handles:
            h.remove()
    if any(s is None for s in sums):
        raise ValueError("the calibration batches never reached every pruned layer")
    return [s for s in sums if s is not None]


def prune_pairs(
    model: nn.Module,
    pairs: Sequence[tuple[str, str]],
    amount: float,
    criterion: str = "l2",
    batches: Iterable[Sequence[Any]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` and a report (channels before and after per pair)."""
    if criterion not in ("l2", "activation"):
        raise ValueError(f"criterion must be 'l2' or 'activation', got {criterion!r}")
    if not pairs:
        raise ValueError("no layer pairs to prune")
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    missing = [n for pair in pairs for n in pair if n not in modules]
    if missing:
        raise ValueError(f"no such layers: {missing}")
    for names in pairs:
        _check_pair(modules[names[0]], modules[names[1]], names)
    scores = [channel_importance(modules[u], modules[d]) for u, d in pairs]
    if criterion == "activation":
        if batches is None:
            raise ValueError("the activation criterion needs calibration batches")
        acts = _activation_scores(out.eval(), [modules[u] for u, _ in pairs], batches)
        scores = [s * a for s, a in zip(scores, acts)]
    report: dict[str, Any] = {"amount": amount, "criterion": criterion, "pairs": {}}
    for (up_name, down_name), score in zip(pairs, scores):
        hidden = score.numel()
        keep = score.topk(hidden_size(amount, hidden)).indices
        up, down = prune_pair(modules[up_name], modules[down_name], keep)
        for name, layer in ((up_name, up), (down_name, down)):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, layer)
        report["pairs"][f"{up_name} -> {down_name}"] = [hidden, len(keep)]
    before = sum(p.numel() for p in model.parameters())
    report["parameters"] = [before, sum(p.numel() for p in out.parameters())]
    return out, report
