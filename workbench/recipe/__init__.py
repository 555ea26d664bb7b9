"""Run recipes between the experiments and the training loop: the paired-seed trial protocol
(:mod:`.trials`, :mod:`.evidence`, :mod:`.pairing`) and the fair BN statistics of the mix-dataset
control (:mod:`.source_stats`)."""

from workbench.recipe.evidence import (
    CONFIDENCE,
    DIRECTIONS,
    VERDICTS,
    PairedInterval,
    interval_from_differences,
    paired_interval,
    power_sentence,
    seeds_needed,
    verdict_word,
)
from workbench.recipe.pairing import SharedWeights, paired_loader, paired_models, share_initial_weights
from workbench.recipe.source_stats import STATISTICS, evaluate_per_source, recalibrate_bn
from workbench.recipe.trials import Trial, TrialPoint, TrialResult, Verdict, run_trial, verdicts_from_rows

__all__ = [
    "CONFIDENCE", "DIRECTIONS", "STATISTICS", "VERDICTS", "PairedInterval", "SharedWeights", "Trial", "TrialPoint",
    "TrialResult", "Verdict", "evaluate_per_source", "interval_from_differences", "paired_interval",
    "paired_loader", "paired_models", "power_sentence", "recalibrate_bn", "run_trial", "seeds_needed",
    "share_initial_weights", "verdict_word", "verdicts_from_rows",
]
