"""The talker's text front end: answer text -> phone units (espeak-ng IPA) with word starts and clause pauses.

The talker reads phones, not letters: espeak-ng already knows how English (and the other persona languages) is
pronounced, digits included, so the small model only has to learn how each phone sounds in audio tokens.
A phone sequence is `<s> phones... [<pause> phones...] </s>`; `<s>` and `</s>` take the silence before and after
the speech, `<pause>` the break between two clauses.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate

from npc_server.tokenizer.phones import split_phones
from npc_server.voices import ESPEAK_BASE_VOICES

PAD, BOS, EOS, PAUSE = "<pad>", "<s>", "</s>", "<pause>"
SPECIALS = (PAD, BOS, EOS, PAUSE)

# Characters that never reach espeak: control characters and symbols it would spell out letter by letter.
_DROP = re.compile(r"[\x00-\x1f\x7f<>{}\[\]\\|^~`@#$%&*_=+]")


@dataclass
class Phones:
    """A phone sequence: units (including the specials) and, per unit, whether it starts a word. `words` holds,
    where known, the text of the word a unit starts ("" elsewhere; it may be shorter than `units`): the source of
    the word timings in lip-sync events."""

    units: list[str] = field(default_factory=list)
    word_starts: list[bool] = field(default_factory=list)
    words: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.units)

    def word(self, i: int) -> str:
        return self.words[i] if i < len(self.words) else ""

    def extend(self, other: Phones) -> None:
        if other.words:
            self.words += [""] * (len(self.units) - len(self.words)) + other.words
        self.units += other.units
        self.word_starts += other.word_starts


def espeak_voice(language: str, accent: str | None = None) -> str:
    """The espeak-ng voice that phonemizes `language` (with `accent` when it has one of its own)."""
    for (lang, acc), voice in ESPEAK_BASE_VOICES.items():
        if lang == language and (accent is None or acc == accent):
            return voice
    for (lang, _), voice in ESPEAK_BASE_VOICES.items():
        if lang == language:
            return voice
    raise ValueError(f"the talker cannot phonemize language {language!r} (known: "
                     f"{sorted({lang for lang, _ in ESPEAK_BASE_VOICES})})")


def clean_text(text: str) -> str:
    """Text espeak can read: symbols it would spell out dropped, whitespace collapsed."""
    return re.sub(r"\s+", " ", _DROP.sub(" ", text)).strip()


def espeak_clauses(text: str, voice: str) -> list[list[str]]:
    """espeak-ng IPA of `text`: one list of word IPA strings per clause (espeak starts a new line per clause)."""
    text = clean_text(text)
    if not text:
        return []
    proc = subprocess.run(["espeak-ng", "-q", "-x", "--ipa", "-v", voice, text], capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise ValueError(f"espeak-ng could not phonemize {text!r}: {proc.stderr.decode(errors='replace').strip()}")
    out = re.sub(r"\([a-z-]+\)", "", proc.stdout.decode("utf-8", errors="replace"))  # language switches like (en)
    return [line.split() for line in out.splitlines() if line.split()]


def clause_phones(clauses: list[list[str]]) -> Phones:
    """Clauses of word IPA -> phone units with word starts, a `<pause>` between clauses (no `<s>` / `</s>`)."""
    seq = Phones()
    for c, words in enumerate(clauses):
        if c:
            seq.units.append(PAUSE)
            seq.word_starts.append(False)
        for word in words:
            units = split_phones(word)
            seq.units += units
            seq.word_starts += [i == 0 for i in range(len(units))]
    return seq


def text_phones(text: str, language: str = "en", accent: str | None = None) -> Phones:
    """The phones of `text` with clause pauses, without `<s>` / `</s>` (what a talker stream is pushed)."""
    return clause_phones(espeak_clauses(text, espeak_voice(language, accent)))


def phonemize(text: str, language: str = "en", accent: str | None = None) -> Phones:
    """A whole utterance: `<s>`, the phones of `text`, `</s>`. Text with nothing to say gives `<s> </s>`."""
    seq = Phones([BOS], [False])
    seq.extend(text_phones(text, language, accent))
    seq.units.append(EOS)
    seq.word_starts.append(False)
    return seq


_CLAUSE_BREAK = re.compile(r"[.,;:!?\u3002\uff0c\uff01\uff1f]+\s+")


def _word_phones(groups: list[list[str]], text_words: list[str]) -> Phones:
    """Per text word, the IPA words espeak read it as ("120" is four) -> phones; each IPA word starts a word (as in
    `clause_phones`), and the first unit of a text word's phones carries its text."""
    seq = Phones()
    for group, word in zip(groups, text_words):
        first = len(seq.units)
        for ipa in group:
            units = split_phones(ipa)
            seq.units += units
            seq.word_starts += [i == 0 for i in range(len(units))]
        seq.words += [""] * (len(seq.units) - len(seq.words))
        if len(seq.units) > first:
            seq.words[first] = word
    return seq


@lru_cache(maxsize=4096)
def _alone(word: str, voice: str) -> tuple[int, int]:
    """(IPA words, phones) espeak reads `word` as on its own."""
    ipa = [w for c in espeak_clauses(word, voice) for w in c]
    return len(ipa), sum(len(split_phones(w)) for w in ipa)


def pair_words(words: list[str], ipa: list[str], voice: str, most: int = 4) -> list[tuple[int, int]] | None:
    """Which text words espeak read as which of its IPA words (`ipa`, its reading of `words` together), as
    segments (text words, IPA words) in order. Usually one to one; a number expands ("120" is four IPA words) and
    short function words may merge ("for the"). When the counts differ, the segments are the alignment whose
    segment lengths best match each word read on its own (phones and IPA words). None when none fits."""
    if len(ipa) == len(words):
        return [(1, 1)] * len(words)
    alone = [_alone(w, voice) for w in words]
    ctx = [len(split_phones(w)) for w in ipa]
    inf = float("inf")
    cost = [[inf] * (len(ipa) + 1) for _ in range(len(words) + 1)]
    back: dict[tuple[int, int], tuple[int, int]] = {}
    cost[0][0] = 0.0
    for i in range(1, len(words) + 1):
        for j in range(1, len(ipa) + 1):
            for m in range(1, min(most, i) + 1):
                n_alone = sum(a[0] for a in alone[i - m : i])
                p_alone = sum(a[1] for a in alone[i - m : i])
                for n in range(1, min(2 * most, j) + 1):
                    if cost[i - m][j - n] == inf:
                        continue
                    c = cost[i - m][j - n] + abs(p_alone - sum(ctx[j - n : j])) + 2 * abs(n - n_alone) + (m - 1)
                    if c < cost[i][j]:
                        cost[i][j], back[i, j] = c, (m, n)
    if cost[len(words)][len(ipa)] == inf:
        return None
    segments, i, j = [], len(words), len(ipa)
    while i or j:
        m, n = back[i, j]
        segments.append((m, n))
        i, j = i - m, j - n
    return segments[::-1]


class TextPhonemizer:
    """Answer text arriving in pieces -> the phones of the words that are settled, as early as possible.

    espeak-ng pronounces a word by its neighbours ("the old" is /ði/, "the bridge" /ðə/), so a word is given out
    once the word after it is complete, phonemized in that context; a clause is given out whole at its punctuation
    or at `finish`. The phones equal those of the whole text phonemized at once (tested), with a `<pause>`
    between clauses as in `clause_phones`.
    """

    def __init__(self, language: str = "en", accent: str | None = None):
        self.voice = espeak_voice(language, accent)
        self.text = ""  # the clause in progress
        self.done_words = 0  # its words already given out
        self.spoken = False  # whether any phones were given out (a pause needs phones before it)
        self.pause = False  # a clause ended: a pause goes before the next phones

    def push(self, delta: str) -> Phones:
        self.text += delta
        out = Phones()
        while (m := _CLAUSE_BREAK.search(self.text)) is not None:
            clause, self.text = self.text[: m.end()], self.text[m.end():]
            out.extend(self._settle(clause, final=True))
        out.extend(self._settle(self.text, final=False))
        return out

    def finish(self) -> Phones:
        out = self._settle(self.text, final=True)
        self.text = ""
        return out

    def _take(self, segments, ipa: list[str], words: list[str], settled: int):
        """The segments after the words given out and within the settled ones -> (IPA groups, their text), and
        `done_words` moved past them; (None, None) when the pairing does not start where the given-out words end."""
        if segments is None:
            return None, None
        groups, texts, t, i, done = [], [], 0, 0, self.done_words
        starts = {0}
        for n_text, n_ipa in segments:
            if t >= self.done_words and t + n_text <= settled:
                groups.append(ipa[i : i + n_ipa])
                texts.append(" ".join(words[t : t + n_text]))
                done = t + n_text
            t, i = t + n_text, i + n_ipa
            starts.add(t)
        if self.done_words not in starts:
            return None, None
        self.done_words = done
        return groups, texts

    def _settle(self, text: str, final: bool) -> Phones:
        words = text.split()
        if not final and text and not text[-1].isspace():
            words = words[:-1]  # the last word may still grow
        settled = len(words) if final else len(words) - 1  # the last complete word waits for its neighbour
        out = Phones()
        if settled > self.done_words:
            ipa = [w for clause in espeak_clauses(" ".join(words), self.voice) for w in clause]
            segments = pair_words(words, ipa, self.voice)
            groups, texts = self._take(segments, ipa, words, settled)
            if groups is not None:  # the settled words' IPA words are known: give them out
                new = _word_phones(groups, texts)
            elif final:  # no pairing fits: the rest of the clause on its own, as one "word"
                rest = " ".join(words[self.done_words :])
                new = clause_phones(espeak_clauses(rest, self.voice))
                new.words = [rest] if new.units else []
                self.done_words = settled
            else:
                new = Phones()
            if new.units:
                if self.pause and self.spoken:
                    out.units.append(PAUSE)
                    out.word_starts.append(False)
                out.extend(new)
                self.spoken, self.pause = True, False
        if final:
            self.pause = self.pause or self.done_words > 0
            self.done_words = 0
        return out
