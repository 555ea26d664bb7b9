"""--help after a benchmark's name or after ``train`` shows that tool's own options."""

import pytest

from workbench import cli


@pytest.mark.parametrize("argv, option", [(["bench", "layers", "--help"], "--repeats"),
                                          (["bench", "training", "-h"], "usage: workbench bench training"),
                                          (["train", "--help"], "--config")])
def test_help_reaches_the_subtool(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out
