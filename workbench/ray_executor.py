"""Sweep points as Ray tasks: a local Ray instance by default, an existing cluster by address.

Only imported when ``workbench sweep --executor ray`` asks for it, so Ray stays an optional extra
(``pip install 'workbench[ray]'``). Scheduling, placement and GPU assignment are Ray's: each point is
a task asking for one CPU and ``--gpus-per-point`` GPUs, at most ``--jobs`` in flight. On a
multi-node cluster the sweep folder must be on a filesystem every node sees, and the nodes need
the workbench installed in the Python that runs the Ray workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.runner import NotebookResult


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--executor ray needs Ray: pip install 'workbench[ray]' (or 'ray[default]')") from exc
    return ray


class RayBackend:
    def __init__(self, ray_module) -> None:
        self.ray = ray_module

    def run(self, todo: list, path: Path, timeout: int, kernel: str, gpus_per_point: float, jobs: int,
            execute: Callable[..., dict], finished: Callable[[str, dict], None]) -> None:
        ray = self.ray
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_point, max_retries=0)(execute)
        pending: dict[Any, tuple[str, dict]] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                pid, params, point_dir = queue.pop(0)
                ref = task.remote(str(path), str(point_dir), params, timeout, kernel)
                pending[ref] = (pid, params)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pid, params = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # a task that died is one failed point, not a failed sweep
                    outcome = NotebookResult(notebook=path.stem, parameters=params, status="failed",
                                             error=f"ray task failed: {exc!r}").to_dict()
                finished(pid, outcome)


def connect(address: str | None = None, connect_timeout_s: float = 20.0) -> RayBackend:
    """Connect to the Ray cluster at ``address`` (``host:port`` or ``ray://host:port``) or start a
    local instance. An address that does not answer is an error raised before any point runs."""
    ray = _import_ray()
    if address:
        _check_reachable(address, connect_timeout_s)
    if ray.is_initialized():
        return RayBackend(ray)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False,
                 num_cpus=max(1, os.cpu_count() or 1), configure_logging=False)
    return RayBackend(ray)


def _check_reachable(address: str, timeout: float) -> None:
    """Ray's own connect retries for minutes on a dead address; a TCP probe answers in seconds."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return
        raise ValueError(f"--address={address!r} is not valid; expected host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(f"--address={address!r}: no Ray cluster answers there ({exc})") from exc
