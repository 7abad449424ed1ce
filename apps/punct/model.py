"""The punctuation model: words of a final after its context -> each word's mark and case.

Word + position + segment (context or final) embeddings, pre-norm
self-attention blocks (the VQA model's), two heads.  Sized for a CPU: a
final of 20 words after 32 words of context is one forward pass of about a
millisecond (docs/punctuation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from apps.vqa.model import Block
from dsstream.punctuation import CASES, MARKS

__all__ = ["PunctConfig", "PunctModel", "Probabilities"]


@dataclass(frozen=True)
class PunctConfig:
    vocab: int = 16002  # words + padding + unknown
    d_model: int = 128
    heads: int = 4
    layers: int = 3
    max_len: int = 96  # words per forward pass, context included
    context: int = 32  # words of the finals before that a final sees
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class PunctModel(nn.Module):
    def __init__(self, cfg: PunctConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.words = nn.Embedding(cfg.vocab, cfg.d_model, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        self.segment = nn.Embedding(3, cfg.d_model)  # context, final, final's last word
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.marks = nn.Linear(cfg.d_model, len(MARKS))
        self.cases = nn.Linear(cfg.d_model, len(CASES))

    def forward(
        self, tokens: torch.Tensor, segment: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens``, ``segment`` ``[B, T]`` int64 (padding 0; segment as
        :func:`dsstream.punctuation.encode` makes it) -> logits of the
        marks ``[B, T, 5]`` and cases ``[B, T, 3]``."""
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)
        x = self.words(tokens) + self.position(pos)[None] + self.segment(segment)
        x = self.drop(x)
        keep = (tokens != 0)[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        return self.marks(x), self.cases(x)


class Probabilities(nn.Module):
    """What the artifact computes: the labels' probabilities, one final per row."""

    def __init__(self, model: PunctModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, segment: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        marks, cases = self.model(tokens, segment)
        return marks.softmax(-1), cases.softmax(-1)
