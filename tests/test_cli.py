"""The npc-server dispatcher: help, version, unknown commands, and that every table entry names a module."""

from __future__ import annotations

import subprocess
import sys

from npc_server.cli import COMMANDS, main


def test_help_lists_all_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


def test_version_and_unknown(capsys):
    assert main(["--version"]) == 0
    assert "npc-server" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "npc_server.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: npc-server" in out.stdout
