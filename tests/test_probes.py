"""Gradient-noise, GSNR, BN-statistics and coupling probes (batch-noise issue)."""

import copy
import json

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from workbench.nn import IEBN2d
from workbench.noise import batch_stat_noise
from workbench.probes import (
    BNEstimationNoise,
    CouplingGap,
    DDPGradientNoiseScale,
    GradientNoiseScale,
    GradientSNR,
    ProbeLog,
    batch_gradient,
    bn_input_moments,
    coupling_gap,
    estimation_noise,
    gsnr_from_micro_gradients,
    micro_batch_gradients,
    micro_batch_gradients_loop,
    two_batch_estimates,
)
from workbench.train import fit


def conv_net(norm="bn", seed=0):
    torch.manual_seed(seed)
    layer = {"bn": nn.BatchNorm2d, "iebn": IEBN2d, "none": lambda c: nn.Identity()}[norm]
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), layer(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, bias=norm == "none"), layer(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g) * 1.5 + 0.3, torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("norm", ["bn", "iebn", "none"])
def test_micro_batch_gradients_match_loop_and_leave_model_untouched(norm):
    net = conv_net(norm)
    x, y = data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    vm = micro_batch_gradients(net, x, y, F.cross_entropy, 4)
    loop = micro_batch_gradients_loop(net, x, y, F.cross_entropy, 4)
    assert vm.keys() == loop.keys() == {n for n, _ in net.named_parameters()}
    for name in vm:
        assert vm[name].shape == (4, *dict(net.named_parameters())[name].shape)
        torch.testing.assert_close(vm[name], loop[name], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running stats untouched
    assert all(p.grad is None for p in net.parameters())
    if norm != "none":  # each micro-batch really is normalised on its own
        twin = copy.deepcopy(net)
        whole = torch.autograd.grad(F.cross_entropy(twin(x[:4]), y[:4]), list(twin.parameters()))
        torch.testing.assert_close(vm["0.weight"][0], whole[0], atol=1e-5, rtol=1e-5)


def test_compiled_micro_batch_gradients_match_the_loop_and_the_eager_pass():
    # float64: inductor reorders float32 reductions, and at initialisation these gradients are
    # ill-conditioned (eager float32 itself is ~3% from float64 on resnet20)
    net = conv_net("bn").double()
    x, y = data()
    x = x.double()
    loop = micro_batch_gradients_loop(net, x, y, F.cross_entropy, 4)
    torch._dynamo.reset()  # a graph cached by an earlier test would compile no new frame
    frames = counters["frames"]["ok"]
    compiled = micro_batch_gradients(net, x, y, F.cross_entropy, 4, compiled=True)
    assert counters["frames"]["ok"] > frames  # dynamo really compiled it
    for name in loop:
        torch.testing.assert_close(compiled[name], loop[name], atol=1e-10, rtol=1e-10)
    whole = batch_gradient(net, x, y, F.cross_entropy, compiled=True)
    for name, g in batch_gradient(net, x, y, F.cross_entropy).items():
        torch.testing.assert_close(whole[name], g, atol=1e-10, rtol=1e-10)
    probe = GradientSNR(every=1, micro_batches=4, compiled=True)
    assert probe.config()["compiled"] is True
    with pytest.raises(ValueError, match=r"compiled='yes'.*allowed: True, False"):
        micro_batch_gradients(net, x, y, F.cross_entropy, 4, compiled="yes")
    with pytest.raises(ValueError, match=r"compiled=1.*allowed"):
        CouplingGap(compiled=1)


def test_micro_batch_gradients_ignore_noise_hooks_and_recorders():
    net = conv_net("bn")
    x, y = data()
    clean = micro_batch_gradients(net, x, y, F.cross_entropy, 4)
    seen = []
    net[1].register_forward_hook(lambda *_: seen.append(1))
    with batch_stat_noise(net, 1.0, kind="mean"):
        noisy = micro_batch_gradients(net, x, y, F.cross_entropy, 4)
    for name in clean:
        torch.testing.assert_close(clean[name], noisy[name])
    assert not seen
    with pytest.raises(ValueError, match=r"micro_batches=1.*allowed"):
        micro_batch_gradients(net, x, y, F.cross_entropy, 1)
    with pytest.raises(ValueError, match=r"micro_batches=32.*allowed: 2..16"):
        micro_batch_gradients(net, x, y, F.cross_entropy, 32)


def linear_regression_stream(d=10, n_batches=500, batch=64, noise=1.0, seed=0):
    """y = w* . x + e with x ~ N(0, I), e ~ N(0, noise^2); model starts at w = w* + delta, |delta| = 1."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g)
    delta = torch.randn(d, generator=g)
    delta /= delta.norm()
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, d, generator=g)
        batches.append((x, (x @ w_star + noise * torch.randn(batch, generator=g))[:, None]))
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    # per-sample gradient 2 r x, r = delta.x - e: G = 2 delta, Sigma = 4(|delta|^2 + s^2) I + 4 delta delta^T
    analytic = ((1.0 + noise**2) * d + 1.0) / 1.0
    return model, batches, analytic


# the two-batch estimate from one small batch per step is much noisier than the k-micro-batch one
@pytest.mark.parametrize("method,k,steps,ema", [("two_batch", 4, 2500, 0.999), ("micro", 8, 500, 0.995)])
def test_b_simple_on_linear_regression_matches_analytic(method, k, steps, ema):
    model, batches, analytic = linear_regression_stream(n_batches=steps)
    probe = GradientNoiseScale(every=1, micro_batches=k, method=method, ema=ema)
    # lr 0: the weights stay at the point where the analytic value holds
    fit(model, batches, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss_fn=F.mse_loss,
        callbacks=[probe], device="cpu", progress=False)
    assert len(probe.records) == len(batches)
    assert abs(probe.b_simple / analytic - 1) < 0.15, (probe.b_simple, analytic)
    assert probe.records[-1]["b_simple"] == pytest.approx(probe.b_simple)


def test_two_batch_estimates_exact_on_expectations():
    g2, tr, b, big = 3.0, 40.0, 8, 64
    sq_small, sq_big = g2 + tr / b, g2 + tr / big
    assert two_batch_estimates(sq_small, sq_big, b, big) == pytest.approx((g2, tr))
    with pytest.raises(ValueError, match="0 < b < B"):
        two_batch_estimates(1.0, 1.0, 8, 8)


def test_gsnr_formula_on_synthetic_gradients():
    g = torch.Generator().manual_seed(0)
    k = 4000
    mean = torch.tensor([1.0, 0.5, 0.0])
    std = torch.tensor([0.5, 1.0, 2.0])
    grads = {"layer.weight": mean + std * torch.randn(k, 3, generator=g), "other.bias": torch.randn(k, 2, generator=g)}
    out = gsnr_from_micro_gradients(grads)
    r = (mean / std).square()
    assert out["layers"]["layer"]["mean"] == pytest.approx(float(r.mean()), abs=0.05)
    assert out["layers"]["other"]["median"] == pytest.approx(0.0, abs=0.05)
    assert set(out["layers"]) == {"layer", "other"}
    weighted = float(mean.square().sum() / (std.square().sum() + 2))
    assert out["weighted"] == pytest.approx(weighted, abs=0.03)


def test_coupling_gap_zero_without_bn_and_positive_with_bn():
    x, y = data(32)
    free = coupling_gap(conv_net("none"), x, y, F.cross_entropy, (2, 4, 8, 16), per_layer=True)
    assert max(free["gap"]) < 1e-5
    bn = coupling_gap(conv_net("bn"), x, y, F.cross_entropy, (2, 4, 8, 16, 64))
    assert bn["micro_sizes"] == [2, 4, 8, 16]  # 64 >= batch dropped
    assert min(bn["gap"]) > 1e-3
    assert bn["gap"][0] > bn["gap"][-1]  # smaller micro-batches, larger gap
    with pytest.raises(ValueError, match="micro_sizes"):
        coupling_gap(conv_net("bn"), x, y, F.cross_entropy, (32, 64))


def test_estimation_noise_scales_like_inverse_sqrt_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    x = torch.randn(4096, 3, 2, 2) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.0
    moments = bn_input_moments(model, x, batch_size=1024)
    mean, var = moments["1"]
    assert mean.shape == var.shape == (4096, 8)
    # moments reproduce the statistics of a real batch
    idx = torch.arange(0, 4096, 37)
    feats = model[0](x[idx]).double()
    torch.testing.assert_close(mean[idx].mean(0), feats.mean((0, 2, 3)))
    torch.testing.assert_close(var[idx].mean(0) + mean[idx].var(0, correction=0), feats.var((0, 2, 3), correction=0))
    out = estimation_noise(moments, (4, 16, 64, 100000), n_batches=400)
    assert out["batch_sizes"] == [4, 16, 64]
    dev = out["layers"]["1"]["mean_dev"]
    assert dev[0] / dev[1] == pytest.approx(2.0, rel=0.15)
    assert dev[1] / dev[2] == pytest.approx(2.0, rel=0.15)
    assert out["layers"]["1"]["var_dev"][0] > out["layers"]["1"]["var_dev"][2]
    with pytest.raises(ValueError, match="has no batch-normalisation layer"):
        bn_input_moments(nn.Sequential(nn.Conv2d(3, 3, 1)), x[:4])


def test_probes_in_fit_are_read_only_and_logged(tmp_path):
    batches = [data(16, seed=s) for s in range(6)]

    def train(callbacks):
        net = conv_net("bn")
        res = fit(net, batches, epochs=1, callbacks=callbacks, device="cpu", progress=False,
                  optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
        return res, net

    ref, ref_net = train([])
    probes = [GradientNoiseScale(every=2, micro_batches=4, path=tmp_path / "gns.json"),
              GradientNoiseScale(every=3, micro_batches=4, method="two_batch"),
              GradientSNR(every=2, micro_batches=4),
              CouplingGap(every=5, micro_sizes=(2, 8)),
              BNEstimationNoise(torch.cat([b[0] for b in batches]), every=4, batch_sizes=(2, 8), n_batches=16)]
    res, net = train(probes)
    assert [e["loss"] for e in res.step_log] == [e["loss"] for e in ref.step_log]  # bit-identical training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref_net.state_dict().values()))
    assert [r["step"] for r in probes[0].records] == [0, 2, 4]
    assert [r["step"] for r in probes[1].records] == [0, 3]
    assert [r["step"] for r in probes[3].records] == [0, 5]
    assert [r["step"] for r in probes[4].records] == [0, 4]
    assert "gradient_noise_scale/b_simple" in res.step_log[0] and "gsnr/mean" in res.step_log[2]
    assert set(probes[2].records[0]["layers"]) == {"0", "1", "3", "4", "8"}
    assert set(probes[4].records[0]["layers"]) == {"1", "4"}
    # JSON log written by the callback and re-read offline
    log = ProbeLog.from_json(tmp_path / "gns.json")
    assert log.probe == "gradient_noise_scale" and log.steps == [0, 2, 4]
    assert log.config["micro_batches"] == 4 and log.series("b") == [4, 4, 4]
    path = probes[3].to_json(tmp_path / "gap.json")
    raw = json.loads(path.read_text())
    assert raw["records"][0]["micro_sizes"] == [2, 8]
    assert GradientSNR.from_json(path).series("gap") == probes[3].log().series("gap")


def test_probe_arguments_refused():
    with pytest.raises(ValueError, match=r"every=0.*allowed"):
        GradientSNR(every=0)
    with pytest.raises(ValueError, match=r"method='both'.*allowed"):
        GradientNoiseScale(method="both")
    with pytest.raises(ValueError, match=r"ema=1.0.*allowed"):
        GradientNoiseScale(ema=1.0)
    with pytest.raises(ValueError, match=r"micro_sizes=\(0,\)"):
        CouplingGap(micro_sizes=(0,))
    with pytest.raises(ValueError, match=r"not a probe log"):
        ProbeLog.from_dict({"records": []})


def test_ddp_gradient_noise_scale_refuses_misuse():
    """The DDP estimator itself runs under torchrun (tests/test_train_cli.py); here its guards."""
    with pytest.raises(ValueError, match=r"model=Linear is not valid; allowed: a DistributedDataParallel model"):
        DDPGradientNoiseScale().attach(nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"ema=1.5.*allowed"):
        DDPGradientNoiseScale(ema=1.5)
    with pytest.raises(ValueError, match=r"every=0.*allowed"):
        DDPGradientNoiseScale(every=0)
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="not attached to the model being trained"):
        fit(model, [(torch.randn(4, 4), torch.randn(4, 1))], loss_fn=F.mse_loss, callbacks=[DDPGradientNoiseScale()],
            device="cpu", progress=False)
    probe = DDPGradientNoiseScale(every=3, ema=0.5)
    assert probe.config() == {"every": 3, "method": "ddp", "ema": 0.5} and probe.name == "gradient_noise_scale"
