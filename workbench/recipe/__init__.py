"""Run recipes between the experiments and the training loop.

- the run spec of ``workbench train`` (:mod:`.spec`, its nested sections in :mod:`.sections`), the
  builder that turns it into a model, loaders, optimiser and schedule (:mod:`.build`) and the
  callbacks its noise, sparsity and probe sections become (:mod:`.callbacks`);
- the paired-seed trial protocol (:mod:`.trials`, :mod:`.evidence`, :mod:`.pairing`);
- the fair BN statistics of the mix-dataset control (:mod:`.source_stats`).
"""

from workbench.recipe.build import Training, build_training
from workbench.recipe.callbacks import build_callbacks
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
from workbench.recipe.spec import TrainConfig, check_setup, load_config
from workbench.recipe.trials import (
    Trial,
    TrialPoint,
    TrialResult,
    Verdict,
    call_each,
    run_points,
    run_trial,
    verdicts_from_rows,
)

__all__ = [
    "CONFIDENCE", "DIRECTIONS", "STATISTICS", "VERDICTS", "PairedInterval", "SharedWeights", "TrainConfig",
    "Training", "Trial", "TrialPoint", "TrialResult", "Verdict", "build_callbacks", "build_training", "call_each",
    "check_setup", "evaluate_per_source", "interval_from_differences", "load_config", "paired_interval",
    "paired_loader", "paired_models", "power_sentence", "recalibrate_bn", "run_points", "run_trial", "seeds_needed",
    "share_initial_weights", "verdict_word", "verdicts_from_rows",
]
