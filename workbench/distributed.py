"""Data-parallel training across processes and nodes: the torchrun launch and the process group.

``workbench train --nproc-per-node N`` starts ``N`` ranks on this node with ``torch.distributed.run``
(torchrun) in its standalone mode. Across nodes the same command runs on every node with
``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint HOST:PORT``: torchrun's c10d rendezvous, hosted by
node 0 on ``HOST:PORT`` (node 0 must be ``HOST``), gathers the nodes and assigns the global ranks.
The ranks talk over gloo on CPU and NCCL on GPU.

Rank 0 alone writes checkpoints and probe logs, and every rank resumes from rank 0's checkpoint,
so ``--output`` must be one folder every node sees at the same path (a shared filesystem). Each
rank checks this before training: it leaves a marker file in the output folder, and rank 0 must
see every rank's marker, else the run stops with an error naming the ranks and hosts it cannot see.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

SHARED_CHECK_WAIT_S = 10.0  # how long rank 0 waits for the other ranks' markers (NFS attribute caching)


@dataclass
class DistInfo:
    """This process's place in the run (from torchrun's environment; one process: rank 0 of 1)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    return DistInfo(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def available_devices(device: str) -> int:
    """How many processes a node can give one device each: GPUs for CUDA, cores for CPU."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def setup_distributed(device: str, info: DistInfo) -> torch.device:
    """This rank's device, and the process group (NCCL on CUDA, gloo on CPU) when there are ranks."""
    from workbench.device import resolve_device

    base = resolve_device(device)
    if not info.enabled:
        return base
    import torch.distributed as dist

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if base.type == "cuda":
        if local_world > torch.cuda.device_count():
            raise ValueError(f"nproc_per_node={local_world} exceeds the {torch.cuda.device_count()} CUDA "
                             "device(s) of this node")
        chosen = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return chosen


def teardown_distributed(info: DistInfo) -> None:
    """End the process group :func:`setup_distributed` started (nothing to do in one process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The output folder every node must see


def check_shared_output(output: str | os.PathLike, info: DistInfo, wait_s: float = SHARED_CHECK_WAIT_S) -> None:
    """Refuse to train when some rank's ``output`` is not the folder rank 0 writes to.

    Every rank creates ``output/.ranks-<run>/rank-<r>``; rank 0 waits up to ``wait_s`` for all of
    them, the verdict goes to every rank, and all ranks raise the same ``ValueError`` when a marker
    is missing, so no rank trains alone. The markers are removed either way (and an output folder
    the check created, when it refuses). Needs the process group."""
    if not info.enabled:
        return
    import torch.distributed as dist

    run = [uuid.uuid4().hex[:12] if info.is_main else None]
    dist.broadcast_object_list(run, src=0)
    folder = Path(output) / f".ranks-{run[0]}"
    marker = folder / f"rank-{info.rank}"
    created = not Path(output).exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(socket.gethostname())
        problem = None
    except OSError as exc:
        problem = f"cannot write there ({exc.strerror})"
    hosts: list = [None] * info.world_size
    dist.all_gather_object(hosts, (socket.gethostname(), problem))
    verdict = [_missing_ranks(folder, hosts, wait_s) if info.is_main else None]
    dist.broadcast_object_list(verdict, src=0)
    marker.unlink(missing_ok=True)
    dist.barrier()
    with contextlib.suppress(OSError):  # every rank: on unshared disks each has a folder of its own
        folder.rmdir()
        if verdict[0] and created:
            Path(output).rmdir()
    if verdict[0]:
        raise ValueError(f"output={str(output)!r} is not one folder shared by every node: rank 0 "
                         f"({hosts[0][0]}) cannot see the files written there by {verdict[0]}; put --output on "
                         "a filesystem every node mounts at the same path")


def _missing_ranks(folder: Path, hosts: list, wait_s: float) -> str:
    """The ranks (with their hosts and reasons) whose marker rank 0 does not see within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = [r for r, (_, problem) in enumerate(hosts) if problem or not (folder / f"rank-{r}").exists()]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return ", ".join(f"rank {r} on {hosts[r][0]}" + (f": {hosts[r][1]}" if hosts[r][1] else "") for r in missing)


# ----------------------------------------------------------------------------------------------
# The torchrun launch


@dataclass
class Launch:
    """How ``workbench train`` starts torchrun on this node."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        """torchrun's own arguments: standalone on one node, else the c10d rendezvous at the
        endpoint, its store hosted by node 0 (``is_host``; torchrun itself assigns the global ranks)."""
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={self.nproc_per_node}"]
        return [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}", "--rdzv-id=workbench-train",
                f"--rdzv-conf=is_host={'true' if self.node_rank == 0 else 'false'}"]


LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint")


def add_multinode_arguments(parser: argparse.ArgumentParser) -> None:
    """``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint`` (``--nproc-per-node`` is the trainer's own)."""
    parser.add_argument("--nnodes", type=int, default=None, metavar="N",
                        help="number of nodes; run the same command on each, with its own --node-rank "
                             "(default: 1)")
    parser.add_argument("--node-rank", type=int, default=None, metavar="RANK",
                        help="this node's index, 0..N-1; node 0 hosts the rendezvous at --rdzv-endpoint (default: 0)")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="torchrun's c10d rendezvous on node 0 (HOST is node 0's address), the same on every "
                             "node; required with --nnodes > 1 (default: none)")


def launch_from_args(args: argparse.Namespace) -> Launch | None:
    """The launch the flags ask for (checked), or ``None`` to train in this process."""
    nproc, nnodes = args.nproc_per_node, args.nnodes
    node_rank, endpoint = args.node_rank, args.rdzv_endpoint
    if nproc is None and nnodes is None and node_rank is None and endpoint is None:
        return None
    nnodes = 1 if nnodes is None else nnodes
    if nnodes < 1:
        raise ValueError(f"--nnodes={nnodes} is not valid; allowed: an integer >= 1")
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc-per-node={nproc} is not valid; allowed: an integer >= 1")
    if nnodes == 1 and (node_rank or endpoint):
        raise ValueError("--node-rank and --rdzv-endpoint need --nnodes > 1 (one node runs standalone)")
    node_rank = 0 if node_rank is None else node_rank
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank={node_rank} is not valid; allowed: 0..{nnodes - 1} (--nnodes={nnodes})")
    if nnodes > 1:
        check_endpoint(endpoint)
    return Launch(1 if nproc is None else nproc, nnodes, node_rank, endpoint)


def check_endpoint(endpoint: str | None) -> None:
    if not endpoint:
        raise ValueError("--rdzv-endpoint is required with --nnodes > 1; allowed: HOST:PORT of node 0, the same "
                         "on every node (e.g. 10.0.0.1:29400)")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint={endpoint!r} is not valid; allowed: HOST:PORT of node 0, the same on "
                         "every node (e.g. 10.0.0.1:29400)")


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` without the launcher's flags: the workers get the config flags only."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def run_torchrun(launch: Launch, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` under torchrun on this node; the exit code of the workers.

    torchrun runs in this process (``torch.distributed.run``, the module behind the ``torchrun``
    command), so that a worker's own error message (a refused config, an output folder the nodes do
    not share) ends the launch with that message and an exit code instead of torchrun's traceback."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    args = torchrun.parse_args([*launch.torchrun_args(), "-m", module, *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"error: torchrun worker(s) failed with exit code(s) {codes}; their messages are above",
              file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    except RendezvousConnectionError:
        if launch.nnodes == 1:
            raise
        # Node 0 hosts the store and leaves as soon as its own workers stop (a refused config,
        # an unshared --output), often before this node's agent has seen its workers stop too.
        print(f"error: the rendezvous store at {launch.rdzv_endpoint} (node 0) went away while this node's "
              "workers were running: node 0 stopped; its output says why", file=sys.stderr)
        return 1
    return 0
