"""Persona YAML loading: the shipped examples, precise errors (file, field, line), and hot reload."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from npc_server.controls import LANGUAGES, Controls
from npc_server.paths import DEFAULT_PERSONAS_DIR
from npc_server.personas import PersonaError, PersonaStore, load_folder, load_persona, parse_persona
from npc_server.voices import VOICE_BANK

GOOD = """\
id: tester
name: Test Person
role: innkeeper
backstory: Runs a test inn.
language: en
accent: us
voice:
  timbre: joe
  pitch: 2
  speed: 1.1
emotion:
  default: happy
  allowed: [happy, neutral]
greeting: Hello there.
"""


def test_shipped_personas_are_valid_and_varied():
    personas, errors = load_folder(DEFAULT_PERSONAS_DIR)
    assert errors == []
    assert len(personas) >= 5
    roles = {p.role for p in personas.values()}
    assert {"innkeeper", "guard", "merchant", "blacksmith", "quest_giver"} <= roles
    assert len({p.voice.timbre for p in personas.values()}) >= 4
    assert len({p.default_emotion for p in personas.values()}) >= 3
    assert len({p.voice.speed for p in personas.values()}) >= 3
    assert len({(p.language, p.accent) for p in personas.values()}) >= 3
    assert len({p.language for p in personas.values()}) >= 2
    for p in personas.values():
        assert p.voice.timbre in VOICE_BANK and p.language in LANGUAGES
        assert p.name in p.prompt_text()


def test_good_persona_parses():
    p = parse_persona(GOOD, "tester.yaml")
    assert p.id == "tester" and p.voice.pitch == 2.0 and p.voice.speed == 1.1
    assert p.allowed_emotions == ("happy", "neutral") and p.default_emotion == "happy"
    assert p.max_answer_seconds == 15.0


def test_controls_from_persona_and_overrides():
    from npc_server.service.api import Overrides

    p = parse_persona(GOOD, "tester.yaml")
    assert Controls.from_persona(p) == Controls.from_persona(p, Overrides()) == Controls(
        voice="joe", language="en", accent="us", emotion="happy", speed=1.1, pitch_st=2.0)
    ja = Controls.from_persona(p, Overrides(language="ja", emotion="neutral", pitch=-3))
    assert (ja.language, ja.accent, ja.emotion, ja.pitch_st) == ("ja", "standard", "neutral", -3.0)
    assert "ja" in VOICE_BANK[ja.voice].languages  # joe cannot speak Japanese: the first bank voice that can
    bad_requests = [(Overrides(emotion="sad"), "does not allow"), (Overrides(speed=9), "speed must be"),
                    (Overrides(language="xx" * 40), r"characters\)"), (Overrides(accent="gb", language="ja"), "for 'ja'")]
    for bad, words in bad_requests:
        with pytest.raises(ValueError, match=words):
            Controls.from_persona(p, bad)


def _error(text: str) -> PersonaError:
    with pytest.raises(PersonaError) as info:
        parse_persona(text, "broken.yaml")
    return info.value


@pytest.mark.parametrize(
    "old,new,field,line,words",
    [
        ("  pitch: 2\n", "  pitch: 20\n", "voice.pitch", 9, "between -12 and 12"),
        ("  speed: 1.1\n", "  speed: fast\n", "voice.speed", 10, "must be a number"),
        ("  timbre: joe\n", "  timbre: darth\n", "voice.timbre", 8, "unknown voice timbre 'darth'"),
        ("role: innkeeper\n", "role: dragon\n", "role", 3, "unknown role"),
        ("greeting: Hello there.\n", "greeting: Hello there.\ncolour: red\n", "colour", 15, "unknown field"),
        ("  allowed: [happy, neutral]\n", "  allowed: [happy, grumpy]\n", "emotion.allowed", 13, "grumpy"),
        ("  default: happy\n", "  default: sad\n", "emotion.default", 12, "not in emotion.allowed"),
        ("accent: us\n", "accent: texan\n", "accent", 6, "unknown accent"),
        ("language: en\n", "language: klingon\n", "language", 5, "unknown language"),
        ("id: tester\n", "id: Tester Two\n", "id", 1, "lowercase"),
        ("name: Test Person\n", "", "name", 1, "required but missing"),
        ("accent: us\n", "accent: gb\n", "voice.timbre", 8, "cannot speak en/gb"),
        ("language: en\naccent: us\n", "language: ja\n", "voice.timbre", 7, "cannot speak ja/standard"),
        ("voice:\n  timbre: joe\n  pitch: 2\n  speed: 1.1\n", "voice: loud\n", "voice", 7, "must be a mapping"),
    ],
)
def test_errors_name_field_and_line(old, new, field, line, words):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    err = _error(text)
    assert err.file == "broken.yaml"
    assert err.field == field
    assert err.line == line
    assert words in err.message
    assert str(err).startswith(f"broken.yaml:{line}: {field}:")


def test_yaml_syntax_error_has_line():
    err = _error(GOOD.replace("  pitch: 2\n", "  pitch: [2\n"))
    assert "YAML syntax error" in err.message and err.line is not None and err.line >= 10


def test_empty_file_and_duplicate_key():
    assert "empty" in _error("").message
    err = _error(GOOD + "name: Again\n")
    assert err.field == "name" and "twice" in err.message and err.line == 15


def test_duplicate_ids_in_folder(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    personas, errors = load_folder(tmp_path)
    assert list(personas) == ["tester"]
    assert len(errors) == 1 and errors[0].field == "id" and "already used" in errors[0].message


def test_load_persona_reports_the_path(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text(GOOD.replace("  speed: 1.1", "  speed: 9"))
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    assert str(info.value).startswith(f"{path}:10: voice.speed:")


def test_store_hot_reload_keeps_last_good_version(tmp_path: Path):
    for f in DEFAULT_PERSONAS_DIR.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    store = PersonaStore(tmp_path)
    assert store.get("innkeeper").name == "Greta"
    with pytest.raises(KeyError, match="unknown NPC 'nobody'"):
        store.get("nobody")

    # A broken edit keeps the last good innkeeper and reports the error.
    inn = tmp_path / "innkeeper.yaml"
    good_text = inn.read_text()
    inn.write_text(good_text.replace("pitch: 0.0", "pitch: 99"))
    res = store.reload()
    assert store.get("innkeeper").voice.pitch == 0.0
    assert [e.field for e in res.errors] == ["voice.pitch"]

    # A good edit is picked up; a new file appears; a deleted file disappears.
    inn.write_text(good_text.replace("name: Greta", "name: Greta the Second"))
    (tmp_path / "tester.yaml").write_text(GOOD)
    (tmp_path / "merchant.yaml").unlink()
    res = store.reload()
    assert store.get("innkeeper").name == "Greta the Second"
    assert "tester" in res.changed and "innkeeper" in res.changed and res.removed == ["merchant"]
    assert res.errors == []


def test_store_watch_thread_picks_up_changes(tmp_path: Path):
    (tmp_path / "tester.yaml").write_text(GOOD)
    store = PersonaStore(tmp_path)
    seen = []
    store.watch(interval=0.05, on_reload=seen.append)
    try:
        time.sleep(0.05)
        (tmp_path / "tester.yaml").write_text(GOOD.replace("Test Person", "Renamed"))
        deadline = time.time() + 5
        while store.get("tester").name != "Renamed" and time.time() < deadline:
            time.sleep(0.05)
        assert store.get("tester").name == "Renamed"
        assert seen and "tester" in seen[-1].changed
    finally:
        store.stop()


def test_dangling_symlink_or_vanished_file_is_skipped_and_the_watcher_lives_on(tmp_path: Path, caplog):
    (tmp_path / "tester.yaml").write_text(GOOD)
    store = PersonaStore(tmp_path)
    seen = []
    store.watch(interval=0.05, on_reload=seen.append)
    try:
        (tmp_path / "ghost.yaml").symlink_to(tmp_path / "nowhere.yaml")  # stat() fails: a file that vanished
        deadline = time.time() + 5
        while not seen and time.time() < deadline:
            time.sleep(0.05)
        assert seen and any("ghost.yaml" in str(e) and "cannot read file" in str(e) for e in seen[-1].errors)
        assert any("ghost.yaml" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert store.get("tester").name == "Test Person"
        res = store.reload()  # what ReloadPersonas calls: an error in the result, not an exception
        assert res.loaded == ["tester"] and [Path(e.file).name for e in res.errors] == ["ghost.yaml"]
        # the watcher is still alive and picks up the next change
        (tmp_path / "tester.yaml").write_text(GOOD.replace("Test Person", "Still Watched"))
        deadline = time.time() + 5
        while store.get("tester").name != "Still Watched" and time.time() < deadline:
            time.sleep(0.05)
        assert store.get("tester").name == "Still Watched"
    finally:
        store.stop()


def test_cli_reports_errors(tmp_path: Path, capsys):
    from npc_server.cli import main

    assert main(["personas"]) == 0
    (tmp_path / "bad.yaml").write_text(GOOD.replace("role: innkeeper", "role: wizard"))
    assert main(["personas", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:3: role: unknown role 'wizard'" in err
