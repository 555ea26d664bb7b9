"""Write-side instrumentation: batch-statistic noise injection (IEBN's noise attacks).

``batch_stat_noise`` perturbs the statistics each normalisation layer uses in training mode; the
mix-dataset attack lives in :mod:`workbench.data.mixed` and is re-exported here.
"""

from workbench.data.mixed import MixedDataset, ShiftedDataset, mixed_digits, per_source_accuracy
from workbench.noise.batch_stat import (
    NOISE_KINDS,
    RUNNING_STATS,
    BatchStatNoise,
    batch_stat_noise,
    normalization_layers,
    select_layers,
)
from workbench.noise.schedule import SCHEDULES, make_schedule

__all__ = [
    "NOISE_KINDS",
    "RUNNING_STATS",
    "SCHEDULES",
    "BatchStatNoise",
    "MixedDataset",
    "ShiftedDataset",
    "batch_stat_noise",
    "make_schedule",
    "mixed_digits",
    "normalization_layers",
    "per_source_accuracy",
    "select_layers",
]
