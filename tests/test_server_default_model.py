"""The real `npc-server serve --model v1` on loopback with the embedded model's v1 parts, judged by Whisper tiny.en
as a listener (the default, model v2, is tests/test_server_model_v2.py)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from npc_server.eval.metrics import Listener, normalize_text, word_errors
from npc_server.paths import DEFAULT_MODEL_DIR
from sdk import AudioEvent, EndEvent, NpcClient, NpcError

COMPONENTS = ("tokenizer", "backbone", "vocoder")
# What a listener must hear: Whisper tiny.en's transcript of the spoken answer against the answer's own subtitle.
# The shipped model scores WER 0.73 on the room question (README, "Results"; the product target is < 0.10 and is
# NOT met yet). This bound is a regression guard: silence, noise or babble (WER ~1.0) fails it, a spoken answer
# in which the listener recognises some of the subtitle's words passes.
MAX_WER = 0.85

pytestmark = pytest.mark.skipif(
    not all((DEFAULT_MODEL_DIR / c / "config.json").is_file() for c in COMPONENTS),
    reason=f"{DEFAULT_MODEL_DIR} lacks a trained component",
)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "questions"


@pytest.fixture(scope="module")
def questions() -> dict[str, Path]:
    """Spoken player questions (piper voice, see examples/README.md)."""
    return {"room": EXAMPLES / "room.wav", "follow": EXAMPLES / "well.wav", "long": EXAMPLES / "work.wav"}


@pytest.fixture(scope="module")
def listener() -> Listener:
    return Listener(threads=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve):
    """`npc-server serve` as a subprocess (the product's main job), on a copy of the personas folder."""
    with serve(tmp_path_factory.mktemp("serve"), ["--model", "v1"]) as running:
        yield running


@pytest.fixture()
def client(server):
    with NpcClient(server["target"]) as c:
        yield c


def wer(subtitle: str, transcript: str) -> float:
    ref = normalize_text(subtitle)
    return word_errors(ref, normalize_text(transcript)) / max(1, len(ref))


def test_spoken_question_gets_an_intelligible_spoken_answer(client, questions, listener):
    answer = client.ask("innkeeper", questions["room"], output_sample_rate=16000)
    wav, text, end = answer.samples(), answer.text, answer.end
    assert not end.interrupted
    assert text.strip(), "empty subtitle"
    assert len(wav) / 16000 == pytest.approx(end.audio_seconds, abs=1e-3)
    assert end.audio_seconds > 0.5, f"answer of {end.audio_seconds:.2f} s for subtitle {text!r}"
    heard = listener.transcribe(wav, 16000)
    assert wer(text, heard) <= MAX_WER, f"subtitle {text!r} but Whisper heard {heard!r}"


def test_follow_up_in_a_session_prefills_only_the_new_turn(client, questions):
    session = client.open_session("innkeeper")
    first_answer = client.ask("innkeeper", questions["room"], session=session)
    answer = client.ask("innkeeper", questions["follow"], session=session, output_sample_rate=16000)
    first_text, first = first_answer.text, first_answer.end
    wav, text, second = answer.samples(), answer.text, answer.end
    assert first_text.strip() and text.strip()
    assert len(wav) / 16000 > 0.5, f"answer of {len(wav) / 16000:.2f} s for subtitle {text!r}"
    # the second turn prefills its own audio and text only: the system prompt and first turn come from the KV cache
    assert second.timings["prefill_tokens"] < first.timings["prefill_tokens"] + first.timings["generated_tokens"]
    assert second.timings["cached_tokens"] >= first.timings["cached_tokens"] + first.timings["prefill_tokens"]
    # (not judged by the listener: the shipped model's follow-up answers are mostly unintelligible, see README)
    client.close_session(session)


def test_cancel_mid_answer_keeps_what_was_spoken(client, questions):
    session = client.open_session("innkeeper")
    speech = client.speak(npc="innkeeper", audio=questions["long"], session=session)
    chunks, end = 0, None
    for ev in speech:
        if isinstance(ev, AudioEvent):
            chunks += 1
            if chunks == 1:
                speech.cancel()
        elif isinstance(ev, EndEvent):
            end = ev
    # either the server confirmed the interruption or gRPC reports the cancelled call
    assert chunks >= 1
    assert end is None or end.interrupted
    # the session is still usable and answers the next question
    assert client.ask("innkeeper", questions["room"], session=session).text.strip()
    client.close_session(session)


def test_reloaded_persona_answers_in_its_own_voice(server, client, questions, listener):
    src = (server["personas"] / "innkeeper.yaml").read_text()
    new = src.replace("id: innkeeper", "id: night_innkeeper", 1).replace("pitch: ", "pitch: -1.0 #", 1)
    (server["personas"] / "night_innkeeper.yaml").write_text(new)
    try:
        assert "night_innkeeper" in {p["id"] for p in (client.reload_personas(), client.list_personas())[1]}
        answer = client.ask("night_innkeeper", questions["room"], output_sample_rate=16000)
        assert answer.text.strip()
        assert wer(answer.text, listener.transcribe(answer.samples(), 16000)) <= MAX_WER
    finally:
        (server["personas"] / "night_innkeeper.yaml").unlink()
        client.reload_personas()


def test_client_errors_are_statuses_and_the_server_lives_on(server, client, questions):
    with pytest.raises(NpcError) as e:
        client.ask("nobody", questions["room"])
    assert e.value.code == grpc.StatusCode.NOT_FOUND.name
    with pytest.raises(NpcError) as e:
        client.ask("innkeeper", b"RIFF" + os.urandom(200))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT.name
    assert server["proc"].poll() is None
    assert client.health()["status"] == "ok"
