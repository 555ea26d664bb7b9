"""JupyterLab for the workbench: bound to 127.0.0.1, token through the environment, stopped with its parent.

The token never appears on a command line, where any local user could read it with ``ps``: JupyterLab
reads it from ``JUPYTER_TOKEN`` (its identity provider's documented source), and the environment of a
process is readable only by its owner. ``workbench lab`` takes the token from ``$JUPYTER_TOKEN`` when
set and draws a fresh one otherwise.

SIGTERM, SIGINT and SIGHUP sent to ``workbench lab`` (``kill``, Ctrl-C, a closed terminal, a batch
scheduler's time limit) are passed on to JupyterLab as SIGTERM, which shuts its kernels down and exits;
``workbench lab`` then exits with it, so no server is left behind.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys

TOKEN_VARIABLE = "JUPYTER_TOKEN"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lab_command(port: int, open_browser: bool = False, root: str | None = None) -> list[str]:
    """The ``jupyter lab`` command line: 127.0.0.1 only, rooted at the project (or ``root``), the
    workbench kernel as the default. It holds no token: see :func:`lab_environment`."""
    from workbench.runner import project_root

    cmd = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--ServerApp.root_dir={root or project_root()}", "--ServerApp.port_retries=0",
           "--MappingKernelManager.default_kernel_name=workbench"]
    if not open_browser:
        cmd.append("--no-browser")
    if os.geteuid() == 0:  # containers and CI run as root; JupyterLab refuses that without the flag
        cmd.append("--allow-root")
    return cmd


def lab_environment(token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the token JupyterLab requires."""
    if not token:
        raise ValueError(f"the lab token must not be empty (unset {TOKEN_VARIABLE} to get a fresh one)")
    env = dict(os.environ if base is None else base)
    env[TOKEN_VARIABLE] = token
    return env


def lab_url(port: int, token: str) -> str:
    """The address that opens the lab, token included."""
    return f"http://127.0.0.1:{port}/lab?token={token}"


def serve_lab(port: int | None = None, open_browser: bool = False, root: str | None = None) -> int:
    """Start JupyterLab on the workbench kernel and wait for it; returns its exit status.

    The signals in ``FORWARDED_SIGNALS`` reach JupyterLab as SIGTERM while it runs."""
    from workbench.runner import ensure_kernel

    ensure_kernel()
    token = os.environ.get(TOKEN_VARIABLE) or secrets.token_hex(24)
    port = port or free_port()
    print(f"[workbench] JupyterLab at {lab_url(port, token)}", flush=True)
    process = subprocess.Popen(lab_command(port, open_browser, root), env=lab_environment(token))
    previous = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}

    def forward(signum, frame):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    try:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:  # an exception in this process: never leave the server behind
            process.terminate()
            process.wait()
