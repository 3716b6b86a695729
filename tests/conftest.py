"""Shared fixtures: real small speech from espeak-ng and a tiny randomly initialised model folder for serving tests."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from npc_server.tiny import build_tiny_model, capped_personas  # noqa: F401 (re-exported for tests)


def espeak_wav(path: Path, text: str, voice: str = "en-us") -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


@contextmanager
def serve_subprocess(tmp: Path, extra_args: list[str], start_timeout: float = 180):
    """`npc-server serve` (the product's main job) as a subprocess on loopback, on a copy of the personas folder:
    yields {"target", "personas", "proc"} once it serves; fails the test with the server's log if it does not start."""
    from npc_server.paths import DEFAULT_PERSONAS_DIR

    personas = tmp / "personas"
    shutil.copytree(DEFAULT_PERSONAS_DIR, personas)
    ready = tmp / "ready"
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "npc_server.cli", "serve", "--port", "0", "--bridge-port", "-1", "--insecure-loopback",
         "--personas", str(personas), "--ready-file", str(ready), "--threads", "2", *extra_args],  # later flags win
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + start_timeout
        while not ready.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if not ready.exists():
            log.seek(0)
            pytest.fail(f"server did not start:\n{log.read()}")
        grpc_port, bridge_port = ready.read_text().split()[:2]
        yield {"target": f"127.0.0.1:{grpc_port}", "bridge_port": int(bridge_port), "personas": personas,
               "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def serve():
    """`serve_subprocess`, for module-scoped server fixtures."""
    return serve_subprocess


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


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory) -> tuple[Path, Path]:
    """(certificate, private key) PEM files of a self-signed certificate for localhost / 127.0.0.1.

    Made with the `cryptography` package when it is installed, else the `openssl` command; skipped without both."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        _cert_with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def _cert_with_cryptography(cert: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


# ---- the engine clients (Unity C# under mono, Godot 3 headless), run against a live bridge ---------------------
ROOT = Path(__file__).resolve().parents[1]
UNITY = ROOT / "unity_bridge" / "Unity"
GODOT = ROOT / "unity_bridge" / "Godot"
UNITY_CORE = [UNITY / "Runtime" / f for f in ("MiniMsgPack.cs", "PcmRingBuffer.cs", "LipSync.cs", "NpcVoiceClient.cs")]
GODOT_BIN = shutil.which("godot3-server") or shutil.which("godot-server")


def mcs(out: Path, sources: list[Path], library: bool = False) -> None:
    """Compile C# with mono's mcs (warnings are errors)."""
    cmd = ["mcs", "-warnaserror+", "-nowarn:1998", f"-out:{out}", "-r:System.Core.dll"]
    if library:
        cmd.append("-target:library")
    r = subprocess.run(cmd + [str(s) for s in sources], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="session")
def unity_console(tmp_path_factory):
    """Runs the Unity client's console test (Tests/ConsoleTest.cs, compiled once) -> (exit code, output)."""
    if not (shutil.which("mcs") and shutil.which("mono")):
        pytest.skip("mono is not installed (apt-get install mono-mcs mono-runtime; scripts/setup.sh)")
    exe = tmp_path_factory.mktemp("mono") / "ConsoleTest.exe"
    mcs(exe, UNITY_CORE + [UNITY / "Tests" / "ConsoleTest.cs"])

    def run(*args: str, timeout: float = 120) -> tuple[int, str]:
        r = subprocess.run(["mono", str(exe), *args], capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr

    return run


@pytest.fixture()
def godot_project(tmp_path):
    """Runs the Godot client's headless test project with the given environment -> (exit code, output)."""
    if GODOT_BIN is None:
        pytest.skip("headless Godot 3 is not installed (apt-get install godot3-server; scripts/setup.sh)")
    project = tmp_path / "project"
    shutil.copytree(GODOT / "test_project", project)
    shutil.copytree(GODOT / "addons", project / "addons")
    (tmp_path / "home").mkdir()

    def run(env: dict, timeout: float = 150) -> tuple[int, str]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "en_US.UTF-8", **env}
        r = subprocess.run([GODOT_BIN, "--path", str(project)], env=env, capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, r.stdout + r.stderr

    return run


def result_fields(output: str) -> dict[str, float]:
    """The `RESULT ok k=v ...` line of an engine client test as numbers."""
    line = next(ln for ln in output.splitlines() if ln.startswith("RESULT ok"))
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[2:])}
