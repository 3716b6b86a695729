"""Training precision: `auto` picks bf16 autocast where the CPU has native bf16 (flags, else a timing)."""

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


def test_cpu_flags_decide_before_any_timing(tmp_path):
    native = tmp_path / "native"
    native.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx512_vnni\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert precision.native_bf16(str(native)) is True
    assert precision.native_bf16(str(avx2)) is False
    assert precision.native_bf16(str(tmp_path / "missing")) is None
    (tmp_path / "noflags").write_text("model name : something\n")
    assert precision.native_bf16(str(tmp_path / "noflags")) is None
