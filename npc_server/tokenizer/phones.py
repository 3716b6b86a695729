"""Phone units from espeak-ng IPA strings and the phone inventory the CTC readouts predict."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

# Stress marks are suprasegmental: they are dropped, so "ˈɪn" and "ɪn" give the same phones.
STRESS_MARKS = frozenset("ˈˌ")
# Word separators, syllable breaks, punctuation espeak may leave in the string.
SKIP = frozenset(" \t\n.,;:!?'\"-_()[]|‖")
TIE = "\u0361"  # combining double inverted breve: t͡ʃ is one phone


def split_phones(ipa: str) -> list[str]:
    """IPA string -> phone units: one base character plus its length marks/diacritics (ː, ʰ, ̃, ...).

    Stress marks and word boundaries are dropped; tie-barred pairs and tone digits/letters stay units.
    """
    units: list[str] = []
    join_next = False
    for ch in unicodedata.normalize("NFC", ipa):
        if ch in STRESS_MARKS or ch in SKIP:
            join_next = False
            continue
        cat = unicodedata.category(ch)
        if ch == TIE:
            if units:
                units[-1] += ch
                join_next = True
            continue
        if (cat == "Mn" or (cat == "Lm" and ch not in "ʔʕ")) and units:
            units[-1] += ch
            continue
        if join_next and units:
            units[-1] += ch
            join_next = False
            continue
        units.append(ch)
    return units


class PhoneInventory:
    """Phone units <-> ids. Id 0 is the CTC blank; ids 1..n are phones, ordered by frequency then text."""

    def __init__(self, phones: list[str]):
        if len(set(phones)) != len(phones):
            raise ValueError("phone inventory has duplicates")
        self.phones = list(phones)
        self.index = {p: i + 1 for i, p in enumerate(self.phones)}

    def __len__(self) -> int:
        return len(self.phones)

    @classmethod
    def build(cls, ipa_strings: Iterable[str], min_count: int = 2) -> PhoneInventory:
        counts = Counter(u for s in ipa_strings for u in split_phones(s))
        kept = [p for p, c in counts.items() if c >= min_count]
        kept.sort(key=lambda p: (-counts[p], p))
        return cls(kept)

    def encode(self, ipa: str) -> list[int]:
        """IPA -> phone ids (units outside the inventory are skipped)."""
        return [self.index[u] for u in split_phones(ipa) if u in self.index]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.phones[i - 1] for i in ids if 0 < i <= len(self.phones)]


def ctc_greedy(logits_argmax: Iterable[int]) -> list[int]:
    """Best-path CTC decoding: collapse repeats, drop blanks (0)."""
    out: list[int] = []
    prev = 0
    for i in logits_argmax:
        i = int(i)
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return out


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]
