r"""Paired-difference statistics of the trial protocol: the interval, the verdict and the power.

The effect of a trial is the per-seed paired difference :math:`d_s = B_s - A_s` (treatment arm
minus reference arm, the same seed on both sides). Over :math:`n \ge 2` seeds with mean
:math:`\bar d` and sample standard deviation :math:`s_d` (``ddof=1``):

- **interval** (Student's paired t): :math:`\bar d \pm t_{1-\alpha/2,\,n-1}\, s_d/\sqrt n`, with
  :math:`t` from ``scipy.stats.t`` and :math:`1-\alpha` the confidence (0.95 by default);
- **verdict**, in words, relative to the direction the claim states (``"greater"``: the claim says
  B's metric is higher than A's; ``"less"``: lower): ``"supports"`` when the interval excludes 0
  on the claimed side, ``"contradicts"`` when it excludes 0 on the other side, ``"inconclusive"``
  when it contains 0 (an end exactly at 0 counts as containing it);
- **power** (seeds a decisive answer would need): the smallest :math:`n \ge 2` with
  :math:`t_{1-\alpha/2,\,n-1}\, s_d/\sqrt n < |\bar d|`, i.e. the number of seeds at which an
  interval of the observed spread around the observed effect would exclude 0. This is a planning
  figure that takes the observed effect and spread at face value (about a coin flip of getting a
  decisive interval at that n, not an 80% power calculation); it is ``None`` ("not reachable")
  when the observed effect is 0 or would need more than ``max_seeds`` seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
DIRECTIONS = ("greater", "less")
VERDICTS = ("supports", "contradicts", "inconclusive")
MIN_SEEDS = 2
MAX_SEEDS = 1000


def check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is not valid; allowed: a number in (0, 1), e.g. 0.95")
    return float(confidence)


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not valid; allowed: {DIRECTIONS} (the claim says the "
                         "treatment arm's metric is greater / less than the reference arm's)")
    return direction


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference ``treatment - reference`` over ``n`` seeds and its t-interval."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float
    t: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


def _t_quantile(confidence: float, df: int | np.ndarray) -> float | np.ndarray:
    """Student's t quantile of a two-sided ``confidence`` interval with ``df`` degrees of freedom."""
    from scipy import stats  # imported here: it takes seconds, and `workbench train` imports this package

    return stats.t.ppf(0.5 + confidence / 2, df=df)


def interval_from_differences(differences: Sequence[float], confidence: float = CONFIDENCE) -> PairedInterval:
    """The t-interval of the mean of ``differences`` (one per seed; at least 2, all finite)."""
    confidence = check_confidence(confidence)
    d = np.asarray([float(v) for v in differences], dtype=np.float64)
    if d.size < MIN_SEEDS:
        raise ValueError(f"{d.size} paired difference(s) given; allowed: at least {MIN_SEEDS} seeds for an interval")
    if not np.isfinite(d).all():
        raise ValueError(f"differences={d.tolist()!r} hold a NaN or infinity; allowed: finite numbers")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    t = float(_t_quantile(confidence, d.size - 1))
    half = t * sd / math.sqrt(d.size)
    return PairedInterval(n=int(d.size), mean=mean, sd=sd, low=mean - half, high=mean + half,
                          confidence=confidence, t=t)


def paired_interval(reference: Sequence[float], treatment: Sequence[float],
                    confidence: float = CONFIDENCE) -> PairedInterval:
    """The interval of ``treatment - reference``, paired element by element (index = seed)."""
    if len(reference) != len(treatment):
        raise ValueError(f"reference has {len(reference)} values and treatment {len(treatment)}; allowed: one "
                         "value per seed on both sides")
    return interval_from_differences([b - a for a, b in zip(reference, treatment)], confidence)


def verdict_word(interval: PairedInterval, direction: str) -> str:
    """``"supports"``, ``"contradicts"`` or ``"inconclusive"`` (see the module docstring)."""
    check_direction(direction)
    if interval.contains_zero():
        return "inconclusive"
    above = interval.low > 0
    return "supports" if above == (direction == "greater") else "contradicts"


def seeds_needed(mean: float, sd: float, confidence: float = CONFIDENCE, max_seeds: int = MAX_SEEDS) -> int | None:
    """Smallest ``n >= 2`` with ``t_{(1+confidence)/2, n-1} * sd / sqrt(n) < |mean|``; ``None`` when the
    effect is 0 or that ``n`` exceeds ``max_seeds`` (see the module docstring)."""
    confidence = check_confidence(confidence)
    if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < MIN_SEEDS:
        raise ValueError(f"max_seeds={max_seeds!r} is not valid; allowed: an integer >= {MIN_SEEDS}")
    if not (math.isfinite(mean) and math.isfinite(sd)) or sd < 0:
        raise ValueError(f"mean={mean!r}, sd={sd!r} are not valid; allowed: finite numbers, sd >= 0")
    if mean == 0:
        return None
    n = np.arange(MIN_SEEDS, max_seeds + 1)
    half_widths = _t_quantile(confidence, n - 1) * sd / np.sqrt(n)
    decisive = np.nonzero(half_widths < abs(mean))[0]
    return int(n[decisive[0]]) if decisive.size else None


def power_sentence(interval: PairedInterval, max_seeds: int = MAX_SEEDS) -> str:
    """How many seeds a decisive answer would need, in words, from the observed effect and spread."""
    needed = seeds_needed(interval.mean, interval.sd, interval.confidence, max_seeds)
    observed = f"observed paired effect {interval.mean:+.4g}, paired SD {interval.sd:.4g}"
    if needed is None:
        return f"a decisive answer is not reachable (within {max_seeds} seeds) at the {observed}"
    return f"a decisive answer would need about {needed} seeds at the {observed} ({interval.n} seeds run)"
