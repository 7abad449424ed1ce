"""Graph passes on an ``ExportedProgram`` (ATen-level graph, lifted weights).

Each pass rewrites the graph in place and returns how many sites it changed;
a pass that finds nothing to do leaves the program untouched.  The converter
verifies the rewritten program against eager PyTorch and records every pass
in the manifest.

- ``fold_batchnorm_into_conv``: ``bn(conv(x))`` in eval mode becomes one conv:
  ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
- ``fold_layernorm_into_linear``: ``linear(layer_norm(x; gamma, beta))`` becomes
  ``linear'(layer_norm(x))`` with ``W' = W diag(gamma)``, ``b' = W beta + b``.
- ``constant_folding``: computations over weights only are done once, at conversion.
- ``dead_code_elimination``: unused nodes and the weights only they used go.

Not a conversion pass: :func:`fuse_layernorm_linear` swaps ``linear(layer_norm(x))``
for the custom op ``dsstream::layernorm_linear`` (kernels/).  The PyTorch backend
applies it when it loads a program onto a GPU, so artifacts stay portable (ONNX
Runtime knows no such op) and the fused Triton kernel runs where it exists.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import Node

__all__ = [
    "DEFAULT_PASSES",
    "PASSES",
    "run_passes",
    "fuse_layernorm_linear",
    "fuse_int8_linear",
]

aten = torch.ops.aten
_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


class _Weights:
    """Read and write the tensors behind an exported program's weight placeholders."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs}

    def is_weight(self, node: Any) -> bool:
        spec = self.specs.get(getattr(node, "name", None)) if isinstance(node, Node) else None
        return spec is not None and spec.kind in _WEIGHT_KINDS

    def get(self, node: Any) -> torch.Tensor:
        spec = self.specs[node.name]
        store = self.ep.state_dict if spec.target in self.ep.state_dict else self.ep.constants
        return store[spec.target].detach()

    def set(self, node: Any, value: torch.Tensor) -> None:
        spec = self.specs[node.name]
        if spec.target in self.ep.state_dict:
            self.ep.state_dict[spec.target] = torch.nn.Parameter(value, requires_grad=False)
        else:
            self.ep.constants[spec.target] = value
        node.meta["val"] = _fake_like(node, value)

    def add(self, name: str, value: torch.Tensor, like: Any) -> Node:
        """A new buffer placeholder holding ``value``, placed before the user inputs."""
        graph = self.ep.graph
        first_user = next(n for n in graph.nodes if n.op == "placeholder" and not self.is_weight(n))
        target = f"_engine_folded.{name}"
        with graph.inserting_before(first_user):
            node = graph.placeholder(f"b__engine_folded_{name}")
        node.meta["val"] = _fake_like(like, value)
        specs = list(self.ep.graph_signature.input_specs)
        index = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
        spec = InputSpec(InputKind.BUFFER, TensorArgument(node.name), target, persistent=True)
        specs.insert(index, spec)
        self.ep.graph_signature.input_specs[:] = specs
        self.ep.state_dict[target] = value
        self.specs[node.name] = spec
        return node

    def drop_unused(self) -> int:
        dropped = 0
        for node in list(self.ep.graph.nodes):
            if node.op == "placeholder" and self.is_weight(node) and not node.users:
                spec = self.specs.pop(node.name)
                self.ep.graph_signature.input_specs.remove(spec)
                self.ep.state_dict.pop(spec.target, None)
                self.ep.constants.pop(spec.target, None)
                self.ep.graph.erase_node(node)
                dropped += 1
        return dropped


def _fake_like(like: Any, value: torch.Tensor) -> Any:
    fake = like.meta.get("val")
    mode = getattr(fake, "fake_mode", None)
    return mode.from_tensor(value, static_shapes=True) if mode is not None else value


def _only_user(node: Any, user: Node) -> bool:
    return len(node.users) == 1 and user in node.users


def fold_batchnorm_into_conv(ep: ExportedProgram) -> int:
    w = _Weights(ep)
    changed = 0
    for bn in list(ep.graph.nodes):
        if bn.op != "call_function" or bn.target != aten.batch_norm.default:
            continue
        conv, gamma, beta, mean, var, training, _momentum, eps, *_ = bn.args
        if training or not isinstance(conv, Node) or conv.target not in _CONVS:
            continue
        if not _only_user(conv, bn):
            continue
        weight, bias = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
        stats = (gamma, beta, mean, var)
        if not (w.is_weight(weight) and _only_user(weight, conv)):
            continue
        if not all(s is None or (w.is_weight(s) and _only_user(s, bn)) for s in stats):
            continue
        if bias is not None and not (w.is_weight(bias) and _only_user(bias, conv)):
            continue
        W = w.get(weight).double()
        c = W.shape[0]
        g = w.get(gamma).double() if gamma is not None else torch.ones(c, dtype=torch.float64)
        b_ = w.get(beta).double() if beta is not None else torch.zeros(c, dtype=torch.float64)
        scale = g / torch.sqrt(w.get(var).double() + eps)
        conv_b = w.get(bias).double() if bias is not None else torch.zeros(c, dtype=torch.float64)
        dtype = w.get(weight).dtype
        new_w = (W * scale.view(-1, *([1] * (W.dim() - 1)))).to(dtype)
        new_b = ((conv_b - w.get(mean).double()) * scale + b_).to(dtype)
        w.set(weight, new_w)
        if bias is not None:
            w.set(bias, new_b)
        else:
            bias_node = w.add(f"{conv.name}_bias", new_b, weight)
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[2] = bias_node
            conv.args = tuple(args)
        bn.replace_all_uses_with(conv)
        ep.graph.erase_node(bn)
        changed += 1
    return changed


def _layernorm_linear_sites(ep: ExportedProgram) -> list[tuple[Any, Any]]:
    """Every ``(layer_norm, linear)`` where the LayerNorm feeds only that Linear."""
    sites = []
    for ln in list(ep.graph.nodes):
        if ln.op != "call_function" or ln.target != aten.layer_norm.default:
            continue
        if len(ln.users) != 1:
            continue
        (linear,) = ln.users
        if linear.target == aten.linear.default and linear.args[0] is ln:
            sites.append((ln, linear))
    return sites


def _swap(ep: ExportedProgram, old: Node, target: Any, args: tuple) -> Node:
    """A call of ``target`` in place of ``old`` (same metadata; ``old`` erased)."""
    with ep.graph.inserting_before(old):
        node = ep.graph.call_function(target, args)
    node.meta = dict(old.meta)
    old.replace_all_uses_with(node)
    ep.graph.erase_node(old)
    return node


def _recompiled(ep: ExportedProgram, changed: int) -> int:
    if changed:
        ep.graph.lint()
        ep.graph_module.recompile()
    return changed


def fold_layernorm_into_linear(ep: ExportedProgram) -> int:
    w = _Weights(ep)
    changed = 0
    for ln, linear in _layernorm_linear_sites(ep):
        x, shape, gamma, beta, *rest = list(ln.args) + [None] * max(0, 4 - len(ln.args))
        if gamma is None and beta is None:
            continue
        weight = linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        if len(shape) != 1 or bias is None:
            continue
        nodes = [(weight, linear), (bias, linear)] + [(p, ln) for p in (gamma, beta) if p]
        if not all(w.is_weight(n) and _only_user(n, user) for n, user in nodes):
            continue
        W = w.get(weight).double()
        g = w.get(gamma).double() if gamma is not None else torch.ones(W.shape[1])
        b = w.get(beta).double() if beta is not None else torch.zeros(W.shape[1])
        dtype = w.get(weight).dtype
        w.set(bias, (w.get(bias).double() + W @ b.double()).to(dtype))
        w.set(weight, (W * g.double()[None, :]).to(dtype))
        ln.args = (x, shape, None, None, *rest)
        changed += 1
    return changed


# Ops whose value depends only on their inputs (no randomness, no mutation).
def _foldable(node: Node, w: _Weights, folded: set[str]) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    if schema.is_mutable or "rand" in node.target.__name__ or "dropout" in node.target.__name__:
        return False
    if node.target.namespace == "quantized_decomposed":
        return False  # int8 weights stay int8: folding their dequantize would store floats
    inputs = node.all_input_nodes
    if not inputs:
        return False
    return all(w.is_weight(n) or n.name in folded for n in inputs) and isinstance(
        node.meta.get("val"), torch.Tensor
    )


def constant_folding(ep: ExportedProgram) -> int:
    w = _Weights(ep)
    values: dict[str, torch.Tensor] = {}
    folded: set[str] = set()
    for node in ep.graph.nodes:
        if _foldable(node, w, folded):
            args = torch.fx.node.map_arg(
                node.args, lambda n: values[n.name] if n.name in values else w.get(n)
            )
            kwargs = torch.fx.node.map_arg(
                node.kwargs, lambda n: values[n.name] if n.name in values else w.get(n)
            )
            values[node.name] = node.target(*args, **kwargs)
            folded.add(node.name)
    # Materialize only the frontier: folded nodes used by something not folded.
    changed = 0
    for node in list(ep.graph.nodes):
        if node.name in folded and any(u.name not in folded for u in node.users):
            const = w.add(node.name, values[node.name].detach().clone(), node)
            node.replace_all_uses_with(const)
            changed += 1
    return changed


def dead_code_elimination(ep: ExportedProgram) -> int:
    before = len(ep.graph.nodes)
    ep.graph.eliminate_dead_code()
    _Weights(ep).drop_unused()
    return before - len(ep.graph.nodes)


def fuse_layernorm_linear(ep: ExportedProgram) -> int:
    """``linear(layer_norm(x, [K], gamma, beta, eps), W, b)`` -> ``dsstream::layernorm_linear``
    wherever the LayerNorm feeds only that Linear.  Returns the sites fused."""
    import kernels  # noqa: F401  (registers torch.ops.dsstream.*)

    changed = 0
    for ln, linear in _layernorm_linear_sites(ep):
        args = list(ln.args) + [None, None, 1e-5][len(ln.args) - 2 :]
        x, shape, gamma, beta, eps = args[:5]
        if len(shape) != 1:
            continue
        weight = linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        fused = (x, gamma, beta, weight, bias, float(eps))
        _swap(ep, linear, torch.ops.dsstream.layernorm_linear.default, fused)
        ep.graph.erase_node(ln)
        changed += 1
    return _recompiled(ep, changed)


def fuse_int8_linear(ep: ExportedProgram) -> int:
    """``matmul(dequantize_per_tensor(q), dequantize_per_channel(w_int8, axis=1))`` (an
    engine.quant Linear) -> ``dsstream::int8_linear(q, ...)``: integer kernels instead
    of a float matmul of dequantized tensors.  Returns the sites fused."""
    import kernels  # noqa: F401  (registers torch.ops.dsstream.*)

    qd = torch.ops.quantized_decomposed
    changed = 0
    for mm in list(ep.graph.nodes):
        if mm.op != "call_function" or mm.target != aten.matmul.default:
            continue
        a, b = mm.args[:2]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            continue
        if a.target != qd.dequantize_per_tensor.default:
            continue
        if b.target != qd.dequantize_per_channel.default or b.args[3] != 1:
            continue
        q, scale, zero, *_ = a.args
        w_q, w_scale = b.args[0], b.args[1]
        if not isinstance(scale, (int, float)) or not isinstance(zero, int):
            continue  # parameters computed at run time: not a frozen static layer
        fused = (q, float(scale), zero, w_q, w_scale)
        _swap(ep, mm, torch.ops.dsstream.int8_linear.default, fused)
        for dead in (a, b):
            if not dead.users:
                ep.graph.erase_node(dead)
        changed += 1
    return _recompiled(ep, changed)


PASSES: dict[str, Callable[[ExportedProgram], int]] = {
    "fold_batchnorm_into_conv": fold_batchnorm_into_conv,
    "fold_layernorm_into_linear": fold_layernorm_into_linear,
    "constant_folding": constant_folding,
    "dead_code_elimination": dead_code_elimination,
}
DEFAULT_PASSES = tuple(PASSES)


def run_passes(
    ep: ExportedProgram, names: Sequence[str]
) -> tuple[ExportedProgram, list[dict[str, Any]]]:
    """Run ``names`` in order; return the program and ``[{"name", "changed"}]``."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known: {', '.join(PASSES)}")
    applied = []
    for name in names:
        changed = PASSES[name](ep)
        if changed:
            ep.graph.lint()
            ep.graph_module.recompile()
        applied.append({"name": name, "changed": changed})
    return ep, applied
