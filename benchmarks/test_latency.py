"""pytest-benchmark suites of the answer path stages on the embedded default model (run: pytest benchmarks/)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR

MODEL_DIR = Path(os.environ.get("NPC_BENCH_MODEL_DIR", DEFAULT_MODEL_DIR))
if not all((MODEL_DIR / c / "config.json").exists() for c in ("tokenizer", "backbone", "vocoder")):
    pytest.skip(f"no trained model in {MODEL_DIR} (set NPC_BENCH_MODEL_DIR)", allow_module_level=True)


@pytest.fixture(scope="module")
def engine():
    from npc_server.engine import Engine

    return Engine.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def persona():
    from npc_server.personas import load_persona

    return load_persona(DEFAULT_PERSONAS_DIR / "innkeeper.yaml")


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    from npc_server.bench import make_questions
    from npc_server.audio import load_audio

    return load_audio(make_questions(tmp_path_factory.mktemp("q"))[0], target_sr=16000)[0]


def test_tokenizer_encode_3s(benchmark, engine, question):
    benchmark(engine.tokenizer.encode, question, 16000)


def test_prefill_question(benchmark, engine, persona, question):
    from npc_server.backbone.template import UserTurn

    ids = engine.tokenizer.encode(question, 16000).interleaved

    def run():
        state = engine.new_state(persona)
        engine.generator.prefill(state.session, engine.generator.template.user(UserTurn(audio=ids)).ids)

    benchmark(run)


def test_time_to_first_audio(benchmark, engine, persona, question):
    from npc_server.engine import EngineAudio

    controls = engine.system_prompt(persona).controls

    def first_audio():
        state = engine.new_state(persona)
        it = engine.answer(state, persona, controls, audio=question)
        for ev in it:
            if isinstance(ev, EngineAudio):
                it.close()
                return ev

    benchmark(first_audio)


def test_vocoder_1s(benchmark, engine):
    codes = np.random.default_rng(0).integers(0, 4096, 25)
    benchmark(engine.vocoder.decode, codes, "joe", 0.0)
