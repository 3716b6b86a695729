"""Model v2's question prefill while the player speaks (engine_v2.QuestionStreamV2): the fork of the conversation it
prefills holds exactly the ids of the whole question, and it is used only if the conversation did not change."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from npc_server.engine_v2 import EngineStateV2, QuestionStreamV2
from npc_server.tokenizer.tokenizer import make_tokens


class Session:
    """The verbs of a thinker session, recording the ids it was given."""

    def __init__(self, ids=()):
        self.ids = list(ids)

    def __len__(self):
        return len(self.ids)

    def prefill(self, ids):
        self.ids += list(ids)

    def fork(self):
        return Session(self.ids)


class Tokenizer:
    """Gives out 2 linguistic codes (the chunk's first samples x 100) and 3 semantic ones per pushed chunk, and 2
    and 3 more at the flush."""

    def stream(self, sample_rate):
        class Stream:
            def push(self, wav):
                codes = torch.as_tensor(np.round(wav[:2] * 100), dtype=torch.long)
                return make_tokens(codes, torch.zeros(3, dtype=torch.long))

            def flush(self):
                return make_tokens(torch.tensor([7, 8]), torch.zeros(3, dtype=torch.long))

        return Stream()


FMT = SimpleNamespace(audio_input="linguistic", user=1, audio_start=2, audio_end=3, end=4, assistant=5, mode_text=6,
                      audio=lambda codes, interleaved=None: [1000 + int(c) for c in codes])


def question_ids(codes):
    return [FMT.user, FMT.audio_start, *FMT.audio(codes), FMT.audio_end, FMT.end, FMT.assistant, FMT.mode_text]


def chunks():
    return [np.array([0.01, 0.02, 0.03]), np.array([0.04, 0.05, 0.06])]


def test_the_prefilled_fork_equals_the_whole_question_prefilled_at_the_end():
    state = EngineStateV2(session=Session([9, 9, 9]))
    stream = QuestionStreamV2(Tokenizer(), 16000, FMT, state)
    for c in chunks():
        stream.push(c)
    assert stream.prefilled == 4 and state.session.ids == [9, 9, 9]  # the conversation itself is untouched
    tokens = stream.finish()
    codes = tokens.linguistic.numpy()
    fork = stream.adopt(state, codes)
    assert list(codes) == [1, 2, 4, 5, 7, 8]
    assert fork is not None and fork.ids == [9, 9, 9] + question_ids(codes)
    assert stream.ahead_tokens == 2 + 4  # <user> <audio_start> and 4 codes were in before the end of speech


def test_no_fork_while_an_answer_runs_and_none_adopted_after_a_change():
    state = EngineStateV2(session=Session([9]))
    state.answering = True
    stream = QuestionStreamV2(Tokenizer(), 16000, FMT, state)
    stream.push(chunks()[0])
    assert stream.fork is None  # the answer in flight owns the session
    state.answering = False
    stream.push(chunks()[1])  # taken now, with all codes so far
    assert stream.fork is not None and stream.prefilled == 4
    state.version += 1  # the previous answer was interrupted and rewritten meanwhile
    assert stream.adopt(state, stream.finish().linguistic.numpy()) is None
    other = QuestionStreamV2(Tokenizer(), 16000, FMT, state)
    other.push(chunks()[0])
    assert other.adopt(EngineStateV2(session=Session()), np.array([1, 2, 7, 8])) is None  # another conversation
