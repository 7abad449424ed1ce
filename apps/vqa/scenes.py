"""Sort-of-CLEVR scenes and questions (Santoro et al., 2017, "A simple neural
network module for relational reasoning", section 4 and appendix).

A scene is a ``size`` x ``size`` RGB image (75 by default) with six objects,
one per colour, each a square or a circle of the same size, placed so that no
two overlap.  Questions come from templates with several English paraphrases:

- non-relational: the shape of the <colour> object; is it on the left or the
  right; is it at the top or the bottom;
- relational: the shape of the object closest to / furthest from the <colour>
  object; how many objects have the same shape as the <colour> object.

Answers are computed from the scene's geometry, as in the paper: left/right
and top/bottom by the object's centre against the image's middle, distances
between centres.  Everything is seeded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "ANSWERS",
    "QUESTION_TYPES",
    "TEMPLATES",
    "SceneObject",
    "Scene",
    "QA",
    "make_scene",
    "render",
    "answer",
    "questions",
    "all_template_texts",
]

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "yellow": (255, 255, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("square", "circle")
ANSWERS = ("square", "circle", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6")

# type -> (relational?, paraphrases with {c} for the colour)
TEMPLATES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "shape": (False, (
        "what is the shape of the {c} object?",
        "what shape is the {c} object?",
        "which shape does the {c} object have?",
        "is the {c} object a square or a circle?",
        "tell me the shape of the {c} thing",
    )),
    "horizontal": (False, (
        "is the {c} object on the left or the right?",
        "is the {c} object on the left side or the right side of the image?",
        "on which side is the {c} object, left or right?",
        "is the {c} thing to the left or to the right?",
    )),
    "vertical": (False, (
        "is the {c} object at the top or the bottom?",
        "is the {c} object in the top half or the bottom half of the image?",
        "is the {c} thing near the top or near the bottom?",
        "where is the {c} object, top or bottom?",
    )),
    "closest": (True, (
        "what is the shape of the object closest to the {c} object?",
        "what shape is the object nearest to the {c} object?",
        "which shape is the object closest to the {c} one?",
        "what is the shape of the nearest object to the {c} object?",
    )),
    "furthest": (True, (
        "what is the shape of the object furthest from the {c} object?",
        "what shape is the object farthest from the {c} object?",
        "which shape is the object furthest away from the {c} one?",
        "what is the shape of the most distant object from the {c} object?",
    )),
    "count": (True, (
        "how many objects have the same shape as the {c} object?",
        "how many objects share the shape of the {c} object?",
        "how many things have the same shape as the {c} one?",
        "count the objects with the same shape as the {c} object",
    )),
}  # fmt: skip
QUESTION_TYPES = tuple(TEMPLATES)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top


@dataclass(frozen=True)
class Scene:
    size: int  # image side, pixels
    radius: float  # half the side of a square, the radius of a circle
    objects: tuple[SceneObject, ...]

    def by_colour(self, colour: str) -> SceneObject:
        return next(o for o in self.objects if o.colour == colour)


@dataclass(frozen=True)
class QA:
    text: str
    kind: str  # a key of TEMPLATES
    colour: str
    answer: str
    relational: bool


def make_scene(rng: random.Random, size: int = 75) -> Scene:
    """Six objects, one per colour, random shapes, centres at least a diameter
    (plus a pixel) apart so none overlap, and fully inside the image."""
    radius = size / 15.0  # 5 px at 75 px, as in the paper
    gap = 2 * radius * math.sqrt(2) + 1  # squares in any relative placement stay apart
    objects: list[SceneObject] = []
    for colour in COLOURS:
        for _ in range(10_000):
            x = rng.uniform(radius + 1, size - radius - 1)
            y = rng.uniform(radius + 1, size - radius - 1)
            if all(math.hypot(x - o.x, y - o.y) >= gap for o in objects):
                break
        else:  # pragma: no cover - six small objects always fit
            raise RuntimeError("could not place the objects")
        objects.append(SceneObject(colour, rng.choice(SHAPES), x, y))
    return Scene(size, radius, tuple(objects))


def render(scene: Scene) -> Image.Image:
    """The scene on a white background, as a Pillow RGB image."""
    image = Image.new("RGB", (scene.size, scene.size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    r = scene.radius
    for o in scene.objects:
        box = (o.x - r, o.y - r, o.x + r, o.y + r)
        if o.shape == "square":
            draw.rectangle(box, fill=COLOURS[o.colour])
        else:
            draw.ellipse(box, fill=COLOURS[o.colour])
    return image


def answer(scene: Scene, kind: str, colour: str) -> str:
    """The answer to a question of ``kind`` about the ``colour`` object."""
    me = scene.by_colour(colour)
    others = [o for o in scene.objects if o.colour != colour]
    if kind == "shape":
        return me.shape
    if kind == "horizontal":
        return "left" if me.x < scene.size / 2 else "right"
    if kind == "vertical":
        return "top" if me.y < scene.size / 2 else "bottom"
    if kind in ("closest", "furthest"):
        dist = [math.hypot(o.x - me.x, o.y - me.y) for o in others]
        pick = min if kind == "closest" else max
        return others[dist.index(pick(dist))].shape
    if kind == "count":
        return str(sum(o.shape == me.shape for o in scene.objects))
    raise ValueError(f"unknown question type {kind!r}")


def questions(scene: Scene, rng: random.Random, per_type: int = 2) -> list[QA]:
    """``per_type`` questions of each type, each about a random colour, random paraphrase."""
    out = []
    for kind, (relational, forms) in TEMPLATES.items():
        for colour in rng.sample(list(COLOURS), per_type):
            text = rng.choice(forms).format(c=colour)
            out.append(QA(text, kind, colour, answer(scene, kind, colour), relational))
    return out


def all_template_texts() -> list[str]:
    """Every paraphrase with every colour as spoken (normalized like the ASR text:
    lower case, no punctuation), for the ASR training text and LM."""
    from dsstream.lm import normalize_sentence

    return [normalize_sentence(f.format(c=c)) for _, forms in TEMPLATES.values()
            for f in forms for c in COLOURS]  # fmt: skip


def to_array(image: Image.Image) -> np.ndarray:
    """Pillow image -> float32 ``[3, H, W]`` in [0, 1]."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
