"""Token layouts of backbone v2's examples (the v1 template's structure tokens, on the base model's text ids).

    hearing, ASR:       <bos> <|system|> <|task:asr|> <|end|> <|user|> <|audio_start|> A* <|audio_end|> <|end|>
                        <|assistant|> <|mode:text|> transcript <|text_end|> <|end|>
    hearing, continue:  <bos> <|system|> <|task:continue|> <|end|> <|user|> <|audio_start|> A* (first part)
                        -> the rest of A* <|audio_end|> <|end|>

A* is the user audio: linguistic codes c as ids audio_offset + c (config `audio_input: linguistic`), or the
tokenizer's interleaved ids (`interleaved`). `Example.targets` is -100 where no loss is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npc_server.backbone.vocab import VocabLayout

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    targets: list[int]  # next-token targets aligned with ids (targets[i] is predicted from ids[: i + 1])


class HearingFormat:
    def __init__(self, layout: VocabLayout, text_tokenizer, audio_input: str = "linguistic"):
        if audio_input not in ("linguistic", "interleaved"):
            raise ValueError(f"audio_input must be 'linguistic' or 'interleaved', got {audio_input!r}")
        self.layout = layout
        self.text = text_tokenizer
        self.audio_input = audio_input
        self.bos = text_tokenizer.bos_token_id
        s = layout.special
        self.system, self.user, self.assistant, self.end = s("<|system|>"), s("<|user|>"), s("<|assistant|>"), s("<|end|>")
        self.audio_start, self.audio_end, self.text_end = s("<|audio_start|>"), s("<|audio_end|>"), s("<|text_end|>")
        self.mode_text = s("<|mode:text|>")
        self.task_asr, self.task_continue = s("<|task:asr|>"), s("<|task:continue|>")

    def audio(self, linguistic: np.ndarray, interleaved: np.ndarray | None = None) -> list[int]:
        if self.audio_input == "linguistic":
            return [int(c) + self.layout.audio_offset for c in linguistic]
        if interleaved is None:
            raise ValueError("audio_input 'interleaved' needs the interleaved ids")
        return [int(c) for c in self.layout.audio_ids(np.asarray(interleaved))]

    def text_ids(self, text: str) -> list[int]:
        return list(self.text.encode(text, add_special_tokens=False))

    def asr_prompt(self, audio: list[int]) -> list[int]:
        return [self.bos, self.system, self.task_asr, self.end, self.user, self.audio_start, *audio, self.audio_end,
                self.end, self.assistant, self.mode_text]

    def asr_example(self, audio: list[int], text: str) -> Example:
        prompt = self.asr_prompt(audio)
        answer = self.text_ids(text) + [self.text_end, self.end]
        ids = prompt + answer
        return Example(ids, [IGNORE] * (len(prompt) - 1) + answer + [IGNORE])

    def continue_example(self, audio: list[int], cut: int) -> Example:
        prompt = [self.bos, self.system, self.task_continue, self.end, self.user, self.audio_start, *audio[:cut]]
        rest = audio[cut:] + [self.audio_end, self.end]
        ids = prompt + rest
        return Example(ids, [IGNORE] * (len(prompt) - 1) + rest + [IGNORE])


class DialogueFormat(HearingFormat):
    """An NPC answer turn (SFT on backbone v2): the persona's system turn, earlier turns as text, the player's
    question as audio (or typed), and the answer text:

        <bos> <|system|> persona text <|lang:xx|> <|end|> [<|user|> q <|end|> <|assistant|> <|mode:text|> a <|text_end|> <|end|>]*
        <|user|> (<|audio_start|> A* <|audio_end|> | question text) <|end|> <|assistant|> <|mode:text|> answer <|text_end|> <|end|>

    The system turn is what the engine builds from the persona YAML (`Persona.prompt_text()`) plus the persona's
    language; the loss is on the answer only.
    """

    def system_ids(self, persona_text: str, language: str) -> list[int]:
        from npc_server.backbone.vocab import language_token

        return [self.bos, self.system, *self.text_ids(persona_text.strip()), self.layout.special(language_token(language)),
                self.end]

    def history_ids(self, history: list[dict]) -> list[int]:
        out: list[int] = []
        for turn in history:
            out += [self.user, *self.text_ids(turn["question"]), self.end, self.assistant, self.mode_text,
                    *self.text_ids(turn["answer"]), self.text_end, self.end]
        return out

    def question_ids(self, audio: list[int] | None = None, text: str | None = None) -> list[int]:
        """The player's turn up to the answer: spoken (audio ids) or typed."""
        if (audio is None) == (text is None):
            raise ValueError("a question is either audio ids or typed text")
        body = [self.audio_start, *audio, self.audio_end] if audio is not None else self.text_ids(text)
        return [self.user, *body, self.end, self.assistant, self.mode_text]

    def answer_prompt(self, persona_text: str, language: str, history: list[dict], audio: list[int] | None = None,
                      text: str | None = None) -> list[int]:
        return self.system_ids(persona_text, language) + self.history_ids(history) + self.question_ids(audio, text)

    def row_prompt(self, row: dict, persona_text: str, typed: bool) -> list[int]:
        """The answer prompt of a corpus dialogue row: its question typed, or spoken (the row's `linguistic` codes)."""
        language, history = row.get("persona_language", row["language"]), row.get("history", [])
        if typed:
            return self.answer_prompt(persona_text, language, history, text=row["question_text"])
        return self.answer_prompt(persona_text, language, history,
                                  audio=self.audio(row["linguistic"], row.get("interleaved")))

    def answer_example(self, prompt: list[int], answer: str) -> Example:
        target = self.text_ids(answer) + [self.text_end, self.end]
        return Example(prompt + target, [IGNORE] * (len(prompt) - 1) + target + [IGNORE])
