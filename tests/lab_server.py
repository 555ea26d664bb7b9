"""A JupyterLab server started through ``workbench lab`` itself, stopped by its process ids."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LabServer:
    port: int
    token: str
    process: subprocess.Popen  # `workbench lab`

    def api(self, path: str, token: bool = True) -> tuple[int, dict | None]:
        sep = "&" if "?" in path else "?"
        full = f"http://127.0.0.1:{self.port}{path}" + (f"{sep}token={self.token}" if token else "")
        try:
            with urllib.request.urlopen(full, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def jupyter_pids(self) -> list[int]:
        """The JupyterLab processes `workbench lab` started (its children)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in children.read_text().split()]
        return []


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def running_lab(timeout: float = 90.0, log_path: str | None = None, root: str | None = None) -> Iterator[LabServer]:
    """``workbench lab`` on a free port with a fresh token in ``$JUPYTER_TOKEN``; yields once the
    server answers. Teardown sends SIGTERM to ``workbench lab`` only (it forwards it), then kills
    whatever is left by pid."""
    from workbench.lab import free_port

    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "workbench.cli", "lab", f"--port={port}"] + ([f"--root={root}"] if root else [])
    log = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_TOKEN": token})
    server = LabServer(port, token, process)
    children: list[int] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"workbench lab exited early with code {process.returncode}")
            try:
                if server.api("/api/status")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer on port {port} within {timeout} s")
            time.sleep(0.5)
        children = server.jupyter_pids()
        yield server
    finally:
        children = children or server.jupyter_pids()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not wait_gone(children, 10):
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.close()
