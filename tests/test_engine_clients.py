"""The Unity (C#, compiled with mono) and Godot (GDScript, headless Godot 3) bridge clients against a live server
(the tiny model v1, which sends no lip-sync timings; tests/test_server_model_v2.py runs them on model v2 with
lip sync)."""

from __future__ import annotations

import shutil

import pytest
from conftest import UNITY, mcs, result_fields

from npc_server.engine import Engine
from npc_server.personas import PersonaStore
from npc_server.service.api import Limits
from npc_server.service.bridge import start_bridge
from npc_server.service.core import NpcService
from npc_server.tiny import capped_personas

TOKEN = "engine-token"
NPC, CANCEL_NPC = "innkeeper", "quest_giver"
pytestmark = pytest.mark.usefixtures("no_handler_crashes")


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    personas = capped_personas(tmp_path_factory.mktemp("engine_personas"), long_npc=CANCEL_NPC)
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(personas),
                         Limits(max_audio_seconds=10), auth_token=TOKEN)
    bridge, port = start_bridge(service, "127.0.0.1", 0)
    yield {"url": f"ws://127.0.0.1:{port}", "port": port}
    bridge.stop()
    service.shutdown()


def test_unity_client_core_with_mono(live, question_wav, unity_console):
    code, out = unity_console(live["url"], TOKEN, str(question_wav), NPC, CANCEL_NPC)
    assert code == 0, out
    fields = result_fields(out)
    assert fields["audio_seconds"] > 0 and fields["subtitle_chars"] > 0
    assert fields["cancelled_seconds"] < 8  # cancelled well before the 8 s cap
    assert fields["visemes"] == 0  # not asked for


def test_unity_client_refuses_a_wrong_wav(live, tmp_path, unity_console):
    """The console program fails loudly (exit 1, FAIL line) rather than passing on bad input."""
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"not a wav file at all")
    code, out = unity_console(live["url"], TOKEN, str(bogus), NPC, CANCEL_NPC, timeout=60)
    assert code == 1 and "FAIL" in out and "not a RIFF/WAVE file" in out


def test_unity_monobehaviour_compiles_against_stub(tmp_path):
    if not shutil.which("mcs"):
        pytest.skip("mono is not installed (apt-get install mono-mcs mono-runtime; scripts/setup.sh)")
    sources = sorted((UNITY / "Runtime").glob("*.cs")) + [UNITY / "Tests" / "UnityEngineStub.cs"]
    mcs(tmp_path / "NpcVoice.dll", sources, library=True)


def godot_env(live, wav, npc=NPC, cancel_npc=CANCEL_NPC, lip_sync=False) -> dict:
    return {"NPC_VOICE_URL": live["url"], "NPC_VOICE_TOKEN": TOKEN, "NPC_VOICE_WAV": str(wav), "NPC_VOICE_NPC": npc,
            "NPC_VOICE_CANCEL_NPC": cancel_npc, "NPC_VOICE_LIP_SYNC": "1" if lip_sync else "0"}


def test_godot_client_headless(live, question_wav, godot_project):
    code, out = godot_project(godot_env(live, question_wav))
    assert code == 0, out
    assert "SCRIPT ERROR" not in out, out
    fields = result_fields(out)
    assert fields["audio_seconds"] > 0 and fields["subtitle_chars"] > 0
    # every resampled frame went through AudioStreamGeneratorPlayback.push_buffer (the dummy driver mixes)
    assert fields["frames_pushed"] == fields["frames_queued"] > 0
    assert fields["frames_queued"] == pytest.approx(fields["audio_seconds"] * fields["mix_rate"], abs=4)
    assert fields["played"] == 1 and fields["cancelled_seconds"] < 8 and fields["visemes"] == 0


def test_godot_client_reports_failure(live, tmp_path, godot_project):
    """A bad wav makes the GDScript test fail with exit code 1 (the harness can fail)."""
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"nothing here")
    code, out = godot_project(godot_env(live, bogus, cancel_npc=NPC), timeout=60)
    assert code == 1 and "FAIL" in out and "not a RIFF/WAVE file" in out
