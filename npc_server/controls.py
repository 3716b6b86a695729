"""Speaking controls shared by personas, the corpus, the model prompt and the server: emotions, languages, ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Requested speed is a tempo factor (1.0 = the voice's natural rate, 2.0 = twice as fast).
SPEED_RANGE = (0.5, 2.0)
# Requested pitch is a shift in semitones relative to the voice's natural pitch.
PITCH_RANGE_ST = (-12.0, 12.0)

# Languages the default model is trained on (ISO 639-3 style codes for the Chinese ones).
LANGUAGES: dict[str, str] = {
    "en": "English",
    "ja": "Japanese",
    "yue": "Cantonese",
    "cmn": "Mandarin",
}

# Accents / dialects per language. The first entry is the default.
ACCENTS: dict[str, tuple[str, ...]] = {
    "en": ("us", "gb", "scotland"),
    "ja": ("standard",),
    "yue": ("standard",),
    "cmn": ("standard",),
}


@dataclass(frozen=True)
class ProsodyProfile:
    """How an emotion is rendered: every field is measurable with parselmouth."""

    pitch_shift_st: float  # mean F0 moves by this many semitones
    pitch_range: float  # F0 excursions around the mean are scaled by this factor
    rate: float  # tempo factor (multiplies the requested speed)
    energy_db: float  # loudness change in dB


EMOTIONS: dict[str, ProsodyProfile] = {
    "neutral": ProsodyProfile(0.0, 1.0, 1.0, 0.0),
    "happy": ProsodyProfile(2.0, 1.4, 1.08, 2.0),
    "excited": ProsodyProfile(3.5, 1.6, 1.18, 4.0),
    "sad": ProsodyProfile(-2.0, 0.6, 0.85, -4.0),
    "angry": ProsodyProfile(1.0, 1.3, 1.1, 5.0),
    "fearful": ProsodyProfile(2.5, 0.8, 1.15, -2.0),
    "calm": ProsodyProfile(-1.0, 0.7, 0.92, -2.0),
}


def emotion_pitch(pitch_st: float, emotion: str) -> float:
    """A requested pitch shift plus the emotion's mean F0 shift (unknown emotions count as neutral), clamped to
    PITCH_RANGE_ST: the level an answer is decoded at when the vocoder, not the tokens, sets the pitch."""
    shift = EMOTIONS.get(emotion, EMOTIONS["neutral"]).pitch_shift_st
    lo, hi = PITCH_RANGE_ST
    return float(min(hi, max(lo, pitch_st + shift)))


def check_language(language: str, accent: str | None = None) -> None:
    """Raise ValueError when the language or the accent is not one the model knows."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    if accent is not None and accent not in ACCENTS[language]:
        raise ValueError(
            f"unknown accent {accent!r} for language {language!r}; known: {', '.join(ACCENTS[language])}"
        )


# NPC roles the default model is trained on (persona YAML `role`); the corpus has dialogues for each.
ROLES: tuple[str, ...] = (
    "innkeeper",
    "guard",
    "merchant",
    "blacksmith",
    "quest_giver",
    "companion",
    "tea_seller",
)


def shorten(value: object, limit: int = 40) -> str:
    """repr() of a client-sent value for an error message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}...({len(str(value))} characters)"


@dataclass(frozen=True)
class Controls:
    """How the NPC speaks. Every field maps to one control token (numeric ones are quantised, see backbone/vocab.py)."""

    voice: str = "joe"
    language: str = "en"
    accent: str = "us"
    emotion: str = "neutral"
    speed: float = 1.0
    pitch_st: float = 0.0

    @classmethod
    def from_persona(cls, persona, overrides=None) -> Controls:
        """How `persona` speaks, with a request's `overrides` (an object whose emotion, speed, pitch, language and
        accent are None where the persona's own value holds; None: no overrides). Raises ValueError naming a bad
        value. In a language its timbre cannot speak, the persona gets the first bank voice that can."""
        from npc_server.voices import VOICE_BANK, voice_supports

        def wanted(name: str):
            return getattr(overrides, name, None)

        emotion = wanted("emotion") if wanted("emotion") is not None else persona.default_emotion
        if emotion not in EMOTIONS:
            raise ValueError(f"unknown emotion {shorten(emotion)}; known: {', '.join(EMOTIONS)}")
        if emotion not in persona.allowed_emotions:
            raise ValueError(f"NPC {persona.id!r} does not allow emotion {emotion!r}; "
                             f"allowed: {', '.join(persona.allowed_emotions)}")
        speed = persona.voice.speed if wanted("speed") is None else float(wanted("speed"))
        if not (SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]) or not math.isfinite(speed):
            raise ValueError(f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}")
        pitch = persona.voice.pitch if wanted("pitch") is None else float(wanted("pitch"))
        if not (PITCH_RANGE_ST[0] <= pitch <= PITCH_RANGE_ST[1]) or not math.isfinite(pitch):
            raise ValueError(f"pitch must be between {PITCH_RANGE_ST[0]} and {PITCH_RANGE_ST[1]} semitones")
        language = wanted("language") or persona.language
        if language not in LANGUAGES:
            raise ValueError(f"unknown language {shorten(language)}; known: {', '.join(LANGUAGES)}")
        accent = wanted("accent") or (persona.accent if language == persona.language else ACCENTS[language][0])
        if accent not in ACCENTS[language]:
            raise ValueError(f"unknown accent {shorten(accent)} for {language!r}; known: {', '.join(ACCENTS[language])}")
        voice = persona.voice.timbre
        if not voice_supports(voice, language, accent):
            voice = next((v for v in VOICE_BANK if voice_supports(v, language, accent)), voice)
        return cls(voice=voice, language=language, accent=accent, emotion=emotion, speed=speed, pitch_st=pitch)

    def token_names(self) -> list[str]:
        """The control tokens of the chat template, in prompt order. Raises ValueError for an unknown value."""
        # imported here: backbone.vocab builds its token lists from this module's tables
        from npc_server.backbone import vocab
        from npc_server.voices import VOICE_BANK

        if self.voice not in VOICE_BANK:
            raise ValueError(f"unknown voice {self.voice!r}; known: {', '.join(VOICE_BANK)}")
        check_language(self.language, self.accent)
        return [
            vocab.voice_token(self.voice),
            vocab.language_token(self.language),
            vocab.accent_token(self.accent),
            vocab.emotion_token(self.emotion),
            vocab.speed_token(self.speed),
            vocab.pitch_token(self.pitch_st),
        ]
