"""Batch-statistic noise injection and the mix-dataset attack."""

import copy
import math

import pytest
import torch
from torch import nn

from workbench.data.mixed import MixedDataset, ShiftedDataset, mixed_digits, per_source_accuracy
from workbench.nn import IEBN2d
from workbench.noise import NOISE_KINDS, batch_stat_noise
from workbench.train import fit

NORMS = {"bn": nn.BatchNorm2d, "iebn": IEBN2d, "sync": nn.SyncBatchNorm}


def small_net(norm=nn.BatchNorm2d, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), norm(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():  # non-trivial affine and gate parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, IEBN2d):
                m.attn_weight.uniform_(-1, 1)
    return net


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g) * 2 + 0.5


def output_and_grads(net, x):
    out = net(x)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    return out, grads


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def instrumented(net):
    out = []
    for m in net.modules():
        if "forward" in vars(m) or getattr(m, "stat_transform", None) is not None:
            out.append(m)
        if m._forward_hooks or m._forward_pre_hooks:
            out.append(m)
    return out


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_level_zero_is_bit_identical(norm, kind):
    x = batch()
    ref = small_net(NORMS[norm])
    net = copy.deepcopy(ref)
    out_ref, grads_ref = output_and_grads(ref, x)
    with batch_stat_noise(net, 0.0, kind=kind, seed=3):
        out, grads = output_and_grads(net, x)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert same_state(net.state_dict(), ref.state_dict())  # running statistics advanced identically


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_positive_level_changes_training_output_not_eval(norm, kind):
    x = batch()
    net = small_net(NORMS[norm])
    before = snapshot(net)
    clean_train = net(x)
    net.load_state_dict(before)
    net.eval()
    clean_eval = net(x)
    with batch_stat_noise(net, 0.7, kind=kind):
        assert torch.equal(net(x), clean_eval)  # eval mode untouched
        net.train()
        noisy = net(x)
    assert not torch.allclose(noisy, clean_train, atol=1e-4)
    noisy.square().sum().backward()  # differentiable through the perturbed statistics
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("norm", list(NORMS))
def test_exit_restores_model_exactly_also_after_exception(norm):
    net = small_net(NORMS[norm])
    before = snapshot(net)
    forwards = {id(m): m.forward for m in net.modules()}
    with pytest.raises(RuntimeError, match="boom"):
        with batch_stat_noise(net, 0.5, kind="feature"):
            assert instrumented(net)
            raise RuntimeError("boom")
    assert not instrumented(net)
    assert same_state(net.state_dict(), before)
    assert all(m.forward.__func__ is forwards[id(m)].__func__ for m in net.modules())
    handle = batch_stat_noise(net, 0.5, kind="both")
    handle.remove()
    handle.remove()  # idempotent
    assert not instrumented(net)
    assert same_state(net.state_dict(), before)


@pytest.mark.parametrize("norm", ["bn", "iebn"])
def test_noise_reaches_a_compiled_model_and_leaves_it_clean(norm):
    # the README advises torch.compile(model) on a GPU: the hooks patch forwards at run time, so the
    # compiled model must see them while installed (dynamo's guards) and not after
    net = small_net(NORMS[norm]).train()
    compiled = torch.compile(net)
    x = batch()
    start = snapshot(net)

    def run(model):
        out = model(x).detach()
        net.load_state_dict(start)  # the running statistics stay put between calls
        return out

    clean = run(compiled)
    torch.testing.assert_close(clean, run(net), rtol=1e-5, atol=1e-5)
    for kind in ("mean", "feature"):
        with batch_stat_noise(net, 1.0, kind=kind, seed=3):
            noisy = run(compiled)
        with batch_stat_noise(net, 1.0, kind=kind, seed=3):  # a fresh handle: the same first draw
            torch.testing.assert_close(noisy, run(net), rtol=1e-5, atol=1e-5)
        assert (noisy - clean).abs().max() > 1e-2
        torch.testing.assert_close(run(compiled), clean, rtol=0, atol=1e-6)


def test_iebn_flags_restored():
    net = small_net(IEBN2d)
    seen = []
    probe = net[1].attention_probe
    layer = net[1]
    flags = ("stat_transform", "stat_transform_updates_running_stats")
    probe.register_forward_hook(lambda *_: seen.append(tuple(getattr(layer, f) for f in flags)))
    with batch_stat_noise(net, 0.5, kind="mean", running_stats="noisy"):
        net(batch())
        # set for the duration of the noisy call only
        assert seen[0][0] is not None and seen[0][1] is True
        assert net[1].stat_transform is None and not net[1].stat_transform_updates_running_stats
    assert all(m.stat_transform is None and not m.stat_transform_updates_running_stats
               for m in net.modules() if isinstance(m, IEBN2d))


@pytest.mark.parametrize("kind", ["mean", "var", "both", "feature"])
@pytest.mark.parametrize("norm", ["bn", "iebn"])
def test_same_seed_same_perturbation(norm, kind):
    x = batch()
    outs = []
    for seed in (5, 5, 6):
        net = small_net(NORMS[norm])
        with batch_stat_noise(net, 0.5, kind=kind, seed=seed):
            outs.append((net(x), net(x)))
    (a1, a2), (b1, b2), (c1, _) = outs
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # successive forwards draw fresh noise
    assert not torch.equal(a1, c1)


def test_step_determines_noise():
    x = batch()
    net = small_net()
    with batch_stat_noise(net, 0.5, kind="mean", seed=1) as noise:
        noise.set_step(7)
        first = net(x)
        noise.set_step(3)
        net(x)
        noise.set_step(7)
        assert torch.equal(net(x), first)


def test_constant_attack_formula_and_running_stats():
    x = batch()
    net = nn.Sequential(nn.BatchNorm2d(3))
    ref = copy.deepcopy(net)
    a = 0.5
    with batch_stat_noise(net, a, kind="constant"):
        y = net(x)
    ref(x)  # plain BN with the same clean batch statistics
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, (x_hat - a) / (1 + a), atol=1e-5, rtol=1e-5)
    # default: the running averages absorb the clean statistics, exactly as nn.BatchNorm2d's
    torch.testing.assert_close(net[0].running_mean, ref[0].running_mean)
    torch.testing.assert_close(net[0].running_var, ref[0].running_var)
    assert int(net[0].num_batches_tracked) == 1
    noisy = nn.Sequential(nn.BatchNorm2d(3))
    with batch_stat_noise(noisy, a, kind="constant", running_stats="noisy"):
        noisy(x)
    assert not torch.allclose(noisy[0].running_mean, ref[0].running_mean)


@pytest.mark.parametrize("norm", ["bn", "iebn"])
def test_running_stats_semantics(norm):
    x = batch()
    clean = small_net(NORMS[norm])
    plain = copy.deepcopy(clean)
    noisy = copy.deepcopy(clean)
    plain(x)
    with batch_stat_noise(clean, 1.0, kind="mean", layers="1", running_stats="clean"):
        clean(x)
    with batch_stat_noise(noisy, 1.0, kind="mean", layers="1", running_stats="noisy"):
        noisy(x)
    torch.testing.assert_close(clean[1].running_mean, plain[1].running_mean)
    assert not torch.allclose(noisy[1].running_mean, plain[1].running_mean)


def test_mean_noise_statistics():
    # mean noise: shift of the normalised output per channel is -level * xi, xi ~ N(0, 1)
    net = nn.Sequential(nn.BatchNorm2d(256, affine=False))
    x = torch.randn(16, 256, 4, 4)
    with batch_stat_noise(net, 0.5, kind="mean", seed=0):
        shift = net(x).mean((0, 2, 3))
    assert abs(float(shift.std()) - 0.5) < 0.08
    assert abs(float(shift.mean())) < 0.1


def test_iebn_feature_noise_scaled_by_gate():
    torch.manual_seed(0)
    layer = IEBN2d(64)
    with torch.no_grad():
        layer.attn_bias.copy_(torch.linspace(-3, 3, 64))
        layer.weight.fill_(2.0)
    x = torch.randn(16, 64, 8, 8)
    clean = layer(x)
    with batch_stat_noise(layer, 0.5, kind="feature"):
        noisy = layer(x)
    # with attn_weight = 0 the gate is sigmoid(attn_bias): the noise is 0.5 * gamma * gate * xi
    expected_std = 0.5 * 2.0 * torch.sigmoid(layer.attn_bias.detach())
    measured = (noisy - clean).std((0, 2, 3))
    torch.testing.assert_close(measured / expected_std, torch.ones(64), atol=0.08, rtol=0)


def test_layer_subset_by_pattern():
    x = batch()
    net = small_net()
    with batch_stat_noise(net, 1.0, kind="mean", layers=["4"]) as noise:
        assert list(noise.layers) == ["4"]
        assert "forward" not in vars(net[1]) and "forward" in vars(net[4])
    outer = nn.Sequential()
    outer.add_module("stage", small_net())
    with batch_stat_noise(outer, 1.0, layers="stage.*") as noise:
        assert list(noise.layers) == ["stage.1", "stage.4"]
        outer(x)


def test_schedule_ramp_and_callback():
    net = small_net()
    ref = copy.deepcopy(net)
    x = batch()
    with batch_stat_noise(net, 1.0, kind="mean", schedule="ramp", ramp_steps=4) as noise:
        assert noise.current_level == 0.0
        assert torch.equal(net(x), ref(x))  # step 0 of a ramp: bit-identical
        noise.set_step(2)
        assert noise.current_level == 0.5
        noise.set_step(10)
        assert noise.current_level == 1.0
    with batch_stat_noise(net, 2.0, schedule=lambda step: 0.5 if step < 3 else 1.0) as noise:
        assert noise.current_level == 1.0


def test_as_training_callback_reproducible():
    torch.manual_seed(0)
    data = [(batch(seed=s), torch.randint(0, 4, (8,))) for s in range(4)]

    def run():
        net = small_net()
        with batch_stat_noise(net, 0.5, kind="both", seed=2) as noise:
            result = fit(net, data, epochs=2, callbacks=[noise], device="cpu", progress=False,
                         optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
        assert not instrumented(net)
        return [e["loss"] for e in result.step_log], result.step_log, noise

    losses_a, log, noise = run()
    losses_b, _, _ = run()
    assert losses_a == losses_b
    assert all(e["noise_level"] == 0.5 for e in log)
    assert noise.state_dict() == {"step": 7, "level": 0.5}


@pytest.mark.parametrize("level", [-0.1, float("nan"), float("inf"), "1", True])
def test_bad_level(level):
    with pytest.raises(ValueError, match=r"level=.*allowed: a finite number >= 0"):
        batch_stat_noise(small_net(), level)


def test_bad_inputs_name_value_and_allowed():
    net = small_net()
    with pytest.raises(ValueError, match=r"kind='gauss'.*allowed.*'mean'"):
        batch_stat_noise(net, 0.1, kind="gauss")
    with pytest.raises(ValueError, match=r"layers pattern 'layer9\.\*' matches no normalisation layer.*'1'"):
        batch_stat_noise(net, 0.1, layers=["1", "layer9.*"])
    with pytest.raises(ValueError, match=r"model=Sequential has no batch-normalisation layer; allowed"):
        batch_stat_noise(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), 0.1)
    with pytest.raises(ValueError, match=r"running_stats='both'.*allowed"):
        batch_stat_noise(net, 0.1, running_stats="both")
    with pytest.raises(ValueError, match=r"schedule='cosine'.*allowed"):
        batch_stat_noise(net, 0.1, schedule="cosine")
    with pytest.raises(ValueError, match=r"seed=-1"):
        batch_stat_noise(net, 0.1, seed=-1)
    assert not instrumented(net)  # nothing installed by a refused call
    with batch_stat_noise(net, 0.1) as noise:
        with pytest.raises(ValueError, match="already instrumented"):
            batch_stat_noise(net, 0.1)
        with pytest.raises(ValueError, match=r"level=-1"):
            noise.level = -1


def test_custom_forward_subclass_refused():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match=r"overrides forward.*allowed"):
        batch_stat_noise(nn.Sequential(Custom(3)), 0.1)


def test_batchnorm1d_supported_and_amp_dtype_kept():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    x = torch.randn(8, 4)
    with batch_stat_noise(net, 0.3, kind="var"):
        y = net(x)
    assert y.shape == (8, 5)
    bn = nn.BatchNorm2d(3)
    with batch_stat_noise(bn, 0.3, kind="mean"):
        assert bn(batch().to(torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# mix-dataset attack


def test_shifted_digits_invert_background():
    mix = mixed_digits("test", shift="invert")
    base, shifted = mix.datasets
    x, y = base[0]
    xs, ys = shifted[0]
    assert y == ys
    mean, std = base.mean[0], base.std[0]
    torch.testing.assert_close(xs * std + mean, 1.0 - (x * std + mean), atol=1e-5, rtol=0)
    assert xs.mean() > x.mean()  # bright background now


def test_mixed_dataset_labels_and_sources():
    mix = mixed_digits("test", shift="color")
    n = len(mix.datasets[0])
    assert len(mix) == 2 * n and mix.num_classes == 10 and mix.label_mode == "shared"
    assert mix.sources.tolist() == [0] * n + [1] * n
    assert mix[n][1] == mix.datasets[1][0][1]
    assert len(mix.source_subset("digits-color")) == n
    a = mix.datasets[0]
    offset = MixedDataset(a, ShiftedDataset(a, "contrast"), label_mode="offset")
    assert offset.num_classes == 20 and offset[n][1] == a[0][1] + 10 and len(offset.classes) == 20
    part = MixedDataset(a, ShiftedDataset(a, "invert"), proportion=0.25)
    share = float(part.sources.float().mean())
    assert abs(share - 0.25) < 0.01 and int((part.sources == 0).sum()) == n
    with pytest.raises(ValueError, match=r"shift='blur'.*allowed"):
        ShiftedDataset(a, "blur")
    with pytest.raises(ValueError, match=r"label_mode='union'.*allowed"):
        MixedDataset(a, a, label_mode="union", names=("x", "y"))
    with pytest.raises(ValueError, match=r"proportion=1.5"):
        MixedDataset(a, a, proportion=1.5, names=("x", "y"))
    with pytest.raises(ValueError, match=r"source='nope'"):
        mix.source_subset("nope")


def test_per_source_accuracy():
    mix = mixed_digits("test", shift="invert")

    class Oracle(nn.Module):  # right on bright-background (inverted) images only, in dataset order
        def forward(self, x):
            bright = x[:, 0, 0, 0] > 0
            labels = torch.tensor([mix[i][1] for i in range(len(mix))])
            self.calls = getattr(self, "calls", 0)
            out = torch.zeros(x.shape[0], 10)
            start = self.calls * 256
            self.calls += 1
            out[torch.arange(x.shape[0]), labels[start:start + x.shape[0]]] = bright.float()
            out[~bright, (labels[start:start + x.shape[0]][~bright] + 1) % 10] = 1.0
            return out

    acc = per_source_accuracy(Oracle(), mix, batch_size=256)
    assert acc["digits"] == 0.0 and acc["digits-invert"] == 1.0 and math.isclose(acc["all"], 0.5)


def test_source_batch_sampler_single_source_batches():
    from workbench.data.mixed import SourceBatchSampler

    sources = torch.tensor([0] * 10 + [1] * 7)
    sampler = SourceBatchSampler(sources, 3, seed=1)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 3 + 2
    assert all(len(set(sources[b].tolist())) == 1 and len(b) == 3 for b in first)
    assert first != second  # each pass reshuffles
    assert first == list(SourceBatchSampler(sources, 3, seed=1))  # reproducible
    with pytest.raises(ValueError, match="batch_size=0"):
        SourceBatchSampler(sources, 0)
