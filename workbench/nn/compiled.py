"""Living with ``torch.compile``: the module inside a compiled wrapper, and module hooks.

``torch.compile(model)`` returns an ``OptimizedModule`` whose parameter names carry an ``_orig_mod.``
prefix and whose ``forward`` is an instance attribute; the workbench's probes, recorders and
checkpoints work on the module inside (:func:`unwrap_model`), so their names, state dicts and probe
copies are the same whether or not the model was compiled.

The workbench measures through forward hooks (attention and DIA recorders, CAGM guides, IEBN gate
means, the BN-fold discovery). By default dynamo does not guard a compiled graph on the hooks of the
modules it inlined (``torch._dynamo.config.skip_nnmodule_hook_guards``): a hook registered after a
model was compiled is silently never called, so a recorder on a compiled model records nothing (seen
with ``AttentionRecorder`` on a compiled IEBN resnet20: 0 of 19 sites). :func:`watch_hooks` turns
those guards on, so a hook added or removed selects (the first time: compiles) a graph variant that
has, or lacks, it; dynamo keeps the variants side by side. It acts
only once dynamo has been imported (nothing can have been compiled before), which keeps eager-only
sessions free of dynamo's two-second import.
"""

from __future__ import annotations

import sys

from torch import nn

_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def is_compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile(module)`` returns."""
    dynamo = sys.modules.get("torch._dynamo")  # no wrapper can exist before dynamo is imported
    return dynamo is not None and isinstance(module, dynamo.eval_frame.OptimizedModule)


def unwrap_model(model: nn.Module, compiled: bool = True, parallel: bool = True) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (``compiled``) and DistributedDataParallel /
    DataParallel wrappers (``parallel``), however they are nested; stops at the first wrapper of a
    kind not asked for."""
    while True:
        if parallel and isinstance(model, _PARALLEL):
            model = model.module
        elif compiled and is_compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def watch_hooks() -> bool:
    """Make compiled graphs see forward hooks added or removed after compiling; returns whether
    dynamo's hook guards are on (``False`` only when dynamo has not been imported yet)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return False
    if dynamo.config.skip_nnmodule_hook_guards:
        dynamo.config.skip_nnmodule_hook_guards = False
        # graphs compiled without the guards would go on ignoring new hooks: drop them once
        dynamo.reset()
    return True
