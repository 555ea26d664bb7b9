"""Does pruning pay off in wall time? Latency speedup against FLOPs reduction of pruned segmentation nets.

For each network and prune ratio, in one run on one device: the unpruned model's eval latency at
batch 8 (median of ``--runs``), the pruned model's, the FLOPs of both (``torch.utils.flop_counter``,
see :mod:`workbench.pruning.cost`), and ``efficiency = speedup / flops_ratio``. The target is an
efficiency of at least 0.8 (speedup >= 0.8 x the FLOPs ratio).

The BN scales are drawn at random (seeded) before pruning, standing in for a sparsity-trained
network (a freshly initialised one has every scale equal to 1, which would make the global
threshold meaningless). Latency depends only on the pruned shapes, not on the weights.

Kept channel counts are rounded up to multiples of ``--round-to`` (default 8): convolution kernels
(tensor cores, oneDNN's blocked layouts) slow down a lot on odd channel counts, which the FLOPs
count does not see. On CUDA the models run channels-last with cuDNN autotuning for every shape, the
baseline included. ``--compile`` times ``torch.compile``d models (BN folded into the convolutions
under ``inference_mode`` with inductor's freezing), closer to a deployed network.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from workbench.benchmarks import write_results
from workbench.device import resolve_device

TARGET_EFFICIENCY = 0.8
FULL = {"models": ("segnet", "pspnet_resnet50", "icnet"), "width": 1.0, "size": (128, 256), "runs": 10}
QUICK = {"models": ("segnet", "pspnet_resnet18", "icnet"), "width": 0.25, "size": (64, 64), "runs": 5}


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def randomise_scales(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g).to(m.weight) + 0.01)


def bench_model(name: str, ratios: tuple[float, ...], device: torch.device, width: float, size: tuple[int, int],
                batch_size: int = 8, runs: int = 10, num_classes: int = 19, method: str = "slimming",
                channels_last: bool = False, round_to: int | None = 8, compile: bool = False) -> list[dict]:
    from workbench.models.segmentation import SEGMENTATION_MODELS
    from workbench.pruning import measure_latency, prune

    torch.manual_seed(0)
    model = SEGMENTATION_MODELS[name](num_classes, width=width).to(device).eval()
    randomise_scales(model)
    trace_input = torch.randn(1, 3, *size, device=device)
    batch = torch.randn(batch_size, 3, *size, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch = batch.to(memory_format=fmt)

    def timed(m: nn.Module) -> float:
        m = m.to(memory_format=fmt).eval()
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            m = torch.compile(m)
        return measure_latency(m, batch, runs=runs, warmup=5 if compile else 3)

    base = timed(model)
    rows = []
    for ratio in ratios:
        pruned, report = prune(model, ratio, trace_input, method=method, round_to=round_to, latency=False)
        after = timed(pruned)
        speedup = base / after
        rows.append({
            "model": name, "width": width, "input": [batch_size, 3, *size], "ratio": ratio, "method": method,
            "params_before": report.params_before, "params_after": report.params_after,
            "gflops_before": report.flops_before * batch_size / 1e9,
            "gflops_after": report.flops_after * batch_size / 1e9,
            "flops_ratio": report.flops_ratio, "latency_ms_before": base, "latency_ms_after": after,
            "speedup": speedup, "efficiency": speedup / report.flops_ratio,
            "meets_target": speedup >= TARGET_EFFICIENCY * report.flops_ratio,
            "device": str(device), "channels_last": channels_last, "round_to": round_to, "compile": compile,
        })
        del pruned
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench bench pruning", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", help="segmentation model names (default depends on --quick)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--width", type=float)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--method", default="slimming", choices=["slimming", "cap"])
    parser.add_argument("--memory-format", default="auto", choices=["auto", "contiguous", "channels_last"],
                        help="auto: channels_last on CUDA, contiguous elsewhere")
    parser.add_argument("--round-to", type=int, default=8, help="kept channels per layer rounded up to this; 0: off")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (inductor, freezing)")
    parser.add_argument("--quick", action="store_true", help="small widths and 64x64 inputs (CPU smoke run)")
    parser.add_argument("--output", help="write JSON and a markdown table to this folder")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for r in args.ratios:
        if not 0 <= r < 1:
            parser.error(f"--ratios: {r} is not in [0, 1)")
    device = resolve_device(args.device)
    channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto" and device.type == "cuda")
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
                            compile=args.compile)
    header = (f"pruning: latency speedup vs FLOPs ratio, batch {args.batch_size}, input {size[0]}x{size[1]}, "
              f"width {width}, {_describe(device)}, {'channels_last' if channels_last else 'contiguous'}, "
              f"round_to {args.round_to or 'off'}{', compiled' if args.compile else ''}; "
              f"target speedup >= {TARGET_EFFICIENCY} x FLOPs ratio")
    columns = ("model", "ratio", "params", "GFLOPs", "FLOPs ratio", "latency ms", "speedup", "efficiency", "target")
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']:.2f} | {r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M | "
            f"{r['gflops_before']:.2f} -> {r['gflops_after']:.2f} | {r['flops_ratio']:.2f}x | "
            f"{r['latency_ms_before']:.1f} -> {r['latency_ms_after']:.1f} | {r['speedup']:.2f}x | "
            f"{r['efficiency']:.2f} | {'yes' if r['meets_target'] else 'no'} |")
    print("\n".join(lines), flush=True)
    if args.output:
        write_results(args.output, f"pruning-{device.type}", rows, "\n".join(lines))
    return 0
