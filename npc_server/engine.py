"""The answer pipeline: question audio -> audio tokens -> backbone (text + audio tokens) -> vocoder -> PCM chunks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from npc_server.backbone.template import AssistantTurn, Mode, SystemPrompt, UserTurn
from npc_server.controls import Controls

__all__ = ["Controls", "Engine", "EngineAudio", "EngineDone", "EngineState", "EngineText", "QuestionStream"]

# subtitle text leaves in pieces of at most this many tokens (one AQAA text part), or with the next audio: one
# message per token would cost a scheduler step and a network message each for no gain (the audio follows the text)
TEXT_FLUSH_TOKENS = 10

# the service's output modes -> the template's answer modes
_MODES = {"audio_and_text": Mode.AUDIO_TEXT, "text_only": Mode.TEXT, "audio_only": Mode.AUDIO}


@dataclass
class EngineText:
    text: str


@dataclass
class EngineAudio:
    wav: np.ndarray  # float32 mono
    sample_rate: int


@dataclass
class EngineLipSync:
    events: object  # talker.lipsync.LipSyncEvents: visemes and word timings on the answer's audio time line


@dataclass
class EngineDone:
    spoken_text: str
    timings: dict  # keys of service.api.Timings (milliseconds and token counts)


@dataclass
class _Spoken:
    """What had been produced when an audio chunk left: used to cut the history at an interruption."""

    audio_end_s: float  # answer time at the end of this chunk
    text: str  # subtitle text produced before this chunk
    codes: list[int]  # semantic codes up to and including this chunk


@dataclass
class EngineState:
    """Per-conversation state: the backbone session (KV cache) and the progress of the answer in flight."""

    session: object  # backbone.generator.Session
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: bool = False  # an answer's tokens are in the session (its last segment)
    prompt_len: int = 0  # tokens of that segment before the answer body
    mode: Mode = Mode.AUDIO_TEXT
    progress: list[_Spoken] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question text or "<audio>", spoken answer)

    def memory_bytes(self) -> int:
        """KV-cache bytes of the conversation (see `Session.memory_bytes`)."""
        return self.session.memory_bytes()


class QuestionStream:
    """Tokenizes a question while it arrives: push() audio chunks at any rate, finish() returns the audio ids.

    Equal to encoding the whole question at once (the tokenizer's streaming encoder is exact)."""

    def __init__(self, tokenizer, sample_rate: int):
        self._stream = tokenizer.stream(sample_rate)
        self._parts: list[torch.Tensor] = []

    def push(self, wav: np.ndarray) -> None:
        ids = self._stream.push(wav).interleaved
        if len(ids):
            self._parts.append(ids)

    def finish(self) -> torch.Tensor:
        self._parts.append(self._stream.flush().interleaved)
        return torch.cat(self._parts)


class Engine:
    """Holds the three trained components and runs answers. One `answer()` generator per request.

    Every `next()` of an answer does a bounded amount of work (one text/audio block), so the service's
    scheduler can interleave many answers fairly.
    """

    def __init__(self, tokenizer, generator, vocoder, sampling=None, name: str = "npc-voice"):
        from npc_server.backbone.generator import SamplingConfig

        self.tokenizer = tokenizer
        self.generator = generator
        self.vocoder = vocoder
        self.sampling = sampling or SamplingConfig(temperature=0.0, max_new_tokens=768)
        self.name = name
        self.sample_rate = int(vocoder.sample_rate)
        self._prefix_cache: dict[SystemPrompt, object] = {}  # system prompt -> prefilled generator session
        self._prefix_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, threads: int | None = None, draft: bool = True,
                        device: str = "cpu", buffered_lookahead: int | None = None) -> "Engine":
        """Load models/<name>/{tokenizer,backbone,vocoder} (each safetensors + config.json), and the optional
        draft backbone models/<name>/draft for speculative audio decoding unless `draft` is False. `device` places
        the backbone (e.g. "cuda": transformers with flash-attn when the `gpu` extra is installed, else SDPA); the
        tokenizer and vocoder stay on the CPU. `buffered_lookahead` overrides the vocoder stream's
        `buffered_lookahead_tokens` (None keeps its config.json's)."""
        from npc_server.backbone.generator import Generator
        from npc_server.tokenizer import AudioTokenizer
        from npc_server.vocoder import Vocoder

        model_dir = Path(model_dir)
        missing = [c for c in ("tokenizer", "backbone", "vocoder") if not (model_dir / c / "config.json").exists()]
        if missing:
            raise FileNotFoundError(f"model folder {model_dir} lacks trained component(s): {', '.join(missing)}")
        if threads:
            torch.set_num_threads(threads)
        tokenizer = AudioTokenizer.from_pretrained(model_dir / "tokenizer")
        draft_dir = model_dir / "draft"
        use_draft = draft and (draft_dir / "config.json").is_file()
        generator = Generator.from_pretrained(model_dir / "backbone", draft=draft_dir if use_draft else None,
                                              device=device)
        vocoder = Vocoder.from_pretrained(model_dir / "vocoder")
        if buffered_lookahead is not None:
            vocoder.stream_config = replace(vocoder.stream_config, buffered_lookahead_tokens=buffered_lookahead)
            vocoder.stream_config.validate(vocoder.samples_per_token)
        return cls(tokenizer, generator, vocoder, name=f"npc-voice/{model_dir.name}")

    def enable_batching(self, lanes: int = 1) -> bool:
        """Batch the decode steps of answers that run concurrently on several threads (backbone/batching.py), with
        up to `lanes` batches computed at once (one per core)."""
        return self.generator.enable_batching(lanes=lanes)

    # ---- sessions ----------------------------------------------------------------------------------------

    def system_prompt(self, persona, controls: Controls | None = None) -> SystemPrompt:
        controls = controls or Controls.from_persona(persona)
        return SystemPrompt(persona=persona.role, text=persona.prompt_text(), controls=controls)

    def new_state(self, persona) -> EngineState:
        """A conversation with `persona`. The system prompt's KV cache is computed once per persona version
        (prefix cache) and copied into each new conversation; follow-up turns only prefill the new turn."""
        system = self.system_prompt(persona)
        with self._prefix_lock:
            base = self._prefix_cache.get(system)
            if base is None:
                base = self.generator.start_session(system)
                if len(self._prefix_cache) >= 64:
                    self._prefix_cache.pop(next(iter(self._prefix_cache)))
                self._prefix_cache[system] = base
        return EngineState(session=base.fork())

    # ---- answering ---------------------------------------------------------------------------------------

    def listen(self, sample_rate: int, state: EngineState | None = None) -> QuestionStream:
        """Start tokenizing a question that arrives in chunks (pass the QuestionStream to `answer` as `audio`).
        `state` (the conversation it is asked in) is not used: model v1's prefill is cheap enough at the end."""
        return QuestionStream(self.tokenizer, sample_rate)

    def answer(
        self,
        state: EngineState,
        persona,
        controls: Controls,
        audio: np.ndarray | QuestionStream | None = None,
        text: str = "",
        mode: str = "audio_and_text",
        load: Callable[[], int] | None = None,
        lip_sync: bool = False,
    ) -> Iterator[EngineText | EngineAudio | EngineDone]:
        """Stream the answer to one question: 16 kHz float32 audio (or a QuestionStream that heard it) and/or text.

        `lip_sync` is accepted and ignored: model v1 writes audio tokens with no alignment to the text, so it has no
        lip-sync events to give (model v2's talker has, see engine_v2).

        `load()`: answers the server is running now. When the first audio is ready and n > 1 answers share the
        cores, the first chunk is n times longer (at most one regular chunk): each answer then advances more slowly,
        and a 200 ms first chunk would run dry before the next one is ready."""
        t0 = time.perf_counter()
        audio_ids = None
        if isinstance(audio, QuestionStream):
            audio_ids = audio.finish()
        elif audio is not None:
            audio_ids = self.tokenizer.encode(audio, 16000).interleaved
        t_tok = time.perf_counter()

        session = state.session
        cached_tokens = session.cached_tokens  # reused from the KV cache: the system prompt and earlier turns
        turn_controls = controls if controls != session.system.controls else None
        user = UserTurn(audio=audio_ids, text=text or None, controls=turn_controls)
        answer_mode = _MODES[mode]
        state.prompt_len = len(self.generator.template.user(user).ids) + len(
            self.generator.template.assistant_prefix(answer_mode).ids
        )
        state.mode = answer_mode
        state.progress = []

        voc = None
        if answer_mode != Mode.TEXT:
            pitch = self.vocoder.request_pitch(controls.pitch_st, controls.emotion)
            voc = self.vocoder.stream(voice=controls.voice, pitch_st=pitch)
        vocoder_s = 0.0
        text_so_far = ""
        unsent_text, unsent_tokens = "", 0  # subtitle text not yet yielded (see TEXT_FLUSH_TOKENS)
        codes: list[int] = []
        audio_s = 0.0
        # ~45 tokens per second of answer (15 audio + 10 text + 2 markers per 0.6 s block)
        budget = int(persona.max_answer_seconds * 45) + 16
        sampling = replace(self.sampling, max_new_tokens=min(self.sampling.max_new_tokens, budget))
        # the vocoder's first chunk needs first_chunk_tokens + lookahead codes: hand them over before the span ends
        stream_cfg = self.vocoder.stream_config
        early = stream_cfg.first_chunk_tokens + stream_cfg.lookahead_tokens
        events = self.generator.respond(session, user, mode=answer_mode, sampling=sampling, early_audio=early)
        try:
            for ev in events:
                state.in_flight = True
                kind = type(ev).__name__
                if kind == "TextDelta":
                    text_so_far += ev.text
                    unsent_text += ev.text
                    unsent_tokens += 1
                    if unsent_tokens >= TEXT_FLUSH_TOKENS:
                        yield EngineText(unsent_text)
                        unsent_text, unsent_tokens = "", 0
                    continue
                if unsent_text:  # the text of a block leaves before its audio (and before the end message)
                    yield EngineText(unsent_text)
                    unsent_text, unsent_tokens = "", 0
                if kind == "AudioChunk":
                    if not codes and load is not None:
                        voc.share_cores(int(load()))
                    codes += ev.codes.tolist()
                    # each vocoder chunk leaves as soon as it is decoded (the first one is short: fast first audio)
                    chunks = voc.push_chunks(ev.codes.tolist())
                    while True:
                        tv = time.perf_counter()
                        wav = next(chunks, None)
                        vocoder_s += time.perf_counter() - tv
                        if wav is None:
                            break
                        audio_s += len(wav) / self.sample_rate
                        state.progress.append(_Spoken(audio_s, text_so_far, list(codes)))
                        if wav.size:
                            yield EngineAudio(wav, self.sample_rate)
                elif kind == "TurnEnd":
                    if voc is not None and codes:
                        tv = time.perf_counter()
                        wav = voc.flush()
                        vocoder_s += time.perf_counter() - tv
                        if wav.size:
                            yield EngineAudio(wav, self.sample_rate)
                    state.progress = []
                    state.in_flight = False
                    state.turns.append((text or "<audio>", ev.text))
                    yield EngineDone(
                        spoken_text=ev.text,
                        timings=dict(
                            tokenize_ms=(t_tok - t0) * 1000,
                            prefill_ms=ev.prefill_s * 1000,
                            decode_ms=ev.decode_s * 1000 - vocoder_s * 1000,
                            vocoder_ms=vocoder_s * 1000,
                            prefill_tokens=ev.prefill_tokens,
                            generated_tokens=ev.generated_tokens,
                            cached_tokens=cached_tokens,
                        ),
                    )
        finally:
            events.close()

    def interrupted(self, state: EngineState, spoken_seconds: float) -> None:
        """The client stopped listening after `spoken_seconds` of audio: rewrite the answer in the history to
        what was actually spoken (text and audio up to the chunk that was playing)."""
        session = state.session
        if not state.in_flight:
            return  # the answer never started: nothing was added to the conversation
        # the chunk that was playing when the client stopped counts as spoken
        last = None
        for p in state.progress:
            last = p
            if p.audio_end_s >= spoken_seconds:
                break
        if spoken_seconds <= 0:
            last = None
        spoken_text = last.text if last else ""
        spoken_codes = last.codes if last else []
        # the answer is the last segment: cut it back to its prompt, then write what was spoken
        session.rewind(sum(len(seg) for seg in session.segments[:-1]) + state.prompt_len)
        body = self.generator.template.assistant_body(
            AssistantTurn(text=spoken_text, audio=spoken_codes, mode=state.mode), target=False
        ).ids
        self.generator.prefill(session, body[:-1], new_segment=False)  # the answer stays in its turn
        session.pending = body[-1:]  # like a finished answer: its last token is fed with the next turn
        state.turns.append(("<interrupted>", spoken_text))
        state.progress = []
        state.in_flight = False
