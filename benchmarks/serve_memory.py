"""Memory of `npc-server serve` on its own: the server runs as a separate process (as in production), clients ask
the same spoken question at once, and its resident memory (VmRSS) and peak (VmHWM) are read from /proc after the
load and after each round. Linux only.

    python -m benchmarks.serve_memory --clients 4,8
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from npc_server.bench import memory_mb
from npc_server.paths import REPO_ROOT
from sdk import NpcClient

QUESTION = REPO_ROOT / "examples" / "questions" / "room.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="4,8", help="rounds of clients asking at once (default 4,8)")
    ap.add_argument("--npc", default="innkeeper")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to load")
    ap.add_argument("serve_args", nargs="*", help="extra `npc-server serve` flags (after --), e.g. -- --model v1")
    args = ap.parse_args(argv)
    if not Path("/proc/self/status").exists():
        ap.error("this benchmark reads /proc (Linux)")
    rounds = [int(x) for x in args.clients.split(",") if x.strip()]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        server = subprocess.Popen([sys.executable, "-m", "npc_server.cli", "serve", "--insecure-loopback", "--port",
                                   str(port), "--bridge-port", "-1", "--ready-file", str(ready), *args.serve_args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + args.timeout
            while not ready.exists():
                if server.poll() is not None:
                    raise SystemExit(f"the server ended before serving: {server.stderr.read()[-2000:]}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not load within {args.timeout:.0f} s")
                time.sleep(0.5)
            rss, peak = memory_mb(server.pid)
            print(f"{'after the load':<32} resident {rss:>6.0f} MB   peak {peak:>6.0f} MB")

            def ask() -> None:
                with NpcClient(f"127.0.0.1:{port}") as client:
                    client.ask(args.npc, QUESTION)

            for n in rounds:
                threads = [threading.Thread(target=ask) for _ in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rss, peak = memory_mb(server.pid)
                print(f"{f'after {n} clients at once':<32} resident {rss:>6.0f} MB   peak {peak:>6.0f} MB")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
