"""The command line's error boundary: each expected failure is one or two lines naming the problem
(and the fix), a non-zero exit code and no traceback, before any work starts; ``--debug`` shows
the traceback; Ctrl-C during ``run`` or ``sweep`` records the interrupted notebook."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from nbhelpers import write_test_notebook

from workbench import cli

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
TRAIN = ["train", "--epochs", "1", "--no-progress", "--device", "cpu"]


def _short_error(capsys, code, expected_code, message):
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert "Traceback" not in err
    assert message in err, err
    assert 1 <= len(err.strip().splitlines()) <= 2, err
    return err


@pytest.mark.parametrize("argv, code, message", [
    (["run", "01_batch_noise", "-p", "norms", "['bn','gn']"], 2, "norms[1]='gn' is not allowed"),
    (["run", "00_quickstart", "-p", "lr", "nan"], 2, "lr=nan must be finite"),
    (["sweep", "00_quickstart", "-p", "width", "0.5", "inf"], 2, "width=inf must be finite"),
    ([*TRAIN, "--lr", "nan"], 2, "lr=nan must be finite"),
    ([*TRAIN, "--lr", "0"], 2, "lr=0.0 is out of range; allowed: float > 0.0"),
    ([*TRAIN, "--momentum", "1"], 2, "momentum=1.0 is out of range; allowed: float >= 0.0 < 1.0"),
    ([*TRAIN, "--weight-decay=-1e-4"], 2, "weight_decay=-0.0001 is out of range"),
    ([*TRAIN, "--gamma", "inf"], 2, "gamma=inf must be finite"),
    ([*TRAIN, "--width", "0"], 2, "width=0.0 is out of range"),
    ([*TRAIN, "--milestones", "0"], 2, "milestones[0]=0 is out of range"),
    ([*TRAIN, "--batch-size", "100000"], 2, "batch_size=100000 is larger than the 1437 training samples of 'digits'"),
])
def test_bad_values_refused_with_a_short_message(argv, code, message, tmp_path, capsys):
    argv = [*argv, "--output", str(tmp_path / "out")]
    _short_error(capsys, cli.main(argv), code, message)
    assert not (tmp_path / "out").exists(), "a refused command writes nothing"


@NO_CUDA
@pytest.mark.parametrize("argv", [["run", "00_quickstart", "--device", "cuda"],
                                  ["run", "00_quickstart", "-p", "device", "cuda:1"],
                                  ["sweep", "00_quickstart", "-p", "device", "cpu", "cuda"],
                                  [*TRAIN[:-2], "--device", "cuda"]])
def test_cuda_without_cuda_refused_before_a_kernel_starts(argv, tmp_path, capsys):
    code = cli.main([*argv, "--output", str(tmp_path / "out")])
    _short_error(capsys, code, 2, "CUDA is not available on this machine")
    assert not (tmp_path / "out").exists()


def test_config_file_problems_name_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    _short_error(capsys, cli.main(["train", "--config", str(missing)]), 2, f"config file {missing} does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: resnet20\nepochs: [1, 2\nlr: 0.1\n")
    _short_error(capsys, cli.main(["train", "--config", str(broken)]), 2,
                 f"config file {broken} is not valid YAML at line")
    binary = tmp_path / "weights.pt"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    _short_error(capsys, cli.main(["train", "--config", str(binary)]), 2,
                 f"config file {binary} is not a text file")


@pytest.mark.parametrize("dataset, message", [("cifar10", "cifar10 data root"),
                                              ("cityscapes", "cityscapes data root")])
def test_missing_dataset_root(dataset, message, tmp_path, capsys):
    argv = [*TRAIN, "--dataset", dataset, "--data-root", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]
    err = _short_error(capsys, cli.main(argv), 1, message)
    assert str(tmp_path / "nothing") in err


def _writable(folder: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if not _writable(folder):
        return folder / "reports"
    # root writes despite permission bits; a read-only or virtual file system refuses even root
    for parent in (Path("/sys"), Path("/proc")):
        if parent.is_dir() and not _writable(parent):
            return parent / "workbench-reports"
    pytest.skip("no folder this user cannot write")


@pytest.mark.parametrize("command", [["run", "00_quickstart"], ["sweep", "00_quickstart", "-p", "seed", "0", "1"]])
def test_unwritable_reports_folder(command, tmp_path, capsys):
    out = _unwritable_folder(tmp_path)
    err = _short_error(capsys, cli.main([*command, "--output", str(out)]), 2, "cannot write to")
    assert "--output" in err


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["--debug", "run", "no_such_notebook"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "not found; available:" in err
    assert cli.main(["train", "--lr", "nan", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert "WORKBENCH_DEBUG" not in os.environ, "--debug lasts one command"


# ----------------------------------------------------------------------------------------------
# Ctrl-C


def _start(argv: list[str], marker: Path) -> subprocess.Popen:
    """The command in a session of its own, as a terminal runs it, once its notebook created ``marker``."""
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # a suite started in the background inherits an ignored SIGINT; a terminal's is not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert marker.exists(), proc.communicate(timeout=60)
    time.sleep(1)
    return proc


def _ctrl_c(proc: subprocess.Popen) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out, err
    return out, err


def _sleeping_body(marker: Path, when: str = "True") -> str:
    return (f"import pathlib, time\nfrom workbench import report\nif {when}:\n"
            f"    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(300)\nreport.record('score', seed)")


def test_ctrl_c_during_run_records_the_notebook_as_interrupted(tmp_path):
    marker = tmp_path / "started"
    first = write_test_notebook(tmp_path / "a_quick.ipynb", "x = 1")
    sleepy = write_test_notebook(tmp_path / "b_sleepy.ipynb", _sleeping_body(marker))
    out = tmp_path / "run"
    proc = _start(["run", str(first), str(sleepy), "--output", str(out)], marker)
    stdout, err = _ctrl_c(proc)
    assert "[workbench] a_quick: 2/2 cells" in stdout, "progress: cells done of the total"
    assert "b_sleepy is recorded as 'interrupted'" in err and len(err.strip().splitlines()) <= 2, err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert [(n["notebook"], n["status"]) for n in results["notebooks"]] == [("a_quick", "done"),
                                                                            ("b_sleepy", "interrupted")]


def test_ctrl_c_during_sweep_records_the_busy_point_as_interrupted(tmp_path):
    marker = tmp_path / "started"
    nb = write_test_notebook(tmp_path / "slow.ipynb", _sleeping_body(marker, "seed == 1"))
    out = tmp_path / "sweep"
    proc = _start(["sweep", str(nb), "-p", "seed", "0", "1", "2", "--output", str(out)], marker)
    stdout, err = _ctrl_c(proc)
    assert "[workbench] sweep slow: 1/3 points" in stdout and "ETA" in stdout, "progress: points done, ETA"
    assert "the same command resumes" in err, err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert {p["point"]: p["status"] for p in results["points"]} == {"seed=0": "done", "seed=1": "interrupted",
                                                                     "seed=2": "pending"}


@NO_CUDA
@pytest.mark.parametrize("argv", [["bench", "layers", "--device", "cuda"], ["bench", "probes", "--device", "cuda"]])
def test_bench_on_a_missing_accelerator_is_a_short_error(capsys, argv):
    _short_error(capsys, cli.main(argv), 2, "CUDA is not available")
