"""papermill runner: success, failure isolation, results.json/index.html, validation before any work."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbhelpers import write_test_notebook

from workbench import cli, runner


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbs")
    good = write_test_notebook(root / "good.ipynb", "from workbench import report\nimport plotly.graph_objects as go\n"
                     "from workbench import viz\nviz.setup()\n"
                     "viz.show(go.Figure(go.Scatter(y=[1, scale])))\n"
                     "report.record('answer', 21 * scale)\nreport.record('curve', [1.0, 0.5])")
    bad = write_test_notebook(root / "bad.ipynb", "raise RuntimeError('boom on purpose')")
    out = root / "run"
    results = runner.run([bad, good], {"scale": 3}, output=out, timeout=120, echo=lambda *_: None)
    return out, results


def test_run_records_metrics_and_isolates_failures(finished_run):
    out, results = finished_run
    assert results["status"] == "failed"
    by_name = {n["notebook"]: n for n in results["notebooks"]}
    assert by_name["bad"]["status"] == "failed"
    assert "boom on purpose" in by_name["bad"]["error"]
    good = by_name["good"]
    assert good["status"] == "done", good["error"]
    assert good["parameters"] == {"scale": 3}
    assert good["metrics"] == {"answer": 63, "curve": [1.0, 0.5]}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["notebooks"] == results["notebooks"]


def test_outputs_are_standalone(finished_run):
    out, _ = finished_run
    executed = nbformat.read(out / "good.ipynb", as_version=4)
    assert any(cell.get("outputs") for cell in executed.cells)
    page = (out / "good.html").read_text()
    assert 'src="https://cdn.plot.ly' not in page
    # plotly.js is inlined (the notebook renderer's offline mode), so the HTML needs no network
    assert "Plotly.newPlot" in page and len(page) > 1_000_000
    index = (out / "index.html").read_text()
    assert 'href="good.html"' in index and "answer = 63" in index and "boom on purpose" in index


def test_cli_rejects_bad_parameters_before_running(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["run", "notebooks/00_quickstart.ipynb", "-p", "epochs", "-1", "--output", str(out)]) == 2
    assert "epochs=-1" in capsys.readouterr().err
    assert cli.main(["run", "00_quickstart", "-p", "nosuchparam", "1", "--output", str(out)]) == 2
    assert "nosuchparam" in capsys.readouterr().err
    assert cli.main(["run", "00_quickstart", "-p", "lr", "fast", "--output", str(out)]) == 2
    assert "lr='fast' has type str" in capsys.readouterr().err
    assert cli.main(["run", "no_such_notebook", "--output", str(out)]) == 2
    assert "available: " in capsys.readouterr().err
    assert not out.exists(), "nothing may be written for a refused run"


def test_earlier_reports_untouched_by_a_refused_run(tmp_path):
    earlier = tmp_path / "reports" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"keep": true}')
    assert cli.main(["run", "00_quickstart", "-p", "epochs", "-1", "--output", str(earlier)]) == 2
    assert (earlier / "results.json").read_text() == '{"keep": true}'


def test_plan_applies_overrides_only_where_declared():
    specs = [runner.load_spec(p) for p in runner.list_notebooks()]
    plan = runner.plan_parameters(specs, {"seed": 4})
    assert all(values == {"seed": 4} for values in plan.values())


@pytest.mark.skipif(os.name != "posix", reason="Unix sockets are a POSIX transport")
def test_kernels_talk_over_unix_sockets_not_tcp(tmp_path):
    body = ("from ipykernel.kernelapp import IPKernelApp\nfrom workbench import report\n"
            "report.record('transport', IPKernelApp.instance().transport)")
    nb = write_test_notebook(tmp_path / "transport.ipynb", body)
    result = runner.execute_notebook(nb, tmp_path / "out", {"seed": 1})
    assert result.status == "done", result.error
    assert result.metrics == {"transport": "ipc"}



@pytest.mark.skipif(os.name != "posix", reason="Unix sockets are a POSIX transport")
@pytest.mark.parametrize("depth", ["short", "too-long-for-a-socket-address"])
def test_kernel_starts_where_jupyter_never_ran(tmp_path_factory, monkeypatch, depth):
    # A fresh machine has no Jupyter runtime directory, and a deep one cannot hold a socket address.
    base = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    runtime = base / "rt" if depth == "short" else base / (depth * 3) / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    work = tmp_path_factory.mktemp("fresh")
    nb = write_test_notebook(work / "fresh.ipynb", "from workbench import report\nreport.record('ok', 1)")
    result = runner.execute_notebook(nb, work / "out", {"seed": 1})
    assert result.status == "done", result.error
    assert result.metrics == {"ok": 1}
    if depth == "short":
        assert runner.kernel_socket_dir() == str(runtime)
        assert runtime.is_dir() and (runtime.stat().st_mode & 0o777) == 0o700
    else:
        assert runner.kernel_socket_dir().startswith(tempfile.gettempdir())
        assert not runtime.exists()
    shutil.rmtree(base)
