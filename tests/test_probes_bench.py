"""`workbench bench probes` on a tiny network: every probe timed, vmap vs loop, tables written."""

import json

import torch
from torch import nn

from workbench.benchmarks import probes as bench


def tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_bench_probes_main(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_default_model", lambda width: tiny())
    assert bench.main(["--device", "cpu", "--steps", "2", "--micro-batches", "4", "--batch-size", "16",
                       "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "probes.json").read_text())
    names = list(bench.probe_factories(torch.zeros(2, 3, 8, 8)))
    assert [r["probe"] for r in data["overhead"]] == names
    assert all(r["overhead"] >= 1.0 and r["every"] >= 1 for r in data["overhead"])
    row = data["vmap"][0]
    assert row["micro_batch"] == 4 and row["speedup"] > 0
    assert row["compiled_ms"] > 0 and row["compiled_speedup"] == row["loop_ms"] / row["compiled_ms"]
    text = (tmp_path / "probes.md").read_text()
    assert "coupling_gap" in text and "| 4 | 4 |" in text and "compiled speedup" in text
    assert "target >= 3x" in capsys.readouterr().out


def test_bench_probes_without_the_compiled_column():
    rows = bench.bench_vmap(tiny, torch.device("cpu"), 16, (4,), repeats=1, compiled=False)
    assert "compiled_ms" not in rows[0]
    assert "compiled" not in bench.format_tables([], rows)
