#!/usr/bin/env bash
# Installs ul2 with its test and hf extras into ./.venv (created if missing) and runs the whole
# suite (the hf extra: torch 2.13.0 CPU and transformers, for the interop tests).
INSTALL_EXTRA=test,hf
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
