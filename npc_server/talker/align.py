"""Monotonic alignment search (Glow-TTS): the durations that best explain an utterance's tokens by its phones.

Given scores s[j, t] (log-probability of frame t's token under phone j), find the path that starts at (0, 0),
ends at (N-1, T-1), and at each frame either stays on the phone or moves to the next one, maximising the summed
score. Every phone gets at least one frame, so it needs T >= N.
"""

from __future__ import annotations

import numpy as np


def monotonic_alignment(scores: np.ndarray) -> np.ndarray:
    """scores [N phones, T frames] -> frames per phone [N] (sum T, each >= 1)."""
    n, t = scores.shape
    if t < n:
        raise ValueError(f"{t} frames cannot align {n} phones (each phone needs a frame)")
    neg = -np.inf
    best = np.full((n, t), neg)
    came_from_prev = np.zeros((n, t), dtype=bool)
    best[0, 0] = scores[0, 0]
    for f in range(1, t):
        stay = best[:, f - 1]
        move = np.concatenate([[neg], best[:-1, f - 1]])
        came_from_prev[:, f] = move > stay
        best[:, f] = np.maximum(stay, move) + scores[:, f]
    durations = np.zeros(n, dtype=np.int64)
    j = n - 1
    for f in range(t - 1, -1, -1):
        durations[j] += 1
        if f and came_from_prev[j, f]:
            j -= 1
    if j != 0:
        raise AssertionError("alignment did not reach the first phone")  # unreachable when t >= n
    return durations


def frame_positions(durations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Durations [N] -> per frame: the phone index, the frame's position in its phone, the frames left after it."""
    phone = np.repeat(np.arange(len(durations)), durations)
    starts = np.repeat(np.cumsum(durations) - durations, durations)
    in_phone = np.arange(len(phone)) - starts
    left = np.repeat(durations, durations) - 1 - in_phone
    return phone, in_phone, left
