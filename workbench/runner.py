"""Batch execution of the notebooks with papermill: parameters validated up front, one run folder per
run with executed notebooks, standalone HTML, ``results.json`` and an ``index.html``."""

from __future__ import annotations

import datetime as _dt
import functools
import html
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from workbench import report
from workbench.io import check_writable, write_json_atomic, write_text_atomic
from workbench.params import COMMON, Param, literal_assignments, validate

KERNEL_NAME = "workbench"
DEFAULT_CELL_TIMEOUT = 3600


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (the package's parent), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "notebooks").is_dir() else Path.cwd()


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def list_notebooks() -> list[Path]:
    return sorted(p for p in notebooks_dir().glob("*.ipynb") if not p.name.startswith("."))


def resolve_notebook(name: str | os.PathLike) -> Path:
    """A notebook by path, file name or stem (``01_batch_noise``); unknown names list the choices."""
    path = Path(name)
    candidates = [path, notebooks_dir() / path.name, notebooks_dir() / f"{path.name}.ipynb"]
    for candidate in candidates:
        if candidate.suffix == ".ipynb" and candidate.is_file():
            return candidate.resolve()
    available = ", ".join(p.stem for p in list_notebooks()) or "(none)"
    raise ValueError(f"notebook {str(name)!r} not found; available: {available}")


# ----------------------------------------------------------------------------------------------
# Parameters


@dataclass
class NotebookSpec:
    path: Path
    defaults: dict
    spec: dict[str, Param]
    presets: dict = field(default_factory=dict)  # the experiment module's PRESETS: preset -> its values

    @property
    def name(self) -> str:
        return self.path.stem


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    raise ValueError("notebook has no code cell tagged 'parameters'")


def load_spec(path: Path) -> NotebookSpec:
    """The notebook's default parameters and the declared spec they are checked against.

    The spec comes from the experiment module named in the notebook metadata
    (``metadata.workbench.experiment``), which declares ``PARAMETERS``; the common ones (preset,
    device, seed) are always included.
    """
    nb = nbformat.read(path, as_version=4)
    try:
        defaults = literal_assignments(parameters_cell(nb).source)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc
    spec: dict[str, Param] = dict(COMMON)
    presets: dict = {}
    module_name = nb.metadata.get("workbench", {}).get("experiment")
    if module_name:
        module = importlib.import_module(module_name)
        spec.update(getattr(module, "PARAMETERS", {}))
        presets = getattr(module, "PRESETS", {})
    for name, value in defaults.items():
        # a user's own notebook declares nothing: its defaults' types are the spec
        if name not in spec:
            spec[name] = Param(type(value) if value is not None else object, nullable=True)
    return NotebookSpec(path=path, defaults=defaults, spec={k: spec[k] for k in defaults}, presets=presets)


def plan_parameters(specs: Sequence[NotebookSpec], overrides: Mapping[str, Any]) -> dict[str, dict]:
    """Per notebook, the values to inject: each override goes to the notebooks that declare it.

    An override no selected notebook declares, or a value a notebook's spec refuses, is an error
    raised before anything runs.
    """
    known = set().union(*(s.defaults for s in specs)) if specs else set()
    unknown = sorted(set(overrides) - known)
    if unknown:
        names = ", ".join(s.name for s in specs)
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {names}; "
                         f"allowed: {', '.join(sorted(known))}")
    plan = {}
    for s in specs:
        mine = {k: v for k, v in overrides.items() if k in s.defaults}
        effective = validate({**s.defaults, **mine}, s.spec, where=s.name)
        if "device" in effective:
            check_device_available(effective["device"], where=s.name)
            check_acceleration(effective, where=s.name)
        check_data(effective, s.presets, where=s.name)
        plan[s.name] = validate(mine, s.spec, where=s.name)
    return plan


def check_acceleration(values: Mapping[str, Any], where: str = "notebook") -> None:
    """``amp`` / ``channels_last`` / ``compile`` the notebook's device cannot run (bf16 autocast on a
    machine without CUDA) are refused here, before a kernel starts, with the notebook's own message."""
    if not any(k in values for k in ("amp", "channels_last", "compile")):
        return
    from workbench.device import resolve_acceleration

    try:
        resolve_acceleration(values["device"], values.get("amp", "auto"), values.get("channels_last"),
                             values.get("compile", False))
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def check_data(values: Mapping[str, Any], presets: Mapping[str, Any], where: str = "notebook") -> None:
    """The files of the dataset the notebook will read (``dataset``, or its preset's when ``None``) must
    be on disk: CIFAR and Cityscapes are checked without loading, so a ``full`` preset without its data
    is refused before a kernel starts, with the missing path and the expected layout."""
    if "dataset" not in values:
        return
    dataset = values["dataset"]
    preset = values.get("preset", "quick")
    if dataset is None:
        dataset = presets.get(preset, {}).get("dataset")
    if dataset is None:
        return
    from workbench.experiments.dataset_choice import check_preset_data

    try:
        check_preset_data(dataset, preset)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def check_device_available(device: Any, where: str = "notebook") -> None:
    """An accelerator asked for by name must be on this machine: refused here, before a kernel
    starts, rather than inside the notebook after it."""
    text = str(device).strip().lower()
    if not (text.startswith("cuda") or text == "mps"):
        return  # auto and cpu always resolve; the import of torch is not needed for them
    from workbench.device import resolve_device

    try:
        resolve_device(text)
    except RuntimeError as exc:
        raise ValueError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Kernel


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure a kernel spec ``name`` exists in this environment and starts this Python.

    It is installed into ``sys.prefix`` (the virtual environment), never the user's home.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return name
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=name, display_name="Python (workbench)", prefix=sys.prefix)
    return name


# ----------------------------------------------------------------------------------------------
# Execution


@dataclass
class NotebookResult:
    notebook: str
    parameters: dict
    status: str = "pending"
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    duration: float | None = None
    output_ipynb: str | None = None
    output_html: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# A Unix socket's address holds at most 107 bytes (sizeof(sockaddr_un.sun_path) on Linux, less on
# macOS); a kernel's socket is "<dir>/kernel-<16 hex>-ipc-<n>" with n up to 5 digits.
_SOCKET_PATH_MAX = 103
_SOCKET_NAME_LEN = len("/kernel-0123456789abcdef-ipc-12345")


def _fits(directory: str) -> bool:
    return len(os.fsencode(directory)) + _SOCKET_NAME_LEN <= _SOCKET_PATH_MAX


@functools.lru_cache(maxsize=1)
def _short_socket_dir() -> str:
    """A private directory (mode 0700) in the temporary directory, one per process, removed at exit."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="workbench-kernels-")
    atexit.register(shutil.rmtree, path, True)
    return path


def kernel_socket_dir() -> str | None:
    """Where kernels bind their Unix sockets: Jupyter's runtime directory, created if missing (a
    machine that never ran Jupyter has none, and the kernel dies binding there), else, when its
    path is too long for a socket address, a private one in the temporary directory; None when
    neither fits (kernels then use TCP)."""
    from jupyter_core.paths import jupyter_runtime_dir
    from jupyter_core.utils import ensure_dir_exists

    runtime = jupyter_runtime_dir()
    if _fits(runtime):
        ensure_dir_exists(runtime, mode=0o700)
        return runtime
    import tempfile

    return _short_socket_dir() if _fits(os.path.join(tempfile.gettempdir(), "workbench-kernels-xxxxxxxx")) else None


@functools.lru_cache(maxsize=1)
def _kernel_manager_option() -> dict:
    """Kernels talk to papermill over Unix sockets where the OS has them: nothing listens on a TCP
    port (ipykernel warns about unencrypted TCP on every start) and kernels started side by side in
    a sweep cannot race for the same port."""
    if os.name != "posix":
        return {}
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class UnixSocketKernelManager(AsyncKernelManager):
        @default("transport")
        def _unix_socket_where_one_fits(self) -> str:
            return "tcp" if kernel_socket_dir() is None else "ipc"

        @default("ip")
        def _unique_socket_prefix(self) -> str:
            if self.transport != "ipc":
                return super()._ip_default()
            # jupyter_client's default prefix is "kernel-ipc" in the working directory, shared by
            # every kernel started there: side-by-side kernels would bind each other's sockets.
            return os.path.join(kernel_socket_dir(), f"kernel-{uuid.uuid4().hex[:16]}-ipc")

    return {"kernel_manager_class": UnixSocketKernelManager}


@functools.lru_cache(maxsize=1)
def _progress_engine() -> str:
    """A papermill engine (nbclient's) that reports each finished cell to a ``cell_progress(done,
    total)`` callback passed to ``papermill.execute_notebook``: papermill's own bar is a fixed tqdm
    bar with no line-per-update form for logs."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, cell_progress=None, **kwargs):
            if cell_progress is not None:
                complete, done = nb_man.cell_complete, [0]

                def cell_complete(cell, cell_index=None, **kw):
                    complete(cell, cell_index=cell_index, **kw)
                    done[0] += 1
                    cell_progress(done[0], len(nb_man.nb.cells))

                nb_man.cell_complete = cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("workbench-progress", ProgressEngine)
    return "workbench-progress"


class _CellProgress:
    """``cell_progress`` callback: a :class:`workbench.progress.Progress` over the notebook's
    cells, opened at the first finished cell (when papermill knows the count)."""

    def __init__(self, name: str) -> None:
        self.name, self.bar = name, None

    def __call__(self, done: int, total: int) -> None:
        from workbench.progress import Progress

        if self.bar is None:
            self.bar = Progress(total, self.name, "cell", min_interval=5.0, eta=False)
        self.bar.update(done - self.bar.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


INTERRUPTED = "interrupted"


def execute_notebook(path: Path, out_dir: Path, parameters: Mapping[str, Any], *,
                     timeout: int = DEFAULT_CELL_TIMEOUT, kernel_name: str = KERNEL_NAME,
                     log_output: bool = False, stem: str | None = None, progress: bool = False) -> NotebookResult:
    """Execute one notebook with papermill into ``out_dir``; never raises for a notebook error.

    Ctrl-C (``KeyboardInterrupt``) stops the kernel and returns a result with status
    ``"interrupted"``: the caller records it and decides whether to stop. ``progress`` shows the
    cells done and the elapsed time (:mod:`workbench.progress`).
    """
    import papermill as pm

    stem = stem or path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    out_ipynb, out_html = out_dir / f"{stem}.ipynb", out_dir / f"{stem}.html"
    metrics_path = out_dir / f".{stem}.metrics.json"
    metrics_path.unlink(missing_ok=True)
    result = NotebookResult(notebook=path.stem, parameters=dict(parameters),
                            output_ipynb=out_ipynb.name, output_html=out_html.name)
    previous = os.environ.get(report.ENV_VAR)
    os.environ[report.ENV_VAR] = str(metrics_path)
    started = time.perf_counter()
    cells = _CellProgress(stem) if progress else None
    engine = {"engine_name": _progress_engine(), "cell_progress": cells} if cells else {}
    try:
        pm.execute_notebook(str(path), str(out_ipynb), parameters=dict(parameters), kernel_name=kernel_name,
                            cwd=str(path.parent), execution_timeout=timeout, progress_bar=False,
                            log_output=log_output, report_mode=False, **engine, **_kernel_manager_option(),
                            # the kernel's own log (not the cells' output) would print an ipykernel
                            # traceback when Ctrl-C stops it mid-reply; kept where output is streamed
                            extra_arguments=[] if log_output else ["--IPKernelApp.log_level=CRITICAL"])
        result.status = "done"
    except KeyboardInterrupt:
        # nbclient leaves asyncio tasks behind that, when collected, log the kernel's death as a
        # traceback: noise after a deliberate stop
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        result.status = INTERRUPTED
        result.error = "interrupted (Ctrl-C or SIGTERM) before the notebook finished"
    except Exception as exc:  # a failed notebook is recorded and the run goes on
        result.status = "failed"
        result.error = _error_text(exc)
    finally:
        if cells is not None:
            cells.close()
        result.duration = round(time.perf_counter() - started, 2)
        if previous is None:
            os.environ.pop(report.ENV_VAR, None)
        else:
            os.environ[report.ENV_VAR] = previous
    if metrics_path.exists():
        result.metrics = json.loads(metrics_path.read_text())
        metrics_path.unlink()
    if out_ipynb.exists() and result.status == INTERRUPTED:
        result.output_html = None  # the partial notebook is kept; exporting it would delay the stop
    elif out_ipynb.exists():
        try:
            export_html(out_ipynb, out_html)
        except Exception as exc:
            result.output_html = None
            result.error = (result.error or "") + f"\nHTML export failed: {_error_text(exc)}"
    else:
        result.output_ipynb = result.output_html = None
    return result


def _error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def export_html(ipynb: Path, out_html: Path) -> Path:
    """Standalone HTML; plotly figures carry plotly.js inline (see ``workbench.viz.setup``), so the
    page renders with no internet."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(ipynb, as_version=4))
    return write_text_atomic(out_html, body)


def new_run_dir(root: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, i = root / stamp, 1
    while candidate.exists():
        candidate, i = root / f"{stamp}-{i}", i + 1
    return candidate


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run or a sweep after its results file recorded what finished and what was
    interrupted; the message says where."""


def run(notebooks: Sequence[str | os.PathLike] | None = None, parameters: Mapping[str, Any] | None = None,
        output: str | os.PathLike | None = None, timeout: int = DEFAULT_CELL_TIMEOUT,
        log_output: bool = False, echo=print, progress: bool = False) -> dict:
    """Execute notebooks (all of ``notebooks/`` by default) into a new run folder.

    Everything is validated before the run folder is created: an invalid request leaves earlier
    reports untouched. ``results.json`` and ``index.html`` are rewritten after each notebook, so an
    interrupted run keeps what finished; Ctrl-C records the notebook it stopped with status
    ``"interrupted"`` and raises :class:`RunInterrupted`. ``progress`` shows each notebook's cells.
    """
    paths = [resolve_notebook(n) for n in notebooks] if notebooks else list_notebooks()
    if not paths:
        raise ValueError(f"no notebooks found in {notebooks_dir()}")
    if not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    specs = [load_spec(p) for p in paths]
    plan = plan_parameters(specs, parameters or {})
    run_dir = Path(output) if output else new_run_dir(project_root() / "reports")
    check_writable(run_dir)
    kernel = ensure_kernel()
    created = _dt.datetime.now().isoformat(timespec="seconds")
    results: dict[str, Any] = {"run_id": run_dir.name, "created": created, "python": sys.executable,
                               "parameters": dict(parameters or {}), "notebooks": []}
    for spec in specs:
        echo(f"[workbench] executing {spec.name} {plan[spec.name] or ''}".rstrip())
        outcome = execute_notebook(spec.path, run_dir, plan[spec.name], timeout=timeout, kernel_name=kernel,
                                   log_output=log_output, progress=progress)
        echo(f"[workbench] {spec.name}: {outcome.status} in {outcome.duration:.0f} s"
             + (f" -- {outcome.error.splitlines()[0]}" if outcome.error else ""))
        results["notebooks"].append(outcome.to_dict())
        if outcome.status == INTERRUPTED:
            results["status"] = INTERRUPTED
        write_json_atomic(run_dir / "results.json", results)
        write_text_atomic(run_dir / "index.html", render_index(results))
        if outcome.status == INTERRUPTED:
            raise RunInterrupted(f"interrupted: {spec.name} is recorded as '{INTERRUPTED}' in "
                                 f"{run_dir / 'results.json'}, with the notebooks that finished before it")
    results["status"] = "failed" if any(n["status"] != "done" for n in results["notebooks"]) else "done"
    write_json_atomic(run_dir / "results.json", results)
    write_text_atomic(run_dir / "index.html", render_index(results))
    results["run_dir"] = str(run_dir)
    echo(f"[workbench] report index: {run_dir / 'index.html'}")
    return results


# ----------------------------------------------------------------------------------------------
# Index page


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def key_metrics(metrics: Mapping[str, Any], limit: int = 8) -> dict:
    """Scalar metrics first (they fit a table cell), at most ``limit`` of them."""
    scalars = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return dict(list(scalars.items())[:limit])


def render_index(results: Mapping[str, Any], extra_html: str = "") -> str:
    rows = []
    for nb in results.get("notebooks", []):
        link = (f'<a href="{html.escape(nb["output_html"])}">{html.escape(nb["notebook"])}</a>'
                if nb.get("output_html") else html.escape(nb["notebook"]))
        metrics = "<br>".join(f"{html.escape(k)} = {html.escape(_fmt(v))}"
                              for k, v in key_metrics(nb.get("metrics", {})).items())
        params = html.escape(", ".join(f"{k}={_fmt(v)}" for k, v in nb.get("parameters", {}).items()))
        error = f'<pre class="err">{html.escape(nb["error"])}</pre>' if nb.get("error") else ""
        duration = f'{nb["duration"]:.0f} s' if nb.get("duration") is not None else ""
        rows.append(f'<tr class="{html.escape(nb["status"])}"><td>{link}</td><td>{html.escape(nb["status"])}'
                    f"</td><td>{duration}</td><td>{params}</td><td>{metrics}{error}</td></tr>")
    title = f"workbench run {html.escape(str(results.get('run_id', '')))}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: .4em .7em; vertical-align: top; }}
tr.done td:nth-child(2) {{ color: #1a7f37; }}
tr.failed td:nth-child(2) {{ color: #cf222e; font-weight: bold; }}
pre.err {{ color: #cf222e; white-space: pre-wrap; max-width: 60em; }}
</style></head><body>
<h1>{title}</h1>
<p>created {html.escape(str(results.get("created", "")))} &middot; <a href="results.json">results.json</a></p>
<table><tr><th>notebook</th><th>status</th><th>time</th><th>parameters</th><th>key metrics</th></tr>
{chr(10).join(rows)}
</table>
{extra_html}
</body></html>
"""
