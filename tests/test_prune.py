"""Structured channel pruning (engine.prune): pruning nothing changes nothing,
dropping a dead channel changes nothing, shapes shrink as asked, the pruned
model exports and runs, and bad pairs are clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import InferenceEngine, convert
from engine.prune import channel_importance, hidden_size, prune_pairs


class Ffn(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)
        self.conv1, self.conv2 = nn.Conv1d(8, 16, 3, padding=1), nn.Conv1d(16, 8, 1)

    def forward(self, x):  # x [B, T, 8]
        y = x + self.down(self.act(self.up(x)))
        return y + self.conv2(torch.relu(self.conv1(y.transpose(1, 2)))).transpose(1, 2)


PAIRS = [("up", "down"), ("conv1", "conv2")]


def _x(seed=0):
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed))


def test_pruning_nothing_is_the_identity():
    torch.manual_seed(0)
    model = Ffn().eval()
    pruned, report = prune_pairs(model, PAIRS, 0.0)
    torch.testing.assert_close(pruned(_x()), model(_x()))
    assert report["pairs"]["up -> down"] == [32, 32]


def test_dead_channels_go_first_and_change_nothing():
    torch.manual_seed(0)
    model = Ffn().eval()
    with torch.no_grad():
        model.down.weight[:, 5] = 0.0  # channel 5 contributes nothing
    assert channel_importance(model.up, model.down).argmin() == 5
    pruned, _ = prune_pairs(model, [("up", "down")], 1 / 32)
    assert pruned.up.out_features == 31 and pruned.down.in_features == 31
    torch.testing.assert_close(pruned(_x()), model(_x()))


@pytest.mark.parametrize("criterion", ["l2", "activation"])
def test_shapes_shrink_and_the_pruned_model_exports(tmp_path, criterion):
    torch.manual_seed(0)
    model = Ffn().eval()
    batches = [(_x(i),) for i in range(3)]
    pruned, report = prune_pairs(model, PAIRS, 0.5, criterion, batches)
    assert pruned.up.weight.shape == (16, 8) and pruned.down.weight.shape == (8, 16)
    assert pruned.conv1.out_channels == 8 and pruned.conv2.weight.shape == (8, 8, 1)
    assert report["parameters"][1] < report["parameters"][0]
    path = convert(pruned, (_x(),), output=tmp_path / "pruned.ds")
    got = InferenceEngine(path).infer([_x()])["output_0"]
    torch.testing.assert_close(torch.from_numpy(got), pruned(_x()).detach(), atol=1e-5, rtol=1e-5)
    assert hidden_size(0.3, 10) == 7


def test_bad_pairs_are_clear_errors():
    model = Ffn()
    with pytest.raises(ValueError, match="adjacent"):
        prune_pairs(model, [("up", "conv2")], 0.5)
    with pytest.raises(ValueError, match="no such layers"):
        prune_pairs(model, [("up", "nope")], 0.5)
    with pytest.raises(TypeError, match="only Linear"):
        prune_pairs(model, [("act", "down")], 0.5)
    with pytest.raises(ValueError, match="amount"):
        prune_pairs(model, PAIRS, 1.0)
    with pytest.raises(ValueError, match="calibration batches"):
        prune_pairs(model, PAIRS, 0.5, "activation")
