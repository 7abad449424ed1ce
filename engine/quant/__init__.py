"""INT8 quantization: observers, quantized layers, post-training quantization,
quantization-aware training and per-layer sensitivity (see engine.quant.api)."""

# ruff: noqa: E402  (the extra is checked before the imports that need it)
from engine.extras import require

require("torch", "convert", "INT8 quantization (engine.quant)")

from engine.quant.api import (
    QuantConfig,
    calibrate,
    dequantized_copy,
    enable_fake,
    freeze,
    load_qat_state,
    prepare,
    qat_state,
    quant_layers,
    quantize,
    sensitivity,
    summary,
)
from engine.quant.observers import (
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    QParams,
    fake_quantize,
    qparams_from_range,
)

__all__ = [
    "QuantConfig",
    "prepare",
    "calibrate",
    "enable_fake",
    "freeze",
    "quantize",
    "quant_layers",
    "summary",
    "sensitivity",
    "qat_state",
    "load_qat_state",
    "dequantized_copy",
    "MinMaxObserver",
    "PercentileObserver",
    "MseObserver",
    "QParams",
    "fake_quantize",
    "qparams_from_range",
]
