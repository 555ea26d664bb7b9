"""Write-side instrumentation: batch-statistic noise injection (IEBN's noise attacks).

``batch_stat_noise`` perturbs the statistics each normalisation layer uses in training mode; the
mix-dataset attack is a data set and lives in :mod:`workbench.data.mixed`.
"""

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
    "batch_stat_noise",
    "make_schedule",
    "normalization_layers",
    "select_layers",
]
