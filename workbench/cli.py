"""Command line: workbench run | sweep | params | lab | train | bench | data.

Every command explains itself with --help. An expected failure (a bad value, a missing file, a
folder that cannot be written, Ctrl-C) ends in one or two lines and a non-zero exit code; --debug
shows the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from workbench.errors import DeviceUnavailableError
from workbench.params import ALL_PRESETS, DEVICE_CHOICES_HELP, EXECUTOR_CHOICES, parse_cli_value

# `bench all` runs them in this order; pruning last, because on CPU it changes the process's allocator
# (workbench.benchmarks.allocator) and nothing after it should run under a setting its header does not name
BENCHMARKS = {
    "layers": ("workbench.benchmarks.layers", "IEBN2d vs BatchNorm2d and each attention stage, eager and compiled"),
    "probes": ("workbench.benchmarks.probes", "training-step cost of each batch-noise probe, vmap vs loop"),
    "training": ("workbench.benchmarks.training", "epoch time of BN vs IEBN vs DIA training, AMP, channels_last"),
    "pruning": ("workbench.benchmarks.pruning", "latency speedup against FLOPs reduction of pruned segmentation nets"),
}
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
DEBUG_ENV_VAR = "WORKBENCH_DEBUG"  # the same name as workbench.train_cli.DEBUG_ENV_VAR


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; shows a sweep axis as ``NAME V1 [V2 ...]`` (argparse
    would write ``NAME [V1 ...]``, as if the values were optional)."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == "+" and isinstance(action.metavar, tuple) and len(action.metavar) == 3:
            return "{} {} [{} ...]".format(*action.metavar)
        return super()._format_args(action, default_metavar)


def _run_parameters(pairs: list[list[str]] | None) -> dict:
    """``-p NAME VALUE`` pairs (argparse gives exactly two strings each) into Python values."""
    return {name: parse_cli_value(raw) for name, raw in pairs or []}


def _sweep_grid(axes: list[list[str]] | None) -> dict:
    """``-p NAME V1 V2 ...`` axes into lists of Python values; an axis needs at least one value."""
    grid: dict = {}
    for name, *raw in axes or []:
        if not raw:
            raise ValueError(f"-p {name} has no values; a sweep axis is -p NAME V1 [V2 ...]")
        grid[name] = [parse_cli_value(v) for v in raw]
    return grid


def _cmd_run(args: argparse.Namespace) -> int:
    from workbench import runner

    params = _run_parameters(args.param)
    if args.preset is not None:
        params["preset"] = args.preset
    if args.device is not None:
        params["device"] = args.device
    results = runner.run(args.notebooks or None, params, output=args.output, timeout=args.timeout,
                         log_output=args.log_output, progress=not args.no_progress)
    return 0 if results["status"] == "done" else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from workbench import sweep

    summary = sweep.run_sweep(args.notebook, _sweep_grid(args.param), jobs=args.jobs, output=args.output,
                              timeout=args.timeout, executor=args.executor, address=args.address,
                              gpus_per_point=args.gpus_per_point, progress=not args.no_progress,
                              cpus_per_point=args.cpus_per_point, gather=args.gather)
    return 0 if summary["status"] == "done" else 1


def parameter_table(notebook: str) -> str:
    """A notebook's parameters as a text table: name, allowed values, default, help."""
    from workbench.runner import load_spec, resolve_notebook

    spec = load_spec(resolve_notebook(notebook))
    rows = [("name", "allowed", "default", "help")]
    rows += [(name, param.describe(), repr(spec.defaults[name]), param.help)
             for name, param in spec.spec.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{spec.name} ({spec.path})", ""]
    lines += ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]).rstrip() for row in rows]
    lines += ["", f"set one with: workbench run {spec.name} -p NAME VALUE"]
    return "\n".join(lines)


def _cmd_params(args: argparse.Namespace) -> int:
    print(parameter_table(args.notebook))
    return 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from workbench.lab import serve_lab

    return serve_lab(args.port, args.browser, args.root)


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.name is None:
        if any(arg in ("-h", "--help") for arg in rest):
            args.bench_parser.print_help()
            return 0
        args.bench_parser.error(f"choose a benchmark: {', '.join([*BENCHMARKS, 'all'])}")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    status = 0
    for name in names:
        print(f"== workbench bench {name} ==", flush=True)
        module = importlib.import_module(BENCHMARKS[name][0])
        status |= int(module.main(rest) or 0)
    return status


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from workbench import train_cli

    return train_cli.main(rest)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from workbench.data import describe_scan, scan_folder

    scan = scan_folder(args.path)
    print(describe_scan(scan))
    return 0 if scan.ok else 1


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="execute notebooks with papermill into reports/<run-id>/",
                       description="Execute notebooks with papermill into a run folder: executed notebooks, "
                                   "standalone HTML, results.json and index.html.\n"
                                   "List a notebook's parameters with: workbench params NOTEBOOK",
                       formatter_class=_Formatter)
    p.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                   help="notebook path, file name or name such as 00_quickstart (default: every notebook in "
                        "notebooks/)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="set a parameter, repeatable; VALUE is a Python literal (0.1, [1, 2], None) or a plain "
                        "string; checked against the notebook's declared parameters before anything runs")
    p.add_argument("--preset", choices=ALL_PRESETS, help="shorthand for -p preset NAME (default: the notebook's)")
    p.add_argument("--device", help=f"shorthand for -p device NAME: {DEVICE_CHOICES_HELP} (default: the "
                                    "notebook's, auto)")
    _add_execution_options(p, "run folder (default: reports/<timestamp>)", "per-notebook progress",
                           "cells done, elapsed")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output to this terminal")
    p.set_defaults(func=_cmd_run)


def _add_execution_options(p, output_help: str, progress: str, progress_shows: str) -> None:
    """The options ``run`` and ``sweep`` share: where results go, the per-cell timeout, progress."""
    p.add_argument("--output", metavar="FOLDER", help=output_help)
    p.add_argument("--timeout", type=int, default=3600, metavar="SECONDS",
                   help="per-cell timeout in seconds (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help=f"no {progress} ({progress_shows}; a bar on a terminal, lines otherwise)")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run one notebook over a parameter grid",
                       description="Run one notebook over the Cartesian product of parameter values, each point "
                                   "in its own process and folder.\nRerunning the same command skips the points "
                                   "already done; Ctrl-C keeps what finished.", formatter_class=_Formatter)
    p.add_argument("notebook", metavar="NOTEBOOK", help="notebook path, file name or name such as 00_quickstart")
    p.add_argument("-p", "--param", nargs="+", action="append", metavar=("NAME", "V1", "V2"),
                   help="one grid axis: a parameter and its values (Python literals or strings), repeatable")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="points executed in parallel, each with the CPU cores divided by N (default: %(default)s)")
    _add_execution_options(p, "sweep folder (default: reports/sweep-<notebook>-<grid hash>)", "progress",
                           "points done, elapsed, ETA")
    p.add_argument("--executor", choices=EXECUTOR_CHOICES, default="local",
                   help="local: a process pool on this machine; ray: Ray tasks, on a cluster with --address "
                        "(needs the ray extra) (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address, e.g. ray://head:10001 (default: a local Ray instance)")
    p.add_argument("--gpus-per-point", type=float, default=0.0, metavar="G",
                   help="GPUs Ray reserves for each point, fractions allowed; ray executor only "
                        "(default: %(default)s)")
    p.add_argument("--cpus-per-point", type=int, default=None, metavar="C",
                   help="CPUs Ray reserves for each point, also its kernel's torch/BLAS threads; ray executor only "
                        "(default: 1)")
    p.add_argument("--gather", action=argparse.BooleanOptionalAction, default=True,
                   help="bring each point's files back from its node into --output; --no-gather: points write "
                        "into --output, which every node must see at the same path; ray executor only "
                        "(default: gather)")
    p.set_defaults(func=_cmd_sweep)


def _add_lab(sub) -> None:
    p = sub.add_parser("lab", help="start JupyterLab on 127.0.0.1 with a token on the workbench kernel",
                       description="JupyterLab on 127.0.0.1 on the workbench kernel. The token is $JUPYTER_TOKEN "
                                   "when set, else a fresh one; it is passed through the environment, never "
                                   "on a command line. Ctrl-C or SIGTERM stops JupyterLab too.")
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--browser", action="store_true", help="open a browser (default: only print the URL)")
    p.add_argument("--root", metavar="FOLDER", help="folder JupyterLab serves (default: the project)")
    p.set_defaults(func=_cmd_lab)


def _add_bench(sub) -> None:
    # add_help=False: -h/--help after a benchmark's name reaches that benchmark's own parser, which
    # knows its options; before a name it shows this list.
    listing = "\n".join(f"  {name:<9} {text}" for name, (_, text) in BENCHMARKS.items())
    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)",
                       add_help=False, formatter_class=_Formatter,
                       usage=f"workbench bench {{{','.join([*BENCHMARKS, 'all'])}}} [options]",
                       description=f"Benchmarks, each reporting ratios against a baseline measured in the same "
                                   f"run:\n{listing}\n  all       every one of them, in this order\n\n"
                                   "Options of a benchmark: workbench bench NAME --help")
    p.add_argument("name", nargs="?", choices=[*BENCHMARKS, "all"], help="the benchmark to run")
    p.set_defaults(func=_cmd_bench, takes_rest=True, bench_parser=p)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="your own data: check what the workbench sees in a folder",
                       description="Your own data: check what the workbench sees in a folder.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("check", help="report classes, counts per split, image sizes, channels and what is "
                                          "refused (exit code 1 when something is)")
    p.add_argument("path", help="a dataset folder (classification in ImageFolder layout, or images/ + masks/ "
                                "with dataset.yaml)")
    p.set_defaults(func=_cmd_data_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_sweep(sub)
    p = sub.add_parser("params", help="list a notebook's parameters: allowed values, default, help",
                       description="List a notebook's parameters: name, allowed values, default and help.")
    p.add_argument("notebook", metavar="NOTEBOOK", help="notebook path, file name or name such as 00_quickstart")
    p.set_defaults(func=_cmd_params)
    _add_lab(sub)
    p = sub.add_parser("train", help="train from a config, in one process or under torchrun (--help: every key)",
                       add_help=False)
    p.set_defaults(func=_cmd_train, takes_rest=True)
    _add_bench(sub)
    _add_data(sub)
    return parser


def explain(exc: BaseException) -> str:
    """One or two lines for an expected failure: the problem, then the fix where the message lacks it."""
    if isinstance(exc, PermissionError) and exc.filename:
        return (f"error: cannot write {exc.filename}: {exc.strerror}\n"
                "fix: make it writable or choose another folder (--output)")
    if isinstance(exc, OSError) and exc.filename:
        return f"error: {exc.filename}: {exc.strerror or exc}"
    return f"error: {exc}"


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_rest", False):
        return int(args.func(args, rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """The error boundary: every expected failure becomes a short message and an exit code (2: bad
    input, 1: the environment, 130: interrupted); ``--debug`` adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    previous = os.environ.get(DEBUG_ENV_VAR)
    if debug:  # reaches `workbench train`, which reports its own errors, and its torchrun workers
        os.environ[DEBUG_ENV_VAR] = "1"
    try:
        return _dispatch(argv)
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        print(str(exc) if str(exc) and not str(exc).startswith("signal") else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, DeviceUnavailableError) as exc:
        if debug:
            traceback.print_exc()
        print(explain(exc), file=sys.stderr)
        return EXIT_ENVIRONMENT if isinstance(exc, OSError) else EXIT_BAD_INPUT
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV_VAR, None)
        else:
            os.environ[DEBUG_ENV_VAR] = previous


if __name__ == "__main__":
    sys.exit(main())
