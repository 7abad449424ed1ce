"""Observers: they watch a tensor during calibration and turn what they saw
into int8 quantization parameters (scale, zero point).

- :class:`MinMaxObserver`: the running min and max (exact, the default for weights).
- :class:`PercentileObserver`: clips at a percentile of ``|x|`` (or of x on both
  sides), ignoring rare outliers that would otherwise waste most of the range.
- :class:`MseObserver`: picks the clipping range that minimizes the
  quantize-dequantize squared error on what it saw.

Per tensor (``axis=None``) or per channel (``axis``: the channel dim).  The
percentile and MSE observers keep a bounded, seeded reservoir sample of the
values (``samples`` values) so calibration over thousands of batches stays in
memory and repeatable.

Integer ranges: symmetric int8 is [-127, 127] with zero point 0 (so -x
quantizes to -q, and int8 x int8 products never hit -128 x -128); asymmetric
int8 is [-128, 127] with a zero point that makes 0.0 exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QParams",
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "MseObserver",
    "make_observer",
    "qparams_from_range",
    "fake_quantize",
]


@dataclass(frozen=True)
class QParams:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)``; scale and zero_point
    are scalars (per tensor) or ``[C]`` along ``axis`` (per channel)."""

    scale: torch.Tensor
    zero_point: torch.Tensor  # int64
    qmin: int
    qmax: int
    axis: int | None = None

    def to_dict(self) -> dict:
        return {
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
        }


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, axis: int | None = None
) -> QParams:
    """Int8 parameters covering ``[lo, hi]`` (which is widened to include 0)."""
    lo = torch.minimum(lo.double(), torch.zeros_like(lo, dtype=torch.float64))
    hi = torch.maximum(hi.double(), torch.zeros_like(hi, dtype=torch.float64))
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = (torch.maximum(-lo, hi) / 127.0).clamp_min(tiny)
        zero = torch.zeros_like(scale, dtype=torch.int64)
        return QParams(scale.float(), zero, -127, 127, axis)
    scale = ((hi - lo) / 255.0).clamp_min(tiny)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127).to(torch.int64)
    return QParams(scale.float(), zero, -128, 127, axis)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize ``x`` (float), with a straight-through gradient."""
    if qp.axis is None:
        return torch.fake_quantize_per_tensor_affine(
            x, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax
        )
    return torch.fake_quantize_per_channel_affine(
        x, qp.scale.to(x.device), qp.zero_point.to(x.device, torch.int32), qp.axis, qp.qmin,
        qp.qmax,
    )  # fmt: skip


class Observer:
    """Base: ``update(x)`` during calibration, then ``qparams()``."""

    def __init__(self, symmetric: bool, axis: int | None = None) -> None:
        self.symmetric = symmetric
        self.axis = axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.count = 0  # tensors seen

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[values, C]`` (per channel) or ``[values, 1]``."""
        x = x.detach().float()
        if self.axis is None:
            return x.reshape(-1, 1)
        return x.movedim(self.axis, -1).reshape(-1, x.shape[self.axis])

    def update(self, x: torch.Tensor) -> None:
        flat = self._channels_last(x)
        if flat.numel() == 0:
            return
        lo, hi = flat.amin(0), flat.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += 1
        self._keep(flat)

    def _keep(self, flat: torch.Tensor) -> None:
        pass

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi

    def qparams(self) -> QParams:
        if self.lo is None:
            raise ValueError("the observer saw no data: calibrate with at least one batch")
        lo, hi = self._range()
        if self.axis is None:
            lo, hi = lo.reshape(()), hi.reshape(())
        return qparams_from_range(lo, hi, self.symmetric, self.axis)


class MinMaxObserver(Observer):
    """The exact running range."""


class _Reservoir(Observer):
    def __init__(self, symmetric: bool, axis: int | None = None, samples: int = 1 << 16) -> None:
        super().__init__(symmetric, axis)
        self.samples = samples
        self.pool: torch.Tensor | None = None  # [<= samples, C]
        self.seen = 0
        self.gen = torch.Generator().manual_seed(0)

    def _keep(self, flat: torch.Tensor) -> None:
        # Reservoir sampling in blocks: every value seen so far is kept with the
        # same probability samples / seen, whatever the batch sizes were.
        n = flat.shape[0]
        self.seen += n
        if self.pool is None or self.pool.shape[0] < self.samples:
            pool = flat if self.pool is None else torch.cat([self.pool, flat])
            if pool.shape[0] > self.samples:
                pool = pool[torch.randperm(pool.shape[0], generator=self.gen)[: self.samples]]
            self.pool = pool
            return
        take = torch.rand(n, generator=self.gen) < self.samples / self.seen
        incoming = flat[take]
        if len(incoming):
            slots = torch.randint(0, self.samples, (len(incoming),), generator=self.gen)
            self.pool[slots] = incoming


class PercentileObserver(_Reservoir):
    """Clip at the ``percentile`` of |x| (symmetric) or at both tails (asymmetric)."""

    def __init__(self, symmetric: bool, axis: int | None = None, percentile: float = 99.99,
                 samples: int = 1 << 16) -> None:  # fmt: skip
        super().__init__(symmetric, axis, samples)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile}")
        self.percentile = percentile

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pool is not None
        q = self.percentile / 100.0
        if self.symmetric:
            top = torch.quantile(self.pool.abs(), q, dim=0)
            return -top, top
        return torch.quantile(self.pool, 1.0 - q, dim=0), torch.quantile(self.pool, q, dim=0)


class MseObserver(_Reservoir):
    """The clipping of the observed range whose quantize-dequantize error on the
    sample is least, per channel; candidate clips are fractions of the range:
    fine steps of 0.5% from 0.5 to 1 (where 8-bit optima lie for most data) and
    log-spaced ones down to 1e-4 (an outlier can make the useful range tiny)."""

    def __init__(self, symmetric: bool, axis: int | None = None, steps: int = 100,
                 samples: int = 1 << 16) -> None:  # fmt: skip
        super().__init__(symmetric, axis, samples)
        self.steps = steps

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pool is not None and self.lo is not None and self.hi is not None
        best_err = torch.full_like(self.lo, float("inf"))
        best_lo, best_hi = self.lo.clone(), self.hi.clone()
        fracs = torch.cat(
            [torch.logspace(-4.0, -0.31, 30), torch.linspace(0.5, 1.0, self.steps + 1)]
        )
        for frac in fracs:
            lo, hi = self.lo * frac, self.hi * frac
            qp = qparams_from_range(lo, hi, self.symmetric)
            scale, zero = qp.scale, qp.zero_point.float()
            q = torch.clamp(torch.round(self.pool / scale) + zero, qp.qmin, qp.qmax)
            err = ((q - zero) * scale - self.pool).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi


def make_observer(kind: str, symmetric: bool, axis: int | None = None, **kw) -> Observer:
    """``kind``: "minmax", "percentile" (``percentile=``) or "mse"."""
    if kind == "minmax":
        return MinMaxObserver(symmetric, axis)
    if kind == "percentile":
        return PercentileObserver(symmetric, axis, **kw)
    if kind == "mse":
        return MseObserver(symmetric, axis)
    raise ValueError(f"unknown observer {kind!r}; choose minmax, percentile or mse")
