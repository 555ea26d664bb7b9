"""Sweep points as Ray tasks: a local Ray instance by default, an existing cluster by address.

Only imported when ``workbench sweep --executor ray`` asks for it, so Ray stays an optional extra
(``pip install 'workbench[ray]'``). Scheduling, placement and GPU assignment are Ray's: each point is
a task asking for ``--cpus-per-point`` CPUs (its kernel's torch/BLAS threads are capped to them) and
``--gpus-per-point`` GPUs (Ray sets the task's ``CUDA_VISIBLE_DEVICES``, which the kernel inherits),
at most ``--jobs`` in flight.

On a cluster the nodes need the workbench installed in the Python that runs the Ray workers. By
default each point runs in a scratch folder on its node (from the notebook at the same path when the
node sees it, else from a copy sent with the task) and its files come back to the driver's sweep
folder, so the nodes need not share a filesystem. With ``gather=False`` (``--no-gather``) points
write straight into the sweep folder, which every node must then see at the same path: that is
checked on every node before any point runs. A point whose worker or node dies is retried by Ray
on another node (``max_retries``); a point's result is recorded only once it has finished, so a
rerun of the sweep skips every finished point and runs the others again.

A local instance started here listens on 127.0.0.1 only and has no dashboard.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.io import atomic_open, write_json_atomic
from workbench.runner import NotebookResult

RETRIES = 3  # re-runs of a point whose worker process or node died (not of a notebook that failed)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--executor ray needs Ray: pip install 'workbench[ray]' (or 'ray[default]')") from exc
    return ray


@dataclass
class PointJob:
    """What every point's task needs besides its parameters and folder."""

    notebook: str
    source: str  # the notebook itself, for nodes that do not see ``notebook``
    timeout: int
    kernel: str
    threads: int
    gather: bool


def run_point(job: PointJob, point_dir: str, params: dict, execute: Callable[..., dict]) -> dict:
    """A Ray task: one point on whichever node Ray chose. Returns the outcome and, when gathering,
    the point's files (relative path -> bytes) for the driver to write into its sweep folder."""
    from workbench.runner import ensure_kernel

    ensure_kernel(job.kernel)  # each node's environment needs the kernel spec once
    if not job.gather:
        return {"outcome": execute(job.notebook, point_dir, params, job.timeout, job.kernel, job.threads),
                "files": None}
    with tempfile.TemporaryDirectory(prefix="workbench-point-") as scratch:
        notebook = Path(job.notebook)
        if not notebook.exists():
            notebook = Path(scratch) / "notebook" / notebook.name
            notebook.parent.mkdir()
            notebook.write_text(job.source)
        out = Path(scratch) / "point"
        outcome = execute(str(notebook), str(out), params, job.timeout, job.kernel, job.threads)
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                 if p.is_file() and p.name != "point.json"}
    return {"outcome": outcome, "files": files}


def store_point(point_dir: Path, result: dict) -> dict:
    """Write a gathered point's files, then its ``point.json`` (last: it marks the point finished)."""
    outcome = result["outcome"]
    if result["files"] is not None:
        for rel, data in result["files"].items():
            with atomic_open(point_dir / rel, "wb") as handle:
                handle.write(data)
        write_json_atomic(point_dir / "point.json", outcome)
    return outcome


class RayBackend:
    def __init__(self, ray_module) -> None:
        self.ray = ray_module

    def run(self, todo: list, job: PointJob, cpus_per_point: int, gpus_per_point: float, jobs: int,
            execute: Callable[..., dict], finished: Callable[[str, dict], None], retries: int = RETRIES) -> None:
        """Run every ``(pid, params, point_dir)`` of ``todo``, at most ``jobs`` at a time, calling
        ``finished(pid, outcome)`` as each ends (a point whose task failed for good is a failed point)."""
        ray = self.ray
        task = ray.remote(num_cpus=cpus_per_point, num_gpus=gpus_per_point, max_retries=retries)(run_point)
        job_ref = ray.put(job)
        pending: dict[Any, tuple[str, dict, Path]] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                pid, params, point_dir = queue.pop(0)
                pending[task.remote(job_ref, str(point_dir), params, execute)] = (pid, params, point_dir)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pid, params, point_dir = pending.pop(ref)
                try:
                    outcome = store_point(point_dir, ray.get(ref))
                except Exception as exc:  # a task that died is one failed point, not a failed sweep
                    outcome = NotebookResult(notebook=Path(job.notebook).stem, parameters=params, status="failed",
                                             error=f"ray task failed: {exc!r}").to_dict()
                finished(pid, outcome)

    def function_executor(self, cpus_per_point: int, gpus_per_point: float, jobs: int = 1) -> FunctionTasks:
        """``submit(fn, *args) -> Future`` over Ray tasks: a trial's points
        (:func:`workbench.sweep.trial_executor`)."""
        return FunctionTasks(self.ray, cpus_per_point, gpus_per_point, jobs)

    def check_shared_folder(self, root: Path, timeout_s: float = 120.0) -> None:
        """Refuse when a node with CPUs does not see ``root`` (the sweep folder) at the same path."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        created = not root.exists()
        marker = root / f".ray-nodes-{uuid.uuid4().hex[:12]}"
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(marker.name)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        try:
            seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                            .remote(str(marker)) for n in nodes], timeout=timeout_s)
        finally:
            marker.unlink(missing_ok=True)
        blind = [f"{n.get('NodeName') or n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen)
                 if not ok]
        if blind:
            if created:
                with contextlib.suppress(OSError):
                    root.rmdir()
            raise ValueError(f"--no-gather needs the sweep folder {root} on a filesystem every Ray node sees at the "
                             f"same path; node(s) {', '.join(blind)} do not see it. Put --output on shared storage, "
                             "or drop --no-gather (each point's files then come back to this machine)")


class FunctionTasks:
    """``concurrent.futures``-style ``submit`` over Ray: each call one task asking for
    ``cpus_per_point`` CPUs (its torch threads) and ``gpus_per_point`` GPUs, retried like a sweep's
    point when its worker or node dies, at most ``jobs`` in flight (``submit`` waits for a slot);
    the returned future is Ray's ``ObjectRef.future()``."""

    def __init__(self, ray_module, cpus_per_point: int, gpus_per_point: float, jobs: int = 1,
                 retries: int = RETRIES) -> None:
        self.threads = cpus_per_point
        self.slots = threading.BoundedSemaphore(jobs)
        self.task = ray_module.remote(num_cpus=cpus_per_point, num_gpus=gpus_per_point,
                                      max_retries=retries)(_call_with_threads)

    def submit(self, fn: Callable[..., Any], *args: Any):
        self.slots.acquire()
        future = self.task.remote(self.threads, fn, *args).future()
        future.add_done_callback(lambda _: self.slots.release())
        return future


def _call_with_threads(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """A Ray task: ``fn(*args)`` with torch limited to the task's CPUs."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


def _sees(path: str) -> bool:
    target = Path(path)
    return target.exists() and target.read_text() == target.name


def connect(address: str | None = None, connect_timeout_s: float = 20.0) -> RayBackend:
    """Connect to the Ray cluster at ``address`` (``host:port`` or ``ray://host:port``) or start a
    local instance bound to 127.0.0.1. An address that does not answer is an error raised before any
    point runs."""
    ray = _import_ray()
    if address:
        _check_reachable(address, connect_timeout_s)
    if ray.is_initialized():
        return RayBackend(ray)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        with _loopback_only():
            ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(1, os.cpu_count() or 1),
                     configure_logging=False, _node_ip_address="127.0.0.1")
    return RayBackend(ray)


@contextlib.contextmanager
def _loopback_only():
    """Ray replaces 127.0.0.1 by this machine's routable address (a cluster's other nodes must reach
    it) and then listens on every interface, except where multi-node clusters are switched off, as on
    macOS and Windows by default: then the node address stays 127.0.0.1 and every Ray process of the
    instance listens on loopback only. The switch is read by this process (from ``ray_constants``)
    and by the processes ``ray.init`` starts (from the environment)."""
    from ray._private import ray_constants

    previous_env, previous_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = previous_env


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
