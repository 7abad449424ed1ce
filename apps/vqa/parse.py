"""Scene-parsing targets for the image tokens, read from the rendered pixels.

Training adds an auxiliary objective on the image encoder: each image token
predicts which object (if any) has its centre in that token's cell, the
object's shape and its centre, and the shapes of that object's nearest and
farthest neighbours.  It makes the tokens object-aware before the fuser has
to learn to select one of them by colour; without it the fuser's attention
stays near uniform for thousands of steps.  Measured (docs/vqa.md): without
it, 66% after 7 epochs; with colour and shape, shape and count questions
reach 99% but position stays at chance; with the centre too, all
non-relational types reach 99% in 1,000 steps while closest/furthest stay
near 70%; with the neighbours' shapes, those reach 88-91% by step 1,000.
The fuser still has to pick the right object and the right feature for
each question; the image encoder has to work the relations out from pixels.

The targets come from the pixels of the scene's fixed palette, not from the
generator's metadata, so any rendered Sort-of-CLEVR image can be used.
Only training uses them; the exported stages never see them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from apps.vqa.scenes import COLOURS

__all__ = ["CELL_OUTPUTS", "CellTargets", "cell_targets", "parse_loss"]

#: Per image token: 7 colour logits (0 = no object centre here), 2 shape logits
#: (square, circle), 2 centre coordinates in [-1, 1] (x, y), 2 + 2 shape logits
#: of the nearest and of the farthest other object.
CELL_OUTPUTS = len(COLOURS) + 1 + 2 + 2 + 2 + 2


class CellTargets(NamedTuple):
    """Per image token (``[B, G*G]``; -100 or zero where no object is centred)."""

    colour: torch.Tensor  # long: 0 none, k = the k-th colour plus one
    shape: torch.Tensor  # long: 0 square, 1 circle, -100 none
    centre: torch.Tensor  # float [B, G*G, 2]: x, y in [-1, 1]
    nearest: torch.Tensor  # long: the nearest other object's shape, -100 none
    farthest: torch.Tensor  # long: the farthest other object's shape, -100 none


_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)  # [colours, 3]


def cell_targets(images: torch.Tensor, grid: int, stride: int) -> CellTargets:
    """Per-cell targets of uint8 scenes ``images [B, 3, S, S]``.

    A cell ``(i, j)`` of the ``grid x grid`` token map is centred on pixel
    ``(stride * i, stride * j)`` (stride-2 convolutions with padding 1); an
    object belongs to the cell nearest its pixel centroid.  Objects are more
    than ``2 * stride`` apart, so no two share a cell.

    Distances are between pixel centroids, which sit within half a pixel of
    the generator's centres: near ties (about 1% of objects) may name the
    other neighbour than the questions' answers do.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, S, S], got {images.dtype} {images.shape}")
    b, _, size, _ = images.shape
    masks = (images[:, None] == _PALETTE.to(images.device)[None, :, :, None, None]).all(2)
    area = masks.sum((2, 3)).float()  # [B, colours]
    if bool((area == 0).any()):
        raise ValueError("an image lacks one of the palette's colours; not a Sort-of-CLEVR scene")
    coords = torch.arange(size, dtype=torch.float32, device=images.device)
    cy = (masks.sum(3).float() * coords).sum(2) / area
    cx = (masks.sum(2).float() * coords).sum(2) / area
    # A square fills its bounding box; a circle leaves the corners empty.
    box = masks.any(3).sum(2).float() * masks.any(2).sum(2).float()
    circle = (area / box < 0.9).long()
    row = torch.round(cy / stride).long().clamp(0, grid - 1)
    col = torch.round(cx / stride).long().clamp(0, grid - 1)
    cell = row * grid + col  # [B, colours]
    n = len(COLOURS)
    colour = torch.zeros(b, grid * grid, dtype=torch.long, device=images.device)
    colour.scatter_(1, cell, torch.arange(1, n + 1, device=images.device).expand(b, n))
    shape = torch.full_like(colour, -100).scatter_(1, cell, circle)
    centre = torch.stack([cx, cy], -1) * (2.0 / (size - 1)) - 1.0  # [B, colours, 2]
    centres = torch.zeros(b, grid * grid, 2, device=images.device)
    centres.scatter_(1, cell[..., None].expand(-1, -1, 2), centre)
    dist = torch.cdist(centre, centre)  # [B, colours, colours]
    self_ = torch.eye(n, dtype=torch.bool, device=images.device)
    nearest = circle.gather(1, dist.masked_fill(self_, float("inf")).argmin(-1))
    farthest = circle.gather(1, dist.masked_fill(self_, -1.0).argmax(-1))
    return CellTargets(
        colour,
        shape,
        centres,
        torch.full_like(colour, -100).scatter_(1, cell, nearest),
        torch.full_like(colour, -100).scatter_(1, cell, farthest),
    )


def parse_loss(logits: torch.Tensor, targets: CellTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [B, G*G, CELL_OUTPUTS]`` against :func:`cell_targets`: cross-entropy
    of the colour, shape and neighbour shapes plus the squared centre error on
    object cells.  Returns the loss and the accuracy of the neighbour shapes on
    object cells (the hardest part, for the progress bar)."""
    n = len(COLOURS) + 1
    parts = logits.split([n, 2, 2, 2, 2], -1)
    loss = F.cross_entropy(parts[0].flatten(0, 1), targets.colour.flatten())
    pairs = ((parts[1], targets.shape), (parts[3], targets.nearest), (parts[4], targets.farthest))
    for part, target in pairs:
        loss = loss + F.cross_entropy(part.flatten(0, 1), target.flatten())
    here = targets.colour > 0
    loss = loss + ((parts[2] - targets.centre) ** 2).sum(-1)[here].mean()
    nearest = (parts[3].argmax(-1) == targets.nearest)[here]
    farthest = (parts[4].argmax(-1) == targets.farthest)[here]
    right = torch.cat([nearest, farthest])
    return loss, right.float().mean()
