"""Conversion: capture a PyTorch model with ``torch.export``, run the graph
passes, verify against eager PyTorch, and write a ``.ds`` artifact with an
exported program (PyTorch backend) and an ONNX graph (ONNX Runtime backend).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.export import Dim, ExportedProgram

from engine.artifact import Manifest, TensorSpec, torch_save_bytes, write_artifact

__all__ = ["convert", "ConversionError", "PRECISIONS", "Dim"]

log = logging.getLogger("engine.conversion")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ConversionError(RuntimeError):
    """The model could not be captured, exported or verified."""


def _load_model(model: Any, example_inputs: tuple[Any, ...]) -> torch.nn.Module | ExportedProgram:
    if isinstance(model, (torch.nn.Module, ExportedProgram)):
        return model
    path = Path(model)
    if not path.is_file():
        raise ConversionError(f"model file not found: {path}")
    if path.suffix == ".pt2":
        return torch.export.load(str(path))
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ConversionError(
            f"{path} is neither a TorchScript file nor a saved ExportedProgram (.pt2): {exc}"
        ) from None
    # Frozen, its weights are graph constants: export lifts them as constants
    # instead of as parameters that are not nn.Parameter objects.
    return _Scripted(torch.jit.freeze(scripted.eval()))


class _Scripted(torch.nn.Module):
    """A TorchScript module behind an ordinary forward: non-strict export traces
    the ATen ops the TorchScript interpreter dispatches, giving a clean graph."""

    def __init__(self, scripted: torch.nn.Module) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, *args: Any) -> Any:
        return self.scripted(*args)


def _names(model: Any, count: int, given: Sequence[str] | None, prefix: str) -> list[str]:
    if given is not None:
        if len(given) != count:
            raise ConversionError(f"{len(given)} {prefix} names for {count} {prefix}s")
        return list(given)
    if prefix == "input" and isinstance(model, torch.nn.Module):
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) >= count:
            return params[:count]
    return [f"{prefix}_{i}" for i in range(count)]


def _cast_inputs(inputs: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(
        x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )


def _source_hash(model: Any) -> str:
    h = hashlib.sha256()
    state = model.state_dict if isinstance(model, ExportedProgram) else model.state_dict()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(type(model).__name__.encode())
    return h.hexdigest()


def _specs(
    ep: ExportedProgram, names: list[str], dynamic_shapes: Any, kind: str,
    labels: dict[str, str],
) -> tuple[TensorSpec, ...]:  # fmt: skip
    """Tensor specs with dynamic dims named after the user's ``Dim``s.

    ``labels`` maps export symbols (``s77``) to those names; input specs fill
    it, so output dims that equal an input dim get the same name.
    """
    nodes = (
        [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in _user_inputs(ep)]
        if kind == "input"
        else list(next(n for n in ep.graph.nodes if n.op == "output").args[0])
    )
    ranges = {str(sym): (int(r.lower), int(r.upper)) for sym, r in ep.range_constraints.items()}
    dim_names = _dim_names(dynamic_shapes, len(nodes)) if kind == "input" else {}
    specs = []
    for i, (node, name) in enumerate(zip(nodes, names)):
        val = node.meta["val"]
        shape: list[int | str] = []
        dims: dict[str, tuple[int, int]] = {}
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            sym = str(size)
            label = labels.setdefault(sym, dim_names.get((i, d), sym))
            shape.append(label)
            if sym in ranges:
                lo, hi = ranges[sym]
                dims[label] = (lo, min(hi, 2**31 - 1))
        specs.append(TensorSpec(name, str(val.dtype).removeprefix("torch."), tuple(shape), dims))
    return tuple(specs)


def _user_inputs(ep: ExportedProgram) -> list[str]:
    return list(ep.graph_signature.user_inputs)


def _dim_names(dynamic_shapes: Any, count: int) -> dict[tuple[int, int], str]:
    out: dict[tuple[int, int], str] = {}
    if dynamic_shapes is None:
        return out
    specs = list(dynamic_shapes.values()) if isinstance(dynamic_shapes, dict) else dynamic_shapes
    for i, spec in enumerate(list(specs)[:count]):
        items = spec.items() if isinstance(spec, dict) else enumerate(spec or ())
        for d, dim in items:
            if dim is not None and hasattr(dim, "__name__"):
                out[(i, d)] = dim.__name__
    return out


def _max_errors(ref: list[torch.Tensor], got: list[np.ndarray]) -> dict[str, float]:
    max_abs = max_rel = 0.0
    for r, g in zip(ref, got, strict=True):
        r64 = r.detach().double().cpu().numpy()
        diff = np.abs(r64 - np.asarray(g, dtype=np.float64))
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        scale = np.maximum(np.abs(r64), 1e-6)
        max_rel = max(max_rel, float((diff / scale).max(initial=0.0)))
    return {"max_abs": max_abs, "max_rel": max_rel}


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    raise ConversionError(f"unsupported model output type {type(out).__name__}")


def _onnx_bytes(ep: ExportedProgram, args: tuple[Any, ...], inputs: list[str],
                outputs: list[str]) -> bytes:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        program = torch.onnx.export(
            ep, args, dynamo=True, input_names=inputs, output_names=outputs, verbose=False
        )
        if program is None:
            raise ConversionError("torch.onnx.export produced no program")
        program.save(path, external_data=False)
        return Path(path).read_bytes()


def _onnx_run(
    data: bytes, names: list[str], args: tuple[Any, ...], quantized: bool = False
) -> list[np.ndarray]:
    from engine.backends import OnnxBackend

    return OnnxBackend(data, quantized=quantized).run([a.detach().cpu().numpy() for a in args])


def _onnx_dynamic_int8(float_onnx: bytes, per_channel: bool) -> bytes:
    """ONNX Runtime's own dynamic quantization of the float graph: int8 weights,
    activations quantized at run time (DynamicQuantizeLinear + MatMulInteger)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        # 7-bit weights (reduce_range): MatMulInteger's uint8 x int8 kernel on x86
        # without VNNI saturates int16 pair sums at 8 bits (engine.backends.
        # int8_dot_saturates); at 7 bits no sum can, so the artifact computes the
        # same on every CPU (measured on an AVX2-only EPYC: 3.1% relative error
        # at 8 bits, under 3% at 7).
        quantize_dynamic(onnx.load_from_string(float_onnx), out, per_channel=per_channel,
                         weight_type=QuantType.QInt8, reduce_range=True)  # fmt: skip
        return out.read_bytes()


def _versions() -> dict[str, str]:
    """The versions that wrote an artifact.  The engine's is its distribution's,
    from package metadata: the engine knows nothing of the layers above it."""
    from importlib.metadata import PackageNotFoundError, version

    import onnx
    import onnxruntime

    try:
        engine = version("dsstream")  # the distribution that ships the engine
    except PackageNotFoundError:  # run from a source tree that was never installed
        engine = "unknown"
    return {
        "torch": torch.__version__,
        "engine": engine,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _is_quantized(model: Any) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    from engine.quant.modules import QuantLayer

    return any(isinstance(m, QuantLayer) for m in model.modules())


def _quantize(
    source: Any, args: tuple, quantize: Any, calibration: Iterable[Sequence[Any]] | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The INT8 model to export and what the manifest says about it."""
    from engine.quant import QuantConfig, calibrate, freeze, prepare, quant_layers, summary

    if not isinstance(source, torch.nn.Module) or isinstance(source, _Scripted):
        raise ConversionError(
            "quantization needs an nn.Module with its layers (a TorchScript or .pt2 file "
            "hides them): pass the Python model"
        )
    if _is_quantized(source):  # quantized by the caller (PTQ or QAT): freeze if needed
        qmodel = copy.deepcopy(source)
        layers = quant_layers(qmodel)
        if any(layer.mode != "frozen" for layer in layers.values()):
            freeze(qmodel)
        float_model = None
        dynamic = all(layer.dynamic for layer in layers.values())
        cfg = {"prequantized": True, "mode": "dynamic" if dynamic else "static",
               "per_channel": all(layer.per_channel for layer in layers.values())}  # fmt: skip
        count = None
    else:
        config = QuantConfig() if quantize is True else quantize
        if not isinstance(config, QuantConfig):
            raise ConversionError(f"quantize must be True or a QuantConfig, got {quantize!r}")
        batches = list(calibration) if calibration is not None else []
        try:
            qmodel = prepare(source, config)
            count = calibrate(qmodel, batches) if config.mode == "static" else len(batches)
            if config.mode == "dynamic":
                for layer in quant_layers(qmodel).values():
                    layer.finish_calibration()
            freeze(qmodel)
        except ValueError as exc:
            raise ConversionError(f"quantization failed: {exc}") from exc
        float_model = source
        cfg = config.to_dict()
    info: dict[str, Any] = {"config": cfg, "calibration_batches": count,
                            **summary(qmodel, float_model)}  # fmt: skip
    if float_model is not None:
        with torch.no_grad():
            want = _flat_outputs(float_model(*args))
            got = _flat_outputs(qmodel(*args))
        info["error_vs_float"] = _max_errors(want, [g.float().numpy() for g in got])
    return qmodel.eval(), info


def _check_targets(precision: str, backends: Sequence[str]) -> None:
    if precision not in PRECISIONS:
        raise ConversionError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "bf16" and "onnx" in backends:
        raise ConversionError(
            "ONNX Runtime's CPU provider has no bfloat16 kernels (Add, MatMul fail to load): "
            "convert bf16 with backends=('torch',), for a GPU"
        )
    unknown = set(backends) - {"torch", "onnx"}
    if unknown or not backends:
        raise ConversionError(f"backends must be among 'torch', 'onnx', got {list(backends)}")


def _capture(
    source: Any, args_p: tuple[Any, ...], dtype: torch.dtype, dynamic_shapes: Any
) -> ExportedProgram:
    """An ExportedProgram of ``source`` at ``dtype`` that the passes may rewrite."""
    try:
        if isinstance(source, ExportedProgram):
            # The passes rewrite in place; a serialization round trip copies the
            # caller's program (deepcopy renames placeholders like "input").
            return torch.export.load(io.BytesIO(torch_save_bytes(source)))
        # A copy: casting an nn.Module is in place, and the caller's model stays fp32.
        module = copy.deepcopy(source).to(dtype) if dtype != torch.float32 else source
        return torch.export.export(module, args_p, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many types; say what failed
        raise ConversionError(f"torch.export could not capture the model: {exc}") from exc


def _float_onnx(
    float_source: torch.nn.Module,
    args_p: tuple[Any, ...],
    dynamic_shapes: Any,
    passes: Sequence[str] | None,
    names_in: list[str],
    names_out: list[str],
) -> bytes:
    """The float graph's ONNX, which ONNX Runtime quantizes its own way (integer
    kernels); a model frozen by the caller gives its float twin back exactly."""
    from engine.passes import DEFAULT_PASSES, run_passes

    if _is_quantized(float_source):
        from engine.quant import dequantized_copy, freeze

        float_source = dequantized_copy(freeze(copy.deepcopy(float_source)))
    float_ep = torch.export.export(float_source, args_p, dynamic_shapes=dynamic_shapes,
                                   strict=False)  # fmt: skip
    float_ep, _ = run_passes(float_ep, DEFAULT_PASSES if passes is None else passes)
    return _onnx_bytes(float_ep, args_p, names_in, names_out)


# Longer than our ~60-line bound: the conversion recipe, each step (capture,
# passes, per-backend export, verification, manifest) feeding the next; the
# steps themselves are the functions above.
def convert(
    model: Any,
    example_inputs: Sequence[Any],
    dynamic_shapes: Any = None,
    precision: str = "fp32",
    output: str | Path = "model.ds",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    backends: Sequence[str] = ("torch", "onnx"),
    passes: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    state: Sequence[Any] = (),
    quantize: Any = None,
    calibration: Iterable[Sequence[Any]] | None = None,
) -> Path:
    """Convert ``model`` into a ``.ds`` artifact at ``output``.

    ``model``: an ``nn.Module``, an ``ExportedProgram``, or a path to a
    TorchScript file or a saved ExportedProgram (``.pt2``).
    ``example_inputs``: positional tensors; ``dynamic_shapes``: as for
    ``torch.export.export`` (``Dim("T", min=1, max=4000)`` per dynamic dim).
    ``passes``: graph pass names (default: all, see ``engine.passes``).
    ``state``: :class:`engine.sessions.StateSpec` entries for a streaming model
    whose state tensors are explicit inputs and outputs.
    ``quantize``: ``True`` or an :class:`engine.quant.QuantConfig` for INT8
    (static needs ``calibration``: batches of positional inputs); or an
    ``nn.Module`` already quantized with ``engine.quant``.  The manifest's
    ``extra["quantization"]`` records the configuration, the calibration size,
    per-layer parameters and the error against the float model.
    Returns the artifact path.  Raises :class:`ConversionError`.
    """
    from engine.passes import DEFAULT_PASSES, run_passes

    _check_targets(precision, backends)
    args = tuple(example_inputs)
    source = _load_model(model, args)
    if isinstance(source, torch.nn.Module):
        source = source.eval()
    quant_info = None
    float_source = source
    if quantize or _is_quantized(source):
        if precision != "fp32":
            raise ConversionError(
                "INT8 quantization keeps float32 activations: use precision='fp32'"
            )
        source, quant_info = _quantize(source, args, quantize, calibration)
    with torch.no_grad():
        reference = _flat_outputs(
            source.module()(*args) if isinstance(source, ExportedProgram) else source(*args)
        )
    dtype = PRECISIONS[precision]
    args_p = _cast_inputs(args, dtype)
    ep = _capture(source, args_p, dtype, dynamic_shapes)
    source_hash = _source_hash(source)
    ep, applied = run_passes(ep, DEFAULT_PASSES if passes is None else passes)
    names_in = _names(source, len(args), input_names, "input")
    names_out = _names(source, len(reference), output_names, "output")
    members: dict[str, bytes] = {}
    errors: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        got = _flat_outputs(ep.module()(*args_p))
    errors["torch"] = _max_errors(reference, [g.float().numpy() for g in got])
    if "torch" in backends:
        members["torch/program.pt2"] = torch_save_bytes(ep)
    if "onnx" in backends:
        dynamic = quant_info is not None and quant_info["config"].get("mode") == "dynamic"
        try:
            if dynamic and quant_info is not None and isinstance(float_source, torch.nn.Module):
                float_onnx = _float_onnx(float_source, args_p, dynamic_shapes, passes,
                                         names_in, names_out)  # fmt: skip
                onnx_data = _onnx_dynamic_int8(float_onnx, quant_info["config"]["per_channel"])
            else:
                onnx_data = _onnx_bytes(ep, args_p, names_in, names_out)
        except Exception as exc:
            raise ConversionError(f"ONNX export failed: {exc}") from exc
        members["onnx/model.onnx"] = onnx_data
        run = _onnx_run(onnx_data, names_in, args_p, quantized=bool(quant_info))
        errors["onnx"] = _max_errors(reference, run)
    labels: dict[str, str] = {}
    manifest = Manifest(
        inputs=_specs(ep, names_in, dynamic_shapes, "input", labels),
        outputs=_specs(ep, names_out, None, "output", labels),
        precision=precision,
        backends=tuple(b for b in ("torch", "onnx") if b in backends),
        source_hash=source_hash,
        versions=_versions(),
        conversion_error=errors,
        passes=tuple(applied),
        extra={**(extra or {}), **({"quantization": quant_info} if quant_info else {})},
    )
    if state:
        from dataclasses import asdict, replace

        from engine.sessions import validate_state

        validate_state(manifest, state)
        manifest = replace(manifest, extra={**manifest.extra, "state": [asdict(s) for s in state]})
    log.info("converted to %s (errors %s)", output, errors)
    return write_artifact(output, manifest, members)
