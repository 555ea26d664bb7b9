"""Progress: plain lines with counts, elapsed time and ETA off a terminal; a tqdm bar on one."""

import io

from workbench.progress import Progress, format_seconds


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr("workbench.progress.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = Progress(4, "sweep toy", "point", stream=stream)
    assert bar.plain
    bar.update(1, note="seed=0: done in 10 s")
    bar.update(1)
    lines = stream.getvalue().splitlines()
    assert lines == ["[workbench] sweep toy: 1/4 points, 10 s elapsed, ETA 30 s -- seed=0: done in 10 s",
                     "[workbench] sweep toy: 2/4 points, 20 s elapsed, ETA 20 s"]
    assert "\r" not in stream.getvalue()


def test_plain_lines_are_throttled_but_the_last_always_prints(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 7.0, 8.0])
    monkeypatch.setattr("workbench.progress.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = Progress(4, "nb", "cell", stream=stream, min_interval=5.0, eta=False)
    for _ in range(4):
        bar.update(1)
    assert stream.getvalue().splitlines() == ["[workbench] nb: 1/4 cells, 1 s elapsed",
                                              "[workbench] nb: 3/4 cells, 7 s elapsed",
                                              "[workbench] nb: 4/4 cells, 8 s elapsed"]


def test_a_bar_on_a_terminal():
    stream = FakeTerminal()
    with Progress(2, "nb", "cell", stream=stream) as bar:
        assert not bar.plain
        bar.update(2)
    assert "\r" in stream.getvalue() and "2/2" in stream.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (4.4, 65, 7260)] == ["4 s", "1 min 05 s", "2 h 01 min"]
