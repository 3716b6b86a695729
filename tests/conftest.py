"""Shared fixtures: real small speech from espeak-ng and a tiny randomly initialised model folder for serving tests."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest
import torch


def espeak_wav(path: Path, text: str, voice: str = "en-us") -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def question_wav(tmp_path_factory) -> Path:
    """A real spoken question (espeak-ng, 22.05 kHz)."""
    return espeak_wav(tmp_path_factory.mktemp("q") / "question.wav", "How much is a room for the night?")


def build_tiny_model(directory: Path) -> Path:
    """Save a tiny, randomly initialised tokenizer + backbone + vocoder in the layout of models/default.

    The weights are untrained: these models exercise every code path of serving (tokenize, prefill with a KV
    cache, constrained text/audio blocks, streaming vocoder) in milliseconds, not the quality of answers.
    """
    from npc_server.backbone.model import build_model, preset as backbone_preset, save_backbone
    from npc_server.backbone.text_tokenizer import TextTokenizer
    from npc_server.tokenizer import AudioTokenizer, preset as tokenizer_preset
    from npc_server.vocoder import FlowConfig, FlowDecoder, Generator, GeneratorConfig, Vocoder

    torch.manual_seed(0)
    tok = AudioTokenizer(tokenizer_preset("tiny", phones=list("abdefhiklmnoprstuvwz"))).eval()
    tok.save_pretrained(directory / "tokenizer")

    texts = ["Welcome to The Sleepy Otter, traveller!", "A room costs ten gold.", "The smithy is by the river."] * 20
    text_tok = TextTokenizer.train(texts, vocab_size=300, min_frequency=1)
    cfg = backbone_preset("tiny", text_tok.vocab_size)
    save_backbone(build_model(cfg), cfg, directory / "backbone")
    text_tok.save(directory / "backbone")

    flow = FlowDecoder(FlowConfig(dim=32, token_dim=32, n_heads=2, transformer_layers=1, res_blocks=1,
                                  cond_layers=1, attn_window=8, n_steps=2))
    gen = Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))
    with torch.no_grad():  # zero-initialised output layers would make silence; give them small weights
        for p in [*flow.parameters(), *gen.parameters()]:
            if p.dim() > 0 and torch.all(p == 0):
                p.normal_(0, 0.05)
    Vocoder(flow, gen).eval().save_pretrained(directory / "vocoder")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def capped_personas(folder: Path, seconds: int = 1, long_npc: str | None = None, long_seconds: int = 8) -> Path:
    """The shipped personas with answers capped at `seconds` (an untrained model babbles), except `long_npc`."""
    from npc_server.paths import DEFAULT_PERSONAS_DIR

    for f in DEFAULT_PERSONAS_DIR.glob("*.yaml"):
        text = f.read_text()
        cap = long_seconds if long_npc and f"id: {long_npc}" in text else seconds
        (folder / f.name).write_text(re.sub(r"max_answer_seconds: \d+", f"max_answer_seconds: {cap}", text))
    return folder


@pytest.fixture()
def no_handler_crashes(caplog):
    """Fail a live-server test that left a crashed connection handler or request behind (logged, not raised)."""
    yield
    crashes = [r for r in caplog.get_records("call") + caplog.records
               if r.levelno >= logging.ERROR and r.name.startswith(("websockets", "npc_server", "grpc"))]
    assert not crashes, [f"{r.name}: {r.getMessage()} {r.exc_info}" for r in crashes]
