"""Training precision: `auto` picks bf16 autocast only where it measured faster on this CPU."""

from __future__ import annotations

import pytest

from npc_server.training import precision


def test_explicit_choices_pass_through():
    assert precision.resolve("fp32") == "fp32"
    assert precision.resolve("bf16") == "bf16"


def test_auto_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(precision, "bf16_is_faster", lambda: False)
    assert precision.resolve("auto") == "fp32"
    monkeypatch.setattr(precision, "bf16_is_faster", lambda: True)
    assert precision.resolve("auto") == "bf16"


def test_the_measurement_runs_and_is_cached():
    first = precision.bf16_is_faster()
    assert isinstance(first, bool) and precision.bf16_is_faster() is first


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("fp8")
