"""Every command and option explains itself: help text, defaults and allowed values, and a notebook's
parameters listed by ``workbench params``."""

import argparse

import pytest

from workbench import cli, train_cli
from workbench.experiments import batch_noise
from workbench.recipe.spec import TrainConfig, config_parameters


@pytest.mark.parametrize("argv, option", [(["bench", "layers", "--help"], "--repeats"),
                                          (["bench", "training", "-h"], "usage: workbench bench training"),
                                          (["train", "--help"], "--config")])
def test_help_reaches_the_subtool(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]


def _walk(parser: argparse.ArgumentParser, prefix: str = "workbench"):
    """Every parser of the tree (commands and their own sub-commands) with its command line."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(choice.help for choice in action._choices_actions), prefix
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prefix} {name}")


def test_every_option_of_every_command_has_help():
    parser = cli.build_parser()
    assert set(_subparsers(parser)) == {"run", "sweep", "params", "lab", "train", "bench", "data"}
    missing = {name: _options_without_help(sub) for name, sub in _walk(parser)}
    missing["workbench train (its own parser)"] = _options_without_help(train_cli.build_parser())
    assert len(missing) >= 9, "the tree holds the commands and data check"
    assert not any(missing.values()), missing


def test_train_flags_show_default_and_allowed_values():
    parser = train_cli.build_parser()
    spec = config_parameters()
    defaults = TrainConfig()
    for action in parser._actions:
        if action.dest not in spec:
            continue
        assert f"(default: {getattr(defaults, action.dest)})" in action.help, action.dest
        param = spec[action.dest]
        if param.choices is not None:
            assert all(repr(c) in action.help for c in param.choices), action.dest
        if param.min is not None and param.type is not bool:
            assert str(param.min) in action.help, action.dest
    momentum = next(a for a in parser._actions if a.dest == "momentum")
    assert ">= 0.0 < 1.0" in momentum.help


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out
    assert "--debug" in out and "params" in out


def test_bench_help_lists_the_benchmarks(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in [*cli.BENCHMARKS, "all"]:
        assert f"  {name} " in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench"])
    assert exit_info.value.code == 2
    assert "choose a benchmark: layers" in capsys.readouterr().err


def test_parameter_options_show_how_many_values(capsys):
    commands = _subparsers(cli.build_parser())
    assert "-p NAME VALUE]" in commands["run"].format_usage()
    assert "-p NAME V1 [V2 ...]" in commands["sweep"].format_usage()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "00_quickstart", "-p", "epochs"])
    assert exit_info.value.code == 2
    assert "expected 2 arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "00_quickstart", "-p", "epochs", "1", "2"])
    assert "unrecognized arguments: 2" in capsys.readouterr().err


def test_params_lists_a_notebooks_parameters(capsys):
    assert cli.main(["params", "01_batch_noise"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name, param in batch_noise.PARAMETERS.items():
        assert name in rows, name
        assert param.help and param.help in rows[name], name
        assert param.describe() in rows[name], name
    assert "each one of 'bn', 'iebn', 'none'" in rows["norms"]
    assert "['bn', 'iebn', 'none']" in rows["norms"], "the parameters cell's default"
    assert cli.main(["params", "no_such_notebook"]) == 2
    assert "available: 00_quickstart" in capsys.readouterr().err


def test_every_notebook_parameter_has_help():
    from workbench.runner import list_notebooks, load_spec

    missing = [f"{path.stem}:{name}" for path in list_notebooks()
               for name, param in load_spec(path).spec.items() if not param.help]
    assert not missing
