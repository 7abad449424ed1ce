"""Post-training quantization, quantization-aware training and sensitivity
analysis over :class:`engine.quant.modules.QuantLayer`.

    qmodel = quantize(model, calibration_batches, QuantConfig())    # static PTQ
    qat = prepare(model, cfg); calibrate(qat, batches); enable_fake(qat)  # then train
    freeze(qat)                                                       # -> int8 weights
    engine.convert(qmodel, example_inputs, ...)  # or convert(model, ..., quantize=cfg,
                                                 #            calibration=batches)
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from engine.quant.modules import QUANTIZABLE, QuantLayer

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
]


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    mode: "static" (activations with calibrated parameters) or "dynamic"
      (activations quantized at run time; no calibration needed).
    observer: activation observer, "minmax", "percentile" or "mse".
    percentile: for the percentile observer, in (50, 100].
    weight_observer: "minmax" or "mse" (weights: symmetric int8).
    per_channel: weights per output channel (default) or per tensor.
    act_symmetric: activations symmetric int8 (else asymmetric with a zero point).
    skip: names of layers (``model.named_modules()``) kept in float: mixed precision.
    """

    mode: str = "static"
    observer: str = "minmax"
    percentile: float = 99.99
    weight_observer: str = "minmax"
    per_channel: bool = True
    act_symmetric: bool = False
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.observer not in ("minmax", "percentile", "mse"):
            raise ValueError(f"observer must be minmax, percentile or mse, got {self.observer!r}")
        if self.weight_observer not in ("minmax", "mse"):
            raise ValueError(f"weight_observer must be minmax or mse, got {self.weight_observer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def prepare(model: nn.Module, config: QuantConfig = QuantConfig()) -> nn.Module:
    """A copy of ``model`` with every Linear/Conv1d/Conv2d not in ``config.skip``
    wrapped in a :class:`QuantLayer` (calibration mode)."""
    names = {n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    unknown = set(config.skip) - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"skip names no layer of the model: {sorted(unknown)}")
    bad = [n for n in config.skip if n not in names]
    if bad:
        raise ValueError(f"skip lists layers that are not quantizable anyway: {bad}")
    chosen = sorted(names - set(config.skip))
    if not chosen:
        raise ValueError("the model has no Linear, Conv1d or Conv2d layer to quantize")
    out = copy.deepcopy(model)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, QuantLayer(getattr(parent, child), config))
    return out


def calibrate(qmodel: nn.Module, batches: Iterable[Sequence[Any]]) -> int:
    """Run ``batches`` (each a tuple of positional inputs) through the model in
    calibration mode; returns how many batches were seen."""
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("no QuantLayer in the model: call prepare() first")
    for layer in layers.values():
        layer.mode = "calibrate"
    was_training = qmodel.training
    qmodel.eval()
    count = 0
    with torch.no_grad():
        for batch in batches:
            qmodel(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            count += 1
    qmodel.train(was_training)
    static = any(not layer.dynamic for layer in layers.values())
    if count == 0 and static:
        raise ValueError("the calibration set is empty: static quantization needs data")
    for layer in layers.values():
        if not layer.dynamic and layer.act_observer.lo is None:
            raise ValueError("a layer saw no data during calibration (is it used?)")
        layer.finish_calibration()
    return count


def enable_fake(qmodel: nn.Module) -> nn.Module:
    """Fake-quantize in float (quantization-aware training, or evaluation)."""
    for layer in quant_layers(qmodel).values():
        if layer.act_qp is None and not layer.dynamic:
            raise ValueError("calibrate() before enabling fake quantization")
        layer.mode = "fake"
    return qmodel


def qat_state(qmodel: nn.Module) -> dict[str, Any]:
    """The activation parameters a QAT checkpoint needs beside ``state_dict()``
    (they are not tensors of the module): per layer, scale, zero point, range."""
    out: dict[str, Any] = {}
    for name, layer in quant_layers(qmodel).items():
        entry: dict[str, Any] = {"mode": layer.mode}
        if layer.act_qp is not None:
            entry["act"] = layer.act_qp.to_dict()
        if layer.ema is not None:
            entry["ema"] = [float(layer.ema[0]), float(layer.ema[1])]
        out[name] = entry
    return out


def load_qat_state(qmodel: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Restore :func:`qat_state` into a model from :func:`prepare` (same config)."""
    from engine.quant.observers import MinMaxObserver, QParams

    layers = quant_layers(qmodel)
    if set(layers) != set(state):
        raise ValueError("the QAT state does not match the model's quantized layers")
    for name, layer in layers.items():
        entry = state[name]
        if "act" in entry:
            act = entry["act"]
            layer.act_qp = QParams(torch.tensor(act["scale"]), torch.tensor(act["zero_point"]),
                                   act["qmin"], act["qmax"], act["axis"])  # fmt: skip
        if "ema" in entry:
            layer.ema = (torch.tensor(entry["ema"][0]), torch.tensor(entry["ema"][1]))
        layer.act_observer = MinMaxObserver(False)
        layer.mode = entry["mode"]
    return qmodel


def freeze(qmodel: nn.Module) -> nn.Module:
    """Int8 weights, float weights dropped; ready for ``engine.convert``."""
    for layer in quant_layers(qmodel).values():
        if layer.act_qp is None and not layer.dynamic:
            raise ValueError("calibrate() before freezing")
        layer.freeze()
    return qmodel.eval()


def quantize(
    model: nn.Module,
    calibration: Iterable[Sequence[Any]] | None = None,
    config: QuantConfig = QuantConfig(),
) -> nn.Module:
    """Post-training quantization: prepare, calibrate (static mode), freeze."""
    qmodel = prepare(model, config)
    if config.mode == "static":
        if calibration is None:
            raise ValueError("static quantization needs a calibration set")
        calibrate(qmodel, calibration)
    else:
        for layer in quant_layers(qmodel).values():
            layer.finish_calibration()
    return freeze(qmodel)


def dequantized_copy(qmodel: nn.Module) -> nn.Module:
    """A float copy of a quantized model: each QuantLayer becomes its plain layer
    with the dequantized weights (frozen layers) or its own weights (others).
    Re-quantizing it per channel with min/max gives back the same int8 weights."""
    out = copy.deepcopy(qmodel)
    for name, layer in quant_layers(out).items():
        inner = layer.inner
        if layer.mode == "frozen":
            q = layer.get_buffer("w_int8").float()
            scale = layer.get_buffer("w_scale")
            if layer.kind == "Linear":
                weight = (q * scale[None, :]).t()  # stored [in, out]
            else:
                weight = q * scale.reshape([-1] + [1] * (q.dim() - 1))
            del inner.weight
            inner.weight = nn.Parameter(weight.contiguous())
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, inner)
    return out


def summary(qmodel: nn.Module, model: nn.Module | None = None) -> dict[str, Any]:
    """What the manifest records: per quantized layer its activation parameters
    and weight scale range, the layers kept in float, and weight bytes."""
    layers = {}
    int8_bytes = 0
    for name, layer in quant_layers(qmodel).items():
        entry: dict[str, Any] = {"kind": layer.kind, "dynamic": layer.dynamic}
        if layer.act_qp is not None:
            entry["act"] = {"scale": float(layer.act_qp.scale),
                            "zero_point": int(layer.act_qp.zero_point),
                            "qmin": layer.act_qp.qmin, "qmax": layer.act_qp.qmax}  # fmt: skip
        if layer.mode == "frozen":
            scale: torch.Tensor = layer.get_buffer("w_scale")
            entry["weight_scale"] = [float(scale.min()), float(scale.max())]
            entry["channels"] = int(scale.numel())
            int8_bytes += layer.get_buffer("w_int8").numel()
        layers[name] = entry
    floats = []
    if model is not None:
        floats = [n for n, m in model.named_modules()
                  if isinstance(m, QUANTIZABLE) and n not in layers]  # fmt: skip
    return {"layers": layers, "float_layers": floats, "int8_weight_bytes": int8_bytes}


def _outputs(model: nn.Module, batches: Sequence[Sequence[Any]]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in batches:
            y = model(*batch)
            out.extend(t.float() for t in (y if isinstance(y, (tuple, list)) else (y,)))
    return out


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g - w).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.pow(2).sum()) for w in want)
    return (num / max(den, 1e-30)) ** 0.5


def sensitivity(
    model: nn.Module,
    calibration: Sequence[Sequence[Any]],
    config: QuantConfig = QuantConfig(),
    evaluation: Sequence[Sequence[Any]] | None = None,
) -> list[tuple[str, float]]:
    """Per layer, the relative output error (``||y_q - y|| / ||y||`` over
    ``evaluation``, default the calibration batches) when only that layer is
    quantized; most sensitive first.  Feed the top names to ``QuantConfig.skip``."""
    evaluation = calibration if evaluation is None else evaluation
    model = model.eval()
    want = _outputs(model, evaluation)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    result = []
    for name in names:
        cfg = QuantConfig(**{**config.to_dict(), "skip": tuple(n for n in names if n != name)})
        q = quantize(model, calibration, cfg)
        result.append((name, _relative_error(_outputs(q, evaluation), want)))
    return sorted(result, key=lambda item: -item[1])
