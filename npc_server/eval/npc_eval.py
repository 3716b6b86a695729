"""`npc-server eval npc`: NPC-Eval, held-out spoken questions answered by the backbone and judged per category.

For every held-out dialogue (player voices and question texts never trained on) the question's wav is tokenized,
the backbone answers in audio_text mode (history restored as text turns), the vocoder speaks the answer, and:
- correct: every expected string is heard in the Whisper tiny.en transcript (English) or is in the subtitle
  (other languages, judged by their text channel; also everything with --judge text);
- WER of the transcript against the model's own subtitle (English);
- speed: speaking rate (characters per second of the subtitle over the audio duration) relative to the voice's
  natural rate measured on the corpus, against the requested speed x the emotion's tempo (within 10%);
- pitch: median F0 (parselmouth) relative to the voice's natural median F0, against the requested shift + the
  emotion's shift (within 1 semitone);
- persona: the answer does not introduce itself as another persona ("I'm Sergeant Angus" from the innkeeper).
Several backbones can be compared in one run (`--backbone sft=runs/sft/model --backbone merged=...`): the ablation.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.audio.io import load_audio
from npc_server.backbone.generator import Generator, SamplingConfig
from npc_server.backbone.template import AssistantTurn, Mode, UserTurn
from npc_server.controls import EMOTIONS
from npc_server.eval.metrics import median_f0, neutral_voice_f0, normalize_text, word_errors
from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR, data_dir, require_corpus
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.lm_data import (
    PersonaInfo,
    dialogue_prompt,
    load_dialogues,
    persona_infos,
)

SPEED_TOLERANCE = 0.10
PITCH_TOLERANCE_ST = 1.0


# --- judgements --------------------------------------------------------------------------------------------------
def heard(expected: str, transcript: str) -> bool:
    """Expected words appear contiguously in the transcript (after number/punctuation normalisation)."""
    want, got = normalize_text(expected), normalize_text(transcript)
    if not want:
        return expected.strip().lower() in transcript.lower()
    return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))


def contains(expected: str, text: str, language: str) -> bool:
    if language == "en":
        return heard(expected, text)
    squash = lambda s: re.sub(r"[\s。、，,.!?！？]", "", s.lower())
    return squash(expected) in squash(text)


def persona_names() -> dict[str, str]:
    """Persona role -> name, from the game world."""
    from npc_server.training.corpus.world import PERSONAS

    return {role: p.name for role, p in PERSONAS.items()}


def persona_violation(text: str, persona: str, names: dict[str, str]) -> str | None:
    """The other persona this answer introduces itself as, if any."""
    low = text.lower()
    for role, name in names.items():
        if role == persona:
            continue
        for n in {name.lower(), name.split()[-1].lower()}:
            if re.search(rf"\b(i am|i'm|im|my name is|name's|call me)\s+{re.escape(n)}\b", low):
                return role
    return None


def report_group(row: dict) -> str:
    if row["language"] != "en":
        return "other languages (text)"
    return {"arithmetic": "arithmetic/reasoning", "reasoning": "arithmetic/reasoning", "multiturn": "multi-turn",
            "control": "control following"}.get(row["category"], row["category"])


# --- voice references ----------------------------------------------------------------------------------------------
def voice_references(corpus: Path, manifest: dict[str, dict], per_voice: int = 6) -> dict[str, dict]:
    """Natural speaking rate (chars/s at speed 1) and median F0 of each NPC voice, from training utterances."""
    rates: dict[str, list[float]] = defaultdict(list)
    for row in manifest.values():
        if row["role"] != "npc" or row["split"] != "train" or not row.get("duration"):
            continue
        c = row.get("controls", {})
        factor = float(c.get("speed", 1.0)) * EMOTIONS[c.get("emotion", "neutral")].rate
        rates[row["speaker"]].append(len(row["text"]) / row["duration"] * 1.0 / factor)
    f0 = neutral_voice_f0(corpus, list(manifest.values()), per_voice)
    return {voice: {"chars_per_s": statistics.median(rs), "f0": f0.get(voice, float("nan"))}
            for voice, rs in rates.items()}


# --- evaluation --------------------------------------------------------------------------------------------------
def answer_row(generator: Generator, tokenizer, row: dict, manifest: dict, corpus: Path,
               personas: dict[str, PersonaInfo], sampling: SamplingConfig, question: str = "audio") -> dict:
    """Answer one dialogue; `question` = "audio" (the player's recording, the product) or "text" (the same question
    typed, a diagnostic that separates listening from answering)."""
    system, override = dialogue_prompt(row, personas)  # persona defaults + API overrides, as the engine does
    if question == "text":
        user = UserTurn(text=row["question_text"], controls=override)
    else:
        q = manifest[row["question_audio_id"]]
        wav, sr = load_audio(corpus / q["audio"])
        user = UserTurn(audio=tokenizer.encode(wav, sr).interleaved, controls=override)
    session = generator.start_session(system)
    for turn in row.get("history", []):
        generator.add_turn(session, UserTurn(text=turn["question"]), AssistantTurn(text=turn["answer"], mode=Mode.TEXT))
    t0 = time.perf_counter()
    end = generator.generate(session, user, Mode.AUDIO_TEXT, sampling)
    return {"subtitle": end.text, "audio_codes": end.audio, "stop_reason": end.stop_reason,
            "gen_s": time.perf_counter() - t0, "tokens": end.generated_tokens}


def judge(row: dict, ans: dict, wav: np.ndarray | None, sr: int, transcript: str | None, refs: dict,
          names: dict[str, str]) -> dict:
    lang = row["language"]
    expected = [e for e in row.get("expected", []) if e]
    heard_text = transcript if (transcript is not None and lang == "en") else ans["subtitle"]
    res = {
        "id": row["id"], "group": report_group(row), "category": row["category"], "persona": row["persona"],
        "language": lang, "question": row["question_text"], "reference": row["answer_text"],
        "subtitle": ans["subtitle"], "transcript": transcript, "expected": expected,
        "correct": all(contains(e, heard_text, lang) for e in expected) if expected else None,
        "correct_subtitle": all(contains(e, ans["subtitle"], lang) for e in expected) if expected else None,
        "persona_violation": persona_violation(ans["subtitle"], row["persona"], names),
        "stop_reason": ans["stop_reason"], "gen_s": ans["gen_s"], "tokens": ans["tokens"],
    }
    if transcript is not None and lang == "en":
        ref = normalize_text(ans["subtitle"])
        res["wer"] = word_errors(ref, normalize_text(transcript)) / max(1, len(ref))
    if wav is not None and len(wav) and row["npc_voice"] in refs:
        c = row.get("controls", {})
        ref = refs[row["npc_voice"]]
        emo = EMOTIONS[c.get("emotion", "neutral")]
        want_speed = float(c.get("speed", 1.0)) * emo.rate
        speed = len(ans["subtitle"]) / (len(wav) / sr) / ref["chars_per_s"]
        res["speed_requested"], res["speed_measured"] = want_speed, speed
        res["speed_ok"] = abs(speed / want_speed - 1) <= SPEED_TOLERANCE
        f0 = median_f0(wav, sr)
        if np.isfinite(f0) and np.isfinite(ref["f0"]):
            want_st = float(c.get("pitch_st", 0.0)) + emo.pitch_shift_st
            got_st = 12 * np.log2(f0 / ref["f0"])
            res["pitch_requested_st"], res["pitch_measured_st"] = want_st, float(got_st)
            res["pitch_ok"] = abs(got_st - want_st) <= PITCH_TOLERANCE_ST
    return res


def _json_scalar(value):
    """numpy scalars (np.bool_, np.float32 ...) in the results, as plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summarise(results: list[dict]) -> dict:
    def rate(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return (sum(map(bool, vals)) / len(vals)) if vals else None

    def mean(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["group"]].append(r)
    out = {}
    for name, rs in sorted(groups.items()) + [("ALL", results)]:
        out[name] = {
            "n": len(rs), "correct": rate(rs, "correct"), "correct_subtitle": rate(rs, "correct_subtitle"),
            "wer": mean(rs, "wer"), "speed_ok": rate(rs, "speed_ok"), "pitch_ok": rate(rs, "pitch_ok"),
            "persona_ok": 1.0 - sum(r["persona_violation"] is not None for r in rs) / max(1, len(rs)),
            "truncated": sum(r["stop_reason"] != "end" for r in rs) / max(1, len(rs)),
        }
    return out


def to_markdown(summaries: dict[str, dict]) -> str:
    cols = ["n", "correct", "correct_subtitle", "wer", "speed_ok", "pitch_ok", "persona_ok", "truncated"]
    lines = []
    for model, summary in summaries.items():
        lines += [f"### {model}", "", "| group | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for group, s in summary.items():
            cells = [str(s["n"])] + [("-" if s[c] is None else f"{100 * s[c]:.1f}%") for c in cols[1:]]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def add_backbone_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", action="append", default=None,
                        help="NAME=DIR or DIR of a backbone bundle; repeat to compare (default models/default/backbone)")


def backbone_dirs(specs: list[str] | None) -> dict[str, str]:
    """`--backbone` values -> {name: directory} (a bare DIR is named after its folder)."""
    specs = specs or [str(DEFAULT_MODEL_DIR / "backbone")]
    return dict(s.split("=", 1) if "=" in s else (Path(s).name, s) for s in specs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npc-server eval npc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_argument(parser)
    parser.add_argument("--audio-tokenizer", type=Path, default=None,
                        help="default: models/default/tokenizer (v1 backbones) or tokenizer_v2 (v2 backbones)")
    parser.add_argument("--vocoder", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    parser.add_argument("--talker", type=Path, default=DEFAULT_MODEL_DIR / "talker",
                        help="v2 backbones with --judge audio: the talker that speaks their answers")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="default: <data dir>/corpus/default; for v2 backbones, when that is missing, the eval set "
                             "shipped in data/eval/npc")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--limit", type=int, default=200, help="dialogues to evaluate (a seeded sample)")
    parser.add_argument("--judge", choices=("audio", "text"), default="audio",
                        help="audio: vocoder + Whisper + parselmouth; text: subtitles only (no vocoder needed)")
    parser.add_argument("--question", choices=("audio", "text"), default="audio",
                        help="audio: the player's recorded question (default); text: the same question typed "
                             "(diagnostic: separates understanding speech from answering)")
    parser.add_argument("--personas", type=Path, default=DEFAULT_PERSONAS_DIR)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write results JSON (+ .md table) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = backbone_dirs(args.backbone)
    from npc_server.training.lm_v2 import is_v2_backbone

    if any(is_v2_backbone(Path(d)) for d in models.values()):
        if not all(is_v2_backbone(Path(d)) for d in models.values()):
            parser.error("compare v1 and v2 backbones in separate runs")
        from npc_server.eval.answer_v2 import run

        args.audio_tokenizer = args.audio_tokenizer or DEFAULT_MODEL_DIR / "tokenizer_v2"
        return run(args, models)
    args.audio_tokenizer = args.audio_tokenizer or DEFAULT_MODEL_DIR / "tokenizer"

    corpus = require_corpus(args.corpus or data_dir() / "corpus" / "default", "eval npc",
                            needs=("manifest.jsonl", "dialogues.jsonl"))
    manifest = {r["id"]: r for r in read_manifest(corpus)}
    rows = load_dialogues(corpus, args.split)
    if not rows:
        raise ValueError(f"no {args.split!r} dialogues in {corpus}")
    rendered = [r for r in rows if r["question_audio_id"] in manifest]
    if len(rendered) < len(rows):  # a corpus whose generation was stopped early (it is prefix-stable)
        print(f"{len(rows) - len(rendered)} of {len(rows)} {args.split} dialogues have no rendered question audio "
              f"yet; evaluating among the other {len(rendered)}")
        rows = rendered
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.limit]
    personas = persona_infos(args.personas)
    names = persona_names()

    from npc_server.tokenizer import AudioTokenizer

    tokenizer = AudioTokenizer.from_pretrained(args.audio_tokenizer)
    vocoder = listener = None
    refs: dict = {}
    if args.judge == "audio":
        from npc_server.eval.metrics import Listener
        from npc_server.vocoder.vocoder import Vocoder

        vocoder = Vocoder.from_pretrained(args.vocoder)
        listener = Listener(threads=args.threads)
        refs = voice_references(corpus, manifest)

    sampling = SamplingConfig(temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens)
    all_results, summaries = {}, {}
    for name, path in models.items():
        generator = Generator.from_pretrained(path)
        results = []
        for row in tqdm(rows, desc=f"eval {name}"):
            ans = answer_row(generator, tokenizer, row, manifest, corpus, personas, sampling, args.question)
            wav, sr, transcript = None, 0, None
            if vocoder is not None and len(ans["audio_codes"]):
                c = row.get("controls", {})  # decoded as the server does (Engine: Vocoder.request_pitch)
                pitch = vocoder.request_pitch(float(c.get("pitch_st", 0.0)), c.get("emotion", "neutral"))
                wav, sr = vocoder.decode(ans["audio_codes"].tolist(), voice=row["npc_voice"]
                                         if row["npc_voice"] in vocoder.voices else vocoder.voices[0], pitch_st=pitch)
                if row["language"] == "en":
                    transcript = listener.transcribe(wav, sr)
            elif vocoder is not None:
                transcript = ""
            results.append(judge(row, ans, wav, sr, transcript, refs, names))
        all_results[name] = results
        summaries[name] = summarise(results)
    table = to_markdown(summaries)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"corpus": str(corpus), "split": args.split, "judge": args.judge,
                                        "question": args.question, "summary": summaries, "results": all_results},
                                       indent=2, ensure_ascii=False, default=_json_scalar) + "\n", encoding="utf-8")
        args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    return 0
