"""Shared fixtures: real small speech from espeak-ng and a tiny randomly initialised model folder for serving tests."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from npc_server.tiny import build_tiny_model, capped_personas  # noqa: F401 (re-exported for tests)


def espeak_wav(path: Path, text: str, voice: str = "en-us") -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def question_wav(tmp_path_factory) -> Path:
    """A real spoken question (espeak-ng, 22.05 kHz)."""
    return espeak_wav(tmp_path_factory.mktemp("q") / "question.wav", "How much is a room for the night?")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture()
def no_handler_crashes(caplog):
    """Fail a live-server test that left a crashed connection handler or request behind (logged, not raised)."""
    yield
    crashes = [r for r in caplog.get_records("call") + caplog.records
               if r.levelno >= logging.ERROR and r.name.startswith(("websockets", "npc_server", "grpc"))]
    assert not crashes, [f"{r.name}: {r.getMessage()} {r.exc_info}" for r in crashes]
