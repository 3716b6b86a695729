"""The Unity (C#, compiled with mono) and Godot (GDScript, headless Godot 3) bridge clients against a live server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from npc_server.engine import Engine
from npc_server.personas import PersonaStore
from npc_server.service.api import Limits
from npc_server.service.bridge import start_bridge
from npc_server.service.core import NpcService

from npc_server.tiny import capped_personas

TOKEN = "engine-token"
NPC, CANCEL_NPC = "innkeeper", "quest_giver"
ROOT = Path(__file__).resolve().parents[1]
UNITY = ROOT / "unity_bridge" / "Unity"
GODOT = ROOT / "unity_bridge" / "Godot"
pytestmark = pytest.mark.usefixtures("no_handler_crashes")
CORE = [UNITY / "Runtime" / f for f in ("MiniMsgPack.cs", "PcmRingBuffer.cs", "NpcVoiceClient.cs")]

needs_mono = pytest.mark.skipif(not (shutil.which("mcs") and shutil.which("mono")),
                                reason="mono is not installed (apt-get install mono-mcs mono-runtime; scripts/setup.sh)")
GODOT_BIN = shutil.which("godot3-server") or shutil.which("godot-server")
needs_godot = pytest.mark.skipif(GODOT_BIN is None,
                                 reason="headless Godot 3 is not installed (apt-get install godot3-server; scripts/setup.sh)")


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    personas = capped_personas(tmp_path_factory.mktemp("engine_personas"), long_npc=CANCEL_NPC)
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(personas),
                         Limits(max_audio_seconds=10), auth_token=TOKEN)
    bridge, port = start_bridge(service, "127.0.0.1", 0)
    yield {"url": f"ws://127.0.0.1:{port}", "port": port}
    bridge.stop()
    service.shutdown()


def mcs(out: Path, sources: list[Path], library: bool = False) -> None:
    cmd = ["mcs", "-warnaserror+", "-nowarn:1998", f"-out:{out}", "-r:System.Core.dll"]
    if library:
        cmd.append("-target:library")
    r = subprocess.run(cmd + [str(s) for s in sources], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def console_exe(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("mono") / "ConsoleTest.exe"
    mcs(exe, CORE + [UNITY / "Tests" / "ConsoleTest.cs"])
    return exe


@needs_mono
def test_unity_client_core_with_mono(live, question_wav, console_exe):
    exe = console_exe
    r = subprocess.run(["mono", str(exe), live["url"], TOKEN, str(question_wav), NPC, CANCEL_NPC],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT ok"))
    fields = dict(kv.split("=") for kv in line.split()[2:])
    assert float(fields["audio_seconds"]) > 0 and int(fields["subtitle_chars"]) > 0
    assert float(fields["cancelled_seconds"]) < 8  # cancelled well before the 8 s cap


@needs_mono
def test_unity_client_refuses_a_wrong_wav(live, tmp_path, console_exe):
    """The console program fails loudly (exit 1, FAIL line) rather than passing on bad input."""
    exe = console_exe
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"not a wav file at all")
    r = subprocess.run(["mono", str(exe), live["url"], TOKEN, str(bogus), NPC, CANCEL_NPC],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAIL" in r.stdout and "not a RIFF/WAVE file" in r.stdout


@needs_mono
def test_unity_monobehaviour_compiles_against_stub(tmp_path):
    sources = sorted((UNITY / "Runtime").glob("*.cs")) + [UNITY / "Tests" / "UnityEngineStub.cs"]
    mcs(tmp_path / "NpcVoice.dll", sources, library=True)


@needs_godot
def test_godot_client_headless(live, question_wav, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(GODOT / "test_project", project)
    shutil.copytree(GODOT / "addons", project / "addons")
    (tmp_path / "home").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "en_US.UTF-8",
           "NPC_VOICE_URL": live["url"], "NPC_VOICE_TOKEN": TOKEN, "NPC_VOICE_WAV": str(question_wav),
           "NPC_VOICE_NPC": NPC, "NPC_VOICE_CANCEL_NPC": CANCEL_NPC}
    r = subprocess.run([GODOT_BIN, "--path", str(project)], env=env, capture_output=True, text=True, timeout=150)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SCRIPT ERROR" not in out, out
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT ok"))
    fields = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[2:])}
    assert fields["audio_seconds"] > 0 and fields["subtitle_chars"] > 0
    # every resampled frame went through AudioStreamGeneratorPlayback.push_buffer (the dummy driver mixes)
    assert fields["frames_pushed"] == fields["frames_queued"] > 0
    assert fields["frames_queued"] == pytest.approx(fields["audio_seconds"] * fields["mix_rate"], abs=4)
    assert fields["played"] == 1 and fields["cancelled_seconds"] < 8


@needs_godot
def test_godot_client_reports_failure(live, tmp_path):
    """A bad wav makes the GDScript test fail with exit code 1 (the harness can fail)."""
    project = tmp_path / "project"
    shutil.copytree(GODOT / "test_project", project)
    shutil.copytree(GODOT / "addons", project / "addons")
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"nothing here")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "en_US.UTF-8", "NPC_VOICE_URL": live["url"],
           "NPC_VOICE_TOKEN": TOKEN, "NPC_VOICE_WAV": str(bogus), "NPC_VOICE_NPC": NPC, "NPC_VOICE_CANCEL_NPC": NPC}
    r = subprocess.run([GODOT_BIN, "--path", str(project)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAIL" in r.stdout and "not a RIFF/WAVE file" in r.stdout
