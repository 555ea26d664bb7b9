import pytest
import torch

from workbench.device import autocast, autocast_dtype, resolve_device, seed_everything


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_bad_spec_names_the_allowed_values(bad):
    with pytest.raises(ValueError, match="allowed"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_seed_everything_reproduces():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_autocast_off_on_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cpu, "off") is None
    with pytest.raises(ValueError, match="needs a CUDA"):
        autocast_dtype(cpu, "bf16")
    with pytest.raises(ValueError, match="allowed"):
        autocast_dtype(cpu, "int8")
    with autocast(cpu, "auto"):
        assert torch.ones(2).dtype == torch.float32


@pytest.mark.gpu
def test_autocast_on_cuda():
    dev = resolve_device("cuda")
    assert autocast_dtype(dev, "bf16") == torch.bfloat16
    with autocast(dev, "fp16"):
        out = torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)
    assert out.dtype == torch.float16
