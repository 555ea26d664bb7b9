"""BN-scale sparsity (Network Slimming, CAP's CAGM + CAGS), channel pruning with Torch-Pruning, cost."""

from workbench.pruning.cagm import CAGM, CAGMSet, attach_cagms, compute_guidance, default_sites
from workbench.pruning.cost import count_flops, count_params, measure_latencies, measure_latency, preferred_round_to
from workbench.pruning.flops_target import FLOPS_TOLERANCE, check_flops_target, flops_floor, prune_to_flops
from workbench.pruning.fold import fold_batchnorm
from workbench.pruning.importance import EffectiveScaleImportance, effective_scale, iebn_mean_attention
from workbench.pruning.prune import (
    METHODS,
    PruneCost,
    PrunePlan,
    PruneReport,
    apply_plan,
    measure_cost,
    plan_pruning,
    prune,
)
from workbench.pruning.pruners import DIAPruner, PerChannelNormPruner, default_customized_pruners
from workbench.pruning.serialization import attach_spec, build_from_spec, load_pruned, make_spec, save_pruned
from workbench.pruning.sparsity import (
    BNScaleSparsity,
    CAGSSparsity,
    bn_scales,
    default_lambda,
    soft_threshold_,
    sparsity_fraction,
)

__all__ = [
    "BNScaleSparsity", "CAGM", "CAGMSet", "CAGSSparsity", "DIAPruner",
    "EffectiveScaleImportance", "FLOPS_TOLERANCE", "METHODS", "PerChannelNormPruner", "PruneCost", "PrunePlan",
    "PruneReport", "apply_plan", "attach_cagms", "attach_spec", "bn_scales", "build_from_spec",
    "check_flops_target", "compute_guidance", "count_flops", "count_params", "default_customized_pruners",
    "default_lambda", "default_sites", "effective_scale", "flops_floor", "fold_batchnorm", "iebn_mean_attention",
    "load_pruned", "make_spec", "measure_cost", "measure_latencies", "measure_latency", "plan_pruning",
    "preferred_round_to", "prune", "prune_to_flops", "save_pruned", "soft_threshold_", "sparsity_fraction",
]

