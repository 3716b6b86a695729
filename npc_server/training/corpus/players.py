"""The player voice pool: many espeak-ng and piper-derived speakers, with a held-out subset never used in training."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import lru_cache

# English espeak-ng base voices -> accent label written to the manifest.
ENGLISH_BASES = {
    "en-us": "us", "en-gb": "gb", "en-gb-scotland": "scotland", "en-gb-x-rp": "gb-rp",
    "en-gb-x-gbclan": "gb-lancaster", "en-gb-x-gbcwmd": "gb-westmidlands", "en-029": "caribbean", "en-us-nyc": "us-nyc",
}
FOREIGN_BASES = {"ja": "ja", "yue": "yue", "cmn": "cmn-latn-pinyin"}
# espeak-ng voice variants that sound human enough (robots and effects left out).
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Andy", "annie", "david",
            "Michael", "steph", "robert", "max", "linda", "edward", "aunty", "Alicia", "benjamin", "caleb", "john",
            "paul", "quincy", "rob", "zac", "klatt", "klatt4", "iven3", "Denis", "Gene")
POOL_SIZES = {"en_espeak": 96, "en_piper": 36, "ja": 12, "yue": 8, "cmn": 8}
HELDOUT_FRACTION = 0.15


@dataclass(frozen=True)
class PlayerVoice:
    id: str
    engine: str  # "espeak" | "piper"
    language: str
    accent: str
    espeak_voice: str  # base+variant for espeak; the phonemizer voice for piper
    espeak_pitch: int  # 0..99 (espeak only)
    speed: float  # tempo factor
    pitch_st: float  # PSOLA shift after synthesis
    formant_ratio: float
    noise_scale: float  # piper generator noise
    rt60: float  # 0 = dry
    wet: float
    snr_db: float  # 99 = clean
    pink: bool
    heldout: bool

    def to_json(self) -> dict:
        return asdict(self)


def _make(rng: random.Random, vid: str, engine: str, language: str, accent: str, espeak_voice: str, heldout: bool) -> PlayerVoice:
    piper = engine == "piper"
    if piper:  # joe, re-shaped into other speakers: deeper/higher, longer/shorter vocal tract
        pitch_st = round(rng.uniform(-5.0, 9.0), 1)
        formant = round(min(max(1.0 + pitch_st * 0.02 + rng.uniform(-0.05, 0.05), 0.84), 1.22), 3)
    else:
        pitch_st, formant = 0.0, 1.0
    room = rng.random() < 0.45
    noisy = rng.random() < 0.5
    return PlayerVoice(
        id=vid, engine=engine, language=language, accent=accent, espeak_voice=espeak_voice,
        espeak_pitch=rng.randint(25, 80), speed=round(rng.uniform(0.8, 1.25), 2), pitch_st=pitch_st,
        formant_ratio=formant, noise_scale=round(rng.uniform(0.4, 0.9), 2),
        rt60=round(rng.uniform(0.15, 0.6), 2) if room else 0.0, wet=round(rng.uniform(0.15, 0.45), 2) if room else 0.0,
        snr_db=round(rng.uniform(15.0, 40.0), 1) if noisy else 99.0, pink=rng.random() < 0.5, heldout=heldout,
    )


@lru_cache(maxsize=1)
def player_pool() -> tuple[PlayerVoice, ...]:
    """The fixed pool (independent of --seed so the held-out speakers are always the same)."""
    rng = random.Random("npc-corpus-players:v1")
    pool: list[PlayerVoice] = []

    def heldout_flags(n: int) -> list[bool]:
        k = max(2, round(n * HELDOUT_FRACTION))
        flags = [True] * k + [False] * (n - k)
        rng.shuffle(flags)
        return flags

    bases = sorted(ENGLISH_BASES)
    for i, held in enumerate(heldout_flags(POOL_SIZES["en_espeak"])):
        base = bases[i % len(bases)]
        variant = VARIANTS[(i * 7 + i // len(bases)) % len(VARIANTS)]
        pool.append(_make(rng, f"pl_en_es{i:03d}", "espeak", "en", ENGLISH_BASES[base], f"{base}+{variant}", held))
    for i, held in enumerate(heldout_flags(POOL_SIZES["en_piper"])):
        pool.append(_make(rng, f"pl_en_pj{i:03d}", "piper", "en", "us", "en-us", held))
    for lang in ("ja", "yue", "cmn"):
        for i, held in enumerate(heldout_flags(POOL_SIZES[lang])):
            variant = VARIANTS[(i * 5 + 3) % len(VARIANTS)]
            pool.append(_make(rng, f"pl_{lang}_es{i:03d}", "espeak", lang, "standard", f"{FOREIGN_BASES[lang]}+{variant}", held))
    return tuple(pool)


def voices_for(language: str, heldout: bool) -> list[PlayerVoice]:
    out = [v for v in player_pool() if v.language == language and v.heldout == heldout]
    if not out:
        raise ValueError(f"no {'held-out' if heldout else 'training'} player voice for language {language!r}")
    return out


def pick_player(rng: random.Random, language: str, split: str, piper_share: float = 0.4) -> PlayerVoice:
    """A player voice for a question: held-out questions get held-out voices only, the rest training voices."""
    cands = voices_for(language, split == "heldout")
    if language == "en":
        engine = "piper" if rng.random() < piper_share else "espeak"
        cands = [v for v in cands if v.engine == engine] or cands
    return rng.choice(cands)
