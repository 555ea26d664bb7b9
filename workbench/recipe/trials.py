r"""The trial protocol: every claim the workbench checks is two arms compared on paired seeds.

A :class:`Trial` names the claim, the two arms (``reference`` A first, ``treatment`` B second), the
metric, the direction the claim states (``"greater"``: B's metric is higher than A's, ``"less"``:
lower), the seeds (at least 2) and the settings (e.g. noise levels, FLOPs targets). Running it
calls a per-point function ``run_point(arm, seed, setting) -> {metric: value, ...}`` once per
(setting, seed, arm) and collects:

- **tidy rows**: one per (arm, seed, setting): ``{"arm", "seed", <setting keys>, <metrics>}``,
  JSON-ready (:meth:`TrialResult.to_json` writes ``{"trial", "rows", "verdicts"}`` atomically);
- **one verdict per setting**: the paired differences ``d_s = B_s - A_s``, their mean with a 95%
  Student-t interval, the verdict in words (``"supports"`` / ``"contradicts"`` /
  ``"inconclusive"``) and how many seeds a decisive answer would need. The formulas are in
  :mod:`workbench.recipe.evidence`.

Pairing (same initial weights where shapes allow, same batch order, same noise draws per seed) is
the per-point function's job, with the helpers of :mod:`workbench.recipe.pairing`.

Execution: ``run_point`` must be a pure function of its arguments (no state shared between points,
everything seeded from ``seed``), so points may run in any order and anywhere. :func:`run_trial`
runs them in this process with a progress bar, or through ``executor``: anything with
``concurrent.futures``' ``submit(fn, *args) -> Future`` (a ``ProcessPoolExecutor`` over CPU cores,
each worker limited to its share of the cores as :func:`workbench.sweep.threads_per_point`
computes; on Ray, an adaptor whose ``submit`` starts a task and returns ``ref.future()``):
:func:`workbench.sweep.trial_executor` makes either from the sweep's options (``jobs``, ``executor``,
``gpus_per_point``, a Ray address), and the evidence notebooks take the same names as parameters.
Rows computed elsewhere (another machine, a sweep's results) give the same verdicts through
:func:`verdicts_from_rows`.

A per-point function, in outline (``build``, ``train_set`` and ``accuracy`` are the experiment's)::

    def run_point(arm, seed, setting):
        model = paired_models(build, trial.arms, seed)[arm]
        noise = batch_stat_noise(model, setting["level"], seed=seed)
        fit(model, paired_loader(train_set, 64, seed), epochs=3, callbacks=[noise], progress=False)
        noise.remove()
        return {"acc": accuracy(model)}

    result = run_trial(trial, run_point)
    result.to_json("reports/run/results.json")

Bad input (fewer than 2 seeds, repeated seeds or arms, an unknown direction) is refused when the
:class:`Trial` is built, before any point runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from workbench.io import write_json_atomic
from workbench.recipe.evidence import (
    CONFIDENCE,
    MIN_SEEDS,
    PairedInterval,
    check_confidence,
    check_direction,
    paired_interval,
    power_sentence,
    seeds_needed,
    verdict_word,
)

RESERVED = ("arm", "seed")


def _check_seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds={seeds!r} is not valid; allowed: a list of at least {MIN_SEEDS} distinct "
                         "integers >= 0")
    seeds = tuple(seeds)
    if len(seeds) < MIN_SEEDS:
        raise ValueError(f"seeds={list(seeds)!r} has {len(seeds)} seed(s); allowed: at least {MIN_SEEDS} seeds "
                         "(a paired interval needs two differences)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)!r} is not valid; allowed: distinct integers >= 0")
    return seeds


def _check_settings(settings: Any) -> tuple[dict, ...]:
    settings = tuple(settings) if isinstance(settings, Sequence) else settings
    if not isinstance(settings, tuple) or not settings or not all(isinstance(s, Mapping) for s in settings):
        raise ValueError(f"settings={settings!r} is not valid; allowed: a non-empty list of dicts (one per "
                         "setting, e.g. [{'level': 0.5}]; [{}] for a single setting)")
    for setting in settings:
        bad = [k for k in setting if k in RESERVED or not isinstance(k, str)]
        if bad:
            raise ValueError(f"setting {dict(setting)!r} uses the key(s) {bad}; allowed: string keys other "
                             f"than {RESERVED}")
    if len({repr(sorted(s.items())) for s in settings}) != len(settings):
        raise ValueError(f"settings={list(settings)!r} repeat a setting; allowed: distinct settings")
    return tuple(dict(s) for s in settings)


@dataclass(frozen=True)
class Trial:
    """A claim checked on paired seeds; see the module docstring. Validated on construction."""

    claim: str
    arms: tuple[str, str]
    metric: str
    direction: str
    seeds: tuple[int, ...]
    settings: tuple[dict, ...] = ({},)
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        arms = tuple(self.arms) if isinstance(self.arms, Sequence) and not isinstance(self.arms, str) else ()
        if len(arms) != 2 or len(set(arms)) != 2 or not all(isinstance(a, str) and a for a in arms):
            raise ValueError(f"arms={self.arms!r} is not valid; allowed: two distinct names, the reference first "
                             "and the treatment second")
        if not isinstance(self.metric, str) or not self.metric or self.metric in RESERVED:
            raise ValueError(f"metric={self.metric!r} is not valid; allowed: the name of a metric run_point returns")
        object.__setattr__(self, "arms", arms)
        object.__setattr__(self, "direction", check_direction(self.direction))
        object.__setattr__(self, "seeds", _check_seeds(self.seeds))
        object.__setattr__(self, "settings", _check_settings(self.settings))
        object.__setattr__(self, "confidence", check_confidence(self.confidence))

    @property
    def reference(self) -> str:
        return self.arms[0]

    @property
    def treatment(self) -> str:
        return self.arms[1]

    def points(self, arms: Sequence[str] | None = None) -> list[TrialPoint]:
        """Every (arm, seed, setting), setting-major, then seed, then arm (both arms of a seed adjacent);
        ``arms``: only those arms' points (e.g. a treatment whose reference rows another trial ran)."""
        chosen = self.arms if arms is None else tuple(arms)
        unknown = [a for a in chosen if a not in self.arms]
        if unknown:
            raise ValueError(f"arms={unknown!r} are not arms of this trial; allowed: {list(self.arms)}")
        return [TrialPoint(arm, seed, setting) for setting in self.settings for seed in self.seeds
                for arm in chosen]

    def to_dict(self) -> dict:
        return {"claim": self.claim, "arms": list(self.arms), "metric": self.metric, "direction": self.direction,
                "seeds": list(self.seeds), "settings": [dict(s) for s in self.settings],
                "confidence": self.confidence}


@dataclass(frozen=True)
class TrialPoint:
    arm: str
    seed: int
    setting: dict


@dataclass(frozen=True)
class Verdict:
    """The answer of one setting: effect (treatment - reference) with its interval, in words.

    ``caveats`` carries sentences that limit what the verdict may say (e.g. an IEBN gate that never
    became instance-specific, :func:`workbench.probes.gate_engagement_warning`)."""

    claim: str
    setting: dict
    reference: str
    treatment: str
    metric: str
    direction: str
    interval: PairedInterval
    verdict: str
    seeds_needed: int | None
    caveats: tuple[str, ...] = ()

    def sentence(self) -> str:
        """One line: verdict, effect, interval, seeds, power, caveats."""
        iv = self.interval
        where = ", ".join(f"{k}={v}" for k, v in self.setting.items())
        text = (f"{self.verdict}: {self.metric} {self.treatment} - {self.reference} = {iv.mean:+.4g} "
                f"({iv.confidence:.0%} CI {iv.low:+.4g} to {iv.high:+.4g}, {iv.n} paired seeds"
                f"{', ' + where if where else ''}); {power_sentence(iv)}")
        return " ".join([text + ".", *self.caveats])

    def with_caveats(self, *caveats: str | None) -> Verdict:
        """This verdict with the non-empty ``caveats`` appended."""
        extra = tuple(c for c in caveats if c)
        return Verdict(**{**self.__dict__, "caveats": self.caveats + extra})

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "interval"}
        out.update(interval=self.interval.to_dict(), caveats=list(self.caveats), sentence=self.sentence())
        return out


@dataclass
class TrialResult:
    trial: Trial
    rows: list[dict] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"trial": self.trial.to_dict(), "rows": [dict(r) for r in self.rows],
                "verdicts": [v.to_dict() for v in self.verdicts]}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` atomically (results.json-ready)."""
        return write_json_atomic(path, self.to_dict())


def _row(point: TrialPoint, metrics: Any, metric: str) -> dict:
    if not isinstance(metrics, Mapping) or metric not in metrics:
        raise ValueError(f"run_point({point.arm!r}, {point.seed}, {point.setting!r}) returned {metrics!r}; "
                         f"allowed: a dict holding the trial's metric {metric!r}")
    value = metrics[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"run_point({point.arm!r}, {point.seed}, {point.setting!r}) gave {metric}={value!r}; "
                         "allowed: a finite number")
    clash = sorted(set(metrics) & (set(point.setting) | set(RESERVED)))
    if clash:
        raise ValueError(f"run_point returned metric name(s) {clash} that clash with the row's arm/seed/setting keys")
    return {"arm": point.arm, "seed": point.seed, **point.setting, **metrics}


def run_trial(trial: Trial, run_point: Callable[[str, int, dict], Mapping[str, Any]], *,
              executor: Any = None, progress: bool = True) -> TrialResult:
    """Run every point of ``trial`` (see the module docstring) and return rows and verdicts."""
    if not isinstance(trial, Trial):
        raise ValueError(f"trial={type(trial).__name__} is not valid; allowed: a workbench.recipe.Trial")
    if not callable(run_point):
        raise ValueError(f"run_point={run_point!r} is not valid; allowed: a callable (arm, seed, setting) -> dict")
    rows = run_points(trial, trial.points(), run_point, executor=executor, progress=progress)
    return TrialResult(trial=trial, rows=rows, verdicts=verdicts_from_rows(trial, rows))


def run_points(trial: Trial, points: Sequence[TrialPoint], run_point: Callable[[str, int, dict], Mapping[str, Any]],
               *, executor: Any = None, progress: bool = True) -> list[dict]:
    """The tidy rows of ``points`` (of ``trial``; :meth:`Trial.points`, possibly of some arms only),
    each checked as :func:`run_trial` checks it; in this process or through ``executor``."""
    rows = []
    with tqdm(total=len(points), desc=trial.claim[:40], disable=not progress, leave=False) as bar:
        outcomes = call_each(run_point, [(p.arm, p.seed, dict(p.setting)) for p in points], executor)
        for point, metrics in zip(points, outcomes):
            rows.append(_row(point, metrics, trial.metric))  # a bad return stops the trial at once
            bar.update()
    return rows


def call_each(fn: Callable[..., Any], calls: Sequence[tuple], executor: Any = None) -> Iterator[Any]:
    """``fn(*args)`` for each ``args`` of ``calls``, yielded in order: one at a time here when
    ``executor`` is ``None``, else every call submitted to it first (``submit(fn, *args) -> Future``)."""
    if executor is None:
        return (fn(*args) for args in calls)
    futures = [executor.submit(fn, *args) for args in calls]
    return (future.result() for future in futures)


def verdicts_from_rows(trial: Trial, rows: Sequence[Mapping[str, Any]]) -> list[Verdict]:
    """One :class:`Verdict` per setting of ``trial`` from tidy rows (this protocol's, or read back
    from a results file); every (arm, seed) of a setting must be present exactly once."""
    out = []
    for setting in trial.settings:
        mine = [r for r in rows if all(r.get(k) == v for k, v in setting.items())]
        value: dict[tuple[str, int], float] = {}
        for r in mine:
            key = (r["arm"], r["seed"])
            if key in value:
                raise ValueError(f"rows hold arm={key[0]!r}, seed={key[1]} twice for setting {setting!r}")
            value[key] = float(r[trial.metric])
        missing = [(a, s) for s in trial.seeds for a in trial.arms if (a, s) not in value]
        if missing:
            raise ValueError(f"rows lack (arm, seed) {missing} for setting {setting!r}; allowed: every arm at "
                             "every seed (the pairing needs both sides)")
        interval = paired_interval([value[(trial.reference, s)] for s in trial.seeds],
                                   [value[(trial.treatment, s)] for s in trial.seeds], trial.confidence)
        out.append(Verdict(claim=trial.claim, setting=dict(setting), reference=trial.reference,
                           treatment=trial.treatment, metric=trial.metric, direction=trial.direction,
                           interval=interval, verdict=verdict_word(interval, trial.direction),
                           seeds_needed=seeds_needed(interval.mean, interval.sd, interval.confidence)))
    return out
