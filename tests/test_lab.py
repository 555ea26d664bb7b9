"""`workbench lab`: bound to 127.0.0.1, token required, rooted at the project, workbench kernel."""

import sys
from pathlib import Path

import pytest
from lab_server import running_lab

from workbench.cli import lab_command
from workbench.runner import project_root


def test_lab_command_is_local_and_token_protected():
    cmd, url = lab_command(port=8899, token="abc")
    assert "--ServerApp.ip=127.0.0.1" in cmd
    assert "--IdentityProvider.token=abc" in cmd
    assert f"--ServerApp.root_dir={project_root()}" in cmd
    assert url == "http://127.0.0.1:8899/lab?token=abc"


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
