"""Time to first audio through the WebSocket bridge vs gRPC on the same `npc-server serve` process (p50/p95).

Run from the repository root:
    python -m benchmarks.bridge_vs_grpc --tiny -n 30          # a tiny untrained model: shows transport overhead
    python -m benchmarks.bridge_vs_grpc --model-dir models/default -n 30
    python -m benchmarks.bridge_vs_grpc --grpc 127.0.0.1:50051 --bridge ws://127.0.0.1:8765 --token T   # a running server

Each request sends the same recorded question (wav) and measures, on the client, the time from the end of the
question (gRPC: the request stream is half-closed; bridge: `end_audio` is sent) to the first audio chunk received.
The server's own `time_to_first_audio_ms` (from the end message) is subtracted to get the transport overhead.
Requests alternate between the two transports so both see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import msgpack
import numpy as np
from tqdm import tqdm
from websockets.sync.client import connect

from npc_server.paths import DEFAULT_MODEL_DIR
from npc_server.service.protos import pb, rpc
from npc_server.tiny import capped_personas

CHUNK = 16 * 1024


def grpc_once(stub, token: str, npc: str, wav: bytes) -> tuple[float, float]:
    """One question over gRPC: (client ms from end of question to first audio, server time_to_first_audio_ms)."""
    marks: dict[str, float] = {}

    def requests():
        yield pb.SpeakRequest(config=pb.SpeakConfig(npc_id=npc, input_format=pb.AudioFormat(encoding=pb.WAV)))
        for i in range(0, len(wav), CHUNK):
            yield pb.SpeakRequest(audio=wav[i:i + CHUNK])
        marks["end"] = time.perf_counter()  # grpc asks for the next message: the stream is half-closed now

    first, server_ttfa = None, None
    for msg in stub.Speak(requests(), metadata=[("authorization", f"Bearer {token}")], timeout=120):
        kind = msg.WhichOneof("kind")
        if kind == "audio" and first is None:
            first = time.perf_counter()
        elif kind == "end":
            server_ttfa = msg.end.timings.time_to_first_audio_ms
    if first is None:
        raise RuntimeError("gRPC answer had no audio")
    return (first - marks["end"]) * 1000, server_ttfa


def bridge_once(ws, req_id: int, npc: str, wav: bytes) -> tuple[float, float]:
    """One question over the bridge: (client ms from end_audio to first audio frame, server time_to_first_audio_ms)."""
    ws.send(msgpack.packb({"type": "speak", "id": req_id, "config": {"npc_id": npc, "encoding": "wav"}}))
    for i in range(0, len(wav), CHUNK):
        ws.send(msgpack.packb({"type": "audio", "id": req_id, "data": wav[i:i + CHUNK]}))
    ws.send(msgpack.packb({"type": "end_audio", "id": req_id}))
    t_end = time.perf_counter()
    first = None
    while True:
        f = msgpack.unpackb(ws.recv(120), raw=False)
        if f["type"] == "audio" and first is None:
            first = time.perf_counter()
        elif f["type"] == "error":
            raise RuntimeError(f"bridge error {f['code']}: {f['message']}")
        elif f["type"] == "end":
            if first is None:
                raise RuntimeError("bridge answer had no audio")
            return (first - t_end) * 1000, f["timings"]["time_to_first_audio_ms"]


def start_server(model_dir: Path, personas: Path, token: str, workdir: Path, threads: int | None):
    ready = workdir / "ready"
    cmd = [sys.executable, "-m", "npc_server.cli", "serve", "--port", "0", "--bridge-port", "0",
           "--model-dir", str(model_dir), "--personas", str(personas), "--ready-file", str(ready), "--token", token]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start; see {workdir / 'server.log'}")
        time.sleep(0.1)
    grpc_port, bridge_port = ready.read_text().split()
    return proc, f"127.0.0.1:{grpc_port}", f"ws://127.0.0.1:{bridge_port}"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20, help="requests per transport (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests per transport first")
    ap.add_argument("--npc", default="innkeeper")
    ap.add_argument("--question", help="a wav file (default: 'How much is a room for the night?' by espeak-ng)")
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="model to serve (default: embedded)")
    ap.add_argument("--tiny", action="store_true", help="serve a tiny untrained model (shows transport overhead only)")
    ap.add_argument("--max-answer-seconds", type=int, default=1, help="cap the personas' answers (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--grpc", help="host:port of a running server (with --bridge): do not start one")
    ap.add_argument("--bridge", help="ws://host:port of the running server's bridge")
    ap.add_argument("--token", default=os.environ.get("NPC_VOICE_TOKEN", "bench-token"))
    args = ap.parse_args(argv)
    if bool(args.grpc) != bool(args.bridge):
        ap.error("--grpc and --bridge go together")

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bridge_bench_")))
        if args.question:
            wav = Path(args.question).read_bytes()
        else:
            q = work / "question.wav"
            subprocess.run(["espeak-ng", "-w", str(q), "How much is a room for the night?"], check=True)
            wav = q.read_bytes()
        if args.grpc:
            target, url = args.grpc, args.bridge
        else:
            model_dir = Path(args.model_dir)
            if args.tiny:
                from npc_server.tiny import build_tiny_model

                model_dir = build_tiny_model(work / "tiny")
            (work / "personas").mkdir()
            personas = capped_personas(work / "personas", args.max_answer_seconds)
            proc, target, url = start_server(model_dir, personas, args.token, work, args.threads)
            stack.callback(proc.wait, 30)
            stack.callback(proc.terminate)
        channel = stack.enter_context(grpc.insecure_channel(target))
        stub = rpc.NpcVoiceStub(channel)
        ws = stack.enter_context(connect(url, max_size=8 << 20))
        ws.send(msgpack.packb({"type": "hello", "version": 1, "token": args.token, "client_id": "bench"}))
        welcome = msgpack.unpackb(ws.recv(30), raw=False)
        if welcome.get("type") != "welcome":
            raise SystemExit(f"bridge refused: {welcome}")

        results: dict[str, list[tuple[float, float]]] = {"gRPC": [], "bridge": []}
        req_id = 0
        for i in tqdm(range(args.warmup + args.n), desc="requests (gRPC + bridge)"):
            req_id += 1
            g = grpc_once(stub, args.token, args.npc, wav)
            b = bridge_once(ws, req_id, args.npc, wav)
            if i >= args.warmup:
                results["gRPC"].append(g)
                results["bridge"].append(b)

    print(f"\ntime to first audio after the end of the question, {args.n} requests each, model {welcome['model']!r}")
    print("| transport | client p50 ms | client p95 ms | server p50 ms | overhead p50 ms | overhead p95 ms |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        client = [c for c, _ in rows]
        server = [s for _, s in rows]
        over = [c - s for c, s in rows]
        print(f"| {name} | {pct(client, 50):.1f} | {pct(client, 95):.1f} | {pct(server, 50):.1f} | "
              f"{pct(over, 50):.1f} | {pct(over, 95):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
