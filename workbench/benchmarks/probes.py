"""Cost of the batch-noise probes: training step time with each probe on vs off, and vectorised
(vmap) vs Python-loop micro-batch gradients, as ratios measured in one run.

Step times are measured inside ``workbench.train.fit`` (a timing callback brackets each step), on
a fixed set of digits batches. A probe fires every ``every`` steps, so its overhead at the default
schedule is amortised: ``(every * t_off + c) / (every * t_off)`` with ``c`` the extra time of a step
where it fires, measured from steps with ``every=1``. ``--direct`` also trains ``every`` steps with
each probe at its default schedule and reports the plain ratio of mean step times (slower, noisier).
Targets: overhead <= 1.1x at the default schedules, vmap >= 3x faster than the loop.

The vmap table also times the same vmap pass through ``torch.compile`` (``compiled=True`` in the
probes), after one untimed compiling call per micro-batch count; ``--no-compiled`` skips it. The
loop stays eager in both ratios: it is the plain autograd code a user would otherwise write.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.benchmarks import write_results
from workbench.callbacks import Callback
from workbench.device import describe_device, resolve_device
from workbench.probes import BNEstimationNoise, CouplingGap, GradientNoiseScale, GradientSNR
from workbench.probes.microbatch import micro_batch_gradients, micro_batch_gradients_loop, probe_copy

OVERHEAD_TARGET = 1.1
VMAP_TARGET = 3.0


class _Timer(Callback):
    """Callback bracketing every optimiser step; put it first *and* last in the callback list."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0
        self._depth = 0

    def on_step_start(self, state) -> None:
        if self._depth == 0:
            _sync(self.device)
            self._start = time.perf_counter()
        self._depth = 1 - self._depth

    def on_step_end(self, state) -> None:
        self._depth = 1 - self._depth
        if self._depth == 0:
            _sync(self.device)
            self.times.append(time.perf_counter() - self._start)



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(batch_size: int, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from workbench.data import get_dataset

    x, y = get_dataset("digits", "train").tensors()
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        out.append((x[idx].to(device), y[idx].to(device)))
    return out


def _default_model(width: float) -> nn.Module:
    from workbench.models import build_model

    return build_model("resnet20", num_classes=10, norm="bn", width=width)


def _step_times(make_model: Callable[[], nn.Module], batches: list, device: torch.device, probe=None) -> list[float]:
    from workbench.train import fit

    torch.manual_seed(0)
    model = make_model().to(device)
    timer = _Timer(device)
    callbacks = [timer] + ([probe] if probe is not None else []) + [timer]
    fit(model, batches, epochs=1, callbacks=callbacks, device=device, progress=False,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    return timer.times


def probe_factories(probe_data: torch.Tensor) -> dict[str, Callable[..., object]]:
    """Probe name -> factory taking ``every`` (None: the probe's default schedule)."""

    def make(cls, **kwargs):
        def factory(every: int | None = None):
            return cls(**kwargs) if every is None else cls(every=every, **kwargs)
        return factory

    return {
        "gradient_noise_scale (micro)": make(GradientNoiseScale, method="micro"),
        "gradient_noise_scale (two_batch)": make(GradientNoiseScale, method="two_batch"),
        "gsnr": make(GradientSNR),
        "coupling_gap": make(CouplingGap),
        "bn_estimation_noise": make(BNEstimationNoise, data=probe_data),
    }


def bench_overhead(make_model: Callable[[], nn.Module], device: torch.device, batch_size: int = 64,
                   steps: int = 12, fire_steps: int = 4, direct: bool = False) -> list[dict]:
    batches = _batches(batch_size, max(steps, fire_steps) + 2, device)
    probe_data = torch.cat([b[0] for b in batches])[:512]
    off = _step_times(make_model, batches[: steps + 2], device)[2:]  # two warm-up steps
    t_off = statistics.median(off)
    rows = []
    for name, factory in probe_factories(probe_data).items():
        default_every = factory().every
        fired = _step_times(make_model, batches[: fire_steps + 2], device, factory(every=1))[2:]
        cost = max(statistics.median(fired) - t_off, 0.0)
        row = {"probe": name, "every": default_every, "step_off_ms": t_off * 1e3,
               "step_firing_ms": statistics.median(fired) * 1e3, "cost_in_steps": cost / t_off,
               "overhead": (default_every * t_off + cost) / (default_every * t_off)}
        if direct:
            run = _batches(batch_size, default_every + 2, device)
            base = _step_times(make_model, run, device)[2:]
            # step 0 would fire inside the warm-up: shift the schedule so one firing step is timed
            on = _step_times(make_model, run, device, _shifted(factory(), 2))[2:]
            row["direct_overhead"] = statistics.mean(on) / statistics.mean(base)
        rows.append(row)
    return rows


def _shifted(probe, offset: int):
    every = probe.every
    probe.due = lambda step: (step - offset) % every == 0 and step >= offset
    return probe


def bench_vmap(make_model: Callable[[], nn.Module], device: torch.device, batch_size: int = 64,
               micro_batches: tuple[int, ...] = (4, 8, 16), repeats: int = 5, compiled: bool = True) -> list[dict]:
    torch.manual_seed(0)
    model = make_model().to(device).train()
    x, y = _batches(batch_size, 1, device)[0]
    clone_v, clone_l = probe_copy(model), probe_copy_loop(model)
    rows = []
    for k in micro_batches:
        if batch_size // k < 1:
            continue

        def run_vmap(k=k, compiled=False):
            micro_batch_gradients(model, x, y, F.cross_entropy, k, clone=clone_v, compiled=compiled)

        def run_loop(k=k):
            micro_batch_gradients_loop(model, x, y, F.cross_entropy, k, clone=clone_l)

        t_vmap, t_loop = _time(run_vmap, device, repeats), _time(run_loop, device, repeats)
        row = {"micro_batches": k, "micro_batch": batch_size // k, "vmap_ms": t_vmap * 1e3,
               "loop_ms": t_loop * 1e3, "speedup": t_loop / t_vmap}
        if compiled:
            start = time.perf_counter()
            run_vmap(compiled=True)
            row["compile_s"] = time.perf_counter() - start
            t_comp = _time(lambda k=k: run_vmap(k, compiled=True), device, repeats)
            row.update(compiled_ms=t_comp * 1e3, compiled_speedup=t_loop / t_comp)
        rows.append(row)
        print(f"[bench probes] k={k}: " + ", ".join(f"{key} {val:.3g}" for key, val in row.items()), flush=True)
    return rows


def probe_copy_loop(model: nn.Module) -> nn.Module:
    import copy

    from workbench.probes.microbatch import strip_instrumentation

    return strip_instrumentation(copy.deepcopy(model))


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_tables(overhead: list[dict], vmap: list[dict]) -> str:
    lines = ["| probe | every | step off (ms) | firing step (ms) | cost (steps) | overhead | target <= 1.1x |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in overhead:
        extra = f" (direct {r['direct_overhead']:.3f}x)" if "direct_overhead" in r else ""
        lines.append(f"| {r['probe']} | {r['every']} | {r['step_off_ms']:.1f} | {r['step_firing_ms']:.1f} | "
                     f"{r['cost_in_steps']:.2f} | {r['overhead']:.3f}x{extra} | "
                     f"{'yes' if r['overhead'] <= OVERHEAD_TARGET else 'NO'} |")
    compiled = any("compiled_ms" in r for r in vmap)
    head = "| micro-batches k | micro-batch b | vmap (ms) | loop (ms) | speedup | target >= 3x |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if compiled:
        head += " compiled vmap (ms) | compiled speedup | target >= 3x | compile (s) |"
        rule += " --- | --- | --- | --- |"
    lines += ["", head, rule]
    for r in vmap:
        line = (f"| {r['micro_batches']} | {r['micro_batch']} | {r['vmap_ms']:.1f} | {r['loop_ms']:.1f} | "
                f"{r['speedup']:.2f}x | {'yes' if r['speedup'] >= VMAP_TARGET else 'NO'} |")
        if "compiled_ms" in r:
            line += (f" {r['compiled_ms']:.1f} | {r['compiled_speedup']:.2f}x | "
                     f"{'yes' if r['compiled_speedup'] >= VMAP_TARGET else 'NO'} | {r['compile_s']:.0f} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench bench probes", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0, help="resnet20 width multiplier")
    parser.add_argument("--steps", type=int, default=12, help="timed steps without probes")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--direct", action="store_true", help="also train `every` steps per probe (slow)")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="skip the torch.compile'd vmap column (compiling takes about a minute per k on CPU)")
    parser.add_argument("--output", help="write probes.json and probes.md to this folder")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)

    def make_model() -> nn.Module:
        return _default_model(args.width)

    print(f"device: {describe_device(device)}; resnet20 width {args.width}, batch {args.batch_size}", flush=True)
    overhead = bench_overhead(make_model, device, args.batch_size, args.steps, direct=args.direct)
    vmap = bench_vmap(make_model, device, args.batch_size, tuple(args.micro_batches), compiled=args.compiled)
    text = format_tables(overhead, vmap)
    print(text, flush=True)
    if args.output:
        write_results(args.output, "probes", {"device": describe_device(device), "width": args.width,
                                              "batch_size": args.batch_size, "overhead": overhead, "vmap": vmap},
                      text)
    return 0
