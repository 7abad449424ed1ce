"""Quantized stand-ins for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

A :class:`QuantLayer` wraps one float layer and moves through three modes:

- ``calibrate``: float forward; its activation observer watches the input.
- ``fake``: fake quantization (quantize-dequantize in float, straight-through
  gradients) of the input and the weights; what quantization-aware training
  trains and what evaluation of a quantized model measures.
- ``frozen``: weights stored as int8 with per-channel scales (the float weights
  are gone, so the artifact shrinks); the forward uses the
  ``quantized_decomposed`` quantize/dequantize ops, which ``torch.onnx``
  exports as QuantizeLinear/DequantizeLinear, so ONNX Runtime fuses them into
  integer kernels (QDQ format).

Static mode quantizes activations with calibrated parameters (per tensor);
dynamic mode quantizes them at run time from each tensor's own range (uint8,
asymmetric, as ONNX Runtime's DynamicQuantizeLinear).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers quantized_decomposed)

from engine.quant.observers import (
    MinMaxObserver,
    QParams,
    fake_quantize,
    make_observer,
    qparams_from_range,
)

__all__ = ["QuantLayer", "QUANTIZABLE"]

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_qd = torch.ops.quantized_decomposed


class QuantLayer(nn.Module):
    """A quantized Linear/Conv1d/Conv2d; see the module docstring for the modes."""

    def __init__(self, inner: nn.Module, config: Any) -> None:
        super().__init__()
        if not isinstance(inner, QUANTIZABLE):
            raise TypeError(f"cannot quantize {type(inner).__name__}: only Linear, Conv1d, Conv2d")
        self.inner = inner
        self.kind = type(inner).__name__
        self.dynamic = config.mode == "dynamic"
        self.per_channel = config.per_channel
        self.act_symmetric = config.act_symmetric
        self.weight_observer = config.weight_observer
        self.mode = "calibrate"
        self.act_observer = make_observer(
            config.observer, config.act_symmetric,
            **({"percentile": config.percentile} if config.observer == "percentile" else {}),
        )  # fmt: skip
        self.act_qp: QParams | None = None
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None  # QAT's running range

    def __getattr__(self, name: str) -> Any:
        # The wrapped layer's attributes (out_channels, in_features, ...) stay
        # reachable: model code reads them from the layer it thinks it holds.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("inner")
            if inner is None or name == "inner":
                raise
            return getattr(inner, name)

    # ------------------------------------------------------------------ parameters

    def weight_qparams(self, weight: torch.Tensor) -> QParams:
        """Symmetric int8 for the weights, per output channel unless configured per tensor."""
        axis = 0 if self.per_channel else None
        obs = make_observer(self.weight_observer, True, axis)
        obs.update(weight)
        return obs.qparams()

    def finish_calibration(self) -> None:
        if not self.dynamic:
            self.act_qp = self.act_observer.qparams()
            self.ema = (self.act_observer.lo.clone(), self.act_observer.hi.clone())  # type: ignore[union-attr]
        self.act_observer = MinMaxObserver(False)  # the sample is no longer needed

    # ------------------------------------------------------------------ forward

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        inner: Any = self.inner
        if self.kind == "Linear":
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.kind == "Conv1d" else F.conv2d
        return conv(x, weight, bias, inner.stride, inner.padding, inner.dilation, inner.groups)

    def _dynamic_fake(self, x: torch.Tensor) -> torch.Tensor:
        # ONNX Runtime's DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)].
        lo = torch.clamp(x.detach().amin(), max=0.0)
        hi = torch.clamp(x.detach().amax(), min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=torch.finfo(torch.float32).tiny)
        zero = torch.clamp(torch.round(-lo / scale), 0, 255)
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        dq = (q - zero) * scale
        return x + (dq - x).detach()  # straight-through

    def _act_fake(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return self._dynamic_fake(x)
        if self.training and self.ema is not None:  # QAT: follow the activations slowly
            lo, hi = self.ema
            self.ema = (0.99 * lo + 0.01 * x.detach().amin(), 0.99 * hi + 0.01 * x.detach().amax())
            self.act_qp = qparams_from_range(self.ema[0], self.ema[1], self.act_symmetric)
        assert self.act_qp is not None
        return fake_quantize(x, self.act_qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            if not self.dynamic:
                self.act_observer.update(x)
            return self.inner(x)
        if self.mode == "fake":
            w = fake_quantize(self.inner.weight, self.weight_qparams(self.inner.weight.detach()))
            return self._compute(self._act_fake(x), w, self.inner.bias)
        return self._frozen(x)

    # ------------------------------------------------------------------ frozen int8

    def freeze(self) -> None:
        """Store the weights as int8 + scales and drop the float weights (once)."""
        if self.mode == "frozen":
            return
        weight = self.inner.weight.detach()
        qp = self.weight_qparams(weight)
        scale = qp.scale.reshape(-1) if qp.axis is not None else qp.scale.reshape(1)
        shape = [-1] + [1] * (weight.dim() - 1)
        per = scale.reshape(shape) if qp.axis is not None else scale
        q = torch.clamp(torch.round(weight / per), -127, 127).to(torch.int8)
        if self.kind == "Linear":
            # Stored [in, out] and used by matmul: torch's linear exports as
            # Transpose + MatMul, and a Transpose between DequantizeLinear and
            # MatMul stops ONNX Runtime from fusing them into an integer matmul.
            q = q.t().contiguous()
        self.register_buffer("w_int8", q)
        self.register_buffer("w_scale", scale.float().expand(weight.shape[0]).contiguous())
        self.register_buffer("w_zero", torch.zeros(weight.shape[0], dtype=torch.int64))
        del self.inner.weight
        self.inner.register_buffer("weight", None)
        self.mode = "frozen"

    def _frozen(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            xq = self._dynamic_fake(x)
        else:
            qp = self.act_qp
            assert qp is not None
            s, z = float(qp.scale), int(qp.zero_point)
            xq = _qd.dequantize_per_tensor(
                _qd.quantize_per_tensor(x, s, z, qp.qmin, qp.qmax, torch.int8),
                s, z, qp.qmin, qp.qmax, torch.int8,
            )  # fmt: skip
        axis = 1 if self.kind == "Linear" else 0
        w = _qd.dequantize_per_channel(self.w_int8, self.w_scale, self.w_zero, axis, -127, 127,
                                       torch.int8)  # fmt: skip
        if self.kind == "Linear":
            y = torch.matmul(xq, w)
            return y if self.inner.bias is None else y + self.inner.bias
        return self._compute(xq, w, self.inner.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, mode={self.mode}, dynamic={self.dynamic}"
