"""Latency measurement (inference mode, interleaving, flags), BN folding, and the pruning benchmark's modes."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
from torch import nn

from workbench.models.segmentation import SEGMENTATION_MODELS
from workbench.pruning import measure_latency
from workbench.pruning.cost import measure_latencies
from workbench.pruning.fold import fold_batchnorm


class Spy(nn.Module):
    """Records the autograd state each forward ran under, and the order of calls across instances."""

    def __init__(self, log: list | None = None, tag: str = "") -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.child = nn.Dropout(0.5)
        self.log, self.tag, self.seen = log, tag, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.child(self.lin(x))
        self.seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), out.grad_fn, self.training))
        if self.log is not None:
            self.log.append(self.tag)
        return out


def test_latency_runs_in_inference_mode_without_graph() -> None:
    spy = Spy()
    assert measure_latency(spy, torch.randn(2, 4), runs=2, warmup=1) > 0
    assert len(spy.seen) == 3
    assert all(inf and not grad and fn is None and not training for inf, grad, fn, training in spy.seen)


def test_latency_restores_training_flags() -> None:
    spy = Spy().train()
    spy.child.eval()  # mixed flags must come back as they were, not all-train
    measure_latency(spy, torch.randn(2, 4), runs=1, warmup=0)
    assert spy.training and spy.lin.training and not spy.child.training


def test_latencies_are_interleaved() -> None:
    log: list[str] = []
    a, b = Spy(log, "a"), Spy(log, "b")
    times = measure_latencies([a, b], torch.randn(2, 4), runs=3, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert log == ["a", "b"] * 4


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"runs": 1.5}, {"warmup": -1}, {"warmup": True}])
def test_latency_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        measure_latency(Spy(), torch.randn(2, 4), **kwargs)
    with pytest.raises(ValueError, match="models"):
        measure_latencies([], torch.randn(2, 4))


def _random_stats(model: nn.Module) -> nn.Module:
    # non-trivial running statistics and shifts, so a wrong fold cannot pass unnoticed
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name,width", [("segnet", 0.125), ("pspnet_resnet18", 0.125), ("icnet", 0.125)])
def test_fold_batchnorm_segmentation(name: str, width: float) -> None:
    torch.manual_seed(0)
    model = _random_stats(SEGMENTATION_MODELS[name](5, width=width))
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batchnorm(model, x[:1])
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(n.startswith("aux_head.") for n in left)  # the training-only head never runs in eval
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_skips_iebn_and_in_place_changes() -> None:
    from workbench.nn import IEBN2d

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.relu_(self.conv(x)))  # BN sees relu(conv), not conv: must stay

    model = _random_stats(nn.Sequential(nn.Conv2d(3, 4, 3), IEBN2d(4), InPlace()))
    folded = fold_batchnorm(model, torch.randn(1, 3, 12, 12))
    assert isinstance(folded[1], IEBN2d) and isinstance(folded[2].bn, nn.BatchNorm2d)


def test_fold_refuses_a_shared_conv_output() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the skip path too

    tf32 = torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="changed the output"):
        fold_batchnorm(_random_stats(Branch()), torch.randn(1, 3, 8, 8))
    assert torch.backends.cudnn.allow_tf32 == tf32  # the check's TF32 switch is undone
    with pytest.raises(ValueError, match="rtol"):
        fold_batchnorm(Branch(), torch.randn(1, 3, 8, 8), rtol=0)
    with pytest.raises(ValueError, match="example_inputs"):
        fold_batchnorm(Branch(), None)


def test_benchmark_modes_threads_breakdown(capsys) -> None:
    from workbench.benchmarks.pruning import main

    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--models", "icnet", "--ratios", "0.5", "--runs", "1", "--size", "32", "32",
                     "--modes", "eager", "fold-bn", "--threads", "1", "--breakdown",
                     "--allocator", "system"]) == 0  # keep is process-wide: tested in a child process
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "cpu (1 threads)" in out and "modes eager/fold-bn" in out and "channels_last" in out
    assert "allocator system" in out
    assert "| icnet | eager | 0.50 |" in out and "| icnet | fold-bn | 0.50 |" in out and "non-conv time" in out
    assert "efficiency if convs ideal" in out
    assert "Where the pruned networks spend their time" in out
    op_rows = [line for line in out.splitlines() if line.startswith("| icnet | fold-bn | 0.50 |") and "`" in line]
    assert op_rows and any("conv" in line for line in op_rows)
    with pytest.raises(SystemExit):
        main(["--quick", "--threads", "0"])
    with pytest.raises(SystemExit):
        main(["--quick", "--modes", "jit"])
    with pytest.raises(SystemExit):
        main(["--quick", "--allocator", "jemalloc"])


_MMAPPED_BYTES = """
import ctypes, sys, torch
from workbench.benchmarks.allocator import apply_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
print(apply_allocator(sys.argv[1]))
before = libc.mallinfo2().hblkhd
x = torch.empty(64 * 2**20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallinfo2)")
def test_keep_allocator_serves_large_blocks_from_the_heap(tmp_path) -> None:
    # mmapped bytes grow by the tensor's 64 MiB under glibc's defaults, by nothing once memory is kept
    def mmapped(choice: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _MMAPPED_BYTES, choice], capture_output=True, text=True,
                             check=True, cwd=tmp_path).stdout.split()
        return out[0], int(out[1])

    applied, grown = mmapped("system")
    assert applied == "system" and grown >= 64 * 2**20
    assert mmapped("keep") == ("keep", 0)
    from workbench.benchmarks.allocator import apply_allocator

    with pytest.raises(ValueError, match="allocator='tcmalloc'.*keep"):
        apply_allocator("tcmalloc")


def test_bench_all_runs_pruning_last() -> None:
    # pruning's allocator setting is process-wide: no benchmark may run after it under a header that omits it
    from workbench.cli import BENCHMARKS

    assert list(BENCHMARKS)[-1] == "pruning"


def test_cuda_graph_mode_is_refused_off_cuda_before_any_work() -> None:
    from workbench.benchmarks.pruning import CUDAGraphForward, bench_model, main

    with pytest.raises(ValueError, match="cuda-graph needs a CUDA device, got cpu"):
        bench_model("icnet", (0.5,), torch.device("cpu"), 0.25, (32, 32), modes=("eager", "cuda-graph"))
    with pytest.raises(SystemExit):
        main(["--quick", "--device", "cpu", "--modes", "cuda-graph", "--allocator", "system"])
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        CUDAGraphForward(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 8, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["segnet", "icnet"])
def test_cuda_graph_form_replays_the_folded_network(name: str) -> None:
    from workbench.benchmarks.pruning import CUDAGraphForward, bench_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS[name](5, width=0.25).to(device).eval()
    batch = torch.randn(2, 3, 64, 64, device=device).to(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 on both sides of the comparison
        graphed = CUDAGraphForward(fold_batchnorm(model, batch[:1]), batch)
        for _ in range(2):  # a new input each call: the replay reads what was copied in
            x = torch.randn_like(batch)
            with torch.inference_mode():
                expected = model(x)
            torch.testing.assert_close(graphed(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="captured for"):
        graphed(batch[:1])
    rows = bench_model(name, (0.5,), device, 0.25, (64, 64), runs=2, channels_last=True, modes=("cuda-graph",))
    assert rows[0]["mode"] == "cuda-graph" and rows[0]["params_after"] < rows[0]["params_before"]


def test_time_breakdown_per_op_and_the_ops_that_hold_the_speedup_back() -> None:
    from workbench.benchmarks.pruning import format_op_table, time_breakdown, top_ops

    # on one thread at batch 2 a 1x1 convolution with a bias runs aten's GEMM path, which copies the bias
    # into its output with aten::copy_: convolution time, not time outside convolutions
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.Upsample(scale_factor=2, mode="bilinear"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (part,) = time_breakdown([net.eval()], torch.randn(2, 3, 16, 16), rounds=2)
    finally:
        torch.set_num_threads(threads)
    ops = part["ops_ms"]
    assert ops and list(ops.values()) == sorted(ops.values(), reverse=True)
    assert part["conv_ms"] > 0 and part["other_ms"] > 0
    assert part["conv_ms"] + part["other_ms"] == pytest.approx(sum(ops.values()))
    assert "aten::upsample_bilinear2d" in ops and "aten::_slow_conv2d_forward" in ops
    assert "aten::copy_" not in ops and "aten::empty" not in ops

    row = {"model": "m", "mode": "eager", "ratio": 0.7, "flops_ratio": 8.0,
           "ops_ms_before": {"conv": 80.0, "resize": 10.0, "relu": 8.0},
           "ops_ms_after": {"conv": 10.0, "resize": 9.0, "relu": 2.0, "new": 0.5}}
    # largest pruned time first, stopping once 90% of it is listed
    assert top_ops(row) == [("conv", 80.0, 10.0), ("resize", 10.0, 9.0), ("relu", 8.0, 2.0)]
    assert top_ops(row, limit=1) == [("conv", 80.0, 10.0)]
    assert top_ops(row, cover=1.0)[-1] == ("new", 0.0, 0.5)  # an op only the pruned network runs
    table = format_op_table([row])
    assert "| m | eager | 0.70 | 8.00x | `resize` | 10.0 | 9.0 | 1.11x | 42% |" in table


def test_efficiency_with_ideal_convs_splits_a_shortfall_between_convs_and_the_rest() -> None:
    from workbench.benchmarks.pruning import efficiency_with_ideal_convs, format_table

    # 100 ms before (80 conv + 20 other); FLOPs 8x overall, convolutions 10x; pruned: 12 ms conv, 6 ms other.
    # Convolutions at exactly 10x would take 8 ms: 100 / (8 + 6) = 7.14x speedup, 0.89 of the FLOPs ratio
    row = {"model": "m", "mode": "eager", "ratio": 0.7, "params_before": 1e6, "params_after": 2e5,
           "gflops_before": 8.0, "gflops_after": 1.0, "flops_ratio": 8.0, "latency_ms_before": 100.0,
           "latency_ms_after": 18.0, "speedup": 100 / 18, "efficiency": 100 / 18 / 8, "meets_target": False,
           "conv_ms_before": 80.0, "other_ms_before": 20.0, "conv_ms_after": 12.0, "other_ms_after": 6.0,
           "conv_flops_ratio": 10.0, "ops_ms_before": {"conv": 80.0, "relu": 20.0},
           "ops_ms_after": {"conv": 12.0, "relu": 6.0}}
    assert efficiency_with_ideal_convs(row) == pytest.approx(100 / 14 / 8)
    # 0.8 x 8 = 6.4x needs the pruned forward within 15.6 ms: with 15 ms outside convolutions, ideal ones leave 0.54
    assert efficiency_with_ideal_convs({**row, "other_ms_after": 15.0}) == pytest.approx(100 / 23 / 8)
    row["efficiency_ideal_convs"] = efficiency_with_ideal_convs(row)
    assert "| 5.56x | 0.69 | no | 20% -> 33% | 6.67x | 10.00x | 0.89 |" in format_table([row], "header")
