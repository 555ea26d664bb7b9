"""Read-only measurements: gradient noise, BN statistics and scales, stage gradient norms, attention
recorders, IEBN gate engagement.

Two shapes: a *probe* (:class:`Probe`) is a training callback that measures on an injected schedule
(:mod:`workbench.probes.schedule`) and keeps a JSON log; a *recorder* (:class:`HookRecorder`) is a
context manager whose forward hooks capture tensors while it is active (the probes that need
activations drive one, as :class:`AttentionMonitor` does)."""

from workbench.probes.attention import (  # noqa: F401
    AttentionAccumulator,
    AttentionMonitor,
    AttentionRecorder,
    AttentionStats,
    attention_sites,
    collect_attention,
)
from workbench.probes.base import Probe, ProbeLog, load_probe_log  # noqa: F401
from workbench.probes.bn_scales import BNScaleProbe  # noqa: F401
from workbench.probes.bn_stats import BNEstimationNoise, bn_input_moments, estimation_noise  # noqa: F401
from workbench.probes.coupling import CouplingGap, coupling_gap  # noqa: F401
from workbench.probes.dia import DIARecorder, dia_cells, gate_summary  # noqa: F401
from workbench.probes.gate import (  # noqa: F401
    GATE_ENGAGEMENT_THRESHOLD,
    GateEngagement,
    GateRecorder,
    gate_engagement,
    gate_engagement_warning,
)
from workbench.probes.grad_norms import StageGradNorms  # noqa: F401
from workbench.probes.gradient_noise import (  # noqa: F401
    DDPGradientNoiseScale,
    GradientNoiseScale,
    two_batch_estimates,
)
from workbench.probes.gsnr import GradientSNR, gsnr_from_micro_gradients  # noqa: F401
from workbench.probes.hooks import HookRecorder  # noqa: F401
from workbench.probes.microbatch import (  # noqa: F401
    batch_gradient,
    micro_batch_gradients,
    micro_batch_gradients_loop,
    probe_copy,
)
from workbench.probes.schedule import StepSchedule, as_schedule  # noqa: F401
