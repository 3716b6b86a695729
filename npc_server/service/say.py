"""`npc-server say`: ask a persona a question (wav file and/or text) on a running server; save the spoken answer."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn


def main(argv: list[str]) -> NoReturn:
    """Run the command, then end the process at once (see `_leave`): this is a command, not a library call."""
    _leave(_run(argv))


def _leave(code: int) -> NoReturn:
    """Flush and end the process without the interpreter's teardown.

    Once, on a loaded CI machine, `say` printed its NOT_FOUND error and then did not exit for over 60 s. At that
    point no Python thread is left (checked), so the wait was in gRPC's C-core teardown at interpreter exit. The
    answer is written and the channel closed by now, so nothing is lost by skipping the teardown, and the exit code
    stays exact.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="npc-server say", description=__doc__)
    ap.add_argument("question", nargs="?", help="question audio (wav/flac/ogg, any sample rate)")
    ap.add_argument("--npc", required=True, help="persona id, e.g. innkeeper")
    ap.add_argument("-o", "--out", default="answer.wav", help="where to write the answer (default answer.wav)")
    ap.add_argument("--text", default="", help="typed text (instead of or with the audio)")
    ap.add_argument("--server", default="127.0.0.1:50051", help="gRPC address (default 127.0.0.1:50051)")
    ap.add_argument("--token", default=os.environ.get("NPC_VOICE_TOKEN"), help="auth token ($NPC_VOICE_TOKEN)")
    ap.add_argument("--tls", action="store_true", help="the server serves TLS (serve --tls-cert): use it")
    ap.add_argument("--tls-ca", default=None, metavar="PEM",
                    help="trust this certificate for TLS (e.g. the server's self-signed --tls-cert); implies --tls")
    ap.add_argument("--session", default="", help="session id to continue a conversation")
    ap.add_argument("--emotion")
    ap.add_argument("--speed", type=float)
    ap.add_argument("--pitch", type=float, help="semitones")
    ap.add_argument("--language")
    ap.add_argument("--accent")
    ap.add_argument("--mode", default="audio_and_text", choices=["audio_and_text", "text_only", "audio_only"])
    args = ap.parse_args(argv)
    if not args.question and not args.text:
        ap.error("give a question wav file, --text, or both")

    from sdk import NpcClient, NpcError

    try:
        with NpcClient(args.server, token=args.token, tls=args.tls, tls_ca=args.tls_ca) as client:
            answer = client.ask(
                args.npc, args.question, session=args.session, text=args.text, emotion=args.emotion,
                speed=args.speed, pitch=args.pitch, language=args.language, accent=args.accent, mode=args.mode,
            )
        answer.save_wav(args.out)
    except NpcError as exc:
        print(f"npc-server say: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"npc-server say: {exc}", file=sys.stderr)
        return 1
    t = answer.end.timings
    print(f"{args.npc}: {answer.text}")
    print(f"wrote {args.out}: {answer.end.audio_seconds:.2f} s of audio at {answer.sample_rate} Hz; "
          f"time to first audio {t['time_to_first_audio_ms']:.0f} ms, total {t['total_ms']:.0f} ms")
    return 0
