"""Sweeps: Cartesian product, bounded parallelism, resume, failure isolation, validation up front."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from nbhelpers import write_test_notebook

from workbench import cli
from workbench.sweep import expand_grid, point_id, run_sweep

PARAMS = 'preset = "quick"\ndevice = "cpu"\nseed = 0\nlr = 0.1\n'
BODY = ("from workbench import report\n"
        "if lr > 1.0:\n    raise ValueError(f'lr={lr} diverges')\n"
        "report.record('score', seed + lr)")


@pytest.fixture()
def notebook(tmp_path):
    return write_test_notebook(tmp_path / "toy.ipynb", BODY, PARAMS)


def test_grid_and_ids():
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert point_id({"seed": 0, "lr": 0.05}) == "seed=0,lr=0.05"
    assert "/" not in point_id({"path": "a/b"})


def test_sweep_runs_every_point_then_resumes(notebook, tmp_path):
    out = tmp_path / "sweep"
    started = time.perf_counter()
    summary = run_sweep(str(notebook), {"seed": [0, 1], "lr": [0.05, 0.1]}, jobs=2, output=str(out),
                        echo=lambda *_: None)
    first = time.perf_counter() - started
    assert summary["status"] == "done"
    assert sorted(p["metrics"]["score"] for p in summary["points"]) == [0.05, 0.1, 1.05, 1.1]
    assert all((out / p["output_html"]).exists() for p in summary["points"])
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 4 and {"parameters", "metrics", "status", "error", "duration"} <= set(
        results["points"][0])
    index = (out / "index.html").read_text()
    assert "score vs lr" in index and "score vs seed" in index

    started = time.perf_counter()
    again = run_sweep(str(notebook), {"seed": [0, 1], "lr": [0.05, 0.1]}, jobs=2, output=str(out),
                      echo=lambda *_: None)
    assert time.perf_counter() - started < first / 3, "a finished sweep does no work the second time"
    assert [p["duration"] for p in again["points"]] == [p["duration"] for p in summary["points"]]


def test_parallel_points_share_the_cores_instead_of_oversubscribing(tmp_path, monkeypatch):
    from workbench.sweep import threads_per_point

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    body = "import torch\nfrom workbench import report\nreport.record('threads', torch.get_num_threads())"
    nb = write_test_notebook(tmp_path / "threads.ipynb", body, PARAMS)
    summary = run_sweep(str(nb), {"seed": [0, 1]}, jobs=2, output=str(tmp_path / "sweep"), echo=lambda *_: None)
    expected = threads_per_point(2)
    assert expected is not None and expected >= 1
    assert [p["metrics"]["threads"] for p in summary["points"]] == [expected, expected]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_point(2) is None, "a user's own OMP_NUM_THREADS is kept"


def test_one_failing_point_keeps_the_others(notebook, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(str(notebook), {"lr": [0.1, 5.0], "seed": [0, -1]}, jobs=2, output=str(out),
                        echo=lambda *_: None)
    status = {p["point"]: p["status"] for p in summary["points"]}
    assert status == {"lr=0.1,seed=0": "done", "lr=0.1,seed=-1": "failed",
                      "lr=5.0,seed=0": "failed", "lr=5.0,seed=-1": "failed"}
    by_id = {p["point"]: p for p in summary["points"]}
    assert "seed=-1 is out of range" in by_id["lr=0.1,seed=-1"]["error"]
    assert "diverges" in by_id["lr=5.0,seed=0"]["error"]
    assert summary["status"] == "failed"


def test_bad_sweeps_refused_before_anything_runs(notebook, tmp_path, capsys):
    out = tmp_path / "never"
    for argv, message in [
        (["sweep", "no_such_nb", "-p", "seed", "0"], "not found"),
        (["sweep", str(notebook), "-p", "nosuch", "0"], "unknown parameter"),
        (["sweep", str(notebook), "-p", "lr", "fast"], "lr='fast' has type str"),
        (["sweep", str(notebook), "-p", "seed", "0", "--jobs", "0"], "--jobs=0"),
    ]:
        assert cli.main([*argv, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


# Only the Ray tests skip without the ray extra; the local sweep, resume and signal tests always run.
try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def ray_local():
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@needs_ray
def test_ray_executor_same_results_shape_isolation_and_resume(ray_local, notebook, tmp_path):
    out = tmp_path / "ray-sweep"
    grid = {"lr": [0.1, 5.0]}
    summary = run_sweep(str(notebook), grid, jobs=2, output=str(out), executor="ray", echo=lambda *_: None)
    local = run_sweep(str(notebook), grid, jobs=2, output=str(tmp_path / "local"), echo=lambda *_: None)
    assert [set(p) for p in summary["points"]] == [set(p) for p in local["points"]]
    assert {p["point"]: p["status"] for p in summary["points"]} == {"lr=0.1": "done", "lr=5.0": "failed"}
    assert summary["points"][0]["metrics"] == local["points"][0]["metrics"] == {"score": 0.1}
    again = run_sweep(str(notebook), grid, jobs=2, output=str(out), executor="ray", echo=lambda *_: None)
    assert again["points"][0]["duration"] == summary["points"][0]["duration"], "done point not rerun"


def _listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses of the TCP sockets ``pids`` listen on (from /proc)."""
    import ipaddress

    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
            address = ipaddress.ip_address(words)
            found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


@needs_ray
def test_local_ray_listens_on_loopback_and_points_get_their_cpus_as_threads(ray_local, tmp_path):
    """A Ray the sweep starts itself binds every listening socket of every process of it to
    127.0.0.1; a point's kernel runs torch and BLAS on the CPUs its task asked for."""
    body = ("import os\nimport torch\nfrom workbench import report\n"
            "report.record('torch_threads', torch.get_num_threads())\n"
            "report.record('mkl_threads', int(os.environ.get('MKL_NUM_THREADS', 0)))")
    nb = write_test_notebook(tmp_path / "threads.ipynb", body, PARAMS)
    cpus = min(2, os.cpu_count() or 1)
    summary = run_sweep(str(nb), {"seed": [0]}, output=str(tmp_path / "sweep"), executor="ray",
                        cpus_per_point=cpus, echo=lambda *_: None)
    assert summary["points"][0]["metrics"] == {"torch_threads": cpus, "mkl_threads": cpus}
    ray_pids = _descendants(os.getpid())
    addresses = _listening_addresses(ray_pids)
    assert addresses, "the local Ray's processes listen somewhere"
    assert addresses <= {"127.0.0.1"}, f"a local Ray listens on {addresses}"


def test_ray_only_options_are_refused_for_local_sweeps(notebook, tmp_path, capsys):
    out = tmp_path / "never"
    for flags, message in [(["--gpus-per-point", "1"], "apply to --executor ray"),
                           (["--no-gather"], "apply to --executor ray"),
                           (["--cpus-per-point", "0", "--executor", "ray"], "--cpus-per-point=0 must be")]:
        assert cli.main(["sweep", str(notebook), "-p", "seed", "0", *flags, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


@needs_ray
def test_unreachable_ray_address_is_refused_before_work(notebook, tmp_path, capsys):
    out = tmp_path / "never"
    code = cli.main(["sweep", str(notebook), "-p", "seed", "0", "--executor", "ray", "--address", "127.0.0.1:1",
                     "--output", str(out)])
    assert code == 2
    assert "no Ray cluster answers" in capsys.readouterr().err
    assert not out.exists()


SLOW_BODY = ("import time\nfrom workbench import report\n"
             "if seed == 1:\n    time.sleep(300)\n"
             "report.record('score', seed + lr)")


def _start_slow_sweep(tmp_path, **popen_options):
    """A 2-point sweep in its own process session whose second point sleeps; returns once the first
    point is done and the second is in its sleeping cell."""
    nb = write_test_notebook(tmp_path / "slow.ipynb", SLOW_BODY, PARAMS)
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "sweep", str(nb), "-p", "seed", "0", "1",
                             "--jobs", "1", "--output", str(out)], start_new_session=True, **popen_options)
    done = out / "points" / "seed=0" / "point.json"
    deadline = time.monotonic() + 120
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert done.exists(), "the first point should finish before the interruption"
    time.sleep(5)
    return proc, nb, out


def _check_interrupted_then_resumed(nb, out):
    first = json.loads((out / "points" / "seed=0" / "point.json").read_text())
    assert first["status"] == "done"
    interrupted = out / "points" / "seed=1" / "point.json"
    assert not interrupted.exists() or json.loads(interrupted.read_text())["status"] != "done"
    # the rerun skips the finished point and re-executes the interrupted one
    write_test_notebook(nb, SLOW_BODY.replace("time.sleep(300)", "pass"), PARAMS)
    summary = run_sweep(str(nb), {"seed": [0, 1]}, jobs=1, output=str(out), echo=lambda *_: None)
    assert summary["status"] == "done"
    assert summary["points"][0]["duration"] == first["duration"]
    assert summary["points"][1]["metrics"] == {"score": 1.1}


def test_ctrl_c_keeps_finished_points_and_resumes(tmp_path):
    proc, nb, out = _start_slow_sweep(
        tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        # A test suite started in the background (`make test &`, CI runners) inherits an ignored
        # SIGINT, and Python then never raises KeyboardInterrupt: restore what a terminal's Ctrl-C reaches.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)  # the interrupted kernel and worker shut down first; slow on a loaded machine
    assert proc.returncode != 0
    _check_interrupted_then_resumed(nb, out)


def test_sigterm_stops_the_sweep_and_its_kernel_and_resumes(tmp_path):
    """SIGTERM to the sweep process alone (``kill``, a scheduler's time limit) ends the busy worker's
    kernel too: nothing of the sweep's process session keeps running. The sweep starts with SIGINT
    ignored, as a shell starts a background job (``&``, nohup, batch scripts): its workers, which the
    sweep stops with SIGINT, used to inherit that and finish their notebooks."""
    proc, nb, out = _start_slow_sweep(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def processes() -> list[tuple[int, int, int]]:
        ps = subprocess.run(["ps", "-e", "-o", "sid=,pid=,ppid="], capture_output=True, text=True).stdout
        return [tuple(int(f) for f in line.split()) for line in ps.splitlines()]

    def sweep_processes() -> set[int]:
        # the sweep's session (sweep, resource tracker, worker) and the children of its processes:
        # jupyter_client starts each kernel in a session of its own
        table = processes()
        session = {pid for sid, pid, _ in table if sid == proc.pid}
        return session | {pid for _, pid, ppid in table if ppid in session}

    started = sweep_processes()
    assert len(started) >= 4, "sweep, resource tracker, worker and kernel should all be running"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    deadline = time.monotonic() + 30
    while started & {pid for _, pid, _ in processes()} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not started & {pid for _, pid, _ in processes()}, "no worker or kernel outlives the sweep"
    _check_interrupted_then_resumed(nb, out)


# ----------------------------------------------------------------------------------------------
# A real two-node Ray cluster on this machine

CLUSTER_BODY = '''import os, time
from workbench import report
node, hold = os.environ.get("TEST_NODE", "head"), os.environ["TEST_HOLD_DIR"]
if node == "worker":
    if any(name.startswith("done-") for name in os.listdir(hold)):
        open(os.path.join(hold, f"held-{seed}"), "w").close()
        time.sleep(900)  # in progress until the node is stopped
    open(os.path.join(hold, f"done-{seed}"), "w").close()
else:  # the head waits (a while) for the worker to finish one point, so that the worker takes a second
    deadline = time.monotonic() + 120
    while not any(n.startswith("done-") for n in os.listdir(hold)) and time.monotonic() < deadline:
        time.sleep(0.5)
report.record("on_worker", int(node == "worker"))
report.record("score", seed + lr)'''


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head and worker (1 CPU each) started with ``ray start`` in a network namespace of the test's
    own (skipped where none can be made); the worker's view of the test's folders is an empty disk
    of its own where mount namespaces are available. Every process the cluster started is ended at
    teardown, which checks that none is left, in the namespace or elsewhere."""
    from isolated_network import isolated_network_or_skip
    from ray_cluster import LocalRayCluster, can_hide_folders

    net = isolated_network_or_skip()
    files = tmp_path_factory.mktemp("cluster")
    hold = Path(tempfile.mkdtemp(prefix="wbhold-", dir="/tmp"))  # seen by both nodes
    cluster = LocalRayCluster(net)
    cluster.files, cluster.hold, cluster.isolated = files, hold, can_hide_folders()
    cluster.env["TEST_HOLD_DIR"] = str(hold)  # the kernels inherit their node's environment
    try:
        cluster.start_head()
        cluster.start_worker({"TEST_NODE": "worker"}, hide=files if cluster.isolated else None)
        yield cluster
    finally:
        try:
            left = cluster.stop()
            shutil.rmtree(hold, ignore_errors=True)
        finally:
            left_in_network = net.close()
        assert not left, f"processes of the test cluster still running: {left}"
        assert not left_in_network, f"processes still running in the test's network namespace: {left_in_network}"


def _cluster_sweep(cluster, nb, out, *flags, wait=True):
    cmd = [sys.executable, "-m", "workbench.cli", "sweep", str(nb), "-p", "seed", "0", "1", "2", "3",
           "--executor", "ray", "--address", cluster.address, "--jobs", "4", "--output", str(out), *flags]
    proc = subprocess.Popen(cluster.net.command(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cluster.env)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=600)
    return stdout, stderr, proc.returncode


@needs_ray
def test_ray_cluster_refuses_no_gather_when_a_node_has_its_own_disk(ray_cluster):
    if not ray_cluster.isolated:
        pytest.skip("needs a mount namespace (root and unshare) to give the worker node a disk of its own")
    nb = write_test_notebook(ray_cluster.files / "cluster.ipynb", CLUSTER_BODY, PARAMS)
    out = ray_cluster.files / "no-gather"
    _, err, code = _cluster_sweep(ray_cluster, nb, out, "--no-gather")
    assert code == 2, err[-3000:]
    assert "do not see it" in err and "worker" in err, err[-3000:]
    assert not out.exists()


@needs_ray
def test_ray_cluster_sweep_survives_a_dead_node_and_resumes(ray_cluster):
    """4 points over a head and a worker of 1 CPU each: the worker finishes one point and is killed
    while running its second, which Ray then runs again on the head. Every point's files are in the
    driver's sweep folder (gathered: the worker sees its own disk where that can be arranged), and
    the same command run again runs nothing."""
    from isolated_network import host_listening_ports

    nb = write_test_notebook(ray_cluster.files / "cluster.ipynb", CLUSTER_BODY, PARAMS)
    out = ray_cluster.files / "sweep"
    proc = _cluster_sweep(ray_cluster, nb, out, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not any(p.name.startswith("held-") for p in ray_cluster.hold.iterdir()):
            assert proc.poll() is None, "".join(proc.communicate())[-3000:]
            assert time.monotonic() < deadline, "the worker node never took a second point"
            time.sleep(0.5)
        held = next(p.name for p in ray_cluster.hold.iterdir() if p.name.startswith("held-"))
        # both nodes, the driver and the points' workers are up
        listening, outside = ray_cluster.net.listening(), ray_cluster.net.listening_outside()
        head_port_on_host = ray_cluster.port in host_listening_ports()
        ray_cluster.kill_node("worker")
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (stdout + stderr)[-3000:]
    ray_cluster.net.check_isolated(listening, outside)
    assert ray_cluster.port in {port for _, port in listening}, f"the head's port is not among {listening}"
    assert not head_port_on_host, f"the head's port {ray_cluster.port} listens on this machine's network"
    summary = json.loads((out / "results.json").read_text())
    assert summary["status"] == "done"
    by_seed = {p["parameters"]["seed"]: p for p in summary["points"]}
    assert sorted(by_seed) == [0, 1, 2, 3]
    on_worker = {seed for seed, p in by_seed.items() if p["metrics"]["on_worker"]}
    assert len(on_worker) == 1, f"one point finished on the worker: {on_worker}"
    rerun = int(held.split("-")[1])
    assert rerun not in on_worker, "the point of the dead node ran again on the head"
    for p in summary["points"]:
        assert (out / p["output_html"]).exists() and (out / p["output_ipynb"]).exists()
        assert p["metrics"]["score"] == p["parameters"]["seed"] + 0.1
    stdout, stderr, code = _cluster_sweep(ray_cluster, nb, out)
    assert code == 0, stderr[-3000:]
    assert "4 already done" in stdout and "0 to run" in stdout, stdout
    assert [p["duration"] for p in json.loads((out / "results.json").read_text())["points"]] == \
        [p["duration"] for p in summary["points"]]
