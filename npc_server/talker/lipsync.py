"""Lip-sync events from the talker's alignment: which mouth shape (viseme) and which word, when, in the answer audio.

The talker decides how many 25 Hz frames each phone of the answer gets (`Span`), and the vocoder turns frame k into
the audio from k / 25 s on, so the phone timings are known exactly, before the audio they describe is rendered.
`LipSync` turns spans, as the talker produces them, into two kinds of events on the answer's audio time line
(milliseconds from the answer's first audio sample):

- visemes: the 15 mouth shapes of the Oculus / Meta lip-sync set (`VISEMES`), the set engines' face rigs and
  blend-shape packs are usually built for; adjacent phones with the same shape are one event;
- words: the subtitle's words with their start and end, for karaoke subtitles or gestures.

A word is given out once its end is known (the next word, a pause or the end of the answer is spoken), a viseme as
soon as its phone is: both come before the audio they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass

from npc_server.talker.frontend import SPECIALS

VISEMES = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "I", "O", "U")

# IPA base characters per viseme (espeak-ng's inventory for en / ja / yue / cmn and a few more)
_SHAPES = {
    "PP": "pbmɱɓ",
    "FF": "fvɸβʋ",
    "TH": "θð",
    "DD": "tdɾʔʈɖ",
    "kk": "kgɡqxɣχhɦcɟ",
    "CH": "ʃʒɕʑçʝ",
    "SS": "szʂʐ",
    "nn": "nlŋɲɳɫɬɭʎ",
    "RR": "rɹɻɽʁʀɚɝ",
    "aa": "aäɑæɐʌ",
    "E": "eɛəɜɘ",
    "I": "iɪɨᵻj",
    "O": "oɔɒɤ",
    "U": "uʊwʍɯyʏøœɵʉ",
}
_VISEME_OF = {ch: v for v, chars in _SHAPES.items() for ch in chars}
TIE = "\u0361"


def viseme(unit: str) -> str | None:
    """The viseme of a phone unit; "sil" for the silences (`<s>`, `</s>`, `<pause>`), None for a unit with no mouth
    shape of its own (a tone number): it keeps the shape before it. An affricate (t͡ʃ) takes its release's shape."""
    if unit in SPECIALS:
        return "sil"
    if TIE in unit:
        unit = unit.split(TIE, 1)[1] or unit
    return _VISEME_OF.get(unit[:1])


@dataclass(frozen=True)
class VisemeEvent:
    viseme: str  # one of VISEMES
    start_ms: float
    duration_ms: float


@dataclass(frozen=True)
class WordEvent:
    text: str  # the subtitle's word (with its punctuation), or a run of words espeak read as one ("120 gold")
    start_ms: float
    end_ms: float


@dataclass
class LipSyncEvents:
    visemes: list[VisemeEvent]
    words: list[WordEvent]

    def __bool__(self) -> bool:
        return bool(self.visemes or self.words)

    def extend(self, other: LipSyncEvents) -> None:
        self.visemes += other.visemes
        self.words += other.words


class LipSync:
    """The spans of one answer as the talker adds them -> viseme and word events. Verbs: `update`, `finish`."""

    def __init__(self, frames_per_second: float = 25.0):
        self.frame_ms = 1000.0 / frames_per_second
        self.read = 0  # spans already turned into events
        self.shape = "sil"  # the viseme of the last phone (a tone number keeps it)
        self.word: tuple[str, float] | None = None  # the word being spoken: text, start

    def update(self, spans) -> LipSyncEvents:
        """`spans`: all `talker.generator.Span`s of the answer so far (`TalkerStream.spans`); the new ones give the
        events."""
        out = LipSyncEvents([], [])
        new, self.read = spans[self.read:], len(spans)
        for s in new:
            start, end = s.start * self.frame_ms, (s.start + s.frames) * self.frame_ms
            shape = viseme(s.unit) or self.shape
            if s.frames > 0:
                self.shape = shape  # the shape a tone number after it keeps (a phone with no frames is not seen)
            if s.word or shape == "sil":
                self._end_word(start, out)
            if s.word:
                self.word = (s.word, start)
            if s.frames > 0:
                out.visemes.append(VisemeEvent(shape, start, end - start))
        out.visemes = self.merge(out.visemes)
        return out

    @staticmethod
    def merge(visemes: list[VisemeEvent]) -> list[VisemeEvent]:
        """Adjacent events of one shape as one event."""
        out: list[VisemeEvent] = []
        for v in visemes:
            last = out[-1] if out else None
            if last is not None and last.viseme == v.viseme and abs(last.start_ms + last.duration_ms - v.start_ms) < 1e-6:
                out[-1] = VisemeEvent(v.viseme, last.start_ms, v.start_ms + v.duration_ms - last.start_ms)
            else:
                out.append(v)
        return out

    def finish(self, end_frame: int) -> LipSyncEvents:
        """The answer is spoken: the last word ends at `end_frame` (the frames spoken in all)."""
        out = LipSyncEvents([], [])
        self._end_word(end_frame * self.frame_ms, out)
        return out

    def _end_word(self, end_ms: float, out: LipSyncEvents) -> None:
        if self.word is not None:
            text, start = self.word
            out.words.append(WordEvent(text, start, max(end_ms, start)))
            self.word = None
