"""The sample ASR acoustic model: a streaming conformer-style CTC encoder.

Every part is built so that streaming equals offline exactly:
- Subsampling x4: two 3x3 convolutions with stride 2 in time and one frame of
  left padding; streaming keeps that one frame per convolution as state.
- Blocks: half feed-forward, chunked self-attention (a chunk of C frames sees
  itself and the last L frames; keys/values of those L frames are the state),
  a causal depthwise convolution module (its K-1 frame left context is the
  state), half feed-forward.  No absolute positions: the causal convolution
  carries relative position, so a stream of any length works.
- CTC head over the characters of ``ENGLISH_CHARS`` (blank, word delimiter,
  apostrophe, a-z).

``forward`` runs whole utterances with the equivalent chunk mask (training,
evaluation); :class:`StreamingStep` runs one chunk with explicit state (export).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["ModelConfig", "AsrModel", "StreamingStep", "grow_depth"]


@dataclass(frozen=True)
class ModelConfig:
    n_mels: int = 80
    vocab: int = 29
    d_model: int = 144
    layers: int = 6
    heads: int = 4
    ff_mult: int = 4
    ff_dim: int | None = (
        None  # feed-forward hidden size (default ff_mult * d_model; pruning sets it)
    )
    conv_kernel: int = 15
    sub_channels: int = 64
    chunk: int = 8  # encoder frames per chunk (x4 input frames: 320 ms)
    left: int = 32  # encoder frames of left context per layer (1.28 s)
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class Subsampling(nn.Module):
    """[B, T, mels] -> [B, T/4, d]; each conv has one frame of left padding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.sub_channels
        self.conv1 = nn.Conv2d(1, c, 3, stride=(2, 2), padding=(0, 1))
        self.conv2 = nn.Conv2d(c, c, 3, stride=(2, 2), padding=(0, 1))
        freq = (cfg.n_mels + 1) // 2
        freq = (freq + 1) // 2
        self.out = nn.Linear(c * freq, cfg.d_model)

    def step(self, x, cache1, cache2):  # x [B, 4C, mels]; caches [B,1,1,mels], [B,c,1,F1]
        h = torch.cat([cache1, x.unsqueeze(1)], dim=2)  # one frame of left context
        y = torch.relu(self.conv1(h))
        z = torch.cat([cache2, y], dim=2)
        z = torch.relu(self.conv2(z))
        b, c, t, f = z.shape
        return self.out(z.permute(0, 2, 1, 3).reshape(b, t, c * f)), h[:, :, -1:], y[:, :, -1:]

    def forward(self, x):  # offline: zero left frames, like a fresh stream
        b, _, m = x.shape
        cache1 = x.new_zeros(b, 1, 1, m)
        cache2 = x.new_zeros(b, self.conv1.out_channels, 1, (m + 1) // 2)
        return self.step(x, cache1, cache2)[0]


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ff_dim or cfg.ff_mult * cfg.d_model
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, hidden),
            nn.SiLU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


class ChunkedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.d = cfg.heads, cfg.d_model
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _split(self, x):  # [B, T, d] -> [B, heads, T, d/heads]
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.d // self.heads).transpose(1, 2)

    def _attend(self, q, k, v, blocked):  # blocked: bool [B or 1, Tq, Tk], True = masked
        scale = 1.0 / math.sqrt(self.d // self.heads)
        scores = (self._split(q) @ self._split(k).transpose(-1, -2)) * scale
        scores = scores.masked_fill(blocked[:, None], float("-inf"))
        return self._merge(scores.softmax(-1) @ self._split(v))

    def _merge(self, ctx):  # [B, heads, T, d/heads] -> output projection [B, T, d]
        b, _, t, _ = ctx.shape
        return self.drop(self.out(ctx.transpose(1, 2).reshape(b, t, self.d)))

    def step(self, x, cache_k, cache_v, filled, left: int):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        keys, values = torch.cat([cache_k, k], 1), torch.cat([cache_v, v], 1)
        slot = torch.arange(keys.shape[1], device=x.device, dtype=filled.dtype)
        blocked = (slot[None, :] < (left - filled))[:, None, :].expand(-1, x.shape[1], -1)
        return self._attend(q, keys, values, blocked), keys[:, -left:], values[:, -left:]

    def forward(self, x, blocked):
        # Whole utterances (training, offline): PyTorch's fused attention, the
        # same function as ``_attend`` with ~10% less time per training step on
        # CPU.  ``step`` (export, streaming) keeps the explicit form.
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        ctx = nn.functional.scaled_dot_product_attention(
            self._split(q), self._split(k), self._split(v), attn_mask=~blocked[:, None]
        )
        return self._merge(ctx)


class CausalConvModule(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.dw = nn.Conv1d(d, d, k, groups=d)
        self.norm2 = nn.LayerNorm(d)
        self.pw2 = nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.context = k - 1

    def step(self, x, cache):  # cache [B, d, K-1]
        h = nn.functional.glu(self.pw1(self.norm(x)), dim=-1).transpose(1, 2)
        h = torch.cat([cache, h], dim=2)
        y = self.dw(h).transpose(1, 2)
        y = self.drop(self.pw2(nn.functional.silu(self.norm2(y))))
        return y, h[:, :, -self.context :]

    def forward(self, x):
        cache = x.new_zeros(x.shape[0], x.shape[2], self.context)
        return self.step(x, cache)[0]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ff1, self.ff2 = FeedForward(cfg), FeedForward(cfg)
        self.att = ChunkedAttention(cfg)
        self.conv = CausalConvModule(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)

    def step(self, x, k, v, filled, conv, left):
        x = x + 0.5 * self.ff1(x)
        a, k, v = self.att.step(x, k, v, filled, left)
        x = x + a
        c, conv = self.conv.step(x, conv)
        x = x + c
        return self.norm(x + 0.5 * self.ff2(x)), k, v, conv

    def forward(self, x, blocked):
        x = x + 0.5 * self.ff1(x)
        x = x + self.att(x, blocked)
        x = x + self.conv(x)
        return self.norm(x + 0.5 * self.ff2(x))


def chunk_mask(frames: int, chunk: int, left: int, lengths: torch.Tensor | None = None):
    """True where attention is blocked: frame t sees its chunk and ``left`` frames
    before the chunk start (and no padding past ``lengths``).  [B or 1, T, T]."""
    t = torch.arange(frames)
    end = (t // chunk + 1) * chunk
    j = t[None, :]
    blocked = (j >= end[:, None]) | (j < (end - chunk - left)[:, None])
    blocked = blocked[None]
    if lengths is not None:
        blocked = blocked | (j[None] >= lengths[:, None, None])
        # A padded frame whose whole window is padding would attend to nothing
        # (NaN, which then leaks through zero attention weights into valid
        # frames): let every frame see itself.  Valid frames already do.
        blocked = blocked & ~torch.eye(frames, dtype=torch.bool)[None]
    return blocked


class AsrModel(nn.Module):
    """Features ``[B, T, 80]`` (T a multiple of 4) -> CTC log-probs ``[B, T/4, vocab]``."""

    def __init__(self, cfg: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.sub = Subsampling(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.sub(feats)
        sub_lengths = None if lengths is None else lengths // 4
        blocked = chunk_mask(x.shape[1], self.cfg.chunk, self.cfg.left, sub_lengths)
        for block in self.blocks:
            x = block(x, blocked.to(x.device))
        return self.head(x).log_softmax(-1)


def _identity_block(cfg: ModelConfig, after: Block) -> Block:
    """A new block that, inserted after ``after``, leaves the model's function
    unchanged: its residual branches end in zeroed projections, and it takes
    over ``after``'s final LayerNorm affine while ``after``'s becomes (1, 0).

    ``after`` then emits a plain normalized ``x̂``; the new block's branches add
    nothing and its LayerNorm of ``x̂`` is ``x̂`` again (to LayerNorm's epsilon),
    scaled and shifted as ``after`` did.  The zeroed projections get gradients
    at the first step (their inputs are not zero), so the block starts learning
    at once.
    """
    block = Block(cfg)
    for last in (block.ff1.net[-2], block.ff2.net[-2], block.att.out, block.conv.pw2):
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    with torch.no_grad():
        block.norm.load_state_dict(after.norm.state_dict())
        nn.init.ones_(after.norm.weight)
        nn.init.zeros_(after.norm.bias)
    return block


def grow_depth(model: AsrModel, layers: int) -> AsrModel:
    """A deeper model computing what ``model`` computes: ``layers - cfg.layers``
    new blocks, spread evenly, each inserted as an identity (:func:`_identity_block`).

    The way to give a trained model more capacity without training from
    scratch (the CTC "all blank" plateau costs a from-scratch run epochs on two
    cores).  ``model`` itself is left as it was.
    """
    old = model.cfg.layers
    if layers < old:
        raise ValueError(f"grow_depth adds layers: the model has {old}, asked for {layers}")
    import copy

    src = copy.deepcopy(model)
    cfg = ModelConfig(**{**model.cfg.to_dict(), "layers": layers})
    grown = AsrModel(cfg)
    grown.sub.load_state_dict(src.sub.state_dict())
    grown.head.load_state_dict(src.head.state_dict())
    extra = layers - old
    # New block k goes after old block round((k + 1) * old / (extra + 1)) - 1.
    after = [min(old - 1, max(0, round((k + 1) * old / (extra + 1)) - 1)) for k in range(extra)]
    blocks: list[Block] = []
    for i, block in enumerate(src.blocks):
        blocks.append(block)
        for _ in range(after.count(i)):
            blocks.append(_identity_block(cfg, blocks[-1]))
    grown.blocks = nn.ModuleList(blocks)
    return grown


class StreamingStep(nn.Module):
    """One chunk of ``4 * chunk`` feature frames with the stream's state.

    State (batch first): ``sub1`` [B,1,1,mels], ``sub2`` [B,c,1,F1], ``cache_k`` and
    ``cache_v`` [B, layers, left, d], ``filled`` [B, 1] (left frames already
    seen, float), ``conv`` [B, layers, d, kernel-1].
    """

    STATE = ("sub1", "sub2", "cache_k", "cache_v", "filled", "conv")

    def __init__(self, model: AsrModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats, sub1, sub2, cache_k, cache_v, filled, conv):
        cfg = self.model.cfg
        x, sub1, sub2 = self.model.sub.step(feats, sub1, sub2)
        ks, vs, cs = [], [], []
        for i, block in enumerate(self.model.blocks):
            x, k, v, c = block.step(x, cache_k[:, i], cache_v[:, i], filled, conv[:, i], cfg.left)
            ks.append(k)
            vs.append(v)
            cs.append(c)
        logp = self.model.head(x).log_softmax(-1)
        filled = torch.clamp(filled + cfg.chunk, max=float(cfg.left))
        return logp, sub1, sub2, torch.stack(ks, 1), torch.stack(vs, 1), filled, torch.stack(cs, 1)

    def initial_state(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        cfg = self.model.cfg
        f1 = (cfg.n_mels + 1) // 2
        return (
            torch.zeros(batch, 1, 1, cfg.n_mels),
            torch.zeros(batch, cfg.sub_channels, 1, f1),
            torch.zeros(batch, cfg.layers, cfg.left, cfg.d_model),
            torch.zeros(batch, cfg.layers, cfg.left, cfg.d_model),
            torch.zeros(batch, 1),
            torch.zeros(batch, cfg.layers, cfg.d_model, cfg.conv_kernel - 1),
        )
