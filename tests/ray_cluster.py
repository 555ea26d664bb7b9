"""A real two-node Ray cluster on this machine for tests: a head and a worker started with
``ray start --block``, each with 1 CPU, its own temp folder and free ports, both in a network
namespace of the test's own (:class:`isolated_network.IsolatedNetwork`) with its private test address
as their node address: Ray refuses a cluster of several nodes on 127.0.0.1, and the namespace keeps
the ports such a cluster listens on out of reach of anything but the test.

Every process of the cluster carries a token in its environment (inherited from ``ray start`` by
Ray's processes, the workers and the notebook kernels they start), so :meth:`LocalRayCluster.stop`
finds and ends exactly the processes this cluster started, and nothing else on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from isolated_network import IsolatedNetwork

TOKEN_VAR = "WORKBENCH_TEST_RAY_CLUSTER"
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def can_hide_folders() -> bool:
    """Whether a process can get a mount namespace of its own here (root, util-linux ``unshare``)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = tempfile.mkdtemp(prefix="wbns-")
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount -t tmpfs probe "$0" && umount "$0"', probe],
                              capture_output=True, timeout=30).returncode == 0
    finally:
        os.rmdir(probe)


class LocalRayCluster:
    def __init__(self, net: IsolatedNetwork) -> None:
        self.net = net
        self.token = uuid.uuid4().hex
        # Ray's Unix socket paths must stay short: a folder directly under /tmp
        self.temp = Path(tempfile.mkdtemp(prefix="wbray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"{net.address}:{self.port}"
        # Ray's token authentication with a token of this cluster's own, given to every node and driver
        self.env = {**os.environ, TOKEN_VAR: self.token, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.nodes: dict[str, subprocess.Popen] = {}

    def _ray(self, name: str, *args: str) -> list[str]:
        agent_ports = ["--dashboard-agent-grpc-port", str(free_port()), "--dashboard-agent-listen-port",
                       str(free_port()), "--metrics-export-port", str(free_port()), "--runtime-env-agent-port",
                       str(free_port())]
        return [str(Path(sys.executable).with_name("ray")), "start", "--node-ip-address", self.net.address,
                "--node-name", name, "--num-cpus", "1", "--temp-dir", str(self.temp / name),
                "--disable-usage-stats", "--include-log-monitor", "false", *agent_ports, *args, "--block"]

    def start_head(self) -> None:
        # no autoscaler monitor: a fixed cluster needs none, and every Python process started beside
        # the raylet's dashboard agent slows the agent's start on a small machine
        self._start("head", self._ray("head", "--head", "--port", str(self.port), "--include-dashboard", "false",
                                      "--no-monitor",
                                      "--dashboard-port", str(free_port()), "--ray-client-server-port",
                                      str(free_port())), self.env)

    def start_worker(self, env: dict[str, str], hide: Path | None = None) -> None:
        """The worker node, with ``env`` added to its environment; ``hide`` (a folder) is covered by
        an empty tmpfs in a mount namespace of the worker's own, as if the node had its own disk."""
        cmd = self._ray("worker", "--address", self.address)
        if hide is not None:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs worker-disk "$0" && exec "$@"', str(hide), *cmd]
        self._start("worker", cmd, {**self.env, **env})

    def _start(self, name: str, cmd: list[str], env: dict[str, str], attempts: int = 3) -> None:
        """Start a node and wait until ``ray start`` says it is up. The raylet gives its dashboard
        agent 15 s to report its ports and aborts otherwise, which a busy 2-core machine can miss:
        a node that did not come up is started again, up to ``attempts`` times."""
        for attempt in range(attempts):
            log = open(self.temp / f"{name}.log", "w")  # noqa: SIM115 (kept open by the child)
            self.nodes[name] = subprocess.Popen(self.net.command(cmd), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT_S
            while "Ray runtime started" not in self.log(name):
                if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(1)
            else:
                return
            if attempt == attempts - 1:
                raise RuntimeError(f"ray start ({name}) did not come up:\n{self.log(name)[-3000:]}")
            self.kill_node(name)

    def log(self, name: str) -> str:
        return (self.temp / f"{name}.log").read_text(errors="replace")

    def kill_node(self, name: str) -> None:
        """The node dies at once: SIGKILL to its ``ray start`` and everything in its process group."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def processes(self) -> list[int]:
        """Live processes carrying this cluster's token (zombies excluded)."""
        found = []
        marker = f"{TOKEN_VAR}={self.token}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if marker not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    continue
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                found.append(int(entry))
        return found

    def stop(self, grace_s: float = 30.0) -> list[int]:
        """Stop every node (SIGTERM, which ``ray start --block`` passes on), then end each process
        left with this cluster's token by its id; returns the processes still alive (none expected)."""
        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        for _ in range(20):
            left = self.processes()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)
        return self.processes()
