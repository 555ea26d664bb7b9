"""Quickstart recipe: the defaults follow the norm, explicit choices win, bad values are refused up front."""

import pytest

from workbench.experiments import quickstart


@pytest.mark.parametrize("norm, optimizer, lr, clip", [("bn", "sgd", 0.1, 0.0), ("iebn", "sgd", 0.1, 0.0),
                                                       ("none", "adamw", 0.002, 1.0)])
def test_defaults_follow_the_norm(norm, optimizer, lr, clip):
    params = quickstart.resolve(dict(preset="quick", norm=norm, optimizer=None, lr=None, grad_clip=None,
                                     epochs=None))
    assert (params["optimizer"], params["lr"], params["grad_clip"], params["epochs"]) == (
        optimizer, lr, clip, quickstart.PRESETS["quick"]["epochs"])


def test_explicit_choices_win():
    params = quickstart.resolve(dict(preset="quick", norm="none", optimizer="sgd", lr=None, grad_clip=0.0))
    assert (params["optimizer"], params["lr"], params["grad_clip"]) == ("sgd", 0.1, 0.0)


@pytest.mark.parametrize("key, value", [("optimizer", "adam"), ("grad_clip", -1.0), ("norm", "layer")])
def test_bad_values_name_the_parameter(key, value):
    with pytest.raises(ValueError, match=key):
        quickstart.resolve({"preset": "quick", key: value})
    if key == "optimizer":
        with pytest.raises(ValueError, match="optimizer='adam'.*sgd"):
            quickstart.run_quickstart(optimizer="adam", epochs=1)
