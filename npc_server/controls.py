"""Speaking controls shared by personas, the corpus, the model prompt and the server: emotions, languages, ranges."""

from __future__ import annotations

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
