"""Forward+backward time of IEBN2d against nn.BatchNorm2d, and of each attention variant's residual
stage against the plain one, at CIFAR shapes; eager and under ``torch.compile``.

Every number is a ratio to a baseline measured in the same run, in the same mode (eager against
eager, compiled against compiled), interleaved round by round so that load from other processes
hits both sides alike. The IEBN targets (every shape) on CPU: eager <= 1.45x BN, compiled <= 1.3x
compiled BN; on CUDA, for the fused Triton operator: eager <= 1.10x, compiled <= 1.05x. On CUDA
each shape has two IEBN rows against the same BatchNorm2d: the fused operator
(``WORKBENCH_FUSED=1``) and the PyTorch ops it replaces (``WORKBENCH_FUSED=0``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from workbench.benchmarks import write_results
from workbench.device import describe_device, resolve_device

BATCH = 128
# ResNet stage shapes (channels, spatial size): what the norm layers see in ResNet-164's stages.
STAGE_SHAPES = ((16, 32), (64, 16), (256, 8))
ALL_SHAPES = tuple(itertools.product((16, 64, 256), (32, 16, 8)))
# Bottleneck stages of ResNet-164: (input channels, bottleneck planes, spatial size).
BLOCK_STAGES = ((64, 16, 32), (128, 32, 16), (256, 64, 8))
BLOCK_VARIANTS = (("bn", "none"), ("iebn", "none"), ("bn", "se"), ("bn", "dia"))
TARGETS = {"eager": 1.45, "compile": 1.30}
CUDA_TARGETS = {"eager": 1.10, "compile": 1.05}
# (label, WORKBENCH_FUSED value) of the IEBN rows per device type; None: leave the switch alone.
IEBN_VARIANTS = {"cuda": (("IEBN2d fused", "1"), ("IEBN2d unfused", "0"))}
MODES = ("eager", "compile")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(module: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module(x).backward(grad)
        x.grad = None

    return step


def compare(baseline: Callable[[], None], candidate: Callable[[], None], device: torch.device,
            repeats: int = 15, inner: int = 3, warmup: int = 3) -> dict:
    """Median per-call milliseconds of both and the median of per-round ratios, rounds interleaved
    (order alternating) so that background load affects both sides alike."""
    for _ in range(warmup):
        baseline()
        candidate()
    base_ms, cand_ms, ratios = [], [], []
    for r in range(repeats):
        timings = {}
        order = (("b", baseline), ("c", candidate)) if r % 2 == 0 else (("c", candidate), ("b", baseline))
        for key, fn in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            timings[key] = (time.perf_counter() - start) / inner * 1e3
        base_ms.append(timings["b"])
        cand_ms.append(timings["c"])
        ratios.append(timings["c"] / timings["b"])
    return {"baseline_ms": statistics.median(base_ms), "candidate_ms": statistics.median(cand_ms),
            "ratio": statistics.median(ratios), "ratio_min_times": min(cand_ms) / min(base_ms)}


def _maybe_compile(module: nn.Module, mode: str) -> Callable:
    return torch.compile(module, fullgraph=True) if mode == "compile" else module


def _fresh_compiler(mode: str) -> None:
    # Every configuration compiles the same forward code for new module instances: start from a
    # clean cache rather than run into dynamo's recompile limit.
    if mode == "compile":
        torch._dynamo.reset()


@contextlib.contextmanager
def _fused_switch(value: str | None):
    """``WORKBENCH_FUSED=value`` inside the block (unchanged for ``None``), restored after."""
    if value is None:
        yield
        return
    before = os.environ.get("WORKBENCH_FUSED")
    os.environ["WORKBENCH_FUSED"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WORKBENCH_FUSED", None)
        else:
            os.environ["WORKBENCH_FUSED"] = before


def _norm_target(device: torch.device, mode: str, fused: str | None) -> float | None:
    if device.type == "cpu":
        return TARGETS[mode]
    if device.type == "cuda" and fused == "1":
        return CUDA_TARGETS[mode]
    return None  # reported, not judged


def bench_norm(device: torch.device, mode: str, channels: int, size: int, batch: int = BATCH,
               repeats: int = 15, channels_last: bool = False) -> list[dict]:
    """IEBN2d against nn.BatchNorm2d at one shape: one row per IEBN variant of the device (on CUDA
    the fused operator and the unfused PyTorch ops), each compared with its own interleaved BN runs."""
    from workbench.nn import IEBN2d

    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    shape = f"{batch}x{channels}x{size}x{size}" + (" cl" if channels_last else "")
    rows = []
    for label, fused in IEBN_VARIANTS.get(device.type, (("IEBN2d", None),)):
        with _fused_switch(fused):
            _fresh_compiler(mode)
            bn = _maybe_compile(nn.BatchNorm2d(channels).to(device), mode)
            iebn = _maybe_compile(IEBN2d(channels).to(device), mode)
            result = compare(_train_step(bn, x, grad), _train_step(iebn, x, grad), device, repeats=repeats)
        row = {"section": "norm", "mode": mode, "shape": shape, "baseline": "BatchNorm2d", "candidate": label,
               **result}
        target = _norm_target(device, mode, fused)
        if target is not None:
            row.update(target=target, within_target=result["ratio"] <= target)
        rows.append(row)
    return rows


def _stage(inplanes: int, planes: int, norm: str, attention: str, blocks: int) -> nn.Module:
    from workbench.models.cifar_resnet import Bottleneck, ResStage
    from workbench.nn import DIALSTMCell
    from workbench.nn.norms import get_norm_layer

    made = [Bottleneck(inplanes, planes, 1, get_norm_layer(norm), attention, True, shortcut_norm_layer=nn.BatchNorm2d)
            for _ in range(blocks)]
    return ResStage(made, DIALSTMCell(inplanes) if attention == "dia" else None)


def bench_blocks(device: torch.device, mode: str, inplanes: int, planes: int, size: int, batch: int = BATCH,
                 blocks: int = 2, repeats: int = 5) -> list[dict]:
    """A stage of ``blocks`` identity bottleneck blocks per variant against the plain BN stage (a
    DIA stage includes its shared cell, whose cost is spread over its blocks)."""
    _fresh_compiler(mode)
    torch.manual_seed(0)
    x = torch.randn(batch, inplanes, size, size, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    plain = _maybe_compile(_stage(inplanes, planes, "bn", "none", blocks).to(device), mode)
    rows = []
    for norm, attention in BLOCK_VARIANTS[1:]:
        _fresh_compiler(mode)
        variant = _maybe_compile(_stage(inplanes, planes, norm, attention, blocks).to(device), mode)
        result = compare(_train_step(plain, x, grad), _train_step(variant, x, grad), device, repeats=repeats,
                         inner=1, warmup=1)
        rows.append({"section": "block", "mode": mode, "shape": f"{batch}x{inplanes}x{size}x{size}",
                     "baseline": f"bottleneck stage x{blocks} bn/none",
                     "candidate": f"bottleneck stage x{blocks} {norm}/{attention}", **result})
    return rows


def run_layer_bench(device: str | torch.device = "auto", compile_modes: Sequence[str] = MODES,
                    shapes: Iterable[tuple[int, int]] = ALL_SHAPES,
                    block_stages: Iterable[tuple[int, int, int]] = BLOCK_STAGES, repeats: int = 15,
                    batch: int = BATCH, log: Callable[[str], None] | None = print,
                    channels_last: bool = False) -> list[dict]:
    """All measurements as rows (dicts); see the module docstring. ``channels_last`` lays out the
    norm-layer inputs so."""
    device = resolve_device(device)
    bad = [m for m in compile_modes if m not in MODES]
    if bad or not compile_modes:
        raise ValueError(f"compile_modes={tuple(compile_modes)!r} is not valid; allowed: a non-empty subset of {MODES}")
    shapes, block_stages = list(shapes), list(block_stages)
    rows = []
    for mode in compile_modes:
        for channels, size in shapes:
            for row in bench_norm(device, mode, channels, size, batch, repeats, channels_last):
                rows.append(row)
                if log:
                    log(format_row(row))
        for inplanes, planes, size in block_stages:
            for row in bench_blocks(device, mode, inplanes, planes, size, batch, repeats=max(3, repeats // 3)):
                rows.append(row)
                if log:
                    log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    verdict = "" if "within_target" not in row else (" ok" if row["within_target"] else " OVER TARGET")
    return (f"{row['mode']:7s} {row['shape']:19s} {row['candidate']:32s} {row['ratio']:.2f}x "
            f"({row['candidate_ms']:.2f} vs {row['baseline_ms']:.2f} ms){verdict}")


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| mode | shape (NxCxHxW) | candidate | baseline | ms | baseline ms | ratio | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        target = f"<= {r['target']:.2f}x {'ok' if r['within_target'] else 'OVER'}" if "target" in r else ""
        lines.append(f"| {r['mode']} | {r['shape']} | {r['candidate']} | {r['baseline']} | {r['candidate_ms']:.2f} | "
                     f"{r['baseline_ms']:.2f} | {r['ratio']:.2f}x | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench bench layers", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--quick", action="store_true",
                        help="only the ResNet stage shapes, eager only, fewer repeats (a smoke run)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of eager,compile")
    parser.add_argument("--shapes", choices=("stages", "all"), default="all",
                        help="norm-layer shapes: the ResNet stage shapes or all C x HW combinations")
    parser.add_argument("--sections", default="norm,blocks",
                        help="comma-separated subset of norm (IEBN2d vs BatchNorm2d) and blocks (attention stages)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size N (CIFAR training: 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="norm-layer inputs in channels_last layout")
    parser.add_argument("--output", help="write layers-<device>.json and .md into this folder")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sections = {v.strip() for v in args.sections.split(",") if v.strip()}
    if not sections or not sections <= {"norm", "blocks"}:
        parser.error(f"--sections={args.sections!r} is not valid; allowed: a non-empty subset of norm,blocks")
    if args.repeats < 1 or args.batch < 2:
        parser.error(f"--repeats={args.repeats} must be >= 1 and --batch={args.batch} >= 2")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shapes = STAGE_SHAPES if args.quick or args.shapes == "stages" else ALL_SHAPES
    if args.quick:
        modes, repeats = ["eager"], min(args.repeats, 5)
    else:
        repeats = args.repeats
    header = (f"IEBN2d vs BatchNorm2d and attention stages vs plain, forward+backward, {describe_device(device)}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
              + (", norm inputs channels_last" if args.channels_last else ""))
    print(header, flush=True)
    rows = run_layer_bench(device, modes, shapes if "norm" in sections else (),
                           BLOCK_STAGES if "blocks" in sections else (), repeats=repeats, batch=args.batch,
                           log=lambda line: print(line, flush=True), channels_last=args.channels_last)
    table = markdown(rows, header)
    print("\n" + table, flush=True)
    if args.output:
        write_results(args.output, f"layers-{device.type}", {"header": header, "rows": rows}, table)
    judged = [r for r in rows if "within_target" in r]
    over = [r["shape"] + " " + r["mode"] for r in judged if not r["within_target"]]
    if over:
        print(f"IEBN2d over target at: {', '.join(over)}", flush=True)
    elif judged:
        print("IEBN2d within target at every shape", flush=True)
    elif any(r["section"] == "norm" for r in rows):
        print(f"IEBN2d: no target on {device.type} (targets exist for CPU and for the fused operator on CUDA)",
              flush=True)
    return 0
