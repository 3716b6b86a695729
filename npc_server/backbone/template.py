"""The chat template: system (persona + controls), user (audio tokens + optional text), assistant (text/audio blocks).

A conversation is laid out as

    <|bos|>
    <|system|> <|persona:P|> <|voice:V|> <|lang:L|> <|accent:A|> <|emotion:E|> <|speed:S|> <|pitch:H|> persona text <|end|>
    <|user|> [per-turn control tokens] [<|audio_start|> interleaved audio <|audio_end|>] [typed text] <|end|>
    <|assistant|> <|mode:M|> answer body <|end|>
    <|user|> ... (follow-up turns)

Pretraining examples use a task token (<|task:tts|>, <|task:asr|>, <|task:continue|>) in place of the persona.

User audio is the tokenizer's interleaved stream (2 linguistic + 3 semantic ids per 120 ms). The answer's audio
carries **semantic tokens only** (25 Hz): they are what the vocoder consumes, and dropping the linguistic stream
makes each 15-token audio block 600 ms of speech instead of 360 ms, so fewer tokens are generated per second of
audio (25/s instead of 41.7/s) and the text channel (the subtitle) carries the linguistic content.

Answer body in mode audio_text (AQAA blocks of 10 text then 15 audio tokens):

    T*10 <|audio_start|> A*15 <|audio_end|> T*10 <|audio_start|> A*15 <|audio_end|> ... T*k <|text_end|> ...

- A text part holds at most 10 tokens; `<|text_end|>` (counted as a text slot) ends the text for good.
- An audio span holds at most 15 semantic tokens; a span shorter than 15 (possibly empty) ends the audio.
- Once the audio has ended, the rest of the text follows in one part, then `<|text_end|>`.
- Once the text has ended, audio spans follow back to back; after a full span `<|end|>` may also end the audio.
- The body ends with `<|end|>` when both text and audio have ended.

Mode text: `T* <|text_end|> <|end|>`.  Mode audio: `<|audio_start|> A*15 <|audio_end|> ... <|end|>`
(the same span rules). `BlockGrammar` is the state machine of these rules, used for constrained decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from npc_server.backbone.text_tokenizer import TextTokenizer
from npc_server.backbone.vocab import N_LINGUISTIC, VocabLayout, persona_token
from npc_server.controls import Controls  # noqa: F401  (re-exported: the template's controls)

BLOCK_TEXT = 10
BLOCK_AUDIO = 15

# Token kinds per position (used for loss masks: DPO counts KIND_TEXT positions only).
KIND_SPECIAL = 0
KIND_TEXT = 1  # text tokens and <|text_end|>
KIND_AUDIO = 2


class Mode(str, Enum):
    AUDIO_TEXT = "audio_text"
    TEXT = "text"
    AUDIO = "audio"

    @property
    def token(self) -> str:
        return f"<|mode:{self.value}|>"


@dataclass(frozen=True)
class SystemPrompt:
    persona: str  # persona id (e.g. "innkeeper"), unknown ids use <|persona:custom|>
    text: str = ""  # persona description / instructions
    controls: Controls = field(default_factory=Controls)
    task: str | None = None  # pretraining task ("tts", "asr", "continue") instead of a persona


@dataclass(frozen=True)
class UserTurn:
    audio: Sequence[int] | torch.Tensor | None = None  # tokenizer interleaved ids (0..5119)
    text: str | None = None  # typed text (or the question itself when there is no audio)
    controls: Controls | None = None  # per-turn override of the system controls

    def __post_init__(self) -> None:
        if (self.audio is None or len(self.audio) == 0) and not self.text:
            raise ValueError("a user turn needs audio tokens, text, or both")


@dataclass(frozen=True)
class AssistantTurn:
    text: str = ""
    audio: Sequence[int] | torch.Tensor = ()  # semantic codes (0..4095)
    mode: Mode = Mode.AUDIO_TEXT


@dataclass
class Encoded:
    """Token ids with, per position, their kind and whether they are a training target of the answer."""

    ids: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)

    def add(self, ids: Sequence[int], kind: int, target: bool = False) -> None:
        ids = [int(i) for i in ids]
        self.ids += ids
        self.kinds += [kind] * len(ids)
        self.targets += [target] * len(ids)

    def extend(self, other: Encoded) -> Encoded:
        self.ids += other.ids
        self.kinds += other.kinds
        self.targets += other.targets
        return self

    def __len__(self) -> int:
        return len(self.ids)


class ChatTemplate:
    """Encodes conversations to backbone ids and decodes answers back to (text, semantic codes)."""

    def __init__(self, layout: VocabLayout, text_tokenizer: TextTokenizer):
        if text_tokenizer.vocab_size > layout.n_text:
            raise ValueError(
                f"text tokenizer has {text_tokenizer.vocab_size} tokens but the layout reserves {layout.n_text}"
            )
        self.layout = layout
        self.text = text_tokenizer

    def sp(self, name: str) -> int:
        return self.layout.special(name)

    # --- encoding ---------------------------------------------------------------------------------------
    def system(self, prompt: SystemPrompt, bos: bool = True) -> Encoded:
        enc = Encoded()
        if bos:
            enc.add([self.sp("<|bos|>")], KIND_SPECIAL)
        head = f"<|task:{prompt.task}|>" if prompt.task else persona_token(prompt.persona)
        enc.add([self.sp("<|system|>"), self.sp(head)], KIND_SPECIAL)
        enc.add([self.sp(t) for t in prompt.controls.token_names()], KIND_SPECIAL)
        if prompt.text:
            enc.add(self.text.encode(prompt.text), KIND_TEXT)
        enc.add([self.sp("<|end|>")], KIND_SPECIAL)
        return enc

    def user(self, turn: UserTurn) -> Encoded:
        enc = Encoded()
        enc.add([self.sp("<|user|>")], KIND_SPECIAL)
        if turn.controls is not None:
            enc.add([self.sp(t) for t in turn.controls.token_names()], KIND_SPECIAL)
        if turn.audio is not None and len(turn.audio) > 0:
            enc.add([self.sp("<|audio_start|>")], KIND_SPECIAL)
            enc.add(self.layout.audio_ids(list(_as_list(turn.audio))), KIND_AUDIO)
            enc.add([self.sp("<|audio_end|>")], KIND_SPECIAL)
        if turn.text:
            enc.add(self.text.encode(turn.text), KIND_TEXT)
        enc.add([self.sp("<|end|>")], KIND_SPECIAL)
        return enc

    def assistant_prefix(self, mode: Mode) -> Encoded:
        enc = Encoded()
        enc.add([self.sp("<|assistant|>"), self.sp(Mode(mode).token)], KIND_SPECIAL)
        return enc

    def assistant_body(self, turn: AssistantTurn, target: bool = True) -> Encoded:
        """The answer body (after the prefix), ending with <|end|>, laid out in blocks per the module docstring."""
        mode = Mode(turn.mode)
        text_ids = self.text.encode(turn.text) if turn.text else []
        audio_ids = self.layout.semantic_ids(list(_as_list(turn.audio)))
        if mode is Mode.TEXT:
            audio_ids = []
        if mode is Mode.AUDIO:
            text_ids = []
        enc = Encoded()
        text_end, a_start, a_end, end = (self.sp(n) for n in ("<|text_end|>", "<|audio_start|>", "<|audio_end|>",
                                                             "<|end|>"))
        text_done = mode is Mode.AUDIO
        audio_done = mode is Mode.TEXT
        ti = ai = 0
        while not (text_done and audio_done):
            if not text_done:
                limit = len(text_ids) if audio_done else BLOCK_TEXT
                chunk = text_ids[ti:ti + limit]
                ti += len(chunk)
                enc.add(chunk, KIND_TEXT, target)
                if ti == len(text_ids) and (audio_done or len(chunk) < BLOCK_TEXT):
                    enc.add([text_end], KIND_TEXT, target)
                    text_done = True
            if not audio_done:
                span = audio_ids[ai:ai + BLOCK_AUDIO]
                ai += len(span)
                enc.add([a_start], KIND_SPECIAL, target)
                enc.add(span, KIND_AUDIO, target)
                enc.add([a_end], KIND_SPECIAL, target)
                if len(span) < BLOCK_AUDIO or (text_done and ai == len(audio_ids)):
                    audio_done = True
        enc.add([end], KIND_SPECIAL, target)
        return enc

    def assistant(self, turn: AssistantTurn, target: bool = True) -> Encoded:
        return self.assistant_prefix(turn.mode).extend(self.assistant_body(turn, target))

    def conversation(
        self,
        system: SystemPrompt,
        turns: Sequence[tuple[UserTurn, AssistantTurn | None]],
        target_all_answers: bool = False,
    ) -> Encoded:
        """A whole conversation. Only the last answer is a target unless `target_all_answers`. A final turn
        with answer None ends with the assistant prefix of `Mode.AUDIO_TEXT` (a generation prompt)."""
        enc = self.system(system)
        for i, (user, answer) in enumerate(turns):
            enc.extend(self.user(user))
            if answer is None:
                if i != len(turns) - 1:
                    raise ValueError("only the last turn may lack an answer")
                enc.extend(self.assistant_prefix(Mode.AUDIO_TEXT))
            else:
                enc.extend(self.assistant(answer, target=target_all_answers or i == len(turns) - 1))
        return enc

    # --- decoding ---------------------------------------------------------------------------------------
    def decode_assistant(self, ids: Sequence[int]) -> AssistantTurn:
        """Body ids (optionally with the <|assistant|> <|mode|> prefix) -> text and semantic codes. Tolerates
        a truncated body (no <|end|>)."""
        ids = [int(i) for i in _as_list(ids)]
        mode = Mode.AUDIO_TEXT
        text_ids: list[int] = []
        audio: list[int] = []
        in_audio = False
        for tok in ids:
            if self.layout.is_text(tok):
                text_ids.append(tok)
            elif self.layout.is_audio(tok):
                if not in_audio:
                    raise ValueError(f"audio token {tok} outside an audio span")
                if not self.layout.is_semantic(tok):
                    raise ValueError(f"answer audio must be semantic tokens, got linguistic id {tok}")
                audio.append(tok - self.layout.audio_offset - N_LINGUISTIC)
            elif self.layout.is_special(tok):
                name = self.layout.special_name(tok)
                if name.startswith("<|mode:"):
                    mode = Mode(name[len("<|mode:"):-2])
                elif name == "<|audio_start|>":
                    in_audio = True
                elif name == "<|audio_end|>":
                    in_audio = False
                elif name == "<|end|>":
                    break
            else:
                raise ValueError(f"id {tok} is outside the vocabulary")
        return AssistantTurn(text=self.text.decode(text_ids), audio=audio, mode=mode)

    def render(self, ids: Sequence[int]) -> str:
        """Human-readable rendering of ids for debugging: special names, text, and audio as <a:k>."""
        out: list[str] = []
        text_run: list[int] = []
        for tok in [int(i) for i in _as_list(ids)]:
            if self.layout.is_text(tok):
                text_run.append(tok)
                continue
            if text_run:
                out.append(self.text.decode(text_run))
                text_run = []
            if self.layout.is_special(tok):
                out.append(self.layout.special_name(tok))
            elif self.layout.is_audio(tok):
                out.append(f"<a:{tok - self.layout.audio_offset}>")
            else:
                out.append(f"<?{tok}>")
        if text_run:
            out.append(self.text.decode(text_run))
        return "".join(out)


class BlockGrammar:
    """State machine of the answer body rules (module docstring); `mask()` gives the allowed next ids."""

    def __init__(self, layout: VocabLayout, mode: Mode, text_vocab: int | None = None):
        self.layout = layout
        self.text_vocab = layout.n_text if text_vocab is None else text_vocab  # ids the text tokenizer can decode
        self.mode = Mode(mode)
        self.text_done = self.mode is Mode.AUDIO
        self.audio_done = self.mode is Mode.TEXT
        self.in_audio = False
        self.count = 0  # tokens in the current text part or audio span
        self.last_span_full = False  # the previous audio span had BLOCK_AUDIO tokens
        self.finished = False
        self._masks: dict[tuple[str, ...], torch.Tensor] = {}
        sp = layout.special
        self._ids = {n: sp(n) for n in ("<|text_end|>", "<|audio_start|>", "<|audio_end|>", "<|end|>")}

    def _ranges(self, groups) -> list[tuple[int, int]]:
        """Id ranges [lo, hi) of token groups ("text", "semantic" or a special token name), sorted."""
        out = []
        for g in groups:
            if g == "text":
                out.append((0, self.text_vocab))
            elif g == "semantic":
                out.append((self.layout.audio_offset + N_LINGUISTIC, self.layout.size))
            else:
                out.append((self._ids[g], self._ids[g] + 1))
        return sorted(out)

    def _mask(self, *groups: str) -> torch.Tensor:
        key = tuple(sorted(groups))
        if key not in self._masks:
            m = torch.zeros(self.layout.size, dtype=torch.bool)
            for lo, hi in self._ranges(groups):
                m[lo:hi] = True
            self._masks[key] = m
        return self._masks[key]

    def rows(self) -> list[tuple[int, int]]:
        """The allowed next ids as sorted [lo, hi) ranges (what `mask()` marks): a forward pass need only compute
        these rows of the LM head (backbone/fast.py)."""
        return self._ranges(self.allowed_groups())

    def allowed_groups(self) -> tuple[str, ...]:
        if self.finished:
            return ()
        if self.in_audio:
            return ("<|audio_end|>",) if self.count >= BLOCK_AUDIO else ("semantic", "<|audio_end|>")
        if not self.text_done:
            if not self.audio_done and self.count >= BLOCK_TEXT:
                return ("<|audio_start|>",)
            return ("text", "<|text_end|>")
        if self.audio_done:
            return ("<|end|>",)
        if self.last_span_full:
            return ("<|audio_start|>", "<|end|>")
        return ("<|audio_start|>",)

    def mask(self) -> torch.Tensor:
        groups = self.allowed_groups()
        if not groups:
            raise RuntimeError("the answer is finished; nothing more is allowed")
        return self._mask(*groups)

    def allows(self, token: int) -> bool:
        return bool(self.mask()[token])

    def advance(self, token: int) -> None:
        token = int(token)
        if not self.allows(token):
            raise ValueError(f"token {token} is not allowed in state {self.allowed_groups()}")
        ids = self._ids
        if self.in_audio:
            if token == ids["<|audio_end|>"]:
                self.in_audio = False
                self.last_span_full = self.count >= BLOCK_AUDIO
                if not self.last_span_full:
                    self.audio_done = True
                self.count = 0
            else:
                self.count += 1
        elif token == ids["<|text_end|>"]:
            self.text_done = True
            self.count = 0
        elif token == ids["<|audio_start|>"]:
            self.in_audio = True
            self.count = 0
        elif token == ids["<|end|>"]:
            self.audio_done = self.text_done = True
            self.finished = True
        else:  # text token
            self.count += 1


def _as_list(values) -> list[int]:
    if isinstance(values, torch.Tensor):
        return values.reshape(-1).tolist()
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)
