"""Corpus generation pipeline: dialogue texts -> render jobs -> parallel synthesis -> manifest, dialogues, report."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npc_server.audio.io import save_wav
from npc_server.training.corpus import render as R
from npc_server.training.corpus.players import pick_player, player_pool
from npc_server.training.corpus.text import PREFIX_STABLE_FROM, Dialogue, generate_dialogues
from npc_server.voices import ESPEAK_BASE_VOICES, VOICE_BANK, voice_supports

CORPUS_VERSION = 1
SIZES = {"tiny": 16, "small": 600, "default": 15000}


@dataclass
class Job:
    """Everything a worker needs to render one utterance (plain data, picklable)."""

    id: str
    split: str
    role: str
    language: str
    accent: str
    speaker: str
    controls: dict
    text: str
    engine: str
    espeak_voice: str
    espeak_pitch: int
    prosody: dict
    noise_scale: float
    effects: dict
    audio: str
    seed: int


def _seed(*parts) -> int:
    return int(hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def npc_job(d: Dialogue, seed: int) -> Job:
    spec = VOICE_BANK[d.npc_voice]
    if not voice_supports(d.npc_voice, d.language, d.accent):
        raise ValueError(f"dialogue {d.id}: voice {d.npc_voice!r} cannot speak {d.language}/{d.accent}")
    c = d.controls
    pros = R.Prosody.for_npc(c["emotion"], c["speed"], c["pitch_st"], spec.pitch_shift_st, spec.formant_ratio)
    base = ESPEAK_BASE_VOICES[(d.language, d.accent)]
    espeak_voice = R.PIPER_ESPEAK_VOICE if spec.engine == "piper" else f"{base}+{spec.espeak_variant}" if spec.espeak_variant else base
    aid = f"{d.id}_a"
    return Job(id=aid, split=d.split, role="npc", language=d.language, accent=d.accent, speaker=d.npc_voice,
               controls=dict(c), text=d.answer_text, engine=spec.engine, espeak_voice=espeak_voice, espeak_pitch=50,
               prosody=pros.__dict__.copy(), noise_scale=0.667,
               effects={"whisper": bool(d.extra.get("whisper"))}, audio=f"audio/{d.id[:-3]}/{aid}.wav",
               seed=_seed(seed, aid))


def player_job(d: Dialogue, seed: int) -> Job:
    rng = random.Random(_seed("player", seed, d.id))
    voice = pick_player(rng, d.question_language, d.split)
    speed = round(voice.speed * rng.uniform(0.93, 1.07), 3)
    pitch = round(voice.pitch_st + rng.uniform(-1.0, 1.0), 2) if voice.engine == "piper" else 0.0
    qid = f"{d.id}_q"
    pros = R.Prosody(speed=speed, pitch_st=pitch, pitch_range=round(rng.uniform(0.8, 1.25), 2) if voice.engine == "piper" else 1.0,
                     formant_ratio=voice.formant_ratio, energy_db=round(rng.uniform(-6.0, 3.0), 1))
    effects = {"rt60": voice.rt60, "wet": voice.wet, "snr_db": voice.snr_db, "pink": voice.pink}
    return Job(id=qid, split=d.split, role="player", language=d.question_language, accent=voice.accent, speaker=voice.id,
               controls={"emotion": "neutral", "speed": speed, "pitch_st": pitch}, text=d.question_text,
               engine=voice.engine, espeak_voice=voice.espeak_voice,
               espeak_pitch=int(np.clip(voice.espeak_pitch + rng.randint(-6, 6), 0, 99)), prosody=pros.__dict__.copy(),
               noise_scale=voice.noise_scale, effects=effects, audio=f"audio/{d.id[:-3]}/{qid}.wav", seed=_seed(seed, qid))


def build(n_dialogues: int, seed: int) -> tuple[list[Dialogue], list[Job]]:
    dialogues = generate_dialogues(n_dialogues, seed)
    jobs: list[Job] = []
    for d in dialogues:
        q, a = player_job(d, seed), npc_job(d, seed)
        d.question_audio_id, d.answer_audio_id = q.id, a.id
        jobs += [q, a]
    return dialogues, jobs


# ------------------------------------------------------------------------------------------------ worker

_PIPER: R.PiperEngine | None = None


def _init_worker() -> None:
    global _PIPER
    R.workers_env()
    _PIPER = R.PiperEngine(threads=1)


def render_job(job: Job, root: Path, piper: R.PiperEngine | None = None) -> dict:
    """Render one utterance to root/job.audio and return its manifest entry."""
    piper = piper or _PIPER
    rng = np.random.default_rng(job.seed)
    pros = R.Prosody(**job.prosody)
    wav = R.render(job.text, job.engine, job.espeak_voice, pros, piper=piper, espeak_pitch=job.espeak_pitch,
                   noise_scale=job.noise_scale)
    fx = job.effects
    if fx.get("whisper"):
        wav = R.whisper(wav, rng)
    else:
        wav = R.set_loudness(wav, pros.energy_db)
    if fx.get("rt60", 0) > 0:
        wav = R.add_room(wav, rng, fx["rt60"], fx["wet"])
    if fx.get("snr_db", 99) < 90:
        wav = R.add_noise(wav, rng, fx["snr_db"], fx.get("pink", False))
    if job.role == "player":
        wav = R.set_loudness(wav, pros.energy_db)
    path = root / job.audio
    save_wav(path, wav, R.SR)
    phonemes = R.phonemize(job.text, job.espeak_voice)
    return {
        "id": job.id, "split": job.split, "role": job.role, "language": job.language, "accent": job.accent,
        "speaker": job.speaker, "controls": job.controls, "text": job.text, "phonemes": phonemes,
        "audio": job.audio, "sr": R.SR, "duration": round(len(wav) / R.SR, 4),
    }


def _work(args) -> dict:
    job, root = args
    try:
        return render_job(job, Path(root))
    except Exception as exc:  # report, the main process decides
        return {"error": f"{type(exc).__name__}: {exc}", "id": job.id, "text": job.text}


# ------------------------------------------------------------------------------------------------ main loop


def _read_manifest(path: Path) -> list[dict]:
    """Complete lines of a (possibly killed mid-write) manifest; truncates a torn last line."""
    if not path.exists():
        return []
    entries, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return entries


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate(root: Path, n_dialogues: int, seed: int = 0, workers: int = 2, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Generate (or finish) a corpus in root. Returns the report (also written to root/report.json, last)."""
    from tqdm import tqdm

    root = Path(root)
    plan = {"version": CORPUS_VERSION, "dialogues": n_dialogues, "seed": seed}
    plan_path, manifest_path = root / "plan.json", root / "manifest.jsonl"
    if root.exists() and (manifest_path.exists() or plan_path.exists()):
        if overwrite:
            for name in ("manifest.jsonl", "dialogues.jsonl", "report.json", "plan.json", "players.json"):
                (root / name).unlink(missing_ok=True)
        elif not resume:
            raise FileExistsError(f"{root} already holds a corpus: pass --resume to finish it or --overwrite to start again")
        else:
            old = json.loads(plan_path.read_text()) if plan_path.exists() else None
            shrink = (old is not None and {**old, "dialogues": n_dialogues} == plan
                      and PREFIX_STABLE_FROM <= n_dialogues < old["dialogues"])
            if old is not None and old != plan and not shrink:
                raise ValueError(f"cannot resume {root}: it was started with {old}, now asked for {plan} "
                                 f"(only the same seed, or fewer dialogues from {PREFIX_STABLE_FROM} on, can resume)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").unlink(missing_ok=True)  # report.json marks a complete corpus: written last
    _write_atomic(plan_path, json.dumps(plan) + "\n")

    t0 = time.time()
    dialogues, jobs = build(n_dialogues, seed)
    _write_atomic(root / "dialogues.jsonl", "".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in dialogues))
    _write_atomic(root / "players.json", json.dumps([v.to_json() for v in player_pool()], indent=1) + "\n")

    wanted = {j.id for j in jobs}
    existing = _read_manifest(manifest_path)
    kept = [e for e in existing if e["id"] in wanted and (root / e["audio"]).exists()]
    if len(kept) != len(existing):
        # entries whose audio vanished, or beyond a shrunk plan: rewrite the manifest without them
        for e in existing:
            if e["id"] not in wanted:
                (root / e["audio"]).unlink(missing_ok=True)
        _write_atomic(manifest_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
    done = {e["id"] for e in kept}
    todo = [j for j in jobs if j.id not in done]
    new_audio_s = 0.0
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="corpus", unit="utt", disable=not progress,
               dynamic_ncols=True)
    with open(manifest_path, "a", encoding="utf-8") as out:
        if workers <= 1:
            piper = R.PiperEngine(threads=1) if any(j.engine == "piper" for j in todo) else None
            results = ((lambda j: _safe(j, root, piper))(j) for j in todo)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers, initializer=_init_worker)
            results = pool.imap(_work, [(j, str(root)) for j in todo], chunksize=4)
        try:
            for entry in results:
                if "error" in entry:
                    raise RuntimeError(f"rendering {entry['id']} ({entry['text']!r}) failed: {entry['error']}")
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                out.flush()
                new_audio_s += entry["duration"]
                bar.update(1)
                bar.set_postfix(hours=f"{new_audio_s / 3600:.2f}")
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
    wall = time.time() - t0

    manifest = _read_manifest(manifest_path)
    ids = [e["id"] for e in manifest]
    if sorted(ids) != sorted(j.id for j in jobs):
        raise RuntimeError(f"manifest holds {len(ids)} utterances, expected {len(jobs)}")
    report = make_report(manifest, [d.to_json() for d in dialogues])
    report["generation"] = {
        "wall_seconds": round(wall, 1), "workers": workers, "seed": seed, "resumed": bool(done),
        "utterances_this_run": len(todo), "audio_hours_this_run": round(new_audio_s / 3600, 3),
        "audio_seconds_per_wall_second": round(new_audio_s / max(wall, 1e-6), 2),
    }
    _write_atomic(root / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def _safe(job: Job, root: Path, piper) -> dict:
    try:
        return render_job(job, root, piper)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "id": job.id, "text": job.text}


def make_report(manifest: list[dict], dialogues: list[dict]) -> dict:
    hours = lambda es: round(sum(e["duration"] for e in es) / 3600, 3)  # noqa: E731
    by = lambda key, es: dict(sorted(Counter(key(e) for e in es).items()))  # noqa: E731
    hours_by: dict[str, dict[str, float]] = defaultdict(dict)
    for name, key in (("role", lambda e: e["role"]), ("language", lambda e: e["language"]), ("split", lambda e: e["split"])):
        groups: dict[str, list] = defaultdict(list)
        for e in manifest:
            groups[key(e)].append(e)
        hours_by[name] = {k: hours(v) for k, v in sorted(groups.items())}
    npc = [e for e in manifest if e["role"] == "npc"]
    players = [e for e in manifest if e["role"] == "player"]
    return {
        "version": CORPUS_VERSION,
        "dialogues": len(dialogues),
        "utterances": len(manifest),
        "total_hours": hours(manifest),
        "hours_by": dict(hours_by),
        "dialogues_by_category": by(lambda d: d["category"], dialogues),
        "dialogues_by_split": by(lambda d: d["split"], dialogues),
        "dialogues_by_persona": by(lambda d: d["persona"], dialogues),
        "utterances_by_language": by(lambda e: e["language"], manifest),
        "utterances_by_accent": by(lambda e: f"{e['language']}-{e['accent']}", manifest),
        "npc_utterances_by_voice": by(lambda e: e["speaker"], npc),
        "player_voices": {s: len({e["speaker"] for e in players if e["split"] == s}) for s in ("train", "valid", "heldout")},
        "player_utterances_by_engine": by(lambda e: "piper" if "_pj" in e["speaker"] else "espeak", players),
        "mean_duration_s": {"player": round(float(np.mean([e["duration"] for e in players])), 2) if players else 0.0,
                            "npc": round(float(np.mean([e["duration"] for e in npc])), 2) if npc else 0.0},
    }


def report_markdown(report: dict) -> str:
    """The report as markdown tables (for the README / docs/log/2026-11-25-corpus-report.md)."""
    lines = [f"Dialogues: **{report['dialogues']}**, utterances: **{report['utterances']}**, "
             f"audio: **{report['total_hours']:.2f} h** (player {report['hours_by']['role'].get('player', 0):.2f} h, "
             f"NPC {report['hours_by']['role'].get('npc', 0):.2f} h).", ""]
    g = report.get("generation")
    if g:
        lines += [f"Generation: {g['wall_seconds'] / 60:.1f} min wall with {g['workers']} workers "
                  f"({g['audio_seconds_per_wall_second']:.1f} s of audio per second; {g['utterances_this_run']} utterances"
                  f"{', resumed' if g['resumed'] else ''}).", ""]

    def table(title: str, data: dict, col: str = "count") -> None:
        lines.extend([f"| {title} | {col} |", "| --- | ---: |"])
        lines.extend(f"| {k} | {v} |" for k, v in data.items())
        lines.append("")

    table("category", report["dialogues_by_category"], "dialogues")
    table("split", report["dialogues_by_split"], "dialogues")
    table("persona", report["dialogues_by_persona"], "dialogues")
    table("language", {k: f"{v} utt, {report['hours_by']['language'][k]:.2f} h" for k, v in report["utterances_by_language"].items()}, "utterances, hours")
    table("language-accent", report["utterances_by_accent"], "utterances")
    table("NPC voice", report["npc_utterances_by_voice"], "answers")
    table("player voices per split", report["player_voices"], "voices")
    table("player engine", report["player_utterances_by_engine"], "questions")
    table("split", report["hours_by"]["split"], "hours")
    return "\n".join(lines)
