"""The voice bank: the NPC timbres the default model can speak in, and how the corpus renders each one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VoiceSpec:
    """One timbre of the voice bank.

    engine "piper" uses the bundled neural voice (en_US-joe-medium); engine "espeak" uses espeak-ng with
    the base voice chosen by (language, accent) and `espeak_variant` appended (e.g. "en-gb+f3").
    `pitch_shift_st` and `formant_ratio` derive further timbres from the same engine output.
    """

    id: str
    engine: str  # "piper" | "espeak"
    gender: str  # "m" | "f"
    description: str
    languages: dict[str, tuple[str, ...]]  # language -> accents this voice can speak
    espeak_variant: str = ""
    pitch_shift_st: float = 0.0
    formant_ratio: float = 1.0
    tags: tuple[str, ...] = field(default_factory=tuple)


# espeak-ng base voice for each (language, accent).
ESPEAK_BASE_VOICES: dict[tuple[str, str], str] = {
    ("en", "us"): "en-us",
    ("en", "gb"): "en-gb",
    ("en", "scotland"): "en-gb-scotland",
    ("ja", "standard"): "ja",
    ("yue", "standard"): "yue",
    ("cmn", "standard"): "cmn-latn-pinyin",
}

VOICE_BANK: dict[str, VoiceSpec] = {
    v.id: v
    for v in [
        VoiceSpec("joe", "piper", "m", "warm mid-range American male (piper joe)", {"en": ("us",)}),
        VoiceSpec(
            "joe_low", "piper", "m", "deep, gruff male (joe, -4 st, longer vocal tract)", {"en": ("us",)},
            pitch_shift_st=-4.0, formant_ratio=0.9,
        ),
        VoiceSpec(
            "joe_high", "piper", "m", "light, young male (joe, +4 st, shorter vocal tract)", {"en": ("us",)},
            pitch_shift_st=4.0, formant_ratio=1.08,
        ),
        VoiceSpec(
            "gb_female", "espeak", "f", "British female", {"en": ("gb", "scotland")}, espeak_variant="f3",
        ),
        VoiceSpec(
            "scot_male", "espeak", "m", "Scottish male", {"en": ("scotland", "gb")}, espeak_variant="m3",
        ),
        VoiceSpec("ja_female", "espeak", "f", "Japanese female", {"ja": ("standard",)}, espeak_variant="f2"),
        VoiceSpec("yue_male", "espeak", "m", "Cantonese male", {"yue": ("standard",)}, espeak_variant="m1"),
        VoiceSpec("cmn_female", "espeak", "f", "Mandarin female", {"cmn": ("standard",)}, espeak_variant="f4"),
    ]
}


def voice_supports(voice_id: str, language: str, accent: str) -> bool:
    spec = VOICE_BANK[voice_id]
    return accent in spec.languages.get(language, ())
