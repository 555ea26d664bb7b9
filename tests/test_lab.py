"""`workbench lab`: bound to 127.0.0.1, token required and kept off every command line, rooted at the
project, workbench kernel, stopped with its parent."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lab_server import pid_alive, running_lab, wait_gone

from workbench.lab import lab_command, lab_environment, lab_url
from workbench.runner import project_root


def test_lab_command_is_local_and_holds_no_token():
    cmd = lab_command(port=8899)
    assert "--ServerApp.ip=127.0.0.1" in cmd
    assert f"--ServerApp.root_dir={project_root()}" in cmd
    assert not any("token" in arg.lower() for arg in cmd)
    assert lab_environment("abc", base={"PATH": "/bin"}) == {"PATH": "/bin", "JUPYTER_TOKEN": "abc"}
    assert lab_url(8899, "abc") == "http://127.0.0.1:8899/lab?token=abc"


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="JUPYTER_TOKEN"):
        lab_environment("")


def _command_lines() -> list[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended while we looked
            pass
    return lines


@pytest.mark.slow
def test_lab_serves_the_project_on_the_workbench_kernel():
    with running_lab() as lab:
        assert lab.api("/api/status", token=False)[0] == 403
        status, specs = lab.api("/api/kernelspecs")
        assert status == 200
        assert specs["default"] == "workbench"
        argv0 = specs["kernelspecs"]["workbench"]["spec"]["argv"][0]
        assert Path(argv0).resolve() == Path(sys.executable).resolve()
        status, listing = lab.api("/api/contents/notebooks")
        assert status == 200 and any(item["name"] == "00_quickstart.ipynb" for item in listing["content"])


@pytest.mark.slow
def test_token_is_on_no_command_line_while_the_lab_runs():
    with running_lab() as lab:
        assert lab.api("/api/status")[0] == 200  # the server does require this very token
        lines = _command_lines()
        assert any("jupyterlab" in line for line in lines)  # the scan sees the server itself
        assert not [line for line in lines if lab.token in line]


@pytest.mark.slow
def test_sigterm_to_workbench_lab_stops_jupyterlab():
    with running_lab() as lab:
        jupyter = lab.jupyter_pids()
        assert jupyter and all(pid_alive(pid) for pid in jupyter)
        lab.process.send_signal(signal.SIGTERM)  # to `workbench lab` alone, not its process group
        try:
            lab.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("workbench lab did not exit within 30 s of SIGTERM")
        assert wait_gone(jupyter, 10), f"JupyterLab {jupyter} still runs after SIGTERM to workbench lab"
