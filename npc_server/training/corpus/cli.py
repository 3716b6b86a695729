"""`npc-server train corpus`: synthesise the spoken NPC-dialogue corpus (seeded, resumable, with a report)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from npc_server.paths import data_dir
from npc_server.training.corpus.generate import SIZES, generate, report_markdown


def default_corpus_dir(name: str = "default") -> Path:
    return data_dir() / "corpus" / name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="npc-server train corpus", description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("--out", type=Path, default=None,
                    help="corpus folder (default: <data_dir>/corpus/<size>, data_dir from NPC_VOICE_DATA)")
    ap.add_argument("--size", choices=sorted(SIZES), default="default",
                    help=f"dialogue turns: {', '.join(f'{k}={v}' for k, v in SIZES.items())}")
    ap.add_argument("--dialogues", type=int, default=None, help="override the number of dialogue turns")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="render processes (each keeps one piper voice loaded)")
    ap.add_argument("--resume", action="store_true", help="finish an interrupted generation in --out")
    ap.add_argument("--overwrite", action="store_true", help="start again, replacing the corpus in --out")
    ap.add_argument("--report-md", type=Path, default=None, help="also write the report as markdown to this file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    n = args.dialogues if args.dialogues is not None else SIZES[args.size]
    if n < 3:
        ap.error("--dialogues must be at least 3 (one per split)")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    out = args.out if args.out is not None else default_corpus_dir("default" if args.size == "default" else args.size)
    print(f"corpus: {n} dialogue turns (seed {args.seed}, {args.workers} workers) -> {out}", file=sys.stderr)
    try:
        report = generate(out, n, seed=args.seed, workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except (FileExistsError, ValueError) as exc:
        print(f"npc-server train corpus: {exc}", file=sys.stderr)
        return 2
    md = report_markdown(report)
    print(md)
    print(f"\nreport: {out / 'report.json'}")
    if args.report_md is not None:
        args.report_md.parent.mkdir(parents=True, exist_ok=True)
        args.report_md.write_text(f"# Corpus report\n\nCommand: `npc-server train corpus --size {args.size} --seed {args.seed} "
                                  f"--workers {args.workers}`\n\n{md}\n", encoding="utf-8")
    json.dumps(report)  # the report is plain JSON
    return 0
