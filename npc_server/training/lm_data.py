"""Backbone training data: corpus readers, audio-token caches, and the token sequences of each training stage.

Stages (all built with the chat template, so pretraining already speaks the serving format):
- pretrain: ASR-like (player/NPC audio -> text, <|task:asr|>), TTS-like (text -> the NPC voice's text+audio
  blocks, <|task:tts|>, with the utterance's controls), audio continuation (an utterance's interleaved tokens as
  a plain sequence), and text (every corpus sentence as a plain sequence).
- sft: dialogues.jsonl: persona system turn with the answer's controls, earlier turns of the conversation as
  typed text with text-only answers, then the spoken question -> the spoken answer (audio_text blocks). A
  deterministic share of rows uses typed text + audio input, text-only or audio-only output so every mode is seen.
- dpo: the same prompt with the chosen answer (answer_text) and the rejected one (rejected_text), both laid out
  in audio_text blocks over the chosen answer's audio; the DPO loss reads KIND_TEXT positions only.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.backbone.template import (
    KIND_TEXT,
    AssistantTurn,
    ChatTemplate,
    Encoded,
    Mode,
    SystemPrompt,
    UserTurn,
)
from npc_server.controls import ACCENTS, EMOTIONS, PITCH_RANGE_ST, SPEED_RANGE, Controls
from npc_server.training.corpus.manifest import read_jsonl, read_manifest
from npc_server.voices import VOICE_BANK

log = logging.getLogger(__name__)

IGNORE = -100


# --- corpus ----------------------------------------------------------------------------------------------------
def load_dialogues(corpus_dir: str | Path, split: str | None = None) -> list[dict]:
    rows = read_jsonl(Path(corpus_dir) / "dialogues.jsonl")
    return [r for r in rows if split is None or r["split"] == split]


# --- audio token caches ----------------------------------------------------------------------------------------
class TokenCache:
    """A folder of <utterance id>.npz files with int arrays `linguistic`, `semantic`, `interleaved`."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"no token cache at {self.dir} (run tokenize_corpus or --synthetic-tokens)")

    def path(self, utt_id: str) -> Path:
        return self.dir / f"{utt_id}.npz"

    def __contains__(self, utt_id: str) -> bool:
        return self.path(utt_id).is_file()

    def get(self, utt_id: str) -> dict[str, np.ndarray]:
        path = self.path(utt_id)
        if not path.is_file():
            raise KeyError(f"utterance {utt_id!r} is not in the token cache {self.dir}")
        with np.load(path) as data:
            return {k: data[k].astype(np.int64) for k in ("linguistic", "semantic", "interleaved")}


def save_tokens(path: Path, linguistic, semantic, interleaved) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, linguistic=np.asarray(linguistic, dtype=np.int16),
             semantic=np.asarray(semantic, dtype=np.int16), interleaved=np.asarray(interleaved, dtype=np.int16))
    tmp.replace(path)


def tokenize_corpus(corpus_dir: str | Path, tokenizer, out_dir: str | Path, splits: Iterable[str] | None = None,
                    rank: int = 0, world: int = 1) -> int:
    """Encode every manifest utterance with an `AudioTokenizer` (tokenizer contract) into `out_dir`.
    Resumable: utterances already cached are skipped. With rank/world, each process takes every world-th row.
    Returns the number of newly encoded utterances."""
    from npc_server.audio.io import load_audio

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_manifest(corpus_dir) if splits is None or r["split"] in set(splits)]
    rows = rows[rank::world]
    done = 0
    for row in tqdm(rows, desc="tokenize corpus", disable=rank != 0):
        path = out_dir / f"{row['id']}.npz"
        if path.is_file():
            continue
        wav, sr = load_audio(corpus_dir / row["audio"])
        toks = tokenizer.encode(wav, sr)
        save_tokens(path, toks.linguistic.cpu().numpy(), toks.semantic.cpu().numpy(),
                    toks.interleaved.cpu().numpy())
        done += 1
    return done


# --- personas --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PersonaInfo:
    """What the serving engine puts in a persona's system turn: its text and its default controls."""

    text: str
    controls: Controls


def persona_infos(personas_dir: str | Path | None) -> dict[str, PersonaInfo]:
    """Persona role (and id) -> system text + default controls, as the engine builds them from the persona YAML
    folder. Roles without a YAML (or with no folder) fall back to the corpus world's persona, with no text."""
    from npc_server.training.corpus.world import PERSONAS

    out: dict[str, PersonaInfo] = {}
    for role, p in PERSONAS.items():
        out[role] = PersonaInfo("", Controls(voice=p.voice, language=p.language, accent=p.accent,
                                             emotion=p.default_emotion))
    if personas_dir is not None and Path(personas_dir).is_dir():
        from npc_server.personas import load_folder

        personas, errors = load_folder(personas_dir)
        for err in errors:
            log.warning("persona skipped: %s", err)
        for p in personas.values():
            info = PersonaInfo(p.prompt_text(), Controls.from_persona(p))
            out[p.role] = out[p.id] = info
    return out


def persona_texts(personas_dir: str | Path | None) -> dict[str, str]:
    """Persona id/role -> system text (empty when unavailable)."""
    return {k: v.text for k, v in persona_infos(personas_dir).items() if v.text}


# Categories whose control change is asked for in the spoken question itself ("Say it slowly.", "answer in
# Japanese"): the prompt carries no override, the model has to hear the request.
SPOKEN_CONTROL_CATEGORIES = ("control", "language")


def dialogue_prompt(row: dict, personas: dict[str, PersonaInfo]) -> tuple[SystemPrompt, Controls | None]:
    """System turn (persona text + persona default controls, as the engine builds it) and the per-turn control
    override of a dialogue row: the row's controls when they differ from the persona's defaults, except for the
    spoken-request categories."""
    requested = controls_of(row, row["npc_voice"])
    info = personas.get(row["persona"])
    base = info.controls if info else Controls(voice=requested.voice, language=requested.language,
                                               accent=requested.accent)
    system = SystemPrompt(persona=row["persona"], text=info.text if info else "", controls=base)
    if row.get("category") in SPOKEN_CONTROL_CATEGORIES or requested == base:
        return system, None
    return system, requested


def controls_of(row: dict, voice: str) -> Controls:
    """Control tokens of a corpus row. Player rows may carry accents outside ACCENTS (e.g. "us-nyc") and speeds or
    pitches of the player's voice: those fall back to the language's default accent and are clamped to range."""
    c = row.get("controls", {})
    language = row.get("language", "en")
    accent = row.get("accent")
    if accent not in ACCENTS[language]:
        accent = ACCENTS[language][0]
    speed = min(max(float(c.get("speed", 1.0)), SPEED_RANGE[0]), SPEED_RANGE[1])
    pitch = min(max(float(c.get("pitch_st", 0.0)), PITCH_RANGE_ST[0]), PITCH_RANGE_ST[1])
    emotion = c.get("emotion", "neutral")
    return Controls(voice=voice, language=language, accent=accent, emotion=emotion if emotion in EMOTIONS else "neutral",
                    speed=speed, pitch_st=pitch)


def _bucket(key: str, n: int = 100) -> int:
    """Deterministic 0..n-1 bucket of a string (stable across processes, unlike hash())."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % n


# --- examples --------------------------------------------------------------------------------------------------
@dataclass
class PairExample:
    chosen: Encoded
    rejected: Encoded


def plain_sequence(template: ChatTemplate, text: str | None = None, audio=None) -> Encoded:
    """<|bos|> text <|eos|> or <|bos|> <|audio_start|> interleaved audio <|audio_end|> <|eos|>, all targets."""
    enc = Encoded()
    sp = template.sp
    enc.add([sp("<|bos|>")], 0, False)
    if text is not None:
        enc.add(template.text.encode(text), KIND_TEXT, True)
    if audio is not None:
        enc.add([sp("<|audio_start|>")], 0, True)
        enc.add(template.layout.audio_ids(list(audio)), 2, True)
        enc.add([sp("<|audio_end|>")], 0, True)
    enc.add([sp("<|eos|>")], 0, True)
    return enc


PRETRAIN_TASKS = ("asr", "tts", "continuation", "text")


def parse_tasks(text: str) -> list[str]:
    """"asr, tts" (a --tasks / --pretrain-tasks value) -> ["asr", "tts"]; pretrain_examples checks the names."""
    return [t.strip() for t in text.split(",") if t.strip()]


def pretrain_examples(corpus_dir: str | Path, cache: TokenCache, template: ChatTemplate,
                      split: str = "train", tasks: Iterable[str] = PRETRAIN_TASKS) -> list[Encoded]:
    """The pretraining sequences of `split`, of the chosen `tasks` (see the module docstring)."""
    tasks = set(tasks)
    unknown = tasks - set(PRETRAIN_TASKS)
    if unknown:
        raise ValueError(f"unknown pretraining task(s) {sorted(unknown)}; choose from {', '.join(PRETRAIN_TASKS)}")
    out: list[Encoded] = []
    texts: set[str] = set()
    missing = 0
    for row in read_manifest(corpus_dir):
        if row["split"] != split:
            continue
        texts.add(row["text"])
        if row["id"] not in cache:
            missing += 1
            continue
        toks = cache.get(row["id"])
        voice = row["speaker"] if row["speaker"] in VOICE_BANK else "joe"
        controls = controls_of(row, voice)
        if "asr" in tasks:  # ASR-like: audio -> text
            asr = template.system(SystemPrompt(persona="custom", controls=controls, task="asr"))
            asr.extend(template.user(UserTurn(audio=toks["interleaved"])))
            asr.extend(template.assistant(AssistantTurn(text=row["text"], mode=Mode.TEXT)))
            out.append(asr)
        if "continuation" in tasks:
            out.append(plain_sequence(template, audio=toks["interleaved"]))
        # TTS-like: text -> the voice's text+audio blocks (only for voice-bank speakers: the NPC voices)
        if "tts" in tasks and row["speaker"] in VOICE_BANK:
            # half of them carry emotion/speed/pitch as a per-turn override, the way SFT and serving do
            as_override = _bucket("tts:" + row["id"]) < 50
            base = Controls(voice=controls.voice, language=controls.language, accent=controls.accent)
            tts = template.system(SystemPrompt(persona="custom", controls=base if as_override else controls,
                                               task="tts"))
            tts.extend(template.user(UserTurn(text=row["text"], controls=controls if as_override else None)))
            tts.extend(template.assistant(AssistantTurn(text=row["text"], audio=toks["semantic"])))
            out.append(tts)
    for d in load_dialogues(corpus_dir, split):
        texts.update([d["question_text"], d["answer_text"]])
    if "text" in tasks:
        out += [plain_sequence(template, text=t) for t in sorted(texts)]
    if missing:
        log.warning("%d utterances of split %s are not in the token cache", missing, split)
    return out


def _dialogue_prompt(row: dict, cache: TokenCache, template: ChatTemplate, personas: dict[str, PersonaInfo],
                     variant: int) -> tuple[Encoded, Mode] | None:
    """System + history + the current question + assistant prefix. `variant` (0..99) picks the input form."""
    q_id = row["question_audio_id"]
    if q_id not in cache:
        return None
    q_audio = cache.get(q_id)["interleaved"]
    system, override = dialogue_prompt(row, personas)
    enc = template.system(system)
    for turn in row.get("history", []):
        enc.extend(template.user(UserTurn(text=turn["question"])))
        enc.extend(template.assistant(AssistantTurn(text=turn["answer"], mode=Mode.TEXT), target=False))
    if variant < 8:  # typed text only
        user = UserTurn(text=row["question_text"], controls=override)
    elif variant < 16:  # audio plus the same question typed
        user = UserTurn(audio=q_audio, text=row["question_text"], controls=override)
    else:
        user = UserTurn(audio=q_audio, controls=override)
    enc.extend(template.user(user))
    mode = Mode.TEXT if 90 <= variant < 95 else Mode.AUDIO if variant >= 95 else Mode.AUDIO_TEXT
    enc.extend(template.assistant_prefix(mode))
    return enc, mode


def sft_examples(corpus_dir: str | Path, cache: TokenCache, template: ChatTemplate, split: str = "train",
                 personas_dir: str | Path | None = None, vary: bool = True) -> list[Encoded]:
    personas = persona_infos(personas_dir)
    out = []
    for row in load_dialogues(corpus_dir, split):
        variant = _bucket(row["id"]) if vary else 50
        prompt = _dialogue_prompt(row, cache, template, personas, variant)
        if prompt is None or row["answer_audio_id"] not in cache:
            continue
        enc, mode = prompt
        answer = AssistantTurn(text=row["answer_text"], audio=cache.get(row["answer_audio_id"])["semantic"],
                               mode=mode)
        out.append(enc.extend(template.assistant_body(answer)))
    return out


def sft_training_set(corpus_dir: str | Path, cache: TokenCache, template: ChatTemplate, personas_dir,
                     pretrain_mix: float, seed: int, max_len: int,
                     pretrain_tasks: Iterable[str] = PRETRAIN_TASKS) -> list[Encoded]:
    """The SFT training examples (train split) plus `pretrain_mix` x as many shuffled pretraining sequences (of
    `pretrain_tasks`) against forgetting, without those longer than `max_len`: what `train sft` and `train draft`
    learn from. A mix above 1 repeats the pretraining sequences as needed."""
    examples = sft_examples(corpus_dir, cache, template, split="train", personas_dir=personas_dir)
    if not examples:
        raise ValueError(f"no SFT examples: are the dialogue audio ids of {corpus_dir} in the token cache?")
    if pretrain_mix > 0:
        extra = pretrain_examples(corpus_dir, cache, template, split="train", tasks=pretrain_tasks)
        random.Random(seed).shuffle(extra)
        want = int(len(examples) * pretrain_mix)
        if extra:
            examples += (extra * (want // len(extra) + 1))[:want]
    return fit_length(examples, max_len)


def dpo_examples(corpus_dir: str | Path, cache: TokenCache, template: ChatTemplate, split: str = "train",
                 personas_dir: str | Path | None = None) -> list[PairExample]:
    personas = persona_infos(personas_dir)
    out = []
    for row in load_dialogues(corpus_dir, split):
        rejected_text = row.get("rejected_text")
        if not rejected_text or rejected_text == row["answer_text"] or row["answer_audio_id"] not in cache:
            continue
        prompt = _dialogue_prompt(row, cache, template, personas, variant=50)
        if prompt is None:
            continue
        enc, mode = prompt
        audio = cache.get(row["answer_audio_id"])["semantic"]
        chosen = Encoded(list(enc.ids), list(enc.kinds), list(enc.targets))
        rejected = Encoded(list(enc.ids), list(enc.kinds), list(enc.targets))
        chosen.extend(template.assistant_body(AssistantTurn(text=row["answer_text"], audio=audio, mode=mode)))
        rejected.extend(template.assistant_body(AssistantTurn(text=rejected_text, audio=audio, mode=mode)))
        out.append(PairExample(chosen, rejected))
    return out


# --- batching --------------------------------------------------------------------------------------------------
def fit_length(examples: list, max_len: int) -> list:
    """Drop examples longer than max_len (pairs: if either side is)."""
    def length(e) -> int:
        return max(len(e.chosen), len(e.rejected)) if isinstance(e, PairExample) else len(e)

    kept = [e for e in examples if length(e) <= max_len]
    if len(kept) < len(examples):
        log.warning("dropped %d of %d examples longer than %d tokens", len(examples) - len(kept), len(examples),
                    max_len)
    if not kept:
        raise ValueError(f"no training examples fit in {max_len} tokens (of {len(examples)})")
    return kept


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE where not a target), kinds."""
    width = max(len(e) for e in examples)
    b = len(examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    kinds = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        t = torch.tensor(e.ids)
        labels[i, :n] = torch.where(torch.tensor(e.targets), t, torch.full_like(t, IGNORE))
        kinds[i, :n] = torch.tensor(e.kinds)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "kinds": kinds}


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one padded batch."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["n_pairs"] = torch.tensor(len(pairs))
    return batch
