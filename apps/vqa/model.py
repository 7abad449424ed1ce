"""The VQA model: an image encoder, a question encoder and a cross-attention fuser.

Two stages, exported separately so an image is encoded once per image, not
once per question:

- :class:`ImageStage`: image ``[B, 3, S, S]`` -> a small CNN (stride 8) with
  learned 2-D (row + column) position embeddings and self-attention layers over
  the image tokens -> every fuser layer's cross-attention keys and values,
  ``kv [B, layers, 2, tokens, d]``.  This is what the pipeline caches per image.
- :class:`QuestionStage`: token ids ``[B, Q, L]`` and ``kv`` -> answer logits
  ``[B, Q, answers]``: word and position embeddings, self-attention, then fuser
  layers in which the question tokens attend to the image tokens (optionally
  with Flamingo's tanh gates), masked mean pooling and a linear head.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from apps.vqa.parse import CELL_OUTPUTS

__all__ = [
    "VqaConfig",
    "fold_batchnorm",
    "ImageStage",
    "QuestionStage",
    "VqaModel",
    "TRAINING_HEADS",
    "param_count",
]

#: Modules only training uses (never exported); quantization leaves them in float.
TRAINING_HEADS = ("cells",)


@dataclass(frozen=True)
class VqaConfig:
    image_size: int = 75
    d_model: int = 64
    heads: int = 4
    image_layers: int = 2  # self-attention layers over the image tokens
    question_layers: int = 1
    fuser_layers: int = 3
    vocab: int = 64
    max_len: int = 16
    answers: int = 12
    gated: bool = False  # Flamingo-style tanh-gated cross-attention
    strides: int = 3  # stride-2 convolutions: 75 px -> 10 x 10 image tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def stride(self) -> int:
        """Pixels between neighbouring image tokens."""
        return 2**self.strides

    @property
    def grid(self) -> int:
        """Image tokens per side (``strides`` stride-2 convolutions)."""
        side = self.image_size
        for _ in range(self.strides):
            side = (side + 1) // 2
        return side


class FeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, T, d] -> [B, h, T, d/h]
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, d/h] -> [B, T, d]
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep [B, 1, 1, T]`` bool: keys that may be attended to (None: all)."""
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.norm(x)).chunk(3, -1))
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=keep)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d, heads)
        self.ff = FeedForward(d)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(x, keep)
        return x + self.ff(x)


class ImageStage(nn.Module):
    """Image ``[B, 3, S, S]`` in [0, 1] -> cross-attention ``kv [B, layers, 2, grid^2, d]``."""

    def __init__(self, cfg: VqaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # BatchNorm learns these sparse scenes far faster than GroupNorm here (no
        # progress in 900 steps with GroupNorm); its running statistics lag behind
        # the weights, so training recomputes them exactly before evaluating and
        # exporting (apps.vqa.train.recalibrate), and the engine folds BN into the convs.
        layers: list[nn.Module] = []
        channels = 5  # RGB ink and two coordinate channels
        for i in range(cfg.strides):
            out = d if i == cfg.strides - 1 else min(d, 32 * 2**i)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out),
                       nn.ReLU()]  # fmt: skip
            channels = out
        self.cnn = nn.Sequential(*layers, nn.Conv2d(d, d, 1))
        self.rows = nn.Parameter(torch.randn(cfg.grid, 1, d) * 0.1)
        self.cols = nn.Parameter(torch.randn(1, cfg.grid, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.image_layers))
        self.norm = nn.LayerNorm(d)
        self.kv = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(cfg.fuser_layers))

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        # CoordConv (Liu et al., 2018): x and y in [-1, 1] as two more input channels,
        # so where an object is reaches every filter directly.
        b, _, h, w = image.shape
        ys = torch.linspace(-1.0, 1.0, h, dtype=image.dtype, device=image.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=image.dtype, device=image.device)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(b, 2, h, w)
        # Ink, not paper: 1 - RGB puts the white background at zero, so the few
        # object pixels are the signal (measured: with raw RGB, image tokens varied
        # 20x less across images than across positions and nothing was learned).
        x = self.cnn(torch.cat([1.0 - image, coords], 1))  # [B, d, g, g]
        x = x.permute(0, 2, 3, 1) + self.rows + self.cols  # [B, g, g, d]
        x = x.flatten(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, T, d]`` -> every fuser layer's ``kv [B, layers, 2, T, d]``."""
        kv = [torch.stack(proj(tokens).chunk(2, -1), 1) for proj in self.kv]  # [B, 2, T, d] each
        return torch.stack(kv, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.tokens(image))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int, gated: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.ff = FeedForward(d)
        # Flamingo initializes its gates at 0 (the layer starts as identity).
        self.gate_attn = nn.Parameter(torch.zeros(1)) if gated else None
        self.gate_ff = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``x [B, L, d]`` question tokens; ``kv [B, 2, T, d]`` this layer's image keys/values."""
        q = _heads(self.q(self.norm(x)), self.heads)
        k, v = _heads(kv[:, 0], self.heads), _heads(kv[:, 1], self.heads)
        a = self.out(_merge(F.scaled_dot_product_attention(q, k, v)))
        if self.gate_attn is not None and self.gate_ff is not None:
            x = x + torch.tanh(self.gate_attn) * a
            return x + torch.tanh(self.gate_ff) * self.ff(x)
        x = x + a
        return x + self.ff(x)


class QuestionStage(nn.Module):
    """Token ids ``[B, Q, L]`` (0 = padding) and ``kv`` -> answer logits ``[B, Q, answers]``."""

    def __init__(self, cfg: VqaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.question_layers))
        self.fuser = nn.ModuleList(
            CrossAttention(d, cfg.heads, cfg.gated) for _ in range(cfg.fuser_layers)
        )
        self.self_fuser = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.fuser_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.answers)

    def forward(self, tokens: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``tokens [B, Q, L]``: Q questions about each of B images -> ``[B, Q, answers]``.

        Cross-attention is independent per query token, so the Q questions of an
        image run as one query sequence against that image's keys/values (no
        copy per question); self-attention stays within each question.
        """
        b, nq, length = tokens.shape
        flat = tokens.reshape(b * nq, length)
        present = flat != 0  # [B*Q, L]
        # A question of padding only still attends to something (its first slot).
        present = present | (torch.arange(length, device=tokens.device) == 0)
        keep = present[:, None, None, :]
        x = self.embed(flat) + self.pos[:length]
        for block in self.blocks:
            x = block(x, keep)
        for layer, (cross, block) in enumerate(zip(self.fuser, self.self_fuser)):
            x = cross(x.reshape(b, nq * length, -1), kv[:, layer]).reshape(b * nq, length, -1)
            x = block(x, keep)
        weights = present.to(x.dtype)[..., None]
        pooled = (self.norm(x) * weights).sum(1) / weights.sum(1)
        return self.head(pooled).reshape(b, nq, -1)


class VqaModel(nn.Module):
    """Both stages: ``forward(images [B, 3, S, S], tokens [B, Q, L]) -> [B, Q, answers]``.

    ``cells`` is a training-only head on the image tokens (scene parsing, see
    :mod:`apps.vqa.parse`); the exported stages leave it out.
    """

    def __init__(self, cfg: VqaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ImageStage(cfg)
        self.question = QuestionStage(cfg)
        self.cells = nn.Linear(cfg.d_model, CELL_OUTPUTS)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.question(tokens, self.image(images))

    def forward_with_cells(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer logits ``[B, Q, answers]`` and per-token parse logits
        ``[B, grid^2, CELL_OUTPUTS]`` from one image pass (training)."""
        x = self.image.tokens(images)
        return self.question(tokens, self.image.project(x)), self.cells(x)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_batchnorm(model: VqaModel) -> VqaModel:
    """A copy with each Conv2d -> BatchNorm2d pair of the image CNN folded into one conv."""
    model = copy.deepcopy(model).eval()
    layers = list(model.image.cnn)
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        conv = layers[i]
        if (
            isinstance(conv, nn.Conv2d)
            and i + 1 < len(layers)
            and isinstance(layers[i + 1], nn.BatchNorm2d)
        ):
            out.append(torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layers[i + 1]))
            i += 2
        else:
            out.append(conv)
            i += 1
    model.image.cnn = nn.Sequential(*out)
    return model
