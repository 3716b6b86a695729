"""`npc-server pretrained prepare`: check the installed base-model packages and convert them into the local cache.

Run once by the set-up (`make setup`); later starts reuse the cache. A cache made from other package files than
the installed ones is rebuilt.
"""

from __future__ import annotations

import argparse
import sys
import time

from npc_server.pretrained.cache import cache_root
from npc_server.pretrained.packages import MissingPackageError

PREPARERS = {"whisper-base": "npc_server.pretrained.whisper:load_encoder",
             "gemma3-270m": "npc_server.pretrained.gguf:base_folder",
             "qwen2.5-coder-0.5b-instruct": "npc_server.pretrained.gguf:base_folder"}
DEFAULT = ("gemma3-270m", "whisper-base")  # what serving and training need; the teacher only for `train dialogues`


def main(argv: list[str] | None = None) -> int:
    import importlib

    p = argparse.ArgumentParser(prog="npc-server pretrained prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("assets", nargs="*", default=list(DEFAULT),
                   help=f"what to prepare (default: {', '.join(DEFAULT)}; known: {', '.join(sorted(PREPARERS))})")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unknown = [a for a in args.assets if a not in PREPARERS]
    if unknown:
        p.error(f"unknown base asset(s) {', '.join(unknown)}; known: {', '.join(sorted(PREPARERS))}")
    for name in args.assets:
        module, func = PREPARERS[name].split(":")
        t0 = time.perf_counter()
        try:
            getattr(importlib.import_module(module), func)(name, not args.no_progress)
        except MissingPackageError as exc:
            print(f"npc-server pretrained: {exc}", file=sys.stderr)
            return 2
        print(f"{name}: ready in {cache_root() / name} ({time.perf_counter() - t0:.1f} s)")
    return 0
