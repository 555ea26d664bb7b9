"""`workbench bench training`: the eager table on CPU, and the compiled rows' ratios."""

import json

from workbench.benchmarks import training as bench


def test_bench_training_quick_writes_the_table(tmp_path, capsys):
    assert bench.main(["--quick", "--device", "cpu", "--batch-size", "8", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "training-cpu.json").read_text())
    assert [(r["norm"], r["attention"]) for r in rows] == list(bench.VARIANTS)
    assert rows[0]["ratio_vs_bn"] == 1.0 and all(r["step_ms"] > 0 and not r["compile"] for r in rows)
    assert "| iebn | none | off | False | False |" in capsys.readouterr().out


def test_bench_training_compile_rows_against_compiled_bn_and_eager(monkeypatch, capsys):
    times = {("bn", False): 10.0, ("iebn", False): 30.0, ("bn", True): 5.0, ("iebn", True): 6.0}

    def fake(model, norm, attention, device, batch_size, steps, amp="off", channels_last=False, width=1.0,
             warmup=5, compile=False):
        ms = times.get((norm, compile), 20.0 if not compile else 8.0)
        return {"model": model, "norm": norm, "attention": attention, "amp": amp, "channels_last": channels_last,
                "compile": compile, "step_ms": ms, "epoch_s": ms}

    monkeypatch.setattr(bench, "time_training", fake)
    assert bench.main(["--device", "cpu", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "| iebn | none | off | False | True | 6.0 | 6.0 | 1.20x | 5.00x |" in out  # vs compiled BN; vs eager IEBN
    assert "| bn | none | off | False | True | 5.0 | 5.0 | 1.00x | 2.00x |" in out


def test_bench_training_variants_subset_and_refusal(monkeypatch, capsys):
    seen = []

    def fake(model, norm, attention, device, batch_size, steps, amp="off", channels_last=False, width=1.0,
             warmup=5, compile=False):
        seen.append((norm, attention))
        return {"model": model, "norm": norm, "attention": attention, "amp": amp, "channels_last": channels_last,
                "compile": compile, "step_ms": 2.0 if norm == "iebn" else 1.0, "epoch_s": 1.0}

    monkeypatch.setattr(bench, "time_training", fake)
    assert bench.main(["--device", "cpu", "--variants", "bn/none,iebn/none"]) == 0
    assert seen == [("bn", "none"), ("iebn", "none")]
    assert "| iebn | none | off | False | False | 2.0 | 1.0 | 2.00x |" in capsys.readouterr().out
    for bad in ("iebn/none", "bn/none,gn/none", "bn/none,bn/none"):
        try:
            bench.main(["--device", "cpu", "--variants", bad])
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"--variants {bad} was accepted")
    assert "--variants='iebn/none' is not valid; allowed: distinct pairs among bn/none" in capsys.readouterr().err
