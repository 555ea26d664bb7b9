"""Sparsity callbacks (Network Slimming L1, CAP's CAGM + CAGS), IEBN mean attention, scale recorder."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.segmentation import SEGMENTATION_MODELS
from workbench.probes import BNScaleProbe
from workbench.pruning import (
    BNScaleSparsity,
    CAGSSparsity,
    attach_cagms,
    compute_guidance,
    default_lambda,
    iebn_mean_attention,
    sparsity_fraction,
)


def psp(norm: str = "bn") -> nn.Module:
    torch.manual_seed(0)
    return SEGMENTATION_MODELS["pspnet_resnet18"](11, width=0.125, norm=norm)


def backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    out = model(x)
    target = torch.randint(0, 11, (x.shape[0], *x.shape[-2:]), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target)
    loss.backward()


def state_for(model: nn.Module, x: torch.Tensor, epoch: int = 0, step: int = 0):
    return types.SimpleNamespace(model=model, inputs=x, epoch=epoch, step=step, logs={})


def bn_weight_names(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("norm", ["bn", "iebn"])
def test_l1_callback_adds_sign_to_bn_scales_only(norm: str) -> None:
    model = psp(norm).train()
    x = torch.randn(2, 3, 32, 32)
    backward(model, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    cb = BNScaleSparsity(lam=1e-2)
    state = state_for(model, x)
    cb.on_after_backward(state)
    scales = bn_weight_names(model)
    for n, p in model.named_parameters():
        if n in scales:
            assert torch.allclose(p.grad - grads[n], 1e-2 * torch.sign(p.detach())), n
        else:
            assert torch.equal(p.grad, grads[n]), f"{n} gradient changed"
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers()), "tracing moved a buffer"
    assert all(m.training for m in model.modules())
    assert state.logs["sparsity_lambda"] == pytest.approx(1e-2)


def test_l1_schedule_and_warmup() -> None:
    cb = BNScaleSparsity(lam=1e-3, warmup_steps=10, schedule=lambda epoch, step: 0.5 if epoch else 1.0)
    assert cb.current_lambda(0, 0) == pytest.approx(1e-4)
    assert cb.current_lambda(0, 9) == pytest.approx(1e-3)
    assert cb.current_lambda(1, 50) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lam"):
        BNScaleSparsity(lam=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        BNScaleSparsity(warmup_steps=-1)
    assert default_lambda("segnet") == 1e-4 and default_lambda("pspnet_resnet50") == 1e-5


def test_l1_moves_scales_toward_zero_in_fit() -> None:
    from workbench.train import fit

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 11, (8, 32, 32))
    loader = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4)]
    plain, sparse = psp(), psp()
    opt = dict(epochs=3, task="segmentation", progress=False, device="cpu")
    fit(plain, loader, optimizer=torch.optim.SGD(plain.parameters(), lr=0.05), **opt)
    fit(sparse, loader, optimizer=torch.optim.SGD(sparse.parameters(), lr=0.05),
        callbacks=[BNScaleSparsity(lam=0.5)], **opt)

    def mean_scale(m):
        return torch.cat([b.weight.detach().abs() for b in m.modules() if isinstance(b, nn.BatchNorm2d)]).mean()

    # six steps of lr * lam = 0.025 each: about 0.15 off every scale on top of the loss gradient
    assert mean_scale(sparse) < mean_scale(plain) - 0.1
    # other parameters follow the same loss (same seed, same data): still close to the plain run
    conv_gap = (sparse.head[0][0].weight - plain.head[0][0].weight).abs().max()
    assert conv_gap < 0.05


def test_cagm_has_no_forward_effect_and_is_removed() -> None:
    model = psp().train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with attach_cagms(model) as cagms:
        assert len(cagms.modules) == 8  # PSPNet: four backbone stages + four pyramid branches
        torch.manual_seed(1)  # same dropout masks for both
        out = model(x)
        torch.manual_seed(1)
        ref = twin(x)
        assert torch.equal(out["out"], ref["out"]) and torch.equal(out["aux"], ref["aux"])
        guidance = cagms.guidance()
    assert not any(m._forward_hooks for m in model.modules())
    for g in guidance.values():
        assert ((g > 0) & (g < 1)).all() and abs(float(g.mean()) - 0.5) < 0.1
    with pytest.raises(RuntimeError), attach_cagms(model):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


def test_cagm_ema_and_eval_mode() -> None:
    model = psp().train()
    with attach_cagms(model, sites=["ppm.branches.3.2"], momentum=0.25) as cagms:
        cagm = cagms.modules["ppm.branches.3.2"]
        seen = []

        def record(module, args, out):
            feat = F.relu(out.detach()).flatten(2)
            a = torch.softmax(feat @ feat.transpose(1, 2) / feat.shape[-1] ** 0.5, -1).mean(1)
            seen.append(torch.sigmoid((a - a.mean(-1, keepdim=True)) / (a.std(-1, keepdim=True) + 1e-6)).mean(0))

        handle = cagm.bn.register_forward_hook(record)
        model(torch.randn(2, 3, 32, 32))
        model(torch.randn(2, 3, 32, 32))
        handle.remove()
        assert torch.allclose(cagm.guidance, 0.75 * seen[0] + 0.25 * seen[1], atol=1e-6)
        model.eval()
        before = cagm.guidance.clone()
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert torch.equal(cagm.guidance, before) and cagm.updates == 2


def test_cagm_options_and_bad_values() -> None:
    model = psp()
    with attach_cagms(model, affinity="cosine", reduction="rowmean_sigmoid") as cagms:
        model.train()(torch.randn(2, 3, 32, 32))
        assert all(((g > 0) & (g < 1)).all() for g in cagms.guidance().values())
    custom = attach_cagms(model, sites=["backbone.bn1"], affinity=lambda f: f @ f.transpose(1, 2),
                          reduction=lambda a: torch.sigmoid(a.diagonal(dim1=1, dim2=2)))
    model(torch.randn(2, 3, 32, 32))
    custom.remove()
    with pytest.raises(ValueError, match="affinity"):
        attach_cagms(model, affinity="dot")
    with pytest.raises(ValueError, match="reduction"):
        CAGSSparsity(reduction="max")
    with pytest.raises(ValueError, match="sites"):
        attach_cagms(model, sites=["backbone.conv1"])
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("other_bns", ["l1", "none"])
def test_cags_weighted_subgradient(other_bns: str) -> None:
    model = psp().train()
    x = torch.randn(2, 3, 32, 32)
    cb = CAGSSparsity(lam=1e-2, other_bns=other_bns)
    state = state_for(model, x)
    cb.on_fit_start(state)
    backward(model, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = cb.weights()
    cb.on_after_backward(state)
    named = dict(model.named_modules())
    for n, p in model.named_parameters():
        layer = n.rsplit(".", 1)[0]
        delta = p.grad - grads[n]
        if n.endswith(".weight") and layer in weights:
            assert torch.allclose(delta, 1e-2 * weights[layer] * torch.sign(p.detach()), atol=1e-8)
            assert not torch.allclose(weights[layer], torch.ones_like(weights[layer]))
        elif n.endswith(".weight") and isinstance(named[layer], nn.BatchNorm2d) and other_bns == "l1":
            assert torch.allclose(delta, 1e-2 * torch.sign(p.detach()))
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), n
    cb.on_fit_end(state)
    assert not any(m._forward_hooks for m in model.modules())
    assert set(cb.guidance()) == set(model.cagm_sites())  # kept after removal, for prune(method="cap")


def test_cags_state_dict_roundtrip_before_attach() -> None:
    model = psp().train()
    cb = CAGSSparsity(lam=1e-3)
    cb.attach(model)
    model(torch.randn(2, 3, 32, 32))
    saved = cb.state_dict()
    cb.remove()
    fresh = CAGSSparsity(lam=1e-3)
    fresh.load_state_dict(saved)  # fit() restores callbacks before on_fit_start
    fresh.on_fit_start(state_for(model, None))
    for name, g in saved["guidance"].items():
        assert torch.equal(fresh.guidance()[name], g)
    fresh.remove()


def test_compute_guidance_restores_model() -> None:
    model = psp().train()
    guidance = compute_guidance(model, [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)])
    assert set(guidance) == set(model.cagm_sites())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_iebn_mean_attention_matches_formula() -> None:
    model = psp("iebn")
    x = torch.randn(3, 3, 32, 32)
    stem = model.backbone.bn1
    with torch.no_grad():
        torch.nn.init.normal_(stem.attn_weight)
    attention = iebn_mean_attention(model, [(x[:2], None), (x[2:], None)])
    captured = {}
    handle = model.backbone.conv1.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    gap = captured["x"].mean((2, 3))
    expected = torch.sigmoid(stem.attn_weight * gap + stem.attn_bias).mean(0)
    assert torch.allclose(attention["backbone.bn1"], expected, atol=1e-5)
    # untouched layers sit at the initial gate sigmoid(-1)
    layer = attention["backbone.layer1.0.bn1"]
    assert torch.allclose(layer, torch.full_like(layer, float(torch.sigmoid(torch.tensor(-1.0)))))
    assert iebn_mean_attention(psp("bn"), x) == {}


def test_recorder_and_sparsity_fraction() -> None:
    model = psp()
    with torch.no_grad():
        model.backbone.bn1.weight.zero_()
    rec = BNScaleProbe(thresholds=(1e-2,))
    state = state_for(model, None)
    rec.on_fit_start(state)
    state.epoch = 0
    rec.on_epoch_end(state)
    assert [r["epoch"] for r in rec.records] == [0, 1]
    n_total = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    expected = model.backbone.bn1.num_features / n_total
    assert rec.records[0]["fraction_below"][1e-2] == pytest.approx(expected)
    assert sparsity_fraction(model, (1e-2,))[1e-2] == pytest.approx(expected)
    assert len(rec.records[1]["scales"]["backbone.bn1"]) == model.backbone.bn1.num_features
    rec.on_fit_start(state)  # restored records are not measured again
    assert len(rec.records) == 2


def test_bn_scale_probe_epoch_schedule() -> None:
    model = psp()
    rec = BNScaleProbe(thresholds=(1e-2,), every=[2, 3])
    state = state_for(model, None)
    rec.on_fit_start(state)
    for epoch in range(4):
        state.epoch = epoch
        rec.on_epoch_end(state)
    assert [r["epoch"] for r in rec.records] == [0, 2, 3]


def test_proximal_mode_soft_thresholds_after_the_step() -> None:
    model = psp().train()
    x = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        model.backbone.bn1.weight.copy_(torch.linspace(-0.02, 0.02, model.backbone.bn1.num_features))
    backward(model, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = types.SimpleNamespace(model=model, inputs=x, epoch=0, step=0, logs={}, optimizer=optimizer)
    cb = BNScaleSparsity(lam=0.02, mode="proximal")
    cb.on_after_backward(state)  # proximal mode leaves the gradient alone
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb.on_step_end(state)
    for n, p in model.named_parameters():
        if n in bn_weight_names(model):
            expected = torch.sign(before[n]) * (before[n].abs() - 0.01).clamp_min(0)
            assert torch.allclose(p, expected), n
        else:
            assert torch.equal(p, before[n]), n
    stem = model.backbone.bn1.weight
    assert int((stem == 0).sum()) > 0  # |gamma| < lr * lam became exactly zero
    with pytest.raises(ValueError, match="mode"):
        BNScaleSparsity(mode="prox")


def test_cags_proximal_uses_guided_weights() -> None:
    model = psp().train()
    x = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = CAGSSparsity(lam=0.05, mode="proximal", other_bns="none")
    state = types.SimpleNamespace(model=model, inputs=x, epoch=0, step=0, logs={}, optimizer=optimizer)
    cb.on_fit_start(state)
    backward(model, x)
    weights = cb.weights()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    cb.on_step_end(state)
    for n, m in model.named_modules():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        if n in weights:
            expected = torch.sign(before[n]) * (before[n].abs() - 0.1 * 0.05 * weights[n]).clamp_min(0)
            assert torch.allclose(m.weight, expected, atol=1e-7), n
        else:
            assert torch.equal(m.weight, before[n]), n
    cb.remove()


def test_proximal_step_in_adam_metric() -> None:
    model = psp().train()
    x = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backward(model, x)
    optimizer.step()
    bn = model.backbone.bn1
    before = bn.weight.detach().clone()
    state = types.SimpleNamespace(model=model, inputs=x, epoch=0, step=0, logs={}, optimizer=optimizer)
    BNScaleSparsity(lam=1e-4, mode="proximal").on_step_end(state)
    v_hat = optimizer.state[bn.weight]["exp_avg_sq"] / (1 - 0.999)
    amount = 1e-3 * 1e-4 / (v_hat.sqrt() + 1e-8)
    assert torch.allclose(bn.weight, torch.sign(before) * (before.abs() - amount).clamp_min(0), atol=1e-7)
