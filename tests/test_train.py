import dataclasses
import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workbench.data import make_loader
from workbench.train import (
    Callback,
    FitOptions,
    NonFiniteLossError,
    confusion_matrix,
    evaluate,
    fit,
    load_checkpoint,
    metrics_from_confusion,
)


def _toy_classification(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 2, 8, 8, generator=g) * 0.3
    x[:, 0] += y.view(-1, 1, 1).float()  # the class is readable from channel 0's mean
    return TensorDataset(x, y)


def _toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _loaders():
    data = _toy_classification()
    return (make_loader(data, batch_size=16, train=True, seed=0),
            DataLoader(_toy_classification(64, seed=1), batch_size=32))


def test_fit_learns_and_returns_plain_history():
    train, val = _loaders()
    model = _toy_model()
    result = fit(model, train, val, epochs=4, device="cpu", progress=False,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_acc"] > 0.9
    assert len(result.step_log) == 4 * len(train)
    metrics = evaluate(model, val, "cpu")
    assert metrics["acc"] == pytest.approx(result.history[-1]["val_acc"])


def test_callbacks_see_the_state_in_order():
    train, _ = _loaders()
    model = _toy_model()
    events = []

    class Spy(Callback):
        def on_fit_start(self, s):
            events.append("fit_start")

        def on_step_start(self, s):
            events.append("step_start")

        def on_after_backward(self, s):
            assert all(p.grad is not None for p in s.model.parameters())
            events.append("after_backward")

        def on_step_end(self, s):
            assert s.loss is not None and s.inputs.shape[0] == s.targets.shape[0]
            s.logs["spy"] = s.step
            events.append("step_end")

        def on_epoch_end(self, s):
            events.append("epoch_end")
            s.stop = True

        def on_fit_end(self, s):
            events.append("fit_end")

    result = fit(model, train, epochs=3, device="cpu", progress=False, callbacks=[Spy()])
    assert events[:4] == ["fit_start", "step_start", "after_backward", "step_end"]
    assert events[-2:] == ["epoch_end", "fit_end"]
    assert len(result.history) == 1, "a callback can stop training"
    assert result.step_log[0]["spy"] == 0


def test_checkpoint_round_trip_and_resume(tmp_path):
    train, val = _loaders()

    def make():
        model = _toy_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return model, opt, sched

    torch.manual_seed(1)
    full_model, opt, sched = make()
    fit(full_model, train, val, epochs=3, optimizer=opt, scheduler=sched, device="cpu", progress=False)

    torch.manual_seed(1)
    model, opt, sched = make()
    fit(model, train, val, epochs=2, optimizer=opt, scheduler=sched, device="cpu", progress=False,
        checkpoint_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    model2, opt2, sched2 = make()
    resumed = fit(model2, train, val, epochs=3, optimizer=opt2, scheduler=sched2, device="cpu", progress=False,
                  checkpoint_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)
    for a, b in zip(full_model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_compiled_model_checkpoints_plain_keys_and_probes_see_through_it(tmp_path):
    # the README suggests torch.compile(model) on a GPU: its wrapper prefixes every name with
    # "_orig_mod." and keeps forward as an instance attribute, which the probe copies used to strip
    from workbench.probes import GradientSNR, micro_batch_gradients_loop

    train, _ = _loaders()
    compiled = torch.compile(_toy_model())
    probe = GradientSNR(every=2, micro_batches=4)
    fit(compiled, train, epochs=1, max_steps=3, device="cpu", progress=False, checkpoint_dir=tmp_path,
        callbacks=[probe])
    state = load_checkpoint(tmp_path / "last.pt")["model"]
    plain = _toy_model()
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state)
    assert set(probe.log().records[0]["layers"]) == {"0", "1", "5"}  # the plain module's layer names
    x, y = next(iter(train))
    through = micro_batch_gradients_loop(compiled, x, y, nn.functional.cross_entropy, 4)
    direct = micro_batch_gradients_loop(plain, x, y, nn.functional.cross_entropy, 4)
    assert list(through) == list(direct)
    for name in direct:
        torch.testing.assert_close(through[name], direct[name])


class Spy(Callback):
    def __init__(self):
        self.models = []

    def on_step_end(self, state):
        self.models.append(state.model)


def test_fit_compile_trains_like_eager_with_callbacks_on_the_plain_model(tmp_path, monkeypatch):
    from workbench.pruning import BNScaleSparsity

    compiled_models = []
    real_compile = torch.compile

    def spy_compile(model, **kwargs):
        compiled_models.append(model)
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy_compile)
    train, val = _loaders()
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(1)
        model = _toy_model()
        sparsity = BNScaleSparsity(1e-3)
        spy = Spy()
        result = fit(model, train, val, epochs=1, max_steps=4, device="cpu", progress=False, compile=compiled,
                     callbacks=[sparsity, spy], checkpoint_dir=tmp_path / str(compiled))
        assert result.model is model and len(spy.models) == 4 and all(m is model for m in spy.models)
        assert compiled_models == ([model] if compiled else [])
        compiled_models.clear()
        runs[compiled] = (model.state_dict(), result.history[-1])
    for key, value in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][key], value, rtol=1e-4, atol=1e-5)
    assert runs[True][1]["val_acc"] == runs[False][1]["val_acc"]
    assert list(load_checkpoint(tmp_path / "True" / "last.pt")["model"]) == list(runs[False][0])
    with pytest.raises(ValueError, match=r"compile='yes' is not valid; allowed: True, False"):
        fit(_toy_model(), train, device="cpu", compile="yes")


def test_non_finite_loss_names_epoch_and_step():
    train, _ = _loaders()
    model = _toy_model()
    with torch.no_grad():
        model[-1].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0"):
        fit(model, train, epochs=1, device="cpu", progress=False)


def test_bad_arguments():
    train, _ = _loaders()
    with pytest.raises(ValueError, match="task="):
        fit(_toy_model(), train, task="detection", progress=False)
    with pytest.raises(ValueError, match="epochs="):
        fit(_toy_model(), train, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit(_toy_model(), train, resume=True, progress=False)


LOOP_VALUES = {"epochs": 2, "max_steps": 5, "scheduler_interval": "step", "grad_clip": 1.0, "amp": "off",
               "channels_last": True, "compile": False, "checkpoint_dir": "ckpt", "resume": True,
               "write_checkpoints": False, "progress": False, "log_every": 2}


def test_fit_options_train_exactly_like_the_same_keywords(tmp_path):
    train, val = _loaders()
    runs = []
    for as_options in (False, True):
        model = _toy_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        loop = {"epochs": 2, "max_steps": 11, "scheduler_interval": "step", "grad_clip": 0.5, "log_every": 3,
                "progress": False, "checkpoint_dir": tmp_path / str(as_options)}
        kwargs = {"options": FitOptions(**loop)} if as_options else loop
        result = fit(model, train, val, optimizer=opt, scheduler=sched, device="cpu", **kwargs)
        runs.append((model.state_dict(), result.step_log, [h["val_acc"] for h in result.history]))
    (plain_state, plain_log, plain_acc), (opt_state, opt_log, opt_acc) = runs
    assert plain_state.keys() == opt_state.keys()
    assert all(torch.equal(plain_state[k], opt_state[k]) for k in plain_state)
    assert plain_log == opt_log and [e["step"] for e in plain_log] == [0, 3, 6, 9]
    assert plain_acc == opt_acc and len(plain_acc) == 2


def test_every_fit_option_is_a_keyword_of_fit_unset_by_default():
    fields = [f.name for f in dataclasses.fields(FitOptions)]
    assert sorted(fields) == sorted(LOOP_VALUES)
    parameters = inspect.signature(fit).parameters
    for name in fields:
        assert repr(parameters[name].default) == "<FitOptions default>", name
    assert FitOptions(**LOOP_VALUES) == dataclasses.replace(FitOptions(), **LOOP_VALUES)


@pytest.mark.parametrize("name", sorted(LOOP_VALUES))
def test_options_and_the_same_loop_keyword_are_refused(name):
    train, _ = _loaders()
    with pytest.raises(ValueError, match=rf"fit\(\) got options= and the loop keyword\(s\) {name};"):
        fit(_toy_model(), train, options=FitOptions(progress=False), **{name: LOOP_VALUES[name]})


def test_options_refusals_name_the_parameter():
    train, _ = _loaders()
    with pytest.raises(ValueError, match=r"loop keyword\(s\) epochs;"):
        fit(_toy_model(), train, None, 3, options=FitOptions(progress=False))  # epochs given by position
    with pytest.raises(ValueError, match=r"loop keyword\(s\) max_steps, amp;"):
        fit(_toy_model(), train, options=FitOptions(), max_steps=1, amp="off")
    with pytest.raises(ValueError, match=r"options=\{'epochs': 1\} is not valid; allowed: a FitOptions or None"):
        fit(_toy_model(), train, options={"epochs": 1})
    for bad, message in (({"epochs": -1}, r"epochs=-1 must be a non-negative integer"),
                         ({"compile": "yes"}, r"compile='yes' is not valid; allowed: True, False"),
                         ({"channels_last": None}, r"channels_last=None is not valid; allowed: True, False"),
                         ({"scheduler_interval": "batch"}, r"scheduler_interval='batch'; allowed: 'epoch', 'step'"),
                         ({"resume": True}, r"resume=True needs checkpoint_dir")):
        with pytest.raises(ValueError, match=message):
            FitOptions(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FitOptions().epochs = 3


def test_segmentation_metrics_with_ignore_index():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = confusion_matrix(pred, target, 3, ignore_index=255)
    assert conf.sum() == 6
    m = metrics_from_confusion(conf, "segmentation")
    # IoU: class0 1/(2+2-1)=1/3, class1 2/(2+3-2)=2/3, class2 1/(2+1-1)=1/2
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 6)


def test_segmentation_fit_with_aux_outputs():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (16, 8, 8), generator=g)
    x = torch.stack([y.float(), torch.randn(16, 8, 8, generator=g) * 0.1], 1)
    y[0, 0, 0] = 255

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head, self.aux = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            f = self.body(x)
            out = self.head(f)
            if self.training:  # aux head at half resolution, like PSPNet's
                return {"out": out, "aux": self.aux(f[..., ::2, ::2])}
            return out

    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    result = fit(Seg(), loader, loader, epochs=15, task="segmentation", device="cpu", progress=False,
                 optimizer=None)
    assert result.history[-1]["val_miou"] > 0.8


def test_make_optimizer_kinds_and_refusal():
    from workbench.train import make_optimizer

    net = nn.Linear(3, 2)
    sgd = make_optimizer(net, "sgd", 0.1, weight_decay=5e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    adamw = make_optimizer(net, "adamw", 2e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 2e-3
    with pytest.raises(ValueError, match="optimizer='adam'.*sgd.*adamw"):
        make_optimizer(net, "adam", 0.1)


@pytest.mark.gpu
def test_fit_compile_on_cuda_with_iebn_noise_and_a_probe():
    from workbench.nn import IEBN2d
    from workbench.noise import batch_stat_noise
    from workbench.probes import GradientSNR

    train, _ = _loaders()
    weights, logs = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), IEBN2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).to("cuda")
        probe = GradientSNR(every=2, micro_batches=4)
        with batch_stat_noise(model, 0.3, kind="mean", seed=0) as noise:
            fit(model, train, epochs=1, max_steps=4, device="cuda", progress=False, compile=compiled,
                callbacks=[noise, probe])
        weights.append(model.state_dict())
        logs.append(probe.log().series("mean"))
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-4)
    assert len(logs[1]) == len(logs[0]) == 2


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("log_every", 0, "an integer >= 1"), ("max_steps", 0, "None or an integer >= 1"),
    ("max_steps", 2.5, "None or an integer >= 1"), ("grad_clip", 0.0, "None or a number > 0"),
    ("grad_clip", -1, "None or a number > 0")])
def test_loop_options_out_of_range_are_refused_before_training(name, value, allowed):
    """log_every=0 used to divide by zero at the first step, max_steps=0 ran one step, grad_clip=0 zeroed
    every gradient; each is now refused by name, with the allowed values, before anything runs."""
    from workbench.train import FitOptions

    with pytest.raises(ValueError, match=rf"{name}={value!r} is not valid; allowed: {allowed}"):
        FitOptions(**{name: value})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"{name}={value!r} is not valid"):
        fit(model, [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))], **{name: value})
