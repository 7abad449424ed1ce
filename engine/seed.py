"""The seed document's API, working as written, on top of the engine.

``ModelConverter(input_model=..., output_format="ds-engine").convert(quantize=..., precision=...)``
and ``EngineMonitor(engine, metrics=[...]).collect(interval=5)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["ModelConverter", "EngineMonitor"]


class ModelConverter:
    """Convert a model (``nn.Module``, TorchScript file or saved ExportedProgram).

    ``example_inputs`` and ``dynamic_shapes`` are those of :func:`engine.convert`;
    ``output`` defaults to the input file's name with ``.ds``.
    """

    def __init__(
        self,
        input_model: Any,
        output_format: str = "ds-engine",
        example_inputs: Sequence[Any] | None = None,
        dynamic_shapes: Any = None,
        output: str | Path | None = None,
    ) -> None:
        if output_format != "ds-engine":
            raise ValueError(f"output_format must be 'ds-engine', got {output_format!r}")
        if example_inputs is None:
            raise ValueError("example_inputs are needed to capture the model's graph")
        self.input_model = input_model
        self.example_inputs = tuple(example_inputs)
        self.dynamic_shapes = dynamic_shapes
        if output is None:
            stem = Path(input_model).stem if isinstance(input_model, (str, Path)) else "model"
            output = f"{stem}.ds"
        self.output = Path(output)

    def convert(
        self,
        quantize: Any = False,
        precision: str = "fp32",
        calibration: Iterable[Sequence[Any]] | None = None,
    ) -> Path:
        """Write the artifact and return its path.

        ``quantize=True``: INT8, static with ``calibration`` batches (the seed
        document recommends 1000+ samples), dynamic without them; or an
        :class:`engine.quant.QuantConfig`.
        """
        if quantize is True:
            from engine.quant import QuantConfig

            quantize = QuantConfig(mode="static" if calibration is not None else "dynamic")
        from engine.conversion import convert  # torch: the convert extra

        return convert(
            self.input_model,
            self.example_inputs,
            dynamic_shapes=self.dynamic_shapes,
            precision=precision,
            output=self.output,
            quantize=quantize or None,
            calibration=calibration,
        )


def _gpu_util() -> float | str:
    """GPU utilisation in percent from NVML, or ``"unavailable"`` without a GPU."""
    try:
        import pynvml
    except ImportError:
        return "unavailable"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        return "unavailable"


class EngineMonitor:
    """Sample an engine's metrics: ``latency``, ``throughput``, ``gpu_util``,
    ``queue_depth``, ``batch_size``, ``errors``."""

    KNOWN = ("latency", "throughput", "gpu_util", "queue_depth", "batch_size", "errors")

    def __init__(self, engine: Any, metrics: Sequence[str] = ("latency", "throughput")) -> None:
        unknown = [m for m in metrics if m not in self.KNOWN]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(self.KNOWN)}")
        self.engine = engine
        self.metrics = tuple(metrics)

    def collect(self, interval: float = 5.0) -> dict[str, Any]:
        """Watch the engine for ``interval`` seconds; return what it did meanwhile."""
        before = self.engine.stats()
        time.sleep(interval)
        after = self.engine.stats()
        out: dict[str, Any] = {"interval_s": interval}
        done = after["requests"] - before["requests"]
        if "latency" in self.metrics:
            out["latency"] = after["latency"]
        if "throughput" in self.metrics:
            out["throughput_rps"] = done / interval if interval > 0 else 0.0
        if "gpu_util" in self.metrics:
            out["gpu_util"] = _gpu_util()
        if "queue_depth" in self.metrics:
            out["queue_depth"] = after["queue_depth"]
        if "batch_size" in self.metrics:
            out["batch_size_histogram"] = after["batch_size_histogram"]
        if "errors" in self.metrics:
            out["errors"] = after["errors"] - before["errors"]
        return out
