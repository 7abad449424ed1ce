"""The sample apps' recipes (data, training, evaluation, export); they need
the ``train`` extra (torch and torchaudio)."""

from engine.extras import require

require("torch", "train", "the recipes in apps/")
