#!/usr/bin/env bash
# Installs ul2 with its test extra into ./.venv (created if missing) and runs the whole suite.
INSTALL_EXTRA=test
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
