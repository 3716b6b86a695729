"""`npc-server serve`: load the model and personas, then serve gRPC and the WebSocket bridge until stopped."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path

from npc_server.argtools import advanced
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
    ap.add_argument("--model", choices=("auto", "v1", "v2"), default="auto",
                    help="v2: tokenizer v2 + backbone v2 (thinker) + talker + vocoder; v1: tokenizer + AQAA backbone + "
                         "vocoder; auto (default): v2 when --model-dir has the v2 parts (the embedded model does), "
                         "else v1")

    auth = ap.add_argument_group("access")
    auth.add_argument("--token", default=None,
                      help="one auth token shared by all clients (default: $NPC_VOICE_TOKEN); its holders are trusted "
                           "alike")
    auth.add_argument("--tokens-file", default=None, metavar="FILE",
                      help="one token per client instead, a `name token` line each: a client's sessions are tied to "
                           "its token, so clients cannot reach each other's")
    auth.add_argument("--insecure-loopback", action="store_true",
                      help="allow running without a token; only when binding a loopback address (development)")
    auth.add_argument("--tls-cert", default=None, metavar="PEM",
                      help="serve gRPC and the bridge over TLS (grpcs / wss) with this certificate chain")
    auth.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")

    perf = ap.add_argument_group("performance")
    perf.add_argument("--threads", type=int, default=1,
                      help="torch intra-op threads per operation (default 1: the model's ops are too small to split; "
                           "the cores are used by concurrent answers instead)")
    perf.add_argument("--workers", type=int, default=4,
                      help="answer threads (default 4); with more than one, concurrent answers share each decode "
                           "step (batched) and vocode in parallel")
    perf.add_argument("--device", default="cpu",
                      help="where the backbone runs (default cpu; cuda uses flash-attn when the gpu extra is installed)")
    perf.add_argument("--batch-lanes", type=int, default=2,
                      help="decode batches computed at once, each on its own core (default 2)")

    d = Limits()
    lim = ap.add_argument_group("limits (each refused request gets a status with a readable message)")
    lim.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                     metavar="SECONDS",
                     help=f"longest question audio (default {d.max_audio_seconds:g})")
    lim.add_argument("--max-chunk-kb", type=int, default=d.max_chunk_bytes >> 10,
                     metavar="KIB",
                     help=f"largest audio chunk of a question, KiB (default {d.max_chunk_bytes >> 10})")
    lim.add_argument("--max-request-mb", type=int, default=d.max_request_bytes >> 20,
                     metavar="MIB",
                     help=f"all audio of one question, MiB (default {d.max_request_bytes >> 20})")
    lim.add_argument("--max-text-chars", type=int, default=d.max_text_chars,
                     metavar="N",
                     help=f"longest typed question (default {d.max_text_chars})")
    lim.add_argument("--max-answers", type=int, default=d.max_concurrent_requests,
                     metavar="N",
                     help=f"answers admitted at once; more are refused as busy (default {d.max_concurrent_requests})")
    lim.add_argument("--playing-answers", type=int, default=d.playing_answers, metavar="N",
                     help=f"answers generated at once (default {d.playing_answers}: what 2 cores keep in real time, "
                          "see `npc-server bench`); later admitted answers wait in line, first come first served, so "
                          "the ones playing never stutter; 0 = no limit")
    lim.add_argument("--max-pending-questions", type=int, default=d.max_pending_questions,
                     metavar="N",
                     help="questions still arriving (config sent, audio not finished) at once, all clients "
                          f"(default {d.max_pending_questions})")
    lim.add_argument("--max-pending-per-client", type=int, default=d.max_pending_questions_per_client,
                     metavar="N",
                     help=f"the same, per client (default {d.max_pending_questions_per_client})")
    lim.add_argument("--question-timeout", type=float, default=d.question_timeout_seconds, metavar="SECONDS",
                     help="a question that sends nothing for this long ends with DEADLINE_EXCEEDED "
                          f"(default {d.question_timeout_seconds:g})")
    lim.add_argument("--max-sessions", type=int, default=d.max_sessions,
                     metavar="N",
                     help=f"sessions open at once, all clients (default {d.max_sessions})")
    lim.add_argument("--max-sessions-per-client", type=int, default=d.max_sessions_per_client,
                     metavar="N",
                     help=f"sessions open at once per client (default {d.max_sessions_per_client})")
    lim.add_argument("--session-memory-mb", type=float, default=d.max_session_memory_mb,
                     metavar="MB",
                     help=f"KV-cache memory of all sessions together (default {d.max_session_memory_mb:g})")
    lim.add_argument("--idle-timeout", type=float, default=d.session_idle_seconds, metavar="SECONDS",
                     help=f"a session unused this long is closed (default {d.session_idle_seconds:g})")

    adv = advanced(ap)
    adv.add_argument("--buffered-lookahead", type=int, default=None, metavar="TOKENS",
                     help="right context of the vocoder's chunks after the second, from tokens already there "
                          "(default: the vocoder's config.json, 0 = off in the shipped one): closer to offline audio "
                          "at the same latency, for 5-11%% more vocoder compute at 6-8 tokens "
                          "(docs/vocoder.md)")
    adv.add_argument("--no-draft", action="store_true",
                     help="do not use <model-dir>/draft for speculative audio decoding even when it exists")

    ap.add_argument("--ready-file", default=None, metavar="FILE", help="write 'grpc_port bridge_port' here once serving")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _fail(message: str) -> int:
    print(f"npc-server: {message}", file=sys.stderr)
    return 2


def _say_hint(args, grpc_port: int, token_from_env: bool) -> str:
    """The `say` command that talks to this server, with what it needs to get in."""
    extra = ""
    if args.tokens_file:
        extra = " --token <a token of " + args.tokens_file + ">"
    elif args.token:
        extra = ' --token "$NPC_VOICE_TOKEN"' if token_from_env else f" --token {args.token}"
    if args.tls_cert:
        extra += f" --tls-ca {args.tls_cert}"
    return (f"  .venv/bin/npc-server say --npc innkeeper --server {args.host}:{grpc_port}{extra} "
            "examples/questions/room.wav -o answer.wav")


def main(argv: list[str]) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.buffered_lookahead is not None and args.buffered_lookahead < 0:
        ap.error(f"--buffered-lookahead is a number of tokens, at least 0; got {args.buffered_lookahead}")
    if args.playing_answers < 0:
        ap.error(f"--playing-answers is a number of answers, 0 for no limit; got {args.playing_answers}")
    if args.token and args.tokens_file:
        ap.error("--token and --tokens-file exclude each other: give every client a token in the file")
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    token_from_env = False
    if args.token is None and not args.tokens_file and os.environ.get("NPC_VOICE_TOKEN"):
        args.token, token_from_env = os.environ["NPC_VOICE_TOKEN"], True
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.token is None and not args.tokens_file:
        if not args.insecure_loopback:
            return _fail("no auth token. Pass --token (or set NPC_VOICE_TOKEN) or --tokens-file, or "
                         "--insecure-loopback for local development.")
        if not is_loopback(args.host):
            return _fail(f"--insecure-loopback only works on a loopback address, not {args.host}")

    from npc_server.service.auth import TokensFileError, read_tokens_file

    client_tokens = None
    if args.tokens_file:
        try:
            client_tokens = read_tokens_file(args.tokens_file)
        except TokensFileError as exc:
            return _fail(str(exc))
    tls = None
    if args.tls_cert:
        try:
            tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
            bridge_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            bridge_ssl.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            return _fail(f"cannot use --tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {exc}")

    from npc_server.engine import Engine
    from npc_server.personas import PersonaStore
    from npc_server.service.core import NpcService
    from npc_server.service.grpc_server import start_grpc

    try:
        store = PersonaStore(args.personas)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    for err in store.last_errors:
        log.warning("persona error: %s", err)
    from npc_server.engine_v2 import pick_model

    args.model = pick_model(args.model, args.model_dir)
    t_load = time.perf_counter()
    if args.model == "v2":
        print(f"npc-server: loading model v2 from {args.model_dir} (the thinker's int8 weights are made at start: "
              "about a minute on 2 cores)", flush=True)
    try:
        if args.model == "v2":
            from npc_server.engine_v2 import EngineV2

            engine = EngineV2.from_pretrained(args.model_dir, threads=args.threads)
        else:
            engine = Engine.from_pretrained(args.model_dir, threads=args.threads, draft=not args.no_draft,
                                            device=args.device, buffered_lookahead=args.buffered_lookahead)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    limits = Limits(
        max_audio_seconds=args.max_audio_seconds,
        max_chunk_bytes=args.max_chunk_kb << 10,
        max_request_bytes=args.max_request_mb << 20,
        max_text_chars=args.max_text_chars,
        max_sessions_per_client=args.max_sessions_per_client,
        max_sessions=args.max_sessions,
        max_session_memory_mb=args.session_memory_mb,
        session_idle_seconds=args.idle_timeout,
        max_concurrent_requests=args.max_answers,
        playing_answers=args.playing_answers,
        max_pending_questions=args.max_pending_questions,
        max_pending_questions_per_client=args.max_pending_per_client,
        question_timeout_seconds=args.question_timeout,
    )
    service = NpcService(engine, store, limits, auth_token=args.token, workers=args.workers,
                         batch_lanes=args.batch_lanes, client_tokens=client_tokens)
    try:
        server, grpc_port = start_grpc(service, args.host, args.port, tls=tls)
    except OSError as exc:
        service.shutdown()
        return _fail(f"{exc}; pick another --port")
    bridge_port = -1
    bridge = None
    if args.bridge_port >= 0:
        from npc_server.service.bridge import start_bridge

        try:
            bridge, bridge_port = start_bridge(service, args.host, args.bridge_port,
                                               ssl_context=bridge_ssl if tls else None)
        except OSError as exc:
            server.stop(0)
            service.shutdown()
            reason = exc.strerror or str(exc)
            return _fail(f"cannot listen on {args.host}:{args.bridge_port} (WebSocket bridge): {reason}; "
                         "pick another --bridge-port (-1 = no bridge)")
    store.watch(on_reload=lambda r: log.info("personas reloaded: %s changed, %s removed, %d error(s)",
                                              r.changed, r.removed, len(r.errors)))

    names = ", ".join(p.id for p in store.all())
    scheme = "wss" if tls else "ws"
    print(f"npc-server {engine.name} (loaded in {time.perf_counter() - t_load:.1f} s): "
          f"gRPC{' (TLS)' if tls else ''} on {args.host}:{grpc_port}"
          + (f", WebSocket bridge on {scheme}://{args.host}:{bridge_port}" if bridge_port >= 0 else ""), flush=True)
    print(f"NPCs: {names}", flush=True)
    print("Talk to one (in another terminal):\n"
          + _say_hint(args, grpc_port, token_from_env) + "\n"
          "  or in Python:  from sdk import NpcClient\n"
          f"                 NpcClient('{args.host}:{grpc_port}'"
          + (", token=..." if args.token or args.tokens_file else "")
          + (f", tls_ca='{args.tls_cert}'" if tls else "")
          + ").say('innkeeper', 'examples/questions/room.wav', 'answer.wav')",
          flush=True)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(f"{grpc_port} {bridge_port}\n")

    # Python runs signal handlers in the main thread, and only when it wakes: a SIGTERM the kernel delivers to one of
    # the other threads (gRPC, bridge, workers) does not interrupt a blocking Event.wait() there, which once left a
    # SIGTERM unanswered in a CI run. So the main thread wakes every 0.2 s, and the handler only records the signal.
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    while not signals:
        time.sleep(0.2)
    log.info("shutting down")
    if bridge is not None:
        bridge.stop()  # in-flight bridge requests get an UNAVAILABLE error frame first
    server.stop(grace=2).wait()
    service.shutdown()
    return 0
