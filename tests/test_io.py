import json

import pytest
import torch

from workbench.io import atomic_open, write_json_atomic
from workbench.train import atomic_save, load_checkpoint


def test_atomic_write_survives_an_exception_mid_write(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write('{"v": 2, "half')
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file left behind"


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert len(list(tmp_path.iterdir())) == 1


def test_plain_makes_json_safe_data_and_strict_refuses_objects():
    """One conversion serves the probe logs (lenient) and report.record (strict)."""
    import math

    import torch

    from workbench.io import plain

    value = {1: torch.tensor([1.0, math.nan]), "b": (math.inf, -math.inf), "c": None}
    assert plain(value) == {"1": [1.0, None], "b": ["inf", "-inf"], "c": None}
    marker = object()
    assert plain([marker])[0] is marker
    with pytest.raises(TypeError, match="cannot record a value of type object"):
        plain({"a": [marker]}, strict=True)
