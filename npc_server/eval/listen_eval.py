"""`npc-server eval listen`: how well the backbone hears, as word error rate of its ASR-task transcripts.

NPC-Eval (`eval npc`) judges whole answers; when they are wrong it cannot tell whether the backbone misheard the
question or answered badly. This command asks the backbone for a transcript of held-out English player questions
(unseen voices and texts) with the pretraining ASR task prompt and compares it with the text that was spoken. The
answer path never uses this task (there is no ASR step at answer time); it only measures what the audio tokens
mean to the backbone.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from npc_server.audio.io import load_audio
from npc_server.backbone.generator import Generator, SamplingConfig
from npc_server.backbone.template import Mode, SystemPrompt, UserTurn
from npc_server.eval.metrics import normalize_text, word_errors
from npc_server.eval.npc_eval import add_backbone_argument, backbone_dirs
from npc_server.paths import DEFAULT_MODEL_DIR, data_dir, require_corpus
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.lm_data import controls_of


def transcribe(generator: Generator, audio_ids, row: dict, max_new_tokens: int) -> str:
    system = SystemPrompt(persona="custom", controls=controls_of(row, "joe"), task="asr")
    session = generator.start_session(system)
    end = generator.generate(session, UserTurn(audio=audio_ids), Mode.TEXT,
                             SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    return end.text


def question_rows(args) -> tuple[Path, list[dict]]:
    """(corpus, a seeded sample of `--limit` English utterances of `--split` / `--role` with audio)."""
    corpus = require_corpus(args.corpus or data_dir() / "corpus" / "default", "eval listen")
    rows = [r for r in read_manifest(corpus)
            if r["split"] == args.split and r.get("language") == "en" and (args.role == "any" or r["role"] == args.role)
            and (corpus / r["audio"]).is_file()]
    if not rows:
        raise SystemExit(f"no English {args.role} utterances of split {args.split!r} with audio in {corpus}")
    random.Random(args.seed).shuffle(rows)
    return corpus, rows[: args.limit]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="npc-server eval listen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_argument(p)
    p.add_argument("--audio-tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer")
    p.add_argument("--corpus", type=Path, default=None, help="default: <data dir>/corpus/default")
    p.add_argument("--split", default="heldout")
    p.add_argument("--role", default="player", choices=("player", "npc", "any"))
    p.add_argument("--limit", type=int, default=100, help="utterances (a seeded sample)")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write per-utterance results JSON here")
    p.add_argument("--open-vocab", type=int, default=0, metavar="N",
                   help="v2 backbones: add the Latin-script pieces among the base vocabulary's first N ids to the "
                        "output rows (speech outside the training texts; 0: the trained head only)")
    p.add_argument("--real", action="store_true",
                   help="v2 backbones: real human recordings (pocketsphinx-testdata) instead of the corpus")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = backbone_dirs(args.backbone)
    from npc_server.training.lm_v2 import is_v2_backbone

    if all(is_v2_backbone(Path(d)) for d in models.values()):
        from npc_server.eval.listen_v2 import run

        return run(args, models)
    if args.real:
        p.error("--real needs v2 backbones (and a v2 --audio-tokenizer)")

    from npc_server.tokenizer import AudioTokenizer

    corpus, rows = question_rows(args)
    tokenizer = AudioTokenizer.from_pretrained(args.audio_tokenizer)
    audio = {}
    for r in rows:
        wav, sr = load_audio(corpus / r["audio"])
        audio[r["id"]] = tokenizer.encode(wav, sr).interleaved

    report = {"corpus": str(corpus), "split": args.split, "role": args.role, "models": {}}
    for name, path in models.items():
        generator = Generator.from_pretrained(path)
        errors = words = exact = 0
        results = []
        for r in tqdm(rows, desc=f"listen {name}", unit="utt"):
            hyp = transcribe(generator, audio[r["id"]], r, args.max_new_tokens)
            ref_w, hyp_w = normalize_text(r["text"]), normalize_text(hyp)
            e = word_errors(ref_w, hyp_w)
            errors, words, exact = errors + e, words + len(ref_w), exact + (ref_w == hyp_w)
            results.append({"id": r["id"], "text": r["text"], "transcript": hyp, "word_errors": e})
        report["models"][name] = {"n": len(rows), "wer": errors / max(1, words), "exact": exact / len(rows),
                                  "results": results}
        print(f"{name}: WER {errors / max(1, words):.1%} over {len(rows)} {args.split} {args.role} utterances "
              f"({words} words), exact transcripts {exact / len(rows):.1%}")
        for res in results[:3]:
            print(f"  said: {res['text']!r}\n  heard: {res['transcript']!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
