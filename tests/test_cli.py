"""The npc-server dispatcher: help, version, unknown commands, and that every table entry names a module."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npc_server.cli import COMMANDS, PLAY, main


def test_help_lists_all_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


def test_help_groups_play_and_develop(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    play, develop = out.index("play ("), out.index("develop (")
    assert play < develop
    for words in COMMANDS:
        at = out.index(f"  {' '.join(words)} ")
        assert (play < at < develop) == (words in PLAY)


@pytest.mark.parametrize("command", [("train", "tokenizer"), ("train", "tokenizer-v2"), ("train", "readout"),
                                     ("train", "vocoder"), ("train", "hearing"), ("train", "tts")])
def test_training_writes_under_runs_by_default(command, monkeypatch):
    """A trainer run without --out never writes over the shipped model in models/."""
    from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT

    class Parsed(Exception):
        pass

    def defaults(parser, args=None, namespace=None):
        raise Parsed({action.dest: action.default for action in parser._actions})

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", defaults)
    module, func = COMMANDS[command][0].split(":")
    with pytest.raises(Parsed) as parsed:
        getattr(importlib.import_module(module), func)([])
    out = Path(parsed.value.args[0]["out"])
    assert REPO_ROOT / "runs" in out.parents and DEFAULT_MODEL_DIR not in [out, *out.parents]


def test_version_and_unknown(capsys):
    assert main(["--version"]) == 0
    assert "npc-server" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "npc_server.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: npc-server" in out.stdout


@pytest.mark.parametrize("command", ["npc", "listen", "tokenizer", "vocoder"])
def test_eval_without_a_corpus_says_what_is_missing(command, tmp_path, monkeypatch):
    """A fresh clone has no corpus: one line naming the file and the command that makes it, no traceback."""
    monkeypatch.setenv("NPC_VOICE_DATA", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["eval", command])
    message = str(e.value.code)
    assert message.startswith(f"npc-server eval {command}: no corpus at {tmp_path / 'corpus' / 'default'}")
    assert "manifest.jsonl" in message and "`npc-server train corpus --size default`" in message
    assert "\n" not in message


def test_eval_without_a_corpus_prints_no_traceback(tmp_path):
    env = {**os.environ, "NPC_VOICE_DATA": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "npc_server.cli", "eval", "npc", "--limit", "1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "dialogues.jsonl" in r.stderr


def test_readme_serve_flags_match_serve_help():
    """The README's Serving API section names exactly the flags `npc-server serve --help` has."""
    import re

    from npc_server.paths import REPO_ROOT
    from npc_server.service.serve import build_parser

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Serving API"):readme.index("Python SDK:")]
    named = set(re.findall(r"(--[a-z][a-z-]+)", section)) - {"--tls-ca", "--help"}  # --tls-ca: of `say`
    serve_flags = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert named - serve_flags == set(), "README names flags serve does not have"
    assert serve_flags - named == set(), "serve flags the README does not name"


@pytest.mark.parametrize("command", [("serve",), ("train", "vocoder"), ("train", "tokenizer"), ("train", "readout"),
                                     ("train", "tokenizer-v2"), ("train", "hearing"), ("train", "pretrain"),
                                     ("train", "sft"), ("train", "dpo"), ("train", "draft")])
def test_research_knobs_sit_in_the_advanced_group(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "\nadvanced:\n" in out
    assert out.index("\nadvanced:\n") > out.index("--threads")  # everyday flags first


def test_trainers_share_one_word_per_concept_and_keep_the_old_ones():
    """precision / resume / batch / warm-up: the common word is listed, the old spelling still parses, unlisted."""
    from npc_server.training.train_tokenizer import build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for word in ("--precision", "--no-resume", "--warmup-steps"):
        assert word in help_text
    assert "--dtype" not in help_text and "--fresh " not in help_text and "--warmup " not in help_text
    old = parser.parse_args(["--dtype", "fp32", "--fresh", "--warmup", "5"])
    new = parser.parse_args(["--precision", "fp32", "--no-resume", "--warmup-steps", "5"])
    assert vars(old) == vars(new)
    assert (parser.parse_args([]).precision, parser.parse_args([]).no_resume) == ("auto", False)
