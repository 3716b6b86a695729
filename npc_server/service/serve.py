"""`npc-server serve`: load the model and personas, then serve gRPC and the WebSocket bridge until stopped."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading

from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR
from npc_server.service.api import Limits

log = logging.getLogger("npc_server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="npc-server serve", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    ap.add_argument("--bridge-port", type=int, default=8765, help="WebSocket bridge port (default 8765; -1 = off)")
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="trained model folder (default: embedded)")
    ap.add_argument("--personas", default=str(DEFAULT_PERSONAS_DIR), help="persona YAML folder (hot reloaded)")
    ap.add_argument("--token", default=os.environ.get("NPC_VOICE_TOKEN"),
                    help="shared auth token clients must send (default: $NPC_VOICE_TOKEN)")
    ap.add_argument("--insecure-loopback", action="store_true",
                    help="allow running without a token; only when binding a loopback address (development)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per operation (default 1: the model's ops are too small to split; "
                         "the cores are used by concurrent answers instead)")
    ap.add_argument("--workers", type=int, default=4,
                    help="answer threads (default 4); with more than one, concurrent answers share each decode step "
                         "(batched) and vocode in parallel")
    ap.add_argument("--device", default="cpu",
                    help="where the backbone runs (default cpu; cuda uses flash-attn when the gpu extra is installed)")
    ap.add_argument("--batch-lanes", type=int, default=2,
                    help="decode batches computed at once, each on its own core (default 2)")
    ap.add_argument("--buffered-lookahead", type=int, default=None, metavar="TOKENS",
                    help="right context of the vocoder's chunks after the second, from tokens already there (default: "
                         "the vocoder's config.json, 0 = off in the shipped one): closer to offline audio at the same "
                         "latency, for 5-11%% more vocoder compute at 6-8 tokens (docs/vocoder_report.md)")
    ap.add_argument("--no-draft", action="store_true",
                    help="do not use <model-dir>/draft for speculative audio decoding even when it exists")
    ap.add_argument("--max-audio-seconds", type=float, default=Limits.max_audio_seconds)
    ap.add_argument("--max-sessions", type=int, default=Limits.max_sessions)
    ap.add_argument("--session-memory-mb", type=float, default=Limits.max_session_memory_mb)
    ap.add_argument("--idle-timeout", type=float, default=Limits.session_idle_seconds, help="seconds")
    ap.add_argument("--ready-file", default=None, help="write 'grpc_port bridge_port' here once serving")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str]) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.buffered_lookahead is not None and args.buffered_lookahead < 0:
        ap.error(f"--buffered-lookahead is a number of tokens, at least 0; got {args.buffered_lookahead}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.token is None:
        if not args.insecure_loopback:
            print("npc-server: no auth token. Pass --token (or set NPC_VOICE_TOKEN), or --insecure-loopback "
                  "for local development.", file=sys.stderr)
            return 2
        if not is_loopback(args.host):
            print(f"npc-server: --insecure-loopback only works on a loopback address, not {args.host}", file=sys.stderr)
            return 2

    from npc_server.engine import Engine
    from npc_server.personas import PersonaStore
    from npc_server.service.core import NpcService
    from npc_server.service.grpc_server import start_grpc

    try:
        store = PersonaStore(args.personas)
    except FileNotFoundError as exc:
        print(f"npc-server: {exc}", file=sys.stderr)
        return 2
    for err in store.last_errors:
        log.warning("persona error: %s", err)
    try:
        engine = Engine.from_pretrained(args.model_dir, threads=args.threads, draft=not args.no_draft,
                                        device=args.device, buffered_lookahead=args.buffered_lookahead)
    except FileNotFoundError as exc:
        print(f"npc-server: {exc}", file=sys.stderr)
        return 2
    limits = Limits(
        max_audio_seconds=args.max_audio_seconds,
        max_sessions=args.max_sessions,
        max_session_memory_mb=args.session_memory_mb,
        session_idle_seconds=args.idle_timeout,
    )
    service = NpcService(engine, store, limits, auth_token=args.token, workers=args.workers,
                         batch_lanes=args.batch_lanes)
    store.watch(on_reload=lambda r: log.info("personas reloaded: %s changed, %s removed, %d error(s)",
                                              r.changed, r.removed, len(r.errors)))
    server, grpc_port = start_grpc(service, args.host, args.port)
    bridge_port = -1
    bridge = None
    if args.bridge_port >= 0:
        from npc_server.service.bridge import start_bridge

        bridge, bridge_port = start_bridge(service, args.host, args.bridge_port)

    names = ", ".join(p.id for p in store.all())
    print(f"npc-server {engine.name}: gRPC on {args.host}:{grpc_port}"
          + (f", WebSocket bridge on ws://{args.host}:{bridge_port}" if bridge_port >= 0 else ""), flush=True)
    print(f"NPCs: {names}", flush=True)
    print("Talk to one (in another terminal):\n"
          f"  .venv/bin/npc-server say --npc innkeeper --server {args.host}:{grpc_port} examples/questions/room.wav -o answer.wav\n"
          "  or in Python:  from sdk import NpcClient\n"
          f"                 NpcClient('{args.host}:{grpc_port}').say('innkeeper', 'examples/questions/room.wav', 'answer.wav')",
          flush=True)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(f"{grpc_port} {bridge_port}\n")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    if bridge is not None:
        bridge.stop()
    server.stop(grace=2).wait()
    service.shutdown()
    return 0
