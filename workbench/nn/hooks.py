"""Module hooks under ``torch.compile``.

The workbench measures through forward hooks (attention and DIA recorders, CAGM guides, IEBN gate
means, the BN-fold discovery). By default dynamo does not guard a compiled graph on the hooks of the
modules it inlined (``torch._dynamo.config.skip_nnmodule_hook_guards``): a hook registered after a
model was compiled is silently never called, so a recorder on a compiled model records nothing (seen
with ``AttentionRecorder`` on a compiled IEBN resnet20: 0 of 19 sites). :func:`watch_hooks` turns
those guards on, so adding or removing a hook recompiles the graphs that use the module. It acts
only once dynamo has been imported (nothing can have been compiled before), which keeps eager-only
sessions free of dynamo's two-second import.
"""

from __future__ import annotations

import sys


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
