#!/usr/bin/env bash
# CI helper for the web UI's browser test (tests/test_ui_browser.py, marker `browser`): installs
# Debian's Chromium (Playwright must never download a browser of its own) and the UI's Python
# packages. Without them that test skips with its reason; everything else runs as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v chromium >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python -m pip install -q --disable-pip-version-check -e ".[ui]" playwright
