"""The ASR frontend as a torch module, through torchaudio: training, export,
and the reference for :class:`dsstream.frontend.LogMel` (which serving
uses).  Needs the ``convert`` extra."""

from __future__ import annotations

import numpy as np

from dsstream.frontend import FbankConfig, LogMel
from engine.extras import require

require("torch", "convert", "dsstream.frontend_torch (the frontend as a torch module)")
import torch  # noqa: E402

__all__ = ["Fbank"]


class Fbank(torch.nn.Module):
    """Waveform ``[batch, samples]`` (float, [-1, 1]) -> features ``[batch, frames, n_mels]``."""

    def __init__(self, config: FbankConfig = FbankConfig()) -> None:
        super().__init__()
        import torchaudio

        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.win_length,
            win_length=config.win_length,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            center=False,
            power=2.0,
        )
        mean = torch.tensor(config.mean or [0.0] * config.n_mels)
        std = torch.tensor(config.std or [1.0] * config.n_mels)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self._numpy = LogMel(config)

    def frames(self, samples: int) -> int:
        return self._numpy.frames(samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[-1] < self.config.win_length:
            return wave.new_zeros(*wave.shape[:-1], 0, self.config.n_mels)
        spec = self.mel(wave).clamp_min(self.config.log_floor).log()  # [..., mels, frames]
        return (spec.transpose(-1, -2) - self.mean) / self.std

    def numpy(self, wave: np.ndarray) -> np.ndarray:
        """The same features with NumPy (:class:`LogMel`): float32 ``[samples]``
        -> ``[frames, n_mels]``, equal to ``forward`` within float32 rounding."""
        return self._numpy(wave)
