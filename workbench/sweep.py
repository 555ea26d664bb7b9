"""Parameter sweeps: one notebook over the Cartesian product of parameter values.

Each point is a papermill run in its own folder and its own process (so points never share a
kernel, an environment variable or a port reservation). A point's outcome is written atomically to
``point.json`` when it ends; rerunning the same sweep skips points already done and re-executes
failed or interrupted ones. ``results.json`` and ``index.html`` at the sweep root collect them all.

The same execution options spread the points of a paired trial (functions, not notebooks):
:func:`trial_executor`, which the evidence notebooks use through their ``jobs`` / ``executor`` /
``gpus_per_point`` / ``ray_address`` parameters.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import html
import itertools
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.io import check_writable, write_json_atomic, write_text_atomic
from workbench.params import EXECUTOR_CHOICES
from workbench.runner import (
    DEFAULT_CELL_TIMEOUT,
    INTERRUPTED,
    NotebookResult,
    RunInterrupted,
    check_acceleration,
    check_data,
    check_device_available,
    ensure_kernel,
    execute_notebook,
    load_spec,
    project_root,
    render_index,
    resolve_notebook,
)

EXECUTORS = EXECUTOR_CHOICES  # one list for workbench sweep, trial_executor and the notebooks' parameter
# Where kernels use TCP (not on POSIX, see runner._kernel_manager_option), kernels started in the same
# instant can race for the ports they reserve; space the starts out
KERNEL_START_SPACING_S = 0.0 if os.name == "posix" else 1.5


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def point_id(params: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe folder name for a point, e.g. ``seed=0,lr=0.05``."""
    text = ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items())
    safe = re.sub(r"[^A-Za-z0-9=,._+-]", "_", text)
    if len(safe) > 100 or safe != text:
        safe = safe[:80] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return safe or "default"


def default_output(notebook: Path, grid: Mapping[str, Sequence[Any]]) -> Path:
    digest = hashlib.sha1(json.dumps(grid, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return project_root() / "reports" / f"sweep-{notebook.stem}-{digest}"


def check_grid(notebook: Path, grid: Mapping[str, Sequence[Any]]) -> tuple[list[dict], dict[str, str]]:
    """Validate the grid against the notebook's parameters before anything runs.

    Unknown names, values of the wrong type, numbers that are not finite and an accelerator this
    machine lacks abort the whole sweep. A value of the right type that its parameter refuses (out
    of range, not among the choices) makes only the points holding it fail, with the reason; the
    others run. So does a point whose acceleration the machine cannot run (``amp="bf16"`` without CUDA)
    or whose data is absent (a ``full`` preset without CIFAR-100 / Cityscapes).
    """
    if not grid:
        raise ValueError("a sweep needs at least one -p NAME V1 [V2 ...] axis")
    spec = load_spec(notebook)
    unknown = sorted(set(grid) - set(spec.defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {notebook.stem}; "
                         f"allowed: {', '.join(sorted(spec.defaults))}")
    for name, values in grid.items():
        if not values:
            raise ValueError(f"parameter {name} has no values")
        for value in values:
            try:
                spec.spec[name].check(name, value)
            except ValueError as exc:
                if "has type" in str(exc) or "must be finite" in str(exc):
                    raise
            if name == "device":  # a machine without the accelerator refuses the whole sweep
                check_device_available(value, where=notebook.stem)
    points = expand_grid(grid)
    refused = {}
    for params in points:
        try:
            for name, value in params.items():
                spec.spec[name].check(name, value)
            effective = {**spec.defaults, **params}  # what the point's notebook will resolve
            if "device" in effective:
                check_acceleration(effective, where=notebook.stem)
            check_data(effective, spec.presets, where=notebook.stem)
        except ValueError as exc:
            refused[point_id(params)] = str(exc)
    return points, refused


def normalise_grid(notebook: Path, grid: Mapping[str, Sequence[Any]]) -> dict[str, list]:
    """Each value as its parameter's check returns it: a dataset folder becomes its absolute path,
    since every point's kernel runs in the notebook's folder. Values a check refuses (and names the
    notebook lacks) are kept as given, for :func:`check_grid` to report."""
    spec = load_spec(notebook).spec
    out = {}
    for name, values in grid.items():
        out[name] = []
        for value in values:
            try:
                out[name].append(spec[name].check(name, value) if name in spec else value)
            except ValueError:
                out[name].append(value)
    return out


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_point(jobs: int) -> int | None:
    """CPU threads each of ``jobs`` parallel kernels gets: the usable cores divided among them, so
    that parallel points do not oversubscribe the CPU (two kernels each running torch on every core
    of a 2-core machine trained ~10x slower than one after the other). ``None`` when the user set
    ``OMP_NUM_THREADS`` themselves: theirs is kept."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def _execute_point(notebook: str, point_dir: str, params: dict, timeout: int, kernel: str,
                   threads: int | None = None) -> dict:
    """Run in a worker process: one papermill execution, its outcome written to point.json. The
    kernel inherits this process's environment, so ``threads`` caps its torch/BLAS threads."""
    if threads is not None:
        for var in THREAD_ENV_VARS:
            os.environ[var] = str(threads)
    result = execute_notebook(Path(notebook), Path(point_dir), params, timeout=timeout, kernel_name=kernel,
                              stem=Path(notebook).stem)
    outcome = result.to_dict()
    write_json_atomic(Path(point_dir) / "point.json", outcome)
    return outcome


def _refused_point(point_dir: Path, notebook: Path, params: dict, reason: str) -> dict:
    outcome = NotebookResult(notebook=notebook.stem, parameters=params, status="failed",
                             error=f"refused before execution: {reason}", duration=0.0).to_dict()
    write_json_atomic(point_dir / "point.json", outcome)
    return outcome


def run_sweep(notebook: str, grid: Mapping[str, Sequence[Any]], jobs: int = 1, output: str | None = None,
              timeout: int = DEFAULT_CELL_TIMEOUT, executor: str = "local", address: str | None = None,
              gpus_per_point: float = 0.0, echo=print, progress: bool = False, cpus_per_point: int | None = None,
              gather: bool = True) -> dict:
    """Execute every point of ``grid`` (resuming a previous run of the same sweep); return the summary.

    ``executor="ray"`` runs the points as Ray tasks (see :mod:`workbench.ray_executor`), each with
    ``cpus_per_point`` CPUs (default 1; its torch/BLAS threads) and ``gpus_per_point`` GPUs; with
    ``gather`` its files come back from its node, without it every node must see ``output``.

    ``progress`` shows the points done, the elapsed time and an ETA (:mod:`workbench.progress`).
    Ctrl-C or SIGTERM records the busy points as ``"interrupted"`` in ``results.json`` and raises
    :class:`workbench.runner.RunInterrupted`; the same call resumes.
    """
    _check_sweep_options(jobs=jobs, executor=executor, timeout=timeout, gpus_per_point=gpus_per_point,
                         cpus_per_point=cpus_per_point, gather=gather)
    path = resolve_notebook(notebook)
    grid = normalise_grid(path, {k: list(v) for k, v in grid.items()})
    points, refused = check_grid(path, grid)
    root = Path(output) if output else default_output(path, grid)
    ray_backend = _connect_ray(address, root, gather) if executor == "ray" else None
    check_writable(root / "points")
    kernel = ensure_kernel()
    write_json_atomic(root / "sweep.json", {"notebook": str(path), "grid": grid})
    outcomes, todo = _plan_points(path, points, refused, root)
    threads = threads_per_point(jobs) if ray_backend is None else (cpus_per_point or 1)
    skipped = len(points) - len(todo) - len(refused)
    echo(f"[workbench] sweep {path.stem}: {len(points)} points, {skipped} already done, "
         f"{len(refused)} refused, {len(todo)} to run with {jobs} job(s)"
         + (f" of {threads} CPU thread(s)" if threads else "") + f" -> {root}")
    book = _SweepBook(path, grid, points, root, outcomes, echo)
    book.publish()
    if progress and todo:
        from workbench.progress import Progress

        book.bar = Progress(len(todo), f"sweep {path.stem}", "point")
    started = time.time()
    try:
        if ray_backend is not None:
            _run_ray(ray_backend, todo, path, timeout, kernel, jobs, threads, gpus_per_point, gather, book.finished)
        else:
            _run_local(todo, path, timeout, kernel, jobs, book.finished, threads)
    except KeyboardInterrupt:
        book.interrupted(todo, started)
        raise RunInterrupted(f"interrupted: the points that were running are recorded as '{INTERRUPTED}' in "
                             f"{root / 'results.json'}; the same command resumes the sweep") from None
    finally:
        if book.bar is not None:
            book.bar.close()
    summary = book.publish()
    echo(f"[workbench] sweep index: {root / 'index.html'}")
    return summary


def _check_sweep_options(*, jobs: int, executor: str, timeout: int, gpus_per_point: float,
                         cpus_per_point: int | None, gather: bool) -> None:
    """Refuse invalid execution options of :func:`run_sweep` before the notebook is even read."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs={jobs!r} must be an integer >= 1")
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; allowed: {EXECUTORS}")
    if gpus_per_point < 0:
        raise ValueError(f"--gpus-per-point={gpus_per_point!r} must be >= 0")
    if cpus_per_point is not None and (isinstance(cpus_per_point, bool) or not isinstance(cpus_per_point, int)
                                       or cpus_per_point < 1):
        raise ValueError(f"--cpus-per-point={cpus_per_point!r} must be an integer >= 1")
    if executor == "local" and (gpus_per_point or cpus_per_point is not None or not gather):
        raise ValueError("--gpus-per-point, --cpus-per-point and --no-gather apply to --executor ray; a local sweep "
                         "divides this machine's cores among its --jobs and runs on its default device")
    if not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")


def _connect_ray(address: str | None, root: Path, gather: bool):
    """The Ray backend at ``address`` (a local instance by default). Fails fast on a bad address, and without
    ``gather`` on a sweep folder some node does not see, before any work."""
    from workbench import ray_executor

    ray_backend = ray_executor.connect(address)
    if not gather:
        ray_backend.check_shared_folder(root)
    return ray_backend


def _plan_points(path: Path, points: list[dict], refused: dict[str, str],
                 root: Path) -> tuple[dict[str, dict], list[tuple[str, dict, Path]]]:
    """The outcomes known before anything runs (points a previous run finished, and refused points, whose
    ``point.json`` is written now) and the ``(point id, parameters, folder)`` of each point left to run."""
    outcomes: dict[str, dict] = {}
    todo = []
    for params in points:
        pid = point_id(params)
        point_dir = root / "points" / pid
        previous = _read_point(point_dir)
        if previous is not None and previous.get("status") == "done":
            outcomes[pid] = previous
            continue
        if pid in refused:
            point_dir.mkdir(parents=True, exist_ok=True)
            outcomes[pid] = _refused_point(point_dir, path, params, refused[pid])
            continue
        todo.append((pid, params, point_dir))
    return outcomes, todo


@dataclass
class _SweepBook:
    """The sweep's outcomes so far, republished as ``results.json`` and ``index.html`` whenever a point
    ends, so that a sweep stopped at any moment keeps every finished point."""

    path: Path
    grid: dict
    points: list[dict]
    root: Path
    outcomes: dict[str, dict]
    echo: Callable[..., Any]
    bar: Any = None  # a workbench.progress.Progress, or None to echo one line per point
    lock: threading.Lock = field(default_factory=threading.Lock)  # points end on executor threads

    def publish(self, interrupted: bool = False) -> dict:
        """Write ``results.json`` and ``index.html`` atomically; return the summary."""
        summary = _summary(self.path, self.grid, self.points, self.outcomes, self.root)
        if interrupted:
            summary["status"] = INTERRUPTED
        write_json_atomic(self.root / "results.json", summary)
        write_text_atomic(self.root / "index.html", render_sweep_index(summary))
        return summary

    def finished(self, pid: str, outcome: dict) -> None:
        """Record and publish a point's outcome, and report it on the progress bar or as a line."""
        with self.lock:
            self.outcomes[pid] = outcome
            self.publish()
        note = (f"{pid}: {outcome['status']} in {outcome.get('duration') or 0:.0f} s"
                + (f" -- {outcome['error'].splitlines()[0]}" if outcome.get("error") else ""))
        if self.bar is not None:
            self.bar.update(1, note=note)
        else:
            self.echo(f"[workbench]   {note}")

    def interrupted(self, todo: list, started: float) -> None:
        """After Ctrl-C or SIGTERM: publish with the points that were running recorded as interrupted."""
        with self.lock:
            _collect_interrupted(todo, self.outcomes, started)
            self.publish(interrupted=True)


def _run_ray(ray_backend, todo, path: Path, timeout: int, kernel: str, jobs: int, threads: int,
             gpus_per_point: float, gather: bool, finished) -> None:
    """Run the points as Ray tasks (:mod:`workbench.ray_executor`), at most ``jobs`` at a time."""
    from workbench import ray_executor

    job = ray_executor.PointJob(str(path), path.read_text(), timeout, kernel, threads, gather)
    ray_backend.run(todo, job, threads, gpus_per_point, jobs, _execute_point, finished)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While the sweep runs, SIGTERM (``kill``, a batch scheduler's time limit) stops it the way
    Ctrl-C does: KeyboardInterrupt here, finished points kept, the rest left to a rerun. Yields an
    event that tells the two apart: Ctrl-C in a terminal reaches every worker already, SIGTERM
    only this process."""
    terminated = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return

    def on_term(signum, frame):
        terminated.set()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def _listen_for_sigint() -> None:
    """Worker initializer. The sweep stops its workers with SIGINT, so they must hear it even where they
    inherit it ignored: a shell starts background jobs (``workbench sweep ... &``, nohup, batch scripts)
    with SIGINT ignored, and a worker that ignored it would finish its notebook after a SIGTERM."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------------------------
# trial points: the same machinery for functions

@contextlib.contextmanager
def trial_executor(jobs: int = 1, executor: str = "local", gpus_per_point: float = 0.0,
                   cpus_per_point: int | None = None, address: str | None = None):
    """Where the points of a paired trial run: what :func:`workbench.recipe.run_trial` takes as
    ``executor``, with the sweep's options and meanings. Use as a context manager::

        with trial_executor(jobs=2) as executor:
            result = run_trial(trial, run_point, executor=executor)

    ``"local"`` with ``jobs=1`` yields ``None``: the points run one after the other in this process.
    ``"local"`` with more jobs: a pool of ``jobs`` worker processes (spawned, not forked: torch's
    thread pools do not survive a fork), each limited to its share of the cores
    (:func:`threads_per_point`). ``"ray"``: each point a Ray task asking for ``cpus_per_point`` CPUs
    (default 1, also its torch threads) and ``gpus_per_point`` GPUs, fractions allowed, so several
    small runs share one GPU (Ray sets each task's ``CUDA_VISIBLE_DEVICES``), at most ``jobs`` in
    flight; on the cluster at ``address``, or a local instance.

    ``run_point`` must then be picklable (a module-level function or a ``functools.partial`` of one;
    Ray also takes closures) and pure (everything from its arguments), as the protocol requires. A
    script that uses worker processes runs its trial under ``if __name__ == "__main__":`` (spawned
    workers import the script); a notebook needs nothing.
    Options are checked before anything starts, with the sweep's messages."""
    _check_sweep_options(jobs=jobs, executor=executor, timeout=1, gpus_per_point=gpus_per_point,
                         cpus_per_point=cpus_per_point, gather=True)
    if executor == "ray":
        from workbench import ray_executor

        yield ray_executor.connect(address).function_executor(cpus_per_point or 1, gpus_per_point, jobs)
        return
    if jobs == 1:
        yield None
        return
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_limit_point_threads, initargs=(threads_per_point(jobs),))
    try:
        yield pool
    except BaseException:
        # Ctrl-C in a notebook, or a bad point: do not wait for the points still queued
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _limit_point_threads(threads: int | None) -> None:
    """A trial worker's initialiser: torch and BLAS limited to ``threads`` (``None``: the user's
    ``OMP_NUM_THREADS`` stands)."""
    if threads is None:
        return
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_local(todo, path: Path, timeout: int, kernel: str, jobs: int, finished, threads: int | None = None) -> None:
    ctx = multiprocessing.get_context("spawn")
    with (cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_listen_for_sigint) as pool,
          _terminate_as_interrupt() as terminated):
        futures = {}
        try:
            for i, (pid, params, point_dir) in enumerate(todo):
                if i and i < jobs:
                    time.sleep(KERNEL_START_SPACING_S)
                future = pool.submit(_execute_point, str(path), str(point_dir), params, timeout, kernel, threads)
                futures[future] = (pid, params)
            for future in cf.as_completed(futures):
                pid, params = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # the worker itself died: record, keep the others
                    outcome = NotebookResult(notebook=path.stem, parameters=params, status="failed",
                                             error=f"worker failed: {exc!r}").to_dict()
                finished(pid, outcome)
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            if terminated.is_set():
                # Pass SIGTERM on as Ctrl-C: each busy worker interrupts papermill, which shuts its
                # kernel down, instead of finishing its notebook after this process has gone.
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGINT)
            raise


def _collect_interrupted(todo: list, outcomes: dict[str, dict], started: float) -> None:
    """After Ctrl-C: the outcomes the stopped workers wrote in this sweep (status interrupted) join
    the summary; points that never started stay pending."""
    for pid, _, point_dir in todo:
        if pid in outcomes:
            continue
        with contextlib.suppress(OSError):
            if (point_dir / "point.json").stat().st_mtime < started:
                continue  # an earlier sweep's outcome: this one never started the point
        previous = _read_point(point_dir)
        if previous is not None and previous.get("status") == INTERRUPTED:
            outcomes[pid] = previous


def _read_point(point_dir: Path) -> dict | None:
    try:
        return json.loads((point_dir / "point.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _summary(path: Path, grid: dict, points: list[dict], outcomes: dict[str, dict], root: Path) -> dict:
    rows = []
    for params in points:
        pid = point_id(params)
        outcome = outcomes.get(pid) or {"status": "pending", "parameters": params, "metrics": {}, "error": None,
                                        "duration": None}
        row = {"point": pid, **outcome, "parameters": params}
        for key in ("output_ipynb", "output_html"):
            if row.get(key):
                row[key] = f"points/{pid}/{row[key]}"
        rows.append(row)
    status = "done" if all(r["status"] == "done" for r in rows) else (
        "failed" if all(r["status"] in ("done", "failed") for r in rows) else "incomplete")
    return {"notebook": path.stem, "grid": grid, "status": status, "points": rows}


# ----------------------------------------------------------------------------------------------
# Index


def metric_figures(summary: Mapping[str, Any]) -> list:
    """One plotly figure per (numeric metric, swept parameter): metric against the parameter,
    one trace per combination of the other parameters."""
    import plotly.graph_objects as go

    done = [p for p in summary["points"] if p["status"] == "done"]
    metric_names = sorted({k for p in done for k, v in p.get("metrics", {}).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
    figures = []
    for metric in metric_names:
        for axis in summary["grid"]:
            others = [a for a in summary["grid"] if a != axis]
            groups: dict[str, list] = {}
            for p in done:
                key = ", ".join(f"{o}={p['parameters'][o]}" for o in others) or metric
                groups.setdefault(key, []).append((p["parameters"][axis], p["metrics"].get(metric)))
            fig = go.Figure()
            for key, pairs in groups.items():
                pairs.sort(key=lambda xy: (str(type(xy[0])), xy[0]))
                fig.add_trace(go.Scatter(x=[str(x) if isinstance(x, (list, dict)) else x for x, _ in pairs],
                                         y=[y for _, y in pairs], mode="lines+markers", name=key))
            fig.update_layout(title=f"{metric} vs {axis}", xaxis_title=axis, yaxis_title=metric,
                              template="plotly_white", height=360)
            figures.append(fig)
    return figures


def render_sweep_index(summary: Mapping[str, Any]) -> str:
    import plotly.io as pio

    figures = metric_figures(summary)
    parts = []
    for i, fig in enumerate(figures):
        # plotly.js inlined once, so the page renders without a network connection
        parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0)))
    grid = html.escape(json.dumps(summary["grid"]))
    extra = f"<h2>grid</h2><pre>{grid}</pre><h2>metrics against parameters</h2>" + "\n".join(parts)
    as_run = {"run_id": f"sweep {summary['notebook']} ({summary['status']})",
              "notebooks": [{**p, "notebook": p["point"]} for p in summary["points"]]}
    return render_index(as_run, extra_html=extra)
