"""The layer benchmark's harness on tiny shapes (timings themselves are not asserted)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from workbench.benchmarks import layers


def test_compare_reports_medians_and_ratio():
    calls = {"b": 0, "c": 0}

    def baseline():
        calls["b"] += 1

    def candidate():
        calls["c"] += 1

    result = layers.compare(baseline, candidate, torch.device("cpu"), repeats=3, inner=2, warmup=1)
    assert calls == {"b": 7, "c": 7}
    assert set(result) == {"baseline_ms", "candidate_ms", "ratio", "ratio_min_times"} and result["ratio"] > 0


def test_run_layer_bench_rows_and_markdown():
    rows = layers.run_layer_bench("cpu", ("eager",), shapes=[(4, 4)], block_stages=[(8, 2, 4)], repeats=1, batch=2,
                                  log=None)
    norm = [r for r in rows if r["section"] == "norm"]
    blocks = [r for r in rows if r["section"] == "block"]
    assert len(norm) == 1 and norm[0]["candidate"] == "IEBN2d" and norm[0]["target"] == 1.45
    assert [r["candidate"].split()[-1] for r in blocks] == ["iebn/none", "bn/se", "bn/dia"]
    table = layers.markdown(rows, "header")
    assert table.count("\n") == len(rows) + 4 and "IEBN2d" in table
    json.dumps(rows)
    with pytest.raises(ValueError, match="compile_modes"):
        layers.run_layer_bench("cpu", ("jit",), shapes=[], block_stages=[], log=None)


def test_main_writes_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(layers, "STAGE_SHAPES", ((4, 4),))
    monkeypatch.setattr(layers, "BLOCK_STAGES", ((8, 2, 4),))
    assert layers.main(["--device", "cpu", "--quick", "--repeats", "1", "--batch", "2", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layers-cpu.json").read_text())
    assert data["rows"] and (tmp_path / "layers-cpu.md").read_text().startswith("IEBN2d vs")


def test_main_sections_subset_and_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layers, "STAGE_SHAPES", ((4, 4),))
    monkeypatch.setattr(layers, "BLOCK_STAGES", ((8, 2, 4),))
    assert layers.main(["--device", "cpu", "--quick", "--sections", "norm", "--repeats", "1", "--batch", "2",
                        "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "layers-cpu.json").read_text())["rows"]
    assert rows and {r["section"] for r in rows} == {"norm"}
    with pytest.raises(SystemExit):
        layers.main(["--sections", "convs"])
    assert "norm,blocks" in capsys.readouterr().err


def test_write_results_writes_both_files_and_keeps_an_earlier_one_on_failure(tmp_path):
    from workbench.benchmarks import write_results

    write_results(tmp_path, "demo-cpu", [{"ratio": 1.5}], "| a |")
    assert json.loads((tmp_path / "demo-cpu.json").read_text()) == [{"ratio": 1.5}]
    assert (tmp_path / "demo-cpu.md").read_text() == "| a |\n"
    with pytest.raises(TypeError):
        write_results(tmp_path, "demo-cpu", [{"ratio": object()}], "| b |")
    assert json.loads((tmp_path / "demo-cpu.json").read_text()) == [{"ratio": 1.5}], "earlier result intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-cpu.json", "demo-cpu.md"]


def test_norm_rows_per_fused_variant_with_the_switch_restored(monkeypatch):
    """On CUDA each shape has a fused and an unfused IEBN row, each built and timed under its own
    WORKBENCH_FUSED value (here on CPU, where the switch changes nothing but the rows)."""
    seen = []
    original = layers.compare

    def spy(baseline, candidate, device, **kwargs):
        seen.append(os.environ.get("WORKBENCH_FUSED"))
        return original(baseline, candidate, device, **kwargs)

    monkeypatch.setattr(layers, "compare", spy)
    monkeypatch.setitem(layers.IEBN_VARIANTS, "cpu", (("IEBN2d fused", "1"), ("IEBN2d unfused", "0")))
    monkeypatch.setenv("WORKBENCH_FUSED", "eager")
    rows = layers.bench_norm(torch.device("cpu"), "eager", 4, 4, batch=2, repeats=1, channels_last=True)
    assert [r["candidate"] for r in rows] == ["IEBN2d fused", "IEBN2d unfused"] and seen == ["1", "0"]
    assert all(r["shape"] == "2x4x4x4 cl" for r in rows)
    assert os.environ["WORKBENCH_FUSED"] == "eager"
    cuda = torch.device("cuda")
    assert layers._norm_target(cuda, "eager", "1") == 1.10 and layers._norm_target(cuda, "compile", "1") == 1.05
    assert layers._norm_target(cuda, "eager", "0") is None
