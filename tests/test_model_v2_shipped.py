"""The shipped model v2 parts on their real base weights (Whisper base, Gemma 3 270M from the pretrained cache that
`make setup` fills): tokenizer v2 streams real audio, backbone v2 hears the example questions."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from npc_server.paths import DEFAULT_MODEL_DIR

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "questions"
SPOKEN = {"room.wav": "How much is a room for the night?", "well.wav": "How do I get to the town well?",
          "work.wav": "Is there any work around here?"}


@pytest.fixture(scope="module")
def tokenizer():
    from npc_server.tokenizer.tokenizer_v2 import load_tokenizer

    return load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer_v2")


def test_shipped_tokenizer_v2_streams_a_real_question(tokenizer):
    wav, sr = sf.read(str(EXAMPLES / "room.wav"), dtype="float32")
    toks = tokenizer.encode(wav, sr)
    assert tokenizer.version == 2 and toks.linguistic.numel() == 2 * toks.n_groups
    s = tokenizer.stream(sr)
    parts = [s.push(wav[i : i + 1600]) for i in range(0, len(wav), 1600)] + [s.flush()]
    assert torch.equal(torch.cat([p.linguistic for p in parts]), toks.linguistic)
    assert len(set(toks.linguistic.tolist())) > 5  # speech, not one code


def test_shipped_backbone_v2_hears_the_example_questions(tokenizer):
    from npc_server.backbone.audio_lm import AudioLM, load_text_tokenizer
    from npc_server.backbone.template_v2 import HearingFormat
    from npc_server.eval.listen_v2 import transcribe
    from npc_server.eval.metrics import normalize_text, word_errors

    torch.set_num_threads(2)
    model = AudioLM.from_pretrained(DEFAULT_MODEL_DIR / "backbone_v2")
    fmt = HearingFormat(model.cfg.layout, load_text_tokenizer(model.cfg.base), model.cfg.audio_input)
    errors = words = 0
    for name, text in SPOKEN.items():
        wav, sr = sf.read(str(EXAMPLES / name), dtype="float32")
        heard = transcribe(model, fmt, fmt.audio(tokenizer.encode(wav, sr).linguistic.numpy()))
        ref = normalize_text(text)
        errors, words = errors + word_errors(ref, normalize_text(heard)), words + len(ref)
    assert errors / words < 0.34, f"{errors} word errors in {words} words"


def test_eval_npc_runs_the_v2_backbone_on_the_shipped_eval_set(tmp_path, capsys):
    """A fresh clone (no corpus) can measure the v2 answers: the eval set ships in data/eval/npc."""
    import json

    from npc_server.eval.eval_set import SHIPPED_SET
    from npc_server.eval.npc_eval import main

    out = tmp_path / "npc.json"
    assert main(["--backbone", str(DEFAULT_MODEL_DIR / "backbone_v2"), "--corpus", str(SHIPPED_SET), "--limit", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expected fact in the subtitle" in printed
    report = json.loads(out.read_text())
    (model,) = report["models"].values()
    assert model["summary"]["n"] == 2 and all(isinstance(r["answer"], str) for r in model["results"])
    if (DEFAULT_MODEL_DIR / "talker" / "config.json").is_file():  # the answers are spoken and heard as well
        assert "spoken answers (talker + vocoder)" in printed
        spoken = model["spoken"]
        assert spoken["answers"] >= 1 and 0.0 <= spoken["wer"]["all"]["talker"]
        assert all(a["seconds"] > 0.3 for a in spoken["per_answer"])


def test_eval_off_script_asks_every_persona(tmp_path):
    import json

    from npc_server.eval.off_script import main

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"questions": ["What is the capital of France?"]}))
    out = tmp_path / "off.json"
    assert main(["--backbone", str(DEFAULT_MODEL_DIR / "backbone_v2"), "--questions", str(questions),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["answers"] == report["summary"]["personas"] == 6
    assert {r["persona"] for r in report["results"]} >= {"innkeeper", "tea_seller"}


def test_shipped_backbone_v2_answers_the_example_questions_in_character(tokenizer):
    """Spoken example questions under their persona's system turn: the answer carries the persona's fact."""
    from npc_server.backbone.audio_lm import AudioLM, load_text_tokenizer
    from npc_server.backbone.template_v2 import DialogueFormat
    from npc_server.eval.answer_v2 import answer
    from npc_server.eval.npc_eval import contains
    from npc_server.paths import DEFAULT_PERSONAS_DIR
    from npc_server.training.lm_data import persona_texts

    torch.set_num_threads(2)
    model = AudioLM.from_pretrained(DEFAULT_MODEL_DIR / "backbone_v2")
    fmt = DialogueFormat(model.cfg.layout, load_text_tokenizer(model.cfg.base), model.cfg.audio_input)
    texts = persona_texts(DEFAULT_PERSONAS_DIR)
    asked = {"room.wav": ("innkeeper", "five gold"), "well.wav": ("innkeeper", "west corner"),
             "work.wav": ("quest_giver", "silver ring")}
    for name, (persona, fact) in asked.items():
        wav, sr = sf.read(str(EXAMPLES / name), dtype="float32")
        audio = fmt.audio(tokenizer.encode(wav, sr).linguistic.numpy())
        text, ended = answer(model, fmt, fmt.answer_prompt(texts[persona], "en", [], audio=audio), 48)
        assert ended and contains(fact, text, "en"), (name, text)
