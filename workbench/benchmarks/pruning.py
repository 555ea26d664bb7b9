"""Does pruning pay off in wall time? Latency speedup against FLOPs reduction of pruned segmentation nets.

For each network and prune ratio, in one run on one device: the unpruned model's eval latency at
batch 8 (median of ``--runs``), the pruned model's, the FLOPs of both (``torch.utils.flop_counter``,
see :mod:`workbench.pruning.cost`), and ``efficiency = speedup / flops_ratio``. The target is an
efficiency of at least 0.8 (speedup >= 0.8 x the FLOPs ratio).

The BN scales are drawn at random (seeded) before pruning, standing in for a sparsity-trained
network (a freshly initialised one has every scale equal to 1, which would make the global
threshold meaningless). Latency depends only on the pruned shapes, not on the weights.

Kept channel counts are rounded up to multiples of ``--round-to`` (default ``auto``: 16 on
AVX-512 CPUs, else 8; :func:`workbench.pruning.preferred_round_to`): convolution kernels (tensor
cores, oneDNN's blocked layouts) slow down a lot on odd channel counts, which the FLOPs count does
not see. The models run channels-last on CUDA (cuDNN autotuning every shape) and on
CPU, the baseline included: oneDNN's convolutions work in a channels-last blocked layout, and a
contiguous (NCHW) tensor is reordered before and after every convolution, a memory pass that
shrinks only linearly with the channels. Every latency is taken under ``torch.inference_mode()``,
the baseline and its pruned copies interleaved round by round (load from other processes hits
them alike).

``--modes`` picks the form the networks are timed in, each against a baseline in the same form:

- ``eager``: the modules as trained, every BN a separate memory pass;
- ``fold-bn``: eager with each BN folded into the convolution feeding it
  (:func:`workbench.pruning.fold.fold_batchnorm`), as any inference engine deploys it. A BN pass
  costs time proportional to channels, a convolution to channels squared, so unfolded BNs take a
  growing share of a pruned network's time that a deployed one would not spend;
- ``compile``: ``torch.compile`` with inductor's freezing (BN folded, element-wise ops fused into
  the convolutions' neighbours), static shapes for every model;
- ``cuda-graph`` (CUDA only): BN folded, the whole forward captured once as a CUDA graph
  (``torch.cuda.graph``) and replayed. Eager PyTorch launches one kernel per op from Python, and a
  pruned network has as many ops as the unpruned one, so at batch 8 its kernels can finish faster
  than Python launches them (2026-11-26, H100, 256x512: ICNet took 4.0 ms pruned or not). A replayed
  graph is launched once, so what it measures is the GPU's own time.

What FLOPs do not see still bounds the speedup: pooling, unpooling, ReLU and concatenation shrink
only linearly with channels, and the layers around the fixed-size ends (the stem convolution on
3 input channels, the classifier with ``num_classes`` outputs at full resolution, the logits'
resize to the input size) barely shrink at all. ``--breakdown`` (CPU) profiles each network and
reports the share of its time spent outside convolutions, before and after pruning, the efficiency
the row would reach if its convolutions sped up exactly by their own FLOPs ratio (below 0.8, what
lies outside the convolutions keeps it under the target by itself), and a second table of the ops
each pruned network spends its time in, with how much each op shrank: an op with a large share and
a shrink well below the FLOPs ratio is what holds the speedup back.

On CPU the process keeps freed memory for reuse (``--allocator keep``, the default; see
:mod:`workbench.benchmarks.allocator`): with glibc's defaults every large activation page-faults in
afresh on each forward, a cost FLOPs do not see that falls hardest on the full-resolution ends
pruning does not shrink. ``--allocator system`` times the process as glibc leaves it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from torch import nn

from workbench.benchmarks import write_results
from workbench.benchmarks.allocator import ALLOCATORS, apply_allocator
from workbench.device import resolve_device
from workbench.nn.norms import is_affine_norm

TARGET_EFFICIENCY = 0.8
MODES = ("eager", "fold-bn", "compile", "cuda-graph")
FULL = {"models": ("segnet", "pspnet_resnet50", "icnet"), "width": 1.0, "size": (128, 256), "runs": 10}
QUICK = {"models": ("segnet", "pspnet_resnet18", "icnet"), "width": 0.25, "size": (64, 64), "runs": 5}


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: auto or an integer >= 0 (0: off)")
    return value


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def randomise_scales(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_affine_norm(m):
                m.weight.copy_(torch.rand(m.num_features, generator=g).to(m.weight) + 0.01)


class CUDAGraphForward(nn.Module):
    """``model``'s eval forward at the shape of ``batch``, captured once as a CUDA graph and replayed.

    The input is copied into the graph's static input buffer and the returned tensor is the graph's
    static output, overwritten by the next call (clone it to keep it). Warm-up runs on a side stream
    before capture, as CUDA graphs require, so cuDNN's autotuning (``cudnn.benchmark``) has chosen
    its kernels by then.
    """

    def __init__(self, model: nn.Module, batch: torch.Tensor, warmup: int = 3) -> None:
        super().__init__()
        if batch.device.type != "cuda":
            raise ValueError(f"CUDAGraphForward needs a CUDA tensor, got one on {batch.device}")
        self.model = model.eval()
        device = batch.device
        with torch.inference_mode():
            self.static_input = batch.clone(memory_format=torch.preserve_format)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.model(self.static_input)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_output = self.model(self.static_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or x.device != self.static_input.device:
            raise ValueError(f"x has shape {tuple(x.shape)} on {x.device}; this graph was captured for "
                             f"{tuple(self.static_input.shape)} on {self.static_input.device}")
        with torch.inference_mode():
            self.static_input.copy_(x)
            self.graph.replay()
        return self.static_output


def _deploy_form(model: nn.Module, mode: str, example: torch.Tensor, fmt: torch.memory_format,
                 batch: torch.Tensor) -> nn.Module:
    model = model.to(memory_format=fmt).eval()
    if mode in ("fold-bn", "cuda-graph"):
        from workbench.pruning.fold import fold_batchnorm

        model = fold_batchnorm(model, example).to(memory_format=fmt)  # folded weights in the same layout
        return CUDAGraphForward(model, batch) if mode == "cuda-graph" else model
    if mode == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        # static: every pruned shape gets its own kernels, as the baseline does (no automatic dynamic shapes)
        return torch.compile(model, dynamic=False)
    return model


# Ops that move or allocate memory on behalf of the op that calls them: a convolution's bias copied into
# its output, a kernel's output buffer. Their time belongs to the caller.
_HELPER_OPS = frozenset(f"aten::{n}" for n in (
    "copy_", "empty", "empty_like", "empty_strided", "resize_", "as_strided", "view", "fill_", "zero_", "zeros",
    "contiguous", "clone", "to", "_to_copy", "reshape", "_reshape_alias", "expand", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "select", "slice", "detach", "alias", "lift_fresh"))


def _owner(event: Any) -> str:
    while event.name in _HELPER_OPS and event.cpu_parent is not None:
        event = event.cpu_parent
    return event.name


def _profile_once(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(inputs)
    ops: dict[str, float] = {}
    for event in prof.events():
        if event.self_cpu_time_total > 0:
            owner = _owner(event)
            ops[owner] = ops.get(owner, 0.0) + event.self_cpu_time_total / 1e3
    return ops


def _is_conv(op: str) -> bool:
    return "conv" in op


@torch.inference_mode()
def time_breakdown(models: list[nn.Module], inputs: torch.Tensor, rounds: int = 3) -> list[dict]:
    """Where each model's forward spends its time (self CPU time, torch.profiler), from the least-loaded of
    ``rounds`` interleaved profiles (load only ever adds time): ``conv_ms`` and ``other_ms`` (everything
    outside convolutions), and ``ops_ms``, milliseconds per profiled op. The copies and allocations an op
    makes for itself (:data:`_HELPER_OPS`) count as that op's time: the bias a convolution copies into its
    output is convolution time."""
    best: list[dict[str, float] | None] = [None] * len(models)
    for model in models:
        model(inputs)
    for _ in range(rounds):
        for i, model in enumerate(models):
            ops = _profile_once(model, inputs)
            if best[i] is None or sum(ops.values()) < sum(best[i].values()):
                best[i] = ops
    return [{"conv_ms": sum(ms for op, ms in ops.items() if _is_conv(op)),
             "other_ms": sum(ms for op, ms in ops.items() if not _is_conv(op)),
             "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1]))} for ops in best]


def bench_model(name: str, ratios: tuple[float, ...], device: torch.device, width: float, size: tuple[int, int],
                batch_size: int = 8, runs: int = 10, num_classes: int = 19, method: str = "slimming",
                channels_last: bool = False, round_to: int | None = 8, modes: tuple[str, ...] = ("eager",),
                breakdown: bool = False) -> list[dict]:
    """One row per (mode, ratio): the pruned network against the unpruned one, both in that mode."""
    from workbench.models.segmentation import SEGMENTATION_MODELS
    from workbench.pruning import prune
    from workbench.pruning.cost import measure_latencies

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes={tuple(modes)!r} is not valid; allowed: a non-empty subset of {MODES}")
    if breakdown and device.type != "cpu":
        raise ValueError(f"breakdown=True needs device cpu (torch.profiler's CPU time), got {device}")
    if "cuda-graph" in modes and device.type != "cuda":
        raise ValueError(f"modes={tuple(modes)!r}: cuda-graph needs a CUDA device, got {device}")
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS[name](num_classes, width=width).to(device).eval()
    randomise_scales(model)
    trace_input = torch.randn(1, 3, *size, device=device)
    batch = torch.randn(batch_size, 3, *size, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch = batch.to(memory_format=fmt)
    nets, reports = [model], [None]
    start = time.perf_counter()
    for r in ratios:
        pruned, report = prune(model, r, trace_input, method=method, round_to=round_to, latency=False)
        nets.append(pruned)
        reports.append(report)
    _progress(f"{name}: pruned at {len(ratios)} ratios in {time.perf_counter() - start:.1f} s")
    rows = []
    for mode in modes:
        start = time.perf_counter()
        if mode == "compile":
            torch._dynamo.reset()  # each model starts from a clean cache, clear of dynamo's recompile limit
        forms = [_deploy_form(net, mode, trace_input.to(memory_format=fmt), fmt, batch) for net in nets]
        base, *after = measure_latencies(forms, batch, runs=runs, warmup=5 if mode == "compile" else 3)
        parts = time_breakdown(forms, batch) if breakdown else None
        for i, (ratio, report, lat) in enumerate(zip(ratios, reports[1:], after), start=1):
            speedup = base / lat
            row = {
                "model": name, "mode": mode, "width": width, "input": [batch_size, 3, *size], "ratio": ratio,
                "method": method, "params_before": report.params_before, "params_after": report.params_after,
                "gflops_before": report.flops_before * batch_size / 1e9,
                "gflops_after": report.flops_after * batch_size / 1e9,
                "flops_ratio": report.flops_ratio, "latency_ms_before": base, "latency_ms_after": lat,
                "speedup": speedup, "efficiency": speedup / report.flops_ratio,
                "meets_target": speedup >= TARGET_EFFICIENCY * report.flops_ratio,
                "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "channels_last": channels_last, "round_to": round_to, "compile": mode == "compile",
            }
            if parts:
                row.update({f"{k}_before": v for k, v in parts[0].items()})
                row.update({f"{k}_after": v for k, v in parts[i].items()})
                row["conv_flops_ratio"] = (report.flops_detail_before["conv_matmul"]
                                           / report.flops_detail_after["conv_matmul"])
                row["efficiency_ideal_convs"] = efficiency_with_ideal_convs(row)
            rows.append(row)
            _progress(f"{name} {mode} ratio {ratio:.2f}: {base:.2f} -> {lat:.2f} ms, speedup {speedup:.2f}x, "
                      f"FLOPs {report.flops_ratio:.2f}x, efficiency {speedup / report.flops_ratio:.2f}")
        _progress(f"{name} {mode}: timed in {time.perf_counter() - start:.1f} s")
        del forms
    return rows


def _progress(message: str) -> None:
    # stderr, row by row: a run cut short by a time limit still shows what it measured
    print(f"[bench pruning] {message}", file=sys.stderr, flush=True)


def efficiency_with_ideal_convs(row: dict) -> float:
    """The efficiency a breakdown row would reach if its convolution time fell exactly by the convolutions'
    FLOPs ratio and every other op took the time profiled in the pruned network.

    It splits a shortfall in two: below the target, the ops outside convolutions (memory passes that shrink
    at most linearly with channels, and the fixed-size ends) hold the row back by themselves, and only
    convolutions running faster than their FLOPs ratio could still meet it; above it, the convolutions
    are what fall short. The profiler adds a few microseconds to every op, pruned or not, which makes
    this figure pessimistic where the pruned forward takes only a few milliseconds.
    """
    unpruned = row["conv_ms_before"] + row["other_ms_before"]
    ideal = row["conv_ms_before"] / row["conv_flops_ratio"] + row["other_ms_after"]
    return unpruned / ideal / row["flops_ratio"]


def _share(row: dict, when: str) -> float:
    return row[f"other_ms_{when}"] / (row[f"conv_ms_{when}"] + row[f"other_ms_{when}"])


def _markdown_head(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def format_table(rows: list[dict], header: str) -> str:
    breakdown = bool(rows) and "conv_ms_before" in rows[0]
    columns = ["model", "mode", "ratio", "params", "GFLOPs", "FLOPs ratio", "latency ms", "speedup", "efficiency",
               "target"]
    if breakdown:
        columns += ["non-conv time", "conv speedup", "conv FLOPs ratio", "efficiency if convs ideal"]
    lines = [header, "", *_markdown_head(columns)]
    for r in rows:
        line = (f"| {r['model']} | {r['mode']} | {r['ratio']:.2f} | "
                f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M | "
                f"{r['gflops_before']:.2f} -> {r['gflops_after']:.2f} | {r['flops_ratio']:.2f}x | "
                f"{r['latency_ms_before']:.1f} -> {r['latency_ms_after']:.1f} | {r['speedup']:.2f}x | "
                f"{r['efficiency']:.2f} | {'yes' if r['meets_target'] else 'no'} |")
        if breakdown:
            line += (f" {_share(r, 'before'):.0%} -> {_share(r, 'after'):.0%} | "
                     f"{r['conv_ms_before'] / r['conv_ms_after']:.2f}x | {r['conv_flops_ratio']:.2f}x | "
                     f"{r['efficiency_ideal_convs']:.2f} |")
        lines.append(line)
    if breakdown:
        lines += ["", "non-conv time: share of the profiled CPU time outside convolutions (pooling, unpooling, BN, "
                  "ReLU, resize, concat, adds), unpruned -> pruned; conv speedup: convolution time alone, "
                  "unpruned / pruned; conv FLOPs ratio: the convolutions' and matrix products' FLOPs alone, "
                  "unpruned / pruned; efficiency if convs ideal: the efficiency if convolution time fell exactly "
                  "by the conv FLOPs ratio and every other op took its profiled pruned time (below 0.8, the ops "
                  "outside convolutions alone keep the row under the target).", "", format_op_table(rows)]
    return "\n".join(lines)


def top_ops(row: dict, cover: float = 0.9, limit: int = 6) -> list[tuple[str, float, float]]:
    """The ops that take most of the pruned network's profiled time: ``(op, unpruned ms, pruned ms)``,
    largest first, until ``cover`` of that time is accounted for or ``limit`` ops are listed."""
    after, before = row["ops_ms_after"], row["ops_ms_before"]
    total = sum(after.values())
    picked, seen = [], 0.0
    for op, ms in sorted(after.items(), key=lambda kv: -kv[1]):
        if len(picked) == limit or (total and seen >= cover * total):
            break
        picked.append((op, before.get(op, 0.0), ms))
        seen += ms
    return picked


def format_op_table(rows: list[dict]) -> str:
    """Per row, the ops the pruned network spends its time in and how much each shrank: an op whose shrink
    is far below the FLOPs ratio and whose share is large is what holds the speedup back."""
    columns = ["model", "mode", "ratio", "FLOPs ratio", "op", "unpruned ms", "pruned ms", "shrink",
               "share of pruned time"]
    lines = ["Where the pruned networks spend their time (profiled self CPU time per op; the profiler's own "
             "overhead makes these sums larger than the latencies above):", "", *_markdown_head(columns)]
    for r in rows:
        total = sum(r["ops_ms_after"].values()) or 1.0
        for op, before, after in top_ops(r):
            shrink = f"{before / after:.2f}x" if after > 0 else "-"
            lines.append(f"| {r['model']} | {r['mode']} | {r['ratio']:.2f} | {r['flops_ratio']:.2f}x | `{op}` | "
                         f"{before:.1f} | {after:.1f} | {shrink} | {after / total:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench bench pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", help="segmentation model names (default depends on --quick)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--width", type=float)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--method", default="slimming", choices=["slimming", "cap"])
    parser.add_argument("--memory-format", default="auto", choices=["auto", "contiguous", "channels_last"],
                        help="auto: channels_last on CUDA and CPU (cuDNN's and oneDNN's fast layout), "
                             "contiguous elsewhere")
    parser.add_argument("--round-to", type=_round_to, default="auto",
                        help="kept channels per layer rounded up to this; 0: off; auto (default): the device's "
                             "preferred multiple (16 on AVX-512 CPUs, else 8)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="forms to time, each against its own baseline (default: eager)")
    parser.add_argument("--compile", action="store_true", help="same as --modes compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: torch's current setting); recorded in the header")
    parser.add_argument("--allocator", default="keep", choices=ALLOCATORS,
                        help="CPU: keep (default): freed memory stays in the process for reuse, as jemalloc or "
                             "tcmalloc would keep it; system: glibc's defaults (large blocks unmapped on free)")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU only: profile where the time goes before and after pruning (the share "
                             "outside convolutions, and a table of the ops the pruned networks spend it in)")
    parser.add_argument("--quick", action="store_true", help="small widths and 64x64 inputs (CPU smoke run)")
    parser.add_argument("--output", help="write JSON and a markdown table to this folder")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for r in args.ratios:
        if not 0 <= r < 1:
            parser.error(f"--ratios: {r} is not in [0, 1)")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    modes = list(args.modes or []) + (["compile"] if args.compile else [])
    modes = tuple(dict.fromkeys(modes or ["eager"]))
    device = resolve_device(args.device)
    if args.round_to == "auto":
        from workbench.pruning import preferred_round_to

        args.round_to = preferred_round_to(device)
    if args.breakdown and device.type != "cpu":
        parser.error(f"--breakdown needs --device cpu (profiled CPU time), got {device}")
    if "cuda-graph" in modes and device.type != "cuda":
        parser.error(f"--modes cuda-graph needs --device cuda (allowed elsewhere: eager, fold-bn, compile), "
                     f"got {device}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = apply_allocator(args.allocator) if device.type == "cpu" else None
    channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto"
                                                               and device.type in ("cuda", "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # each shape (baseline and pruned alike) gets its best kernel
    models = args.models or preset["models"]
    width = args.width or preset["width"]
    size = tuple(args.size or preset["size"])
    runs = args.runs or preset["runs"]
    rows = []
    for name in models:
        rows += bench_model(name, tuple(args.ratios), device, width, size, args.batch_size, runs,
                            method=args.method, channels_last=channels_last, round_to=args.round_to or None,
                            modes=modes, breakdown=args.breakdown)
    for row in rows:
        row["allocator"] = allocator
    header = (f"pruning: latency speedup vs FLOPs ratio, batch {args.batch_size}, input {size[0]}x{size[1]}, "
              f"width {width}, {_describe(device)}, torch {torch.__version__}, "
              f"{'channels_last' if channels_last else 'contiguous'}, round_to {args.round_to or 'off'}, "
              f"modes {'/'.join(modes)}, {f'allocator {allocator}, ' if allocator else ''}"
              f"median of {runs} interleaved runs; "
              f"target speedup >= {TARGET_EFFICIENCY} x FLOPs ratio")
    table = format_table(rows, header)
    print(table, flush=True)
    if args.output:
        write_results(args.output, f"pruning-{device.type}", rows, table)
    return 0
