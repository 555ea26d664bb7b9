"""Epoch time of CIFAR-shaped training on synthetic data: BN vs IEBN vs DIA, AMP and channels_last.

Synthetic data isolates the model's cost from data loading: a CIFAR-100-shaped epoch is 50,000
32x32 images in batches of 128 (390 optimiser steps). The timed steps are extrapolated to one epoch
and every variant is reported against plain BN measured in the same run.

``--compile`` adds each variant through ``torch.compile`` in fp32 (what ``fit(compile=True)`` and
``workbench train --compile`` run), reported against compiled BN and against the same variant
eager; the untimed warm-up steps include compiling.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from workbench.benchmarks import write_results
from workbench.device import autocast_dtype, describe_device, resolve_device

EPOCH_IMAGES = 50_000
VARIANTS = (("bn", "none"), ("iebn", "none"), ("bn", "se"), ("bn", "dia"))


def time_training(model_name: str, norm: str, attention: str, device: torch.device, batch_size: int = 128,
                  steps: int = 30, warmup: int = 5, amp: str = "off", channels_last: bool = False,
                  num_classes: int = 100, width: float = 1.0, compile: bool = False) -> dict:
    from workbench.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=num_classes, norm=norm, attention=attention, width=width).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False)
    x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    dtype = autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    per_step = (time.perf_counter() - started) / steps
    return {"model": model_name, "norm": norm, "attention": attention, "amp": amp, "channels_last": channels_last,
            "compile": compile, "batch_size": batch_size, "step_ms": per_step * 1e3,
            "epoch_s": per_step * (EPOCH_IMAGES // batch_size), "params": sum(p.numel() for p in model.parameters())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_variants(parser: argparse.ArgumentParser, text: str) -> list[tuple[str, str]]:
    """``"bn/none,iebn/none"`` as pairs; refused unless each is one of VARIANTS and bn/none comes first."""
    allowed = ", ".join(f"{n}/{a}" for n, a in VARIANTS)
    pairs = [tuple(v.strip().split("/", 1)) for v in text.split(",") if v.strip()]
    if not pairs or pairs[0] != VARIANTS[0] or any(p not in VARIANTS for p in pairs) or len(set(pairs)) < len(pairs):
        parser.error(f"--variants={text!r} is not valid; allowed: distinct pairs among {allowed}, bn/none first")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench bench training", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet164")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="resnet20, few steps (CPU smoke run)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every variant through torch.compile (fp32; compiling takes minutes)")
    parser.add_argument("--variants", default=",".join(f"{n}/{a}" for n, a in VARIANTS),
                        help="comma-separated norm/attention pairs, bn/none first (the baseline); "
                             "default: all of them")
    parser.add_argument("--output", help="write JSON and markdown tables to this folder")
    args = parser.parse_args(argv)
    variants = _parse_variants(parser, args.variants)
    device = resolve_device(args.device)
    model, steps = ("resnet20", 3) if args.quick else (args.model, args.steps)
    cuda = device.type == "cuda"
    settings = [("off", False, False)] + ([("bf16", False, False), ("bf16", True, False)] if cuda else [])
    settings += [("off", False, True)] if args.compile else []
    rows = []
    eager: dict[tuple, float] = {}
    for amp, cl, compiled in settings:
        base = None
        for norm, attention in variants:
            r = time_training(model, norm, attention, device, args.batch_size, steps, amp=amp, channels_last=cl,
                              width=args.width, warmup=2 if args.quick else 5, compile=compiled)
            base = base or r["step_ms"]
            r["ratio_vs_bn"] = r["step_ms"] / base
            if compiled:
                r["speedup_vs_eager"] = eager[(norm, attention)] / r["step_ms"]
            elif amp == "off":
                eager[(norm, attention)] = r["step_ms"]
            rows.append(r)
            print(f"[bench training] {norm}/{attention} amp {amp} channels_last {cl} compile {compiled}: "
                  f"{r['step_ms']:.1f} ms", file=sys.stderr, flush=True)
    header = f"training step time, {model} CIFAR-100-shaped synthetic data, {describe_device(device)}"
    lines = [header, "", "| norm | attention | amp | channels_last | compile | step ms | epoch s (50k imgs) | vs BN "
             "| compiled vs eager |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gain = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
        lines.append(f"| {r['norm']} | {r['attention']} | {r['amp']} | {r['channels_last']} | {r['compile']} | "
                     f"{r['step_ms']:.1f} | {r['epoch_s']:.1f} | {r['ratio_vs_bn']:.2f}x | {gain} |")
    print("\n".join(lines), flush=True)
    if args.output:
        write_results(args.output, f"training-{device.type}", rows, "\n".join(lines))
    return 0
