"""amp / channels_last / compile: the device's defaults, refusals, and their path into training; the
notebooks' parameters and `workbench train` resolving them the same way."""

from pathlib import Path

import pytest
import torch
from torch import nn

from workbench.device import resolve_acceleration
from workbench.experiments import attention, batch_noise, dia_interrelations, pruning, quickstart
from workbench.experiments import pruning_comparison as comparison
from workbench.train import fit

NOTEBOOKS = {"00_quickstart": quickstart, "01_batch_noise": batch_noise, "02_attention_weights": attention,
             "03_dia_lstm_interrelations": dia_interrelations, "04_pruning_sparsity": pruning}
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_defaults(name: str) -> dict:
    """The values of the notebook's parameters cell: what the notebook hands its ``resolve``."""
    from workbench.runner import load_spec

    return load_spec(NOTEBOOK_DIR / f"{name}.ipynb").defaults


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine whose torch reports one bf16-capable CUDA device (nothing is run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    return monkeypatch


def test_auto_is_off_on_cpu_and_explicit_values_are_kept():
    auto = resolve_acceleration("cpu")
    assert (auto.amp, auto.channels_last, auto.compile) == ("off", False, False)
    assert str(auto) == "fp32, contiguous, eager"
    chosen = resolve_acceleration("cpu", amp="off", channels_last=True, compile=True)
    assert chosen.options() == {"amp": "off", "channels_last": True, "compile": True}


def test_auto_is_bf16_and_channels_last_on_cuda(fake_cuda):
    for device in ("auto", "cuda"):
        acc = resolve_acceleration(device)
        assert (acc.amp, acc.channels_last, acc.compile) == ("bf16", True, False)
    assert resolve_acceleration("cuda", amp="off", channels_last=False).options() == {
        "amp": "off", "channels_last": False, "compile": False}
    assert resolve_acceleration("cuda", amp="fp16").amp == "fp16"
    assert resolve_acceleration("cpu").amp == "off", "an explicit cpu keeps the CPU's defaults"
    fake_cuda.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_acceleration("auto").amp == "fp16"
    with pytest.raises(ValueError, match=r"amp='bf16' needs a GPU with bfloat16 support, cuda \(Fake GPU\)"):
        resolve_acceleration("cuda", amp="bf16")


@pytest.mark.parametrize(("options", "message"), [
    ({"amp": "bf16"}, r"amp='bf16' needs a CUDA device, got cpu; use amp='off' or 'auto'"),
    ({"amp": "fp16"}, r"amp='fp16' needs a CUDA device"),
    ({"amp": "half"}, r"amp='half' is not valid; allowed: \('off', 'bf16', 'fp16', 'auto'\)"),
    ({"channels_last": "yes"}, r"channels_last='yes' is not valid; allowed: None \(the device's default"),
    ({"compile": 1}, r"compile=1 is not valid; allowed: True, False"),
])
def test_what_cannot_apply_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        resolve_acceleration("cpu", **options)


class _InputFormat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.head(self.conv(x).mean((2, 3)))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]


def test_fit_and_evaluate_run_in_channels_last_with_the_same_numbers():
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = _InputFormat()
        result = fit(model, _batches(), _batches(), epochs=1, device="cpu", progress=False,
                     channels_last=channels_last)
        assert set(model.seen) == {channels_last}, "training and validation inputs are in the chosen layout"
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        results[channels_last] = (result.final["val_loss"], model.conv.weight.detach().contiguous())
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"channels_last=None is not valid; allowed: True, False"):
        fit(_InputFormat(), _batches(), device="cpu", progress=False, channels_last=None)


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_parameters_resolve_for_the_device(name, fake_cuda):
    module, defaults = NOTEBOOKS[name], notebook_defaults(name)
    assert {k: defaults[k] for k in ("amp", "channels_last", "compile", "dataset")} == {
        "amp": "auto", "channels_last": None, "compile": False, "dataset": None}
    with fake_cuda.context() as cpu:  # the CPU machine: the quick preset as it always was
        cpu.setattr(torch.cuda, "is_available", lambda: False)
        params = module.resolve(dict(defaults))
        assert (params["amp"], params["channels_last"], params["compile"], params["dataset"]) == (
            "off", False, False, module.PRESETS["quick"]["dataset"])
        with pytest.raises(ValueError, match=r"amp='bf16' needs a CUDA device, got cpu"):
            module.resolve({**defaults, "amp": "bf16"})
        assert module.resolve({**defaults, "channels_last": True, "compile": True})["channels_last"] is True
    params = module.resolve(dict(defaults))
    assert (params["amp"], params["channels_last"], params["compile"]) == ("bf16", True, False)
    assert module.resolve({**defaults, "device": "cuda", "amp": "off", "channels_last": False})["amp"] == "off"
    for bad, message in (({"amp": "yes"}, r"parameter amp='yes' is not allowed; allowed: str one of 'off'"),
                         ({"channels_last": "yes"}, r"parameter channels_last='yes' has type str; allowed: bool or "
                                                    r"None"),
                         ({"compile": None}, r"parameter compile=None has type NoneType; allowed: bool")):
        with pytest.raises(ValueError, match=message):
            module.resolve({**defaults, **bad})


def test_experiments_hand_the_resolved_options_to_fit(monkeypatch):
    calls = []

    def spy_fit(model, *args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("amp", "channels_last", "compile")})
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(quickstart, "fit", spy_fit)
    monkeypatch.setattr(attention, "fit", spy_fit)
    monkeypatch.setattr(batch_noise, "fit", spy_fit)
    monkeypatch.setattr(pruning, "fit", spy_fit)
    options = {"amp": "off", "channels_last": True, "compile": True}
    for run in (lambda: quickstart.run_quickstart(epochs=1, progress=False, **options),
                lambda: attention.train_classifier(epochs=1, progress=False, image_size=8, **options),
                lambda: dia_interrelations.run_ablation({**dia_interrelations.resolve(
                    notebook_defaults("03_dia_lstm_interrelations")),
                                                         "channels_last": True, "compile": True}, progress=False),
                lambda: batch_noise.run_grid({**batch_noise.resolve(notebook_defaults("01_batch_noise")),
                                              "norms": ["bn"], "channels_last": True, "compile": True},
                                             progress=False),
                lambda: pruning.train_seed(**{**pruning.resolve(notebook_defaults("04_pruning_sparsity")),
                                              "seed": 0, "channels_last": True, "compile": True}),
                lambda: pruning.finetune(nn.Conv2d(3, 3, 1), [(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4).long())],
                                         1, lr=0.1, optimizer="sgd", seed=0, dev=torch.device("cpu"), num_classes=3,
                                         ignore_index=255, **options)):
        with pytest.raises(RuntimeError, match="stop after the call"):
            run()
    assert calls == [options] * 6
    seen = []

    def spy_train_seed(**kwargs):
        seen.append({k: kwargs.get(k) for k in ("amp", "channels_last", "compile")})
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(comparison, "train_seed", spy_train_seed)
    params = pruning.resolve({**notebook_defaults("04_pruning_sparsity"), "channels_last": True, "compile": True})
    with pytest.raises(RuntimeError, match="stop after the call"):
        comparison.compare_at_flops(params, progress=False)
    assert seen == [options]


TRAIN = ["--dataset", "synthetic", "--model", "resnet20", "--width", "0.25", "--epochs", "1", "--batch-size", "16",
         "--schedule", "constant", "--no-augment", "--no-progress", "--device", "cpu", "--max-steps", "2"]


def test_train_resolves_the_same_options(tmp_path, capsys, fake_cuda):
    import json

    from workbench.recipe.spec import acceleration, load_config
    from workbench.train_cli import main

    cfg = load_config(None, {})
    assert (cfg.amp, cfg.channels_last, cfg.compile) == ("auto", None, False)
    with fake_cuda.context() as cpu:
        cpu.setattr(torch.cuda, "is_available", lambda: False)
        out = tmp_path / "never"
        assert main([*TRAIN, "--amp", "bf16", "--output", str(out)]) == 2
        assert "error: amp='bf16' needs a CUDA device, got cpu" in capsys.readouterr().err
        assert not out.exists(), "refused before the output folder or any training"
        assert main([*TRAIN, "--channels-last", "--output", str(tmp_path / "cl")]) == 0
        assert main([*TRAIN, "--output", str(tmp_path / "auto")]) == 0
    summaries = {name: json.loads((tmp_path / name / "history.json").read_text()) for name in ("cl", "auto")}
    assert summaries["cl"]["acceleration"] == {"amp": "off", "channels_last": True, "compile": False}
    assert summaries["auto"]["acceleration"] == {"amp": "off", "channels_last": False, "compile": False}
    assert summaries["auto"]["config"]["amp"] == "auto" and summaries["auto"]["config"]["channels_last"] is None
    auto = load_config(None, {"device": "auto"})
    assert acceleration(auto).options() == {"amp": "bf16", "channels_last": True, "compile": False}


@pytest.mark.gpu
def test_quickstart_trains_with_the_cuda_defaults():
    params = quickstart.resolve({**notebook_defaults("00_quickstart"), "epochs": 1, "width": 0.25})
    assert (params["amp"], params["channels_last"]) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16", True)
    result = quickstart.run_quickstart(**params, progress=False)
    first_conv = next(m for m in result["model"].modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.is_cuda and first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= result["test_acc"] <= 1.0 and result["history"][-1]["train_loss"] == pytest.approx(
        result["history"][-1]["train_loss"])  # finite: NaN is not approx-equal to itself
