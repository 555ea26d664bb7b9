"""Command line: ``workbench run | sweep | lab | train | bench | data``."""

from __future__ import annotations

import argparse
import importlib
import sys

from workbench.params import PRESETS, parse_cli_value

# `bench all` runs them in this order; pruning last, because on CPU it changes the process's allocator
# (workbench.benchmarks.allocator) and nothing after it should run under a setting its header does not name
BENCHMARKS = {
    "layers": "workbench.benchmarks.layers",
    "probes": "workbench.benchmarks.probes",
    "training": "workbench.benchmarks.training",
    "pruning": "workbench.benchmarks.pruning",
}


def _parameter_pairs(pairs: list[list[str]] | None, multi: bool = False) -> dict:
    """``-p NAME VALUE`` (run) or ``-p NAME V1 V2 ...`` (sweep) into a dict of Python values."""
    values: dict = {}
    for pair in pairs or []:
        name, *raw = pair
        if not raw or (not multi and len(raw) != 1):
            shape = "NAME V1 [V2 ...]" if multi else "NAME VALUE"
            raise SystemExit(f"error: -p expects {shape}, got {' '.join(pair)!r}")
        parsed = [parse_cli_value(v) for v in raw]
        values[name] = parsed if multi else parsed[0]
    return values


def _cmd_run(args: argparse.Namespace) -> int:
    from workbench import runner

    params = _parameter_pairs(args.param)
    if args.preset is not None:
        params["preset"] = args.preset
    if args.device is not None:
        params["device"] = args.device
    try:
        results = runner.run(args.notebooks or None, params, output=args.output, timeout=args.timeout,
                             log_output=args.log_output)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if results["status"] == "done" else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from workbench import sweep

    grid = _parameter_pairs(args.param, multi=True)
    try:
        summary = sweep.run_sweep(args.notebook, grid, jobs=args.jobs, output=args.output,
                                  timeout=args.timeout, executor=args.executor, address=args.address,
                                  gpus_per_point=args.gpus_per_point)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["status"] == "done" else 1


def _cmd_lab(args: argparse.Namespace) -> int:
    from workbench.lab import serve_lab

    return serve_lab(args.port, args.browser, args.root)


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    status = 0
    for name in names:
        print(f"== workbench bench {name} ==", flush=True)
        module = importlib.import_module(BENCHMARKS[name])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute notebooks with papermill into reports/<run-id>/")
    p.add_argument("notebooks", nargs="*", help="notebook paths or names (default: all in notebooks/)")
    p.add_argument("-p", "--param", nargs="+", action="append", metavar=("NAME", "VALUE"),
                   help="override a parameter (repeatable)")
    p.add_argument("--preset", choices=PRESETS, help="shorthand for -p preset ...")
    p.add_argument("--device", help="shorthand for -p device ... (auto, cpu, cuda, cuda:N, mps)")
    p.add_argument("--output", help="run folder (default: reports/<timestamp>)")
    p.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")
    p.add_argument("--log-output", action="store_true", help="stream notebook output to this terminal")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sweep", help="run one notebook over a parameter grid")
    p.add_argument("notebook")
    p.add_argument("-p", "--param", nargs="+", action="append", metavar=("NAME", "V"),
                   help="-p NAME V1 V2 ...: values of one grid axis (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="points executed in parallel")
    p.add_argument("--output", help="sweep folder (default: reports/sweep-<notebook>-<grid hash>)")
    p.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--gpus-per-point", type=float, default=0.0)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("lab", help="start JupyterLab on 127.0.0.1 with a token on the workbench kernel",
                       description="JupyterLab on 127.0.0.1 on the workbench kernel. The token is $JUPYTER_TOKEN "
                                   "when set, else a fresh one; it is passed through the environment, never "
                                   "on a command line. Ctrl-C or SIGTERM stops JupyterLab too.")
    p.add_argument("--port", type=int)
    p.add_argument("--browser", action="store_true", help="open a browser")
    p.add_argument("--root", help="folder JupyterLab serves (default: the project)")
    p.set_defaults(func=_cmd_lab)

    # add_help=False: -h/--help after the name reaches the benchmark's or the trainer's own parser,
    # which knows their options.
    names = ",".join([*BENCHMARKS, "all"])
    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)",
                       add_help=False, usage=f"workbench bench {{{names}}} [options; -h for a benchmark's own]")
    p.add_argument("name", choices=[*BENCHMARKS, "all"])
    p.set_defaults(func=_cmd_bench, takes_rest=True)

    p = sub.add_parser("train", help="train from a config, in one process or under torchrun", add_help=False)
    p.set_defaults(func=_cmd_train, takes_rest=True)

    p = sub.add_parser("data", help="your own data: check what the workbench sees in a folder")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="report classes, counts per split, image sizes, channels and what is "
                                          "refused (exit code 1 when something is)")
    p.add_argument("path", help="a dataset folder (classification in ImageFolder layout, or images/ + masks/ "
                                "with dataset.yaml)")
    p.set_defaults(func=_cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_rest", False):
        return int(args.func(args, rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
