"""A JupyterLab server started through ``workbench lab``'s own command line, stopped by process group."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class LabServer:
    port: int
    token: str
    url: str
    process: subprocess.Popen

    def api(self, path: str, token: bool = True) -> tuple[int, dict | None]:
        sep = "&" if "?" in path else "?"
        full = f"http://127.0.0.1:{self.port}{path}" + (f"{sep}token={self.token}" if token else "")
        try:
            with urllib.request.urlopen(full, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None


@contextlib.contextmanager
def running_lab(timeout: float = 90.0, log_path: str | None = None, root: str | None = None) -> Iterator[LabServer]:
    from workbench.cli import _free_port, lab_command

    port, token = _free_port(), secrets.token_hex(16)
    cmd, url = lab_command(port=port, token=token, root=root)
    log = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LabServer(port, token, url, process)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited early with code {process.returncode}")
            try:
                if server.api("/api/status")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer on port {port} within {timeout} s")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
