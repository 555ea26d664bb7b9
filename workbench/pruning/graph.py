"""Torch-Pruning dependency graph for a model, with the couplings and heads a segmentation net needs.

- Tracing runs the model in *training* mode with every norm layer in eval mode: auxiliary heads
  that only run in training (PSPNet, ICNet) are traced and pruned consistently, while no running
  statistic moves and batch-size-1 inputs are fine. The RNG state (dropout) is restored afterwards.
- Outputs may be a tensor, a tuple/list or a dict (torchvision's ``{"out", "aux"}``); all of them
  are traced (Torch-Pruning's ``output_transform``).
- Couplings the autograd graph cannot show (SegNet's pooling indices) come from the model's
  ``pruning_couplings()`` method and/or the ``couplings`` argument: pairs of layers whose output
  channels must be pruned together, added to the graph as two-way dependencies.
- A DIA-LSTM cell is one node for the tracer: during tracing its forward runs inside an opaque
  autograd function whose only inputs are ``z``, ``h`` and ``c``, so the tracer does not walk
  through the cell's Linear layers and gate chunks (which it would take for channel-preserving
  element-wise ops); :class:`~workbench.pruning.pruners.DIAPruner` then prunes its insides.
- The layers producing each output (classifier and auxiliary classifiers) are found by walking back
  from the graph's outputs to the nearest conv/linear layer: they keep their class count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from workbench.nn.norms import is_norm
from workbench.pruning.pruners import default_customized_pruners, is_dia_cell

Coupling = tuple[nn.Module, nn.Module]


def as_args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    return tp.utils.flatten_as_list(outputs)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (tracing flips them)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class _Opaque(torch.autograd.Function):
    """Run ``fn`` without recording its insides: one graph node from the tensor inputs to the outputs."""

    @staticmethod
    def forward(ctx: Any, fn: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in fn(*tensors))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # pragma: no cover - tracing never back-propagates
        raise RuntimeError("the opaque tracing node is for dependency tracing only")


@contextlib.contextmanager
def opaque_cells(model: nn.Module) -> Iterator[None]:
    """While tracing, make every DIA-LSTM cell a single node ``(z, h, c) -> (h', c')``."""
    cells = [m for m in model.modules() if is_dia_cell(m)]
    for cell in cells:
        def forward(z: torch.Tensor, state: tuple, _cell: nn.Module = cell) -> tuple:
            def run(z_: torch.Tensor, h_: torch.Tensor, c_: torch.Tensor) -> tuple:
                return type(_cell).forward(_cell, z_, (h_, c_))
            return _Opaque.apply(run, z, *state)
        cell.forward = forward
    try:
        yield
    finally:
        for cell in cells:
            del cell.forward


def _trace_forward(model: nn.Module, inputs: Any) -> Any:
    model.train()
    for m in model.modules():
        if is_norm(m):
            m.eval()
    devices = [a.device for a in as_args(inputs) if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        return model(*as_args(inputs))


def dry_run(model: nn.Module, example_inputs: Any) -> Any:
    """One forward in the tracing mode, without gradients; the model's modes are restored."""
    with preserved_modes(model), torch.no_grad():
        return _trace_forward(model, example_inputs)


def model_couplings(model: nn.Module) -> list[Coupling]:
    fn = getattr(model, "pruning_couplings", None)
    return list(fn()) if callable(fn) else []


def build_graph(model: nn.Module, example_inputs: Any, customized_pruners: dict | None = None,
                couplings: Iterable[Coupling] = ()) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning ``DependencyGraph`` with the workbench's custom pruners."""
    pruners = default_customized_pruners(model)
    pruners.update(customized_pruners or {})
    with preserved_modes(model), torch.enable_grad(), opaque_cells(model):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=as_args(example_inputs), forward_fn=_trace_forward,
            output_transform=flatten_outputs, customized_pruners=pruners, verbose=False)
    for a, b in [*model_couplings(model), *couplings]:
        add_coupling(graph, a, b)
    return graph


def add_coupling(graph: tp.DependencyGraph, a: nn.Module, b: nn.Module) -> None:
    """Make pruning ``a``'s output channels prune the same channels of ``b``'s output, and back."""
    nodes = []
    for layer in (a, b):
        if layer not in graph.module2node:
            raise ValueError(f"coupled layer {type(layer).__name__} is not in the traced graph; "
                             "couplings must name layers the forward pass uses")
        nodes.append(graph.module2node[layer])
    na, nb = nodes
    fa = graph.get_pruner_of_module(a).prune_out_channels
    fb = graph.get_pruner_of_module(b).prune_out_channels
    if graph.get_out_channels(a) != graph.get_out_channels(b):
        raise ValueError(f"coupled layers have different channel counts: {graph.get_out_channels(a)} vs "
                         f"{graph.get_out_channels(b)}")
    na.dependencies.append(tp.Dependency(trigger=fa, handler=fb, source=na, target=nb))
    nb.dependencies.append(tp.Dependency(trigger=fb, handler=fa, source=nb, target=na))


PRUNABLE_LEAVES = (nn.modules.conv._ConvNd, nn.Linear)


def output_heads(graph: tp.DependencyGraph) -> list[nn.Module]:
    """The conv/linear layers nearest to each model output (walking back through parameter-free ops)."""
    sinks = [node for node in graph.module2node.values() if not node.outputs]
    heads: list[nn.Module] = []
    seen = set()
    stack = list(sinks)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = node.module
        if isinstance(module, PRUNABLE_LEAVES):
            if module not in heads:
                heads.append(module)
            continue
        if node.type == tp.ops.OPTYPE.CUSTOMIZED:
            continue
        stack.extend(node.inputs)
    return heads


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in model.named_modules()}


def resolve_layers(model: nn.Module, layers: Sequence[nn.Module | str] | None, what: str) -> list[nn.Module]:
    """Turn a list of modules or dotted names into modules of ``model`` (ValueError on unknown names)."""
    if layers is None:
        return []
    named = dict(model.named_modules())
    own = set(named.values())
    out = []
    for item in layers:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"{what}: no submodule named {item!r} in {type(model).__name__}")
            out.append(named[item])
        elif isinstance(item, nn.Module):
            if item not in own:
                raise ValueError(f"{what}: {type(item).__name__} is not a submodule of {type(model).__name__}")
            out.append(item)
        else:
            raise ValueError(f"{what}: entries must be nn.Module or names, got {type(item).__name__}")
    return out
